//! The Grafana dashboard in packaging/ only queries metrics the binaries export: every `vcpu_balancer_*` name in
//! its queries must be a sample name of the controller's or the agent's exposition once each metric has a value.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use vcpu_balancer::controller::report::{ActionReport, ActionType, RoundReport};
use vcpu_balancer::controller::usage::PcpuUsage;
use vcpu_balancer::metrics::{AgentMetrics, ControllerMetrics};

const DASHBOARD: &str = include_str!("../packaging/grafana-dashboard.json");

/// Metric names of the samples in an OpenMetrics text.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_string())
        .collect()
}

/// `vcpu_balancer_*` identifiers in a PromQL expression.
fn referenced(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("vcpu_balancer_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let c = ControllerMetrics::new();
    let mut r = RoundReport::bare("h", 1, ActionReport::simple(ActionType::Move, "x"), false);
    r.pcpus = vec![PcpuUsage { id: 0, usage: 1.0 }];
    r.spread = Some(1.0);
    r.pins_applied = 1;
    r.pins_failed = vec!["refused".into()];
    r.duration = Some(Duration::from_millis(1));
    r.moves = vec![vcpu_balancer::controller::policy::Move {
        domain: "vm".into(),
        uuid: "u".into(),
        vcpu: 0,
        from: 0,
        to: 1,
        usage: 1.0,
    }];
    r.deferred_moves = 1;
    c.observe_round(&r);
    c.observe_rpc("h", "GetStats", Duration::from_millis(1), Some(tonic::Code::Unavailable));
    c.set_hosts_configured(1);
    let a: Arc<AgentMetrics> = AgentMetrics::new();
    a.observe_rpc("GetStats", Duration::from_millis(1), Some(tonic::Code::NotFound));
    a.observe_hypervisor("sim", "stats", Duration::from_millis(1), Some("Unavailable"));
    let mut exported = sample_names(&c.encode());
    exported.extend(sample_names(&a.encode()));

    let dash: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| referenced(e)).collect();
    assert!(used.len() >= 10, "the dashboard queries too little: {used:?}");
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "dashboard queries metrics nobody exports: {missing:?}\nexported: {exported:?}");
    // And the other way round: every exported metric family is on the dashboard.
    let family = |n: &str| {
        ["_bucket", "_sum", "_count", "_total"].iter().fold(n.to_string(), |s, suf| s.strip_suffix(suf).unwrap_or(&s).to_string())
    };
    let used_families: BTreeSet<String> = used.iter().map(|n| family(n)).collect();
    let unused: Vec<_> = exported.iter().map(|n| family(n)).filter(|f| !used_families.contains(f)).collect();
    assert!(unused.is_empty(), "exported but not on the dashboard: {unused:?}");
}
