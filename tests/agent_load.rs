//! One simulated agent under load over real gRPC on 127.0.0.1:0: 64 concurrent clients, each on its own
//! connection, call `GetStats` and `ApplyPins` in a loop for 60 s (set `VCPU_LOAD_SECS` to change it).
//!
//! Asserted (behaviour only): no error but the expected ones (each client also sends a pin for an unknown domain,
//! which must fail alone with NOT_FOUND, and a batch with a pCPU out of range, which must be refused whole with
//! INVALID_ARGUMENT); the final placement is, for every vCPU, the last pin applied to it (each client owns one
//! domain, so "last" is well defined); the agent's memory stays flat (RSS from /proc/self/status after warm-up vs at
//! the end).
//!
//! Measured, never asserted: the RPC rate and p50/p99 latency, printed on stderr; run
//! `cargo test --release --test agent_load -- --nocapture` to see them (BENCHMARKS.md has the numbers).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::SimAgent;
use tonic::Code;
use vcpu_balancer::hypervisor::sim::{MonotonicClock, Scenario, SimHypervisor};
use vcpu_balancer::pb;
use vcpu_balancer::pb::agent_client::AgentClient;

/// Concurrent clients, one connection each.
const CLIENTS: usize = 64;
/// Default length of the run.
const DEFAULT_SECS: u64 = 60;
/// pCPUs of the simulated host.
const PCPUS: u32 = 16;
/// vCPUs of each client's domain.
const VCPUS: u32 = 2;
/// Every this many iterations a client also sends the two requests that must fail.
const BAD_EVERY: u64 = 50;
/// Latency histogram: 10 µs buckets up to 1 s (the last bucket takes everything slower).
const BUCKET_US: u64 = 10;
const BUCKETS: usize = 100_000;
/// RSS may grow by this much after warm-up (allocator noise, connection buffers reaching their high-water marks).
const RSS_SLACK_KIB: u64 = 32 * 1024;
/// ...plus this fraction of the warm RSS.
const RSS_SLACK_FRACTION: f64 = 0.25;

fn scenario() -> Scenario {
    let mut text = format!("pcpus = {PCPUS}\n");
    for i in 0..CLIENTS {
        text.push_str(&format!("[[domain]]\nname = \"vm{i}\"\nvcpus = {VCPUS}\nload = {}\n", 10 + (i % 9) * 10));
    }
    common::scenario(&text)
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

struct Hist(Vec<u64>);

impl Hist {
    fn new() -> Hist {
        Hist(vec![0; BUCKETS])
    }
    fn add(&mut self, d: Duration) {
        let b = (d.as_micros() as u64 / BUCKET_US).min(BUCKETS as u64 - 1);
        self.0[b as usize] += 1;
    }
    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a += b;
        }
    }
    fn count(&self) -> u64 {
        self.0.iter().sum()
    }
    fn quantile_us(&self, q: f64) -> u64 {
        let target = (self.count() as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.0.iter().enumerate() {
            seen += n;
            if seen >= target {
                return (i as u64 + 1) * BUCKET_US;
            }
        }
        BUCKETS as u64 * BUCKET_US
    }
}

/// What one client saw.
struct ClientOutcome {
    /// The last pCPU pinned, per vCPU of its domain.
    last: Vec<Option<u32>>,
    unexpected: Vec<String>,
    stats: Hist,
    pins: Hist,
}

async fn client_loop(addr: String, me: usize, stop_at: Instant) -> ClientOutcome {
    let mut c = AgentClient::connect(format!("http://{addr}")).await.unwrap();
    let domain = format!("vm{me}");
    let mut out = ClientOutcome { last: vec![None; VCPUS as usize], unexpected: Vec::new(), stats: Hist::new(), pins: Hist::new() };
    let mut i: u64 = 0;
    while Instant::now() < stop_at {
        i += 1;
        let t = Instant::now();
        match c.get_stats(pb::GetStatsRequest {}).await {
            Ok(r) => {
                out.stats.add(t.elapsed());
                if r.into_inner().domains.len() != CLIENTS {
                    out.unexpected.push("GetStats: wrong domain count".into());
                }
            }
            Err(s) => out.unexpected.push(format!("GetStats: {s}")),
        }
        // A deterministic walk over (vCPU, pCPU) so every client keeps changing its placement.
        let vcpu = (i % VCPUS as u64) as u32;
        let pcpu = ((i * 7 + me as u64) % PCPUS as u64) as u32;
        let mut pins = vec![pb::PinVcpuRequest { domain: domain.clone(), vcpu, pcpus: vec![pcpu], persist: false }];
        let bad = i.is_multiple_of(BAD_EVERY);
        if bad {
            pins.push(pb::PinVcpuRequest { domain: format!("gone-{me}"), vcpu: 0, pcpus: vec![0], persist: false });
        }
        let t = Instant::now();
        match c.apply_pins(pb::ApplyPinsRequest { pins }).await {
            Ok(r) => {
                out.pins.add(t.elapsed());
                let res = r.into_inner().results;
                if res.first().map(|r| r.code) != Some(Code::Ok as i32) {
                    out.unexpected.push(format!("ApplyPins: own pin failed: {res:?}"));
                } else {
                    out.last[vcpu as usize] = Some(pcpu);
                }
                if bad && res.get(1).map(|r| r.code) != Some(Code::NotFound as i32) {
                    out.unexpected.push(format!("ApplyPins: unknown domain not NOT_FOUND: {res:?}"));
                }
            }
            Err(s) => out.unexpected.push(format!("ApplyPins: {s}")),
        }
        if bad {
            // Refused whole: the valid first pin must not be applied either (checked through the final placement).
            let pins = vec![
                pb::PinVcpuRequest { domain: domain.clone(), vcpu: 0, pcpus: vec![(me as u32) % PCPUS], persist: false },
                pb::PinVcpuRequest { domain: domain.clone(), vcpu: 1, pcpus: vec![PCPUS + 1], persist: false },
            ];
            match c.apply_pins(pb::ApplyPinsRequest { pins }).await {
                Err(s) if s.code() == Code::InvalidArgument => {}
                other => out.unexpected.push(format!("out-of-range batch: {other:?}")),
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_for_a_minute() {
    let secs: u64 = std::env::var("VCPU_LOAD_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SECS);
    let hv = Arc::new(SimHypervisor::new(&scenario(), "sim-load", Arc::new(MonotonicClock::new())));
    let agent = SimAgent::start_with(hv.clone(), "127.0.0.1:0").await;
    let start = Instant::now();
    let run = Duration::from_secs(secs);
    let stop_at = start + run;

    // RSS after a fifth of the run (connections open, buffers at their working size) against RSS at the end.
    let warm = tokio::spawn(async move {
        tokio::time::sleep(run / 5).await;
        rss_kib()
    });
    let tasks: Vec<_> =
        (0..CLIENTS).map(|me| tokio::spawn(client_loop(agent.addr.clone(), me, stop_at))).collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    let rss_warm = warm.await.unwrap();
    let rss_end = rss_kib();

    let unexpected: Vec<&String> = outcomes.iter().flat_map(|o| &o.unexpected).collect();
    assert!(unexpected.is_empty(), "{} unexpected errors, first: {:?}", unexpected.len(), &unexpected[..unexpected.len().min(5)]);

    // The final placement is the last pin each client applied to each vCPU of its domain.
    for (me, o) in outcomes.iter().enumerate() {
        let p = hv.with_host(|h, _| h.placement(&format!("vm{me}"))).unwrap();
        for v in &p.vcpus {
            if let Some(want) = o.last[v.index as usize] {
                assert_eq!(v.affinity, vec![want], "vm{me} vCPU {}", v.index);
            }
        }
        assert!(o.last.iter().all(Option::is_some), "client {me} pinned every vCPU at least once");
    }

    let limit = rss_warm + RSS_SLACK_KIB + (rss_warm as f64 * RSS_SLACK_FRACTION) as u64;
    assert!(rss_end <= limit, "RSS grew from {rss_warm} KiB (warm) to {rss_end} KiB (end), limit {limit} KiB");

    let (mut stats, mut pins) = (Hist::new(), Hist::new());
    for o in &outcomes {
        stats.merge(&o.stats);
        pins.merge(&o.pins);
    }
    let total = stats.count() + pins.count();
    eprintln!(
        "agent_load: {CLIENTS} clients, {:.1} s: {total} RPCs, {:.0} RPC/s; GetStats p50 {} µs p99 {} µs; \
         ApplyPins p50 {} µs p99 {} µs; RSS {rss_warm} KiB after warm-up, {rss_end} KiB at end",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        stats.quantile_us(0.5),
        stats.quantile_us(0.99),
        pins.quantile_us(0.5),
        pins.quantile_us(0.99),
    );
    agent.stop().await;
}
