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
//!
//!    When no move or swap narrows any pair enough, two pCPUs with at most [`EXCHANGE_MAX_VCPUS`] movable vCPUs
//!    between them may also trade several (two light ones for a heavy one, say): every split of their vCPUs is
//!    tried ([`find_exchange`]), under the same rules.
//! 3. A step must narrow its pair's gap by at least [`MIN_STEP_GAIN`] points: moving a pin for less is churn.
//! 4. A vCPU moved in the last [`COOLDOWN_ROUNDS`] round is not moved again: the first reading after a move is
//!    the first that shows its demand in its new place, and a plan made before it would act on stale numbers.
//!
//!    For [`NO_RETURN_ROUNDS`] rounds, a vCPU is not moved back to the pCPU it was last moved off either: a
//!    reading that says otherwise that soon is more likely a starved vCPU's reading than a real change, and
//!    A→B→A is exactly the churn operators do not want.
//! 5. It plans on smoothed usage: an exponential moving average per vCPU (weight [`SMOOTHING`] on the new
//!    reading), restarted from the raw reading whenever that differs from the average by more than
//!    [`SMOOTHING_RESET`] points, and for a vCPU that was just moved or whose pCPU is or was saturated (those
//!    readings are new information, not noise). Noise of a few points is averaged away, so a balanced host is not
//!    churned by it; a real change (a load phase, a starved vCPU that gets room) is taken at once.
//! 6. A small excess (spread at most [`HOLD_FACTOR`] × threshold) is acted on only if the previous round was over
//!    the trigger too: one noisy reading does not move anything, a real imbalance costs at most one round, and a
//!    large one is acted on at once.
//! 7. Hysteresis: once the host has been seen balanced and nothing has moved since, the trigger is
//!    [`SETTLED_FACTOR`] × threshold instead of the threshold. Noise on a host balanced near the threshold moves
//!    nothing; an imbalance that grows past the band is acted on (and balanced back to the threshold).
//!
//!    A host that cannot be balanced gets the same band above its best: once a round over the threshold finds
//!    nothing worth a pin with no vCPU cooling down, at a spread `s` ([`PolicyState::stalled`]), a spread up to `s`
//!    plus the band's width is acted on only by a plan that balances the host. Otherwise noise around `s` keeps
//!    showing steps that narrow one pair on the readings and not on the demand, and pins go back and forth for
//!    as long as the controller runs.
//! 8. Saturation: on a pCPU at [`SATURATED`] % shared by several vCPUs, the vCPUs that read the top share were cut
//!    to a fair share, and their demand is unknown (at least the reading). A plan built on those readings places
//!    them wrongly, and fixing it later costs extra pins. So in a round where pCPUs have just become saturated, the
//!    round only *probes*: it moves capped vCPUs off them, at most one onto each pCPU with room, and plans the rest
//!    on the next reading, which shows their demand. If no such move helps, it plans on the readings as they are.
//! 9. Whole-host plan: in a round that acts and does not probe, it also plans the whole host at once
//!    ([`fewest_moves`]): a placement with every pCPU within one band of width threshold, in which each vCPU
//!    moves at most once and as few as a cheap deterministic heuristic finds move (pCPUs over the band shed the
//!    fewest of their vCPUs that bring them into it, the rest staying in place; the shed vCPUs go, heaviest first,
//!    to the freest pCPU they fit on, and chains of such sheds make swaps; pCPUs still under the band receive;
//!    moved vCPUs that fit back where they were go back; a few band positions, more on a small host, and two tie
//!    rules are tried). That plan replaces the steps' plan when it balances and the steps' does not, or when it
//!    needs fewer pin changes; it also has to lower the sum of squared loads. The steps' rules bind it too: it
//!    moves no vCPU lighter than half of [`MIN_STEP_GAIN`] (such a move changes a gap by less), vCPUs cooling down
//!    stay put, and none goes back to the pCPU it left.
//!
//! 10. Last resort: in a round where nothing is worth a pin (the round that records a stall, see 7; not the rounds
//!     held at its best after it), with no vCPU cooling down and no saturated pCPU, the whole host is placed
//!     from scratch ([`super::partition`]: number-partitioning heuristics, each set given to the pCPU that
//!     runs most of it, moved vCPUs sent back where that keeps the balance). Kept only if it balances the host.
//!     Steps and the shedding plan change few pCPUs at a time and can stop over the threshold where moving many
//!     vCPUs at once balances; this can cost many pins, once, on a host that would otherwise stay unbalanced.
//!
//! The vCPUs' final places are compared with where they run: a vCPU moved several times within one round gets one
//! pin, and one moved back to where it started gets none.

use std::collections::{BTreeMap, BTreeSet};

use crate::controller::policy::{Decision, PolicyState, View};
use crate::controller::usage::{HostUsage, VcpuUsage};
use crate::model::PcpuId;

/// Rounds during which a vCPU that was moved stays where it was put.
pub const COOLDOWN_ROUNDS: u64 = 1;
/// Spreads up to this many times the threshold must be seen twice in a row before anything moves.
pub const HOLD_FACTOR: f64 = 2.0;
/// Rounds during which a moved vCPU is not moved back to the pCPU it left.
pub const NO_RETURN_ROUNDS: u64 = 30;
/// Smallest narrowing of a pair's gap, in points, worth a pin change.
pub const MIN_STEP_GAIN: f64 = 3.0;

/// Once the host has been seen balanced, a spread up to this many times the threshold is left alone
/// (hysteresis): measurement noise on a host balanced near the threshold does not move anything.
pub const SETTLED_FACTOR: f64 = 1.5;
/// A pCPU reading at least this much, with two or more vCPUs on it, is saturated: its vCPUs read their fair
/// share, which is a lower bound of their demand.
pub const SATURATED: f64 = 98.0;
/// vCPUs of a saturated pCPU reading within this many points of its top reading are taken as cut to a fair share.
pub const CAPPED_TOLERANCE: f64 = 1.0;

/// Weight of a new reading in the moving average.
pub const SMOOTHING: f64 = 0.3;
/// A reading this many points away from the average is a change, not noise: the average restarts from it.
pub const SMOOTHING_RESET: f64 = 15.0;

/// The spread above which `converge` acts: the threshold, or [`SETTLED_FACTOR`] times it once the host has been
/// seen balanced and nothing has moved since; on a host where it found nothing worth a pin at a spread `s` over the
/// threshold ([`PolicyState::stalled`]), the same band above `s`.
pub fn trigger(threshold: f64, state: &PolicyState) -> f64 {
    let band = settled_band(threshold, state);
    match state.stalled {
        Some(s) => band.max(s + (SETTLED_FACTOR - 1.0) * threshold),
        None => band,
    }
}

/// [`trigger`] without the band kept above a stall.
fn settled_band(threshold: f64, state: &PolicyState) -> f64 {
    if state.settled {
        SETTLED_FACTOR * threshold
    } else {
        threshold
    }
}

/// The pCPUs that read saturated: at least [`SATURATED`], shared by two or more vCPUs of known usage.
pub fn saturated(u: &HostUsage) -> BTreeSet<PcpuId> {
    u.pcpus
        .iter()
        .filter(|p| p.usage >= SATURATED)
        .filter(|p| u.vcpus.iter().filter(|v| v.pcpu == p.id && v.usage.is_some()).count() >= 2)
        .map(|p| p.id)
        .collect()
}

/// `u` with each known vCPU usage replaced by its moving average, and pCPU sums redone. `avg` holds the averages in
/// the order of `u.vcpus` (`None`: no average yet) and is updated. A vCPU for which `fresh_start` holds takes its raw
/// reading, as does one whose reading jumped by more than [`SMOOTHING_RESET`].
pub fn smooth(u: &HostUsage, avg: &mut Vec<Option<f64>>, fresh_start: impl Fn(&VcpuUsage) -> bool) -> HostUsage {
    let mut out = u.clone();
    smooth_in_place(&mut out, avg, fresh_start);
    out
}

/// The raw readings of a usage that [`smooth_in_place`] smoothed, to put back with [`Raw::restore`].
#[derive(Debug)]
pub struct Raw {
    vcpus: Vec<Option<f64>>,
    pcpus: Vec<f64>,
}

impl Raw {
    /// Puts the raw readings back into `u`, the usage they were taken from.
    pub fn restore(self, u: &mut HostUsage) {
        for (v, x) in u.vcpus.iter_mut().zip(self.vcpus) {
            v.usage = x;
        }
        for (p, x) in u.pcpus.iter_mut().zip(self.pcpus) {
            p.usage = x;
        }
    }
}

/// [`smooth`] in place, returning the raw readings: the per-host task smooths the round's own usage and restores
/// it after deciding, instead of copying every vCPU (three shared pointers each) every round. The averages are
/// positional, so the usual round looks nothing up by key ([`PolicyState::smoothed`]).
///
/// [`PolicyState::smoothed`]: crate::controller::policy::PolicyState::smoothed
pub fn smooth_in_place(u: &mut HostUsage, avg: &mut Vec<Option<f64>>, fresh_start: impl Fn(&VcpuUsage) -> bool) -> Raw {
    let raw = Raw { vcpus: u.vcpus.iter().map(|v| v.usage).collect(), pcpus: u.pcpus.iter().map(|p| p.usage).collect() };
    debug_assert!(avg.is_empty() || avg.len() == u.vcpus.len(), "averages out of step with the vCPUs");
    avg.resize(u.vcpus.len(), None);
    let out = u;
    for (v, a) in out.vcpus.iter_mut().zip(avg.iter_mut()) {
        *a = match (v.usage, *a) {
            (Some(raw), Some(a)) if !fresh_start(v) && (raw - a).abs() <= SMOOTHING_RESET => {
                let s = a + SMOOTHING * (raw - a);
                v.usage = Some(s);
                Some(s)
            }
            (raw, _) => raw,
        };
    }
    crate::controller::usage::sum_pcpus(out);
    raw
}

/// A movable vCPU while planning: index into `u.vcpus`, where it is in the plan, its usage.
#[derive(Debug, Clone, Copy)]
struct Slot {
    idx: usize,
    pcpu: PcpuId,
    usage: f64,
    /// A pCPU it must not go back to.
    not_to: Option<PcpuId>,
    /// It sits on a newly saturated pCPU and reads the top share there: its demand is unknown, at least `usage`.
    capped: bool,
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
pub fn decide(v: &View<'_>, threshold: f64, state: &PolicyState, saturated: &BTreeSet<PcpuId>) -> Decision {
    balanced(v, threshold).unwrap_or_else(|| plan(v, threshold, state, saturated))
}

/// The decision for a host within the threshold with no movable vCPU on a reserved pCPU, which is most hosts in
/// most rounds: [`plan`] cannot move anything there (its steps stop at the threshold, and the probe and the
/// whole-host plan act only above it), so its per-vCPU set-up is skipped. `None` for any other host.
/// `the_balanced_shortcut_decides_as_the_plan` checks that the two agree.
fn balanced(v: &View<'_>, threshold: f64) -> Option<Decision> {
    let ((_, hi), (_, lo)) = v.extremes()?;
    let before = hi - lo;
    (before <= threshold && !v.any_stranded())
        .then(|| Decision {
            moves: Vec::new(),
            reason: format!("balanced: spread {before:.1} <= threshold {threshold:.1}"),
            stalled: None,
        })
}

/// What a vCPU's last move forbids in the round after `state`: whether it still cools down (it stays put), and the
/// pCPU it left, if it may not go back there yet.
pub fn last_move_rules(state: &PolicyState, x: &VcpuUsage) -> (bool, Option<PcpuId>) {
    let this_round = state.round + 1;
    match state.last_moved.get(&(x.uuid.clone(), x.vcpu)) {
        Some(&(r, from)) => (this_round - r <= COOLDOWN_ROUNDS, (this_round - r <= NO_RETURN_ROUNDS).then_some(from)),
        None => (false, None),
    }
}

/// [`decide`] for a host that is not [`balanced`].
fn plan(v: &View<'_>, threshold: f64, state: &PolicyState, saturated: &BTreeSet<PcpuId>) -> Decision {
    // Per vCPU: whether it cools down, and where it may not go back to this round.
    let rules: Vec<(bool, Option<PcpuId>)> = v.u.vcpus.iter().map(|x| last_move_rules(state, x)).collect();
    let cooling = |i: usize| rules[i].0;
    let mut load: BTreeMap<PcpuId, f64> =
        v.load.iter().filter(|(id, _)| v.allowed.contains(id)).copied().collect();
    let stranded = v.stranded();
    let any_cooling = v.movable.iter().any(|&i| !stranded.contains(&i) && cooling(i));
    let mut slots: Vec<Slot> = v
        .movable
        .iter()
        .copied()
        .filter(|&i| stranded.contains(&i) || !cooling(i))
        .map(|i| Slot {
            idx: i,
            pcpu: v.vcpu(i).pcpu,
            usage: v.vcpu(i).usage.unwrap_or(0.0),
            not_to: rules[i].1,
            capped: false,
        })
        .collect();
    // Newly saturated pCPUs (allowed, not saturated in the previous round) and their capped vCPUs: those reading
    // within CAPPED_TOLERANCE of the top reading there, the level max-min fair sharing cut them to.
    let newly: BTreeSet<PcpuId> = saturated
        .iter()
        .copied()
        .filter(|p| v.allowed.contains(p) && !state.saturated.contains(p))
        .collect();
    for p in &newly {
        let top = slots.iter().filter(|s| s.pcpu == *p).map(|s| s.usage).fold(0.0, f64::max);
        for s in slots.iter_mut().filter(|s| s.pcpu == *p) {
            s.capped = s.usage > 0.0 && s.usage >= top - CAPPED_TOLERANCE;
        }
    }
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
    let (mut moves, mut swaps, mut exchanges) = (0u32, 0u32, 0u32);
    let max_steps = 4 * slots.len() + 4;
    let mut stuck = None;
    let before = spread_of(&load);
    let trigger = trigger(threshold, state);
    let quiet = off.is_empty() && before > threshold && before <= settled_band(threshold, state);
    // Within the band kept above a stall: a plan is made, and kept only if it balances the host. Noise on a host
    // that cannot be balanced then moves nothing, while a way to balance that a later reading shows is still taken.
    // A pCPU newly saturated is a change, not noise: that round acts (and probes) as usual.
    let at_best = off.is_empty() && !quiet && newly.is_empty() && state.stalled.is_some() && before <= trigger;
    let hold = off.is_empty()
        && before > trigger
        && before <= HOLD_FACTOR * threshold
        && !state.was_over;
    // Saturated pCPUs: a round in which some became saturated first tries to only relieve them (see `probe_step`).
    let sat: BTreeSet<PcpuId> = saturated.iter().copied().filter(|p| load.contains_key(p)).collect();
    let mut probing = !newly.is_empty() && load.keys().any(|p| !sat.contains(p));
    let mut probed = 0u32;
    let mut received = BTreeSet::new();
    let (slots0, load0) = (slots.clone(), load.clone());
    for _ in 0..if hold || quiet { 0 } else { max_steps } {
        let Some(((b, hi), (f, lo))) = super::extremes(load.iter().map(|(k, x)| (*k, *x))) else { break };
        if hi - lo <= threshold {
            break;
        }
        let mut found = None;
        if probing {
            found = probe_step(&slots, &load, &sat, &received, threshold);
            if found.is_none() && probed == 0 {
                // Nothing to probe with: plan on the readings as they are.
                probing = false;
            }
        }
        if !probing {
            found = find_step(&slots, &load, b, f, threshold);
            if found.is_none() {
                // No single move or swap helps: a pair of pCPUs may still trade several vCPUs.
                if let Some(x) = find_exchange(&slots, &load, b, f, threshold) {
                    for &(s, to) in &x.moved {
                        slots[s].pcpu = to;
                    }
                    *load.get_mut(&x.p).expect("allowed") = x.p_load;
                    *load.get_mut(&x.q).expect("allowed") = x.q_load;
                    exchanges += 1;
                    continue;
                }
            }
        }
        let Some(step) = found else {
            stuck = Some(hi - lo);
            break;
        };
        if probing {
            received.insert(step.q);
            probed += 1;
        }
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
    // The whole host at once, each vCPU moving at most once: kept if it balances with fewer pins than the steps.
    let mut fewest = false;
    if probed == 0 && !hold && !quiet && before > threshold {
        let pins = |sl: &[Slot]| sl.iter().zip(&start).filter(|(s, from)| s.pcpu != **from).count();
        if let Some(to) = fewest_moves(&slots0, &load0, threshold) {
            let mut sl = slots0.clone();
            for (s, t) in sl.iter_mut().zip(&to) {
                s.pcpu = *t;
            }
            let l = loads_after(&slots0, &load0, &to);
            let steps_ok = spread_of(&load) <= threshold + EPS;
            if sum_of_squares(&l) < sum_of_squares(&load0) && (!steps_ok || pins(&sl) < pins(&slots)) {
                slots = sl;
                load = l;
                fewest = true;
            }
        }
    }
    // A round over the threshold that acts, with every vCPU free to move and nothing being probed: one that finds
    // nothing worth a pin is this host's best (the stall, at the end).
    let free_round = !hold && !quiet && off.is_empty() && probed == 0 && !any_cooling && before > threshold;
    // That round, if no pCPU is saturated (their readings hide demand): the whole host planned from scratch, kept
    // only if it balances. Local steps and the shedding plan can stop over the threshold where moving many vCPUs
    // at once balances. Not in the rounds held at its best: there only noise would make a new partition look
    // balanced, and it moves many vCPUs.
    let mut repartitioned = false;
    if free_round && !at_best && moves + swaps + exchanges == 0 && sat.is_empty() && spread_of(&load) > threshold + EPS {
        // Like every other plan, it has to lower the sum of squared loads: balanced is not always lower.
        let placed = repartition(&slots0, &load0, threshold)
            .map(|to| (loads_after(&slots0, &load0, &to), to))
            .filter(|(l, _)| sum_of_squares(l) < sum_of_squares(&load0));
        if let Some((l, to)) = placed {
            for (s, t) in slots.iter_mut().zip(&to) {
                s.pcpu = *t;
            }
            load = l;
            repartitioned = true;
        }
    }
    let after = spread_of(&load);
    let mut planned: Vec<(usize, PcpuId)> =
        slots.iter().zip(&start).filter(|(s, from)| s.pcpu != **from).map(|(s, _)| (s.idx, s.pcpu)).collect();
    let kept_at_best = at_best && after > threshold + EPS;
    if kept_at_best {
        planned.clear();
    }
    let mut reason = if kept_at_best {
        format!(
            "at its best: spread {before:.1} is within {trigger:.1}, the band kept since nothing narrowed it by {MIN_STEP_GAIN:.0} point(s) or more, and no plan balances it"
        )
    } else if quiet {
        format!("settled: spread {before:.1} is within {trigger:.1}, the band kept once balanced")
    } else if hold {
        format!("hold: spread {before:.1} > {trigger:.1} for the first round; acting if it persists")
    } else if moves + swaps + exchanges == 0 && stuck.is_none() {
        format!("balanced: spread {before:.1} <= threshold {threshold:.1}")
    } else if moves + swaps + exchanges == 0 {
        format!(
            "spread {before:.1} > {threshold:.1} but no move or swap narrows it by {MIN_STEP_GAIN:.0} point(s) or more (vCPUs moved in the last {COOLDOWN_ROUNDS} rounds stay put)"
        )
    } else {
        let traded = if exchanges > 0 { format!(", {exchanges} exchange(s) of several vCPUs") } else { String::new() };
        format!(
            "spread {before:.1} > {threshold:.1}: {moves} move(s) and {swaps} swap(s){traded}, {} pin change(s), expected spread {after:.1}",
            planned.len()
        )
    };
    if fewest && !kept_at_best {
        reason = format!(
            "spread {before:.1} > {threshold:.1}: {} pin change(s) for the whole host at once, each vCPU moved at most once, expected spread {after:.1}",
            planned.len()
        );
        stuck = None;
    }
    if repartitioned {
        reason = format!(
            "spread {before:.1} > {threshold:.1} and no step narrows it: {} pin change(s) re-partition the whole host at once, expected spread {after:.1}",
            planned.len()
        );
        stuck = None;
    }
    if let Some(s) = stuck.filter(|_| moves + swaps + exchanges > 0 && !kept_at_best) {
        reason.push_str(&format!(" (best reachable this round: {s:.1})"));
    }
    if probed > 0 {
        reason.push_str(&format!(
            "; {} pCPU(s) newly saturated: their vCPUs read fair shares, so only {probed} of those moved off, at most one onto each pCPU, until the next reading shows their demand",
            newly.len()
        ));
    }
    for n in notes {
        reason.push_str("; ");
        reason.push_str(&n);
    }
    let stalled = (free_round && !kept_at_best && planned.is_empty()).then_some(before);
    Decision { moves: planned, reason, stalled }
}

fn spread_of(load: &BTreeMap<PcpuId, f64>) -> f64 {
    super::extremes(load.iter().map(|(k, x)| (*k, *x))).map_or(0.0, |((_, hi), (_, lo))| hi - lo)
}

/// A step in a round where pCPUs became saturated. Their capped vCPUs read a fair share, a lower bound of their
/// demand, so a full plan built on those readings would place them wrongly and have to move them again. This step
/// only relieves: it moves one capped vCPU off a newly saturated pCPU (busiest first) onto a pCPU that is not
/// saturated and has received nothing this round (freest first), so that the next reading shows the moved vCPU's
/// and the source's real demand before the rest is planned. No swaps (the vCPU sent back would land on a pCPU whose
/// demand is not known yet), and no vCPU whose reading is already its demand: moving those is the full plan's job,
/// once the demand is known.
fn probe_step(
    slots: &[Slot],
    load: &BTreeMap<PcpuId, f64>,
    sat: &BTreeSet<PcpuId>,
    received: &BTreeSet<PcpuId>,
    threshold: f64,
) -> Option<Step> {
    let mut from: Vec<(PcpuId, f64)> = load.iter().filter(|(k, _)| sat.contains(k)).map(|(k, x)| (*k, *x)).collect();
    from.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    let mut to: Vec<(PcpuId, f64)> = load
        .iter()
        .filter(|(k, _)| !sat.contains(k) && !received.contains(k))
        .map(|(k, x)| (*k, *x))
        .collect();
    to.sort_by(|x, y| x.1.total_cmp(&y.1).then(x.0.cmp(&y.0)));
    from.iter()
        .flat_map(|&(p, lp)| to.iter().map(move |&(q, lq)| (p, q, lp - lq)))
        .find_map(|(p, q, g)| best_step(slots, g, p, q, threshold, true))
}

/// The first pair, in the documented order, that has a useful step, and its best step.
fn find_step(slots: &[Slot], load: &BTreeMap<PcpuId, f64>, b: PcpuId, f: PcpuId, threshold: f64) -> Option<Step> {
    pair_order(load, b, f).into_iter().find_map(|(p, q)| best_step(slots, load[&p] - load[&q], p, q, threshold, false))
}

/// Pairs (busier, freer) in the order steps look at them: the busiest `b` and the freest `f`, then `b` with the next
/// freest pCPUs, then `f` with the next busiest ones.
fn pair_order(load: &BTreeMap<PcpuId, f64>, b: PcpuId, f: PcpuId) -> Vec<(PcpuId, PcpuId)> {
    let mut asc: Vec<(PcpuId, f64)> = load.iter().map(|(k, x)| (*k, *x)).collect();
    asc.sort_by(|x, y| x.1.total_cmp(&y.1).then(x.0.cmp(&y.0)));
    // Ties by pCPU id in both orders, so not `asc` reversed.
    let mut desc = asc.clone();
    desc.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    let others = |x: &&(PcpuId, f64)| x.0 != b && x.0 != f;
    std::iter::once((b, f))
        .chain(asc.iter().filter(others).map(|(q, _)| (b, *q)))
        .chain(desc.iter().filter(others).map(|(p, _)| (*p, f)))
        .collect()
}

/// The best step between `p` and `q` (gap `g > 0`), if any narrows the gap by at least [`MIN_STEP_GAIN`].
/// With `probe`, only moves of capped vCPUs.
fn best_step(slots: &[Slot], g: f64, p: PcpuId, q: PcpuId, threshold: f64, probe: bool) -> Option<Step> {
    if g <= 0.0 {
        return None;
    }
    let on = |c: PcpuId| (0..slots.len()).filter(move |&s| slots[s].pcpu == c);
    let mut cands = Vec::new();
    for a in on(p).filter(|&a| slots[a].not_to != Some(q) && (!probe || slots[a].capped)) {
        let ua = slots[a].usage;
        if ua > 0.0 && ua < g {
            cands.push(Step { a, b: None, p, q, new_gap: (g - 2.0 * ua).abs() });
        }
        for b in on(q).filter(|&b| !probe && slots[b].not_to != Some(p)) {
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

/// Most movable vCPUs two pCPUs may have together for [`find_exchange`] to try every way of splitting them.
const EXCHANGE_MAX_VCPUS: usize = 10;

/// A new split of the movable vCPUs of two pCPUs `p` (busier) and `q`.
struct Exchange {
    p: PcpuId,
    q: PcpuId,
    /// (slot, its new pCPU) for each vCPU that changes pCPU.
    moved: Vec<(usize, PcpuId)>,
    p_load: f64,
    q_load: f64,
}

/// When no single move or swap narrows any pair by [`MIN_STEP_GAIN`] (see [`find_step`]), the best new split of
/// two pCPUs' movable vCPUs, pairs in the same order: e.g. two light vCPUs for one heavy one, or two for two. Every
/// split is tried, so only for pairs with at most [`EXCHANGE_MAX_VCPUS`] movable vCPUs (2^10 splits). The pair's
/// total stays the same and its gap narrows, so like a step it lowers the sum of squared loads and never widens the
/// spread. Within the threshold, fewest pins first; else the narrowest gap, then fewest pins.
fn find_exchange(
    slots: &[Slot],
    load: &BTreeMap<PcpuId, f64>,
    b: PcpuId,
    f: PcpuId,
    threshold: f64,
) -> Option<Exchange> {
    // Slots per pCPU, once: a big host has many pairs, and scanning every slot for each would cost n·p.
    let mut on: BTreeMap<PcpuId, Vec<usize>> = BTreeMap::new();
    for (i, sl) in slots.iter().enumerate() {
        on.entry(sl.pcpu).or_default().push(i);
    }
    let none = Vec::new();
    for (p, q) in pair_order(load, b, f) {
        let g = load[&p] - load[&q];
        if g <= 0.0 {
            continue;
        }
        let (on_p, on_q) = (on.get(&p).unwrap_or(&none), on.get(&q).unwrap_or(&none));
        if on_p.len() + on_q.len() < 2 || on_p.len() + on_q.len() > EXCHANGE_MAX_VCPUS {
            continue;
        }
        let both: Vec<usize> = on_p.iter().chain(on_q).copied().collect();
        let fixed_p = load[&p] - on_p.iter().map(|&s| slots[s].usage).sum::<f64>();
        let total = load[&p] + load[&q];
        // Where a split sends each slot of `both`: bit i set, slot both[i] ends on p.
        let dest =
            |mask: u32| both.iter().enumerate().map(move |(i, &s)| (s, if mask & (1 << i) != 0 { p } else { q }));
        let p_load_of =
            |mask: u32| fixed_p + dest(mask).filter(|&(_, to)| to == p).map(|(s, _)| slots[s].usage).sum::<f64>();
        // (outside the threshold, pins or 0, new gap, pins, mask): the smallest wins.
        let mut best: Option<(bool, u32, f64, u32, u32)> = None;
        for mask in 0u32..(1 << both.len()) {
            let mut pins = 0;
            let mut allowed = true;
            for (s, to) in dest(mask).filter(|&(s, to)| to != slots[s].pcpu) {
                pins += 1;
                allowed &= slots[s].not_to != Some(to) && slots[s].usage >= MIN_STEP_GAIN / 2.0;
            }
            let new_gap = (2.0 * p_load_of(mask) - total).abs();
            if !allowed || g - new_gap < MIN_STEP_GAIN {
                continue;
            }
            let ok = new_gap <= threshold;
            let key = (!ok, if ok { pins } else { 0 }, new_gap, pins, mask);
            let better = best.is_none_or(|b| {
                let by_gap = (key.0, key.1).cmp(&(b.0, b.1)).then(key.2.total_cmp(&b.2));
                by_gap.then((key.3, key.4).cmp(&(b.3, b.4))).is_lt()
            });
            if better {
                best = Some(key);
            }
        }
        if let Some((_, _, _, _, mask)) = best {
            let moved = dest(mask).filter(|&(s, to)| to != slots[s].pcpu).collect();
            let p_load = p_load_of(mask);
            return Some(Exchange { p, q, moved, p_load, q_load: total - p_load });
        }
    }
    None
}

/// The whole host placed from scratch by [`super::partition::balance`], within the threshold, or `None`. vCPUs
/// lighter than half of [`MIN_STEP_GAIN`] stay where they are, as in the other plans, and count with the load that
/// cannot move; none goes back to the pCPU it left. Returns each slot's new pCPU.
fn repartition(slots: &[Slot], load: &BTreeMap<PcpuId, f64>, threshold: f64) -> Option<Vec<PcpuId>> {
    let ids: Vec<PcpuId> = load.keys().copied().collect();
    let at = |p: PcpuId| ids.binary_search(&p).ok();
    let mut fixed: Vec<f64> = load.values().copied().collect();
    let mut items = Vec::new();
    let mut which = Vec::new();
    for (s, x) in slots.iter().enumerate() {
        if 2.0 * x.usage >= MIN_STEP_GAIN {
            let i = at(x.pcpu).expect("slots are on allowed pCPUs");
            fixed[i] -= x.usage;
            items.push(super::partition::Item { usage: x.usage, at: i, not_to: x.not_to.and_then(at) });
            which.push(s);
        }
    }
    let placed = super::partition::balance(&items, &fixed, threshold)?;
    let mut to: Vec<PcpuId> = slots.iter().map(|s| s.pcpu).collect();
    for (&s, &i) in which.iter().zip(&placed) {
        to[s] = ids[i];
    }
    Some(to)
}

/// Floating-point slack when comparing planned loads with a band's edges.
const EPS: f64 = 1e-9;

/// Band positions tried by [`fewest_moves`]: the freest pCPU's planned load `lo` runs from `mean − threshold` to
/// `mean` in [`bands`] equal steps (plus one), a multiple of this many.
const BANDS: u32 = 4;
/// At most this many times [`BANDS`] steps, for small hosts.
const MAX_REFINE: usize = 10;
/// Work budget of [`fewest_moves`]: band steps × movable vCPUs. Each band position costs O(n log n + n·p), so a
/// small host can afford a finer search of the band, and a big one keeps [`BANDS`]: 4 steps for the bench's host
/// (1,000 vCPUs), 32 on `random-64x200` (about 180 movable vCPUs after the probe), 40 on `sixteen-on-eight`.
const BAND_BUDGET: usize = 6000;

/// The band steps [`fewest_moves`] tries for `slots` movable vCPUs: a multiple of [`BANDS`], so the positions
/// tried include the coarse ones (tried first: a finer search never plans more moves than the coarse one).
fn bands(slots: usize) -> u32 {
    let refine = (BAND_BUDGET / (BANDS as usize * slots.max(1))).clamp(1, MAX_REFINE);
    BANDS * u32::try_from(refine).expect("at most MAX_REFINE")
}

/// A placement of the whole host, planned at once, in which every pCPU's load is within `[lo, lo + threshold]`
/// for some `lo`, each vCPU moves at most once, and as few move as this heuristic finds: for each of a few bands,
/// (1) every pCPU over the band sheds the fewest of its vCPUs it can (one that lands it in the band, the lightest
/// such; else its heaviest, and again), keeping the rest in place; (2) the shed vCPUs, heaviest first, go to the
/// freest pCPU they fit on; (3) a pCPU still under the band receives a vCPU from a pCPU that can spare it,
/// preferring one that moves anyway; (4) a moved vCPU that now fits back where it was goes back. The band with
/// the fewest moves wins. Returns each slot's new pCPU, or `None` if no band works out.
///
/// Cost: per band, a sort of each pCPU's vCPUs and of the shed ones, and a scan of the pCPUs per shed vCPU and of
/// the vCPUs per pCPU left under the band: O(n log n + n·p) for n vCPUs on p pCPUs.
fn fewest_moves(slots: &[Slot], load: &BTreeMap<PcpuId, f64>, threshold: f64) -> Option<Vec<PcpuId>> {
    fewest_moves_over(slots, load, threshold, bands(slots.len()))
}

/// [`fewest_moves`] with the band's position tried in `steps` equal steps.
fn fewest_moves_over(
    slots: &[Slot],
    load: &BTreeMap<PcpuId, f64>,
    threshold: f64,
    steps: u32,
) -> Option<Vec<PcpuId>> {
    let n = load.len();
    if n == 0 {
        return None;
    }
    let total: f64 = load.values().sum();
    let mean = total / n as f64;
    let mut best: Option<(usize, f64, Vec<PcpuId>)> = None;
    // The coarse positions first: the best of them is then found as the coarse search alone finds it (a band is
    // given up against the same best so far), and a finer position replaces it only with fewer moves (or as few
    // and a lower sum of squares).
    let coarse = (steps / BANDS).max(1);
    let order = (0..=steps).filter(|k| k % coarse == 0).chain((0..=steps).filter(|k| k % coarse != 0));
    for k in order {
        let lo = mean - threshold + threshold * f64::from(k) / f64::from(steps);
        for heavy in [false, true] {
            for complete in [false, true] {
                // A band whose plan would move more vCPUs than the best so far is given up early.
                let limit = best.as_ref().map_or(usize::MAX, |b| b.0);
                let Some(to) = fewest_in_band(slots, load, (lo, lo + threshold), (heavy, complete), limit) else {
                    continue;
                };
                let moved = slots.iter().zip(&to).filter(|(s, t)| s.pcpu != **t).count();
                let sq = squares(slots, load, &to);
                if best.as_ref().is_none_or(|(m, q, _)| moved < *m || (moved == *m && sq < *q - EPS)) {
                    best = Some((moved, sq, to));
                }
            }
        }
    }
    best.map(|(_, _, to)| to)
}

/// Which of a pCPU's unmoved vCPUs `v` (lightest first) it sheds next, to lose at least `ex` and at most `room`:
/// the lightest that does it alone, else the pair with the lightest sum that does (both are taken, the second
/// on the next call), else the lightest that covers `ex` (the pCPU then falls under the band and receives), else
/// the heaviest (and again). Removes it from `v`; `None` if `v` is empty.
fn shed(slots: &[Slot], v: &mut Vec<usize>, ex: f64, room: f64, heavy: bool) -> Option<usize> {
    let u = |j: usize| slots[v[j]].usage;
    let first = v.iter().position(|&s| slots[s].usage >= ex - EPS);
    let last = v.iter().rposition(|&s| slots[s].usage <= room + EPS);
    let j = match (first, last) {
        (Some(j), Some(k)) if j <= k => {
            if heavy {
                k
            } else {
                j
            }
        }
        _ => {
            // Pairs: for each lighter `a`, the lightest `b` above it with u(a) + u(b) >= ex.
            let mut pair: Option<(f64, usize)> = None;
            for a in 0..v.len() {
                let b = (a + 1..v.len()).find(|&b| u(a) + u(b) >= ex - EPS);
                if let Some(b) = b.filter(|&b| u(a) + u(b) <= room + EPS) {
                    if pair.is_none_or(|(t, _)| u(a) + u(b) < t - EPS) {
                        pair = Some((u(a) + u(b), b));
                    }
                }
            }
            match (pair, first) {
                (Some((_, b)), _) => b,
                (None, Some(j)) => j,
                (None, None) => v.len().checked_sub(1)?,
            }
        }
    };
    Some(v.remove(j))
}

/// Sum of squared pCPU loads once the slots are at `to`.
fn squares(slots: &[Slot], load: &BTreeMap<PcpuId, f64>, to: &[PcpuId]) -> f64 {
    sum_of_squares(&loads_after(slots, load, to))
}

/// The pCPU loads once each slot has gone to its pCPU in `to`.
fn loads_after(slots: &[Slot], load: &BTreeMap<PcpuId, f64>, to: &[PcpuId]) -> BTreeMap<PcpuId, f64> {
    let mut l = load.clone();
    for (s, &t) in slots.iter().zip(to) {
        if s.pcpu != t {
            *l.get_mut(&s.pcpu).expect("allowed") -= s.usage;
            *l.get_mut(&t).expect("allowed") += s.usage;
        }
    }
    l
}

fn sum_of_squares(load: &BTreeMap<PcpuId, f64>) -> f64 {
    load.values().map(|x| x * x).sum()
}

/// [`fewest_moves`] for one band `[lo, hi]`.
fn fewest_in_band(
    slots: &[Slot],
    load: &BTreeMap<PcpuId, f64>,
    (lo, hi): (f64, f64),
    (heavy, complete): (bool, bool),
    limit: usize,
) -> Option<Vec<PcpuId>> {
    let ids: Vec<PcpuId> = load.keys().copied().collect();
    let at = |p: PcpuId| ids.binary_search(&p).expect("slots are on allowed pCPUs");
    let n = ids.len();
    let mut sum: Vec<f64> = load.values().copied().collect();
    let mut to: Vec<PcpuId> = slots.iter().map(|s| s.pcpu).collect();
    // Each slot's pCPU as an index into `ids`: where it started, and where it is planned.
    let origin: Vec<usize> = slots.iter().map(|s| at(s.pcpu)).collect();
    let mut toi = origin.clone();
    // Slots planned away from where they started.
    let mut moved = 0usize;
    // Per pCPU, its vCPUs worth a pin, lightest first: moving one changes a gap by twice its usage, which must be
    // at least MIN_STEP_GAIN, as for a step.
    let worth = |u: f64| 2.0 * u >= MIN_STEP_GAIN;
    let mut on: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (s, x) in slots.iter().enumerate() {
        if worth(x.usage) {
            on[origin[s]].push(s);
        }
    }
    let by_usage = |a: &usize, b: &usize| slots[*a].usage.total_cmp(&slots[*b].usage).then(a.cmp(b));
    for v in &mut on {
        v.sort_by(by_usage);
    }
    // 1 and 2, until no pCPU is over the band: every pCPU over it sheds some of its vCPUs that have not moved
    // (see `shed`); they go, heaviest first, to the freest pCPU they fit on, or if none, to the freest pCPU,
    // which then sheds in turn (a swap, or a longer chain). Each vCPU is shed at most once, so this ends.
    loop {
        let mut pool = Vec::new();
        for i in 0..n {
            while sum[i] > hi + EPS {
                let s = shed(slots, &mut on[i], sum[i] - hi, sum[i] - lo, heavy)?;
                sum[i] -= slots[s].usage;
                pool.push(s);
            }
        }
        if pool.is_empty() {
            break;
        }
        pool.sort_by(|a, b| by_usage(b, a));
        for &s in &pool {
            let u = slots[s].usage;
            let ok = |j: usize| ids[j] != slots[s].pcpu && slots[s].not_to != Some(ids[j]);
            let freest = |fit: bool| {
                (0..n)
                    .filter(|&j| ok(j) && (!fit || sum[j] + u <= hi + EPS))
                    .min_by(|&a, &b| sum[a].total_cmp(&sum[b]).then(a.cmp(&b)))
            };
            // The fullest pCPU under the band that it brings into the band, if `complete`.
            let fills = || {
                (0..n)
                    .filter(|&j| ok(j) && complete && sum[j] < lo - EPS && sum[j] + u >= lo - EPS && sum[j] + u <= hi + EPS)
                    .max_by(|&a, &b| sum[a].total_cmp(&sum[b]).then(b.cmp(&a)))
            };
            let j = fills().or_else(|| freest(true)).or_else(|| freest(false))?;
            to[s] = ids[j];
            toi[s] = j;
            moved += 1;
            if moved > limit {
                return None;
            }
            sum[j] += u;
        }
    }
    // 3. Fill the pCPUs still under the band.
    for _ in 0..2 * n + slots.len() {
        let q = (0..n).min_by(|&a, &b| sum[a].total_cmp(&sum[b]).then(a.cmp(&b)))?;
        if sum[q] >= lo - EPS {
            break;
        }
        let (need, cap) = (lo - sum[q], hi - sum[q]);
        // (completes the pCPU, extra pins, usage) to minimise: completing first, then no new pin (a vCPU already
        // moving, or one going back where it was), then the lightest that completes or the heaviest that does not.
        let mut pick: Option<((bool, i32, f64), usize)> = None;
        for (s, x) in slots.iter().enumerate() {
            let r = toi[s];
            let u = x.usage;
            if r == q || !worth(u) || u > cap + EPS || sum[r] - u < lo - EPS || x.not_to == Some(ids[q]) {
                continue;
            }
            let moving = to[s] != x.pcpu;
            let cost = if ids[q] == x.pcpu { -1 } else { i32::from(!moving) };
            let done = u >= need - EPS;
            let key = (!done, cost, if done { u } else { -u });
            if pick.as_ref().is_none_or(|(k, _)| {
                key.0.cmp(&k.0).then(key.1.cmp(&k.1)).then(key.2.total_cmp(&k.2)).is_lt()
            }) {
                pick = Some((key, s));
            }
        }
        let (_, s) = pick?;
        sum[toi[s]] -= slots[s].usage;
        sum[q] += slots[s].usage;
        moved = moved + usize::from(toi[s] == origin[s]) - usize::from(q == origin[s]);
        if moved > limit {
            return None;
        }
        to[s] = ids[q];
        toi[s] = q;
    }
    if (0..n).any(|i| sum[i] < lo - EPS || sum[i] > hi + EPS) {
        return None;
    }
    // 4. A moved vCPU that fits back where it was, both pCPUs staying in the band, goes back.
    for (s, x) in slots.iter().enumerate() {
        let (o, t) = (origin[s], toi[s]);
        if o != t && sum[o] + x.usage <= hi + EPS && sum[t] - x.usage >= lo - EPS {
            sum[o] += x.usage;
            sum[t] -= x.usage;
            to[s] = x.pcpu;
            toi[s] = o;
        }
    }
    Some(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::policy::tests::{apply, arb_host, cfg, host, with_loads};
    use crate::controller::policy::View;
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
        // pCPU 0 at 80 %, not saturated: the readings are the demand, and all six moves are made at once.
        let names: Vec<String> = (0..8).map(|i| format!("vm{i}")).collect();
        let spec: Vec<(&str, u32, f64, bool)> = names.iter().map(|n| (n.as_str(), 0, 10.0, true)).collect();
        let h = host(4, &spec);
        let p = decide_once(&h, &converge());
        assert_eq!(p.moves.len(), 6, "{p:?}");
        assert_eq!(spread(&apply(&h, &p)), 0.0);
    }

    #[test]
    fn a_newly_saturated_pcpu_is_probed_before_the_full_plan() {
        // pCPU 0 at 100 %: a, b, c read the fair share 26.7 (their demand is unknown), d reads its demand 20.
        // Only capped vCPUs move, at most one onto each pCPU with room; d, whose reading is its demand, stays.
        let h = host(
            3,
            &[("a", 0, 80.0 / 3.0, true), ("b", 0, 80.0 / 3.0, true), ("c", 0, 80.0 / 3.0, true), ("d", 0, 20.0, true)],
        );
        let (p, state) = decide(&h, &converge(), &Default::default());
        assert_eq!(p.moves.len(), 2, "{p:?}");
        assert!(p.moves.iter().all(|m| m.domain != "d"), "{p:?}");
        let targets: BTreeSet<u32> = p.moves.iter().map(|m| m.to).collect();
        assert_eq!(targets, BTreeSet::from([1, 2]), "{p:?}");
        assert!(p.reason.contains("newly saturated"), "{}", p.reason);
        assert_eq!(state.saturated, BTreeSet::from([0]));
        // Still saturated in the next round: no more probing, the plan is made on the readings.
        let (p, _) = decide(&h, &converge(), &PolicyState { round: 5, ..state });
        assert!(!p.reason.contains("newly saturated"), "{}", p.reason);
    }

    #[test]
    fn two_pcpus_trade_several_vcpus_when_no_move_or_swap_helps() {
        // 28 + 42 + 20 = 90 | 42 + 7 + 30 = 79: no move or swap narrows the gap of 11 by 3 points, but sending 28
        // and 20 over for the other 42 gives 84 | 85.
        let h = host(
            2,
            &[
                ("a", 0, 28.0, true),
                ("b", 0, 42.0, true),
                ("c", 0, 20.0, true),
                ("d", 1, 42.0, true),
                ("e", 1, 7.0, true),
                ("f", 1, 30.0, true),
            ],
        );
        let (p, _) = decide(&h, &converge(), &PolicyState { was_over: true, ..Default::default() });
        let moved: BTreeSet<&str> = p.moves.iter().map(|m| m.domain.as_str()).collect();
        assert_eq!(moved, BTreeSet::from(["a", "c", "d"]), "{p:?}");
        assert!(spread(&apply(&h, &p)) <= 10.0, "{p:?}");
    }

    #[test]
    fn a_host_stuck_over_the_threshold_is_placed_from_scratch() {
        // Where converge stopped on POLICIES.md's random host r16x32-s1 before this plan: spread 13.4 (68.6 on pCPU
        // 0, 55.2 on pCPU 12). No move, swap or trade between two pCPUs narrows a gap by 3 points and the shedding
        // plan finds no balanced placement, but one exists (LPT's sets are within 9.0).
        let vs: Vec<(&str, u32, f64, bool)> = [
            ("r008", 0, 35.1), ("r015", 0, 33.5), ("r009", 1, 10.3), ("r022", 1, 51.3), ("r000", 2, 55.0),
            ("r011", 2, 6.9), ("r005", 3, 35.9), ("r017", 3, 30.0), ("r020", 4, 20.0), ("r023", 4, 18.7),
            ("r024", 4, 17.1), ("r021", 5, 38.4), ("r026", 5, 17.4), ("r003", 6, 53.8), ("r030", 6, 7.0),
            ("r016", 7, 18.6), ("r029", 7, 37.5), ("r002", 8, 46.8), ("r013", 8, 11.9), ("r019", 9, 14.6),
            ("r031", 9, 42.2), ("r018", 10, 11.5), ("r027", 10, 47.4), ("r010", 11, 56.6), ("r006", 12, 55.2),
            ("r001", 13, 5.9), ("r012", 13, 36.8), ("r025", 13, 13.6), ("r014", 14, 17.1), ("r028", 14, 45.2),
            ("r004", 15, 33.7), ("r007", 15, 29.1),
        ]
        .into_iter()
        .map(|(d, p, u)| (d, p, u, true))
        .collect();
        let h = host(16, &vs);
        let over = PolicyState { was_over: true, ..Default::default() };
        let (p, next) = decide(&h, &converge(), &over);
        assert!(spread(&apply(&h, &p)) <= 10.0 && p.reason.contains("re-partition"), "{p:?}");
        assert!(next.stalled.is_none() && !p.at_best);
        // Only in the round that finds the stall: once held at its best, readings within the band move nothing
        // (a new partition that looks balanced there would be noise, and it moves many vCPUs).
        let stalled = PolicyState { stalled: Some(13.4), ..over.clone() };
        let (q, _) = decide(&h, &converge(), &stalled);
        assert!(q.moves.is_empty() && q.at_best, "{q:?}");
        // A vCPU cooling down (it might be the way out, once its reading shows it): the round waits.
        let last_moved = [(("uuid-r009".into(), 0), (7, 2))].into_iter().collect();
        let cooling = PolicyState { round: 7, last_moved, ..over.clone() };
        assert!(decide(&h, &converge(), &cooling).0.moves.is_empty());
    }

    #[test]
    fn a_host_it_cannot_improve_is_left_at_its_best_until_the_spread_grows() {
        // 60 | 30 + 8: no move or swap narrows the gap of 22, so that is the best it reaches, with every vCPU free.
        let stuck = host(2, &[("a", 0, 60.0, true), ("b", 1, 30.0, true), ("c", 1, 8.0, true)]);
        let over = PolicyState { was_over: true, ..Default::default() };
        let (p, next) = decide(&stuck, &converge(), &over);
        assert!(p.moves.is_empty() && p.at_best, "{p:?}");
        assert_eq!(next.stalled, Some(22.0));
        // A vCPU cooling down might have been the way out: no stall is recorded then.
        let last_moved = [(("uuid-c".into(), 0), (7, 0))].into_iter().collect();
        let cooling = PolicyState { round: 7, last_moved, ..over.clone() };
        let (p, next) = decide(&stuck, &converge(), &cooling);
        assert!(p.moves.is_empty() && !p.at_best && next.stalled.is_none(), "{p:?} {:?}", next.stalled);

        // Stalled at 20: a later reading of 23 (within 20 + 5) has a step that narrows the gap (45 + 18 | 40: move
        // the 18 for 45 | 58), but no plan that balances. That is noise around the best, and nothing moves.
        let stalled = PolicyState { stalled: Some(20.0), ..over.clone() };
        let noisy = host(2, &[("a", 0, 45.0, true), ("b", 0, 18.0, true), ("c", 1, 40.0, true)]);
        let (p, next) = decide(&noisy, &converge(), &stalled);
        assert!(p.moves.is_empty() && p.at_best && p.reason.starts_with("at its best"), "{p:?}");
        assert_eq!(next.stalled, Some(20.0));
        // Without the stall the same reading is acted on: the hold above is what keeps it.
        assert_eq!(decide(&noisy, &converge(), &over).0.moves.len(), 1);
        // Within the band, a plan that balances is still taken (30 + 12 + 10 | 30: move the 12 for 40 | 42).
        let way_out =
            host(2, &[("a", 0, 30.0, true), ("b", 0, 12.0, true), ("d", 0, 10.0, true), ("c", 1, 30.0, true)]);
        let (p, next) = decide(&way_out, &converge(), &stalled);
        assert_eq!(p.moves.len(), 1, "{p:?}");
        assert!(spread(&apply(&way_out, &p)) <= 10.0 && next.stalled.is_none(), "{p:?}");
        // Past the band (26 > 20 + 5) it acts again, balancing or not.
        let grown = host(2, &[("a", 0, 45.0, true), ("b", 0, 20.0, true), ("c", 1, 39.0, true)]);
        let (p, next) = decide(&grown, &converge(), &stalled);
        assert_eq!(p.moves.len(), 1, "{p:?}");
        assert!(next.stalled.is_none() && !p.at_best);
    }

    #[test]
    fn once_balanced_a_small_excess_is_left_alone() {
        // A spread of 14 (threshold 10): acted on while the host was never seen balanced, left alone once it was.
        let h = host(2, &[("a", 0, 12.0, true), ("b", 0, 30.0, true), ("c", 1, 28.0, true)]);
        let fresh = PolicyState { was_over: true, ..Default::default() };
        assert_eq!(decide(&h, &converge(), &fresh).0.moves.len(), 1);
        let settled = PolicyState { was_over: true, settled: true, ..Default::default() };
        let (p, next) = decide(&h, &converge(), &settled);
        assert!(p.moves.is_empty() && p.reason.starts_with("settled"), "{p:?}");
        assert!(next.settled && !next.was_over);
        // Past the band (1.5 × threshold) it acts again, and the host is no longer settled.
        let big = host(2, &[("a", 0, 12.0, true), ("b", 0, 40.0, true), ("c", 1, 28.0, true)]);
        let (p, next) = decide(&big, &converge(), &PolicyState { was_over: true, ..settled });
        assert_eq!(p.moves.len(), 1, "{p:?}");
        assert!(!next.settled);
    }

    #[test]
    fn a_swap_beats_two_moves_when_moves_cannot_balance() {
        // {45, 45} vs {10, 10}: moving a 45 mirrors the gap (70 -> 20), a swap of 45 and 10 closes it.
        let h = host(2, &[("h1", 0, 45.0, true), ("h2", 0, 45.0, true), ("l1", 1, 10.0, true), ("l2", 1, 10.0, true)]);
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
        let mut avg = Vec::new();
        let h = |x: f64| host(1, &[("a", 0, x, true)]);
        assert_eq!(smooth(&h(40.0), &mut avg, |_| false).vcpus[0].usage, Some(40.0));
        let s = smooth(&h(44.0), &mut avg, |_| false).vcpus[0].usage.unwrap();
        assert!(s > 40.0 && s < 44.0, "noise is damped: {s}");
        // A jump beyond SMOOTHING_RESET is a change: taken at once.
        assert_eq!(smooth(&h(90.0), &mut avg, |_| false).vcpus[0].usage, Some(90.0));
        // So is any reading the caller marks as new information (a vCPU just moved, a saturated pCPU).
        assert_eq!(smooth(&h(80.0), &mut avg, |_| true).vcpus[0].usage, Some(80.0));
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

    /// Slots and loads for [`fewest_moves`]: (pCPU, usage) per vCPU on `n` pCPUs.
    fn slots_of(n: u32, vs: &[(u32, f64)]) -> (Vec<Slot>, BTreeMap<PcpuId, f64>) {
        let mut load: BTreeMap<PcpuId, f64> = (0..n).map(|p| (p, 0.0)).collect();
        let slots = vs
            .iter()
            .enumerate()
            .map(|(idx, &(pcpu, usage))| {
                *load.get_mut(&pcpu).unwrap() += usage;
                Slot { idx, pcpu, usage, not_to: None, capped: false }
            })
            .collect();
        (slots, load)
    }

    fn planned(slots: &[Slot], load: &BTreeMap<PcpuId, f64>, to: &[PcpuId]) -> (usize, f64) {
        let mut l = load.clone();
        for (s, t) in slots.iter().zip(to) {
            *l.get_mut(&s.pcpu).unwrap() -= s.usage;
            *l.get_mut(t).unwrap() += s.usage;
        }
        (slots.iter().zip(to).filter(|(s, t)| s.pcpu != **t).count(), spread_of(&l))
    }

    #[test]
    fn the_whole_host_plan_moves_few_vcpus_once() {
        // 8 x 10 on pCPU 0 of 4, and a 5 on pCPU 1: six must leave pCPU 0, and nothing else needs to move.
        let mut vs = vec![(0, 10.0); 8];
        vs.push((1, 5.0));
        let (slots, load) = slots_of(4, &vs);
        let to = fewest_moves(&slots, &load, 10.0).unwrap();
        let (moved, spread) = planned(&slots, &load, &to);
        assert!(spread <= 10.0 + 1e-9, "{spread}");
        assert_eq!((moved, to[8]), (6, 1), "{to:?}");
        // A swap is found where no single move balances: {45, 45} vs {10, 10}.
        let (slots, load) = slots_of(2, &[(0, 45.0), (0, 45.0), (1, 10.0), (1, 10.0)]);
        let to = fewest_moves(&slots, &load, 10.0).unwrap();
        assert_eq!(planned(&slots, &load, &to), (2, 0.0));
        // A vCPU does not go back to the pCPU it left: with "a" barred from pCPU 1, "b" goes.
        let (mut slots, load) = slots_of(2, &[(0, 30.0), (0, 30.0)]);
        slots[0].not_to = Some(1);
        let to = fewest_moves(&slots, &load, 10.0).unwrap();
        assert_eq!(to, vec![0, 1]);
    }

    #[test]
    fn small_hosts_search_the_band_finer() {
        // A multiple of the coarse steps (so the coarse positions are among those tried), finer for fewer vCPUs,
        // the coarse search alone on the bench's host.
        assert_eq!(bands(1000), BANDS);
        assert_eq!(bands(5000), BANDS);
        assert_eq!(bands(180), 32);
        assert_eq!(bands(12), 40);
        assert_eq!(bands(0), 40);
        for n in 1..2000 {
            assert_eq!(bands(n) % BANDS, 0, "{n}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Hosts like the random ones of POLICIES.md, where rounds get stuck: 2 to 8 pCPUs, none saturated, 2 or 3
        /// pinned vCPUs each of 3 to 45 %. A placement from scratch there balances the planned loads and lowers their
        /// sum of squares, moves no excluded vCPU, and sends none to a reserved pCPU or to the pCPU it left. Few
        /// inputs get stuck in a way it can balance (about 1 in 40), hence the cases.
        #[test]
        fn a_placement_from_scratch_balances_and_keeps_the_constraints(
            loads in proptest::collection::vec(proptest::collection::vec(3.0f64..45.0, 2..4), 2..9),
            reserved in proptest::option::of(0u32..8),
            left in proptest::option::of((0usize..24, 0u32..8)),
        ) {
            let n = u32::try_from(loads.len()).unwrap();
            let names: Vec<String> = (0..loads.iter().map(Vec::len).sum::<usize>()).map(|i| format!("d{i:02}")).collect();
            let mut spec = Vec::new();
            for (p, us) in loads.iter().enumerate() {
                for &u in us {
                    spec.push((names[spec.len()].as_str(), u32::try_from(p).unwrap(), u, true));
                }
            }
            let h = host(n, &spec);
            let mut c = converge();
            c.constraints.exclude = vec![crate::controller::policy::DomainMatcher::parse("d00")];
            c.constraints.reserved = reserved.filter(|&r| r < n).into_iter().collect();
            let mut state = PolicyState { was_over: true, round: 40, ..Default::default() };
            // One vCPU was moved here from another pCPU 20 rounds ago: it may not go back there yet.
            let left = left.map(|(i, q)| (i % spec.len(), q % n)).filter(|&(i, q)| q != spec[i].1);
            if let Some((i, q)) = left {
                state.last_moved.insert((format!("uuid-{}", spec[i].0).into(), 0), (20, q));
            }
            let (p, _) = decide(&h, &c, &state);
            if p.reason.contains("re-partition") {
                let after = apply(&h, &p);
                let reserved = |i: usize| c.constraints.reserved.contains(&u32::try_from(i).unwrap());
                let allowed: Vec<f64> = after.iter().enumerate().filter(|(i, _)| !reserved(*i)).map(|(_, x)| *x).collect();
                prop_assert!(spread(&allowed) <= 10.0 + 1e-9, "{:?}", p);
                let sq = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
                prop_assert!(sq(&after) < sq(&h.pcpus.iter().map(|p| p.usage).collect::<Vec<_>>()));
                for m in &p.moves {
                    prop_assert!(m.domain != "d00" && !c.constraints.reserved.contains(&m.to), "{:?}", m);
                    prop_assert!(left.is_none_or(|(i, q)| m.domain != spec[i].0 || m.to != q), "{:?} went back", m);
                }
            }
        }
    }

    proptest! {
        /// A finer search of the band's position finds a plan wherever the coarse one does, and one that moves no
        /// more vCPUs.
        #[test]
        fn the_finer_band_search_never_moves_more(
            n in 2u32..8,
            vs in proptest::collection::vec((0u32..8, 0.0f64..60.0), 1..24),
        ) {
            let vs: Vec<(u32, f64)> = vs.into_iter().map(|(p, u)| (p % n, u)).collect();
            let (slots, load) = slots_of(n, &vs);
            if let Some(coarse) = fewest_moves_over(&slots, &load, 10.0, BANDS) {
                let fine = fewest_moves_over(&slots, &load, 10.0, bands(slots.len()));
                prop_assert!(fine.is_some(), "{:?}", vs);
                let moved = |to: &[PcpuId]| planned(&slots, &load, to).0;
                prop_assert!(moved(&fine.unwrap()) <= moved(&coarse), "{:?}", vs);
            }
        }

        /// Where the shortcut for balanced hosts applies, it decides what the full plan decides. A threshold up
        /// to 200 points makes most random hosts balanced; random reserved pCPUs strand some vCPUs.
        #[test]
        fn the_balanced_shortcut_decides_as_the_plan(
            h in arb_host(),
            threshold in 0.0f64..200.0,
            reserved in proptest::collection::btree_set(0u32..8, 0..3),
            round in 0u64..3,
        ) {
            let allowed: crate::controller::policy::PcpuSet = h.pcpus.iter().map(|p| p.id).filter(|id| !reserved.contains(id)).collect();
            let movable = (0..h.vcpus.len()).filter(|&i| h.vcpus[i].usage.is_some()).collect();
            let v = View { u: &h, load: h.pcpus.iter().map(|p| (p.id, p.usage)).collect(), allowed, movable };
            let state = PolicyState { round, ..Default::default() };
            if let Some(d) = balanced(&v, threshold) {
                prop_assert_eq!(d, plan(&v, threshold, &state, &saturated(&h)));
            }
        }

        /// A converge round never widens the spread over the planned loads, and lowers the sum of squares when it
        /// moves anything.
        #[test]
        fn converge_never_widens(h in arb_host(), was_over in any::<bool>()) {
            // Over the threshold the round before too: no hold, so stuck rounds try the placement from scratch.
            let (p, _) = decide(&h, &converge(), &PolicyState { was_over, ..Default::default() });
            if !p.moves.is_empty() {
                let before: Vec<f64> = h.pcpus.iter().map(|p| p.usage).collect();
                let after = apply(&h, &p);
                prop_assert!(spread(&after) <= spread(&before) + 1e-9);
                let sq = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
                prop_assert!(sq(&after) < sq(&before));
            }
        }

        /// A probe round (pCPUs newly saturated) only moves vCPUs off saturated pCPUs, onto pCPUs that are not
        /// saturated, at most one onto each.
        #[test]
        fn probe_rounds_only_relieve(h in arb_host()) {
            let p = decide_once(&h, &converge());
            if p.reason.contains("newly saturated") {
                let sat = saturated(&h);
                let targets: BTreeSet<PcpuId> = p.moves.iter().map(|m| m.to).collect();
                prop_assert_eq!(targets.len(), p.moves.len(), "{:?}", p);
                for m in &p.moves {
                    prop_assert!(sat.contains(&m.from) && !sat.contains(&m.to), "{:?}", p);
                }
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
                    v.affinity = [m.to].into();
                }
                let n = cur.pcpus.len() as u32;
                cur = with_loads(n, vs);
                last = p.moves.len();
            }
            prop_assert_eq!(last, 0);
        }
    }
}
