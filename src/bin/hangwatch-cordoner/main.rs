//! `hangwatch-cordoner`: the Alertmanager webhook that cordons and taints nodes whose alerts
//! ask for it, and undoes only its own cordons when they resolve. Its own binary so that the
//! node DaemonSet's does not carry the Kubernetes client.

mod cordoner;

use std::process::ExitCode;

use clap::Parser;
use hangwatch::config::LogConfig;
use hangwatch::process::run_server;

/// Alertmanager webhook that cordons and taints nodes whose alerts ask for it, and undoes
/// only its own cordons when they resolve. Needs a bearer token and Kubernetes credentials.
#[derive(Parser)]
#[command(name = "hangwatch-cordoner", version)]
struct Cli {
    #[command(flatten)]
    options: cordoner::Options,
}

fn main() -> ExitCode {
    let options = Cli::parse().options;
    let log = LogConfig {
        format: options.log_format,
        ..LogConfig::default()
    };
    run_server(&log, cordoner::run(options))
}
