//! A small `/dev/kmsg` reader: non-blocking, one record per `read()`, exact accounting of
//! records overwritten before they were read (from gaps in `seq`).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::{Mode, SFlag, fstat};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::{Whence, lseek, read};
use thiserror::Error;

use super::event::KernelLogCounters;
use super::record::{Record, RecordError, parse_record};
use super::syslog::TimestampMark;

/// The kernel formats one record into at most this many bytes (`CONSOLE_EXT_LOG_MAX`).
pub const RECORD_BUFFER_SIZE: usize = 8192;

/// Where reading starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPosition {
    /// Only records logged from now on: no replay of history.
    End,
    /// The records after this `seq` (from an earlier run in the same boot). Records between it
    /// and the oldest record still held are counted as lost.
    AfterSeq(u64),
    /// The records after this mark (from an earlier run of the syslog(2) source in the same
    /// boot).
    AfterTimestamp(TimestampMark),
    /// The records logged within this long before now, for the one-shot check. Compared with
    /// CLOCK_MONOTONIC: the printk clock, like it, stops during suspend, whereas BOOTTIME keeps
    /// counting and would shift the window past every record logged after a resume.
    LookBack(Duration),
}

#[derive(Debug, Error)]
pub enum ReaderError {
    #[error("cannot open {}: {errno}", path.display())]
    Open { path: PathBuf, errno: Errno },
    #[error("{} is not a character device (is it the kernel log?)", path.display())]
    NotCharDevice { path: PathBuf },
    #[error("cannot inspect {}: {errno}", path.display())]
    Stat { path: PathBuf, errno: Errno },
    #[error("cannot seek to the end of {}: {errno}", path.display())]
    Seek { path: PathBuf, errno: Errno },
    #[error("cannot read {}: {errno}", path.display())]
    Read { path: PathBuf, errno: Errno },
    #[error("cannot watch {} for new records: {source}", path.display())]
    Watch {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read CLOCK_MONOTONIC: {0}")]
    Clock(Errno),
    #[error("syslog(2) {action}: {errno}")]
    Syslog { action: &'static str, errno: Errno },
    /// `auto`: /dev/kmsg refused, and syslog(2) too.
    #[error("{kmsg}; {syslog}")]
    NoSource {
        kmsg: Box<ReaderError>,
        syslog: Box<ReaderError>,
    },
}

impl ReaderError {
    /// The OS error behind this one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            ReaderError::Open { errno, .. }
            | ReaderError::Stat { errno, .. }
            | ReaderError::Seek { errno, .. }
            | ReaderError::Read { errno, .. }
            | ReaderError::Clock(errno)
            | ReaderError::Syslog { errno, .. } => Some(*errno),
            ReaderError::NoSource { syslog, .. } => syslog.errno(),
            ReaderError::Watch { source, .. } => source.raw_os_error().map(Errno::from_raw),
            ReaderError::NotCharDevice { .. } => None,
        }
    }
}

/// The result of one read.
#[derive(Debug)]
pub enum KmsgRead {
    Record(Record),
    /// A record before the start position, passed over.
    Skipped,
    /// A record that did not parse; counted.
    Malformed(RecordError),
    /// Nothing more to read for now.
    Drained,
}

#[derive(Debug)]
pub struct KmsgReader {
    fd: OwnedFd,
    path: PathBuf,
    buffer: Box<[u8]>,
    skip_through: Option<u64>,
    not_before_usec: Option<u64>,
    /// The seq the next record should have; None until known (after seeking to the end).
    expected_seq: Option<u64>,
    counters: KernelLogCounters,
}

impl AsFd for KmsgReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for KmsgReader {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Now on CLOCK_MONOTONIC, in microseconds.
pub fn monotonic_now_usec() -> Result<u64, Errno> {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC)?;
    let secs = u64::try_from(now.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec()).unwrap_or(0);
    Ok(secs * 1_000_000 + nanos / 1_000)
}

/// Longest scan for the newest record: a flood of new records could otherwise keep it going.
const SCAN_BUDGET: Duration = Duration::from_secs(2);

/// The seq of the newest record the kernel holds, read through a descriptor of its own.
fn newest_seq_held(path: &Path) -> Result<Option<u64>, ReaderError> {
    let mut scan = KmsgReader::open(path, StartPosition::AfterSeq(0))?;
    // From the oldest record held, passing over none.
    scan.skip_through = None;
    scan.expected_seq = None;
    let give_up = Instant::now() + SCAN_BUDGET;
    let mut newest = None;
    while Instant::now() < give_up {
        match scan.read_next()? {
            KmsgRead::Drained => break,
            KmsgRead::Record(record) => newest = Some(record.seq),
            KmsgRead::Malformed(_) => newest = scan.last_seq().or(newest),
            KmsgRead::Skipped => {}
        }
    }
    Ok(newest)
}

impl KmsgReader {
    pub fn open(path: &Path, start: StartPosition) -> Result<KmsgReader, ReaderError> {
        let fd = open(
            path,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| ReaderError::Open {
            path: path.to_path_buf(),
            errno,
        })?;
        let stat = fstat(&fd).map_err(|errno| ReaderError::Stat {
            path: path.to_path_buf(),
            errno,
        })?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFCHR {
            return Err(ReaderError::NotCharDevice {
                path: path.to_path_buf(),
            });
        }
        let mut reader = KmsgReader {
            fd,
            path: path.to_path_buf(),
            buffer: vec![0; RECORD_BUFFER_SIZE].into_boxed_slice(),
            skip_through: None,
            not_before_usec: None,
            expected_seq: None,
            counters: KernelLogCounters::default(),
        };
        match start {
            // A position saved by the syslog(2) source says nothing about seqs: only new
            // records.
            StartPosition::End | StartPosition::AfterTimestamp(_) => {
                lseek(&reader.fd, 0, Whence::SeekEnd).map_err(|errno| ReaderError::Seek {
                    path: path.to_path_buf(),
                    errno,
                })?;
                // Knowing the seq at the end makes the position worth saving before the first
                // new record, and gaps countable from the first read. Scanned after the seek:
                // a record logged in between is then read, not counted lost.
                reader.expected_seq = newest_seq_held(path)?.and_then(|seq| seq.checked_add(1));
            }
            StartPosition::AfterSeq(seq) => {
                reader.skip_through = Some(seq);
                reader.expected_seq = seq.checked_add(1);
            }
            StartPosition::LookBack(window) => {
                let now = monotonic_now_usec().map_err(ReaderError::Clock)?;
                let window = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
                reader.not_before_usec = Some(now.saturating_sub(window));
            }
        }
        Ok(reader)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The seq of the last record consumed (read, skipped or malformed), if known.
    pub fn last_seq(&self) -> Option<u64> {
        self.expected_seq.and_then(|s| s.checked_sub(1))
    }

    /// Counts since the last call: records read, lost, malformed.
    pub fn take_counters(&mut self) -> KernelLogCounters {
        self.counters.take()
    }

    /// Read the next record without blocking.
    pub fn read_next(&mut self) -> Result<KmsgRead, ReaderError> {
        loop {
            let length = match read(&self.fd, &mut self.buffer) {
                Ok(0) | Err(Errno::EAGAIN) => return Ok(KmsgRead::Drained),
                Ok(length) => length,
                Err(Errno::EINTR) => continue,
                // Records were overwritten before we read them; the kernel has moved us to
                // the oldest one it still holds, and its seq tells how many were lost.
                Err(Errno::EPIPE) => continue,
                Err(errno) => {
                    return Err(ReaderError::Read {
                        path: self.path.clone(),
                        errno,
                    });
                }
            };
            return Ok(self.account(parse_record(&self.buffer[..length])));
        }
    }

    fn account(&mut self, parsed: Result<Record, RecordError>) -> KmsgRead {
        let record = match parsed {
            Ok(record) => record,
            Err(error) => {
                // One read is always the next record, so the seq it had is the one expected.
                self.expected_seq = self.expected_seq.map(|s| s + 1);
                self.counters.records_read += 1;
                self.counters.malformed += 1;
                return KmsgRead::Malformed(error);
            }
        };
        if self.skip_through.is_some_and(|last| record.seq <= last) {
            return KmsgRead::Skipped;
        }
        if let Some(expected) = self.expected_seq
            && record.seq > expected
        {
            self.counters.lost += record.seq - expected;
        }
        self.expected_seq = record.seq.checked_add(1);
        if self.not_before_usec.is_some_and(|t| record.ts_usec < t) {
            return KmsgRead::Skipped;
        }
        self.counters.records_read += 1;
        KmsgRead::Record(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader_at(start: StartPosition) -> KmsgReader {
        // /dev/null is a character device: enough to exercise the accounting.
        KmsgReader::open(Path::new("/dev/null"), start).unwrap()
    }

    fn record(seq: u64, ts_usec: u64) -> Result<Record, RecordError> {
        parse_record(format!("6,{seq},{ts_usec},-;m").as_bytes())
    }

    #[test]
    fn gaps_in_seq_count_as_lost() {
        let mut r = reader_at(StartPosition::End);
        assert!(matches!(r.account(record(10, 1)), KmsgRead::Record(_)));
        assert!(matches!(r.account(record(11, 1)), KmsgRead::Record(_)));
        assert!(matches!(r.account(record(20, 1)), KmsgRead::Record(_)));
        let c = r.take_counters();
        assert_eq!((c.records_read, c.lost), (3, 8));
        assert_eq!(r.last_seq(), Some(20));
    }

    #[test]
    fn after_seq_skips_old_records_and_counts_what_is_gone() {
        let mut r = reader_at(StartPosition::AfterSeq(5));
        assert_eq!(r.last_seq(), Some(5));
        assert!(matches!(r.account(record(4, 1)), KmsgRead::Skipped));
        assert!(matches!(r.account(record(5, 1)), KmsgRead::Skipped));
        assert!(matches!(r.account(record(6, 1)), KmsgRead::Record(_)));
        assert_eq!(r.take_counters().lost, 0);

        let mut r = reader_at(StartPosition::AfterSeq(5));
        assert!(matches!(r.account(record(9, 1)), KmsgRead::Record(_)));
        assert_eq!(r.take_counters().lost, 3);
    }

    #[test]
    fn look_back_skips_older_records_but_keeps_counting_gaps() {
        let mut r = reader_at(StartPosition::End);
        r.not_before_usec = Some(1_000);
        assert!(matches!(r.account(record(1, 10)), KmsgRead::Skipped));
        assert!(matches!(r.account(record(3, 2_000)), KmsgRead::Record(_)));
        let c = r.take_counters();
        assert_eq!((c.records_read, c.lost), (1, 1));
    }

    #[test]
    fn malformed_records_are_counted_and_advance_the_position() {
        let mut r = reader_at(StartPosition::AfterSeq(1));
        assert!(matches!(
            r.account(parse_record(b"garbage")),
            KmsgRead::Malformed(RecordError::NoHeaderEnd)
        ));
        assert!(matches!(r.account(record(3, 1)), KmsgRead::Record(_)));
        let c = r.take_counters();
        assert_eq!((c.records_read, c.malformed, c.lost), (2, 1, 0));
    }

    #[test]
    fn open_rejects_what_is_not_a_character_device() {
        let e = KmsgReader::open(Path::new("/nonexistent/kmsg"), StartPosition::End).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::ENOENT));
        assert!(e.to_string().contains("/nonexistent/kmsg"), "{e}");
        let e = KmsgReader::open(Path::new("/"), StartPosition::End).unwrap_err();
        assert!(matches!(e, ReaderError::NotCharDevice { .. }), "{e}");
    }
}
