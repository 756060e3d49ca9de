//! Which kernel log interface is read: `/dev/kmsg`, or syslog(2) when `kernel_log.source`
//! says so or, with `auto`, when the kernel refuses to open `/dev/kmsg`.

use nix::errno::Errno;
use serde::Serialize;

use super::event::KernelLogCounters;
use super::reader::{KmsgRead, KmsgReader, ReaderError, StartPosition};
use super::syslog::SyslogReader;
use crate::config::{KernelLogConfig, KernelLogSource};

/// The interface being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSource {
    Kmsg,
    Syslog,
}

impl LogSource {
    pub const ALL: [LogSource; 2] = [LogSource::Kmsg, LogSource::Syslog];

    pub fn label(self) -> &'static str {
        match self {
            LogSource::Kmsg => "kmsg",
            LogSource::Syslog => "syslog",
        }
    }
}

/// An open kernel log.
#[derive(Debug)]
pub enum OpenLog {
    Kmsg(KmsgReader),
    Syslog(SyslogReader),
}

impl OpenLog {
    pub fn source(&self) -> LogSource {
        match self {
            OpenLog::Kmsg(_) => LogSource::Kmsg,
            OpenLog::Syslog(_) => LogSource::Syslog,
        }
    }

    /// For the one-shot check: the next record held, without waiting for new ones.
    pub fn read_next(&mut self) -> Result<KmsgRead, ReaderError> {
        match self {
            OpenLog::Kmsg(reader) => reader.read_next(),
            OpenLog::Syslog(reader) => Ok(reader.read_next()),
        }
    }

    /// Counts since the last call: records read, lost, malformed.
    pub fn take_counters(&mut self) -> KernelLogCounters {
        match self {
            OpenLog::Kmsg(reader) => reader.take_counters(),
            OpenLog::Syslog(reader) => reader.take_counters(),
        }
    }
}

/// What [`open`] opened, and why `auto` did not read `/dev/kmsg`.
#[derive(Debug)]
pub struct Opened {
    pub log: OpenLog,
    pub kmsg_refused: Option<ReaderError>,
}

/// Whether `auto` reads syslog(2) after this failure to open `/dev/kmsg`: the kernel refused
/// the device (device cgroup, `nodev` mount, permissions, no such device behind the node).
/// A missing path or one that is not a device is a configuration mistake, reported as such.
pub fn falls_back_to_syslog(kmsg_error: &ReaderError) -> bool {
    matches!(
        kmsg_error,
        ReaderError::Open {
            errno: Errno::EPERM | Errno::EACCES | Errno::ENXIO | Errno::ENODEV,
            ..
        }
    )
}

/// Open the kernel log `config.source` names, blocking (see the readers' `open`).
pub fn open(config: &KernelLogConfig, start: StartPosition) -> Result<Opened, ReaderError> {
    let kmsg = |start| KmsgReader::open(&config.path, start).map(OpenLog::Kmsg);
    let syslog = |start| SyslogReader::open(start).map(OpenLog::Syslog);
    let (log, kmsg_refused) = match config.source {
        KernelLogSource::Kmsg => (kmsg(start)?, None),
        KernelLogSource::Syslog => (syslog(start)?, None),
        KernelLogSource::Auto => match kmsg(start.clone()) {
            Ok(log) => (log, None),
            Err(refused) if falls_back_to_syslog(&refused) => match syslog(start) {
                Ok(log) => (log, Some(refused)),
                Err(also) => {
                    return Err(ReaderError::NoSource {
                        kmsg: Box::new(refused),
                        syslog: Box::new(also),
                    });
                }
            },
            Err(error) => return Err(error),
        },
    };
    Ok(Opened { log, kmsg_refused })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn open_error(errno: Errno) -> ReaderError {
        ReaderError::Open {
            path: PathBuf::from("/dev/kmsg"),
            errno,
        }
    }

    #[test]
    fn only_a_refused_device_falls_back() {
        for errno in [Errno::EPERM, Errno::EACCES, Errno::ENXIO, Errno::ENODEV] {
            assert!(falls_back_to_syslog(&open_error(errno)), "{errno}");
        }
        for errno in [Errno::ENOENT, Errno::ENOTDIR, Errno::EMFILE, Errno::EIO] {
            assert!(!falls_back_to_syslog(&open_error(errno)), "{errno}");
        }
        let not_a_device = ReaderError::NotCharDevice {
            path: PathBuf::from("/tmp"),
        };
        assert!(!falls_back_to_syslog(&not_a_device));
        let read = ReaderError::Read {
            path: PathBuf::from("/dev/kmsg"),
            errno: Errno::EPERM,
        };
        assert!(!falls_back_to_syslog(&read), "only opening decides");
    }

    #[test]
    fn a_missing_path_is_reported_not_replaced() {
        let config = KernelLogConfig {
            path: PathBuf::from("/nonexistent-hangwatch/kmsg"),
            ..KernelLogConfig::default()
        };
        let error = open(&config, StartPosition::End).unwrap_err();
        assert_eq!(error.errno(), Some(Errno::ENOENT));
        assert!(error.to_string().contains("/nonexistent-hangwatch/kmsg"));
    }

    #[test]
    fn both_refusals_are_reported_together() {
        let error = ReaderError::NoSource {
            kmsg: Box::new(open_error(Errno::EPERM)),
            syslog: Box::new(ReaderError::Syslog {
                action: "SIZE_BUFFER",
                errno: Errno::EPERM,
            }),
        };
        assert_eq!(
            error.to_string(),
            "cannot open /dev/kmsg: EPERM: Operation not permitted; \
             syslog(2) SIZE_BUFFER: EPERM: Operation not permitted"
        );
        assert_eq!(error.errno(), Some(Errno::EPERM));
    }
}
