//! The `hangwatch` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use hangwatch::check::CheckReport;
use hangwatch::config::{Config, DEFAULT_YAML, LogConfig, LogFormat};
use hangwatch::triage::Triage;
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "hangwatch",
    version,
    about = "Watchdog for hung Docker/containerd runtimes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the watchdog daemon.
    Run {
        /// YAML configuration; built-in defaults when omitted.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address of the HTTP server (overrides `listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Probe everything once and print a report. Exit 0 healthy, 1 problem, 2 could not check.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Triage a Go goroutine dump (dockerd, containerd or shim; also a log holding one).
    /// Exit 0 analysed, 2 could not read it.
    AnalyzeDump {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Alertmanager webhook that cordons and taints nodes whose alerts ask for it, and undoes
    /// only its own cordons when they resolve. Needs a bearer token and Kubernetes credentials.
    Cordoner(hangwatch::cordoner::Options),
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the built-in configuration, commented.
    Default,
    /// Validate a configuration file. Exit 0 valid, 2 invalid.
    Check { file: PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// Exit code for "could not run / could not check".
const EXIT_UNUSABLE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config {
            command: ConfigCommand::Default,
        } => {
            emit(DEFAULT_YAML);
            ExitCode::SUCCESS
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::load(Some(&file)) {
            Ok(_) => {
                emit(&format!("{}: valid\n", file.display()));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("invalid configuration: {e}");
                ExitCode::from(EXIT_UNUSABLE)
            }
        },
        Command::AnalyzeDump { file, format } => {
            let triage = match hangwatch::triage::analyze_file(&file, &Default::default()) {
                Ok(triage) => triage,
                Err(e) => {
                    eprintln!("hangwatch: {e}");
                    return ExitCode::from(EXIT_UNUSABLE);
                }
            };
            match print(format, &triage, Triage::render_text) {
                Ok(()) => ExitCode::SUCCESS,
                Err(code) => code,
            }
        }
        Command::Run { config, listen } => {
            let mut config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Some(listen) = listen {
                config.listen = listen;
            }
            let flush = init_logging(&config.log);
            raise_open_files_limit();
            let code = serve(hangwatch::daemon::run(config));
            drop(flush);
            code
        }
        Command::Cordoner(options) => {
            let flush = init_logging(&LogConfig {
                format: options.log_format,
                ..LogConfig::default()
            });
            raise_open_files_limit();
            let code = serve(hangwatch::cordoner::run(options));
            drop(flush);
            code
        }
        Command::Check { config, format } => {
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("hangwatch: {e}");
                    return ExitCode::from(EXIT_UNUSABLE);
                }
            };
            let report = rt.block_on(hangwatch::check::run(config));
            // Calls still stuck in a hung runtime must not hold the exit.
            rt.shutdown_background();
            match print(format, &report, CheckReport::render_text) {
                Ok(()) => ExitCode::from(report.outcome.exit_code()),
                Err(code) => code,
            }
        }
    }
}

/// Run a long-lived server (the daemon, the cordoner) until it stops; exit 2 when it fails.
/// The error goes to the log only: a direct write to stderr could block on a full pipe.
fn serve(server: impl Future<Output = Result<(), String>>) -> ExitCode {
    match runtime().and_then(|rt| rt.block_on(server)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(EXIT_UNUSABLE)
        }
    }
}

/// Print `value` as text (through `text`) or as pretty JSON.
fn print<T: Serialize>(format: Format, value: &T, text: fn(&T) -> String) -> Result<(), ExitCode> {
    match format {
        Format::Text => emit(&text(value)),
        Format::Json => match serde_json::to_string_pretty(value) {
            Ok(json) => emit(&format!("{json}\n")),
            Err(e) => {
                eprintln!("hangwatch: cannot encode JSON: {e}");
                return Err(ExitCode::from(EXIT_UNUSABLE));
            }
        },
    }
    Ok(())
}

/// Write to stdout. A reader that went away (`hangwatch check | head`) is not an error;
/// `print!` would panic.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("hangwatch: cannot write output: {e}");
    }
}

fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("hangwatch: invalid configuration: {e}");
        ExitCode::from(EXIT_UNUSABLE)
    })
}

/// One thread for async work (everything is I/O-bound and bounded by deadlines) plus
/// tokio's blocking pool for file reads that may block.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Logging for the long-lived servers, through the non-blocking writer
/// (`hangwatch::output`); panics are logged through it too, since the default panic message
/// is a direct write to stderr. The returned value flushes queued lines when dropped.
fn init_logging(log: &LogConfig) -> Option<hangwatch::output::FlushOnExit> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let (writer, flush) = match hangwatch::output::stderr() {
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
