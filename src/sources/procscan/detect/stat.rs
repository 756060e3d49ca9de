//! Parsing one task's `stat` line. Pure, allocation-free and total: any input gives a value
//! or `None`, never a panic.

/// The fields of `/proc/<pid>/task/<tid>/stat` the scanner needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskStat<'a> {
    /// Field 2, without the parentheses. May contain spaces and `)`.
    pub comm: &'a [u8],
    /// Field 3: `R`, `S`, `D`, `Z`, `T`, `t`, `X`, `I`, ...
    pub state: u8,
    /// Field 4.
    pub ppid: i32,
    /// Field 22: clock ticks after boot at which the task started.
    pub starttime: u64,
}

/// Parse a `stat` line: `pid (comm) state ppid ... starttime ...`.
///
/// comm is everything between the first `(` and the last `)`: the kernel does not escape it,
/// so a task can name itself `a) R 1 (b` and only the last `)` is trustworthy.
pub fn parse_stat(line: &[u8]) -> Option<TaskStat<'_>> {
    let open = line.iter().position(|&b| b == b'(')?;
    let close = line.iter().rposition(|&b| b == b')')?;
    let comm = line.get(open + 1..close)?;
    let rest = line.get(close + 1..)?.strip_prefix(b" ")?;
    let mut fields = rest
        .split(|&b| b == b' ' || b == b'\n')
        .filter(|f| !f.is_empty());
    let state = match fields.next()? {
        [state] => *state,
        _ => return None,
    };
    let ppid = i32::try_from(parse_u64(fields.next()?)?).ok()?;
    // The next field is number 5; starttime is number 22.
    let starttime = parse_u64(fields.nth(22 - 5)?)?;
    Some(TaskStat {
        comm,
        state,
        ppid,
        starttime,
    })
}

/// A decimal number made only of ASCII digits, without overflow.
pub fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |value, &b| {
        if b.is_ascii_digit() {
            value.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// A pid or tid directory name.
pub fn parse_pid(name: &[u8]) -> Option<i32> {
    parse_u64(name).and_then(|n| i32::try_from(n).ok())
}

/// A comm kept by value: D tasks are collected during the walk without allocating.
/// The kernel shows at most 64 bytes (workqueue workers append their queue's name).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Comm {
    bytes: [u8; 64],
    len: u8,
}

impl Comm {
    pub fn new(comm: &[u8]) -> Comm {
        let mut bytes = [0u8; 64];
        let len = comm.len().min(bytes.len());
        bytes[..len].copy_from_slice(&comm[..len]);
        Comm {
            bytes,
            len: len as u8,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Lossy: comm is bytes, and may not be UTF-8.
impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLEEP: &[u8] = b"30539 (sleep) S 30537 30536 8956 0 -1 4194304 84 0 0 0 0 0 0 0 20 0 1 0 393065 2490368 224 18446744073709551615 94 95 96 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn parses_a_real_line() {
        let s = parse_stat(SLEEP).unwrap();
        assert_eq!(s.comm, b"sleep");
        assert_eq!(s.state, b'S');
        assert_eq!(s.ppid, 30537);
        assert_eq!(s.starttime, 393065);
    }

    #[test]
    fn comm_with_parentheses_and_spaces() {
        let line = b"42 (a) R 1 (b c)) D 7 0 0 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 555 0 0\n";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.comm, b"a) R 1 (b c)");
        assert_eq!(s.state, b'D');
        assert_eq!(s.ppid, 7);
        assert_eq!(s.starttime, 555);
        let empty = b"42 () S 1 0 0 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0";
        assert_eq!(parse_stat(empty).unwrap().comm, b"");
        let runc_init = b"9 (runc:[2:INIT]) S 1 0 0 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0";
        assert_eq!(parse_stat(runc_init).unwrap().comm, b"runc:[2:INIT]");
    }

    #[test]
    fn every_truncation_is_none_or_consistent() {
        for end in 0..SLEEP.len() {
            if let Some(s) = parse_stat(&SLEEP[..end]) {
                assert_eq!(s.state, b'S');
                assert!(s.starttime <= 393065, "prefix of {end} bytes gave {s:?}");
            }
        }
        // Cut inside field 22: a shorter number, still digits; cut before it: nothing.
        let before_starttime = SLEEP.windows(7).position(|w| w == b" 393065").unwrap();
        assert_eq!(parse_stat(&SLEEP[..before_starttime]), None);
    }

    #[test]
    fn garbage_is_none() {
        for line in [
            &b""[..],
            b"(",
            b")",
            b")(",
            b"1 (x)",
            b"1 (x) ",
            b"1 (x)S 1",
            b"1 (x) SS 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 5",
            b"1 (x) S -1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 5",
            b"1 (x) S 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 99999999999999999999999",
            b"1 (x) S 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 12a",
            b"1 (x) S 99999999999 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 5",
        ] {
            assert_eq!(
                parse_stat(line),
                None,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic generator biased towards the bytes the parser looks at.
        let alphabet = b"() D S 0123456789\n\xff";
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 80) as usize;
            let line: Vec<u8> = (0..len)
                .map(|i| alphabet[((seed >> (i % 60)) as usize + i) % alphabet.len()])
                .collect();
            let _ = parse_stat(&line);
        }
    }

    #[test]
    fn numbers_and_pids() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"+1"), None);
        assert_eq!(parse_pid(b"4194304"), Some(4194304));
        assert_eq!(parse_pid(b"self"), None);
        assert_eq!(parse_pid(b"3000000000"), None);
    }

    #[test]
    fn comm_keeps_up_to_64_bytes() {
        assert_eq!(Comm::new(b"runc").as_bytes(), b"runc");
        let long = [b'k'; 100];
        assert_eq!(Comm::new(&long).as_bytes().len(), 64);
        assert_eq!(Comm::new(b"a\xffb").to_string(), "a\u{fffd}b");
    }
}
