//! `vcpu-controller demo`: simulated agents served over real gRPC on loopback, with the controller balancing them.
//! Prints each round as a table of pCPU bars, stops once every host has been balanced and stable for a few rounds,
//! and sums up. This is the quick start: it needs no hypervisor.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::controller::host::LoopConfig;
use crate::controller::policy::PolicyConfig;
use crate::controller::report::{ActionType, RoundReport};
use crate::controller::show::bar;
use crate::hypervisor::sim::{scenario, MonotonicClock, SimHypervisor};

/// Default interval of the demo: short, so it finishes in seconds (the simulator measures exactly, so short
/// windows are as good as long ones).
pub const DEFAULT_DEMO_INTERVAL: Duration = Duration::from_millis(400);
/// Rounds a host must stay balanced with no pin change before the demo calls it done.
pub const STABLE_ROUNDS: u32 = 3;
/// The demo gives up after this many rounds.
pub const DEFAULT_DEMO_MAX_ROUNDS: u64 = 60;
/// The built-in scenarios the demo runs, one simulated host each.
pub const DEMO_SCENARIOS: &[&str] = &["all-on-one", "heavy-light-unpinned", "split-first-last"];
/// Deadline of each RPC in the demo (loopback).
const DEMO_RPC_TIMEOUT: Duration = Duration::from_millis(500);

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub interval: Duration,
    pub policy: PolicyConfig,
    pub max_rounds: u64,
    pub scenarios: Vec<String>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            interval: DEFAULT_DEMO_INTERVAL,
            policy: PolicyConfig::default(),
            max_rounds: DEFAULT_DEMO_MAX_ROUNDS,
            scenarios: DEMO_SCENARIOS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// How one host did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostOutcome {
    pub scenario: String,
    /// Round at which the final balanced stretch began.
    pub balanced_at: Option<u64>,
    pub stable_rounds: u32,
    pub moves: u64,
    pub pin_changes: u64,
    pub final_spread: Option<f64>,
    pub errors: u64,
}

impl HostOutcome {
    pub fn done(&self) -> bool {
        self.stable_rounds >= STABLE_ROUNDS
    }

    fn record(&mut self, r: &RoundReport, threshold: f64) {
        if r.pins_applied > 0 {
            self.moves += r.moves.len() as u64;
        }
        self.pin_changes += r.pins_applied as u64;
        if r.action.kind == ActionType::Error {
            self.errors += 1;
        }
        match r.spread {
            Some(s) => {
                self.final_spread = Some(s);
                if s <= threshold && r.pins_applied == 0 && r.action.kind == ActionType::None {
                    if self.stable_rounds == 0 {
                        self.balanced_at = Some(r.round);
                    }
                    self.stable_rounds += 1;
                } else {
                    self.stable_rounds = 0;
                    self.balanced_at = None;
                }
            }
            None if r.action.kind == ActionType::Error => {
                self.stable_rounds = 0;
                self.balanced_at = None;
            }
            None => {}
        }
    }
}

/// One round of one host as the demo prints it.
pub fn render_round(r: &RoundReport, label: &str) -> String {
    let mut s = format!("[round {:>2}] {:<28}", r.round, format!("{} ({label})", r.host));
    match r.action.kind {
        ActionType::Baseline => s.push_str(" baseline: first sample\n"),
        ActionType::Error => s.push_str(&format!(" error: {}\n", r.action.reason)),
        ActionType::None | ActionType::Move => {
            s.push_str(&format!(" spread {:>5.1}", r.spread.unwrap_or(0.0)));
            if r.action.kind == ActionType::Move {
                let moves: Vec<String> =
                    r.moves.iter().map(|m| format!("{} vCPU {}: pCPU {} -> {}", m.domain, m.vcpu, m.from, m.to)).collect();
                s.push_str(&format!("  move {}", moves.join(", ")));
            } else if r.pins_applied > 0 {
                s.push_str("  no move");
            } else {
                s.push_str("  balanced");
            }
            if r.pins_applied > 0 {
                s.push_str(&format!(" ({} pins applied)", r.pins_applied));
            }
            s.push('\n');
            for p in &r.pcpus {
                let on: Vec<&str> = r.vcpus.iter().filter(|v| v.pcpu == p.id).map(|v| &*v.domain).collect();
                s.push_str(&format!("      pCPU {} |{}| {:>5.1}%  {}\n", p.id, bar(p.usage), p.usage, on.join(" ")));
            }
        }
    }
    s
}

/// Runs the demo, writing rounds and a summary to `out`. Returns each host's outcome; `Err` if the simulated
/// agents could not start.
pub async fn run_demo<W: Write + Send>(
    cfg: DemoConfig,
    out: &mut W,
) -> anyhow::Result<BTreeMap<String, HostOutcome>> {
    let agents_down = CancellationToken::new();
    let clock = Arc::new(MonotonicClock::new());
    let mut hosts = Vec::new();
    let mut labels = BTreeMap::new();
    let mut servers = tokio::task::JoinSet::new();
    for (i, name) in cfg.scenarios.iter().enumerate() {
        let sc = scenario::builtin(name)
            .ok_or_else(|| anyhow::anyhow!("unknown built-in scenario {name:?} (have: {})", builtin_names()))?;
        let hostname = format!("sim-{}", (b'a' + (i % 26) as u8) as char);
        let hv = Arc::new(SimHypervisor::new(&sc, hostname.clone(), clock.clone()));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let stop = agents_down.clone();
        servers.spawn(async move { crate::agent::serve(hv, listener, stop.cancelled_owned()).await });
        writeln!(out, "simulated host {hostname} at {addr}: scenario {name} ({} pCPUs, {} domains)", sc.pcpus, sc.domains.len())?;
        labels.insert(addr.clone(), (hostname, name.clone()));
        hosts.push(addr);
    }
    writeln!(out, "controller: interval {:?}, threshold {}, policy {}\n", cfg.interval, cfg.policy.threshold, cfg.policy.kind)?;

    let loop_cfg = LoopConfig { interval: cfg.interval, policy: cfg.policy.clone(), dry_run: false, rounds: Some(cfg.max_rounds), ..Default::default() };
    let (tx, mut rx) = crate::controller::report_channel(hosts.len());
    let stop_controller = CancellationToken::new();
    let controller = tokio::spawn(crate::controller::run(hosts.clone(), DEMO_RPC_TIMEOUT, loop_cfg, tx, stop_controller.clone()));
    let mut outcomes: BTreeMap<String, HostOutcome> = labels
        .values()
        .map(|(h, sc)| (h.clone(), HostOutcome { scenario: sc.clone(), ..Default::default() }))
        .collect();
    while let Some(r) = rx.recv().await {
        let (hostname, sc) = labels.get(&r.host).cloned().unwrap_or_else(|| (r.host.clone(), String::new()));
        let mut shown = r.clone();
        shown.host.clone_from(&hostname);
        write!(out, "{}", render_round(&shown, &sc))?;
        if let Some(o) = outcomes.get_mut(&hostname) {
            o.record(&r, cfg.policy.threshold);
        }
        if outcomes.values().all(HostOutcome::done) {
            stop_controller.cancel();
        }
    }
    controller.await??;
    agents_down.cancel();
    while servers.join_next().await.is_some() {}

    writeln!(out, "\nsummary")?;
    for (h, o) in &outcomes {
        match o.balanced_at {
            Some(at) if o.done() => writeln!(
                out,
                "  {h} ({}): balanced at round {at} (spread {:.1}), {} moves, {} pin changes, stable for {} rounds",
                o.scenario, o.final_spread.unwrap_or(0.0), o.moves, o.pin_changes, o.stable_rounds
            )?,
            _ => writeln!(
                out,
                "  {h} ({}): NOT balanced after {} rounds (spread {:.1}), {} moves, {} pin changes",
                o.scenario, cfg.max_rounds, o.final_spread.unwrap_or(f64::NAN), o.moves, o.pin_changes
            )?,
        }
    }
    Ok(outcomes)
}

/// Names of the built-in scenarios, for messages.
pub fn builtin_names() -> String {
    scenario::BUILTIN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}
