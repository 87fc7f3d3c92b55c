//! Policy decision time for one host of 1,000 vCPUs on 128 pCPUs (BENCHMARKS.md, "Policy decision time").
//! Run: `cargo bench --bench policy`.
//!
//! Measured in the same criterion run, on the same two samples:
//! - `decide`: [`policy::decide`] on a precomputed usage with an empty state (the policy alone, on a host's first
//!   round: everything it remembers is new);
//! - `decide_steady`: the same, with the state the first decision left (every later round of a host);
//! - `decide_in_place`: [`policy::decide_mut`] from that same state, what the per-host task calls every round (it
//!   updates the state and smooths the usage in place; the copies it starts from are made outside the timing);
//! - `usage+decide`: [`usage::compute`] then [`policy::decide`], what a round computes between its two RPCs;
//! - `usage_reusing`: [`usage::compute_reusing`] with the last round's usage (the way a round that saw a change
//!   goes);
//! - `usage_in_place`: [`usage::compute_into`] over the last round's usage, what the per-host task computes in a
//!   steady round;
//! - baselines: `usage::compute` alone, and `single_pass`, one pass over the vCPUs that sums usage per pCPU and
//!   finds the busiest and freest pCPU (the least any policy must do).
//!
//! Four placements: `pinned` (every vCPU already pinned where it runs, unbalanced so one vCPU moves), `unpinned`
//! (every vCPU may run anywhere: the first decision pins all 1,000), `balanced` (pinned, within the threshold:
//! what most hosts cost in most rounds, and what the fleet bench's hosts are) and `saturated` (pinned, half the
//! pCPUs at 99 % with 11 vCPUs each, the rest at 40–50 %: `converge` probes, which the other inputs never make it do,
//! because their pCPUs are either all saturated or none).
//!
//! One more input, for `converge` only: `stuck`, the readings where `converge` stopped on POLICIES.md's random host
//! r16x32-s1 (16 pCPUs, 32 vCPUs, spread 13.4), eight times over on 128 pCPUs (256 vCPUs). No step, trade or
//! shedding plan helps there, so it places the whole host from scratch (`policy::partition`), the round's
//! costliest path; `decide` is timed from the state of a host that was over the threshold the round before (from an
//! empty state it would hold for a round), beside the same baselines.
//!
//! And `pinned_max_moves`: `converge`'s `pinned` round under `--max-moves 8` and `64` (`policy::cap` choosing the
//! part of the plan to make), beside the same round with no limit.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use vcpu_balancer::controller::policy::{self, PolicyConfig};
use vcpu_balancer::controller::usage;
use vcpu_balancer::model::{DomainStats, HostStats, VcpuStats};

// The controller's allocator (controller/main.rs), so that a figure and its floor in this process are measured as
// the controller runs in production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VCPUS: u32 = 1000;
const PCPUS: u32 = 128;
const VCPUS_PER_DOMAIN: u32 = 4;
/// Usage of every vCPU in the `balanced` placement: pCPUs then carry 7 or 8 vCPUs, 70 or 80 %, a spread of 10
/// points, which no policy acts on.
const BALANCED_USAGE: u64 = 10;
/// `saturated` placement: the first [`SATURATED_PCPUS`] pCPUs carry [`SATURATED_PER_PCPU`] vCPUs of
/// [`SATURATED_USAGE`] % each (99 %: they read saturated, every vCPU at the same capped share), the other pCPUs
/// the remaining vCPUs at [`BALANCED_USAGE`] %. `converge` probes there: its other rounds' path.
const SATURATED_PCPUS: u32 = 64;
const SATURATED_PER_PCPU: u32 = 11;
const SATURATED_USAGE: u64 = 9;
/// One second between the two samples.
const ELAPSED_NS: u64 = 1_000_000_000;

/// Two samples one second apart. vCPU `k` runs on pCPU `k % PCPUS`, with a usage from a fixed pseudo-random
/// sequence (5–95 %), so pCPU loads differ and the policy has a move to make.
fn samples(pinned: bool, balanced: bool, saturated: bool) -> (HostStats, HostStats) {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut prev = Vec::new();
    let mut cur = Vec::new();
    for d in 0..VCPUS / VCPUS_PER_DOMAIN {
        let mut pv = Vec::new();
        let mut cv = Vec::new();
        for i in 0..VCPUS_PER_DOMAIN {
            let k = d * VCPUS_PER_DOMAIN + i;
            let crowded = SATURATED_PCPUS * SATURATED_PER_PCPU;
            let (pcpu, usage_pct) = if saturated && k < crowded {
                (k % SATURATED_PCPUS, SATURATED_USAGE)
            } else if saturated {
                (SATURATED_PCPUS + (k - crowded) % (PCPUS - SATURATED_PCPUS), BALANCED_USAGE)
            } else if balanced {
                (k % PCPUS, BALANCED_USAGE)
            } else {
                (k % PCPUS, 5 + next() % 91)
            };
            let t0 = 1_000_000_000_000 + u64::from(k) * 1_000_000;
            let affinity = if pinned { vec![pcpu] } else { (0..PCPUS).collect() };
            pv.push(VcpuStats { index: i, time_ns: t0, pcpu, affinity: affinity.clone() });
            cv.push(VcpuStats { index: i, time_ns: t0 + usage_pct * ELAPSED_NS / 100, pcpu, affinity });
        }
        // Random-looking, as libvirt's (v4) and the simulator's UUIDs are: a shared prefix would make every key
        // comparison in the policy's maps scan it.
        let (a, b) = (next(), next());
        let uuid = format!("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", a >> 32, (a >> 16) & 0xffff, a & 0xfff, b >> 52, b & 0xffff_ffff_ffff);
        let name = format!("vm{d:04}");
        prev.push(DomainStats { uuid: uuid.clone(), name: name.clone(), id: d + 1, cpu_time_ns: 0, vcpus: pv });
        cur.push(DomainStats { uuid, name, id: d + 1, cpu_time_ns: 0, vcpus: cv });
    }
    one_second_apart(prev, cur)
}

/// Two samples of a host of [`PCPUS`] online pCPUs, [`ELAPSED_NS`] apart.
fn one_second_apart(prev: Vec<DomainStats>, cur: Vec<DomainStats>) -> (HostStats, HostStats) {
    let host = |t, domains| HostStats {
        sample_time_ns: t,
        npcpus: PCPUS,
        online_pcpus: (0..PCPUS).collect(),
        agent_instance: "bench".into(),
        boot_id: String::new(),
        domains,
    };
    (host(ELAPSED_NS, prev), host(2 * ELAPSED_NS, cur))
}

/// (pCPU, usage %) of the 32 vCPUs of r16x32-s1 where `converge` stopped on it before it could place a host from
/// scratch (the same readings as `a_host_stuck_over_the_threshold_is_placed_from_scratch` in `converge.rs`).
const STUCK: [(u32, f64); 32] = [
    (0, 35.1), (0, 33.5), (1, 10.3), (1, 51.3), (2, 55.0), (2, 6.9), (3, 35.9), (3, 30.0), (4, 20.0), (4, 18.7),
    (4, 17.1), (5, 38.4), (5, 17.4), (6, 53.8), (6, 7.0), (7, 18.6), (7, 37.5), (8, 46.8), (8, 11.9), (9, 14.6),
    (9, 42.2), (10, 11.5), (10, 47.4), (11, 56.6), (12, 55.2), (13, 5.9), (13, 36.8), (13, 13.6), (14, 17.1),
    (14, 45.2), (15, 33.7), (15, 29.1),
];

/// The `stuck` input: [`STUCK`] on pCPUs 0–15, again on 16–31, and so on up to 127; one pinned vCPU per domain.
fn stuck_samples() -> (HostStats, HostStats) {
    let (mut prev, mut cur) = (Vec::new(), Vec::new());
    for copy in 0..PCPUS / 16 {
        for (i, &(p, pct)) in STUCK.iter().enumerate() {
            let k = copy * 32 + u32::try_from(i).expect("32");
            let pcpu = copy * 16 + p;
            let t0 = 1_000_000_000_000 + u64::from(k) * 1_000_000;
            // Tenths of a point, exactly: 35.1 % of a second is 351,000,000 ns.
            let used = (pct * 10.0).round() as u64 * ELAPSED_NS / 1000;
            let v = |t| VcpuStats { index: 0, time_ns: t, pcpu, affinity: vec![pcpu] };
            let uuid = format!("{k:08x}-5a1e-4000-8000-{:012x}", u64::from(k).wrapping_mul(0x9e37_79b9));
            let name = format!("stuck{k:03}");
            prev.push(DomainStats { uuid: uuid.clone(), name: name.clone(), id: k + 1, cpu_time_ns: 0, vcpus: vec![v(t0)] });
            cur.push(DomainStats { uuid, name, id: k + 1, cpu_time_ns: 0, vcpus: vec![v(t0 + used)] });
        }
    }
    one_second_apart(prev, cur)
}

/// The least work any policy needs: per-pCPU sums, then the busiest and freest pCPU.
fn single_pass(u: &usage::HostUsage) -> (u32, u32) {
    let mut sums = vec![0.0f64; PCPUS as usize];
    for v in &u.vcpus {
        if let (Some(x), Some(s)) = (v.usage, sums.get_mut(v.pcpu as usize)) {
            *s += x;
        }
    }
    let mut hi = 0;
    let mut lo = 0;
    for (i, &s) in sums.iter().enumerate() {
        if s > sums[hi] {
            hi = i;
        }
        if s < sums[lo] {
            lo = i;
        }
    }
    (hi as u32, lo as u32)
}

fn bench(c: &mut Criterion) {
    for kind in [policy::PolicyKind::Guarded, policy::PolicyKind::Converge] {
        let cfg = PolicyConfig { kind, ..PolicyConfig::default() };
        let placements =
            [("pinned", true, false, false), ("unpinned", false, false, false), ("balanced", true, true, false), ("saturated", true, false, true)];
        for (label, pinned, balanced, saturated) in placements {
            let (prev, cur) = samples(pinned, balanced, saturated);
            let u = usage::compute(Some(&prev), &cur).expect("two samples of the same agent, time advanced");
            let plan = policy::decide_once(&u, &cfg);
            assert_eq!(plan.moves.is_empty(), balanced, "the bench input must make the policy move a vCPU, unless balanced");
            if saturated && kind == policy::PolicyKind::Converge {
                assert!(plan.reason.contains("newly saturated"), "the saturated input must make converge probe: {}", plan.reason);
            }
            let mut g = c.benchmark_group(format!("policy_{kind}_1000vcpus_128pcpus_{label}"));
            g.bench_function("decide", |b| b.iter(|| policy::decide_once(black_box(&u), black_box(&cfg))));
            // What a host costs every round once the controller has seen it: the state after one decision on the same
            // readings (the policy's memory is filled, nothing came or went).
            let (_, state) = policy::decide(&u, &cfg, &policy::PolicyState::default());
            g.bench_function("decide_steady", |b| {
                b.iter(|| policy::decide(black_box(&u), black_box(&cfg), black_box(&state)))
            });
            g.bench_function("decide_in_place", |b| {
                b.iter_batched_ref(
                    || (u.clone(), state.clone()),
                    |(u, state)| policy::decide_mut(u, black_box(&cfg), state),
                    BatchSize::SmallInput,
                )
            });
            g.bench_function("usage_reusing", |b| {
                b.iter(|| usage::compute_reusing(Some(black_box(&prev)), black_box(&cur), Some(black_box(&u))))
            });
            // `last` is the usage of the round before, as the per-host task keeps it; its copy is made outside the
            // timing, and the result is dropped outside it too (the task keeps it for the next round).
            g.bench_function("usage_in_place", |b| {
                b.iter_batched(
                    || u.clone(),
                    |last| usage::compute_into(Some(black_box(&prev)), black_box(&cur), last),
                    BatchSize::SmallInput,
                )
            });
            g.bench_function("usage+decide", |b| {
                b.iter(|| {
                    let u = usage::compute(Some(black_box(&prev)), black_box(&cur)).expect("valid samples");
                    policy::decide_once(&u, &cfg)
                })
            });
            g.bench_function("baseline_usage_compute", |b| {
                b.iter(|| usage::compute(Some(black_box(&prev)), black_box(&cur)))
            });
            g.bench_function("baseline_single_pass", |b| b.iter(|| single_pass(black_box(&u))));
            g.finish();
        }
    }

    let cfg = PolicyConfig { kind: policy::PolicyKind::Converge, ..PolicyConfig::default() };
    let (prev, cur) = stuck_samples();
    let u = usage::compute(Some(&prev), &cur).expect("two samples of the same agent, time advanced");
    let over = policy::PolicyState { was_over: true, ..Default::default() };
    let (plan, _) = policy::decide(&u, &cfg, &over);
    assert!(plan.reason.contains("re-partition"), "the stuck input must make converge place it from scratch: {}", plan.reason);
    let mut g = c.benchmark_group("policy_converge_256vcpus_128pcpus_stuck");
    g.bench_function("decide", |b| b.iter(|| policy::decide(black_box(&u), black_box(&cfg), black_box(&over))));
    g.bench_function("baseline_usage_compute", |b| b.iter(|| usage::compute(Some(black_box(&prev)), black_box(&cur))));
    g.bench_function("baseline_single_pass", |b| b.iter(|| single_pass(black_box(&u))));
    g.finish();

    // `--max-moves`: the `pinned` round of `converge`, its plan cut to 8 and to 64 moves, beside the same round
    // uncut (the baseline: `decide` of `policy_converge_1000vcpus_128pcpus_pinned`, timed again in this group).
    let (prev, cur) = samples(true, false, false);
    let u = usage::compute(Some(&prev), &cur).expect("two samples of the same agent, time advanced");
    let free = PolicyConfig { kind: policy::PolicyKind::Converge, ..PolicyConfig::default() };
    let planned = policy::decide_once(&u, &free).moves.len();
    eprintln!("converge plans {planned} moves on the pinned input");
    let mut g = c.benchmark_group("policy_converge_1000vcpus_128pcpus_pinned_max_moves");
    g.bench_function("decide_no_limit", |b| b.iter(|| policy::decide_once(black_box(&u), black_box(&free))));
    for max in [8, 64] {
        let mut cfg = free.clone();
        cfg.constraints.max_moves = std::num::NonZeroUsize::new(max);
        let plan = policy::decide_once(&u, &cfg);
        assert!(planned > max && plan.moves.len() <= max, "the plan ({planned} moves) must be cut to {max}: {}", plan.reason);
        g.bench_function(format!("decide_max_{max}"), |b| b.iter(|| policy::decide_once(black_box(&u), black_box(&cfg))));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
