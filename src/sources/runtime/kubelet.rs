//! Kubelet's two clocks on the CRI runtime, from kubelet's source (`pkg/kubelet`): the node
//! goes NotReady when no PLEG relist (`ListPodSandbox` + `ListContainers`) has completed for
//! 3 minutes, and kubelet says "container runtime is down" once its last successful `Status`
//! is older than 30 s. Exported as the seconds left, so an alert fires before kubelet acts.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::detect::Operation;
use super::metrics::RuntimeMetrics;
use super::verdict::RuntimeTracker;

/// kubelet's `relistThreshold` (pleg/generic.go).
pub const PLEG_RELIST_THRESHOLD: Duration = Duration::from_secs(180);
/// kubelet's runtime status threshold (`runtimeState` health check, kubelet.go).
pub const RUNTIME_STATUS_THRESHOLD: Duration = Duration::from_secs(30);

/// The ages and what is left of them, at the last evaluation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct KubeletClocks {
    /// Since the last relist both of whose lists answered (or since hangwatch started).
    pub relist_age_seconds: f64,
    pub relist_seconds_left: f64,
    /// Since the last `Status` that answered (or since hangwatch started).
    pub status_age_seconds: f64,
    pub status_seconds_left: f64,
    #[serde(skip)]
    started: Instant,
}

impl KubeletClocks {
    pub fn new(started: Instant) -> KubeletClocks {
        KubeletClocks {
            relist_age_seconds: 0.0,
            relist_seconds_left: PLEG_RELIST_THRESHOLD.as_secs_f64(),
            status_age_seconds: 0.0,
            status_seconds_left: RUNTIME_STATUS_THRESHOLD.as_secs_f64(),
            started,
        }
    }

    /// The clocks at `now`; full while the node has no CRI runtime (kubelet is not using one
    /// hangwatch can see, so nothing is running out).
    pub fn update(&mut self, cri: &RuntimeTracker, absent: bool, now: Instant) {
        if absent {
            *self = KubeletClocks::new(now);
            return;
        }
        let since = |at: Option<Instant>| now.saturating_duration_since(at.unwrap_or(self.started));
        // A relist completes when both lists have answered: its age is the older answer's.
        let relisted = match (
            cri.last_success(&Operation::ListPodSandbox),
            cri.last_success(&Operation::ListContainers),
        ) {
            (Some(pods), Some(containers)) => Some(pods.min(containers)),
            _ => None,
        };
        let relist = since(relisted);
        let status = since(cri.last_success(&Operation::Status));
        self.relist_age_seconds = relist.as_secs_f64();
        self.relist_seconds_left = PLEG_RELIST_THRESHOLD.saturating_sub(relist).as_secs_f64();
        self.status_age_seconds = status.as_secs_f64();
        self.status_seconds_left = RUNTIME_STATUS_THRESHOLD
            .saturating_sub(status)
            .as_secs_f64();
    }

    pub fn export(&self, metrics: &RuntimeMetrics) {
        metrics
            .kubelet_pleg_seconds_left
            .set(self.relist_seconds_left);
        metrics
            .kubelet_status_seconds_left
            .set(self.status_seconds_left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuntimeMode;
    use crate::domain::Runtime;

    #[test]
    fn the_clocks_run_from_the_last_answers_and_stop_at_zero() {
        let t0 = Instant::now();
        let mut cri = RuntimeTracker::new(
            Runtime::Cri,
            RuntimeMode::Auto,
            &super::super::detect::cri::OPERATIONS,
        );
        let mut clocks = KubeletClocks::new(t0);
        for (id, op) in [
            Operation::Status,
            Operation::ListPodSandbox,
            Operation::ListContainers,
        ]
        .into_iter()
        .enumerate()
        {
            cri.probe_started(&op, id as u64, t0);
            cri.probe_finished(&op, id as u64, t0, t0 + Duration::from_secs(1), Ok(()));
        }
        clocks.update(&cri, false, t0 + Duration::from_secs(21));
        assert_eq!(clocks.status_seconds_left, 10.0);
        assert_eq!(clocks.relist_seconds_left, 160.0);
        // ListContainers hangs: the relist clock runs out while Status keeps answering.
        cri.probe_started(&Operation::Status, 9, t0 + Duration::from_secs(200));
        cri.probe_finished(
            &Operation::Status,
            9,
            t0 + Duration::from_secs(200),
            t0 + Duration::from_secs(200),
            Ok(()),
        );
        clocks.update(&cri, false, t0 + Duration::from_secs(201));
        assert_eq!(clocks.relist_seconds_left, 0.0);
        assert_eq!(clocks.status_seconds_left, 29.0);
    }

    #[test]
    fn before_any_answer_the_clocks_run_from_the_start() {
        let t0 = Instant::now();
        let cri = RuntimeTracker::new(Runtime::Cri, RuntimeMode::Auto, &[Operation::Status]);
        let mut clocks = KubeletClocks::new(t0);
        clocks.update(&cri, false, t0 + Duration::from_secs(40));
        assert_eq!(clocks.status_seconds_left, 0.0);
        assert_eq!(clocks.relist_seconds_left, 140.0);
        clocks.update(&cri, true, t0 + Duration::from_secs(400));
        assert_eq!(
            clocks.relist_seconds_left, 180.0,
            "no CRI: nothing runs out"
        );
    }
}
