//! The `hangwatch` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use hangwatch::check::CheckReport;
use hangwatch::config::{Config, DEFAULT_YAML};
use hangwatch::process::{EXIT_UNUSABLE, run_server, runtime};
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
            let log = config.log.clone();
            run_server(&log, hangwatch::daemon::run(config))
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
