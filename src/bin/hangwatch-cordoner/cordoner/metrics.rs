//! The cordoner's own metrics (a registry of its own: it runs as a Deployment, not per node).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub action: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub verb: &'static str,
    pub result: &'static str,
}

pub struct CordonerMetrics {
    registry: Registry,
    pub webhook_requests_total: Family<ResultLabels, Counter>,
    pub decisions_total: Family<DecisionLabels, Counter>,
    pub api_requests_total: Family<ApiLabels, Counter>,
    pub cordoned_nodes: Gauge,
    pub cordon_cap: Gauge,
}

impl CordonerMetrics {
    pub fn new(dry_run: bool) -> CordonerMetrics {
        let webhook_requests_total = Family::<ResultLabels, Counter>::default();
        let decisions_total = Family::<DecisionLabels, Counter>::default();
        let api_requests_total = Family::<ApiLabels, Counter>::default();
        let cordoned_nodes = Gauge::default();
        let cordon_cap = Gauge::default();
        let dry_run_gauge: Gauge = Gauge::default();
        dry_run_gauge.set(i64::from(dry_run));
        let mut registry = Registry::default();
        hangwatch::http::register_server_metrics(&mut registry);
        registry.register(
            "hangwatch_build",
            "hangwatch build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "hangwatch_cordoner_webhook_requests",
            "Webhook requests, by result (ok, unauthorized, bad_request, too_large, body_timeout, busy, api_error)",
            webhook_requests_total.clone(),
        );
        registry.register(
            "hangwatch_cordoner_decisions",
            "What was done for each alert, by action (cordon, release) and outcome",
            decisions_total.clone(),
        );
        registry.register(
            "hangwatch_cordoner_api_requests",
            "Kubernetes API requests, by verb and result (ok, conflict, not_found, timeout, error)",
            api_requests_total.clone(),
        );
        registry.register(
            "hangwatch_cordoner_cordoned_nodes",
            "Nodes hangwatch holds cordoned, as of the last node list",
            cordoned_nodes.clone(),
        );
        registry.register(
            "hangwatch_cordoner_cordon_cap",
            "How many nodes hangwatch may hold cordoned, as of the last node list",
            cordon_cap.clone(),
        );
        registry.register(
            "hangwatch_cordoner_dry_run",
            "1 when the cordoner only asks the API server to validate its patches",
            dry_run_gauge,
        );
        CordonerMetrics {
            registry,
            webhook_requests_total,
            decisions_total,
            api_requests_total,
            cordoned_nodes,
            cordon_cap,
        }
    }

    pub fn encode(&self) -> String {
        hangwatch::metrics::encode_registry(&self.registry)
    }

    pub fn decision(&self, action: &'static str, outcome: &'static str) {
        self.decisions_total
            .get_or_create(&DecisionLabels { action, outcome })
            .inc();
    }
}
