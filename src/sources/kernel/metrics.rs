//! The kernel source's metric families.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::{RuleLabels, ScopeLabels};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OomLabels {
    pub victim: &'static str,
    pub constraint: &'static str,
}

pub struct KernelMetrics {
    pub events_total: Family<RuleLabels, Counter>,
    pub hung_tasks_total: Family<ScopeLabels, Counter>,
    pub oom_kills_total: Family<OomLabels, Counter>,
    pub condition: Family<RuleLabels, Gauge>,
    pub log_up: Gauge,
    pub log_source: Family<SourceLabels, Gauge>,
    pub records_total: Counter,
    pub lost_records_total: Counter,
    pub ignored_records_total: Counter,
    pub malformed_records_total: Counter,
}

impl KernelMetrics {
    pub fn register(r: &mut Registry) -> KernelMetrics {
        let m = KernelMetrics {
            events_total: Family::default(),
            hung_tasks_total: Family::default(),
            oom_kills_total: Family::default(),
            condition: Family::default(),
            log_up: Gauge::default(),
            log_source: Family::default(),
            records_total: Counter::default(),
            lost_records_total: Counter::default(),
            ignored_records_total: Counter::default(),
            malformed_records_total: Counter::default(),
        };
        r.register(
            "hangwatch_kernel_events",
            "Kernel log events, by rule",
            m.events_total.clone(),
        );
        r.register(
            "hangwatch_hung_tasks",
            "Kernel hung-task reports, by whose task: runtime, container, host",
            m.hung_tasks_total.clone(),
        );
        r.register(
            "hangwatch_oom_kills",
            "OOM kills, by victim (runc_init, runtime, container, host) and constraint (memcg, global)",
            m.oom_kills_total.clone(),
        );
        r.register(
            "hangwatch_kernel_condition",
            "1 while a kernel condition rule holds (e.g. fs_readonly)",
            m.condition.clone(),
        );
        r.register(
            "hangwatch_kernel_log_up",
            "1 while the kernel log is being read",
            m.log_up.clone(),
        );
        r.register(
            "hangwatch_kernel_log_source",
            "1 for the interface the kernel log is being read through: kmsg (/dev/kmsg) or syslog (syslog(2))",
            m.log_source.clone(),
        );
        r.register(
            "hangwatch_kernel_log_records",
            "Kernel log records read",
            m.records_total.clone(),
        );
        r.register(
            "hangwatch_kernel_log_lost_records",
            "Kernel log records overwritten before they were read (from seq gaps)",
            m.lost_records_total.clone(),
        );
        r.register(
            "hangwatch_kernel_log_ignored_records",
            "Kernel log records ignored because their facility is not kern",
            m.ignored_records_total.clone(),
        );
        r.register(
            "hangwatch_kernel_log_malformed_records",
            "Kernel log records that did not parse",
            m.malformed_records_total.clone(),
        );
        m
    }
}
