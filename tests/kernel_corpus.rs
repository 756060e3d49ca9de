//! The kernel log corpus: real-format records of every rule for every kernel generation, and
//! near-misses, through parser → facility filter → rules → correlator → classification.
//! `tests/fixtures/kernel/expected.yaml` lists, per file, exactly the events it must give.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use hangwatch::config::KernelLogConfig;
use hangwatch::sources::kernel::detect::{KernelEvent, Pipeline, default_rules, parse_record};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    file: String,
    #[serde(default)]
    accept_non_kernel: bool,
    ignored_non_kernel: Option<u64>,
    events: Vec<Expected>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    seq: u64,
    rule: String,
    pid: Option<u32>,
    comm: Option<String>,
    seconds: Option<u64>,
    device: Option<String>,
    memcg: Option<String>,
    task_memcg: Option<String>,
    victim: Option<String>,
    constraint: Option<String>,
    scope: Option<String>,
    container_id: Option<String>,
    pod_uid: Option<String>,
    qos: Option<String>,
    runtime: Option<String>,
    facility: Option<u8>,
    proc_cgroup: Option<String>,
    #[serde(default)]
    extra: BTreeMap<String, String>,
}

const NONE: &str = "none";

fn fixtures() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kernel"
    ))
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("expected.yaml")).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

/// Split a fixture into raw records: a record is a line, plus the dictionary lines (starting
/// with a space) after it; `#` lines are comments.
fn records(file: &str) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(fixtures().join(file)).unwrap();
    let mut records: Vec<Vec<u8>> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with(' ') {
            let last = records.last_mut().expect("dictionary line after a record");
            last.extend_from_slice(line.as_bytes());
            last.push(b'\n');
        } else {
            records.push(format!("{line}\n").into_bytes());
        }
    }
    records
}

fn namespaces() -> Vec<String> {
    vec!["moby".into(), "k8s.io".into()]
}

/// Run one case: every event, in order, with hung tasks classified from `proc_cgroup`.
fn run(case: &Case) -> (Vec<KernelEvent>, u64) {
    let config = KernelLogConfig {
        accept_non_kernel: case.accept_non_kernel,
        ..KernelLogConfig::default()
    };
    let mut pipeline = Pipeline::new(&config, &namespaces()).unwrap();
    let mut found = Vec::new();
    for raw in records(&case.file) {
        let record = parse_record(&raw)
            .unwrap_or_else(|e| panic!("{}: {e}: {}", case.file, String::from_utf8_lossy(&raw)));
        found.extend(pipeline.process(&record));
    }
    // A hung task is held for its call trace until a record outside it, or the end.
    found.extend(pipeline.flush());
    let mut events = Vec::new();
    for mut event in found {
        if Pipeline::hung_task_pid(&event).is_some() {
            let proc_cgroup = case
                .events
                .iter()
                .find(|x| x.seq == event.seq)
                .and_then(|x| x.proc_cgroup.as_deref());
            pipeline.attribute_hung_task(&mut event, proc_cgroup);
        }
        events.push(event);
    }
    (events, pipeline.take_counters().ignored_non_kernel)
}

fn check_optional(what: &str, expected: &Option<String>, actual: Option<&str>) {
    match expected.as_deref() {
        None => {}
        Some(NONE) => assert_eq!(actual, None, "{what}"),
        Some(value) => assert_eq!(actual, Some(value), "{what}"),
    }
}

fn check(file: &str, expected: &Expected, event: &KernelEvent) {
    let at = format!("{file} seq {}", expected.seq);
    assert_eq!(event.rule, expected.rule, "{at}: rule");
    assert_eq!(event.rule_label(), expected.rule, "{at}: rule label");
    if let Some(pid) = expected.pid {
        assert_eq!(event.fields.pid, Some(pid), "{at}: pid");
    }
    if let Some(seconds) = expected.seconds {
        assert_eq!(event.fields.seconds, Some(seconds), "{at}: seconds");
    }
    if let Some(facility) = expected.facility {
        assert_eq!(event.facility, facility, "{at}: facility");
    }
    check_optional(
        &format!("{at}: comm"),
        &expected.comm,
        event.fields.comm.as_deref(),
    );
    check_optional(
        &format!("{at}: device"),
        &expected.device,
        event.fields.device.as_deref(),
    );
    for (name, value) in &expected.extra {
        assert_eq!(
            event.fields.extra.get(name),
            Some(value),
            "{at}: field {name} in {:?}",
            event.fields.extra
        );
    }

    if event.rule == "oom_kill" {
        let oom = event
            .oom
            .as_ref()
            .unwrap_or_else(|| panic!("{at}: no oom info"));
        let victim = expected
            .victim
            .as_deref()
            .expect("oom cases name the victim");
        let constraint = expected
            .constraint
            .as_deref()
            .expect("oom cases name the constraint");
        assert_eq!(event.victim_label(), Some(victim), "{at}: victim");
        assert_eq!(
            event.constraint_label(),
            Some(constraint),
            "{at}: constraint"
        );
        check_optional(
            &format!("{at}: memcg"),
            &expected.memcg,
            oom.memcg.as_deref(),
        );
        check_optional(
            &format!("{at}: task_memcg"),
            &expected.task_memcg,
            oom.task_memcg.as_deref(),
        );
        assert_eq!(oom.memcg, event.fields.memcg, "{at}: memcg field");
    } else {
        assert!(event.oom.is_none(), "{at}: oom info on a non-OOM event");
        assert!(expected.victim.is_none() && expected.constraint.is_none());
    }

    if event.rule == "hung_task" {
        let scope = expected
            .scope
            .as_deref()
            .expect("hung task cases name the scope");
        assert_eq!(event.hung_task_scope_label(), Some(scope), "{at}: scope");
    } else {
        assert_eq!(
            event.hung_task_scope, None,
            "{at}: scope on a non-hung-task event"
        );
    }

    let owner = event.owner.as_ref();
    check_optional(
        &format!("{at}: container"),
        &expected.container_id,
        owner.and_then(|o| o.container_id.as_deref()),
    );
    check_optional(
        &format!("{at}: pod"),
        &expected.pod_uid,
        owner.and_then(|o| o.pod_uid.as_deref()),
    );
    check_optional(
        &format!("{at}: qos"),
        &expected.qos,
        owner.and_then(|o| o.qos),
    );
    check_optional(
        &format!("{at}: runtime"),
        &expected.runtime,
        owner.and_then(|o| o.runtime),
    );
    assert!(event.container_name.is_none() && event.pod.is_none() && event.namespace.is_none());
}

#[test]
fn every_file_gives_exactly_the_expected_events() {
    for case in cases() {
        let (events, ignored) = run(&case);
        let got: Vec<(u64, &str)> = events.iter().map(|e| (e.seq, e.rule.as_str())).collect();
        let want: Vec<(u64, &str)> = case
            .events
            .iter()
            .map(|e| (e.seq, e.rule.as_str()))
            .collect();
        assert_eq!(
            got, want,
            "{} (accept_non_kernel {})",
            case.file, case.accept_non_kernel
        );
        for (expected, event) in case.events.iter().zip(&events) {
            check(&case.file, expected, event);
        }
        if let Some(count) = case.ignored_non_kernel {
            assert_eq!(
                ignored, count,
                "{}: records ignored for their facility",
                case.file
            );
        }
    }
}

#[test]
fn every_rule_is_exercised_on_several_generations() {
    let generations = [
        "rhel7-3.10.kmsg",
        "linux-4.14.kmsg",
        "linux-4.19.kmsg",
        "linux-5.4.kmsg",
        "linux-6.x.kmsg",
    ];
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for case in cases() {
        for e in &case.events {
            seen.entry(e.rule.clone())
                .or_default()
                .insert(case.file.clone());
        }
    }
    for rule in default_rules().unwrap() {
        let files = seen.get(&rule.name).cloned().unwrap_or_default();
        let in_generations = files
            .iter()
            .filter(|f| generations.contains(&f.as_str()))
            .count();
        assert!(
            in_generations >= 2,
            "rule {} is covered by only {files:?}",
            rule.name
        );
    }
    for file in generations {
        let case = cases().into_iter().find(|c| c.file == file).unwrap();
        let oom = case.events.iter().filter(|e| e.rule == "oom_kill").count();
        assert!(oom >= 1, "{file} has no OOM sequence");
    }
}

#[test]
fn context_lines_alone_never_count() {
    let case = Case {
        file: "near-misses.kmsg".into(),
        accept_non_kernel: true,
        ignored_non_kernel: None,
        events: Vec::new(),
    };
    // Even accepting userspace lines, only two of the three forged ones match (the third is
    // not at the start of the message).
    let (events, _) = run(&case);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [740, 741]);
    assert!(events.iter().all(|e| e.facility != 0));
}
