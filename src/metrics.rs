//! Prometheus metrics of both binaries (OpenMetrics text on `GET /metrics`), built on `prometheus-client`.
//!
//! Every name starts with [`PREFIX`]. The controller's metrics are fed from the `RoundReport`s its host tasks
//! produce (one place, so the status page, `--json` and the metrics never disagree) and from its gRPC client; the
//! agent's come from a tower layer around its gRPC server ([`crate::agent::metrics_layer`]) and from
//! [`crate::hypervisor::instrumented::Instrumented`] at the `Hypervisor` trait boundary.
//!
//! Label sets stay bounded: hosts come from the operator's host list and pCPU ids from the hosts; methods, codes
//! and hypervisor operations are fixed sets. Domains are never labels (they come and go and would grow the series
//! without bound).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::controller::report::{ActionType, RoundReport};

/// Prefix of every metric name.
pub const PREFIX: &str = "vcpu_balancer";
/// Content type of the OpenMetrics text format that `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Smallest latency bucket: a loopback RPC or an in-memory simulator call.
const LATENCY_BUCKET_START_S: f64 = 0.0005;
/// Each latency bucket is this many times the previous one.
const LATENCY_BUCKET_FACTOR: f64 = 2.0;
/// Number of latency buckets: 0.5 ms .. ~16 s, past every RPC deadline the controller uses.
const LATENCY_BUCKET_COUNT: u16 = 16;

/// Histogram constructor shared by every latency metric.
#[derive(Clone, Copy)]
pub struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(LATENCY_BUCKET_START_S, LATENCY_BUCKET_FACTOR, LATENCY_BUCKET_COUNT))
    }
}

type FloatGauge = Gauge<f64, AtomicU64>;
type LatencyFamily<L> = Family<L, Histogram, LatencyBuckets>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PcpuLabels {
    pub host: String,
    pub pcpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoundLabels {
    pub host: String,
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientRpcLabels {
    pub host: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientRpcErrorLabels {
    pub host: String,
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodCodeLabels {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HypervisorLabels {
    pub backend: String,
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HypervisorErrorLabels {
    pub backend: String,
    pub operation: String,
    pub kind: String,
}

/// Writes `registry` in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut s, registry);
    s
}

/// The controller's metrics.
pub struct ControllerMetrics {
    registry: Registry,
    pcpu_usage: Family<PcpuLabels, FloatGauge>,
    spread: Family<HostLabels, FloatGauge>,
    at_best: Family<HostLabels, Gauge>,
    host_up: Family<HostLabels, Gauge>,
    rounds: Family<RoundLabels, Counter>,
    moves: Family<HostLabels, Counter>,
    deferred_moves: Family<HostLabels, Counter>,
    pins_applied: Family<HostLabels, Counter>,
    pins_failed: Family<HostLabels, Counter>,
    round_duration: LatencyFamily<HostLabels>,
    rpc_duration: LatencyFamily<ClientRpcLabels>,
    rpc_errors: Family<ClientRpcErrorLabels, Counter>,
    hosts_configured: Gauge,
    /// The pCPUs each host has a `pcpu_usage` gauge for: those of a pCPU gone offline, or of a host removed, are
    /// dropped, which the metrics alone cannot do (a family does not list its labels).
    pcpus_shown: std::sync::Mutex<std::collections::HashMap<String, Vec<u32>>>,
}

impl ControllerMetrics {
    pub fn new() -> Arc<ControllerMetrics> {
        let mut registry = Registry::with_prefix(PREFIX);
        let m = ControllerMetrics {
            pcpu_usage: Family::default(),
            spread: Family::default(),
            at_best: Family::default(),
            host_up: Family::default(),
            rounds: Family::default(),
            moves: Family::default(),
            deferred_moves: Family::default(),
            pins_applied: Family::default(),
            pins_failed: Family::default(),
            round_duration: Family::new_with_constructor(LatencyBuckets),
            rpc_duration: Family::new_with_constructor(LatencyBuckets),
            rpc_errors: Family::default(),
            hosts_configured: Gauge::default(),
            pcpus_shown: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "pcpu_usage_percent",
            "Usage of one pCPU over the last round, in % of the pCPU (sum of its vCPUs)",
            m.pcpu_usage.clone(),
        );
        registry.register(
            "host_spread_percent",
            "Busiest minus freest pCPU usage of a host in the last computed round, in points",
            m.spread.clone(),
        );
        registry.register(
            "host_at_best",
            "1 if the policy holds the host over the threshold at the best it found: no plan balances it",
            m.at_best.clone(),
        );
        registry.register(
            "host_up",
            "1 if the host's last round succeeded; 0 if it was an error (agent unreachable, or its pins refused)",
            m.host_up.clone(),
        );
        registry.register("rounds", "Rounds done, by host and action (baseline, none, move, error)", m.rounds.clone());
        registry.register("moves", "vCPU moves decided by the policy", m.moves.clone());
        registry.register(
            "deferred_moves",
            "vCPU moves of the policy's plans that --max-moves left for later rounds",
            m.deferred_moves.clone(),
        );
        registry.register("pins_applied", "Pins the agents applied", m.pins_applied.clone());
        registry.register("pins_failed", "Pins the agents refused", m.pins_failed.clone());
        registry.register(
            "round_duration_seconds",
            "Time one round took on one host: GetStats, decision and ApplyPins",
            m.round_duration.clone(),
        );
        registry.register(
            "controller_rpc_duration_seconds",
            "Latency of the controller's RPCs to agents, by host and method",
            m.rpc_duration.clone(),
        );
        registry.register(
            "controller_rpc_errors",
            "Failed RPCs to agents, by host, method and gRPC code",
            m.rpc_errors.clone(),
        );
        registry.register("hosts_configured", "Hosts the controller currently balances", m.hosts_configured.clone());
        Arc::new(ControllerMetrics { registry, ..m })
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }

    /// Accounts one round's report.
    pub fn observe_round(&self, r: &RoundReport) {
        let host = HostLabels { host: r.host.clone() };
        let action = format!("{:?}", r.action.kind).to_lowercase();
        self.rounds.get_or_create(&RoundLabels { host: r.host.clone(), action }).inc();
        self.host_up.get_or_create(&host).set(i64::from(r.action.kind != ActionType::Error));
        // A round that failed without a reading (the agent unreachable, or in backoff): the last usage is stale, and
        // left in place it reads as live on dashboards and keeps usage alerts firing for a host nobody measures.
        if r.action.kind == ActionType::Error && r.pcpus.is_empty() && r.spread.is_none() {
            self.drop_usage(&r.host);
        }
        if let Some(d) = r.duration {
            self.round_duration.get_or_create(&host).observe(d.as_secs_f64());
        }
        if let Some(s) = r.spread {
            self.spread.get_or_create(&host).set(s);
            self.at_best.get_or_create(&host).set(i64::from(r.at_best));
        }
        for p in &r.pcpus {
            self.pcpu_usage.get_or_create(&PcpuLabels { host: r.host.clone(), pcpu: p.id.to_string() }).set(p.usage);
        }
        if !r.pcpus.is_empty() {
            let mut shown = self.pcpus_shown.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Usually a known host with the same pCPUs as last round: one lookup (no key to allocate), one
            // comparison, nothing to drop.
            let was = match shown.get_mut(&r.host) {
                Some(was) => was,
                None => shown.entry(r.host.clone()).or_default(),
            };
            if !was.iter().copied().eq(r.pcpus.iter().map(|p| p.id)) {
                for gone in was.iter().filter(|id| !r.pcpus.iter().any(|p| p.id == **id)) {
                    self.pcpu_usage.remove(&PcpuLabels { host: r.host.clone(), pcpu: gone.to_string() });
                }
                *was = r.pcpus.iter().map(|p| p.id).collect();
            }
        }
        // Per vCPU: `converge` moves several in a round.
        if !r.moves.is_empty() {
            self.moves.get_or_create(&host).inc_by(r.moves.len() as u64);
        }
        if r.deferred_moves > 0 {
            self.deferred_moves.get_or_create(&host).inc_by(r.deferred_moves as u64);
        }
        self.pins_applied.get_or_create(&host).inc_by(r.pins_applied as u64);
        self.pins_failed.get_or_create(&host).inc_by(r.pins_failed.len() as u64);
    }

    /// Accounts one RPC; `code` is `None` on success.
    pub fn observe_rpc(&self, host: &str, method: &str, took: Duration, code: Option<tonic::Code>) {
        self.rpc_duration
            .get_or_create(&ClientRpcLabels { host: host.to_string(), method: method.to_string() })
            .observe(took.as_secs_f64());
        if let Some(c) = code {
            self.rpc_errors
                .get_or_create(&ClientRpcErrorLabels {
                    host: host.to_string(),
                    method: method.to_string(),
                    code: code_name(c),
                })
                .inc();
        }
    }

    /// How many hosts the controller balances now (changes on reload).
    pub fn set_hosts_configured(&self, n: usize) {
        self.hosts_configured.set(n as i64);
    }

    /// Drops the gauges of a host that left the host list, so dashboards do not show its last values forever.
    /// Counters stay: they are cumulative and Prometheus handles series that stop.
    pub fn forget_host(&self, host: &str) {
        self.host_up.remove(&HostLabels { host: host.to_string() });
        self.drop_usage(host);
    }

    /// Drops the gauges of `host`'s last reading: spread, at-best and every pCPU's usage.
    fn drop_usage(&self, host: &str) {
        let h = HostLabels { host: host.to_string() };
        self.spread.remove(&h);
        self.at_best.remove(&h);
        let pcpus = self.pcpus_shown.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(host);
        for p in pcpus.unwrap_or_default() {
            self.pcpu_usage.remove(&PcpuLabels { host: host.to_string(), pcpu: p.to_string() });
        }
    }
}

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    rpc_duration: LatencyFamily<MethodLabels>,
    rpc_errors: Family<MethodCodeLabels, Counter>,
    hv_duration: LatencyFamily<HypervisorLabels>,
    hv_errors: Family<HypervisorErrorLabels, Counter>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl AgentMetrics {
    pub fn new() -> Arc<AgentMetrics> {
        let mut registry = Registry::with_prefix(PREFIX);
        let rpc_duration = Family::new_with_constructor(LatencyBuckets);
        let rpc_errors = Family::<MethodCodeLabels, Counter>::default();
        let hv_duration = Family::new_with_constructor(LatencyBuckets);
        let hv_errors = Family::<HypervisorErrorLabels, Counter>::default();
        registry.register(
            "agent_rpc_duration_seconds",
            "Latency of the agent's gRPC calls as served, by method",
            rpc_duration.clone(),
        );
        registry.register("agent_rpc_errors", "gRPC calls the agent answered with an error, by method and code", rpc_errors.clone());
        registry.register(
            "hypervisor_call_duration_seconds",
            "Latency of calls into the hypervisor backend (libvirt or sim), by operation",
            hv_duration.clone(),
        );
        registry.register(
            "hypervisor_call_errors",
            "Failed calls into the hypervisor backend, by operation and error kind (kinds NotFound and InvalidArgument \
             are callers' mistakes, such as a pin to an unknown domain; Unavailable and Internal are the hypervisor's)",
            hv_errors.clone(),
        );
        Arc::new(AgentMetrics { registry, rpc_duration, rpc_errors, hv_duration, hv_errors })
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }

    /// Accounts one served RPC; `code` is `None` on success.
    pub fn observe_rpc(&self, method: &str, took: Duration, code: Option<tonic::Code>) {
        self.rpc_duration.get_or_create(&MethodLabels { method: method.to_string() }).observe(took.as_secs_f64());
        if let Some(c) = code {
            self.rpc_errors.get_or_create(&MethodCodeLabels { method: method.to_string(), code: code_name(c) }).inc();
        }
    }

    /// Accounts one hypervisor call; `error_kind` is `None` on success.
    pub fn observe_hypervisor(&self, backend: &str, operation: &str, took: Duration, error_kind: Option<&str>) {
        self.hv_duration
            .get_or_create(&HypervisorLabels { backend: backend.to_string(), operation: operation.to_string() })
            .observe(took.as_secs_f64());
        if let Some(k) = error_kind {
            self.hv_errors
                .get_or_create(&HypervisorErrorLabels {
                    backend: backend.to_string(),
                    operation: operation.to_string(),
                    kind: k.to_string(),
                })
                .inc();
        }
    }

    /// Accounts one pin of a batch that the backend refused on its own (operation label `pin`).
    pub fn observe_hypervisor_pin_error(&self, backend: &str, kind: &str) {
        self.hv_errors
            .get_or_create(&HypervisorErrorLabels {
                backend: backend.to_string(),
                operation: "pin".to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }
}

/// The canonical upper-snake name of a gRPC code (`NOT_FOUND`), as Prometheus exporters of gRPC label it.
pub fn code_name(c: tonic::Code) -> String {
    let camel = format!("{c:?}");
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, ch) in camel.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    if c == tonic::Code::Ok {
        "OK".to_string()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::report::ActionReport;
    use crate::controller::usage::PcpuUsage;

    #[test]
    fn code_names_are_upper_snake() {
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(tonic::Code::Ok), "OK");
    }

    #[test]
    fn a_round_shows_up_in_the_exposition() {
        let m = ControllerMetrics::new();
        let mut r = RoundReport::bare("hv1:1", 2, ActionReport::simple(ActionType::Move, "why"), false);
        r.pcpus = vec![PcpuUsage { id: 3, usage: 42.5 }];
        r.spread = Some(17.0);
        r.at_best = true;
        let mv = |vcpu, to| crate::controller::policy::Move { domain: "vm".into(), uuid: "u".into(), vcpu, from: 0, to, usage: 20.0 };
        r.moves = vec![mv(0, 1), mv(1, 2)];
        r.deferred_moves = 3;
        r.pins_applied = 2;
        r.duration = Some(Duration::from_millis(3));
        m.observe_round(&r);
        m.observe_rpc("hv1:1", "GetStats", Duration::from_millis(1), Some(tonic::Code::Unavailable));
        let text = m.encode();
        for line in [
            r#"vcpu_balancer_pcpu_usage_percent{host="hv1:1",pcpu="3"} 42.5"#,
            r#"vcpu_balancer_host_spread_percent{host="hv1:1"} 17.0"#,
            r#"vcpu_balancer_host_at_best{host="hv1:1"} 1"#,
            r#"vcpu_balancer_host_up{host="hv1:1"} 1"#,
            r#"vcpu_balancer_rounds_total{host="hv1:1",action="move"} 1"#,
            r#"vcpu_balancer_moves_total{host="hv1:1"} 2"#,
            r#"vcpu_balancer_deferred_moves_total{host="hv1:1"} 3"#,
            r#"vcpu_balancer_pins_applied_total{host="hv1:1"} 2"#,
            r#"vcpu_balancer_round_duration_seconds_count{host="hv1:1"} 1"#,
            r#"vcpu_balancer_controller_rpc_errors_total{host="hv1:1",method="GetStats",code="UNAVAILABLE"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        // A pCPU that goes offline loses its gauge; the others keep theirs.
        r.pcpus = vec![PcpuUsage { id: 2, usage: 10.0 }];
        m.observe_round(&r);
        let text = m.encode();
        assert!(text.contains(r#"vcpu_balancer_pcpu_usage_percent{host="hv1:1",pcpu="2"} 10.0"#), "{text}");
        assert!(!text.contains(r#"pcpu="3""#), "the offline pCPU's gauge stayed: {text}");
        // A baseline (after an agent restart, say) has no usage yet: the gauges stay until the next reading.
        m.observe_round(&RoundReport::bare("hv1:1", 3, ActionReport::simple(ActionType::Baseline, "restarted"), false));
        assert!(m.encode().contains(r#"pcpu="2""#));
        // A host that could not be read: its last reading is stale, so it goes; `host_up` says why.
        m.observe_round(&RoundReport::bare("hv1:1", 4, ActionReport::simple(ActionType::Error, "down"), false));
        let text = m.encode();
        assert!(!text.contains("vcpu_balancer_pcpu_usage_percent{"), "{text}");
        assert!(!text.contains("vcpu_balancer_host_spread_percent{"), "{text}");
        assert!(!text.contains("vcpu_balancer_host_at_best{"), "{text}");
        assert!(text.contains(r#"vcpu_balancer_host_up{host="hv1:1"} 0"#), "{text}");
        // Read again: shown again.
        m.observe_round(&r);
        assert!(m.encode().contains(r#"pcpu="2""#));
        m.forget_host("hv1:1");
        let text = m.encode();
        assert!(!text.contains("vcpu_balancer_pcpu_usage_percent{"), "{text}");
        assert!(!text.contains("vcpu_balancer_host_up{"), "{text}");
        assert!(!text.contains("vcpu_balancer_host_at_best{"), "{text}");
    }
}
