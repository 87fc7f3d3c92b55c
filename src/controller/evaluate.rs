//! `vcpu-controller evaluate`: runs a policy on simulated hosts in virtual time and measures how well it balances.
//!
//! No sleeping and no gRPC: the runner drives [`SimHost`] and the same pure functions the per-host task uses
//! ([`usage::compute`], [`policy::decide`]) with a virtual clock that jumps one interval per round, so thousands of
//! rounds take milliseconds and every run of the same input gives the same output.
//!
//! The policy sees what an agent would report (with the scenario's measurement noise); the verdict is taken on the
//! exact usage, so noise cannot make a policy look balanced or unbalanced when it is not.
//!
//! Metrics, per scenario:
//! - `balanced_at`: the first round from which the true spread stays at or under the threshold until the end of
//!   the run (round 1 only takes the baseline, so 2 is the earliest); `None` if the last round is over it.
//! - `pins_until` / `pins_after`: pin changes applied in rounds up to and including `balanced_at`, and after it.
//!   Pins in round `balanced_at` count as "until": they are decided on the first balanced reading, typically
//!   pinning in place the vCPUs that were not pinned yet.
//! - `moves`: vCPUs that changed pCPU; `back_and_forth`: moves that undo the same vCPU's previous move (A→B then
//!   B→A).
//! - `final_spread`, `final_stddev`: over the allowed pCPUs in the last round, exact usage.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::controller::policy::{self, PolicyConfig, PolicyState};
use crate::controller::usage::{self, HostUsage};
use crate::hypervisor::sim::{Scenario, ScenarioError, SimHost};
use crate::model::{HostStats, PcpuId};

/// Default length of an evaluation: 300 rounds of 2 s are 10 simulated minutes, long enough for the phase cycles
/// of the shipped scenarios to repeat several times.
pub const DEFAULT_EVAL_ROUNDS: u64 = 300;
/// Default virtual interval between rounds, the same as the controller's.
pub const DEFAULT_EVAL_INTERVAL: Duration = crate::controller::host::DEFAULT_INTERVAL;

/// How one policy did on one scenario.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub policy: String,
    pub rounds: u64,
    pub balanced_at: Option<u64>,
    pub pins_until: u64,
    pub pins_after: u64,
    pub moves: u64,
    /// The most vCPUs moved in one round (bounded by `--max-moves`).
    pub most_moves_in_a_round: u64,
    pub back_and_forth: u64,
    pub final_spread: f64,
    pub final_stddev: f64,
}

fn sample(host: &mut SimHost, t: u64, exact: bool) -> HostStats {
    let domains = if exact { host.stats_exact(t) } else { host.stats(t) };
    HostStats {
        sample_time_ns: t,
        npcpus: host.npcpus(),
        online_pcpus: (0..host.npcpus()).collect(),
        agent_instance: "evaluate".into(),
        boot_id: String::new(),
        domains,
    }
}

/// (spread, population standard deviation) of the allowed pCPUs' usage.
fn spread_and_stddev(u: &HostUsage, reserved: &[PcpuId]) -> (f64, f64) {
    let loads: Vec<f64> = u.pcpus.iter().filter(|p| !reserved.contains(&p.id)).map(|p| p.usage).collect();
    if loads.is_empty() {
        return (0.0, 0.0);
    }
    let hi = loads.iter().cloned().fold(f64::MIN, f64::max);
    let lo = loads.iter().cloned().fold(f64::MAX, f64::min);
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    let var = loads.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / loads.len() as f64;
    (hi - lo, var.sqrt())
}

/// Runs `policy` on `scenario` for `rounds` rounds of `interval` virtual time.
pub fn evaluate(name: &str, scenario: &Scenario, policy: &PolicyConfig, rounds: u64, interval: Duration) -> ScenarioResult {
    let step = interval.as_nanos() as u64;
    let mut host = SimHost::new(scenario, 0);
    let mut state = PolicyState::default();
    let (mut prev, mut prev_exact): (Option<HostStats>, Option<HostStats>) = (None, None);
    // Per round: the true spread (None for the baseline round) and the pins applied.
    let mut spreads: Vec<Option<(f64, f64)>> = Vec::new();
    let mut pins: Vec<u64> = Vec::new();
    let mut last_move: HashMap<(String, u32), (PcpuId, PcpuId)> = HashMap::new();
    let (mut moves, mut back_and_forth, mut most_moves) = (0u64, 0u64, 0u64);
    for r in 1..=rounds {
        let t = r * step;
        let cur = sample(&mut host, t, false);
        let exact = sample(&mut host, t, true);
        spreads.push(
            usage::compute(prev_exact.as_ref(), &exact)
                .ok()
                .map(|u| spread_and_stddev(&u, &policy.constraints.reserved)),
        );
        let measured = usage::compute(prev.as_ref(), &cur);
        prev = Some(cur);
        prev_exact = Some(exact);
        let mut applied = 0;
        if let Ok(u) = measured {
            let (plan, next) = policy::decide(&u, policy, &state);
            state = next;
            if !plan.pins.is_empty() {
                let results = host.apply_pins(&plan.pins, t).expect("the policy only pins what the host reported");
                for (pin, res) in plan.pins.iter().zip(results) {
                    if res.is_ok() {
                        applied += 1;
                        state.record_applied(pin);
                    }
                }
                most_moves = most_moves.max(plan.moves.len() as u64);
                for m in &plan.moves {
                    moves += 1;
                    let key = (m.uuid.clone(), m.vcpu);
                    if last_move.get(&key) == Some(&(m.to, m.from)) {
                        back_and_forth += 1;
                    }
                    last_move.insert(key, (m.from, m.to));
                }
            }
        }
        pins.push(applied);
    }
    let threshold = policy.threshold;
    let last_bad = spreads.iter().rposition(|s| s.is_some_and(|(sp, _)| sp > threshold));
    let from = last_bad.map_or(0, |i| i + 1);
    let balanced_idx = (from..spreads.len()).find(|&i| spreads[i].is_some());
    let (final_spread, final_stddev) = spreads.iter().rev().find_map(|s| *s).unwrap_or((0.0, 0.0));
    let (pins_until, pins_after) = match balanced_idx {
        Some(i) => (pins[..=i].iter().sum(), pins[i + 1..].iter().sum()),
        None => (pins.iter().sum(), 0),
    };
    ScenarioResult {
        scenario: name.to_string(),
        policy: policy.kind.to_string(),
        rounds,
        balanced_at: balanced_idx.map(|i| i as u64 + 1),
        pins_until,
        pins_after,
        moves,
        most_moves_in_a_round: most_moves,
        back_and_forth,
        final_spread,
        final_stddev,
    }
}

/// Every `*.toml` in `dir`, by file name, parsed.
pub fn load_dir(dir: &Path) -> Result<Vec<(String, Scenario)>, ScenarioError> {
    let io = |error| ScenarioError::Io { path: dir.display().to_string(), error };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            Scenario::from_file(p).map(|s| (name, s))
        })
        .collect()
}

/// The results as a Markdown table.
pub fn table(results: &[ScenarioResult]) -> String {
    let mut s = String::from(
        "| scenario | policy | balanced at round | pin changes until | pin changes after | moves | back-and-forth | final spread | std-dev |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let at = r.balanced_at.map_or_else(|| "never".to_string(), |a| a.to_string());
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} |\n",
            r.scenario, r.policy, at, r.pins_until, r.pins_after, r.moves, r.back_and_forth, r.final_spread, r.final_stddev
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::policy::PolicyKind;
    use crate::hypervisor::sim::scenario::{builtin, BUILTIN};

    fn run(name: &str, kind: PolicyKind) -> ScenarioResult {
        evaluate(name, &builtin(name).unwrap(), &PolicyConfig::with_kind(kind), 120, DEFAULT_EVAL_INTERVAL)
    }

    #[test]
    fn same_input_same_output() {
        for (name, _) in BUILTIN {
            for k in PolicyKind::ALL {
                assert_eq!(run(name, k), run(name, k), "{name} {k}");
            }
        }
    }

    #[test]
    fn balanced_host_is_balanced_from_the_first_reading_and_untouched() {
        for k in PolicyKind::ALL {
            let r = run("balanced", k);
            assert_eq!((r.balanced_at, r.pins_until, r.pins_after, r.moves), (Some(2), 0, 0, 0), "{k}");
        }
    }

    #[test]
    fn all_on_one_one_move_per_round_versus_several() {
        // 8 vCPUs of 40 % on pCPU 0 of 4: six must leave. One move per round needs rounds 2..=7 to move them, so
        // the first balanced window is round 8. converge sees pCPU 0 saturated (every vCPU reads 12.5, not 40): it
        // first probes with one vCPU onto each other pCPU (round 2), then plans on what the next readings show
        // (rounds 3 and 4), and moves each of the six once.
        let g = run("all-on-one", PolicyKind::Guarded);
        assert_eq!((g.balanced_at, g.moves, g.pins_after), (Some(8), 6, 0), "{g:?}");
        let c = run("all-on-one", PolicyKind::Converge);
        assert_eq!((c.balanced_at, c.moves, c.pins_after), (Some(5), 6, 0), "{c:?}");
    }

    #[test]
    fn virtual_time_covers_the_requested_span() {
        // A phase change at 30 s must be seen by a run of 20 rounds of 2 s (40 s) and not by one of 10 (20 s).
        let sc = Scenario::parse(
            "pcpus = 2\n[[domain]]\nname = \"a\"\naffinity = [0]\nphases = [{ load = 5, secs = 30 }, { load = 90, secs = 1000 }]\n[[domain]]\nname = \"b\"\naffinity = [1]\nload = 10\n[[domain]]\nname = \"c\"\naffinity = [0]\nload = 5\n",
            "t",
        )
        .unwrap();
        let cfg = PolicyConfig::with_kind(PolicyKind::Guarded);
        assert_eq!(evaluate("t", &sc, &cfg, 10, Duration::from_secs(2)).moves, 0);
        assert_eq!(evaluate("t", &sc, &cfg, 20, Duration::from_secs(2)).moves, 1);
    }

    #[test]
    fn back_and_forth_is_counted() {
        // The literal rule mirrors heavy-light-unpinned's imbalance back and forth; the guard never does.
        let s = run("heavy-light-unpinned", PolicyKind::Seed);
        assert_eq!(s.balanced_at, None, "{s:?}");
        assert!(s.back_and_forth > 0 && s.back_and_forth < s.moves, "{s:?}");
        assert_eq!(run("heavy-light-unpinned", PolicyKind::Guarded).back_and_forth, 0);
    }

    /// Where converge uses more pin changes in all than `guarded`; POLICIES.md names exactly these. Balancing them
    /// needs exactly 8 and 39 to 43 pin changes ([`sixteen_on_eight_needs_exactly_eight_pin_changes`],
    /// [`random_64x200_needs_39_to_43_pin_changes`]); `guarded` uses 10 and 41 without balancing.
    const CONVERGE_MORE_PINS_THAN_GUARDED: [&str; 2] = ["random-64x200", "sixteen-on-eight"];

    /// The claims POLICIES.md makes for the default policy, on every file in scenarios/: it balances; earlier than
    /// `guarded` wherever `guarded` needs more than the first reading, and never later; with no back-and-forth;
    /// with no pin change once balanced; and with no more pin changes in all than `guarded`, except on the
    /// scenarios listed in [`CONVERGE_MORE_PINS_THAN_GUARDED`] (and on those, with more: the list stays exact).
    #[test]
    fn converge_is_never_behind_guarded_on_the_suite() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        for (name, sc) in load_dir(&dir).unwrap() {
            let r = |k| evaluate(&name, &sc, &PolicyConfig::with_kind(k), DEFAULT_EVAL_ROUNDS, DEFAULT_EVAL_INTERVAL);
            let (c, g) = (r(PolicyKind::Converge), r(PolicyKind::Guarded));
            let at = c.balanced_at.unwrap_or_else(|| panic!("{name}: converge never balanced: {c:?}"));
            match g.balanced_at {
                Some(2) => assert_eq!(at, 2, "{name}: {c:?} vs {g:?}"),
                Some(ga) => assert!(at < ga, "{name}: not earlier than guarded: {c:?} vs {g:?}"),
                None => {}
            }
            assert_eq!(c.back_and_forth, 0, "{name}: {c:?}");
            assert_eq!(c.pins_after, 0, "{name}: {c:?}");
            let (cp, gp) = (c.pins_until + c.pins_after, g.pins_until + g.pins_after);
            if CONVERGE_MORE_PINS_THAN_GUARDED.contains(&name.as_str()) {
                assert!(cp > gp, "{name}: no longer an exception, update POLICIES.md: {c:?} vs {g:?}");
            } else {
                assert!(cp <= gp, "{name}: converge used more pins: {c:?} vs {g:?}");
            }
        }
    }

    /// `--max-moves`: converge never moves more vCPUs in a round than allowed, and with 2 or more it still
    /// balances every scenario, with no back-and-forth and no pin change once balanced; it only takes longer.
    /// With 1 it cannot swap, and hosts that need swaps stay over the threshold (`noisy`, `sixteen-on-eight`,
    /// `random-64x200`), as they do under `guarded`; the others balance.
    #[test]
    fn converge_under_max_moves_keeps_to_it_and_still_balances() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let needs_swaps = ["noisy", "random-64x200", "sixteen-on-eight"];
        for (name, sc) in load_dir(&dir).unwrap() {
            let free = evaluate(&name, &sc, &PolicyConfig::with_kind(PolicyKind::Converge), DEFAULT_EVAL_ROUNDS, DEFAULT_EVAL_INTERVAL);
            for max in [1, 2, 4] {
                let mut cfg = PolicyConfig::with_kind(PolicyKind::Converge);
                cfg.constraints.max_moves = std::num::NonZeroUsize::new(max);
                let c = evaluate(&name, &sc, &cfg, DEFAULT_EVAL_ROUNDS, DEFAULT_EVAL_INTERVAL);
                assert!(c.most_moves_in_a_round <= max as u64, "{name}, --max-moves {max}: {c:?}");
                assert_eq!(c.back_and_forth, 0, "{name}, --max-moves {max}: {c:?}");
                assert_eq!(c.pins_after, 0, "{name}, --max-moves {max}: {c:?}");
                if max == 1 && needs_swaps.contains(&name.as_str()) {
                    assert_eq!(c.balanced_at, None, "{name} balanced with one move a round: update this test: {c:?}");
                    continue;
                }
                let at = c.balanced_at.unwrap_or_else(|| panic!("{name}, --max-moves {max}: never balanced: {c:?}"));
                assert!(at >= free.balanced_at.unwrap(), "{name}, --max-moves {max}: {c:?} vs {free:?}");
            }
            // Where the unlimited plan never moves more than 2 a round, the limit changes nothing.
            if free.most_moves_in_a_round <= 2 {
                let mut cfg = PolicyConfig::with_kind(PolicyKind::Converge);
                cfg.constraints.max_moves = std::num::NonZeroUsize::new(2);
                let c = evaluate(&name, &sc, &cfg, DEFAULT_EVAL_ROUNDS, DEFAULT_EVAL_INTERVAL);
                assert_eq!(c, free, "{name}");
            }
        }
    }

    /// How few pin changes *any* policy needs to balance a scenario. Applies to scenarios where every vCPU starts
    /// pinned to one pCPU with a constant load (the two exceptions above): a vCPU that gets no pin stays where it
    /// is, so the pins applied are at least the number of vCPUs whose final pCPU differs from the first, and that
    /// many pins, all in one round, reach that final placement. Loads are in tenths of a point (the scenarios
    /// round them so), and the total demand is below 90 % per pCPU, so in a placement with spread <= 10 no pCPU
    /// is saturated (a saturated one reads 100, which would put every other at 90 or more): a pCPU's true usage
    /// is the sum of its vCPUs' loads. With `lo` the freest pCPU's usage, spread <= 10 means every pCPU's sum is
    /// in `lo..=lo + 10`, and the sums add up to the total, so `lo` is one of few values.
    mod min_pins {
        use super::*;
        use crate::hypervisor::sim::LoadProfile;

        /// (pCPUs, per vCPU (load in tenths, first pCPU)).
        pub fn pinned_loads(sc: &Scenario) -> (usize, Vec<(u64, usize)>) {
            let mut v = Vec::new();
            for d in &sc.domains {
                let LoadProfile::Constant(l) = d.load else { panic!("{}: not a constant load", d.name) };
                let Some([p]) = d.affinity.as_deref() else { panic!("{}: not pinned to one pCPU", d.name) };
                let tenths = (l * 10.0).round();
                assert!((tenths - l * 10.0).abs() < 1e-6, "{}: load {l} is not in tenths", d.name);
                for _ in 0..d.vcpus {
                    v.push((tenths as u64, *p as usize));
                }
            }
            let n = sc.pcpus as usize;
            let total: u64 = v.iter().map(|x| x.0).sum();
            assert!(total < 900 * n as u64, "a balanced placement could saturate a pCPU: the argument fails");
            (n, v)
        }

        /// The `lo` values (tenths) a balanced placement can have: `n * lo <= total <= n * (lo + 100)`.
        pub fn lows(n: usize, v: &[(u64, usize)]) -> std::ops::RangeInclusive<u64> {
            let total: u64 = v.iter().map(|x| x.0).sum();
            let n = n as u64;
            total.div_ceil(n).saturating_sub(100)..=total / n
        }

        /// Can the vCPUs in `movers` be placed (anywhere, their own pCPU included) so that every pCPU's sum is in
        /// `lo..=lo + 100`, the others staying put? Depth-first, heaviest mover first, pCPUs with equal sums tried
        /// once (they are interchangeable once a mover may go anywhere).
        pub fn placeable(n: usize, v: &[(u64, usize)], movers: &[usize], lo: u64) -> bool {
            let hi = lo + 100;
            let mut sums = vec![0u64; n];
            for (i, &(l, p)) in v.iter().enumerate() {
                if !movers.contains(&i) {
                    sums[p] += l;
                }
            }
            if sums.iter().any(|&s| s > hi) {
                return false;
            }
            let mut loads: Vec<u64> = movers.iter().map(|&i| v[i].0).collect();
            loads.sort_unstable_by(|a, b| b.cmp(a));
            fn dfs(sums: &mut [u64], loads: &[u64], lo: u64, hi: u64) -> bool {
                let left: u64 = loads.iter().sum();
                if sums.iter().map(|&s| lo.saturating_sub(s)).sum::<u64>() > left {
                    return false;
                }
                let Some((&l, rest)) = loads.split_first() else { return true };
                let mut tried = Vec::new();
                for p in 0..sums.len() {
                    if sums[p] + l > hi || tried.contains(&sums[p]) {
                        continue;
                    }
                    tried.push(sums[p]);
                    sums[p] += l;
                    let ok = dfs(sums, rest, lo, hi);
                    sums[p] -= l;
                    if ok {
                        return true;
                    }
                }
                false
            }
            dfs(&mut sums, &loads, lo, hi)
        }

        /// The fewest vCPUs that must change pCPU for spread <= 10, by trying every set of movers of size 0, 1,
        /// ... in turn (exact; only for small hosts), and one such set; `None` if no placement is balanced.
        pub fn exact(n: usize, v: &[(u64, usize)]) -> Option<(usize, Vec<usize>)> {
            assert!(v.len() <= 20, "exhaustive search is for small hosts");
            for k in 0..=v.len() {
                let mut found = None;
                for mask in 0u32..(1 << v.len()) {
                    if mask.count_ones() as usize != k {
                        continue;
                    }
                    let movers: Vec<usize> = (0..v.len()).filter(|i| mask & (1 << i) != 0).collect();
                    if lows(n, v).any(|lo| placeable(n, v, &movers, lo)) {
                        found = Some(movers);
                        break;
                    }
                }
                if let Some(m) = found {
                    return Some((k, m));
                }
            }
            None
        }

        /// Fewest items of `items` whose sum reaches `need` (heaviest first is optimal); `usize::MAX` if none.
        fn fewest(items: &mut [u64], need: u64) -> usize {
            items.sort_unstable_by(|a, b| b.cmp(a));
            let mut s = 0;
            for (k, &x) in items.iter().enumerate() {
                if s >= need {
                    return k;
                }
                s += x;
            }
            if s >= need { items.len() } else { usize::MAX }
        }

        /// The fewest departures plus arrivals that can leave a pCPU with vCPUs `items` (summing to `sum`) in
        /// `lo..=hi`, arrivals weighing `lightest..=heaviest` each (see [`lower_bound`]). Every subset of `items`
        /// is tried, so this is for pCPUs with a handful of vCPUs.
        fn touches(items: &[u64], sum: u64, lo: u64, hi: u64, lightest: u64, heaviest: u64) -> usize {
            assert!(items.len() <= 16, "too many vCPUs on one pCPU to try every subset");
            let mut best = usize::MAX;
            for mask in 0u32..(1 << items.len()) {
                let gone: u64 = (0..items.len()).filter(|i| mask & (1 << i) != 0).map(|i| items[i]).sum();
                let rest = sum - gone;
                let k = mask.count_ones() as usize;
                // The fewest arrivals m with rest + m * lightest <= hi and rest + m * heaviest >= lo.
                let m = (0..=items.len() + 64).find(|&m| {
                    let m = m as u64;
                    rest + m * lightest <= hi && rest + m * heaviest >= lo
                });
                if let Some(m) = m {
                    best = best.min(k + m);
                }
            }
            best
        }

        /// A lower bound on the vCPUs that must change pCPU for spread <= 10, for hosts too big to search. For
        /// each possible `lo`, three counts, each a lower bound:
        /// - `out`: a pCPU whose vCPUs sum over `lo + 10` must lose at least the fewest of its own vCPUs that
        ///   cover the excess (arrivals only add to it); summed over pCPUs.
        /// - `in`: a pCPU under `lo` must receive at least the fewest vCPUs of the whole host (its own excluded)
        ///   that cover the deficit; summed. Each moved vCPU leaves one pCPU, so moves >= out, and arrives at one,
        ///   so moves >= in.
        /// - `touch / 2`: per pCPU, the fewest departures plus arrivals that can leave it in `lo..=lo + 10`
        ///   (departures: any subset of its vCPUs; `m` arrivals add between `m` × the lightest and `m` × the
        ///   heaviest load of the host), summed. A pCPU that must shed its heavy vCPUs and would then fall under
        ///   `lo` counts the arrival it then needs. Each move touches two pCPUs, so moves >= touch / 2.
        ///
        /// The bound is, over the possible `lo`, the least of the largest of the three.
        pub fn lower_bound(n: usize, v: &[(u64, usize)]) -> usize {
            let mut on: Vec<Vec<u64>> = vec![Vec::new(); n];
            for &(l, p) in v {
                on[p].push(l);
            }
            let sums: Vec<u64> = on.iter().map(|x| x.iter().sum()).collect();
            let lightest = v.iter().map(|x| x.0).min().unwrap_or(0);
            let heaviest = v.iter().map(|x| x.0).max().unwrap_or(0);
            lows(n, v)
                .map(|lo| {
                    let hi = lo + 100;
                    let (mut out, mut inn) = (0usize, 0usize);
                    for p in 0..n {
                        if sums[p] > hi {
                            out = out.saturating_add(fewest(&mut on[p].clone(), sums[p] - hi));
                        }
                        if sums[p] < lo {
                            let mut others: Vec<u64> = v.iter().filter(|x| x.1 != p).map(|x| x.0).collect();
                            inn = inn.saturating_add(fewest(&mut others, lo - sums[p]));
                        }
                    }
                    let touch = (0..n)
                        .map(|p| touches(&on[p], sums[p], lo, hi, lightest, heaviest))
                        .fold(0usize, usize::saturating_add);
                    out.max(inn).max(touch.div_ceil(2))
                })
                .min()
                .unwrap_or(0)
        }
    }

    fn scenario_file(name: &str) -> Scenario {
        Scenario::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios").join(format!("{name}.toml")))
            .unwrap()
    }

    /// sixteen-on-eight: exactly 8 pin changes are needed (and enough) to balance it. `guarded` uses 10 and never
    /// balances; converge uses more (POLICIES.md). So "balanced with fewer pin changes than guarded" is possible.
    #[test]
    fn sixteen_on_eight_needs_exactly_eight_pin_changes() {
        let (n, v) = min_pins::pinned_loads(&scenario_file("sixteen-on-eight"));
        let (k, movers) = min_pins::exact(n, &v).unwrap();
        assert_eq!(k, 8, "movers {movers:?}");
        let g = evaluate("sixteen-on-eight", &scenario_file("sixteen-on-eight"), &PolicyConfig::with_kind(PolicyKind::Guarded), DEFAULT_EVAL_ROUNDS, DEFAULT_EVAL_INTERVAL);
        assert!(k < (g.pins_until + g.pins_after) as usize, "{g:?}");
        // The bound below is sound but weaker here.
        assert!(min_pins::lower_bound(n, &v) <= k, "{}", min_pins::lower_bound(n, &v));
        // After converge's probe round (vm01 to pCPU 6, vm03 to 4, vm04 to 5, vm08 to 7: 4 pins), 5 more are
        // needed and enough: 9 in all, still fewer than guarded's 10. converge makes 8 more (12 in all).
        let mut after_probe = v.clone();
        for (vm, to) in [(0, 6), (2, 4), (3, 5), (7, 7)] {
            after_probe[vm].1 = to;
        }
        assert_eq!(min_pins::exact(n, &after_probe).unwrap().0, 5);
    }

    /// random-64x200: no placement with spread <= 10 is fewer than 39 pin changes away (a lower bound), and one
    /// is 43 away (below: found by a randomised greedy search outside the repository, checked here). So the
    /// minimum is 39 to 43. `guarded` uses 41 without balancing: whether any policy can balance this host with
    /// fewer pin changes than that is not decided by these numbers.
    #[test]
    fn random_64x200_needs_39_to_43_pin_changes() {
        let (n, v) = min_pins::pinned_loads(&scenario_file("random-64x200"));
        assert_eq!((n, v.len()), (64, 200));
        assert_eq!(min_pins::lower_bound(n, &v), 39);
        // (vCPU index = the domain r000..r199, new pCPU); every other vCPU stays where the scenario pins it.
        let moved: [(usize, usize); 43] = [
            (1, 45), (4, 3), (9, 35), (12, 14), (20, 63), (31, 23), (35, 19), (36, 59), (40, 14), (42, 56), (50, 44),
            (62, 10), (63, 34), (67, 5), (73, 41), (79, 41), (81, 54), (82, 41), (86, 9), (96, 63), (98, 9), (99, 30),
            (100, 47), (106, 57), (107, 46), (115, 30), (121, 42), (123, 17), (124, 47), (128, 16), (131, 11),
            (132, 60), (136, 36), (139, 16), (147, 25), (150, 7), (155, 7), (178, 15), (187, 25), (194, 28),
            (196, 48), (197, 30), (199, 20),
        ];
        let mut sums = vec![0u64; n];
        for (i, &(l, p)) in v.iter().enumerate() {
            let to = moved.iter().find(|m| m.0 == i).map_or(p, |m| m.1);
            assert!(moved.iter().all(|m| m.0 != i || m.1 != p), "r{i:03} does not change pCPU");
            sums[to] += l;
        }
        let (hi, lo) = (sums.iter().max().unwrap(), sums.iter().min().unwrap());
        assert!(hi - lo <= 100, "spread {} tenths", hi - lo);
    }

    /// 16 vCPUs of 5 to 60 % pinned at random on 8 pCPUs, read with 3 points of noise: a host that no placement
    /// balances (the best spread is 21.3). Not in scenarios/, whose every host can be balanced.
    const UNBALANCEABLE: &str =
        "pcpus = 8\nnoise = 3\nseed = 104\nrandom = { seed = 36, vcpus = 16, min = 5, max = 60 }\n";

    /// On a host it cannot balance, converge reaches its best within a few rounds and then changes nothing: noise
    /// around that level moves no pin (`PolicyState::stalled`). Before that hold, it made 75 pin changes in 300
    /// rounds there, 20 of them back-and-forth; `guarded` still churns.
    #[test]
    fn converge_stops_at_its_best_on_a_host_that_cannot_be_balanced() {
        let sc = Scenario::parse(UNBALANCEABLE, "unbalanceable").unwrap();
        let (n, v) = min_pins::pinned_loads(&sc);
        let all: Vec<usize> = (0..v.len()).collect();
        assert!(min_pins::lows(n, &v).all(|lo| !min_pins::placeable(n, &v, &all, lo)), "a placement balances it");
        let run = |k, rounds| evaluate("unbalanceable", &sc, &PolicyConfig::with_kind(k), rounds, DEFAULT_EVAL_INTERVAL);
        let c = run(PolicyKind::Converge, 300);
        assert_eq!((c.balanced_at, c.back_and_forth), (None, 0), "{c:?}");
        assert_eq!(run(PolicyKind::Converge, 20).moves, c.moves, "converge still moved after round 20: {c:?}");
        let g = run(PolicyKind::Guarded, 300);
        assert!(g.back_and_forth > 0 && g.moves > 2 * c.moves, "guarded: {g:?}");
    }

    /// The search and the bound on hosts small enough to check by hand.
    #[test]
    fn min_pins_on_small_hosts() {
        // 4 x 40 on pCPU 0 of 2: two must leave (80 / 80).
        let v = vec![(400, 0); 4];
        assert_eq!(min_pins::exact(2, &v).unwrap().0, 2);
        assert_eq!(min_pins::lower_bound(2, &v), 2);
        // Already balanced: nothing.
        let v = vec![(500, 0), (300, 1), (250, 1)];
        assert_eq!(min_pins::exact(2, &v).unwrap().0, 0);
        // 60 + 20 on 2 pCPUs: no placement is within 10.
        let v = vec![(600, 0), (200, 0)];
        assert_eq!(min_pins::lows(2, &v), 300..=400);
        assert_eq!(min_pins::exact(2, &v), None);
        // 3 x 30 on 0, 10 on 1, of 3 pCPUs: one 30 to each of 1 and 2 (30 / 40 / 30).
        let v = vec![(300, 0), (300, 0), (300, 0), (100, 1)];
        assert_eq!(min_pins::exact(3, &v).unwrap().0, 2);
        assert_eq!(min_pins::lower_bound(3, &v), 2);
    }

    #[test]
    fn table_has_a_row_per_result() {
        let rs = vec![run("balanced", PolicyKind::Seed), run("all-on-one", PolicyKind::Converge)];
        let t = table(&rs);
        assert_eq!(t.lines().count(), 4);
        assert!(t.contains("| all-on-one | converge | 5 |"), "{t}");
    }
}
