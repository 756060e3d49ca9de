//! Detectors: independent tasks that watch one source and emit typed signals.
