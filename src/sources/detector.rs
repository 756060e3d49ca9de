//! Detectors: the tasks of a source that watch it and only *emit* [`Signal`]s. They hold no
//! verdicts and touch no metrics; the source's engine-side state judges what they report.
//!
//! [`Signal`]: crate::signal::Signal

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
