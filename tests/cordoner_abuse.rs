//! The cordoner's webhook under abuse: slow, large unauthenticated bodies and a flood of
//! unauthenticated calls cost it little memory and few log lines, and it keeps answering
//! Alertmanager; a notification of 10,000 alerts for one node takes a handful of API calls.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::cordoner::{Cordoner, notification};
use support::fake_apiserver::FakeApiServer;
use support::hangwatch::{TempDir, metric_value};
use support::wait_for;

const RSS_LIMIT_KIB: u64 = 32 * 1024;

/// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("read status")
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field}"))
}

/// An unauthenticated POST announcing a 1 MiB body, of which ~900 KiB is sent; held open.
fn slow_large_body(cordoner: &Cordoner) -> Option<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&cordoner.addr, Duration::from_secs(5)).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_millis(50)))
        .ok()?;
    let head = "POST /webhook HTTP/1.1\r\nHost: cordoner\r\nContent-Type: application/json\r\n\
                Content-Length: 1048576\r\n\r\n";
    stream.write_all(head.as_bytes()).ok()?;
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..14 {
        // A server that answered without reading stops taking bytes: move on.
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    Some(stream)
}

#[test]
fn slow_bodies_and_floods_cost_little_and_alertmanager_still_gets_through() {
    let dir = TempDir::new("cordoner-abuse");
    let api = FakeApiServer::start(&["node-1", "node-2"]);
    let cordoner = Cordoner::start(&api, dir.path(), &[]);
    let started = Instant::now();
    let held: Vec<TcpStream> = (0..150)
        .filter_map(|_| slow_large_body(&cordoner))
        .collect();
    println!(
        "{} slow connections opened in {:?}",
        held.len(),
        started.elapsed()
    );
    assert!(held.len() >= 100, "only {} connections", held.len());

    let firing = notification(&[("node-1", "firing", "fp")]);
    let flood = Instant::now();
    for _ in 0..5_000 {
        let (status, _) = cordoner.post(&firing, Some("Bearer wrong"));
        assert_eq!(status, 401);
    }
    println!("5,000 unauthenticated calls in {:?}", flood.elapsed());
    assert!(api.requests().is_empty(), "no API call for a rejected one");

    let (status, body) = cordoner.notify(&firing);
    assert_eq!(status, 200, "Alertmanager gets through: {body}");
    let rss = status_kib(cordoner.pid(), "VmRSS:");
    let peak = status_kib(cordoner.pid(), "VmHWM:");
    println!(
        "cordoner RSS {rss} KiB, peak {peak} KiB, with {} connections held",
        held.len()
    );
    assert!(peak < RSS_LIMIT_KIB, "peak RSS {peak} KiB");

    let warnings = cordoner
        .logs()
        .lines()
        .filter(|l| l.contains("without the right bearer token"))
        .count();
    println!("{warnings} warning lines for 5,000 rejected calls");
    assert!(warnings <= 3, "{warnings} warning lines");
    let unauthorized = metric_value(
        &cordoner.metrics(),
        "hangwatch_cordoner_webhook_requests_total",
        &[("result", "unauthorized")],
    )
    .unwrap_or(0.0);
    assert!(
        unauthorized >= 5_000.0,
        "every rejected call is counted: {unauthorized}"
    );
    drop(held);
}

/// A v4 notification of `count` distinct firing cordon alerts for `node`, kept compact so
/// that it fits the 1 MiB body limit.
fn many_alerts(node: &str, count: usize) -> String {
    let alerts: Vec<String> = (0..count)
        .map(|i| {
            format!(
                r#"{{"status":"firing","labels":{{"node":"{node}","hangwatch_action":"cordon"}},"fingerprint":"{i:x}"}}"#
            )
        })
        .collect();
    format!(r#"{{"version":"4","alerts":[{}]}}"#, alerts.join(","))
}

#[test]
fn ten_thousand_alerts_for_one_node_take_a_handful_of_api_calls() {
    let dir = TempDir::new("cordoner-many-alerts");
    let api = FakeApiServer::start(&["node-1", "node-2", "node-3"]);
    let cordoner = Cordoner::start(&api, dir.path(), &["--max-cordoned-percent", "50"]);
    let body = many_alerts("node-1", 10_000);
    assert!(body.len() < 1024 * 1024, "{} bytes", body.len());
    let started = Instant::now();
    let (status, reply) = cordoner.notify(&body);
    assert_eq!(status, 200, "{reply}");
    let calls = api.requests().len();
    println!(
        "10,000 alerts for one node: {calls} API calls, answered in {:?}",
        started.elapsed()
    );
    assert!(calls <= 5, "{calls} API calls");
    let node = api.node("node-1");
    assert_eq!(node["spec"]["unschedulable"], true);
    let held = node["metadata"]["annotations"]["hangwatch.io/cordon-alerts"]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .count();
    assert_eq!(held, 10_000, "every alert holds the cordon");

    // Resolving them all is one release.
    let resolved = body.replace(r#""status":"firing""#, r#""status":"resolved""#);
    let (status, reply) = cordoner.notify(&resolved);
    assert_eq!(status, 200, "{reply}");
    let calls = api.requests().len() - calls;
    assert!(calls <= 3, "{calls} API calls to release");
    wait_for("the node uncordoned", Duration::from_secs(5), || {
        (api.node("node-1")["spec"]["unschedulable"] != true).then_some(())
    });
}
