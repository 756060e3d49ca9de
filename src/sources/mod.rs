//! Sources: one folder per thing hangwatch watches, each a vertical slice.
//!
//! A source owns, in its folder: its detector tasks and their payload types (`detect/`, which
//! never touches metrics or state), its engine-side state (`apply` a payload, `evaluate` at a
//! given time), its metric families, its section of the snapshot (`/status`, its endpoint,
//! its part of `hangwatch check`) and its one-shot form for `check`. The daemon and `check`
//! both build from [`registered`], so they cannot drift apart.
//!
//! To add a source: write a module with a type implementing [`Source`], and add one line to
//! [`registered`].

pub mod detector;
pub mod kernel;
pub mod lifecycle;
pub mod procscan;
pub mod runtime;

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::containers::ContainerDirectory;
use crate::domain::Runtime;
use crate::engine::incidents::{Change, IncidentBook};
use crate::signal::{Payload, Signal};
use procscan::state::ProcScanView;
use runtime::verdict::RuntimeState;

pub use detector::{Detector, DetectorContext, DetectorFuture};

/// Every source, in the order the engine applies, evaluates and reports them. One line each.
pub fn registered() -> Vec<Box<dyn Source>> {
    vec![
        Box::new(runtime::RuntimeSource),
        Box::new(kernel::KernelSource),
        Box::new(procscan::ProcScanSource),
        Box::new(lifecycle::LifecycleSource),
    ]
}

/// The time of one engine step, read once by whoever drives the engine: decision code never
/// reads a clock.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

impl Now {
    pub fn read() -> Now {
        Now {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

/// One source: how to build each of its parts from the configuration.
pub trait Source: Send + Sync {
    /// The address of its signals and its name in logs.
    fn name(&self) -> &'static str;
    /// Its engine-side state, with its metric families registered in `registry`; None when
    /// the configuration turns the source off.
    fn state(
        &self,
        config: &Arc<Config>,
        registry: &mut Registry,
        now: Now,
    ) -> Option<Box<dyn SourceState>>;
    /// Its detector tasks, for the daemon.
    fn detectors(&self, config: &Arc<Config>) -> Vec<Box<dyn Detector>>;
    /// Its one-shot form, for `hangwatch check`: what one look finds, as the signals the
    /// detectors would have sent. None when the configuration turns the source off.
    fn check(&self, config: &Arc<Config>) -> Option<CheckRun>;
}

pub type CheckRun = Pin<Box<dyn Future<Output = CheckFindings> + Send>>;

/// What a source's one-shot form found.
#[derive(Debug, Default)]
pub struct CheckFindings {
    /// In the order they are to be applied.
    pub signals: Vec<Signal>,
    /// Why some part could not be checked.
    pub unchecked: Vec<String>,
}

/// A source's part of the engine: the only code that turns its payloads into state.
pub trait SourceState: Send {
    /// Take one payload its detectors sent.
    fn apply(&mut self, payload: Payload, cx: &mut Context);
    /// Re-evaluate at `cx.now`; sources are evaluated in registration order.
    fn evaluate(&mut self, _cx: &mut Context) {}
    /// After every source has evaluated: for decisions that must see the others' results.
    fn settle(&mut self, _cx: &mut Context) {}
    /// New container names are known (`cx.containers`).
    fn containers_changed(&mut self, _cx: &mut Context) {}
    /// Its section for readers, when it changed since the last call (always the first time).
    fn section(&mut self, now: Now) -> Option<Arc<dyn Section>>;
}

/// What the engine lends a source's state for one step.
pub struct Context {
    pub now: Now,
    pub containers: ContainerDirectory,
    pub incidents: IncidentBook,
    /// Incident changes made in this step, for the engine to count, log and persist.
    pub changes: Vec<Change>,
    /// Facts one source publishes for the others.
    pub board: Board,
    /// Actions decided in this step, for the engine to carry out.
    pub actions: Vec<Action>,
    /// Publish a snapshot after this step (soon: rate-limited, for floods).
    pub publish: Publish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Publish {
    No,
    Soon,
    Now,
}

impl Context {
    pub fn publish(&mut self, how: Publish) {
        self.publish = self.publish.max(how);
    }

    pub fn incident_changes(&mut self, changes: Vec<Change>) {
        self.changes.extend(changes);
    }
}

/// Facts sources share: the runtime verdicts and the latest /proc scan.
#[derive(Debug, Default)]
pub struct Board {
    pub runtimes: Vec<(Runtime, RuntimeState)>,
    pub proc_scan: Option<Arc<ProcScanView>>,
}

impl Board {
    pub fn state_of(&self, runtime: Runtime) -> Option<RuntimeState> {
        self.runtimes
            .iter()
            .find(|(r, _)| *r == runtime)
            .map(|(_, s)| *s)
    }

    /// The runtime answers now: worth asking it for a container's names.
    pub fn answering(&self, runtime: Runtime) -> bool {
        self.state_of(runtime)
            .is_some_and(|s| s.is_up() && !s.is_stalled())
    }
}

/// What a source's state may ask the engine to do; the engine applies its policies (cooldown,
/// hourly cap, look-up dedupe) and carries it out, or records it when driven by a test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// SIGUSR1 and a goroutine dump of the daemons of `runtime` and the layer below it.
    RequestDumps(Runtime),
    /// Ask the runtimes for an unknown container's names.
    ResolveContainer(String),
}

/// A source's part of what readers see. Built by the engine, read by the HTTP server and
/// `check`; rendered only when read.
pub trait Section: Any + Send + Sync + fmt::Debug {
    /// Its key in `/status` and in `check`'s JSON.
    fn key(&self) -> &'static str;
    /// Whether `/status` carries it; else it is at the top of `check`'s JSON only (and at its
    /// endpoint).
    fn in_status(&self) -> bool {
        true
    }
    fn to_json(&self) -> serde_json::Value;
    /// A path of its own (e.g. `/events`) and what it serves there.
    fn endpoint(&self) -> Option<(&'static str, serde_json::Value)> {
        None
    }
    /// `check`'s problem lines, most severe first.
    fn problems(&self, _now: SystemTime) -> Vec<String> {
        Vec::new()
    }
    /// `check`'s lines for what could not be checked.
    fn unchecked(&self) -> Vec<String> {
        Vec::new()
    }
    /// Its part of `check`'s text report.
    fn render_check(&self, _out: &mut String, _now: SystemTime) {}
}

/// The payload as the `T` its source's detectors send; anything else is a wiring mistake,
/// logged and dropped.
pub fn payload_of<T: Any>(payload: Payload, source: &'static str) -> Option<T> {
    match payload.downcast::<T>() {
        Ok(value) => Some(value),
        Err(_) => {
            tracing::error!(source, "a payload of another type; dropped");
            None
        }
    }
}

/// Serialize a section's value for readers; a value that cannot be serialized says why
/// rather than failing the whole reply.
pub fn json_of<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
}

/// The one section of type `T` among `sections`.
pub fn find_section<T: Section>(sections: &[Arc<dyn Section>]) -> Option<&T> {
    sections
        .iter()
        .find_map(|s| (s.as_ref() as &dyn Any).downcast_ref::<T>())
}
