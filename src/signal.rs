//! The signals that reach the engine: the only way information enters the state.
//!
//! A source's detector sends its own payload type, addressed to its source by name; only that
//! source's engine-side state opens it. This file knows no source and no action.

use std::any::Any;
use std::fmt;

use tokio::sync::mpsc;

use crate::containers::ContainerInfo;

/// A value of a type the sender and its one reader agree on.
pub struct Payload(Box<dyn Any + Send>);

impl Payload {
    pub fn new<T: Any + Send>(value: T) -> Payload {
        Payload(Box::new(value))
    }

    /// The value, when it is a `T`; else the payload back.
    pub fn downcast<T: Any>(self) -> Result<T, Payload> {
        self.0.downcast::<T>().map(|b| *b).map_err(Payload)
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Payload(..)")
    }
}

/// Everything that can tell the engine something.
#[derive(Debug)]
pub enum Signal {
    /// A detector's payload for the source named `source`.
    Source {
        source: &'static str,
        payload: Payload,
    },
    /// Containers a runtime listed or a lookup found: names, images, pods for container ids.
    ContainersSeen(Vec<ContainerInfo>),
    /// The result of a background action the engine started (e.g. a goroutine dump).
    Action(Payload),
}

impl Signal {
    pub fn source<T: Any + Send>(source: &'static str, payload: T) -> Signal {
        Signal::Source {
            source,
            payload: Payload::new(payload),
        }
    }
}

/// The sending half detectors hold. Sending never blocks a detector for long: the channel is
/// bounded and the engine drains it continuously; a closed channel means shutdown.
#[derive(Debug, Clone)]
pub struct SignalSender {
    inner: mpsc::Sender<Signal>,
}

pub type SignalReceiver = mpsc::Receiver<Signal>;

/// Capacity of the signal channel: large enough for a burst of kernel messages.
pub const SIGNAL_CHANNEL_CAPACITY: usize = 4096;

pub fn channel() -> (SignalSender, SignalReceiver) {
    let (tx, rx) = mpsc::channel(SIGNAL_CHANNEL_CAPACITY);
    (SignalSender { inner: tx }, rx)
}

impl SignalSender {
    /// Deliver a signal; returns false when the engine is gone (shutting down).
    pub async fn send(&self, signal: Signal) -> bool {
        self.inner.send(signal).await.is_ok()
    }
}
