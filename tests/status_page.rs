//! The status page in a real headless browser (Debian's chromium, which `scripts/test` installs): a controller
//! balances simulated hosts, one host is down, and the page, once its JavaScript has polled `/api/state` a few
//! times, must show every host with a bar per pCPU, the down host in plain sight, the spread chart and the moves
//! with their reasons. A screenshot is kept in target/test-artifacts/status.png.
//!
//! Set VCPU_SKIP_BROWSER_TESTS=1 to skip on a machine without chromium (the test fails otherwise, so a missing
//! browser is never mistaken for a pass).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::SimAgent;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vcpu_balancer::controller::policy::PolicyConfig;
use vcpu_balancer::controller::report::ActionType;
use vcpu_balancer::controller::state::{ConfigView, StateStore};
use vcpu_balancer::controller::{self, LoopConfig, Observers};
use vcpu_balancer::metrics::ControllerMetrics;

const INTERVAL: Duration = Duration::from_millis(100);
const RPC_TIMEOUT: Duration = Duration::from_millis(500);
const SPEED: f64 = 20.0;
/// Virtual time the browser gets to run the page's JavaScript: several of its 1 s polls.
const VIRTUAL_TIME_BUDGET_MS: u32 = 3500;
/// Rounds each live host does before the browser looks, so there are moves and a chart to see.
const ROUNDS_BEFORE_LOOKING: usize = 15;

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("VCPU_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// Runs headless chromium on `url` with `extra` arguments, in a fresh profile; returns its stdout.
fn browse(browser: &PathBuf, url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}"),
        ])
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_hosts_bars_down_hosts_chart_and_decisions() {
    let Some(browser) = chromium() else {
        if std::env::var("VCPU_SKIP_BROWSER_TESTS").as_deref() == Ok("1") {
            eprintln!("SKIPPED: no chromium, and VCPU_SKIP_BROWSER_TESTS=1");
            return;
        }
        panic!("chromium not found: run scripts/test (it installs it), set VCPU_CHROMIUM, or VCPU_SKIP_BROWSER_TESTS=1");
    };
    let mut agents = Vec::new();
    for name in ["all-on-one", "split-first-last", "balanced"] {
        agents.push(SimAgent::start(&common::builtin(name), SPEED).await);
    }
    let dead = common::dead_address().await;
    let mut hosts: Vec<String> = agents.iter().map(|a| a.addr.clone()).collect();
    hosts.push(dead.clone());

    let state = StateStore::new(ConfigView { interval_ms: 100, threshold: 10.0, policy: "converge".into(), dry_run: false });
    let metrics = ControllerMetrics::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(vcpu_balancer::http::serve(
        listener,
        vcpu_balancer::http::status_router(state.clone(), Some(metrics.clone())),
        stop.clone().cancelled_owned(),
    ));
    let cfg = LoopConfig { interval: INTERVAL, policy: PolicyConfig::default(), dry_run: false, rounds: None, ..Default::default() };
    let (_reload_tx, reload_rx) = mpsc::channel(1);
    let (tx, mut rx) = controller::report_channel(hosts.len());
    let obs = Observers { state: Some(state.clone()), metrics: Some(metrics) };
    let ctl = tokio::spawn(controller::run_dynamic(hosts.clone(), controller::ClientSettings::plaintext(RPC_TIMEOUT), cfg, obs, reload_rx, tx, stop.clone()));
    // Let every live host do its rounds; the controller keeps balancing while the browser looks.
    let mut rounds = std::collections::BTreeMap::<String, usize>::new();
    let mut moved = false;
    while agents.iter().any(|a| rounds.get(&a.addr).copied().unwrap_or(0) < ROUNDS_BEFORE_LOOKING) {
        let r = rx.recv().await.unwrap();
        moved |= r.action.kind == ActionType::Move;
        *rounds.entry(r.host.clone()).or_default() += 1;
    }
    assert!(moved, "the scenarios need moves");
    // Keep draining reports so the host tasks never wait on a full channel.
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });

    let b = browser.clone();
    let u = url.clone();
    let dom = tokio::task::spawn_blocking(move || browse(&b, &u, &["--dump-dom".to_string()])).await.unwrap();

    // Every host has a card; the live ones have a bar per pCPU (4 each), the dead one is flagged.
    for a in &agents {
        assert!(dom.contains(&format!("data-host=\"{}\" data-up=\"true\"", a.addr)), "{} missing:\n{dom}", a.addr);
    }
    assert!(dom.contains(&format!("data-host=\"{dead}\" data-up=\"false\"")), "down host not flagged:\n{dom}");
    assert!(dom.contains(&format!("data-down-host=\"{dead}\"")), "down host not in the banner:\n{dom}");
    assert!(dom.contains(">DOWN<"), "no DOWN badge:\n{dom}");
    assert!(dom.matches("pcpu-bar").count() >= 3 * 4, "bars missing:\n{dom}");
    // The chart has a line per host that has a spread, and the decision list has moves with their reason.
    for a in &agents {
        assert!(dom.contains(&format!("data-series=\"{}\"", a.addr)), "no chart line for {}", a.addr);
    }
    assert!(dom.contains("<tr class=\"move\">"), "no move listed:\n{dom}");
    assert!(dom.contains("spread ") && dom.contains("&gt; 10.0: "), "no move reason:\n{dom}");
    // It updated by itself: several polls happened without a reload.
    let updates: u32 = dom
        .split("data-updates=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse().ok())
        .expect("data-updates on <body>");
    assert!(updates >= 2, "the page polled {updates} times");

    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("status.png");
    let _ = std::fs::remove_file(&png);
    let args = vec![format!("--screenshot={}", png.display()), "--window-size=1280,1000".to_string()];
    let u = url.clone();
    tokio::task::spawn_blocking(move || browse(&browser, &u, &args)).await.unwrap();
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    eprintln!("screenshot: {}", png.display());

    stop.cancel();
    ctl.await.unwrap().unwrap();
    drain.await.unwrap();
    server.await.unwrap().unwrap();
    for a in agents {
        a.stop().await;
    }
}
