//! Detectors: independent tasks that each watch one source and emit typed [`Signal`]s.
//!
//! To add a detector: write a module with a type implementing [`Detector`], and add one line
//! to [`registered`].
//!
//! [`Signal`]: crate::signal::Signal

pub mod kernel;
pub mod lifecycle;
pub mod probe;
pub mod procscan;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::heartbeat::Heartbeat;
use crate::signal::SignalSender;

/// What every detector gets to run with.
pub struct DetectorContext {
    pub config: Arc<Config>,
    pub signals: SignalSender,
    /// Beat once per loop iteration, within [`Detector::heartbeat_budget`].
    pub heartbeat: Heartbeat,
    /// Cancelled at shutdown: return promptly, abandoning any call in flight.
    pub shutdown: CancellationToken,
}

pub type DetectorFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

pub trait Detector: Send {
    /// Stable name for logs and `/healthz`.
    fn name(&self) -> String;
    /// Longest time between two heartbeats of a healthy detector.
    fn heartbeat_budget(&self) -> Duration;
    /// The detector's loop. Must never block the async runtime and must never wait on a
    /// runtime, the kernel or the network without a deadline.
    fn run(self: Box<Self>, ctx: DetectorContext) -> DetectorFuture;
}

/// Every detector enabled by `config`. One line per detector.
pub fn registered(config: &Config) -> Vec<Box<dyn Detector>> {
    let mut all: Vec<Box<dyn Detector>> = Vec::new();
    all.extend(probe::detectors(config));
    all.extend(kernel::detector(config));
    all.extend(procscan::detector(config));
    all.extend(lifecycle::detector(config));
    all
}
