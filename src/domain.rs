//! Domain values shared by every layer: the runtimes hangwatch watches.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A container runtime hangwatch probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Docker,
    Containerd,
}

impl Runtime {
    pub const ALL: [Runtime; 2] = [Runtime::Docker, Runtime::Containerd];

    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
        }
    }

    /// The daemon serving the runtime's socket, as named in `daemon` labels and dumps.
    pub fn daemon_name(self) -> &'static str {
        match self {
            Runtime::Docker => "dockerd",
            Runtime::Containerd => "containerd",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Serde for fields that name the daemon rather than the runtime (`"dockerd"`), as incident
/// files and `/incidents` have always spelled them.
pub mod as_daemon {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Runtime;

    pub fn serialize<S: Serializer>(runtime: &Runtime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(runtime.daemon_name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Runtime, D::Error> {
        let name = String::deserialize(d)?;
        Runtime::ALL
            .into_iter()
            .find(|r| r.daemon_name() == name)
            .ok_or_else(|| serde::de::Error::unknown_variant(&name, &["dockerd", "containerd"]))
    }
}
