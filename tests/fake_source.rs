//! A new source is one module and one registration line: a small fake source, written here
//! and nowhere else, shows up in `/metrics`, `/status`, its own endpoint and `check`.
//! No daemon and no root needed.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

use hangwatch::config::{Config, RuntimeMode};
use hangwatch::engine::Engine;
use hangwatch::heartbeat::Heartbeats;
use hangwatch::http::{Readers, router};
use hangwatch::signal::{Payload, Signal};
use hangwatch::sources::{
    CheckFindings, CheckRun, Context, Detector, Now, Section, Source, SourceState, json_of,
    registered,
};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// The fake source: a "thermometer" whose readings above 90 are a problem.
mod thermometer {
    use super::*;

    pub const NAME: &str = "thermometer";

    /// Its payload: one reading.
    #[derive(Debug)]
    pub struct Reading(pub i64);

    pub struct ThermometerSource;

    impl Source for ThermometerSource {
        fn name(&self) -> &'static str {
            NAME
        }

        fn state(
            &self,
            _config: &Arc<Config>,
            registry: &mut Registry,
            _now: Now,
        ) -> Option<Box<dyn SourceState>> {
            let gauge = Gauge::default();
            registry.register(
                "hangwatch_test_temperature",
                "The fake source's last reading",
                gauge.clone(),
            );
            Some(Box::new(Thermometer {
                gauge,
                last: None,
                changed: true,
            }))
        }

        fn detectors(&self, _config: &Arc<Config>) -> Vec<Box<dyn Detector>> {
            Vec::new()
        }

        fn check(&self, _config: &Arc<Config>) -> Option<CheckRun> {
            Some(Box::pin(async {
                CheckFindings {
                    signals: vec![Signal::source(NAME, Reading(95))],
                    unchecked: Vec::new(),
                }
            }))
        }
    }

    struct Thermometer {
        gauge: Gauge,
        last: Option<i64>,
        changed: bool,
    }

    impl SourceState for Thermometer {
        fn apply(&mut self, payload: Payload, _cx: &mut Context) {
            if let Ok(Reading(value)) = payload.downcast::<Reading>() {
                self.gauge.set(value);
                self.last = Some(value);
                self.changed = true;
            }
        }

        fn section(&mut self, _now: Now) -> Option<Arc<dyn Section>> {
            std::mem::take(&mut self.changed)
                .then(|| Arc::new(ThermometerSection { degrees: self.last }) as Arc<dyn Section>)
        }
    }

    #[derive(Debug, Serialize)]
    pub struct ThermometerSection {
        pub degrees: Option<i64>,
    }

    impl Section for ThermometerSection {
        fn key(&self) -> &'static str {
            "thermometer"
        }

        fn to_json(&self) -> serde_json::Value {
            json_of(self)
        }

        fn endpoint(&self) -> Option<(&'static str, serde_json::Value)> {
            Some(("/thermometer", self.to_json()))
        }

        fn problems(&self, _now: SystemTime) -> Vec<String> {
            self.degrees
                .filter(|d| *d > 90)
                .map(|d| format!("thermometer reads {d}"))
                .into_iter()
                .collect()
        }

        fn render_check(&self, out: &mut String, _now: SystemTime) {
            out.push_str(&format!("\nThermometer\n  {:?} degrees\n", self.degrees));
        }
    }
}

/// The registration list with the fake added: the one line a new source needs.
fn sources() -> Vec<Box<dyn Source>> {
    let mut sources = registered();
    sources.push(Box::new(thermometer::ThermometerSource));
    sources
}

/// Nothing real to watch: no runtime sockets, no kernel log, no /proc scan, no stops.
fn quiet_config(dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.docker.mode = RuntimeMode::Disabled;
    config.containerd.mode = RuntimeMode::Disabled;
    config.cri.mode = RuntimeMode::Disabled;
    config.kernel_log.enabled = false;
    config.proc_scan.enabled = false;
    config.lifecycle.enabled = false;
    config.state_dir = dir.to_path_buf();
    config.metrics.node_label = false;
    config
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("hangwatch-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

async fn get(readers: &Readers, path: &str) -> (u16, String) {
    let reply = router(readers.clone())
        .oneshot(Request::get(path).body(Body::empty()).expect("request"))
        .await
        .expect("reply");
    let status = reply.status().as_u16();
    let body = reply.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_registered_fake_source_is_in_metrics_status_and_its_endpoint() {
    let dir = temp_dir("fake-source");
    let config = Arc::new(quiet_config(&dir));
    let sources = sources();
    let (mut engine, snapshot) = Engine::new(config, &sources, None, Vec::new(), Now::read());
    engine.apply(
        Signal::source(thermometer::NAME, thermometer::Reading(42)),
        Now::read(),
    );
    engine.evaluate(Now::read());
    let readers = Readers {
        metrics: engine.metrics(),
        snapshot,
        heartbeats: Heartbeats::default(),
    };

    let (status, metrics) = get(&readers, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("hangwatch_test_temperature 42"),
        "{metrics}"
    );

    let (status, body) = get(&readers, "/status").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(json["thermometer"]["degrees"], 42, "{json}");
    assert!(
        json["runtimes"].is_array(),
        "the real sections stay: {json}"
    );

    let (status, body) = get(&readers, "/thermometer").await;
    assert_eq!((status, body.as_str()), (200, r#"{"degrees":42}"#));
    assert_eq!(get(&readers, "/no-such-path").await.0, 404);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn check_runs_the_fake_source_one_shot_form_and_reports_its_problem() {
    let dir = temp_dir("fake-source-check");
    let report = hangwatch::check::run_sources(quiet_config(&dir), &sources()).await;
    assert_eq!(report.outcome.exit_code(), 1, "{report:?}");
    assert_eq!(report.problems, vec!["thermometer reads 95".to_string()]);
    let text = report.render_text();
    assert!(text.contains("Thermometer\n  Some(95) degrees"), "{text}");
    let json = serde_json::to_value(&report).expect("check JSON");
    assert_eq!(json["snapshot"]["thermometer"]["degrees"], 95, "{json}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn without_the_registration_line_the_source_is_nowhere() {
    let dir = temp_dir("fake-source-absent");
    let report = hangwatch::check::run_sources(quiet_config(&dir), &registered()).await;
    assert_eq!(report.outcome.exit_code(), 0, "{report:?}");
    let json = serde_json::to_value(&report).expect("check JSON");
    assert!(json["snapshot"].get("thermometer").is_none(), "{json}");
    std::fs::remove_dir_all(&dir).ok();
}
