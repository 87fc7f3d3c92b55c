//! The controller against simulated agents over real gRPC on loopback: every shipped scenario gets balanced and
//! then left alone, the balanced one is never touched, a host that is down stops nobody else, dry-run pins nothing,
//! and baselines are reset when a host or a domain restarts.
//!
//! Simulated clocks run faster than real time (the sim measures exactly, so short rounds lose nothing); no
//! assertion depends on how long anything took.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::SimAgent;
use tokio_util::sync::CancellationToken;
use vcpu_balancer::controller::policy::PolicyConfig;
use vcpu_balancer::controller::report::{ActionType, RoundReport};
use vcpu_balancer::controller::{self, LoopConfig};

const INTERVAL: Duration = Duration::from_millis(100);
const RPC_TIMEOUT: Duration = Duration::from_millis(500);
/// Simulated seconds per real second.
const SPEED: f64 = 20.0;

/// Runs the controller on `hosts` for `rounds` rounds and returns every report, per host, in round order.
async fn run(hosts: Vec<String>, rounds: u64, dry_run: bool) -> BTreeMap<String, Vec<RoundReport>> {
    let cfg = LoopConfig { interval: INTERVAL, policy: PolicyConfig::default(), dry_run, rounds: Some(rounds), ..Default::default() };
    let (tx, mut rx) = controller::report_channel(hosts.len());
    let ctl = tokio::spawn(controller::run(hosts, RPC_TIMEOUT, cfg, tx, CancellationToken::new()));
    let mut by_host: BTreeMap<String, Vec<RoundReport>> = BTreeMap::new();
    while let Some(r) = rx.recv().await {
        by_host.entry(r.host.clone()).or_default().push(r);
    }
    ctl.await.unwrap().unwrap();
    by_host
}

/// Index of the first round of a run of `n` balanced rounds with no pin change, if any.
fn settled_at(reports: &[RoundReport], threshold: f64, n: usize) -> Option<usize> {
    let ok = |r: &RoundReport| {
        r.action.kind == ActionType::None && r.pins_applied == 0 && r.spread.is_some_and(|s| s <= threshold)
    };
    (0..reports.len()).find(|&i| reports.len() >= i + n && reports[i..].iter().all(ok))
}

/// Every shipped scenario reaches spread <= threshold and then makes no pin change for at least 5 rounds; the
/// already-balanced one makes no pin change at all. All hosts run under one controller, concurrently. 35 rounds at
/// 100 ms with the simulated clock at 20x cover 70 simulated seconds: `changing-load` goes through two phase flips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_scenario_is_balanced_then_left_alone() {
    let mut agents = Vec::new();
    let mut names = BTreeMap::new();
    for (name, _) in vcpu_balancer::hypervisor::sim::scenario::BUILTIN {
        let a = SimAgent::start(&common::builtin(name), SPEED).await;
        names.insert(a.addr.clone(), *name);
        agents.push(a);
    }
    let reports = run(agents.iter().map(|a| a.addr.clone()).collect(), 35, false).await;
    assert_eq!(reports.len(), agents.len());
    for (addr, rs) in &reports {
        let name = names[addr.as_str()];
        assert_eq!(rs.len(), 35, "{name}: every round reported");
        assert_eq!(rs[0].action.kind, ActionType::Baseline, "{name}: first round only records");
        assert!(rs.iter().all(|r| r.action.kind != ActionType::Error), "{name}: no errors: {rs:#?}");
        let at = settled_at(rs, 10.0, 5).unwrap_or_else(|| panic!("{name} never settled: {:#?}", rs.last()));
        let last = rs.last().unwrap();
        assert!(last.spread.unwrap() <= 10.0, "{name}");
        // Settled means pinned: every vCPU ends on exactly one pCPU, which the next rounds keep.
        let total_pins: usize = rs.iter().map(|r| r.pins_applied).sum();
        if name == "balanced" {
            assert_eq!(total_pins, 0, "balanced scenario was touched: {rs:#?}");
            assert_eq!(at, 1, "balanced from the first computed round");
        } else {
            assert!(total_pins > 0, "{name}: something had to be pinned");
        }
    }
    // The agents agree: every vCPU of a non-balanced scenario is now pinned to a single pCPU.
    for a in &agents {
        for d in a.hv.with_host(|h, now| h.stats(now)) {
            for v in d.vcpus {
                assert_eq!(v.affinity, vec![v.pcpu], "{} {} vCPU {}", names[a.addr.as_str()], d.name, v.index);
            }
        }
    }
}

/// A host that is down is reported every round and does not stop the other host from being balanced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_host_does_not_stop_another() {
    let live = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let dead = common::dead_address().await;
    let reports = run(vec![dead.clone(), live.addr.clone()], 20, false).await;
    let d = &reports[&dead];
    assert_eq!(d.len(), 20);
    assert!(d.iter().all(|r| r.action.kind == ActionType::Error), "{d:#?}");
    assert!(d[0].action.reason.contains(&dead), "error names the host: {}", d[0].action.reason);
    assert!(d.iter().any(|r| r.action.reason.contains("backoff")), "repeated failures back off");
    let l = &reports[&live.addr];
    assert!(settled_at(l, 10.0, 5).is_some(), "{l:#?}");
}

/// --dry-run computes moves but pins nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_pins_nothing() {
    let a = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let before = a.hv.with_host(|h, now| h.stats(now));
    let reports = run(vec![a.addr.clone()], 6, true).await;
    let rs = &reports[&a.addr];
    assert!(rs.iter().filter(|r| r.action.kind == ActionType::Move).count() >= 4, "{rs:#?}");
    assert!(rs.iter().all(|r| r.pins_applied == 0 && r.dry_run));
    let after = a.hv.with_host(|h, now| h.stats(now));
    let aff = |s: &Vec<vcpu_balancer::model::DomainStats>| s.iter().map(|d| d.vcpus[0].affinity.clone()).collect::<Vec<_>>();
    assert_eq!(aff(&before), aff(&after));
}

/// A load that rises mid-run is rebalanced: the controller reacts to the change, not only to the start state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_change_is_rebalanced() {
    // Light phase: 40 vs 50, balanced. After 5 simulated seconds vm1 jumps from 10 % to 70 %: 100 vs 50.
    let sc = common::scenario(
        r#"
pcpus = 2
[[domain]]
name = "vm1"
affinity = [0]
phases = [ { load = 10, secs = 10 }, { load = 70, secs = 1000 } ]
[[domain]]
name = "vm2"
affinity = [0]
load = 30
[[domain]]
name = "vm3"
affinity = [1]
load = 30
[[domain]]
name = "vm4"
affinity = [1]
load = 20
"#,
    );
    let a = SimAgent::start(&sc, SPEED).await;
    let reports = run(vec![a.addr.clone()], 20, false).await;
    let rs = &reports[&a.addr];
    let first_move = rs.iter().position(|r| r.action.kind == ActionType::Move);
    let m = first_move.map(|i| &rs[i]).unwrap_or_else(|| panic!("no move after the load change: {rs:#?}"));
    // Before the change the host was balanced and nothing moved.
    let before: Vec<&RoundReport> = rs[..first_move.unwrap()].iter().filter(|r| r.spread.is_some()).collect();
    assert!(before.len() >= 2, "some balanced rounds before the change: {rs:#?}");
    assert!(before.iter().all(|r| r.spread.unwrap() <= 10.0 && r.action.kind == ActionType::None));
    // The full change is a spread of 50. A round whose window straddles the change (the simulated clock runs 20x
    // real time, so a busy machine stretches rounds) reads less; converge acts at once above twice the threshold,
    // and never below the threshold on exact readings.
    assert!(m.spread.unwrap() > 2.0 * 10.0, "{m:#?}");
    assert_eq!((m.action.domain.as_deref(), m.action.from, m.action.to), (Some("vm2"), Some(0), Some(1)));
    assert!(settled_at(rs, 10.0, 5).is_some(), "{rs:#?}");
}

/// An agent that goes away and comes back, and a domain that restarts: errors while down, then a fresh baseline,
/// and usage is never negative or above 100 % per vCPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_domain_restarts_get_fresh_baselines() {
    let a = SimAgent::start(&common::builtin("split-first-last"), SPEED).await;
    let addr = a.addr.clone();
    let hv = a.hv.clone();
    let cfg = LoopConfig { interval: INTERVAL, policy: PolicyConfig::default(), dry_run: false, rounds: Some(40), ..Default::default() };
    let (tx, mut rx) = controller::report_channel(1);
    let ctl = tokio::spawn(controller::run(vec![addr.clone()], RPC_TIMEOUT, cfg, tx, CancellationToken::new()));
    let mut rs = Vec::new();
    let mut agent = Some(a);
    while let Some(r) = rx.recv().await {
        let n = r.round;
        rs.push(r);
        if n == 6 {
            hv.with_host(|h, now| h.restart_domain("vm3", now)).unwrap();
        }
        if n == 10 {
            // The agent process goes away: its port closes.
            agent.take().unwrap().stop().await;
        }
        if n == 13 {
            // A new agent process on the same port: a new instance, so its clock is a new clock.
            agent = Some(SimAgent::start_with(hv.clone(), &addr).await);
        }
    }
    ctl.await.unwrap().unwrap();
    for r in &rs {
        for v in &r.vcpus {
            if let Some(u) = v.usage {
                assert!((0.0..=100.0).contains(&u), "round {}: {} usage {u}", r.round, v.domain);
            }
        }
    }
    // The restarted domain's next sampled round has no usage for it. The restart is made when round 6's report
    // arrives; on a busy machine round 7 may already have sampled, so the baseline is round 7 or 8.
    let after_restart = rs
        .iter()
        .filter(|r| (7..=8).contains(&r.round) && r.action.kind != ActionType::Error)
        .find(|r| r.vcpus.iter().any(|v| &*v.domain == "vm3" && v.usage.is_none()))
        .unwrap_or_else(|| panic!("no fresh baseline for vm3 in rounds 7-8: {rs:#?}"));
    let vm3: Vec<_> = after_restart.vcpus.iter().filter(|v| &*v.domain == "vm3").collect();
    assert!(vm3.iter().all(|v| v.usage.is_none()), "round {}: {vm3:?}", after_restart.round);
    // Down rounds are errors; the first successful round after is a baseline.
    let down: Vec<&RoundReport> = rs.iter().filter(|r| r.action.kind == ActionType::Error).collect();
    assert!(!down.is_empty(), "the outage was reported");
    let back = rs.iter().find(|r| r.round > down[0].round && r.action.kind != ActionType::Error).unwrap();
    assert_eq!(back.action.kind, ActionType::Baseline, "{back:#?}");
    assert!(settled_at(&rs, 10.0, 5).is_some(), "balanced again after the outage: {:#?}", rs.last());
    drop(agent);
}

/// Deadline for the fleet test: 40 hosts share 8 RPC slots on a 2-core machine that may be busy with other tests.
const FLEET_RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// One process serves a fleet of simulated hosts on consecutive ports (`vcpu-agent --sim-hosts`), and one
/// controller balances all of them concurrently with a small bound on RPCs in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_from_one_process() {
    const HOSTS: usize = 40;
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sc = common::builtin("all-on-one");
    let s = stop.clone();
    let fleet = tokio::spawn(async move {
        vcpu_balancer::agent::fleet::serve_sim_fleet(&sc, HOSTS, "127.0.0.1".parse().unwrap(), 0, s, |addrs| {
            tx.send(addrs.to_vec()).unwrap();
        })
        .await
    });
    let addrs: Vec<String> = rx.await.unwrap().iter().map(ToString::to_string).collect();
    assert_eq!(addrs.len(), HOSTS);
    let cfg = LoopConfig { interval: Duration::from_millis(200), rounds: Some(20), max_inflight: 8, ..Default::default() };
    let (tx, mut rx) = controller::report_channel(HOSTS);
    let ctl = tokio::spawn(controller::run(addrs.clone(), FLEET_RPC_TIMEOUT, cfg, tx, CancellationToken::new()));
    let mut by_host: BTreeMap<String, Vec<RoundReport>> = BTreeMap::new();
    while let Some(r) = rx.recv().await {
        by_host.entry(r.host.clone()).or_default().push(r);
    }
    ctl.await.unwrap().unwrap();
    assert_eq!(by_host.len(), HOSTS);
    for (h, rs) in &by_host {
        assert!(rs.iter().all(|r| r.action.kind != ActionType::Error), "{h}: {rs:#?}");
        assert!(rs.last().unwrap().spread.unwrap() <= 10.0, "{h} balanced: {:#?}", rs.last());
    }
    stop.cancel();
    fleet.await.unwrap().unwrap();
}

/// Rounds never pile up: a host whose rounds take longer than the interval skips the ticks it missed and says so,
/// while a fast host beside it keeps every tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_host_skips_ticks_and_says_so() {
    let slow = SimAgent::start(&common::builtin("balanced"), SPEED).await;
    slow.hv.set_latency(Duration::from_millis(250));
    let fast = SimAgent::start(&common::builtin("balanced"), SPEED).await;
    let cfg = LoopConfig { interval: INTERVAL, rounds: Some(8), ..Default::default() };
    let (tx, mut rx) = controller::report_channel(2);
    let ctl = tokio::spawn(controller::run(vec![slow.addr.clone(), fast.addr.clone()], Duration::from_secs(2), cfg, tx, CancellationToken::new()));
    let mut by_host: BTreeMap<String, Vec<RoundReport>> = BTreeMap::new();
    while let Some(r) = rx.recv().await {
        by_host.entry(r.host.clone()).or_default().push(r);
    }
    ctl.await.unwrap().unwrap();
    let s = &by_host[&slow.addr];
    assert!(s.iter().all(|r| r.action.kind != ActionType::Error), "slow but within its deadline: {s:#?}");
    assert!(s.iter().map(|r| r.skipped_ticks).sum::<u64>() >= 4, "{s:#?}");
    let f = &by_host[&fast.addr];
    assert!(f.iter().all(|r| r.skipped_ticks == 0), "{f:#?}");
}

/// Runs the controller with `policy` on one agent and returns its reports; `between` runs after each report.
async fn run_with(
    addr: &str,
    policy: PolicyConfig,
    rounds: u64,
    mut between: impl FnMut(&RoundReport),
) -> Vec<RoundReport> {
    let cfg = LoopConfig { interval: INTERVAL, policy, dry_run: false, rounds: Some(rounds), ..Default::default() };
    let (tx, mut rx) = controller::report_channel(1);
    let ctl = tokio::spawn(controller::run(vec![addr.to_string()], RPC_TIMEOUT, cfg, tx, CancellationToken::new()));
    let mut rs = Vec::new();
    while let Some(r) = rx.recv().await {
        between(&r);
        rs.push(r);
    }
    ctl.await.unwrap().unwrap();
    rs
}

/// Operator constraints over real gRPC, for every policy: an excluded domain keeps its pCPU and affinity, a
/// reserved pCPU ends empty and is never a pin target, and a vCPU pinned by hand mid-run stays where the
/// operator put it, and the decision log says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraints_are_honoured_over_grpc() {
    use vcpu_balancer::controller::policy::{Constraints, DomainMatcher, PolicyKind};
    use vcpu_balancer::model::PinRequest;
    for kind in PolicyKind::ALL {
        // All eight 40 % VMs on pCPU 0 (reserved); db-1 is excluded and must stay there, pinned to 0 as it is.
        let mut sc = common::builtin("all-on-one");
        sc.domains[0].name = "db-1".into();
        let a = SimAgent::start(&sc, SPEED).await;
        let policy = PolicyConfig {
            kind,
            threshold: 10.0,
            constraints: Constraints {
                exclude: vec![DomainMatcher::parse("db-*")],
                reserved: vec![0],
                override_manual: false,
                max_moves: None,
            },
        };
        let hv = a.hv.clone();
        let mut manual_done = false;
        let rs = run_with(&a.addr, policy, 30, |r| {
            // Once vm2 has been pinned by the controller, the operator pins it to pCPU 3 by hand.
            if !manual_done && r.round >= 12 {
                let p = hv.with_host(|h, _| h.placement("vm2")).unwrap();
                if p.vcpus[0].affinity.len() == 1 && p.vcpus[0].affinity != vec![3] {
                    let pin = PinRequest { domain: "vm2".into(), vcpu: 0, pcpus: vec![3], persist: false };
                    hv.with_host(|h, now| h.apply_pins(&[pin], now)).unwrap()[0].clone().unwrap();
                    manual_done = true;
                }
            }
        })
        .await;
        assert!(manual_done, "{kind}: vm2 was never pinned by the controller");
        assert!(rs.iter().all(|r| r.action.kind != ActionType::Error), "{kind}: {rs:#?}");
        for r in &rs {
            assert!(r.moves.iter().all(|m| m.to != 0 && m.domain != "db-1"), "{kind} round {}: {:?}", r.round, r.moves);
        }
        let stats = a.hv.with_host(|h, now| h.stats(now));
        for d in &stats {
            let v = &d.vcpus[0];
            match d.name.as_str() {
                "db-1" => assert_eq!((v.pcpu, v.affinity.clone()), (0, vec![0]), "{kind}: excluded domain touched"),
                "vm2" => assert_eq!(v.affinity, vec![3], "{kind}: manual pin undone"),
                _ => assert_ne!(v.pcpu, 0, "{kind}: {} left on reserved pCPU 0", d.name),
            }
        }
        let manual = rs.iter().filter(|r| r.held.iter().any(|h| h.domain == "vm2")).count();
        assert!(manual > 0, "{kind}: the reports never said vm2 was left alone");
        assert!(
            rs.iter().any(|r| r.action.reason.contains("pinned by someone else")),
            "{kind}: decision log does not say so"
        );
    }
}

/// `--max-moves` over real gRPC: on a host whose plan moves many vCPUs at once, no round moves more vCPUs than
/// allowed, neither in the reports nor on the agent (its placements are compared round to round), the decision
/// log says the plan was cut, and the host is balanced all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_moves_bounds_every_round_over_grpc() {
    use vcpu_balancer::controller::policy::PolicyKind;
    // Sixteen VMs on the first four of eight pCPUs: converge's first plans move several vCPUs each.
    let sc = common::scenario(include_str!("../scenarios/sixteen-on-eight.toml"));
    let a = SimAgent::start(&sc, SPEED).await;
    let mut policy = PolicyConfig::with_kind(PolicyKind::Converge);
    policy.constraints.max_moves = std::num::NonZeroUsize::new(2);
    let hv = a.hv.clone();
    let placement = move || -> BTreeMap<String, u32> {
        hv.with_host(|h, now| h.stats(now)).into_iter().map(|d| (d.name, d.vcpus[0].pcpu)).collect()
    };
    let mut before = placement();
    let mut most_on_agent = 0;
    let rs = run_with(&a.addr, policy, 30, |_| {
        let now = placement();
        most_on_agent = most_on_agent.max(now.iter().filter(|(d, p)| before.get(*d) != Some(p)).count());
        before = now;
    })
    .await;
    assert!(rs.iter().all(|r| r.action.kind != ActionType::Error), "{rs:#?}");
    assert!(rs.iter().all(|r| r.moves.len() <= 2), "{rs:#?}");
    assert!((1..=2).contains(&most_on_agent), "{most_on_agent} vCPUs changed pCPU in one round");
    assert!(rs.iter().any(|r| r.action.reason.contains("--max-moves 2: the plan has")), "{rs:#?}");
    assert!(rs.iter().any(|r| r.deferred_moves > 0), "no report counts the moves left for later: {rs:#?}");
    // Its balanced placement has a true spread of exactly 10, which readings over real time put a hair either side.
    assert!(settled_at(&rs, 10.5, 3).is_some(), "never balanced: {rs:#?}");
}
