//! hangwatch: a node-health watchdog for hung Docker/containerd runtimes.
//! See ARCHITECTURE.md for the map of modules.

pub mod actions;
pub mod attribution;
pub mod check;
pub mod config;
pub mod containers;
pub mod daemon;
pub mod domain;
pub mod engine;
pub mod heartbeat;
pub mod http;
pub mod http_server;
pub mod metrics;
pub mod node_status;
pub mod output;
pub mod persist;
pub mod process;
pub mod signal;
pub mod sources;
pub mod triage;
