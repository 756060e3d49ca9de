//! One `/dev/kmsg` record: `pri,seq,ts_usec,flags[,...];message\n` followed by dictionary
//! lines ` KEY=value\n`. Pure parsing: malformed input is a [`RecordError`], never a panic.

use thiserror::Error;

/// The kernel's own facility. Anything else was written into `/dev/kmsg` by a process.
pub const FACILITY_KERN: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// `pri >> 3`: 0 is `kern`; lines written by root into `/dev/kmsg` arrive as 1 (`user`).
    pub facility: u8,
    /// `pri & 7`: 0 emerg ... 7 debug.
    pub level: u8,
    pub seq: u64,
    /// Microseconds of the kernel's printk clock (CLOCK_MONOTONIC-like, stops in suspend).
    pub ts_usec: u64,
    /// `-`, or `c`/`+` for fragments of a continued line on old kernels.
    pub flags: char,
    /// The text, with `\xNN` escapes undone (invalid UTF-8 replaced).
    pub message: String,
    /// ` KEY=value` continuation lines (`SUBSYSTEM`, `DEVICE`, ...), unescaped.
    pub dictionary: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    #[error("empty record")]
    Empty,
    #[error("no ';' ends the record header")]
    NoHeaderEnd,
    #[error("header field `{0}` is missing")]
    MissingField(&'static str),
    #[error("header field `{field}` is not a number: {value:?}")]
    NotANumber { field: &'static str, value: String },
    #[error("priority {0} is out of range")]
    PriorityOutOfRange(u32),
    #[error("line does not start with <priority>")]
    NoPriority,
    #[error("timestamp [{0}] is not [seconds.micros]")]
    BadTimestamp(String),
    #[error("dictionary line {0:?} does not start with a space and contain '='")]
    BadDictionaryLine(String),
}

/// Parse one record as returned by one `read()` of `/dev/kmsg`.
pub fn parse_record(raw: &[u8]) -> Result<Record, RecordError> {
    if raw.is_empty() {
        return Err(RecordError::Empty);
    }
    let header_end = raw
        .iter()
        .position(|&b| b == b';')
        .ok_or(RecordError::NoHeaderEnd)?;
    let header = &raw[..header_end];
    let mut fields = header.split(|&b| b == b',');
    let pri: u32 = number(fields.next(), "pri")?;
    let seq: u64 = number(fields.next(), "seq")?;
    let ts_usec: u64 = number(fields.next(), "ts_usec")?;
    let flags = match fields.next() {
        Some([flag, ..]) => char::from(*flag),
        _ => return Err(RecordError::MissingField("flags")),
    };
    // Further header fields (e.g. `caller=T123`) are optional extensions: ignored.
    let facility = u8::try_from(pri >> 3).map_err(|_| RecordError::PriorityOutOfRange(pri))?;
    // Masked to three bits, so the cast cannot truncate.
    let level = (pri & 7) as u8;

    let body = &raw[header_end + 1..];
    let (message, rest) = match body.iter().position(|&b| b == b'\n') {
        Some(end) => (&body[..end], &body[end + 1..]),
        None => (body, &body[body.len()..]),
    };
    let mut dictionary = Vec::new();
    for line in rest.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let entry = line.strip_prefix(b" ").and_then(|l| {
            l.iter()
                .position(|&b| b == b'=')
                .map(|eq| (&l[..eq], &l[eq + 1..]))
        });
        let Some((key, value)) = entry else {
            return Err(RecordError::BadDictionaryLine(
                String::from_utf8_lossy(line).into_owned(),
            ));
        };
        dictionary.push((unescape(key), unescape(value)));
    }
    Ok(Record {
        facility,
        level,
        seq,
        ts_usec,
        flags,
        message: unescape(message),
        dictionary,
    })
}

pub(super) fn number<T: std::str::FromStr>(
    field: Option<&[u8]>,
    name: &'static str,
) -> Result<T, RecordError> {
    let bytes = field.ok_or(RecordError::MissingField(name))?;
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RecordError::NotANumber {
            field: name,
            value: String::from_utf8_lossy(bytes).into_owned(),
        })
}

/// Undo the kernel's `\xNN` escaping, then decode as UTF-8 (lossy). A backslash not followed by
/// `x` and two hex digits is kept as it is.
pub fn unescape(raw: &[u8]) -> String {
    if !raw.contains(&b'\\') {
        return String::from_utf8_lossy(raw).into_owned();
    }
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\'
            && raw.get(i + 1) == Some(&b'x')
            && let (Some(high), Some(low)) = (
                raw.get(i + 2).and_then(|&b| hex_value(b)),
                raw.get(i + 3).and_then(|&b| hex_value(b)),
            )
        {
            bytes.push(high << 4 | low);
            i += 4;
        } else {
            bytes.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8(bytes)
        .unwrap_or_else(|invalid| String::from_utf8_lossy(invalid.as_bytes()).into_owned())
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_header_message_and_dictionary() {
        let r = parse_record(
            b"6,339,5140900,-;NET: Registered protocol family 10\n SUBSYSTEM=net\n DEVICE=+net:lo\n",
        )
        .unwrap();
        assert_eq!(r.facility, 0);
        assert_eq!(r.level, 6);
        assert_eq!(r.seq, 339);
        assert_eq!(r.ts_usec, 5140900);
        assert_eq!(r.flags, '-');
        assert_eq!(r.message, "NET: Registered protocol family 10");
        assert_eq!(
            r.dictionary,
            vec![
                ("SUBSYSTEM".to_string(), "net".to_string()),
                ("DEVICE".to_string(), "+net:lo".to_string())
            ]
        );
    }

    #[test]
    fn facility_and_level_from_priority() {
        let r = parse_record(b"12,1,2,-;written by root\n").unwrap();
        assert_eq!((r.facility, r.level), (1, 4));
        let r = parse_record(b"3,1,2,c;x").unwrap();
        assert_eq!((r.facility, r.level, r.flags), (0, 3, 'c'));
        assert_eq!(r.message, "x");
    }

    #[test]
    fn extra_header_fields_and_semicolons_in_message() {
        let r = parse_record(b"4,7,8,-,caller=T42;a;b;c\n").unwrap();
        assert_eq!(r.message, "a;b;c");
        assert_eq!(r.seq, 7);
    }

    #[test]
    fn unescapes_message_and_dictionary_values() {
        let r = parse_record(b"6,1,1,-;tab\\x09here \\x5c end\n K\\x3d=v\\x0aw\n").unwrap();
        assert_eq!(r.message, "tab\there \\ end");
        assert_eq!(r.dictionary, vec![("K=".to_string(), "v\nw".to_string())]);
    }

    #[test]
    fn unescape_keeps_incomplete_escapes_and_replaces_invalid_utf8() {
        assert_eq!(unescape(b"a\\x4"), "a\\x4");
        assert_eq!(unescape(b"a\\xZZ\\"), "a\\xZZ\\");
        assert_eq!(unescape(b"\\xe2\\x82\\xac"), "\u{20ac}");
        assert_eq!(unescape(b"bad \\xff byte"), "bad \u{fffd} byte");
        assert_eq!(unescape(b"raw \xff"), "raw \u{fffd}");
    }

    #[test]
    fn malformed_records_are_typed_errors() {
        assert_eq!(parse_record(b""), Err(RecordError::Empty));
        assert_eq!(
            parse_record(b"6,1,2,- no semicolon"),
            Err(RecordError::NoHeaderEnd)
        );
        assert_eq!(
            parse_record(b"6,1,2;x"),
            Err(RecordError::MissingField("flags"))
        );
        assert_eq!(
            parse_record(b"6,1;x"),
            Err(RecordError::MissingField("ts_usec"))
        );
        assert!(matches!(
            parse_record(b"six,1,2,-;x"),
            Err(RecordError::NotANumber { field: "pri", .. })
        ));
        assert!(matches!(
            parse_record(b"6,-1,2,-;x"),
            Err(RecordError::NotANumber { field: "seq", .. })
        ));
        assert_eq!(
            parse_record(b"99999,1,2,-;x"),
            Err(RecordError::PriorityOutOfRange(99999))
        );
        assert!(matches!(
            parse_record(b"6,1,2,-;x\nno leading space\n"),
            Err(RecordError::BadDictionaryLine(_))
        ));
        assert!(matches!(
            parse_record(b"6,1,2,-;x\n no equals sign\n"),
            Err(RecordError::BadDictionaryLine(_))
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state: u32 = 0x1234_5678;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    b"0123456789,;-\\x \nabcdef\xff"[state as usize % 24]
                })
                .collect();
            let _ = parse_record(&bytes);
        }
    }
}
