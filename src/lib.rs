//! hangwatch: a node-health watchdog for hung Docker/containerd runtimes.
//! See ARCHITECTURE.md for the map of modules.

pub mod attribution;
pub mod config;
pub mod detectors;
pub mod heartbeat;
pub mod signal;
pub mod triage;
