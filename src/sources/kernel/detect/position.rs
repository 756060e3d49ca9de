//! Where reading stopped, kept across restarts so that each kernel event is counted once:
//! `<state_dir>/kmsg.position` holds the boot id and the last seq consumed from `/dev/kmsg`,
//! or for the syslog(2) source the newest timestamp read and hashes of the records at it.
//! Both are only meaningful within one boot, hence the boot id.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::reader::StartPosition;
use super::syslog::TimestampMark;
use crate::persist::{self, StateKind};

pub const POSITION_FILE: &str = "kmsg.position";
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// At most one write per this long while running; the last position is always written at
/// shutdown. A crash can thus replay at most this much.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// Longest wait for the state directory's filesystem, which may itself be the one failing.
const IO_DEADLINE: Duration = Duration::from_secs(2);

/// How far reading got, in the terms of the source read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// `/dev/kmsg`: the last seq consumed.
    Seq(u64),
    /// syslog(2): the newest timestamp read and the records at it.
    Timestamp(TimestampMark),
}

impl Position {
    /// Where to start reading to resume after this position.
    pub fn resume(&self) -> StartPosition {
        match self {
            Position::Seq(seq) => StartPosition::AfterSeq(*seq),
            Position::Timestamp(mark) => StartPosition::AfterTimestamp(mark.clone()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedPosition {
    pub boot_id: String,
    pub position: Position,
}

impl SavedPosition {
    pub fn parse(text: &str) -> Option<SavedPosition> {
        let mut boot_id = None;
        let mut seq = None;
        let mut ts_usec = None;
        let mut seen = Some(Vec::new());
        for line in text.lines() {
            match line.split_once('=') {
                Some(("boot_id", value)) if !value.trim().is_empty() => {
                    boot_id = Some(value.trim().to_string());
                }
                Some(("seq", value)) => seq = value.trim().parse().ok(),
                Some(("ts_usec", value)) => ts_usec = value.trim().parse().ok(),
                Some(("seen", value)) => {
                    seen = value
                        .split(',')
                        .filter(|hash| !hash.trim().is_empty())
                        .map(|hash| u64::from_str_radix(hash.trim(), 16).ok())
                        .collect();
                }
                _ => {}
            }
        }
        let position = match (seq, ts_usec, seen) {
            (Some(seq), None, _) => Position::Seq(seq),
            (None, Some(ts_usec), Some(mut seen)) => {
                seen.sort_unstable();
                Position::Timestamp(TimestampMark { ts_usec, seen })
            }
            _ => return None,
        };
        Some(SavedPosition {
            boot_id: boot_id?,
            position,
        })
    }

    pub fn render(&self) -> String {
        match &self.position {
            Position::Seq(seq) => format!("boot_id={}\nseq={seq}\n", self.boot_id),
            Position::Timestamp(mark) => {
                let seen: Vec<String> = mark.seen.iter().map(|h| format!("{h:016x}")).collect();
                format!(
                    "boot_id={}\nts_usec={}\nseen={}\n",
                    self.boot_id,
                    mark.ts_usec,
                    seen.join(",")
                )
            }
        }
    }
}

/// Resume after the saved position in the same boot; otherwise only new records.
pub fn start_position(saved: Option<&SavedPosition>, boot_id: Option<&str>) -> StartPosition {
    match (saved, boot_id) {
        (Some(saved), Some(boot_id)) if saved.boot_id == boot_id => saved.position.resume(),
        _ => StartPosition::End,
    }
}

/// Replace `path` whole or not at all (see [`crate::persist::write_atomically`]).
pub fn write_atomically(path: &Path, contents: &str) -> io::Result<()> {
    persist::write_atomically(path, contents.as_bytes(), StateKind::KernelPosition)
}

/// Run blocking file I/O off the async threads, giving up after [`IO_DEADLINE`].
async fn blocking_io<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    match tokio::time::timeout(IO_DEADLINE, tokio::task::spawn_blocking(work)).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(io::Error::other(join)),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {IO_DEADLINE:?}"),
        )),
    }
}

/// Write `contents` to `file` (creating `state_dir`); when that fails, empty the file that
/// is there, so that a restart does not resume from a position older than what was counted.
/// Emptying needs no space, so it works on a full filesystem; not on a read-only one.
fn save(state_dir: &Path, file: &Path, contents: &str) -> SaveResult {
    let written = std::fs::create_dir_all(state_dir)
        .inspect_err(|_| persist::count_failure(StateKind::KernelPosition))
        .and_then(|()| write_atomically(file, contents));
    match written {
        Ok(()) => SaveResult::Saved,
        Err(error) => {
            let invalidated = match std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(file)
            {
                Ok(_) => Invalidated::Emptied,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Invalidated::NoneSaved,
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Invalidated::NoneSaved,
                Err(_) => Invalidated::Kept,
            };
            SaveResult::Failed { error, invalidated }
        }
    }
}

/// What became of the saved position after a failed write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Invalidated {
    /// Emptied: a restart starts at the end.
    Emptied,
    /// There was none to invalidate.
    NoneSaved,
    /// Could not be emptied (read-only filesystem): a restart that finds the state directory
    /// still unwritable starts at the end; one after it healed resumes from the old position.
    Kept,
}

#[derive(Debug)]
enum SaveResult {
    Saved,
    Failed {
        error: io::Error,
        invalidated: Invalidated,
    },
}

/// A save started off the async threads, and the position it saves.
#[derive(Debug)]
struct InFlight {
    position: Position,
    handle: JoinHandle<SaveResult>,
}

/// The detector's handle on the position file. A failed write is counted
/// (`hangwatch_state_write_failures_total{kind="kernel_position"}`), invalidates the saved
/// position, and is retried every [`RETRY_INTERVAL`] until one succeeds.
#[derive(Debug)]
pub struct PositionStore {
    state_dir: PathBuf,
    boot_id: Option<String>,
    /// The position the file holds, as far as this process knows.
    written: Option<Position>,
    last_attempt: Option<Instant>,
    /// Failed writes in a row: logged at the first, and when writing works again.
    failed_in_a_row: u64,
    in_flight: Option<InFlight>,
}

/// While writes fail, how often one is tried again.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);

impl PositionStore {
    /// Reads the boot id; without one, positions are neither loaded nor saved.
    pub async fn open(state_dir: &Path, boot_id_path: &Path) -> PositionStore {
        let path = boot_id_path.to_path_buf();
        let boot_id = match blocking_io(move || std::fs::read_to_string(path)).await {
            Ok(text) if !text.trim().is_empty() => Some(text.trim().to_string()),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(
                    path = %boot_id_path.display(),
                    error = %e,
                    "cannot read the boot id: the kernel log position will not be kept across restarts"
                );
                None
            }
        };
        PositionStore {
            state_dir: state_dir.to_path_buf(),
            boot_id,
            written: None,
            last_attempt: None,
            failed_in_a_row: 0,
            in_flight: None,
        }
    }

    fn file(&self) -> PathBuf {
        self.state_dir.join(POSITION_FILE)
    }

    /// Where to start reading, from the saved position. A saved position is only trusted
    /// when the state directory can be written now: the same position is written back, and
    /// if that fails, records after it may have been counted while writes were failing.
    pub async fn start_position(&mut self) -> StartPosition {
        let Some(boot_id) = self.boot_id.clone() else {
            return StartPosition::End;
        };
        let file = self.file();
        let text = match blocking_io(move || std::fs::read_to_string(file)).await {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return StartPosition::End,
            Err(e) => {
                tracing::warn!(path = %self.file().display(), error = %e, "cannot read the kernel log position: starting at the end");
                return StartPosition::End;
            }
        };
        if text.is_empty() {
            tracing::warn!(path = %self.file().display(), "the kernel log position was invalidated by a failed write (records after it may have been counted): starting at the end");
            return StartPosition::End;
        }
        let Some(saved) = SavedPosition::parse(&text) else {
            tracing::warn!(path = %self.file().display(), "kernel log position file is unreadable: starting at the end");
            return StartPosition::End;
        };
        let resume = start_position(Some(&saved), Some(&boot_id));
        if resume == StartPosition::End {
            return resume;
        }
        let (state_dir, file) = (self.state_dir.clone(), self.file());
        let contents = saved.render();
        let checked = tokio::task::spawn_blocking(move || save(&state_dir, &file, &contents));
        match tokio::time::timeout(IO_DEADLINE, checked).await {
            Ok(Ok(SaveResult::Saved)) => {
                self.written = Some(saved.position);
                resume
            }
            outcome => {
                let error = match outcome {
                    Ok(Ok(SaveResult::Failed { error, .. })) => error.to_string(),
                    Ok(Err(join)) => join.to_string(),
                    _ => format!("no answer within {IO_DEADLINE:?}"),
                };
                self.failed_in_a_row = 1;
                self.last_attempt = Some(Instant::now());
                tracing::warn!(
                    path = %self.file().display(),
                    %error,
                    "the state directory is not writable: the saved kernel log position may be older than records already counted, starting at the end"
                );
                StartPosition::End
            }
        }
    }

    /// Save `position` if it moved, at most once per [`SAVE_INTERVAL`] (per
    /// [`RETRY_INTERVAL`] while writes fail) and never with a write still in flight.
    pub async fn save_throttled(&mut self, position: Option<&Position>) {
        self.reap().await;
        let interval = if self.failed_in_a_row > 0 {
            RETRY_INTERVAL
        } else {
            SAVE_INTERVAL
        };
        if self.in_flight.is_some() || self.last_attempt.is_some_and(|at| at.elapsed() < interval) {
            return;
        }
        self.start_save(position);
    }

    /// Save `position` now and wait (within the I/O deadline) for it to be written.
    pub async fn save_now(&mut self, position: Option<&Position>) {
        if let Some(in_flight) = self.in_flight.take() {
            self.finish(in_flight).await;
        }
        self.start_save(position);
        if let Some(in_flight) = self.in_flight.take() {
            self.finish(in_flight).await;
        }
    }

    fn start_save(&mut self, position: Option<&Position>) {
        let (Some(position), Some(boot_id)) = (position, self.boot_id.clone()) else {
            return;
        };
        if self.written.as_ref() == Some(position) {
            return;
        }
        let state_dir = self.state_dir.clone();
        let file = self.file();
        let contents = SavedPosition {
            boot_id,
            position: position.clone(),
        }
        .render();
        self.last_attempt = Some(Instant::now());
        self.in_flight = Some(InFlight {
            position: position.clone(),
            handle: tokio::task::spawn_blocking(move || save(&state_dir, &file, &contents)),
        });
    }

    /// Collect a finished write's result without waiting for an unfinished one.
    async fn reap(&mut self) {
        if self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.handle.is_finished())
            && let Some(in_flight) = self.in_flight.take()
        {
            self.finish(in_flight).await;
        }
    }

    async fn finish(&mut self, in_flight: InFlight) {
        let result = match tokio::time::timeout(IO_DEADLINE, in_flight.handle).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => SaveResult::Failed {
                error: io::Error::other(join),
                invalidated: Invalidated::Kept,
            },
            Err(_) => SaveResult::Failed {
                error: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("write not done within {IO_DEADLINE:?}"),
                ),
                invalidated: Invalidated::Kept,
            },
        };
        match result {
            SaveResult::Saved => {
                if self.failed_in_a_row > 0 {
                    tracing::info!(
                        path = %self.file().display(),
                        failed_writes = self.failed_in_a_row,
                        "the kernel log position is saved again"
                    );
                }
                self.failed_in_a_row = 0;
                self.written = Some(in_flight.position);
            }
            SaveResult::Failed { error, invalidated } => {
                self.written = None;
                self.failed_in_a_row += 1;
                if self.failed_in_a_row == 1 {
                    tracing::warn!(
                        path = %self.file().display(),
                        %error,
                        saved_position = ?invalidated,
                        retry_every = ?RETRY_INTERVAL,
                        "cannot save the kernel log position: retrying; a restart meanwhile starts at the end"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_render_round_trip() {
        let p = SavedPosition {
            boot_id: "ce87fbd9-7188-4ecf-9160-4e198354d856".into(),
            position: Position::Seq(4242),
        };
        assert_eq!(SavedPosition::parse(&p.render()), Some(p));
        let mark = TimestampMark {
            ts_usec: 13_730_783_974,
            seen: vec![1, 0xfedc_ba98_7654_3210],
        };
        let p = SavedPosition {
            boot_id: "b".into(),
            position: Position::Timestamp(mark.clone()),
        };
        assert_eq!(
            p.render(),
            "boot_id=b\nts_usec=13730783974\nseen=0000000000000001,fedcba9876543210\n"
        );
        assert_eq!(SavedPosition::parse(&p.render()), Some(p));
        assert_eq!(
            start_position(
                SavedPosition::parse("boot_id=b\nts_usec=5\nseen=\n").as_ref(),
                Some("b")
            ),
            StartPosition::AfterTimestamp(TimestampMark {
                ts_usec: 5,
                seen: vec![]
            })
        );
        assert_eq!(
            SavedPosition::parse("boot_id=b\nts_usec=5\nseen=zz\n"),
            None
        );
        assert_eq!(SavedPosition::parse("boot_id=b\nseq=1\nts_usec=5\n"), None);
        assert_eq!(SavedPosition::parse("seq=1\n"), None);
        assert_eq!(SavedPosition::parse("boot_id=x\nseq=minus one\n"), None);
        assert_eq!(SavedPosition::parse(""), None);
    }

    #[test]
    fn same_boot_resumes_other_boot_starts_at_the_end() {
        let saved = SavedPosition {
            boot_id: "a".into(),
            position: Position::Seq(7),
        };
        assert_eq!(
            start_position(Some(&saved), Some("a")),
            StartPosition::AfterSeq(7)
        );
        assert_eq!(start_position(Some(&saved), Some("b")), StartPosition::End);
        assert_eq!(start_position(None, Some("a")), StartPosition::End);
        assert_eq!(start_position(Some(&saved), None), StartPosition::End);
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hangwatch-position-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn store_saves_and_resumes_in_the_same_boot() {
        let dir = temp_dir("resume");
        let boot = dir.join("boot_id");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&boot, "boot-1\n").unwrap();
        let state = dir.join("state");

        let mut store = PositionStore::open(&state, &boot).await;
        assert_eq!(store.start_position().await, StartPosition::End);
        store.save_now(Some(&Position::Seq(99))).await;
        let text = std::fs::read_to_string(state.join(POSITION_FILE)).unwrap();
        assert_eq!(text, "boot_id=boot-1\nseq=99\n");
        assert!(!state.join("kmsg.position.tmp").exists());

        let mut store = PositionStore::open(&state, &boot).await;
        assert_eq!(store.start_position().await, StartPosition::AfterSeq(99));

        std::fs::write(&boot, "boot-2\n").unwrap();
        let mut store = PositionStore::open(&state, &boot).await;
        assert_eq!(store.start_position().await, StartPosition::End);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn unwritable_state_dir_is_retried_and_counted_without_failing() {
        let dir = temp_dir("unwritable");
        std::fs::create_dir_all(&dir).unwrap();
        let boot = dir.join("boot_id");
        std::fs::write(&boot, "boot-1\n").unwrap();
        // A regular file where the state directory should be: no directory can be made there.
        let state = dir.join("not-a-dir");
        std::fs::write(&state, "").unwrap();
        let before = persist::failures(StateKind::KernelPosition);
        let mut store = PositionStore::open(&state, &boot).await;
        assert_eq!(store.start_position().await, StartPosition::End);
        store.save_now(Some(&Position::Seq(5))).await;
        assert_eq!(store.failed_in_a_row, 1);
        assert!(persist::failures(StateKind::KernelPosition) > before);
        // Healed: the next save succeeds and is trusted at the next start.
        std::fs::remove_file(&state).unwrap();
        store.save_now(Some(&Position::Seq(6))).await;
        assert_eq!(store.failed_in_a_row, 0);
        let mut again = PositionStore::open(&state, &boot).await;
        assert_eq!(again.start_position().await, StartPosition::AfterSeq(6));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_invalidated_position_starts_at_the_end() {
        let dir = temp_dir("invalidated");
        std::fs::create_dir_all(&dir).unwrap();
        let boot = dir.join("boot_id");
        std::fs::write(&boot, "boot-1\n").unwrap();
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join(POSITION_FILE), "").unwrap();
        let mut store = PositionStore::open(&state, &boot).await;
        assert_eq!(store.start_position().await, StartPosition::End);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
