//! What the two long-lived programs (`hangwatch run`, `hangwatch-cordoner`) share as
//! processes: the async runtime, non-blocking logging, the open-file limit, and running a
//! server to its end.

use std::future::Future;
use std::process::ExitCode;

use crate::config::{LogConfig, LogFormat};

/// Exit code for "could not run / could not check".
pub const EXIT_UNUSABLE: u8 = 2;

/// One thread for async work (everything is I/O-bound and bounded by deadlines) plus
/// tokio's blocking pool for file reads that may block.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Run a long-lived server to its end, logging through the non-blocking writer (see
/// [`init_logging`]) with the open-file limit raised; exit 2 when it fails. The error goes to
/// the log only: a direct write to stderr could block on a full pipe.
pub fn run_server(log: &LogConfig, server: impl Future<Output = Result<(), String>>) -> ExitCode {
    let flush = init_logging(log);
    raise_open_files_limit();
    let code = match runtime().and_then(|rt| rt.block_on(server)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(EXIT_UNUSABLE)
        }
    };
    drop(flush);
    code
}

/// Logging for the long-lived servers, through the non-blocking writer
/// ([`crate::output`]); panics are logged through it too, since the default panic message
/// is a direct write to stderr. The returned value flushes queued lines when dropped.
fn init_logging(log: &LogConfig) -> Option<crate::output::FlushOnExit> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let (writer, flush) = match crate::output::stderr() {
        Ok((writer, flush)) => (Some(writer), Some(flush)),
        Err(e) => {
            eprintln!("hangwatch: cannot start the log writer, logging directly to stderr: {e}");
            (None, None)
        }
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match (log.format, writer) {
        (LogFormat::Json, Some(writer)) => builder.json().with_writer(writer).init(),
        (LogFormat::Text, Some(writer)) => builder.with_writer(writer).init(),
        (LogFormat::Json, None) => builder.json().with_writer(std::io::stderr).init(),
        (LogFormat::Text, None) => builder.with_writer(std::io::stderr).init(),
    }
    if flush.is_some() {
        std::panic::set_hook(Box::new(|info| {
            let backtrace = std::backtrace::Backtrace::capture();
            if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
                tracing::error!(%backtrace, "{info}");
            } else {
                tracing::error!("{info}");
            }
        }));
    }
    flush
}

/// Raise the soft limit on open files to the hard limit: many runtimes start containers with
/// a soft limit of 1024, which connections, the /proc scan and state files share.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let describe = |value: Option<u64>| value.map_or("unlimited".to_string(), |v| v.to_string());
    if limit.current == limit.maximum {
        tracing::info!(open_files_limit = %describe(limit.current), "open-file limit is the hard limit");
        return;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(
            open_files_limit = %describe(limit.maximum),
            raised_from = %describe(limit.current),
            "open-file limit raised to the hard limit"
        ),
        Err(e) => tracing::warn!(
            open_files_limit = %describe(limit.current),
            hard_limit = %describe(limit.maximum),
            error = %e,
            "cannot raise the open-file limit to the hard limit"
        ),
    }
}
