//! Faults the controller must survive, against simulated agents over real gRPC on loopback: a host down at start,
//! a hypervisor that goes away mid-run and comes back, an agent restarted between two rounds, a domain restarted or
//! replaced by another with the same name, a slow agent, and a reply that does not decode. In each case the faulty
//! host is reported, the healthy host keeps being balanced with no error, and the faulty one resumes from a fresh
//! baseline: no usage is ever negative or above 100 % of one pCPU.
//!
//! Nothing here asserts on wall time: outcomes are read from the round reports.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::SimAgent;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vcpu_balancer::controller::policy::PolicyConfig;
use vcpu_balancer::controller::policy::HeldWhy;
use vcpu_balancer::controller::report::{ActionType, RoundReport};
use vcpu_balancer::controller::{self, LoopConfig};
use vcpu_balancer::hypervisor::sim::scenario::DomainSpec;
use vcpu_balancer::hypervisor::sim::{LoadProfile, ScaledClock, SimHypervisor};
use vcpu_balancer::error::AgentError;
use vcpu_balancer::hypervisor::{Hypervisor, PinResults};
use vcpu_balancer::model::{DomainPlacement, DomainSummary, HostInfo, HostStats, PinRequest};

const INTERVAL: Duration = Duration::from_millis(100);
const RPC_TIMEOUT: Duration = Duration::from_millis(400);
/// Simulated seconds per real second.
const SPEED: f64 = 20.0;

fn cfg(rounds: u64) -> LoopConfig {
    LoopConfig { interval: INTERVAL, policy: PolicyConfig::default(), dry_run: false, rounds: Some(rounds), ..Default::default() }
}

/// Starts the controller on `hosts`; the caller drains the reports and reacts to them.
fn start(hosts: Vec<String>, rounds: u64) -> (mpsc::Receiver<RoundReport>, tokio::task::JoinHandle<()>) {
    start_with(hosts, cfg(rounds))
}

/// [`start`] with a loop configuration of the caller's.
fn start_with(hosts: Vec<String>, cfg: LoopConfig) -> (mpsc::Receiver<RoundReport>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = controller::report_channel(hosts.len());
    let h = tokio::spawn(async move {
        controller::run(hosts, RPC_TIMEOUT, cfg, tx, CancellationToken::new()).await.unwrap();
    });
    (rx, h)
}

fn sane_usage(rs: &[RoundReport]) {
    for r in rs {
        for v in &r.vcpus {
            if let Some(u) = v.usage {
                assert!((0.0..=100.0).contains(&u), "{} round {}: {}/{} usage {u}", r.host, r.round, v.domain, v.vcpu);
            }
        }
        for p in &r.pcpus {
            assert!(p.usage >= 0.0, "{} round {}: pCPU {} usage {}", r.host, r.round, p.id, p.usage);
        }
    }
}

/// Whether the reports end with a run of at least `n` balanced rounds with no pin change.
fn settled(reports: &[RoundReport], n: usize) -> bool {
    let ok = |r: &RoundReport| r.action.kind == ActionType::None && r.pins_applied == 0 && r.spread.is_some_and(|s| s <= 10.0);
    (0..reports.len()).any(|i| reports.len() >= i + n && reports[i..].iter().all(ok))
}

/// The healthy host: every round succeeded and it ended balanced.
fn healthy(rs: &[RoundReport], rounds: u64) {
    assert_eq!(rs.len() as u64, rounds, "the healthy host did every round");
    assert!(rs.iter().all(|r| r.action.kind != ActionType::Error), "{rs:#?}");
    assert!(rs.iter().enumerate().all(|(i, r)| r.round == i as u64 + 1), "rounds in order, none skipped");
    assert!(settled(rs, 3), "the healthy host was balanced: {:#?}", rs.last());
}

/// The first round after the last error is a baseline, and usage resumes after it.
fn recovered(rs: &[RoundReport]) {
    let first_err = rs.iter().position(|r| r.action.kind == ActionType::Error).expect("the fault was reported");
    let back = rs[first_err..].iter().position(|r| r.action.kind != ActionType::Error).expect("the host came back") + first_err;
    assert_eq!(rs[back].action.kind, ActionType::Baseline, "fresh baseline on return: {:#?}", rs[back]);
    assert!(rs[back].vcpus.iter().all(|v| v.usage.is_none()));
    assert!(rs[back + 1..].iter().any(|r| r.spread.is_some()), "usage resumed after the baseline");
}

/// A host down at start is reported in every round until it comes up, then baselined and balanced; the other host
/// is balanced meanwhile with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_down_at_start_comes_up_later() {
    let live = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let late_addr = common::dead_address().await;
    let rounds = 40;
    let (mut rx, ctl) = start(vec![late_addr.clone(), live.addr.clone()], rounds);
    let mut by: BTreeMap<String, Vec<RoundReport>> = BTreeMap::new();
    let mut late = None;
    while let Some(r) = rx.recv().await {
        if r.host == late_addr && r.round == 3 && late.is_none() {
            let hv = Arc::new(SimHypervisor::new(&common::builtin("split-first-last"), "late", Arc::new(ScaledClock::new(SPEED))));
            late = Some(SimAgent::start_with(hv, &late_addr).await);
        }
        by.entry(r.host.clone()).or_default().push(r);
    }
    ctl.await.unwrap();
    let l = &by[&late_addr];
    assert!(l[..3].iter().all(|r| r.action.kind == ActionType::Error), "{:#?}", &l[..3]);
    recovered(l);
    assert!(settled(l, 3), "the late host was balanced once up: {:#?}", l.last());
    healthy(&by[&live.addr], rounds);
    sane_usage(l);
}

/// A hypervisor that goes away mid-run (the agent answers UNAVAILABLE) and comes back: errors while down, a fresh
/// baseline on return (the samples on either side of the gap are not compared), the other host unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_dies_mid_run_comes_back_with_a_fresh_baseline() {
    let live = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let flaky = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let rounds = 40;
    let (mut rx, ctl) = start(vec![flaky.addr.clone(), live.addr.clone()], rounds);
    let mut by: BTreeMap<String, Vec<RoundReport>> = BTreeMap::new();
    while let Some(r) = rx.recv().await {
        if r.host == flaky.addr && r.round == 5 {
            flaky.hv.set_unavailable(true);
        }
        if r.host == flaky.addr && r.round == 9 {
            flaky.hv.set_unavailable(false);
        }
        by.entry(r.host.clone()).or_default().push(r);
    }
    ctl.await.unwrap();
    let f = &by[&flaky.addr];
    let first_err = f.iter().find(|r| r.action.kind == ActionType::Error).expect("the outage was reported");
    assert!(first_err.round > 5 && first_err.action.reason.contains("Unavailable"), "{first_err:#?}");
    recovered(f);
    assert!(settled(f, 3), "{:#?}", f.last());
    healthy(&by[&live.addr], rounds);
    sane_usage(f);
}

/// The reports of a controller run with `cfg` on one `split-first-last` agent, which is stopped and replaced by a
/// new process on the same address when the report of round `at` arrives. The new process's clock starts from zero,
/// so its sample time is far behind the old one's.
async fn with_agent_restarted_at(at: u64, cfg: LoopConfig) -> Vec<RoundReport> {
    let a = SimAgent::start(&common::builtin("split-first-last"), SPEED).await;
    let addr = a.addr.clone();
    let (mut rx, ctl) = start_with(vec![addr.clone()], cfg);
    let mut rs = Vec::new();
    let mut agent = Some(a);
    while let Some(r) = rx.recv().await {
        if r.round == at {
            agent.take().unwrap().stop().await;
            let hv = Arc::new(SimHypervisor::new(&common::builtin("split-first-last"), "again", Arc::new(ScaledClock::new(SPEED))));
            agent = Some(SimAgent::start_with(hv, &addr).await);
        }
        rs.push(r);
    }
    ctl.await.unwrap();
    rs
}

/// An agent restarted between two rounds (a new process: new instance, its clock and the domains' vCPU times start
/// over) is never compared with its previous life: the next round is a baseline with no usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_between_rounds_gets_a_fresh_baseline() {
    let rs = with_agent_restarted_at(6, cfg(30)).await;
    // The restart happened when round 6's report arrived; on a busy machine round 7 may have sampled the old process
    // already, and a connection reset may cost an error round. The new process is baselined within two rounds.
    let next = rs[6..9]
        .iter()
        .find(|r| r.action.kind == ActionType::Baseline)
        .unwrap_or_else(|| panic!("no baseline after the restart: {:#?}", &rs[6..9]));
    assert!(
        next.action.reason.contains("agent restarted") || next.action.reason.contains("first sample"),
        "{}",
        next.action.reason
    );
    sane_usage(&rs);
    assert!(settled(&rs, 3), "{:#?}", rs.last());
    // The new process's domains started over from their config affinity: the controller's old pins are not an
    // operator's, so nothing is held.
    let back = rs.iter().position(|r| std::ptr::eq(r, next)).unwrap();
    assert!(rs[back..].iter().all(|r| r.held.is_empty()), "{:#?}", rs[back..].iter().find(|r| !r.held.is_empty()));
}

/// An agent restarted well inside an interval (`systemctl restart vcpu-agent`) costs the host no failed round: the
/// controller's connection to the old process closed while idle, and the next round dials the new one and takes
/// its baseline, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_between_rounds_is_not_an_error_round() {
    // Long enough that the restart, a few milliseconds, ends well before the next tick.
    let rs = with_agent_restarted_at(1, LoopConfig { interval: Duration::from_secs(1), ..cfg(3) }).await;
    let kinds: Vec<_> = rs.iter().map(|r| (r.action.kind, r.action.reason.clone())).collect();
    assert_eq!(rs[1].action.kind, ActionType::Baseline, "{kinds:#?}");
    assert!(rs[1].action.reason.contains("agent restarted"), "{kinds:#?}");
    assert_ne!(rs[2].action.kind, ActionType::Error, "{kinds:#?}");
}

/// Domains rebooted while their host was unreachable come back with their config affinity, not the controller's
/// pins. That is not an operator's doing: once the host answers again nothing is held as a manual pin, and the host
/// is balanced again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_rebooted_during_an_outage_are_not_taken_for_manual_pins() {
    let a = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let (mut rx, ctl) = start(vec![a.addr.clone()], 40);
    let mut rs = Vec::new();
    while let Some(r) = rx.recv().await {
        if r.round == 12 {
            assert!(settled(&rs, 2), "balanced before the outage: {rs:#?}");
            a.hv.set_unavailable(true);
            let names: Vec<String> = a.hv.with_host(|h, _| h.list().into_iter().map(|d| d.name).collect());
            for n in names {
                a.hv.with_host(|h, now| h.restart_domain(&n, now)).unwrap();
            }
        }
        if r.round == 16 {
            a.hv.set_unavailable(false);
        }
        rs.push(r);
    }
    ctl.await.unwrap();
    recovered(&rs);
    assert!(rs.iter().all(|r| r.held.is_empty()), "{:#?}", rs.iter().find(|r| !r.held.is_empty()));
    assert!(settled(&rs, 3), "balanced again: {:#?}", rs.last());
}

/// The other side of the same rule: a domain that kept running through the outage keeps the controller's pins, so a
/// pin an operator made meanwhile is still seen as theirs and left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_pin_made_during_an_outage_is_still_held() {
    let a = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let (mut rx, ctl) = start(vec![a.addr.clone()], 30);
    let mut rs = Vec::new();
    let mut operator_put = None;
    while let Some(r) = rx.recv().await {
        if r.round == 12 {
            assert!(settled(&rs, 2), "balanced before the outage: {rs:#?}");
            a.hv.set_unavailable(true);
            let now = a.hv.with_host(|h, _| h.placement("vm1").unwrap().vcpus[0].pcpu);
            let to = (now + 1) % 4;
            let pin = PinRequest { domain: "vm1".into(), vcpu: 0, pcpus: vec![to], persist: false };
            a.hv.with_host(|h, now| h.apply_pins(&[pin], now)).unwrap().remove(0).unwrap();
            operator_put = Some(to);
        }
        if r.round == 16 {
            a.hv.set_unavailable(false);
        }
        rs.push(r);
    }
    ctl.await.unwrap();
    recovered(&rs);
    let held = |r: &RoundReport| r.held.iter().any(|h| h.domain == "vm1" && h.vcpu == 0 && h.why == HeldWhy::Manual);
    assert!(rs.iter().any(held), "the operator's pin was not seen: {:#?}", rs.last());
    let p = a.hv.with_host(|h, _| h.placement("vm1").unwrap());
    assert_eq!(Some(p.vcpus[0].pcpu), operator_put, "the operator's pin was undone");
}

/// A domain restarted (its vCPU times go back to 0) and a domain replaced by another with the same name (new UUID,
/// more vCPUs) both get a fresh baseline: no usage for them in the next round, and never a negative or >100 % one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_and_replaced_domains_get_fresh_baselines() {
    let a = SimAgent::start(&common::builtin("balanced"), SPEED).await;
    let (mut rx, ctl) = start(vec![a.addr.clone()], 24);
    let mut rs = Vec::new();
    while let Some(r) = rx.recv().await {
        if r.round == 5 {
            a.hv.with_host(|h, now| h.restart_domain("vm1", now)).unwrap();
        }
        if r.round == 10 {
            a.hv.with_host(|h, now| {
                h.remove_domain("vm2", now)?;
                let spec = DomainSpec {
                    name: "vm2".into(),
                    uuid: Some("00000000-0000-4000-8000-0000000000f2".into()),
                    vcpus: 2,
                    affinity: None,
                    load: LoadProfile::Constant(100.0),
                };
                h.add_domain(&spec, now)
            })
            .unwrap();
        }
        rs.push(r);
    }
    ctl.await.unwrap();
    // The change is made when round `round`'s report arrives; on a busy machine the next round may already have
    // sampled, so the fresh baseline is the first round, at most two later, with no usage for the domain.
    let after = |round: u64, dom: &str| {
        let r = rs
            .iter()
            .filter(|r| r.round > round && r.round <= round + 2)
            .find(|r| r.vcpus.iter().any(|v| &*v.domain == dom && v.usage.is_none()))
            .unwrap_or_else(|| panic!("no fresh baseline for {dom} after round {round}: {rs:#?}"));
        assert_ne!(r.action.kind, ActionType::Error, "{r:#?}");
        let vs: Vec<_> = r.vcpus.iter().filter(|v| &*v.domain == dom).collect();
        assert!(vs.iter().all(|v| v.usage.is_none()), "round {}: {vs:?}", r.round);
        // The other domains keep their usage: only the changed one starts over.
        assert!(r.vcpus.iter().filter(|v| &*v.domain != dom).all(|v| v.usage.is_some()), "{r:#?}");
        // And it starts over once: the next round measures it again.
        let next = rs.iter().find(|n| n.round == r.round + 1).unwrap();
        assert!(next.vcpus.iter().filter(|v| &*v.domain == dom).all(|v| v.usage.is_some()), "{next:#?}");
    };
    after(5, "vm1");
    after(10, "vm2");
    let last = rs.last().unwrap();
    assert_eq!(last.vcpus.iter().filter(|v| &*v.domain == "vm2").count(), 2, "the replacement has 2 vCPUs");
    assert!(last.vcpus.iter().all(|v| v.usage.is_some()), "usage resumed: {last:#?}");
    sane_usage(&rs);
}

/// A slow agent (every call slower than the deadline) loses only its own rounds: they are reported as deadline
/// errors, the other host keeps every round, and the slow one resumes with a fresh baseline once it is fast again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_agent_drops_only_its_own_rounds() {
    let live = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let slow = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let rounds = 40;
    let (mut rx, ctl) = start(vec![slow.addr.clone(), live.addr.clone()], rounds);
    let mut by: BTreeMap<String, Vec<RoundReport>> = BTreeMap::new();
    let mut slow_round_when_live_done = None;
    while let Some(r) = rx.recv().await {
        if r.host == slow.addr && r.round == 3 {
            slow.hv.set_latency(RPC_TIMEOUT * 2);
        }
        if r.host == slow.addr && r.round == 10 {
            slow.hv.set_latency(Duration::ZERO);
        }
        if r.host == live.addr && r.round == rounds {
            slow_round_when_live_done = by.get(&slow.addr).and_then(|v| v.last()).map(|r| r.round);
        }
        by.entry(r.host.clone()).or_default().push(r);
    }
    ctl.await.unwrap();
    let s = &by[&slow.addr];
    let errors: Vec<_> = s.iter().filter(|r| r.action.kind == ActionType::Error).collect();
    assert!(!errors.is_empty());
    assert!(
        errors.iter().all(|r| r.action.reason.contains("DeadlineExceeded") || r.action.reason.contains("Cancelled") || r.action.reason.contains("backoff")),
        "{errors:#?}"
    );
    recovered(s);
    // Each timed-out round held the slow host for several intervals (its missed ticks are skipped, not replayed).
    // Had the live host waited for it, both would have finished together; instead the live host finished well ahead.
    let behind = slow_round_when_live_done.expect("slow host reported before the live one finished");
    assert!(behind + 3 <= rounds, "slow host was at round {behind} when the live host finished {rounds}");
    healthy(&by[&live.addr], rounds);
    sane_usage(s);
}

/// An "agent" whose `GetStats` reply is not a `GetStatsResponse`: field 1 comes as a string, where the controller
/// expects the sample time (a varint). Built from the generated message types, so the bytes are well framed gRPC.
#[derive(Clone)]
struct MalformedAgent;

impl tonic::server::NamedService for MalformedAgent {
    const NAME: &'static str = "vcpu.v1.Agent";
}

struct WrongReply;

impl tonic::server::UnaryService<vcpu_balancer::pb::GetStatsRequest> for WrongReply {
    type Response = vcpu_balancer::pb::GetVcpuPlacementRequest;
    type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, _req: tonic::Request<vcpu_balancer::pb::GetStatsRequest>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(vcpu_balancer::pb::GetVcpuPlacementRequest { domain: "not a sample".into() })))
    }
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for MalformedAgent {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<vcpu_balancer::pb::GetVcpuPlacementRequest, vcpu_balancer::pb::GetStatsRequest>::default();
            Ok(tonic::server::Grpc::new(codec).unary(WrongReply, req).await)
        })
    }
}

/// A reply that does not decode is an error of that host's round (INTERNAL, as tonic's own codec reports it), and
/// never a sample: the other host is balanced meanwhile with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_does_not_decode_fails_only_its_own_host() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bad = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MalformedAgent)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let live = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let rounds = 20;
    let (mut rx, ctl) = start(vec![bad.clone(), live.addr.clone()], rounds);
    let mut by: BTreeMap<String, Vec<RoundReport>> = BTreeMap::new();
    while let Some(r) = rx.recv().await {
        by.entry(r.host.clone()).or_default().push(r);
    }
    ctl.await.unwrap();
    server.abort();
    let b = &by[&bad];
    assert!(!b.is_empty());
    assert!(b.iter().all(|r| r.action.kind == ActionType::Error && r.spread.is_none() && r.vcpus.is_empty()), "{b:#?}");
    let decoded = b.iter().filter(|r| r.action.reason.contains("GetStats: Internal")).count();
    assert!(decoded >= 1, "the decode error is reported as INTERNAL: {b:#?}");
    healthy(&by[&live.addr], rounds);
}

/// A simulated host whose `ApplyPins` can be slow. `before` delays the pins themselves. While `late` is set, the pins
/// take effect but the answer comes after the controller's deadline: libvirt's agent does the same when a batch
/// outlives `--rpc-timeout` or its own `--libvirt-timeout` (the blocking work finishes in the background). `started`
/// is notified when a batch arrives.
struct SlowPins {
    sim: Arc<SimHypervisor>,
    before: Duration,
    late: std::sync::atomic::AtomicBool,
    /// While set, every batch is refused as malformed (INVALID_ARGUMENT), nothing applied.
    refuse: std::sync::atomic::AtomicBool,
    started: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl Hypervisor for SlowPins {
    async fn host_info(&self) -> Result<HostInfo, AgentError> {
        self.sim.host_info().await
    }
    async fn list_domains(&self) -> Result<Vec<DomainSummary>, AgentError> {
        self.sim.list_domains().await
    }
    async fn stats(&self) -> Result<HostStats, AgentError> {
        self.sim.stats().await
    }
    async fn placement(&self, domain: &str) -> Result<DomainPlacement, AgentError> {
        self.sim.placement(domain).await
    }
    async fn apply_pins(&self, pins: &[PinRequest]) -> Result<PinResults, AgentError> {
        self.started.notify_one();
        if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AgentError::InvalidArgument("refused by the test".into()));
        }
        if !self.before.is_zero() {
            tokio::time::sleep(self.before).await;
        }
        let applied = self.sim.apply_pins(pins).await;
        if self.late.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(RPC_TIMEOUT * 3).await;
        }
        applied
    }
}

/// An agent on 127.0.0.1:0 for a [`SlowPins`] host simulating `scenario`, pins delayed by `before`: the host, its
/// address, the token that stops it and the server task.
async fn serve_slow_pins(
    scenario: &str,
    before: Duration,
) -> (Arc<SlowPins>, String, CancellationToken, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
    let clock: Arc<dyn vcpu_balancer::hypervisor::sim::Clock> = Arc::new(ScaledClock::new(SPEED));
    let sim = Arc::new(SimHypervisor::new(&common::builtin(scenario), "sim-slow-pins", clock));
    let hv = Arc::new(SlowPins { sim, before, late: false.into(), refuse: false.into(), started: tokio::sync::Notify::new() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let server = tokio::spawn(vcpu_balancer::agent::serve_with(
        Arc::clone(&hv),
        listener,
        vcpu_balancer::agent::ServeOptions::default(),
        stop.clone().cancelled_owned(),
    ));
    (hv, addr, stop, server)
}

/// A batch the agent refused changed nothing: its round is an error that lists no moves (metrics count the moves of
/// reports, and JSON readers sum them), and says how many were planned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_reports_no_moves() {
    let (hv, addr, stop, server) = serve_slow_pins("all-on-one", Duration::ZERO).await;
    hv.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
    let rs = run_rounds(&addr, 5, None).await;
    stop.cancel();
    server.await.unwrap().unwrap();
    let refused: Vec<_> = rs.iter().filter(|r| r.action.reason.contains("ApplyPins failed")).collect();
    assert!(!refused.is_empty(), "{rs:#?}");
    for r in refused {
        assert_eq!(r.action.kind, ActionType::Error, "{r:#?}");
        assert!(r.moves.is_empty() && r.pins_applied == 0, "{r:#?}");
        assert!(r.action.reason.contains("InvalidArgument") && r.action.reason.contains("planned move(s) not applied"), "{r:#?}");
    }
}

/// Pins applied after the controller gave up on the answer are still the controller's own: they are not mistaken for
/// an operator's manual pins (which would be left alone from then on), and the host is balanced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_whose_answer_came_too_late_are_not_taken_for_manual_pins() {
    let (hv, addr, stop, server) = serve_slow_pins("all-on-one", Duration::ZERO).await;
    let rounds = 40;
    let (mut rx, ctl) = start(vec![addr], rounds);
    let mut rs = Vec::new();
    let mut was_late = false;
    while let Some(r) = rx.recv().await {
        // The batch after the first applied one (the controller then remembers its pins) is answered too late; later
        // ones in time again.
        if r.pins_applied > 0 && !was_late {
            hv.late.store(true, std::sync::atomic::Ordering::SeqCst);
            was_late = true;
        }
        if r.action.kind == ActionType::Error && r.action.reason.contains("ApplyPins") {
            hv.late.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        rs.push(r);
    }
    ctl.await.unwrap();
    stop.cancel();
    server.await.unwrap().unwrap();
    assert!(
        rs.iter().any(|r| r.action.kind == ActionType::Error && r.action.reason.contains("ApplyPins")),
        "the late answer was an error round: {rs:#?}"
    );
    let manual: Vec<_> = rs.iter().flat_map(|r| r.held.iter().map(move |h| (r.round, h))).collect();
    assert!(manual.is_empty(), "the controller's own late pins were held as manual: {manual:#?}");
    assert!(settled(&rs, 3), "balanced in the end: {:#?}", rs.last());
    sane_usage(&rs);
}

/// Runs the controller on `host` for `rounds` rounds with `state_dir`, and returns its reports.
async fn run_rounds(host: &str, rounds: u64, state_dir: Option<&std::path::Path>) -> Vec<RoundReport> {
    run_rounds_with(host, LoopConfig { state_dir: state_dir.map(Into::into), ..cfg(rounds) }).await
}

async fn run_rounds_with(host: &str, cfg: LoopConfig) -> Vec<RoundReport> {
    let (mut rx, ctl) = start_with(vec![host.to_string()], cfg);
    let mut rs = Vec::new();
    while let Some(r) = rx.recv().await {
        rs.push(r);
    }
    ctl.await.unwrap();
    rs
}

/// With `--state-dir`, a restarted controller still knows which pins were its own: a vCPU that an operator pinned
/// by hand while the controller was stopped is held as a manual pin. Without the directory, the restarted
/// controller takes the same pin for its starting point (the gap the directory closes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_knows_its_pins_with_a_state_dir() {
    let agent = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let dir = std::env::temp_dir().join(format!("vcpub-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let first = run_rounds(&agent.addr, 20, Some(&dir)).await;
    assert!(settled(&first, 3), "balanced before the restart: {:#?}", first.last());
    assert!(std::fs::read_dir(&dir).unwrap().count() == 1, "one pins file for the one host");

    // While the controller is stopped, an operator pins vm1's vCPU 0 somewhere else (as `virsh vcpupin` would).
    let before = agent.hv.placement("vm1").await.unwrap().vcpus[0].pcpu;
    let elsewhere = (before + 1) % 4;
    let pin = PinRequest { domain: "vm1".into(), vcpu: 0, pcpus: vec![elsewhere], persist: false };
    agent.hv.apply_pins(&[pin]).await.unwrap().into_iter().for_each(|r| r.unwrap());
    let manual = |rs: &[RoundReport]| {
        rs.iter().any(|r| r.held.iter().any(|h| h.domain == "vm1" && h.vcpu == 0 && h.why == HeldWhy::Manual))
    };

    // The restarted controller is given the same agent written another way: one agent, one pins file.
    let second = run_rounds(&format!("http://{}/", agent.addr), 6, Some(&dir)).await;
    assert!(manual(&second), "the restarted controller held the operator's pin: {:#?}", second.last());
    assert!(std::fs::read_dir(&dir).unwrap().count() == 1, "still one pins file for the one host");
    assert_eq!(agent.hv.placement("vm1").await.unwrap().vcpus[0].affinity, vec![elsewhere], "left where it was put");

    let without = run_rounds(&agent.addr, 6, None).await;
    assert!(!manual(&without), "without the directory the pin is not known as manual: {:#?}", without.last());

    // A file that cannot be read is replaced by the next run.
    let file = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
    std::fs::write(&file, "not json").unwrap();
    run_rounds(&agent.addr, 3, Some(&dir)).await;
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "rewritten: {text}");

    // A dry run writes nothing.
    let dry = dir.join("dry");
    run_rounds_with(&agent.addr, LoopConfig { state_dir: Some(dry.clone()), dry_run: true, ..cfg(4) }).await;
    assert!(!dry.exists() || std::fs::read_dir(&dry).unwrap().next().is_none(), "a dry run wrote a pins file");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A pins file that cannot be replaced is removed: kept, it would hold older pins, and a controller started later
/// would take the pins made since for an operator's. Once it can be written again, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pins_file_that_cannot_be_replaced_is_removed() {
    let agent = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let dir = std::env::temp_dir().join(format!("vcpub-unwritable-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = run_rounds(&agent.addr, 20, Some(&dir)).await;
    assert!(settled(&first, 3), "balanced: {:#?}", first.last());
    let file = vcpu_balancer::controller::pins_file::path_for(&dir, &agent.addr);
    assert!(file.exists(), "{}", file.display());

    // The temporary file's name taken by a directory: every write fails, for root too.
    let blocker = file.with_extension("json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    // The controller's pins change: an operator moves vm1's vCPU 0, and `--override-manual` takes it back.
    let before = agent.hv.placement("vm1").await.unwrap().vcpus[0].pcpu;
    let pin = PinRequest { domain: "vm1".into(), vcpu: 0, pcpus: vec![(before + 1) % 4], persist: false };
    agent.hv.apply_pins(&[pin]).await.unwrap().into_iter().for_each(|r| r.unwrap());
    let mut cfg = LoopConfig { state_dir: Some(dir.clone()), ..cfg(8) };
    cfg.policy.constraints.override_manual = true;
    let second = run_rounds_with(&agent.addr, cfg).await;
    assert!(second.iter().any(|r| r.pins_applied > 0), "the controller pinned: {:#?}", second.last());
    assert!(!file.exists(), "a pins file older than the controller's pins was left behind");

    std::fs::remove_dir(&blocker).unwrap();
    run_rounds(&agent.addr, 4, Some(&dir)).await;
    assert!(file.exists(), "written again once it can be");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A host rebooted while the controller was stopped: libvirt numbers its domains from 1 again, so they come back
/// with the ids the pins file kept, on their config affinity, and soon past the CPU times it kept (written when the
/// pins last changed). That is no operator's doing: the new boot id drops the saved pins, nothing is held as a
/// manual pin, and the restarted controller balances the host again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_rebooted_while_the_controller_was_stopped_is_balanced_again() {
    let agent = SimAgent::start(&common::builtin("all-on-one"), SPEED).await;
    let addr = agent.addr.clone();
    let dir = std::env::temp_dir().join(format!("vcpub-reboot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = run_rounds(&addr, 20, Some(&dir)).await;
    assert!(settled(&first, 3), "balanced before the reboot: {:#?}", first.last());
    let file = std::fs::read_dir(&dir).unwrap().filter_map(Result::ok).find(|e| e.path().extension().is_some_and(|x| x == "json"));
    let text = std::fs::read_to_string(file.expect("a pins file").path()).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&text).unwrap();
    let saved: BTreeMap<String, (u64, u64)> = saved["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["uuid"].as_str().unwrap().to_string(), (d["id"].as_u64().unwrap(), d["cpu_time_ns"].as_u64().unwrap())))
        .collect();
    assert!(!saved.is_empty(), "{text}");
    agent.stop().await;

    // The host comes back: the same domains with the same ids, all on pCPU 0 again, as their config says.
    let hv = Arc::new(SimHypervisor::new(&common::builtin("all-on-one"), "sim-test", Arc::new(ScaledClock::new(SPEED))));
    let rebooted = SimAgent::start_with(hv, &addr).await;
    // Wait until each domain has run past the CPU time the file kept: ids and CPU times alone then say "no restart".
    for _ in 0..600 {
        let s = rebooted.hv.stats().await.unwrap();
        let past = s.domains.iter().all(|d| saved.get(&d.uuid).is_none_or(|&(id, t)| u64::from(d.id) == id && d.cpu_time_ns > t));
        if past {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = rebooted.hv.stats().await.unwrap();
    for d in &s.domains {
        if let Some(&(id, t)) = saved.get(&d.uuid) {
            assert!(u64::from(d.id) == id && d.cpu_time_ns > t, "{}: id {} (saved {id}), CPU time {} (saved {t})", d.name, d.id, d.cpu_time_ns);
        }
    }

    let second = run_rounds(&addr, 12, Some(&dir)).await;
    assert!(second.iter().all(|r| r.held.is_empty()), "{:#?}", second.iter().find(|r| !r.held.is_empty()));
    assert!(settled(&second, 3), "balanced again after the reboot: {:#?}", second.last());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stop (SIGINT/SIGTERM, or a host removed on reload) that comes while an `ApplyPins` is in flight waits for its
/// answer: the pins it made are reported and saved in `--state-dir`, so a controller started later knows them for
/// its own instead of holding them as an operator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_apply_pins_still_records_the_pins() {
    let (hv, addr, stop_agent, server) = serve_slow_pins("all-on-one", RPC_TIMEOUT / 2).await;
    let dir = std::env::temp_dir().join(format!("vcpub-stop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (tx, mut rx) = controller::report_channel(1);
    let stop = CancellationToken::new();
    let cfg = LoopConfig { state_dir: Some(dir.clone()), ..cfg(1000) };
    let ctl = tokio::spawn({
        let (addr, stop) = (addr.clone(), stop.clone());
        async move { controller::run(vec![addr], RPC_TIMEOUT, cfg, tx, stop).await.unwrap() }
    });
    hv.started.notified().await;
    stop.cancel();
    let mut rs = Vec::new();
    while let Some(r) = rx.recv().await {
        rs.push(r);
    }
    ctl.await.unwrap();
    stop_agent.cancel();
    server.await.unwrap().unwrap();
    let last = rs.last().expect("reports");
    assert!(last.pins_applied > 0, "the round whose pins were in flight is reported: {rs:#?}");
    let file = vcpu_balancer::controller::pins_file::load(&vcpu_balancer::controller::pins_file::path_for(&dir, &addr), &addr)
        .unwrap()
        .expect("a pins file");
    // Every vCPU's affinity on the host now, the moved ones included, is in the file as the controller's.
    for d in hv.sim.list_domains().await.unwrap() {
        let p = hv.sim.placement(&d.name).await.unwrap();
        let saved = file.domains.iter().find(|x| x.uuid == p.uuid).unwrap_or_else(|| panic!("{} not saved: {file:?}", d.name));
        let now: Vec<(u32, Vec<u32>)> = p.vcpus.iter().map(|v| (v.index, v.affinity.clone())).collect();
        assert_eq!(saved.vcpus, now, "{}", d.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
