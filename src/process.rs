//! What the two long-lived programs (`hangwatch run`, `hangwatch-cordoner`) share as
//! processes: the async runtime, logging, and running a server to its end.

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

/// Run a long-lived server until it stops; exit 2 when it fails. `program` names it in the
/// last line written to stderr.
pub fn serve(program: &str, server: impl Future<Output = Result<(), String>>) -> ExitCode {
    match runtime().and_then(|rt| rt.block_on(server)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("{program}: {e}");
            ExitCode::from(EXIT_UNUSABLE)
        }
    }
}

/// Log to stderr as text or JSON, at `log.level` unless `RUST_LOG` says otherwise.
pub fn init_logging(log: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
