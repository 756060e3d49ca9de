//! Log output that never blocks the process.
//!
//! In a container, stderr is a pipe drained by the runtime hangwatch watches; a hung runtime
//! stops draining it and every write blocks once the pipe's 64 KiB are full. So log lines go
//! into a queue bounded in bytes, and one thread of their own writes them out: that thread
//! may block on a full pipe, nothing else does. A line that does not fit in the queue is
//! dropped and counted (`hangwatch_log_lines_dropped_total`); the first write that succeeds
//! after drops is followed by one line saying how many were lost.
//!
//! Not tracing-appender's `non_blocking`: its queue is bounded in lines (128,000 by default,
//! whatever their size), it brings `time` and crossbeam along, and it has no hook for the
//! moment output flows again, which the summary line needs.
//!
//! The descriptor is never made non-blocking: O_NONBLOCK belongs to the open file
//! description, which a container's stderr shares with whoever else writes to the pipe.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tracing_subscriber::fmt::MakeWriter;

/// Bytes of log lines held while the output does not take them: about 800 lines.
pub const QUEUE_BYTES: usize = 256 * 1024;

/// Bookkeeping cost of one queued line, so that a flood of tiny lines is bounded too.
const LINE_OVERHEAD: usize = 64;

/// How long exiting waits for queued lines to be written.
const FLUSH_DEADLINE: Duration = Duration::from_millis(250);

static LINES_DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

thread_local! {
    /// Set on the writer thread: what it logs itself is written at once, never queued.
    static ON_WRITER_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Register the process-wide counter of dropped log lines in `registry`.
pub fn register_metrics(registry: &mut Registry) {
    registry.register(
        "hangwatch_log_lines_dropped",
        "Log lines dropped because the output (stderr) did not take them: full pipe, or an error",
        LINES_DROPPED.clone(),
    );
}

/// Log lines dropped since the process started.
pub fn lines_dropped() -> u64 {
    LINES_DROPPED.get()
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The writer thread holds a batch it has not finished writing.
    writing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Lines arrived.
    filled: Condvar,
    /// The writer is idle with an empty queue.
    emptied: Condvar,
    output: File,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(&self, line: Vec<u8>) {
        let cost = line.len() + LINE_OVERHEAD;
        let mut queue = self.lock();
        if queue.bytes + cost > QUEUE_BYTES {
            drop(queue);
            LINES_DROPPED.inc();
            return;
        }
        queue.bytes += cost;
        queue.lines.push_back(line);
        drop(queue);
        self.filled.notify_one();
    }

    /// Write one line; a failure (EPIPE, EIO) loses it, and it is counted as dropped.
    fn write_line(&self, line: &[u8]) -> bool {
        match (&self.output).write_all(line) {
            Ok(()) => true,
            Err(_) => {
                LINES_DROPPED.inc();
                false
            }
        }
    }

    fn run_writer(&self) {
        ON_WRITER_THREAD.with(|on| on.set(true));
        let mut reported = 0;
        loop {
            let batch = {
                let mut queue = self.lock();
                while queue.lines.is_empty() {
                    queue.writing = false;
                    self.emptied.notify_all();
                    queue = self.filled.wait(queue).unwrap_or_else(|p| p.into_inner());
                }
                queue.writing = true;
                queue.bytes = 0;
                std::mem::take(&mut queue.lines)
            };
            for line in batch {
                if self.write_line(&line) {
                    let dropped = LINES_DROPPED.get();
                    if dropped > reported {
                        let lost = dropped - reported;
                        reported = dropped;
                        // Comes back through `make_writer` on this thread: written at once.
                        tracing::warn!(
                            dropped_lines = lost,
                            "{lost} log lines dropped while output was blocked"
                        );
                    }
                }
            }
        }
    }
}

/// The `MakeWriter` of the log subscriber: each line is queued for the writer thread.
#[derive(Clone)]
pub struct LogOutput {
    shared: Arc<Shared>,
}

/// Waits (briefly) for queued lines to be written when dropped at exit.
pub struct FlushOnExit {
    shared: Arc<Shared>,
}

impl Drop for FlushOnExit {
    fn drop(&mut self) {
        let queue = self.shared.lock();
        let _ = self
            .shared
            .emptied
            .wait_timeout_while(queue, FLUSH_DEADLINE, |q| q.writing || !q.lines.is_empty());
    }
}

/// Start the writer thread on a duplicate of stderr.
pub fn stderr() -> io::Result<(LogOutput, FlushOnExit)> {
    let output = File::from(io::stderr().as_fd().try_clone_to_owned()?);
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        filled: Condvar::new(),
        emptied: Condvar::new(),
        output,
    });
    let writer = shared.clone();
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || writer.run_writer())?;
    Ok((
        LogOutput {
            shared: shared.clone(),
        },
        FlushOnExit { shared },
    ))
}

/// One formatted log line, queued (or, on the writer thread, written) when dropped.
pub struct Line {
    buffer: Vec<u8>,
    shared: Arc<Shared>,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buffer);
        if ON_WRITER_THREAD.with(Cell::get) {
            self.shared.write_line(&line);
        } else {
            self.shared.enqueue(line);
        }
    }
}

impl<'a> MakeWriter<'a> for LogOutput {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            buffer: Vec::with_capacity(256),
            shared: self.shared.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::OwnedFd;

    fn pipe_output() -> (LogOutput, File) {
        let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            filled: Condvar::new(),
            emptied: Condvar::new(),
            output: File::from(write),
        });
        let writer = shared.clone();
        std::thread::spawn(move || writer.run_writer());
        (LogOutput { shared }, File::from(read))
    }

    #[test]
    fn lines_reach_the_output_in_order() {
        let (output, mut read) = pipe_output();
        for n in 0..3 {
            writeln!(output.make_writer(), "line {n}").expect("queue");
        }
        let mut text = vec![0; 21];
        read.read_exact(&mut text).expect("read");
        assert_eq!(String::from_utf8_lossy(&text), "line 0\nline 1\nline 2\n");
    }

    #[test]
    fn a_full_queue_drops_and_never_blocks() {
        let (output, _read) = pipe_output();
        let line = vec![b'x'; 1023];
        let before = lines_dropped();
        // Far more than the pipe and the queue hold together; nobody reads.
        let started = std::time::Instant::now();
        for _ in 0..2_000 {
            let mut writer = output.make_writer();
            writer.write_all(&line).expect("queue");
            writer.write_all(b"\n").expect("queue");
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        // Most of the 2 MB cannot fit; how much got into the pipe before it filled depends on
        // the pipe's size, so only "lines were dropped" is asserted, with the queue's bound.
        assert!(
            lines_dropped() - before >= 500,
            "{}",
            lines_dropped() - before
        );
        let queue = output.shared.lock();
        assert!(queue.bytes <= QUEUE_BYTES);
    }
}
