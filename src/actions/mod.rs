//! Actions the engine decides on and runs in the background: signalling daemons for
//! goroutine dumps, collecting them, persisting incidents. Results come back as signals.

pub mod dumps;
pub mod incident_store;
pub mod resolve;
pub mod target;
