//! The engine driven by a script of signals and times: no daemon, no root, no sleeps.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::config::Config;
use crate::sources::kernel::KernelSection;
use crate::sources::runtime::RuntimesSection;
use crate::sources::runtime::detect::{
    Operation, ProbeFailure, ProbeSignal, StatusSubject, SubjectKind, UnknownTask, Unreachable,
};
use crate::sources::runtime::verdict::RuntimeState;
use crate::sources::{self, Now};

/// What the engine asked the outside world to do.
#[derive(Debug, Clone, PartialEq)]
enum Done {
    Dump(Runtime),
    Resolve(String),
    Saved { id: String, open: bool },
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Done>>>);

impl Recorder {
    fn taken(&self) -> Vec<Done> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn push(&self, done: Done) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(done);
    }
}

impl Effects for Recorder {
    fn dump(&self, daemon: Runtime) {
        self.push(Done::Dump(daemon));
    }

    fn resolve(&self, id: String, _docker: bool, _containerd: bool) {
        self.push(Done::Resolve(id));
    }

    fn save(&self, incident: &Incident) {
        self.push(Done::Saved {
            id: incident.id.clone(),
            open: incident.is_open(),
        });
    }
}

/// A scripted clock: `at(s)` is `s` seconds after the start, on both clocks.
struct Clock {
    mono: Instant,
    wall: SystemTime,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            mono: Instant::now(),
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        }
    }

    fn at(&self, seconds: f64) -> Now {
        let d = Duration::from_secs_f64(seconds);
        Now {
            mono: self.mono + d,
            wall: self.wall + d,
        }
    }
}

/// Docker probed (its socket need not exist: the engine only sees signals), nothing else.
fn docker_only() -> Config {
    let mut config = Config::default();
    config.containerd.mode = RuntimeMode::Disabled;
    config.cri.mode = RuntimeMode::Disabled;
    config.kernel_log.enabled = false;
    config.proc_scan.enabled = false;
    config.lifecycle.enabled = false;
    config.node_name = "node-a".into();
    config
}

struct Driven {
    engine: Engine,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    done: Recorder,
    clock: Clock,
    next_id: u64,
}

impl Driven {
    fn new(config: Config) -> Driven {
        let done = Recorder::default();
        let clock = Clock::new();
        let (engine, snapshot) = Engine::new(
            Arc::new(config),
            &sources::registered(),
            Some(Box::new(done.clone())),
            Vec::new(),
            clock.at(0.0),
        );
        Driven {
            engine,
            snapshot,
            done,
            clock,
            next_id: 1,
        }
    }

    /// A probe of `operation` starting at `start`; returns its id.
    fn start(&mut self, operation: Operation, start: f64) -> u64 {
        self.start_on(Runtime::Docker, operation, start, None)
    }

    /// A probe of `runtime`'s `operation` about `subject` starting at `start`; returns its id.
    fn start_on(
        &mut self,
        runtime: Runtime,
        operation: Operation,
        start: f64,
        subject: Option<StatusSubject>,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let signal = ProbeSignal::Started {
            runtime,
            operation,
            id,
            at: self.clock.at(start).mono,
            subject,
        };
        self.engine.apply(
            Signal::source(sources::runtime::NAME, signal),
            self.clock.at(start),
        );
        id
    }

    fn finish(
        &mut self,
        operation: Operation,
        id: u64,
        start: f64,
        end: f64,
        result: Result<(), ProbeFailure>,
    ) {
        self.finish_on(Runtime::Docker, operation, id, start, end, result);
    }

    fn finish_on(
        &mut self,
        runtime: Runtime,
        operation: Operation,
        id: u64,
        start: f64,
        end: f64,
        result: Result<(), ProbeFailure>,
    ) {
        let signal = ProbeSignal::Finished {
            runtime,
            operation,
            id,
            started: self.clock.at(start).mono,
            finished: self.clock.at(end).mono,
            result,
        };
        self.engine.apply(
            Signal::source(sources::runtime::NAME, signal),
            self.clock.at(end),
        );
    }

    /// Both docker operations answer within 10 ms of `at`.
    fn healthy_round(&mut self, at: f64) {
        for operation in [Operation::Ping, Operation::ListContainers] {
            let id = self.start(operation.clone(), at);
            self.finish(operation, id, at, at + 0.01, Ok(()));
        }
    }

    fn evaluate(&mut self, at: f64) {
        self.engine.evaluate(self.clock.at(at));
    }

    fn docker_state(&self) -> RuntimeState {
        self.state_of(Runtime::Docker).0
    }

    /// The runtime's state and reason in the last snapshot.
    fn state_of(&self, runtime: Runtime) -> (RuntimeState, String) {
        let snapshot = self.snapshot.borrow().clone();
        snapshot
            .section::<RuntimesSection>()
            .and_then(|s| s.0.iter().find(|r| r.runtime == runtime))
            .map(|r| (r.state, r.reason.clone()))
            .unwrap_or((RuntimeState::Pending, String::new()))
    }

    /// Every operation of `runtime` answers within 10 ms of `at`.
    fn answers(&mut self, runtime: Runtime, operations: &[Operation], at: f64) {
        for operation in operations {
            let id = self.start_on(runtime, operation.clone(), at, None);
            self.finish_on(runtime, operation.clone(), id, at, at + 0.01, Ok(()));
        }
    }

    fn incidents(&self) -> Vec<Incident> {
        self.snapshot.borrow().incidents.as_ref().clone()
    }

    fn metric(&self, series: &str) -> Option<f64> {
        self.engine
            .metrics()
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }
}

#[test]
fn a_stall_asks_for_dumps_opens_an_incident_and_recovery_closes_it() {
    let mut d = Driven::new(docker_only());
    assert_eq!(d.docker_state(), RuntimeState::Pending);

    d.healthy_round(0.0);
    d.evaluate(0.25);
    assert_eq!(d.docker_state(), RuntimeState::Healthy);
    assert_eq!(
        d.metric(r#"hangwatch_runtime_state{node="node-a",runtime="docker",state="healthy"}"#),
        Some(1.0)
    );
    assert!(
        d.done.taken().is_empty(),
        "a healthy runtime decides nothing"
    );

    // `docker ps` stops answering at 5 s; `_ping` still does: wedged once past the threshold.
    let stuck = d.start(Operation::ListContainers, 5.0);
    let ping = d.start(Operation::Ping, 5.0);
    d.finish(Operation::Ping, ping, 5.0, 5.01, Ok(()));
    d.evaluate(14.9);
    assert_eq!(
        d.docker_state(),
        RuntimeState::Slow,
        "in flight past the slow threshold, not yet the stall threshold"
    );
    assert!(d.incidents().is_empty());
    d.evaluate(15.1);
    assert_eq!(d.docker_state(), RuntimeState::Wedged);
    assert_eq!(
        d.metric(r#"hangwatch_runtime_stalled{node="node-a",runtime="docker"}"#),
        Some(1.0)
    );
    let incidents = d.incidents();
    assert_eq!(incidents.len(), 1);
    assert!(incidents[0].is_open());
    assert_eq!(
        d.done.taken(),
        vec![
            Done::Dump(Runtime::Docker),
            Done::Saved {
                id: incidents[0].id.clone(),
                open: true
            }
        ],
        "one dump of dockerd (containerd is not probed), the incident saved"
    );
    assert_eq!(
        d.metric(r#"hangwatch_incidents_total{node="node-a",runtime="docker"}"#),
        Some(1.0)
    );
    assert_eq!(
        d.metric(r#"hangwatch_incident_open{node="node-a",runtime="docker"}"#),
        Some(1.0)
    );

    // Still wedged on the next ticks: no second dump.
    d.evaluate(15.35);
    d.evaluate(15.6);
    assert!(
        !d.done.taken().contains(&Done::Dump(Runtime::Docker)),
        "a dump is asked for on entering the state, not on every tick"
    );

    // The call answers at 40 s: healthy again, the incident closes and is saved closed.
    d.finish(Operation::ListContainers, stuck, 5.0, 40.0, Ok(()));
    d.evaluate(40.25);
    assert_eq!(
        d.docker_state(),
        RuntimeState::Slow,
        "its last answer took 35 s"
    );
    d.healthy_round(45.0);
    d.evaluate(45.25);
    assert_eq!(d.docker_state(), RuntimeState::Healthy);
    let incidents = d.incidents();
    assert!(!incidents[0].is_open(), "recovery closes the incident");
    assert!(d.done.taken().contains(&Done::Saved {
        id: incidents[0].id.clone(),
        open: false
    }));
    assert_eq!(
        d.metric(r#"hangwatch_incident_open{node="node-a",runtime="docker"}"#),
        Some(0.0)
    );
}

#[test]
fn a_second_stall_within_the_cooldown_is_not_signalled_but_counted() {
    let mut d = Driven::new(docker_only());
    for round in 0..2 {
        let base = f64::from(round) * 100.0;
        d.healthy_round(base);
        d.evaluate(base + 0.25);
        let ping = d.start(Operation::Ping, base + 1.0);
        d.evaluate(base + 12.0);
        assert_eq!(d.docker_state(), RuntimeState::Hung, "round {round}");
        d.finish(Operation::Ping, ping, base + 1.0, base + 13.0, Ok(()));
        d.evaluate(base + 13.25);
    }
    let dumps: Vec<Done> = d
        .done
        .taken()
        .into_iter()
        .filter(|x| matches!(x, Done::Dump(_)))
        .collect();
    assert_eq!(
        dumps,
        vec![Done::Dump(Runtime::Docker)],
        "cooldown of 10 min"
    );
    assert_eq!(
        d.metric(
            r#"hangwatch_goroutine_dumps_total{node="node-a",daemon="dockerd",result="cooldown"}"#
        ),
        Some(1.0)
    );
    let incidents = d.incidents();
    assert_eq!(incidents.len(), 2);
    assert!(
        incidents[0]
            .dumps
            .iter()
            .any(|dump| dump.status == DumpStatus::Skipped),
        "the second incident says why no dump was taken: {:?}",
        incidents[0].dumps
    );
}

#[test]
fn a_refused_socket_is_down_and_a_missing_one_absent() {
    let mut d = Driven::new(docker_only());
    let id = d.start(Operation::Ping, 0.0);
    d.finish(
        Operation::Ping,
        id,
        0.0,
        0.001,
        Err(ProbeFailure::Unreachable(Unreachable::SocketMissing)),
    );
    d.evaluate(0.25);
    assert_eq!(d.docker_state(), RuntimeState::Absent);
    d.healthy_round(1.0);
    d.evaluate(1.25);
    assert_eq!(d.docker_state(), RuntimeState::Healthy);
    let id = d.start(Operation::Ping, 2.0);
    d.finish(
        Operation::Ping,
        id,
        2.0,
        2.001,
        Err(ProbeFailure::Unreachable(Unreachable::Refused)),
    );
    d.evaluate(2.25);
    assert_eq!(
        d.docker_state(),
        RuntimeState::Down,
        "once seen, a runtime that refuses is down, not absent"
    );
    assert!(d.incidents().is_empty(), "down is not a stall");
}

#[test]
fn a_signal_for_no_registered_source_is_dropped() {
    let mut d = Driven::new(docker_only());
    d.engine
        .apply(Signal::source("no-such-source", 42_u32), d.clock.at(0.0));
    d.evaluate(0.25);
    assert_eq!(d.docker_state(), RuntimeState::Pending);
}

/// containerd (native) and its CRI socket probed, nothing else.
fn containerd_with_cri() -> Config {
    let mut config = docker_only();
    config.docker.mode = RuntimeMode::Disabled;
    config.containerd.mode = RuntimeMode::Auto;
    config.containerd.namespaces = vec!["k8s.io".into()];
    config.cri.mode = RuntimeMode::Auto;
    config
}

fn native() -> Vec<Operation> {
    vec![
        Operation::Version,
        Operation::ListTasks {
            namespace: "k8s.io".into(),
        },
    ]
}

#[test]
fn cri_stuck_while_containerd_answers_is_the_cri_layer_wedged_and_names_the_chain() {
    let mut d = Driven::new(containerd_with_cri());
    d.answers(Runtime::Containerd, &native(), 0.0);
    d.answers(
        Runtime::Cri,
        &sources::runtime::detect::cri::OPERATIONS,
        0.0,
    );
    d.evaluate(0.25);
    assert_eq!(d.state_of(Runtime::Cri).0, RuntimeState::Healthy);

    // The container's status call and every ListContainers hang (containerd#10583); the
    // native API and CRI Status still answer; Tasks.List reports the task UNKNOWN.
    let app = StatusSubject {
        kind: SubjectKind::Container,
        id: "c0ffee0000000000".into(),
        pod: Some("web".into()),
        namespace: Some("shop".into()),
        container: Some("app".into()),
    };
    d.start_on(Runtime::Cri, Operation::StatusSample, 1.0, Some(app));
    d.start_on(Runtime::Cri, Operation::ListContainers, 1.0, None);
    d.engine.apply(
        Signal::source(
            sources::runtime::NAME,
            ProbeSignal::UnknownTasks {
                namespace: "k8s.io".into(),
                tasks: vec![UnknownTask {
                    container_id: "c0ffee0000000000".into(),
                    shim_pid: Some(812),
                    shim_state: Some('T'),
                    shim_wchan: Some("do_signal_stop".into()),
                }],
            },
        ),
        d.clock.at(2.0),
    );
    for t in [5.0, 10.0] {
        d.answers(Runtime::Containerd, &native(), t);
        d.answers(
            Runtime::Cri,
            &[Operation::Status, Operation::ListPodSandbox],
            t,
        );
    }
    d.evaluate(10.5);
    assert_ne!(
        d.state_of(Runtime::Cri).0,
        RuntimeState::Wedged,
        "not before the threshold"
    );
    d.evaluate(11.25);
    let (state, reason) = d.state_of(Runtime::Cri);
    assert_eq!(state, RuntimeState::Wedged, "{reason}");
    assert!(reason.starts_with("CRI layer wedged"), "{reason}");
    assert!(reason.contains("container app"), "{reason}");
    assert!(reason.contains("containerd's own API answers"), "{reason}");
    assert_eq!(d.state_of(Runtime::Containerd).0, RuntimeState::Healthy);
    assert_eq!(
        d.metric(r#"hangwatch_runtime_state{node="node-a",runtime="cri",state="wedged"}"#),
        Some(1.0)
    );
    assert_eq!(
        d.metric(r#"hangwatch_containerd_unknown_tasks{node="node-a",namespace="k8s.io"}"#),
        Some(1.0)
    );
    assert!(
        d.done.taken().contains(&Done::Dump(Runtime::Containerd)),
        "a CRI stall asks containerd for its dump"
    );
    let incident = d
        .incidents()
        .into_iter()
        .find(|i| i.runtime == Runtime::Cri)
        .expect("a CRI incident");
    assert_eq!(incident.layer, incidents::Layer::Cri);
    let cause = &incident.suspected_cause;
    assert!(cause.starts_with("CRI layer wedged"), "{cause}");
    assert!(cause.contains("CRI ListContainers blocked"), "{cause}");
    assert!(cause.contains("behind container app"), "{cause}");
    assert!(
        cause.contains("shim pid 812 of app is stopped (T)"),
        "{cause}"
    );

    // Kubelet's relist clock runs from the last completed relist (t = 0).
    let left = d
        .metric(r#"hangwatch_kubelet_pleg_relist_seconds_left{node="node-a"}"#)
        .expect("exported");
    assert!((left - (180.0 - 11.25)).abs() < 0.1, "{left}");
}

#[test]
fn cri_and_containerd_both_stuck_is_containerd_hung() {
    let mut d = Driven::new(containerd_with_cri());
    d.answers(Runtime::Containerd, &native(), 0.0);
    d.answers(
        Runtime::Cri,
        &sources::runtime::detect::cri::OPERATIONS,
        0.0,
    );
    for op in native() {
        d.start_on(Runtime::Containerd, op, 1.0, None);
    }
    for op in sources::runtime::detect::cri::OPERATIONS {
        d.start_on(Runtime::Cri, op, 1.0, None);
    }
    d.evaluate(11.25);
    assert_eq!(d.state_of(Runtime::Containerd).0, RuntimeState::Hung);
    let (state, reason) = d.state_of(Runtime::Cri);
    assert_eq!(state, RuntimeState::Hung, "{reason}");
    assert!(reason.starts_with("containerd hung"), "{reason}");
    let incident = d
        .incidents()
        .into_iter()
        .find(|i| i.runtime == Runtime::Cri)
        .expect("a CRI incident");
    assert_eq!(incident.layer, incidents::Layer::Containerd);
    assert!(
        incident.suspected_cause.starts_with("containerd hung"),
        "{}",
        incident.suspected_cause
    );
}

#[test]
fn an_oom_storm_during_an_incident_is_saved_and_listed_once_per_evaluation() {
    use crate::sources::kernel::detect::{
        KernelSignal, Pipeline, kernel_time_to_wall, parse_record,
    };
    let mut config = docker_only();
    config.kernel_log.enabled = true;
    let mut pipeline = Pipeline::new(&config.kernel_log, &[]).unwrap();
    let mut d = Driven::new(config);
    d.healthy_round(0.0);
    d.evaluate(0.25);
    let _ping = d.start(Operation::Ping, 1.0);
    d.evaluate(12.0);
    let incident = d.incidents()[0].clone();
    assert!(incident.is_open());
    d.done.taken();

    let mut published = 0;
    let mut last = d.snapshot.borrow().clone();
    for kill in 0..1000_u32 {
        let line = format!(
            "3,{},{},-;Memory cgroup out of memory: Killed process {} (runc:[2:INIT]) total-vm:1kB, anon-rss:1kB, file-rss:0kB",
            100 + kill,
            12_000_000 + kill,
            5000 + kill
        );
        for event in pipeline.process(&parse_record(line.as_bytes()).unwrap()) {
            let at = kernel_time_to_wall(event.ts_usec);
            let signal = KernelSignal::Event {
                event: Box::new(event),
                at,
            };
            let now = d.clock.at(12.0 + f64::from(kill) * 0.0002);
            d.engine
                .apply(Signal::source(sources::kernel::NAME, signal), now);
        }
        let current = d.snapshot.borrow().clone();
        if !Arc::ptr_eq(&current, &last) {
            published += 1;
            let events = |s: &Snapshot| {
                s.section::<KernelSection>()
                    .map(|k| k.0.events.clone())
                    .unwrap_or_default()
            };
            let (before, now) = (events(&last), events(&current));
            if let Some(old) = before.first()
                && let Some(same) = now.iter().find(|e| e.event.seq == old.event.seq)
            {
                assert!(
                    Arc::ptr_eq(old, same),
                    "publishing shares the events, not copies them"
                );
            }
            last = current;
        }
    }
    assert!(
        (5..=11).contains(&published),
        "1000 events over 200 ms are published at most every 20 ms: {published} snapshots"
    );
    assert!(
        d.done.taken().is_empty(),
        "no save per event: the updates wait for the evaluation"
    );
    assert!(
        d.incidents()[0].evidence.is_empty(),
        "the listed incident is rebuilt once per evaluation, not per event"
    );
    d.evaluate(12.25);
    assert_eq!(
        d.done.taken(),
        vec![Done::Saved {
            id: incident.id.clone(),
            open: true
        }],
        "1000 updates, one save"
    );
    let listed = &d.incidents()[0];
    assert!(
        listed
            .evidence
            .iter()
            .any(|e| matches!(e, incidents::Evidence::OomKill { .. })),
        "the kills are the incident's evidence once listed"
    );
}
