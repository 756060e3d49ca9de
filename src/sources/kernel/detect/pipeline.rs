//! Pure processing of parsed records: facility filter, rules, OOM correlation, classification.

use super::correlate::OomCorrelator;
use super::event::{
    EventFields, HungTaskScope, KernelEvent, KernelLogCounters, OomInfo, classify_hung_task,
    classify_oom_victim, owner_of_path,
};
use super::record::{FACILITY_KERN, Record};
use super::rules::{HUNG_TASK_RULE, OOM_KILL_RULE, RuleError, RuleMatch, RuleSet};
use super::trace::TraceCapture;
use crate::config::{KernelLogConfig, KernelRule};

#[derive(Debug)]
pub struct Pipeline {
    rules: RuleSet,
    correlator: OomCorrelator,
    accept_non_kernel: bool,
    containerd_namespaces: Vec<String>,
    last_seq: Option<u64>,
    counters: KernelLogCounters,
    traces: TraceCapture,
}

impl Pipeline {
    pub fn new(
        config: &KernelLogConfig,
        containerd_namespaces: &[String],
    ) -> Result<Pipeline, RuleError> {
        Ok(Pipeline {
            rules: RuleSet::new(&config.rules)?,
            correlator: OomCorrelator::default(),
            accept_non_kernel: config.accept_non_kernel,
            containerd_namespaces: containerd_namespaces.to_vec(),
            last_seq: None,
            counters: KernelLogCounters::default(),
            traces: TraceCapture::default(),
        })
    }

    /// The rules in force: built-in merged with the config's.
    pub fn rules(&self) -> &[KernelRule] {
        self.rules.rules()
    }

    /// The events one record gives (usually none).
    pub fn process(&mut self, record: &Record) -> Vec<KernelEvent> {
        if self.last_seq.is_some_and(|last| record.seq != last + 1) {
            self.correlator.clear();
        }
        self.last_seq = Some(record.seq);
        if record.facility != FACILITY_KERN && !self.accept_non_kernel {
            self.counters.ignored_non_kernel += 1;
            self.traces.pass(record);
            return Vec::new();
        }
        let mut events = Vec::new();
        for found in self.rules.matches(&record.message) {
            match found {
                RuleMatch::Context { kind, captures } => {
                    self.correlator.observe(
                        kind,
                        captures.as_ref(),
                        &record.message,
                        record.ts_usec,
                    );
                }
                RuleMatch::Rule { rule, fields } => {
                    let event = build_event(
                        record,
                        rule,
                        fields,
                        &mut self.correlator,
                        &self.containerd_namespaces,
                    );
                    events.push(event);
                }
            }
        }
        self.traces.intercept(record, &mut events);
        events
    }

    /// A hung-task event held for its call trace since the previous call (the detector's
    /// tick), released with what came of its trace.
    pub fn flush_stale(&mut self) -> Option<KernelEvent> {
        self.traces.flush_stale()
    }

    /// The seq of the hung-task record held for its call trace.
    pub fn held_seq(&self) -> Option<u64> {
        self.traces.held_seq()
    }

    /// The event held for its call trace, if any, at the end of the records read.
    pub fn flush(&mut self) -> Option<KernelEvent> {
        self.traces.flush()
    }

    /// Counts since the last call (records ignored for their facility).
    pub fn take_counters(&mut self) -> KernelLogCounters {
        self.counters.take()
    }

    /// The pid whose `/proc/<pid>/cgroup` would tell a hung task's scope, when the comm alone
    /// does not.
    pub fn hung_task_pid(event: &KernelEvent) -> Option<u32> {
        (event.rule == HUNG_TASK_RULE && event.hung_task_scope != Some(HungTaskScope::Runtime))
            .then_some(event.fields.pid)
            .flatten()
    }

    /// Classify a hung task given the text of its `/proc/<pid>/cgroup` (None: unreadable).
    pub fn attribute_hung_task(&self, event: &mut KernelEvent, proc_cgroup: Option<&str>) {
        if event.rule != HUNG_TASK_RULE {
            return;
        }
        let (scope, owner) = classify_hung_task(
            event.fields.comm.as_deref(),
            proc_cgroup,
            &self.containerd_namespaces,
        );
        event.hung_task_scope = Some(scope);
        if owner.is_some() {
            event.owner = owner;
        }
    }
}

fn build_event(
    record: &Record,
    rule: &KernelRule,
    mut fields: EventFields,
    correlator: &mut OomCorrelator,
    containerd_namespaces: &[String],
) -> KernelEvent {
    let mut oom = None;
    let mut hung_task_scope = None;
    let owner;
    if rule.name == OOM_KILL_RULE {
        let join = correlator.kill(fields.pid, &record.message, record.ts_usec);
        if fields.memcg.is_none() {
            fields.memcg.clone_from(&join.memcg);
        }
        owner = join
            .task_memcg
            .as_deref()
            .or(join.memcg.as_deref())
            .and_then(|path| owner_of_path(path, containerd_namespaces));
        oom = Some(OomInfo {
            victim: classify_oom_victim(fields.comm.as_deref(), owner.as_ref()),
            constraint: join.constraint,
            memcg: join.memcg,
            task_memcg: join.task_memcg,
        });
    } else {
        owner = fields
            .memcg
            .as_deref()
            .or(fields.extra.get("cgroup").map(String::as_str))
            .and_then(|path| owner_of_path(path, containerd_namespaces));
        if rule.name == HUNG_TASK_RULE {
            // Until /proc/<pid>/cgroup says otherwise, from the comm alone.
            hung_task_scope = Some(classify_hung_task(fields.comm.as_deref(), None, &[]).0);
        }
    }
    KernelEvent {
        seq: record.seq,
        ts_usec: record.ts_usec,
        facility: record.facility,
        level: record.level,
        rule: rule.name.clone(),
        severity: rule.severity,
        kind: rule.kind,
        clear_after: rule.clear_after,
        message: record.message.clone(),
        fields,
        oom,
        hung_task_scope,
        call_trace: None,
        owner,
        container_name: None,
        pod: None,
        namespace: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::kernel::detect::event::{OomConstraint, OomVictim};
    use crate::sources::kernel::detect::record::parse_record;

    const ID: &str = "cfc5e58cb4a990e6c9fedaf9a71d71688c0ef4455a81767a51b403512c0d2cee";

    fn pipeline(accept_non_kernel: bool) -> Pipeline {
        let config = KernelLogConfig {
            accept_non_kernel,
            ..KernelLogConfig::default()
        };
        Pipeline::new(&config, &["moby".to_string(), "k8s.io".to_string()]).unwrap()
    }

    fn run(p: &mut Pipeline, lines: &[&str]) -> Vec<KernelEvent> {
        lines
            .iter()
            .flat_map(|l| p.process(&parse_record(l.as_bytes()).unwrap()))
            .collect()
    }

    #[test]
    fn oom_sequence_6x_gives_one_event_with_memcg_and_container() {
        let mut p = pipeline(false);
        let events = run(
            &mut p,
            &[
                "4,100,1607478556,-;sh invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
                &format!(
                    "6,101,1607485564,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset={ID},mems_allowed=0,oom_memcg=/docker/{ID},task_memcg=/docker/{ID},task=sh,pid=3779,uid=0"
                ),
                "3,102,1607485586,-;Memory cgroup out of memory: Killed process 3779 (sh) total-vm:43236kB, anon-rss:20104kB, file-rss:1520kB, shmem-rss:0kB, UID:0 pgtables:92kB oom_score_adj:0",
            ],
        );
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e.rule_label(), "oom_kill");
        assert_eq!(e.seq, 102);
        assert_eq!(e.fields.pid, Some(3779));
        assert_eq!(e.fields.extra["anon_rss_kb"], "20104");
        assert_eq!(e.victim_label(), Some("container"));
        assert_eq!(e.constraint_label(), Some("memcg"));
        let oom = e.oom.as_ref().unwrap();
        assert_eq!(oom.memcg, Some(format!("/docker/{ID}")));
        assert_eq!(e.owner.as_ref().unwrap().container_id.as_deref(), Some(ID));
    }

    #[test]
    fn events_serialize_with_the_label_values() {
        let mut p = pipeline(false);
        let events = run(
            &mut p,
            &[
                "3,7,9,-;Memory cgroup out of memory: Killed process 5 (runc:[2:INIT]) total-vm:1kB, anon-rss:1kB, file-rss:0kB",
            ],
        );
        let json = serde_json::to_value(&events[0]).unwrap();
        assert_eq!(json["rule"], "oom_kill");
        assert_eq!(json["severity"], "warning");
        assert_eq!(json["kind"], "temporary");
        assert_eq!(json["oom"]["victim"], "runc_init");
        assert_eq!(json["oom"]["constraint"], "memcg");
        assert_eq!(json["fields"]["pid"], 5);
        assert!(json["container_name"].is_null());
        let events = run(
            &mut p,
            &["3,8,9,-;unregister_netdevice: waiting for lo to become free. Usage count = 1"],
        );
        let json = serde_json::to_value(&events[0]).unwrap();
        assert_eq!(json["clear_after"], "2m");
        assert_eq!(json["kind"], "condition");
    }

    #[test]
    fn non_kernel_facility_is_ignored_and_counted_unless_accepted() {
        let forged = "12,5,1,-;Memory cgroup out of memory: Killed process 1 (runc:[2:INIT]) total-vm:1kB, anon-rss:1kB, file-rss:0kB";
        let mut p = pipeline(false);
        assert!(run(&mut p, &[forged]).is_empty());
        assert_eq!(p.take_counters().ignored_non_kernel, 1);
        assert_eq!(p.take_counters().ignored_non_kernel, 0);
        let mut p = pipeline(true);
        let events = run(&mut p, &[forged]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].facility, 1);
        assert_eq!(events[0].oom.as_ref().unwrap().victim, OomVictim::RuncInit);
    }

    #[test]
    fn a_gap_in_seq_drops_the_oom_context() {
        let mut p = pipeline(false);
        let events = run(
            &mut p,
            &[
                "6,10,1,-;Task in /docker/x killed as a result of limit of /docker/x",
                "3,12,2,-;Killed process 9 (sh) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB",
            ],
        );
        let oom = events[0].oom.as_ref().unwrap();
        assert_eq!(oom.memcg, None);
        assert_eq!(oom.constraint, OomConstraint::Unknown);
    }

    #[test]
    fn hung_task_scope_from_comm_then_from_proc_cgroup() {
        let mut p = pipeline(false);
        let mut events = run(
            &mut p,
            &[
                "3,1,1,-;INFO: task dockerd:812 blocked for more than 120 seconds.",
                "3,2,2,-;INFO: task java:900 blocked for more than 120 seconds.",
            ],
        );
        // Each is held for its call trace until the next record, or the end of the records.
        events.extend(p.flush());
        assert_eq!(events[0].hung_task_scope, Some(HungTaskScope::Runtime));
        assert_eq!(Pipeline::hung_task_pid(&events[0]), None);
        assert_eq!(Pipeline::hung_task_pid(&events[1]), Some(900));
        p.attribute_hung_task(&mut events[1], Some(&format!("4:memory:/docker/{ID}\n")));
        assert_eq!(events[1].hung_task_scope_label(), Some("container"));
        assert_eq!(
            events[1].owner.as_ref().unwrap().container_id.as_deref(),
            Some(ID)
        );
    }

    #[test]
    fn pids_limit_is_attributed_from_its_cgroup() {
        let mut p = pipeline(false);
        let events = run(
            &mut p,
            &[&format!(
                "6,1,1,-;cgroup: fork rejected by pids controller in /kubepods/burstable/pod0f3e1b2c-4d5e-4f60-8a9b-0c1d2e3f4a5b/{ID}"
            )],
        );
        assert_eq!(events[0].rule, "pids_limit");
        let owner = events[0].owner.as_ref().unwrap();
        assert_eq!(owner.container_id.as_deref(), Some(ID));
        assert_eq!(
            owner.pod_uid.as_deref(),
            Some("0f3e1b2c-4d5e-4f60-8a9b-0c1d2e3f4a5b")
        );
    }
}
