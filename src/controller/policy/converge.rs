//! `converge`: reach balance in as few rounds and pin changes as possible, then change nothing.
//!
//! Each round it plans on the measured usage, step by step, re-evaluating loads after every step:
//! 1. Movable vCPUs found on reserved pCPUs go to the least loaded allowed pCPU, heaviest first.
//! 2. While the spread exceeds the threshold, it takes one step between two pCPUs `p` (busier) and `q`, with gap
//!    `g = load(p) − load(q)`: either a *move* of a vCPU of usage `u` from `p` to `q`, or a *swap* of a vCPU `a`
//!    on `p` with a lighter vCPU `b` on `q` (net transfer `d = u_a − u_b`). Only steps with `0 < d < g` are
//!    taken: like the guard, every step strictly lowers the sum of squared pCPU loads and never widens the spread,
//!    so steps cannot cycle. Among them it prefers a step that brings the pair within the threshold with the fewest
//!    pin changes (a move before a swap), else the one that narrows the pair the most. The pair is the busiest and
//!    the freest pCPU first; if no step helps there, the busiest with the next freest ones, then the freest with
//!    the next busiest ones (a heavy vCPU alone on the busiest pCPU does not block the rest of the host).
//! 3. A step must narrow its pair's gap by at least [`MIN_STEP_GAIN`] points: moving a pin for less is churn.
//! 4. A vCPU moved in the last [`COOLDOWN_ROUNDS`] rounds is not moved again. After a move, the usage read on a
//!    pCPU that was saturated changes (its vCPUs were starved), and acting on the first reading after a move
//!    would chase transients; the cooldown stops a vCPU going A→B→A on them.
//!
//!    For [`NO_RETURN_ROUNDS`] rounds, a vCPU is not moved back to the pCPU it was last moved off either: a
//!    reading that says otherwise that soon is more likely a starved vCPU's reading than a real change, and
//!    A→B→A is exactly the churn operators do not want.
//! 5. It plans on smoothed usage: an exponential moving average per vCPU (weight [`SMOOTHING`] on the new
//!    reading), restarted from the raw reading whenever that differs from the average by more than
//!    [`SMOOTHING_RESET`] points. Noise of a few points is averaged away, so a balanced host is not churned by it;
//!    a real change (a load phase, a starved vCPU that gets room) is taken at once, so smoothing costs no round.
//!
//! 6. A small excess (spread at most [`HOLD_FACTOR`] × threshold) is acted on only if the previous round was over
//!    the threshold too: one noisy reading does not move anything, a real imbalance costs at most one round, and
//!    a large one is acted on at once.
//!
//! The vCPUs' final places are compared with where they run: a vCPU moved several times within one round gets one
//! pin, and one moved back to where it started gets none.

use std::collections::BTreeMap;

use crate::controller::policy::{Decision, PolicyState, VcpuKey, View};
use crate::controller::usage::HostUsage;
use crate::model::PcpuId;

/// Rounds during which a vCPU that was moved stays where it was put.
pub const COOLDOWN_ROUNDS: u64 = 2;
/// Spreads up to this many times the threshold must be seen twice in a row before anything moves.
pub const HOLD_FACTOR: f64 = 2.0;
/// Rounds during which a moved vCPU is not moved back to the pCPU it left.
pub const NO_RETURN_ROUNDS: u64 = 30;
/// Smallest narrowing of a pair's gap, in points, worth a pin change.
pub const MIN_STEP_GAIN: f64 = 3.0;

/// Weight of a new reading in the moving average.
pub const SMOOTHING: f64 = 0.3;
/// A reading this many points away from the average is a change, not noise: the average restarts from it.
pub const SMOOTHING_RESET: f64 = 15.0;

/// `u` with each known vCPU usage replaced by its moving average (updated in `avg`), and pCPU sums redone.
pub fn smooth(u: &HostUsage, avg: &mut BTreeMap<VcpuKey, f64>) -> HostUsage {
    let mut out = u.clone();
    for v in &mut out.vcpus {
        let key = (v.uuid.clone(), v.vcpu);
        match v.usage {
            Some(raw) => {
                let s = match avg.get(&key) {
                    Some(&a) if (raw - a).abs() <= SMOOTHING_RESET => a + SMOOTHING * (raw - a),
                    _ => raw,
                };
                avg.insert(key, s);
                v.usage = Some(s);
            }
            None => {
                avg.remove(&key);
            }
        }
    }
    for p in &mut out.pcpus {
        p.usage = out.vcpus.iter().filter(|v| v.pcpu == p.id).filter_map(|v| v.usage).fold(0.0, |a, b| a + b);
    }
    out
}

/// A movable vCPU while planning: index into `u.vcpus`, where it is in the plan, its usage.
#[derive(Debug, Clone, Copy)]
struct Slot {
    idx: usize,
    pcpu: PcpuId,
    usage: f64,
    /// A pCPU it must not go back to.
    not_to: Option<PcpuId>,
}

/// One planned step: slot `a` goes from `p` to `q`; with `b`, slot `b` goes from `q` to `p` (a swap).
#[derive(Debug, Clone, Copy)]
struct Step {
    a: usize,
    b: Option<usize>,
    p: PcpuId,
    q: PcpuId,
    new_gap: f64,
}

impl Step {
    fn pins(&self) -> u32 {
        1 + u32::from(self.b.is_some())
    }
}

/// One round of `converge`.
pub fn decide(v: &View<'_>, threshold: f64, state: &PolicyState) -> Decision {
    let this_round = state.round + 1;
    let cooling = |i: usize| {
        let x = v.vcpu(i);
        state.last_moved.get(&(x.uuid.clone(), x.vcpu)).is_some_and(|&(r, _)| this_round - r <= COOLDOWN_ROUNDS)
    };
    // Where each vCPU may not go back to this round.
    let left: Vec<Option<PcpuId>> = v
        .u
        .vcpus
        .iter()
        .map(|x| match state.last_moved.get(&(x.uuid.clone(), x.vcpu)) {
            Some(&(r, from)) if this_round - r <= NO_RETURN_ROUNDS => Some(from),
            _ => None,
        })
        .collect();
    let mut load: BTreeMap<PcpuId, f64> =
        v.load.iter().filter(|(id, _)| v.allowed.contains(id)).copied().collect();
    let stranded = v.stranded();
    let mut slots: Vec<Slot> = v
        .movable
        .iter()
        .copied()
        .filter(|&i| stranded.contains(&i) || !cooling(i))
        .map(|i| Slot { idx: i, pcpu: v.vcpu(i).pcpu, usage: v.vcpu(i).usage.unwrap_or(0.0), not_to: left[i] })
        .collect();
    let start: Vec<PcpuId> = slots.iter().map(|s| s.pcpu).collect();
    let mut notes = Vec::new();

    // 1. Off the reserved pCPUs, heaviest first, each to the least loaded allowed pCPU at that point.
    let mut off: Vec<usize> = (0..slots.len()).filter(|&s| !v.allowed.contains(&slots[s].pcpu)).collect();
    off.sort_by(|&a, &b| slots[b].usage.total_cmp(&slots[a].usage).then(a.cmp(&b)));
    for s in &off {
        if let Some((_, (to, _))) = super::extremes(load.iter().map(|(k, x)| (*k, *x))) {
            slots[*s].pcpu = to;
            *load.get_mut(&to).expect("target is allowed") += slots[*s].usage;
        }
    }
    if !off.is_empty() {
        notes.push(format!("{} vCPU(s) moved off reserved pCPUs", off.len()));
    }

    // 2. Steps until balanced or stuck. Each step lowers the sum of squares, so this ends; the cap is a backstop.
    let (mut moves, mut swaps) = (0u32, 0u32);
    let max_steps = 4 * slots.len() + 4;
    let mut stuck = None;
    let before = spread_of(&load);
    let hold = off.is_empty() && before > threshold && before <= HOLD_FACTOR * threshold && !state.was_over;
    for _ in 0..if hold { 0 } else { max_steps } {
        let Some(((b, hi), (f, lo))) = super::extremes(load.iter().map(|(k, x)| (*k, *x))) else { break };
        if hi - lo <= threshold {
            break;
        }
        let Some(step) = find_step(&slots, &load, b, f, threshold) else {
            stuck = Some(hi - lo);
            break;
        };
        let da = slots[step.a].usage;
        slots[step.a].pcpu = step.q;
        let db = step.b.map_or(0.0, |s| {
            slots[s].pcpu = step.p;
            slots[s].usage
        });
        *load.get_mut(&step.p).expect("allowed") -= da - db;
        *load.get_mut(&step.q).expect("allowed") += da - db;
        if step.b.is_some() {
            swaps += 1;
        } else {
            moves += 1;
        }
    }
    let after = spread_of(&load);
    let planned: Vec<(usize, PcpuId)> =
        slots.iter().zip(&start).filter(|(s, from)| s.pcpu != **from).map(|(s, _)| (s.idx, s.pcpu)).collect();
    let mut reason = if hold {
        format!("hold: spread {before:.1} > {threshold:.1} for the first round; acting if it persists")
    } else if moves + swaps == 0 && stuck.is_none() {
        format!("balanced: spread {before:.1} <= threshold {threshold:.1}")
    } else if moves + swaps == 0 {
        format!(
            "spread {before:.1} > {threshold:.1} but no move or swap narrows it by {MIN_STEP_GAIN:.0} point(s) or more (vCPUs moved in the last {COOLDOWN_ROUNDS} rounds stay put)"
        )
    } else {
        format!(
            "spread {before:.1} > {threshold:.1}: {moves} move(s) and {swaps} swap(s), {} pin change(s), expected spread {after:.1}",
            planned.len()
        )
    };
    if let Some(s) = stuck.filter(|_| moves + swaps > 0) {
        reason.push_str(&format!(" (best reachable this round: {s:.1})"));
    }
    for n in notes {
        reason.push_str("; ");
        reason.push_str(&n);
    }
    Decision { moves: planned, reason }
}

fn spread_of(load: &BTreeMap<PcpuId, f64>) -> f64 {
    super::extremes(load.iter().map(|(k, x)| (*k, *x))).map_or(0.0, |((_, hi), (_, lo))| hi - lo)
}

/// The first pair, in the documented order, that has a useful step, and its best step.
fn find_step(slots: &[Slot], load: &BTreeMap<PcpuId, f64>, b: PcpuId, f: PcpuId, threshold: f64) -> Option<Step> {
    let mut asc: Vec<(PcpuId, f64)> = load.iter().map(|(k, x)| (*k, *x)).collect();
    asc.sort_by(|x, y| x.1.total_cmp(&y.1).then(x.0.cmp(&y.0)));
    let mut desc = asc.clone();
    desc.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    std::iter::once((b, f))
        .chain(asc.iter().filter(|(q, _)| *q != b && *q != f).map(|(q, _)| (b, *q)))
        .chain(desc.iter().filter(|(p, _)| *p != b && *p != f).map(|(p, _)| (*p, f)))
        .find_map(|(p, q)| best_step(slots, load[&p] - load[&q], p, q, threshold))
}

/// The best step between `p` and `q` (gap `g > 0`), if any narrows the gap by at least [`MIN_STEP_GAIN`].
fn best_step(slots: &[Slot], g: f64, p: PcpuId, q: PcpuId, threshold: f64) -> Option<Step> {
    if g <= 0.0 {
        return None;
    }
    let on = |c: PcpuId| (0..slots.len()).filter(move |&s| slots[s].pcpu == c);
    let mut cands = Vec::new();
    for a in on(p).filter(|&a| slots[a].not_to != Some(q)) {
        let ua = slots[a].usage;
        if ua > 0.0 && ua < g {
            cands.push(Step { a, b: None, p, q, new_gap: (g - 2.0 * ua).abs() });
        }
        for b in on(q).filter(|&b| slots[b].not_to != Some(p)) {
            let d = ua - slots[b].usage;
            if d > 0.0 && d < g {
                cands.push(Step { a, b: Some(b), p, q, new_gap: (g - 2.0 * d).abs() });
            }
        }
    }
    cands.retain(|s| g - s.new_gap >= MIN_STEP_GAIN);
    // Within the threshold: fewest pins first, then the closest. Otherwise: the closest, then fewest pins.
    cands.into_iter().min_by(|x, y| {
        let key = |s: &Step| {
            let ok = s.new_gap <= threshold;
            (!ok, if ok { s.pins() } else { 0 }, s.new_gap, s.pins(), s.a, s.b)
        };
        let (kx, ky) = (key(x), key(y));
        kx.0.cmp(&ky.0)
            .then(kx.1.cmp(&ky.1))
            .then(kx.2.total_cmp(&ky.2))
            .then(kx.3.cmp(&ky.3))
            .then(kx.4.cmp(&ky.4))
            .then(kx.5.cmp(&ky.5))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::policy::tests::{apply, arb_host, cfg, host, with_loads};
    use crate::controller::policy::{decide, decide_once, PolicyKind};
    use proptest::prelude::*;

    fn converge() -> crate::controller::policy::PolicyConfig {
        cfg(PolicyKind::Converge)
    }

    fn spread(v: &[f64]) -> f64 {
        v.iter().cloned().fold(f64::MIN, f64::max) - v.iter().cloned().fold(f64::MAX, f64::min)
    }

    #[test]
    fn all_on_one_is_spread_in_one_round() {
        let names: Vec<String> = (0..8).map(|i| format!("vm{i}")).collect();
        let spec: Vec<(&str, u32, f64, bool)> = names.iter().map(|n| (n.as_str(), 0, 12.5, true)).collect();
        let h = host(4, &spec);
        let p = decide_once(&h, &converge());
        assert_eq!(p.moves.len(), 6, "{p:?}");
        assert_eq!(spread(&apply(&h, &p)), 0.0);
    }

    #[test]
    fn a_swap_beats_two_moves_when_moves_cannot_balance() {
        // {55, 55} vs {20, 20}: moving a 55 mirrors nothing useful (gap 70 -> 40), a swap of 55 and 20 closes it.
        let h = host(2, &[("h1", 0, 55.0, true), ("h2", 0, 55.0, true), ("l1", 1, 20.0, true), ("l2", 1, 20.0, true)]);
        let p = decide_once(&h, &converge());
        assert_eq!(p.moves.len(), 2, "{p:?}");
        assert_eq!(spread(&apply(&h, &p)), 0.0);
    }

    #[test]
    fn a_move_is_preferred_to_a_swap_when_both_balance() {
        // 52 vs 30: moving a (12) and swapping b (40) with c (30) both leave a gap of 2; the move needs one pin.
        let h = host(2, &[("a", 0, 12.0, true), ("b", 0, 40.0, true), ("c", 1, 30.0, true)]);
        let p = decide_once(&h, &converge());
        assert_eq!(p.moves.len(), 1, "{p:?}");
        assert_eq!(p.moves[0].domain, "a");
    }

    #[test]
    fn a_lone_heavy_vcpu_does_not_block_the_rest() {
        // pCPU 0 holds one 90 % vCPU that nothing can fix; pCPU 1 is crowded and pCPU 2 idle.
        let h = host(3, &[("big", 0, 90.0, true), ("a", 1, 40.0, true), ("b", 1, 40.0, true)]);
        let p = decide_once(&h, &converge());
        assert_eq!(p.moves.len(), 1, "{p:?}");
        assert_eq!((p.moves[0].from, p.moves[0].to), (1, 2));
        assert!(decide_once(&h, &cfg(PolicyKind::Guarded)).moves.is_empty());
    }

    #[test]
    fn moved_vcpus_cool_down() {
        let h = host(2, &[("a", 0, 60.0, true), ("b", 0, 30.0, true), ("c", 1, 0.0, true)]);
        let (p, state) = decide(&h, &converge(), &Default::default());
        let moved = p.moves[0].domain.clone();
        // Pretend the same readings come back with the vCPU where it was (e.g. a pin that was undone): the moved
        // vCPU is not picked again during the cooldown.
        let (p2, _) = decide(&h, &converge(), &state);
        assert!(p2.moves.iter().all(|m| m.domain != moved), "{p2:?}");
    }

    #[test]
    fn a_small_excess_is_acted_on_only_when_it_persists() {
        // A spread of 15 over a threshold of 10: the first reading holds, the second acts (moving "a" leaves 5).
        let h = host(2, &[("a", 0, 10.0, true), ("b", 0, 20.0, true), ("c", 1, 15.0, true)]);
        let (p, state) = decide(&h, &converge(), &Default::default());
        assert!(p.moves.is_empty() && p.reason.starts_with("hold"), "{p:?}");
        let (p, _) = decide(&h, &converge(), &state);
        assert_eq!(p.moves.len(), 1, "{p:?}");
        // A large excess is acted on at once.
        let big = host(2, &[("a", 0, 30.0, true), ("b", 0, 20.0, true), ("c", 1, 5.0, true)]);
        assert_eq!(decide_once(&big, &converge()).moves.len(), 1);
    }

    #[test]
    fn smoothing_averages_noise_but_follows_real_changes() {
        let mut avg = BTreeMap::new();
        let h = |x: f64| host(1, &[("a", 0, x, true)]);
        assert_eq!(smooth(&h(40.0), &mut avg).vcpus[0].usage, Some(40.0));
        let s = smooth(&h(44.0), &mut avg).vcpus[0].usage.unwrap();
        assert!(s > 40.0 && s < 44.0, "noise is damped: {s}");
        // A jump beyond SMOOTHING_RESET is a change: taken at once.
        assert_eq!(smooth(&h(90.0), &mut avg).vcpus[0].usage, Some(90.0));
    }

    #[test]
    fn a_vcpu_is_not_moved_back_where_it_came_from() {
        // "a" was moved from pCPU 1 to 0 in round 1 (past the cooldown by round 5). Moving "a" or "b" to pCPU 1
        // balances equally well, and "a" would win the tie, but it may not go back yet: "b" goes.
        let h = host(3, &[("a", 0, 30.0, true), ("b", 0, 30.0, true), ("d", 2, 40.0, true)]);
        let mut state = crate::controller::policy::PolicyState { round: 4, ..Default::default() };
        state.last_moved.insert(("uuid-a".into(), 0), (1, 1));
        let (p, _) = decide(&h, &converge(), &state);
        assert!(p.moves.iter().all(|m| m.domain != "a"), "{p:?}");
        assert!(p.moves.iter().any(|m| m.domain == "b"), "{p:?}");
        state.round = 1 + NO_RETURN_ROUNDS;
        let (p, _) = decide(&h, &converge(), &state);
        assert!(p.moves.iter().any(|m| m.domain == "a"), "after the no-return window it may: {p:?}");
    }

    proptest! {
        /// A converge round never widens the spread over the planned loads, and lowers the sum of squares when it
        /// moves anything.
        #[test]
        fn converge_never_widens(h in arb_host()) {
            let p = decide_once(&h, &converge());
            if !p.moves.is_empty() {
                let before: Vec<f64> = h.pcpus.iter().map(|p| p.usage).collect();
                let after = apply(&h, &p);
                prop_assert!(spread(&after) <= spread(&before) + 1e-9);
                let sq = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
                prop_assert!(sq(&after) < sq(&before));
            }
        }

        /// With steady loads, repeated rounds settle: after the first round's moves are applied, the next rounds
        /// move nothing more than the first round left undone, and after a few rounds nothing at all.
        #[test]
        fn steady_loads_settle(h in arb_host()) {
            let c = converge();
            let mut cur = h;
            let mut state = Default::default();
            let mut last = usize::MAX;
            for _ in 0..8 {
                let (p, next) = decide(&cur, &c, &state);
                state = next;
                let mut vs = cur.vcpus.clone();
                for m in &p.moves {
                    let v = vs.iter_mut().find(|v| *v.uuid == *m.uuid).unwrap();
                    v.pcpu = m.to;
                    v.affinity = vec![m.to];
                }
                let n = cur.pcpus.len() as u32;
                cur = with_loads(n, vs);
                last = p.moves.len();
            }
            prop_assert_eq!(last, 0);
        }
    }
}
