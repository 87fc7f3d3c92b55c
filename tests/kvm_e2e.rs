//! End to end on real guests: a real libvirtd running tiny KVM (or TCG) guests whose CPU load we control
//! (`scripts/testbed`), the real `vcpu-agent --backend libvirt`, and the controller. Every check that matters is made
//! against `virsh` too, not only through the agent.
//!
//! These tests need root, libvirtd and the testbed's packages: `scripts/test` (and so CI) sets them up. They run one
//! at a time (the host has 2 pCPUs, and guests of two tests would skew each other's loads), and each removes its own
//! guests when it ends, also when it fails.
#![cfg(feature = "libvirt")]

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vcpu_balancer::controller::policy::PolicyConfig;
use vcpu_balancer::controller::report::{ActionType, RoundReport};
use vcpu_balancer::controller::{self, LoopConfig};
use vcpu_balancer::model::parse_cpu_list;
use vcpu_balancer::pb;

const CONTROLLER: &str = env!("CARGO_BIN_EXE_vcpu-controller");
const TESTBED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testbed");
/// vCPU times move in 10 ms steps, and a guest's duty cycle jitters by some points over a second: rounds of 2 s
/// keep both well under the 10-point threshold.
const INTERVAL: Duration = Duration::from_secs(2);
/// Time a fresh guest needs after `testbed up` returns before its load is steady (the first seconds include the
/// end of its boot and calibration).
const SETTLE: Duration = Duration::from_secs(3);
const RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// One real-guest test at a time. Each test has its own runtime, so the lock is the async one: it is held across
/// awaits and a failed test does not poison it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn virsh(args: &[&str]) -> String {
    let mut full = vec!["-q", "-c", "qemu:///system"];
    full.extend_from_slice(args);
    run("virsh", &full)
}

/// Per-vCPU affinity from `virsh vcpupin DOM`.
fn virsh_vcpupin(dom: &str) -> Vec<Vec<u32>> {
    virsh(&["vcpupin", dom])
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let _vcpu: u32 = it.next()?.trim_end_matches(':').parse().ok()?;
            parse_cpu_list(it.next()?).ok()
        })
        .collect()
}

/// Per-vCPU current pCPU from `virsh vcpuinfo DOM`.
fn virsh_vcpu_cpu(dom: &str) -> Vec<u32> {
    virsh(&["vcpuinfo", dom])
        .lines()
        .filter_map(|l| l.strip_prefix("CPU:").map(|v| v.trim().parse().unwrap()))
        .collect()
}

/// The pCPU each vCPU last ran on, read until vCPU 0 has run on `want` or `PIN_SETTLE_READS` reads have passed.
fn vcpu_cpu_after_pin(dom: &str, want: u32) -> Vec<u32> {
    const PIN_SETTLE_READS: usize = 50;
    let mut cpus = virsh_vcpu_cpu(dom);
    for _ in 0..PIN_SETTLE_READS {
        if cpus.first() == Some(&want) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        cpus = virsh_vcpu_cpu(dom);
    }
    cpus
}

/// Per-vCPU cumulative time (ns) from `virsh domstats --vcpu DOM`.
fn virsh_vcpu_times(dom: &str) -> Vec<u64> {
    let mut t: BTreeMap<u32, u64> = BTreeMap::new();
    for l in virsh(&["domstats", "--vcpu", dom]).lines() {
        let l = l.trim();
        if let Some(rest) = l.strip_prefix("vcpu.") {
            if let Some((idx, v)) = rest.split_once(".time=") {
                t.insert(idx.parse().unwrap(), v.parse().unwrap());
            }
        }
    }
    t.into_values().collect()
}

/// Guests of one test, removed on drop (also when the test panics).
struct Testbed {
    prefix: String,
}

impl Testbed {
    fn up(prefix: &str, guests: &[&str]) -> Testbed {
        // Leftovers of an earlier, killed run would skew the loads.
        let _ = Command::new(TESTBED).args(["down", "--prefix", prefix]).output();
        let tb = Testbed { prefix: prefix.to_string() };
        tb.add(guests);
        tb
    }

    fn add(&self, guests: &[&str]) {
        let mut args = vec!["up", "--prefix", &self.prefix];
        args.extend_from_slice(guests);
        run(TESTBED, &args);
        std::thread::sleep(SETTLE);
    }

    fn dom(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new(TESTBED).args(["down", "--prefix", &self.prefix]).output();
    }
}

/// `vcpu-agent --backend libvirt` on 127.0.0.1:0, killed on drop.
struct Agent;

impl Agent {
    fn start() -> common::AgentProcess {
        common::AgentProcess::start(&["--backend", "libvirt", "--uri", "qemu:///system"])
    }
}

/// Runs the controller on `addr` for `rounds` rounds; `at_round(n)` runs after round n's report (to change the
/// world mid-run). Returns the reports in order.
async fn balance(addr: &str, rounds: u64, at_round: impl FnMut(u64)) -> Vec<RoundReport> {
    balance_with(addr, PolicyConfig::default(), rounds, at_round).await
}

/// [`balance`] with a given policy and constraints.
async fn balance_with(addr: &str, policy: PolicyConfig, rounds: u64, at_round: impl FnMut(u64)) -> Vec<RoundReport> {
    let cfg = LoopConfig { interval: INTERVAL, policy, dry_run: false, rounds: Some(rounds), ..Default::default() };
    balance_cfg(addr, cfg, at_round).await
}

/// [`balance`] with a whole loop configuration.
async fn balance_cfg(addr: &str, cfg: LoopConfig, mut at_round: impl FnMut(u64)) -> Vec<RoundReport> {
    let (tx, mut rx) = controller::report_channel(1);
    let ctl = tokio::spawn(controller::run(vec![addr.to_string()], RPC_TIMEOUT, cfg, tx, CancellationToken::new()));
    let mut out = Vec::new();
    while let Some(r) = rx.recv().await {
        let n = r.round;
        let vcpus: Vec<String> =
            r.vcpus.iter().map(|v| format!("{}@{}={:.0}", v.domain, v.pcpu, v.usage.unwrap_or(-1.0))).collect();
        eprintln!(
            "round {n}: {:?} spread {:.1} pins {} [{}] {}",
            r.action.kind,
            r.spread.unwrap_or(f64::NAN),
            r.pins_applied,
            vcpus.join(" "),
            r.action.reason
        );
        out.push(r);
        tokio::task::block_in_place(|| at_round(n));
    }
    ctl.await.unwrap().unwrap();
    out
}

/// Index of the first round at which the spread is at most 10 points, after which no pin changes until the end,
/// for at least `n` rounds. A real guest's load jitters by some points from one second to the next, so a later
/// round may read above the threshold for a moment; what the issue asks is that the controller then changes no pin.
fn settled_at(rs: &[RoundReport], n: usize) -> Option<usize> {
    let quiet = |r: &RoundReport| r.action.kind != ActionType::Error && r.pins_applied == 0;
    (0..rs.len()).find(|&i| {
        rs[i].spread.is_some_and(|s| s <= 10.0) && rs.len() >= i + n && rs[i..].iter().all(quiet)
    })
}

fn usage_of(r: &RoundReport, dom: &str) -> Option<f64> {
    r.vcpus.iter().find(|v| &*v.domain == dom).and_then(|v| v.usage)
}

/// 1. The agent reports what libvirt reports: vCPU times (within 2 %), current pCPU and affinity; the usage it lets
///    the controller measure matches the usage virsh's own times give over the same window; and that usage follows
///    what the guests run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reports_what_libvirt_reports() {
    // Usage from the agent's two samples against usage from virsh's readings just before and just after them: the
    // virsh window is longer by the few hundred ms its calls take, so a load that changes at the window's edges
    // moves the two by at most about that share (5 %) of a 100 % guest.
    const SAME_WINDOW_POINTS: f64 = 8.0;
    let _s = SERIAL.lock().await;
    let tb = Testbed::up("vcbe2e1", &["full:100:0", "half:50:1", "idle:0:1"]);
    let names = ["full", "half", "idle"];
    let agent = Agent::start();
    let mut c = agent.client().await;
    let virsh_times =
        || -> BTreeMap<String, Vec<u64>> { names.iter().map(|n| (tb.dom(n), virsh_vcpu_times(&tb.dom(n)))).collect() };
    let t0 = std::time::Instant::now();
    let before = virsh_times();
    let a = c.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b = c.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
    let after = virsh_times();
    let virsh_elapsed = t0.elapsed().as_nanos() as f64;
    let elapsed = (b.sample_time_ns - a.sample_time_ns) as f64;
    let mut measured = BTreeMap::new();
    for name in names {
        let dom = tb.dom(name);
        let (da, db) = (
            a.domains.iter().find(|d| d.name == dom).unwrap_or_else(|| panic!("{dom} missing from GetStats")),
            b.domains.iter().find(|d| d.name == dom).unwrap(),
        );
        // Times: both of the agent's values lie between virsh's before and after, within 2 %.
        let (lo, hi) = (before[&dom][0] as f64, after[&dom][0] as f64);
        for t in [da.vcpus[0].time_ns as f64, db.vcpus[0].time_ns as f64] {
            assert!(t >= lo * 0.98 && t <= hi * 1.02, "{dom}: agent {t} vs virsh {lo}..{hi}");
        }
        assert_eq!(db.vcpus.len(), virsh_vcpu_times(&dom).len());
        // Placement and affinity as virsh sees them.
        assert_eq!(db.vcpus[0].pcpu, virsh_vcpu_cpu(&dom)[0], "{dom} current pCPU");
        assert_eq!(db.vcpus[0].affinity, virsh_vcpupin(&dom)[0], "{dom} affinity");
        // Usage over the window, against virsh's over the enclosing one.
        let u = (db.vcpus[0].time_ns - da.vcpus[0].time_ns) as f64 / elapsed * 100.0;
        let v = (hi - lo) / virsh_elapsed * 100.0;
        assert!(
            (u - v).abs() <= SAME_WINDOW_POINTS,
            "{dom}: agent measured {u:.1}%, virsh {v:.1}% over the same window"
        );
        assert!(db.cpu_time_ns >= db.vcpus[0].time_ns, "{dom}: domain time includes its vCPU time");
        measured.insert(name, u);
    }
    // The load follows what the guests run. Loosely: a guest's pCPU can be taken for a moment by other threads
    // (its own QEMU's unpinned ones just after boot, or steal time from the outer host on a nested VM); a 100 % guest
    // once read 69 % over this window. The tight check above is against virsh, not against the target.
    let (full, half, idle) = (measured["full"], measured["half"], measured["idle"]);
    assert!((60.0..=110.0).contains(&full), "full guest runs 100%: measured {full:.1}%");
    assert!((25.0..=75.0).contains(&half), "half guest runs 50%: measured {half:.1}%");
    assert!(idle <= 10.0, "idle guest: measured {idle:.1}%");
    assert!(full > half + 15.0 && half > idle + 15.0, "loads in order: {measured:?}");
    let info = c.get_host_info(pb::GetHostInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.backend, "libvirt");
    assert!(info.npcpus >= 1 && !info.online_pcpus.is_empty());
    assert!(info.library_version.contains("libvirt"), "{}", info.library_version);
}

/// 2. Two heavy and two light guests, all pinned to pCPU 0: the controller reaches spread <= 10 and then changes no
///    pin for at least 5 rounds; virsh shows every guest pinned to one pCPU, with both pCPUs in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imbalance_is_balanced_then_stable() {
    let _s = SERIAL.lock().await;
    // 190 % of demand on 2 pCPUs: one heavy and one light per pCPU is 95 | 95. (Two guests near 100 % plus two
    // light ones would ask more than the host has, and a saturated pCPU hides how much its vCPUs want.)
    let tb = Testbed::up("vcbe2e2", &["h1:80:0", "h2:80:0", "l1:15:0", "l2:15:0"]);
    let agent = Agent::start();
    let rs = balance(&agent.addr, 16, |_| {}).await;
    assert!(rs.iter().all(|r| r.action.kind != ActionType::Error), "no errors");
    assert!(rs.iter().any(|r| r.action.kind == ActionType::Move), "something moved");
    let at = settled_at(&rs, 5).unwrap_or_else(|| panic!("never settled: {:#?}", rs.last()));
    assert!(at < rs.len() - 4);
    let mut used = std::collections::BTreeSet::new();
    for g in ["h1", "h2", "l1", "l2"] {
        let aff = virsh_vcpupin(&tb.dom(g));
        assert_eq!(aff[0].len(), 1, "{g} pinned to one pCPU: {aff:?}");
        used.insert(aff[0][0]);
    }
    assert_eq!(used.len(), 2, "both pCPUs in use");
    // The heavy guests ended on different pCPUs.
    assert_ne!(virsh_vcpupin(&tb.dom("h1")), virsh_vcpupin(&tb.dom("h2")));
}

/// 3. Guests spread evenly at start: zero pin changes over 10 rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_host_is_left_alone() {
    let _s = SERIAL.lock().await;
    let tb = Testbed::up("vcbe2e3", &["a:60:0", "b:30:0", "c:60:1", "d:30:1"]);
    let before: Vec<_> = ["a", "b", "c", "d"].iter().map(|g| virsh_vcpupin(&tb.dom(g))).collect();
    let agent = Agent::start();
    let rs = balance(&agent.addr, 11, |_| {}).await;
    assert_eq!(rs.iter().map(|r| r.pins_applied).sum::<usize>(), 0, "{rs:#?}");
    assert!(rs[1..].iter().all(|r| r.action.kind == ActionType::None), "{rs:#?}");
    let after: Vec<_> = ["a", "b", "c", "d"].iter().map(|g| virsh_vcpupin(&tb.dom(g))).collect();
    assert_eq!(before, after);
}

/// 4. A guest goes from light to heavy mid-run: the controller rebalances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_change_is_rebalanced() {
    let _s = SERIAL.lock().await;
    // Light phase: pCPU 0 = 5+35 = 40, pCPU 1 = 40; then "grow" runs 80: pCPU 0 saturates. The light phase sits
    // 10 points inside the threshold: at 50 | 40 (its spread exactly the threshold), a CI run with steal time read
    // two rounds over 10 and balanced before the change.
    let tb = Testbed::up("vcbe2e4", &["grow:5@16,80:0", "s0:35:0", "s1:40:1"]);
    let agent = Agent::start();
    let rs = balance(&agent.addr, 20, |_| {}).await;
    let first_move = rs.iter().position(|r| r.action.kind == ActionType::Move).unwrap_or_else(|| panic!("no move: {rs:#?}"));
    assert!(rs[..first_move].iter().filter(|r| r.spread.is_some()).count() >= 3, "balanced rounds before the change");
    assert!(rs[first_move].spread.unwrap() > 10.0);
    let grow = usage_of(&rs[first_move], &tb.dom("grow")).unwrap();
    assert!(grow > 30.0, "the move follows the load change (grow at {grow:.1}%)");
    assert!(settled_at(&rs, 4).is_some(), "rebalanced: {:#?}", rs.last());
}

/// 5. Manual pins through `vcpu-controller pin` and through a plain gRPC call show in virsh; pins to a pCPU the host
///    lacks or of a vCPU the guest lacks are refused and virsh shows nothing changed; `--persist` is refused on a
///    transient guest and writes the pin into the config of a persistent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_pins_show_in_virsh() {
    let _s = SERIAL.lock().await;
    let tb = Testbed::up("vcbe2e5", &["m:20:0-1"]);
    let dom = tb.dom("m");
    let agent = Agent::start();
    let out = Command::new(CONTROLLER).args(["pin", "--host", &agent.addr, "--domain", &dom, "--vcpu", "0", "--pcpu", "1"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(virsh_vcpupin(&dom), vec![vec![1]]);

    let mut c = agent.client().await;
    c.pin_vcpu(pb::PinVcpuRequest { domain: dom.clone(), vcpu: 0, pcpus: vec![0], persist: false }).await.unwrap();
    assert_eq!(virsh_vcpupin(&dom), vec![vec![0]]);
    // The kernel moves a sleeping thread only when it next runs, so `vcpuinfo` may still name the old pCPU for a
    // moment after the pin: wait for the thread's next run (the guest's load wakes it many times a second).
    assert_eq!(vcpu_cpu_after_pin(&dom, 0), vec![0], "the vCPU thread moved");

    let info = c.get_host_info(pb::GetHostInfoRequest {}).await.unwrap().into_inner();
    let missing_pcpu = info.npcpus.to_string();
    let out = Command::new(CONTROLLER).args(["pin", "--host", &agent.addr, "--domain", &dom, "--vcpu", "0", "--pcpu", &missing_pcpu]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"));
    let err = c.pin_vcpu(pb::PinVcpuRequest { domain: dom.clone(), vcpu: 1, pcpus: vec![1], persist: false }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = c.pin_vcpu(pb::PinVcpuRequest { domain: "vcbe2e5-nope".into(), vcpu: 0, pcpus: vec![1], persist: false }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(virsh_vcpupin(&dom), vec![vec![0]], "refused pins changed nothing");

    // `persist` on the QEMU driver: refused on the transient testbed guest (no config to write it in), with nothing
    // changed; once the guest is defined (persistent), the pin is live and in its config.
    let persist = |pcpu: &str| {
        let args = ["pin", "--host", &agent.addr, "--domain", &dom, "--vcpu", "0", "--pcpu", pcpu, "--persist"];
        Command::new(CONTROLLER).args(args).output().unwrap()
    };
    let out = persist("1");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(virsh_vcpupin(&dom), vec![vec![0]], "a refused persist pin changed nothing");
    let xml = std::env::temp_dir().join(format!("{dom}-persist.xml"));
    std::fs::write(&xml, virsh(&["dumpxml", "--inactive", &dom])).unwrap();
    // Undefined again however the test ends: the testbed's teardown destroys transient guests only.
    struct Undefine(String);
    impl Drop for Undefine {
        fn drop(&mut self) {
            let _ = Command::new("virsh").args(["-q", "-c", "qemu:///system", "undefine", &self.0]).output();
        }
    }
    virsh(&["define", xml.to_str().unwrap()]);
    let _undefine = Undefine(dom.clone());
    let out = persist("1");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(virsh_vcpupin(&dom), vec![vec![1]], "live");
    let config: Vec<Vec<u32>> = virsh(&["vcpupin", "--config", &dom])
        .lines()
        .filter_map(|l| parse_cpu_list(l.split_whitespace().nth(1)?).ok())
        .collect();
    assert_eq!(config, vec![vec![1]], "in the config, for the next boot");
    let _ = std::fs::remove_file(xml);
}

/// 6. A guest destroyed and another started while the controller runs: no crash, a fresh baseline for the new
///    guest, and it gets balanced too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_come_and_go() {
    let _s = SERIAL.lock().await;
    // 80 | 80 at start. Destroying b leaves 40 | 80, which one move cannot improve (it would mirror it); the new
    // guest lands on pCPU 1 (40 | 120): moving one of its three 40 % guests to pCPU 0 gives 80 | 80.
    let tb = Testbed::up("vcbe2e6", &["a:40:0", "b:40:0", "c:40:1", "d:40:1"]);
    let agent = Agent::start();
    let (gone, new) = (tb.dom("b"), tb.dom("n"));
    let rs = balance(&agent.addr, 18, |n| {
        if n == 4 {
            virsh(&["destroy", &gone]);
        }
        if n == 6 {
            tb.add(&["n:40:1"]);
        }
    })
    .await;
    assert!(rs.iter().all(|r| r.action.kind != ActionType::Error), "no failed round: {rs:#?}");
    let first_seen = rs.iter().position(|r| r.vcpus.iter().any(|v| *v.domain == *new)).expect("new guest seen");
    assert_eq!(usage_of(&rs[first_seen], &new), None, "fresh baseline for the new guest");
    assert!(rs[first_seen + 1..].iter().any(|r| usage_of(r, &new).is_some()));
    assert!(rs.last().unwrap().vcpus.iter().all(|v| *v.domain != *gone));
    assert!(rs[first_seen..].iter().any(|r| r.pins_applied > 0), "the controller acted after the new guest came");
    assert!(settled_at(&rs, 4).is_some(), "balanced at the end: {:#?}", rs.last());
    assert_eq!(virsh_vcpupin(&new)[0].len(), 1, "the new guest is pinned");
}

/// 7. The operator's constraints hold on real guests, for every policy: an excluded domain is never pinned, a
///    reserved pCPU is never a target and the vCPU found there is moved off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_domains_and_reserved_pcpus_on_real_guests() {
    use vcpu_balancer::controller::policy::{Constraints, DomainMatcher, PolicyKind};
    let _s = SERIAL.lock().await;
    for kind in [PolicyKind::Seed, PolicyKind::Guarded, PolicyKind::Converge] {
        let tb = Testbed::up("vcbe2e7", &["ex:30", "r:20:1", "s:20:0"]);
        let (ex, r, s) = (tb.dom("ex"), tb.dom("r"), tb.dom("s"));
        let ex_before = virsh_vcpupin(&ex);
        assert_eq!(ex_before[0].len(), 2, "the excluded guest starts unpinned");
        let agent = Agent::start();
        let constraints = Constraints {
            exclude: vec![DomainMatcher::parse("vcbe2e7-ex")],
            reserved: vec![1],
            override_manual: false,
            max_moves: None,
        };
        let policy = PolicyConfig { kind, constraints, ..PolicyConfig::default() };
        let rs = balance_with(&agent.addr, policy, 7, |_| {}).await;
        assert!(rs.iter().all(|x| x.action.kind != ActionType::Error), "{kind:?}: {rs:#?}");
        assert_eq!(virsh_vcpupin(&ex), ex_before, "{kind:?}: the excluded guest was pinned");
        assert_eq!(virsh_vcpupin(&r), vec![vec![0]], "{kind:?}: the guest on the reserved pCPU was moved off");
        assert_eq!(virsh_vcpupin(&s), vec![vec![0]], "{kind:?}: nothing was moved to the reserved pCPU");
        assert!(rs.iter().flat_map(|x| &x.moves).all(|m| m.to != 1), "{kind:?}: a move targeted the reserved pCPU");
        drop(agent);
        drop(tb);
    }
}

/// 8. A vCPU pinned by hand (with virsh) while the controller runs is left where the operator put it, for every
///    policy, and the decision log says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_pins_on_real_guests_are_left_alone() {
    use vcpu_balancer::controller::policy::PolicyKind;
    let _s = SERIAL.lock().await;
    for kind in [PolicyKind::Seed, PolicyKind::Guarded, PolicyKind::Converge] {
        // 40 | 40. The operator then puts a on pCPU 1 (0 | 80): the controller may balance with b, never with a.
        let tb = Testbed::up("vcbe2e8", &["a:40:0", "b:40:1"]);
        let a = tb.dom("a");
        let agent = Agent::start();
        let policy = PolicyConfig { kind, ..PolicyConfig::default() };
        let rs = balance_with(&agent.addr, policy, 9, |n| {
            if n == 3 {
                virsh(&["vcpupin", &a, "0", "1"]);
            }
        })
        .await;
        assert!(rs.iter().all(|x| x.action.kind != ActionType::Error), "{kind:?}: {rs:#?}");
        assert_eq!(virsh_vcpupin(&a), vec![vec![1]], "{kind:?}: the hand-pinned guest was moved: {rs:#?}");
        assert!(
            rs.iter().any(|x| x.action.reason.contains("pinned by someone else")),
            "{kind:?}: the decision log does not say why a was left alone: {rs:#?}"
        );
        drop(agent);
        drop(tb);
    }
}

/// 9. With `--state-dir`, a controller restarted against real guests still knows which pins were its own: a vCPU
///    that an operator pinned by hand (virsh) while the controller was stopped is held as a manual pin and stays
///    where it was put. Without the directory the restarted controller takes that pin for its starting point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_knows_its_pins_on_real_guests() {
    use vcpu_balancer::controller::policy::HeldWhy;
    let _s = SERIAL.lock().await;
    // 80 | 0: the controller moves one of the two to pCPU 1 and remembers that pin.
    let tb = Testbed::up("vcbe2e9", &["a:40:0", "b:40:0"]);
    let agent = Agent::start();
    let dir = std::env::temp_dir().join(format!("vcpub-e2e-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = |rounds, state_dir: Option<&std::path::Path>| LoopConfig {
        interval: INTERVAL,
        rounds: Some(rounds),
        state_dir: state_dir.map(|d| d.to_path_buf()),
        ..Default::default()
    };
    let first = balance_cfg(&agent.addr, cfg(6, Some(&dir)), |_| {}).await;
    assert!(first.iter().any(|r| r.action.kind == ActionType::Move), "the first run moved a guest: {first:#?}");
    let moved = ["a", "b"]
        .into_iter()
        .map(|g| tb.dom(g))
        .find(|d| virsh_vcpupin(d) == vec![vec![1]])
        .unwrap_or_else(|| panic!("no guest on pCPU 1 after the first run: {first:#?}"));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "one pins file for the one host");

    // The controller is stopped; the operator puts the moved guest back on pCPU 0 (80 | 0 again).
    virsh(&["vcpupin", &moved, "0", "0"]);
    let held = |rs: &[RoundReport]| {
        rs.iter().any(|r| r.held.iter().any(|h| h.domain == moved && h.vcpu == 0 && h.why == HeldWhy::Manual))
    };
    let second = balance_cfg(&agent.addr, cfg(5, Some(&dir)), |_| {}).await;
    assert!(second.iter().all(|r| r.action.kind != ActionType::Error), "{second:#?}");
    assert!(held(&second), "the restarted controller held the operator's pin: {second:#?}");
    assert_eq!(virsh_vcpupin(&moved), vec![vec![0]], "the hand-pinned guest was moved: {second:#?}");

    // The same restart without the directory: nothing marks the pin as the operator's.
    let without = balance_cfg(&agent.addr, cfg(3, None), |_| {}).await;
    assert!(!held(&without), "without the directory the pin is not known as manual: {without:#?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 10. `--max-moves 1` on real guests: four light guests on pCPU 0, which `converge` spreads with two moves in one
///     round, are spread one move per round instead. Every round's report moves at most one vCPU, virsh shows at
///     most one guest changing pCPU between two reports, the decision log says the plan was cut, and the host ends
///     balanced and left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_moves_bounds_every_round_on_real_guests() {
    use vcpu_balancer::controller::policy::PolicyKind;
    let _s = SERIAL.lock().await;
    // 80 | 0, nothing saturated: two 20 % guests have to go to pCPU 1.
    let guests = ["a", "b", "c", "d"];
    let tb = Testbed::up("vcbe2e10", &["a:20:0", "b:20:0", "c:20:0", "d:20:0"]);
    let agent = Agent::start();
    let mut policy = PolicyConfig::with_kind(PolicyKind::Converge);
    policy.constraints.max_moves = std::num::NonZeroUsize::new(1);
    let pins = || guests.iter().map(|g| virsh_vcpupin(&tb.dom(g))).collect::<Vec<_>>();
    let mut before = pins();
    let mut most = 0;
    let rs = balance_with(&agent.addr, policy, 10, |_| {
        let now = pins();
        // A guest's affinity changes from both pCPUs to one when first pinned where it runs: only a change from
        // one pCPU to another is a move.
        let moved = now.iter().zip(&before).filter(|(n, b)| b.len() == 1 && n != b).count();
        most = most.max(moved);
        before = now;
    })
    .await;
    assert!(rs.iter().all(|r| r.action.kind != ActionType::Error), "{rs:#?}");
    assert!(rs.iter().all(|r| r.moves.len() <= 1), "{rs:#?}");
    assert!(most <= 1, "{most} guests changed pCPU between two reports: {rs:#?}");
    assert!(rs.iter().any(|r| r.action.reason.contains("--max-moves 1: the plan has 2 moves")), "{rs:#?}");
    assert_eq!(rs.iter().map(|r| r.moves.len()).sum::<usize>(), 2, "two guests moved in all: {rs:#?}");
    assert!(settled_at(&rs, 4).is_some(), "never balanced: {rs:#?}");
    let on1 = guests.iter().filter(|g| virsh_vcpupin(&tb.dom(g)) == vec![vec![1]]).count();
    assert_eq!(on1, 2, "two guests on pCPU 1");
}

/// 11. A guest with vCPUs 0 and 3 of 4 online (as after hot-unplugging 1 and 2): libvirt numbers its running vCPUs
///     with gaps. The agent reports 0 and 3, pins vCPU 3, refuses 1 (not online) and 4 (no such vCPU) without
///     changing anything, and the controller balances the host, whose every batch holds vCPU 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcpus_numbered_with_gaps_after_a_hot_unplug() {
    let _s = SERIAL.lock().await;
    let tb = Testbed::up("vcbe2e11", &["g:40:0:4@0,3", "h:40:0"]);
    let (g, h) = (tb.dom("g"), tb.dom("h"));
    let agent = Agent::start();
    let mut c = agent.client().await;
    let stats = c.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
    let d = stats.domains.iter().find(|d| d.name == g).expect("g in GetStats");
    assert_eq!(d.vcpus.iter().map(|v| v.index).collect::<Vec<_>>(), vec![0, 3]);

    c.pin_vcpu(pb::PinVcpuRequest { domain: g.clone(), vcpu: 3, pcpus: vec![1], persist: false }).await.unwrap();
    assert_eq!(virsh_vcpupin(&g)[3], vec![1], "vCPU 3 pinned");
    let before = virsh_vcpupin(&g);
    for (vcpu, needle) in [(1, "not online"), (4, "not online")] {
        let err = c.pin_vcpu(pb::PinVcpuRequest { domain: g.clone(), vcpu, pcpus: vec![1], persist: false }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "vCPU {vcpu}: {err:?}");
        assert!(err.message().contains(needle) && err.message().contains("0, 3"), "vCPU {vcpu}: {}", err.message());
    }
    assert_eq!(virsh_vcpupin(&g), before, "refused pins changed nothing");

    // 80 | 0 on pCPUs 0 | 1 (vCPU 3 idle). vCPU 3 may run on either pCPU, so the controller's first action pins it
    // where it runs, in the same batch as the move: before the agent knew gaps, that batch was refused whole.
    c.pin_vcpu(pb::PinVcpuRequest { domain: g.clone(), vcpu: 3, pcpus: vec![0, 1], persist: false }).await.unwrap();
    let rs = balance(&agent.addr, 8, |_| {}).await;
    assert!(rs.iter().all(|r| r.action.kind != ActionType::Error && r.pins_failed.is_empty()), "{rs:#?}");
    assert!(rs.iter().any(|r| r.pins_applied > 0), "{rs:#?}");
    assert!(settled_at(&rs, 3).is_some(), "never balanced: {rs:#?}");
    let (pg, ph) = (virsh_vcpupin(&g)[0].clone(), virsh_vcpupin(&h)[0].clone());
    assert!(pg.len() == 1 && ph.len() == 1 && pg != ph, "the two loaded vCPUs on different pCPUs: {pg:?} {ph:?}");
}
