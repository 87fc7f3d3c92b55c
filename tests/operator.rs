//! Operator features on simulated agents over loopback: reloading the host list (added hosts start, removed ones
//! stop, the others keep their baselines), the status page's JSON and the metrics over real HTTP, and the agent's
//! metrics at its gRPC and `Hypervisor` boundaries.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::SimAgent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vcpu_balancer::controller::policy::PolicyConfig;
use vcpu_balancer::controller::report::{ActionType, RoundReport};
use vcpu_balancer::controller::state::{ConfigView, StateStore};
use vcpu_balancer::controller::{self, LoopConfig, Observers};
use vcpu_balancer::metrics::{AgentMetrics, ControllerMetrics};

const INTERVAL: Duration = Duration::from_millis(100);
const RPC_TIMEOUT: Duration = Duration::from_millis(500);
/// Simulated seconds per real second.
const SPEED: f64 = 20.0;

/// A plain HTTP/1.1 GET: status line, headers and body as text.
pub async fn http_get(addr: &str, path: &str) -> (String, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).expect("utf-8 reply");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

/// Receives reports until `done` says so, collecting them per host.
async fn collect_until(
    rx: &mut mpsc::Receiver<RoundReport>,
    by_host: &mut BTreeMap<String, Vec<RoundReport>>,
    done: impl Fn(&BTreeMap<String, Vec<RoundReport>>) -> bool,
) {
    while !done(by_host) {
        // A guard against hanging on a host that stopped reporting, not a measure: a round is 100 ms.
        let r = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no report for 60 s; so far: {:?}", by_host.iter().map(|(h, r)| (h, r.len())).collect::<Vec<_>>()))
            .expect("controller still running");
        by_host.entry(r.host.clone()).or_default().push(r);
    }
}

fn count(m: &BTreeMap<String, Vec<RoundReport>>, h: &str) -> usize {
    m.get(h).map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_starts_added_hosts_stops_removed_ones_and_keeps_baselines() {
    let a = SimAgent::start(&common::builtin("split-first-last"), SPEED).await;
    let b = SimAgent::start(&common::builtin("balanced"), SPEED).await;
    let c = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let (ha, hb, hc) = (a.addr.clone(), b.addr.clone(), c.addr.clone());
    let state = StateStore::default();
    let metrics = ControllerMetrics::new();
    let obs = Observers { state: Some(state.clone()), metrics: Some(metrics.clone()) };
    let cfg = LoopConfig { interval: INTERVAL, policy: PolicyConfig::default(), dry_run: false, rounds: None, ..Default::default() };
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let (tx, mut rx) = controller::report_channel(3);
    let stop = CancellationToken::new();
    // a is given twice, written two ways: one agent, one task.
    let ctl = tokio::spawn(controller::run_dynamic(
        vec![ha.clone(), hb.clone(), format!("http://{ha}/")],
        controller::ClientSettings::plaintext(RPC_TIMEOUT),
        cfg,
        obs,
        reload_rx,
        tx,
        stop.clone(),
    ));
    let mut seen = BTreeMap::new();
    collect_until(&mut rx, &mut seen, |m| count(m, &ha) >= 3 && count(m, &hb) >= 3).await;

    // A list with an invalid address is refused whole: nothing changes.
    reload_tx.send(vec![ha.clone(), "h:99999".into()]).await.unwrap();
    let (a0, b0) = (count(&seen, &ha), count(&seen, &hb));
    collect_until(&mut rx, &mut seen, |m| count(m, &ha) >= a0 + 3 && count(m, &hb) >= b0 + 3).await;

    // b leaves, c joins; a, written another way now, is the same agent and keeps running.
    reload_tx.send(vec![format!(" http://{ha}"), hc.clone(), format!("{hc} ")]).await.unwrap();
    collect_until(&mut rx, &mut seen, |m| count(m, &hc) >= 3).await;
    let b_after = count(&seen, &hb);
    let a_now = count(&seen, &ha);
    collect_until(&mut rx, &mut seen, |m| count(m, &ha) >= a_now + 3 && count(m, &hc) >= 6).await;
    assert_eq!(count(&seen, &hb), b_after, "the removed host kept running");

    let snap = state.snapshot();
    let hosts: Vec<&str> = snap.hosts.iter().map(|h| h.host.as_str()).collect();
    let mut want = vec![ha.as_str(), hc.as_str()];
    want.sort_unstable();
    assert_eq!(hosts, want, "the state follows the host list");
    let text = metrics.encode();
    assert!(!text.contains(&format!("vcpu_balancer_host_up{{host=\"{hb}\"}}")), "{text}");
    assert!(text.contains(&format!("vcpu_balancer_host_up{{host=\"{hc}\"}} 1")), "{text}");
    assert!(text.contains("vcpu_balancer_hosts_configured 2"), "{text}");

    stop.cancel();
    ctl.await.unwrap().unwrap();
    while let Some(r) = rx.recv().await {
        seen.entry(r.host.clone()).or_default().push(r);
    }
    // a ran through both reloads without a new baseline: its rounds go on 1, 2, 3, ... with one baseline.
    assert_eq!(seen.keys().collect::<Vec<_>>(), [&ha, &hb, &hc].into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>(), "one task per agent, named as first given");
    let ra = &seen[&ha];
    assert!(ra.iter().enumerate().all(|(i, r)| r.round == i as u64 + 1), "a restarted: {ra:#?}");
    let baselines = ra.iter().filter(|r| r.action.kind == ActionType::Baseline).count();
    assert_eq!(baselines, 1, "a lost its baseline: {ra:#?}");
    assert!(ra.iter().all(|r| r.action.kind != ActionType::Error));
    assert_eq!(seen[&hc][0].action.kind, ActionType::Baseline, "an added host starts with a baseline");
    for s in [a, b, c] {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_api_and_metrics_over_http_show_moves_and_down_hosts() {
    let a = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let dead = common::dead_address().await;
    let state = StateStore::new(ConfigView { interval_ms: 100, threshold: 10.0, policy: "converge".into(), dry_run: false });
    let metrics = ControllerMetrics::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let server = tokio::spawn(vcpu_balancer::http::serve(
        listener,
        vcpu_balancer::http::status_router(state.clone(), Some(metrics.clone())),
        stop.clone().cancelled_owned(),
    ));
    let cfg = LoopConfig { interval: INTERVAL, policy: PolicyConfig::default(), dry_run: false, rounds: Some(12), ..Default::default() };
    let (_reload_tx, reload_rx) = mpsc::channel(1);
    let (tx, mut rx) = controller::report_channel(2);
    let obs = Observers { state: Some(state.clone()), metrics: Some(metrics.clone()) };
    let ctl = tokio::spawn(controller::run_dynamic(
        vec![a.addr.clone(), dead.clone()],
        controller::ClientSettings::plaintext(RPC_TIMEOUT),
        cfg,
        obs,
        reload_rx,
        tx,
        CancellationToken::new(),
    ));
    while rx.recv().await.is_some() {}
    ctl.await.unwrap().unwrap();

    let (status, headers, body) = http_get(&http, "/api/state").await;
    assert!(status.contains("200"), "{status}");
    assert!(headers.contains("application/json"), "{headers}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hosts = v["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2);
    let up = hosts.iter().find(|h| h["host"] == a.addr.as_str()).unwrap();
    let down = hosts.iter().find(|h| h["host"] == dead.as_str()).unwrap();
    assert_eq!(up["up"], true);
    assert_eq!(up["pcpus"].as_array().unwrap().len(), 4, "{up}");
    assert_eq!(down["up"], false);
    assert!(down["down_since_ms"].is_u64(), "{down}");
    assert!(!down["action"]["reason"].as_str().unwrap().is_empty());
    let decisions = v["decisions"].as_array().unwrap();
    assert!(decisions.iter().any(|d| d["action"]["type"] == "move" && d["host"] == a.addr.as_str()), "{decisions:#?}");
    assert!(decisions.iter().any(|d| d["action"]["type"] == "error" && d["host"] == dead.as_str()));
    assert!(v["spread_history"][&a.addr].as_array().unwrap().len() >= 5, "{}", v["spread_history"]);

    let (status, headers, body) = http_get(&http, "/metrics").await;
    assert!(status.contains("200"));
    assert!(headers.contains("application/openmetrics-text"), "{headers}");
    assert!(body.contains(&format!("vcpu_balancer_host_up{{host=\"{dead}\"}} 0")), "{body}");
    assert!(body.contains(&format!("vcpu_balancer_host_up{{host=\"{}\"}} 1", a.addr)), "{body}");
    assert!(body.contains(&format!("vcpu_balancer_rounds_total{{host=\"{}\",action=\"move\"}}", a.addr)), "{body}");
    assert!(body.contains(&format!("vcpu_balancer_controller_rpc_errors_total{{host=\"{dead}\",method=\"GetStats\",code=\"UNAVAILABLE\"}}")), "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");

    let (status, headers, body) = http_get(&http, "/").await;
    assert!(status.contains("200") && headers.contains("text/html"), "{status} {headers}");
    assert!(body.contains("/app.js") && body.contains("id=\"hosts\""));
    let (status, _, body) = http_get(&http, "/app.js").await;
    assert!(status.contains("200") && body.contains("/api/state"));
    let (status, _, _) = http_get(&http, "/nope").await;
    assert!(status.contains("404"), "{status}");
    stop.cancel();
    server.await.unwrap().unwrap();
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_count_rpcs_and_hypervisor_calls_with_their_errors() {
    use vcpu_balancer::hypervisor::instrumented::Instrumented;
    use vcpu_balancer::hypervisor::sim::{ScaledClock, SimHypervisor};
    use vcpu_balancer::pb;
    let m = AgentMetrics::new();
    let sim = Arc::new(SimHypervisor::new(&common::builtin("balanced"), "sim-m", Arc::new(ScaledClock::new(SPEED))));
    let hv = Arc::new(Instrumented::new(sim, "sim", m.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(vcpu_balancer::agent::serve_with_metrics(hv, listener, stop.clone().cancelled_owned(), Some(m.clone())));
    let mut c = pb::agent_client::AgentClient::connect(format!("http://{addr}")).await.unwrap();
    c.get_stats(pb::GetStatsRequest {}).await.unwrap();
    c.get_stats(pb::GetStatsRequest {}).await.unwrap();
    let e = c.get_vcpu_placement(pb::GetVcpuPlacementRequest { domain: "no-such-vm".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c.get_vcpu_placement(pb::GetVcpuPlacementRequest { domain: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let text = m.encode();
    for line in [
        r#"vcpu_balancer_agent_rpc_duration_seconds_count{method="GetStats"} 2"#,
        r#"vcpu_balancer_agent_rpc_errors_total{method="GetVcpuPlacement",code="NOT_FOUND"} 1"#,
        r#"vcpu_balancer_agent_rpc_errors_total{method="GetVcpuPlacement",code="INVALID_ARGUMENT"} 1"#,
        r#"vcpu_balancer_hypervisor_call_duration_seconds_count{backend="sim",operation="stats"} 2"#,
        r#"vcpu_balancer_hypervisor_call_errors_total{backend="sim",operation="placement",kind="NotFound"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }
    // The invalid request never reached the backend; health checks are not counted as Agent RPCs.
    assert!(!text.contains(r#"operation="placement",kind="InvalidArgument""#), "{text}");
    assert!(!text.contains("grpc.health"), "{text}");
    stop.cancel();
    server.await.unwrap().unwrap();
}
