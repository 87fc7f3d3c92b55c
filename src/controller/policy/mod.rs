//! The balancing policies: one round's usage (and the policy's own state) in, a plan (and the next state) out.
//! Pure: no I/O, no clock, deterministic.
//!
//! Three policies share the same input, output and constraints (see README, "The policy"):
//! - [`PolicyKind::Seed`]: the literal "10 % rule": if the spread exceeds the threshold, move the busiest vCPU of
//!   the busiest pCPU to the freest pCPU. Kept for reference: taken literally it can move the same load back and
//!   forth forever.
//! - [`PolicyKind::Guarded`]: the same rule, but it only moves a vCPU lighter than the spread (see
//!   [`tenpercent`]), so every move narrows the gap and no placement can come back.
//! - [`PolicyKind::Converge`]: several moves or swaps per round, each re-evaluated after the previous one, with
//!   a per-vCPU cooldown (see [`converge`]).
//!
//! Constraints, honoured by every policy, are applied here once so that no policy can forget them:
//! excluded domains and vCPUs an operator pinned by hand are never moved or pinned; reserved pCPUs are never a
//! target and are not counted in the spread; vCPUs found on a reserved pCPU are moved off when possible.
//! Only pins that change something are produced: a vCPU already pinned to exactly its target is left alone.

pub mod cap;
pub mod constraints;
pub mod converge;
pub mod partition;
pub mod tenpercent;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::Serialize;

pub use constraints::{Constraints, DomainMatcher};

use crate::controller::usage::{self, HostUsage, VcpuUsage};
use crate::model::{PcpuId, PinRequest};

/// Default threshold on the spread, in percentage points of one pCPU.
pub const DEFAULT_THRESHOLD: f64 = 10.0;

/// Which policy decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// The literal 10 % rule (no guard).
    Seed,
    /// The 10 % rule with the guard.
    Guarded,
    /// Several moves and swaps per round, with a cooldown.
    Converge,
}

/// The default policy: see POLICIES.md for the evaluation that chose it.
pub const DEFAULT_POLICY: PolicyKind = PolicyKind::Converge;

impl PolicyKind {
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Seed, PolicyKind::Guarded, PolicyKind::Converge];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Seed => "seed",
            PolicyKind::Guarded => "guarded",
            PolicyKind::Converge => "converge",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown policy {s:?} (have: seed, guarded, converge)"))
    }
}

/// Policy settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    pub kind: PolicyKind,
    /// Act only when the spread is above this many points.
    pub threshold: f64,
    pub constraints: Constraints,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig { kind: DEFAULT_POLICY, threshold: DEFAULT_THRESHOLD, constraints: Constraints::default() }
    }
}

impl PolicyConfig {
    /// The default settings with another policy.
    pub fn with_kind(kind: PolicyKind) -> Self {
        PolicyConfig { kind, ..Default::default() }
    }
}

/// A vCPU, as the policies key it: (domain UUID, vCPU index).
pub type VcpuKey = (std::sync::Arc<str>, u32);

/// Per-vCPU memory of the policies. Hashed with a fixed seed, not ordered: every round looks up every vCPU
/// several times, and an ordered map's string comparisons (ten per lookup at 1,000 vCPUs) were most of a balanced
/// host's decision time (benches/policy.rs, `balanced`). Nothing iterates these maps in an order that matters.
pub type VcpuMap<V> = HashMap<VcpuKey, V, foldhash::fast::FixedState>;
/// The set form of [`VcpuMap`].
pub type VcpuSet = HashSet<VcpuKey, foldhash::fast::FixedState>;

/// Decided rounds in which a pin whose answer was lost is looked for ([`PolicyState::unconfirmed`]). It lands within
/// the agent's libvirt deadline, or, if libvirtd hung, when it resumes; rounds in which the host cannot be sampled
/// are not decided and do not count. Past this, an affinity equal to it is no longer taken for the controller's: an
/// operator who later pins that vCPU to the same pCPUs made a manual pin.
pub const UNCONFIRMED_ROUNDS: u64 = 3;

/// What a policy remembers between rounds for one host. The per-host task owns it and passes it to
/// [`decide`], which returns the next one; nothing else keeps state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyState {
    /// Rounds decided so far.
    pub round: u64,
    /// The last pin this controller applied to each vCPU. A vCPU whose affinity differs from it was pinned by
    /// someone else since.
    /// Shared with the previous round's state until a pin changes: most rounds change none, and copying a
    /// thousand affinities per host and round showed in the controller's profile.
    pub last_pins: std::sync::Arc<VcpuMap<std::sync::Arc<[PcpuId]>>>,
    /// Pins sent in a batch whose answer never came (the RPC failed as a whole, e.g. at its deadline). The agent may
    /// have applied them anyway, since its blocking work finishes in the background: an affinity later seen equal to
    /// one of them is this controller's own pin, not an operator's. Each is kept with the round it was decided in,
    /// until it is seen, superseded by a newer pin, the vCPU is gone, or [`UNCONFIRMED_ROUNDS`] rounds passed.
    pub unconfirmed: VcpuMap<(u64, std::sync::Arc<[PcpuId]>)>,
    /// Round at which each vCPU was last moved, and the pCPU it left (for [`converge`]'s cooldown and its
    /// no-return rule).
    pub last_moved: VcpuMap<(u64, PcpuId)>,
    /// vCPUs already reported as pinned by hand, so the log says it once, not every round.
    pub manual_reported: VcpuSet,
    /// Smoothed usage of each vCPU (for [`converge`]), in the order of [`PolicyState::seen`]: every round reads and
    /// updates all of them, and by position that is no hash lookup at all.
    pub smoothed: Vec<Option<f64>>,
    /// Whether the previous round's spread was over the level that triggers action (for [`converge`]'s hold).
    pub was_over: bool,
    /// pCPUs that read saturated in the previous round (for [`converge`]: their vCPUs' readings were fair shares,
    /// not demands, so the next reading of those vCPUs is not smoothed with them).
    pub saturated: BTreeSet<PcpuId>,
    /// Whether the host has been seen balanced since [`converge`] last moved anything (its hysteresis).
    pub settled: bool,
    /// The spread over the threshold at which [`converge`] last found no step worth a pin, with no vCPU cooling
    /// down, if nothing has moved and the host has not been balanced since: the best it reaches on this host. Its
    /// hysteresis then holds from that level, so that noise on a host that cannot be balanced does not move pins
    /// back and forth for ever.
    pub stalled: Option<f64>,
    /// The vCPUs of the last round, in its order: when this round has the same ones and no fresh domain, nothing
    /// in the maps above can be stale, and pruning them is skipped.
    pub seen: Vec<VcpuKey>,
}

impl PolicyState {
    /// Records a pin the agent applied.
    pub fn record_applied(&mut self, pin: &PinRequest) {
        let key: VcpuKey = (pin.domain.as_str().into(), pin.vcpu);
        if !self.unconfirmed.is_empty() {
            self.unconfirmed.remove(&key);
        }
        // The 10% rules re-pin every vCPU where it runs each round: a pin equal to the remembered one changes
        // nothing, and leaving the map untouched keeps it shared (no copy, and no rewrite of the pins file).
        if self.last_pins.get(&key).is_some_and(|p| **p == *pin.pcpus) {
            return;
        }
        std::sync::Arc::make_mut(&mut self.last_pins).insert(key, pin.pcpus.as_slice().into());
    }

    /// Records a pin whose outcome is unknown: its batch got no answer (see [`PolicyState::unconfirmed`]).
    pub fn record_unconfirmed(&mut self, pin: &PinRequest) {
        self.unconfirmed.insert((pin.domain.as_str().into(), pin.vcpu), (self.round, pin.pcpus.as_slice().into()));
    }
}

/// A vCPU moved to another pCPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Move {
    pub domain: String,
    pub uuid: String,
    pub vcpu: u32,
    pub from: PcpuId,
    pub to: PcpuId,
    pub usage: f64,
}

/// Why a vCPU was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeldWhy {
    /// Its domain matches `--exclude`.
    Excluded,
    /// Someone else changed its affinity since the controller last pinned it.
    Manual,
}

/// A vCPU a constraint kept the policy away from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Held {
    pub domain: String,
    pub vcpu: u32,
    pub pcpu: PcpuId,
    pub why: HeldWhy,
}

/// What the policy decided for one host in one round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Spread over the pCPUs that may be targets (online, not reserved).
    pub spread: f64,
    pub busiest: Option<PcpuId>,
    pub freest: Option<PcpuId>,
    /// In the order decided; a vCPU appears at most once, from where it runs to where it goes.
    pub moves: Vec<Move>,
    /// Why: shown in logs and in the JSON `action.reason`.
    pub reason: String,
    /// vCPUs left alone by a constraint.
    pub held: Vec<Held>,
    /// vCPUs newly found pinned by hand (for a one-time log line).
    pub newly_manual: Vec<Held>,
    /// Pins that change something, keyed by domain UUID.
    pub pins: Vec<PinRequest>,
    /// Whether the policy holds the host over the threshold at the best it found ([`PolicyState::stalled`]):
    /// nothing it can do balances the host, so more imbalance there needs capacity or a hand, not more rounds.
    pub at_best: bool,
    /// Moves of the policy's plan that `--max-moves` left for later rounds.
    pub deferred: usize,
}

impl Plan {
    /// The first move, if any (the only one for `seed` and `guarded`).
    pub fn movement(&self) -> Option<&Move> {
        self.moves.first()
    }
}

/// A round as the policies see it, after the constraints: which vCPUs they may move and where.
#[derive(Debug)]
pub struct View<'a> {
    pub u: &'a HostUsage,
    /// Usage of every online pCPU, in id order.
    pub load: Vec<(PcpuId, f64)>,
    /// Online pCPUs that are not reserved: the only targets, and the ones the spread is taken over.
    pub allowed: PcpuSet,
    /// Indices into `u.vcpus` of the vCPUs a policy may move: known usage, not held.
    pub movable: Vec<usize>,
}

impl View<'_> {
    /// (busiest, freest) allowed pCPUs with their usage; ties go to the lowest id.
    pub fn extremes(&self) -> Option<((PcpuId, f64), (PcpuId, f64))> {
        extremes(self.load.iter().filter(|(id, _)| self.allowed.contains(id)).copied())
    }

    pub fn vcpu(&self, i: usize) -> &VcpuUsage {
        &self.u.vcpus[i]
    }

    /// Movable vCPUs sitting on a reserved (or offline) pCPU.
    pub fn stranded(&self) -> Vec<usize> {
        self.stranded_iter().collect()
    }

    /// Whether any movable vCPU sits on a reserved (or offline) pCPU.
    pub fn any_stranded(&self) -> bool {
        self.stranded_iter().next().is_some()
    }

    fn stranded_iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.movable.iter().copied().filter(|&i| !self.allowed.contains(&self.u.vcpus[i].pcpu))
    }
}

/// A set of pCPU ids as a bitmap: the policies ask "may this pCPU be a target?" for every vCPU and pCPU of every
/// round, and an ordered set's search and its allocation per node showed in the controller's profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PcpuSet(Vec<u64>);

impl PcpuSet {
    pub fn contains(&self, p: &PcpuId) -> bool {
        self.0.get(*p as usize / 64).is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    pub fn insert(&mut self, p: PcpuId) {
        let i = p as usize / 64;
        if self.0.len() <= i {
            self.0.resize(i + 1, 0);
        }
        self.0[i] |= 1 << (p % 64);
    }
}

impl FromIterator<PcpuId> for PcpuSet {
    fn from_iter<I: IntoIterator<Item = PcpuId>>(it: I) -> Self {
        let mut s = PcpuSet::default();
        for p in it {
            s.insert(p);
        }
        s
    }
}

/// (highest, lowest) of `(id, usage)` pairs in id order; ties go to the lowest id.
pub fn extremes(it: impl IntoIterator<Item = (PcpuId, f64)>) -> Option<((PcpuId, f64), (PcpuId, f64))> {
    let mut it = it.into_iter();
    let first = it.next()?;
    let (mut hi, mut lo) = (first, first);
    for p in it {
        if p.1 > hi.1 {
            hi = p;
        }
        if p.1 < lo.1 {
            lo = p;
        }
    }
    Some((hi, lo))
}

/// What a policy returns before the pins are built.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// (index into `u.vcpus`, target pCPU), at most one per vCPU.
    pub moves: Vec<(usize, PcpuId)>,
    pub reason: String,
    /// The spread at which [`converge`] found nothing worth a pin with every vCPU free to move: the best it can
    /// reach on this host as it is (see [`PolicyState::stalled`]).
    pub stalled: Option<f64>,
}

/// Decides one round for one host. `state` is the policy's memory of earlier rounds on this host; the returned
/// state replaces it (the caller then adds the pins the agent applied with [`PolicyState::record_applied`]).
pub fn decide(u: &HostUsage, cfg: &PolicyConfig, state: &PolicyState) -> (Plan, PolicyState) {
    let mut next = prune(u, state);
    let saturated = converge::saturated(u);
    let smoothed = (cfg.kind == PolicyKind::Converge)
        .then(|| converge::smooth(u, &mut next.smoothed, fresh_start(state, &saturated)));
    let plan = decide_into(smoothed.as_ref().unwrap_or(u), saturated, cfg, Some(state), &mut next);
    (plan, next)
}

/// [`decide`], updating `state` in place: what the per-host task calls every round. In the usual round (the same
/// vCPUs as the last one, no fresh domain) nothing needs pruning, and the state is neither copied nor dropped.
/// `converge` smooths `u` in place and puts its readings back before returning: `u` is unchanged.
pub fn decide_mut(u: &mut HostUsage, cfg: &PolicyConfig, state: &mut PolicyState) -> Plan {
    let old = needs_pruning(u, state).then(|| {
        let old = std::mem::take(state);
        *state = prune(u, &old);
        old
    });
    let saturated = converge::saturated(u);
    let raw = (cfg.kind == PolicyKind::Converge).then(|| {
        let fresh = fresh_start(old.as_ref().unwrap_or(state), &saturated);
        converge::smooth_in_place(u, &mut state.smoothed, fresh)
    });
    let plan = decide_into(u, saturated, cfg, old.as_ref(), state);
    if let Some(raw) = raw {
        raw.restore(u);
    }
    plan
}

/// Which readings `converge`'s smoothing takes as they are: those that were or are fair shares of a saturated
/// pCPU, and those of vCPUs that were just moved, are new information rather than noise. `state` is the state
/// before this round.
fn fresh_start(state: &PolicyState, saturated: &BTreeSet<PcpuId>) -> impl Fn(&VcpuUsage) -> bool {
    // Usually none: one pass over the moves beats a lookup per vCPU.
    let just_moved: VcpuSet =
        state.last_moved.iter().filter(|(_, &(r, _))| r == state.round).map(|(k, _)| k.clone()).collect();
    let was_saturated = state.saturated.clone();
    let saturated = saturated.clone();
    move |v: &VcpuUsage| {
        was_saturated.contains(&v.pcpu)
            || saturated.contains(&v.pcpu)
            || (!just_moved.is_empty() && just_moved.contains(&(v.uuid.clone(), v.vcpu)))
    }
}

/// The body of [`decide`], on the usage the policy plans on (smoothed, for `converge`): `next` is the pruned state,
/// which this updates; `old` is the state before pruning, or `None` when pruning changed nothing, and `next` itself
/// is the old state until the policy has decided. So nothing the policies read of the old state (round, cooldowns,
/// saturation, hold, hysteresis) may be written to `next` before they run.
fn decide_into(
    u: &HostUsage,
    saturated: BTreeSet<PcpuId>,
    cfg: &PolicyConfig,
    old: Option<&PolicyState>,
    next: &mut PolicyState,
) -> Plan {
    let c = &cfg.constraints;
    let mut held = Vec::new();
    let mut newly_manual = Vec::new();
    let mut movable = Vec::new();
    let mut is_held = vec![false; u.vcpus.len()];
    // Whether the affinity seen is the one remembered: looked up once here, used again by `remember_seen`.
    let mut remembered = vec![false; u.vcpus.len()];
    if !next.unconfirmed.is_empty() {
        let decided = old.map_or(next.round, |o| o.round);
        next.unconfirmed.retain(|_, (at, _)| decided.saturating_sub(*at) < UNCONFIRMED_ROUNDS);
    }
    for (i, v) in u.vcpus.iter().enumerate() {
        let key = (v.uuid.clone(), v.vcpu);
        let why = if c.excludes(&v.domain, &v.uuid) {
            Some(HeldWhy::Excluded)
        } else {
            remembered[i] = next.last_pins.get(&key) == Some(&v.affinity);
            if !remembered[i] && next.unconfirmed.get(&key).is_some_and(|(_, lost)| *lost == v.affinity) {
                // A pin of a batch whose answer was lost, applied after all: it is this controller's.
                next.unconfirmed.remove(&key);
                std::sync::Arc::make_mut(&mut next.last_pins).insert(key.clone(), v.affinity.clone());
                remembered[i] = true;
            }
            if !c.override_manual && !remembered[i] && next.last_pins.contains_key(&key) {
                Some(HeldWhy::Manual)
            } else {
                None
            }
        };
        match why {
            Some(why) => {
                is_held[i] = true;
                let h = Held { domain: v.domain.to_string(), vcpu: v.vcpu, pcpu: v.pcpu, why };
                if why == HeldWhy::Manual && next.manual_reported.insert(key) {
                    newly_manual.push(h.clone());
                }
                held.push(h);
            }
            None => {
                if !next.manual_reported.is_empty() {
                    next.manual_reported.remove(&key);
                }
                if v.usage.is_some() {
                    movable.push(i);
                }
            }
        }
    }
    let allowed: PcpuSet = u.pcpus.iter().map(|p| p.id).filter(|id| !c.reserved.contains(id)).collect();
    let view = View { u, load: u.pcpus.iter().map(|p| (p.id, p.usage)).collect(), allowed, movable };
    let Some(((busiest, hi), (freest, lo))) = view.extremes() else {
        let reason = if u.pcpus.is_empty() {
            "host reports no online pCPU".to_string()
        } else {
            "every online pCPU is reserved: nothing to balance onto".to_string()
        };
        let plan = Plan {
            spread: 0.0,
            busiest: None,
            freest: None,
            moves: vec![],
            reason,
            held,
            newly_manual,
            pins: vec![],
            at_best: false,
            deferred: 0,
        };
        next.round = old.unwrap_or(&*next).round + 1;
        return plan;
    };
    let spread = hi - lo;
    let state = old.unwrap_or(&*next);
    let was_over = spread > converge::trigger(cfg.threshold, state);
    let d = match cfg.kind {
        PolicyKind::Seed => tenpercent::decide(&view, cfg.threshold, false),
        PolicyKind::Guarded => tenpercent::decide(&view, cfg.threshold, true),
        PolicyKind::Converge => converge::decide(&view, cfg.threshold, state, &saturated),
    };
    let (d, deferred) = limit_moves(d, &view, state, c.max_moves);
    let settled = if !d.moves.is_empty() { false } else { state.settled || spread <= cfg.threshold };
    let stalled = if !d.moves.is_empty() || spread <= cfg.threshold { None } else { d.stalled.or(state.stalled) };
    let round = state.round + 1;
    next.round = round;
    next.was_over = was_over;
    next.saturated = saturated;
    next.settled = settled;
    next.stalled = stalled;
    let mut target: Vec<Option<PcpuId>> = vec![None; u.vcpus.len()];
    let mut moves = Vec::new();
    for &(i, to) in &d.moves {
        let v = &u.vcpus[i];
        debug_assert!(!is_held[i] && view.allowed.contains(&to));
        target[i] = Some(to);
        next.last_moved.insert((v.uuid.clone(), v.vcpu), (next.round, v.pcpu));
        moves.push(Move {
            domain: v.domain.to_string(),
            uuid: v.uuid.to_string(),
            vcpu: v.vcpu,
            from: v.pcpu,
            to,
            usage: v.usage.unwrap_or(0.0),
        });
    }
    let mut reason = d.reason;
    if !held.is_empty() {
        let n = |w: HeldWhy| held.iter().filter(|h| h.why == w).count();
        let (ex, man) = (n(HeldWhy::Excluded), n(HeldWhy::Manual));
        reason.push_str(&format!("; left alone: {ex} vCPU(s) of excluded domains, {man} vCPU(s) pinned by someone else"));
    }
    let pins: Vec<PinRequest> = u
        .vcpus
        .iter()
        .enumerate()
        .filter(|&(i, _)| !is_held[i])
        .filter_map(|(i, v)| {
            let to = match target[i] {
                Some(to) => to,
                // Never pin anything onto a reserved pCPU: a vCPU that could not be moved off yet stays unpinned
                // where it is, and is moved once its usage is known.
                None if !view.allowed.contains(&v.pcpu) => return None,
                None => v.pcpu,
            };
            // Written out: a one-element slice comparison is a `memcmp` call, once per vCPU and round.
            (!matches!(*v.affinity, [only] if only == to)).then(|| PinRequest {
                domain: v.uuid.to_string(),
                vcpu: v.vcpu,
                pcpus: vec![to],
                persist: false,
            })
        })
        .collect();
    remember_seen(u, &is_held, &remembered, &pins, next);
    let at_best = next.stalled.is_some();
    Plan {
        spread,
        busiest: Some(busiest),
        freest: Some(freest),
        moves,
        reason,
        held,
        newly_manual,
        pins,
        at_best,
        deferred,
    }
}

/// `--max-moves`: the part of the plan to carry out this round (see [`cap`]). Before anything is recorded, so the
/// moves left out are not cooling down and the state reads as if the policy had planned only those kept. Also
/// returns how many of the plan's moves were left out.
fn limit_moves(
    mut d: Decision,
    view: &View,
    state: &PolicyState,
    max: Option<std::num::NonZeroUsize>,
) -> (Decision, usize) {
    let planned = d.moves.len();
    let Some(max) = max.filter(|m| planned > m.get()) else { return (d, 0) };
    let step = |&(i, to): &(usize, PcpuId)| {
        let v = view.vcpu(i);
        cap::Step { from: v.pcpu, to, usage: v.usage.unwrap_or(0.0) }
    };
    let steps: Vec<cap::Step> = d.moves.iter().map(step).collect();
    let kept = cap::limit(&view.load, &view.allowed, &steps, max.get());
    let deferred = planned - kept.len();
    let what = if kept.is_empty() {
        // No part of the plan that fits helps on its own (a plan of swaps under `--max-moves 1`, say), and
        // planning it again next round would find the same: one move of the policy's own kind instead, a vCPU to
        // the freest pCPU, the one that helps most, under converge's rules (not one just moved, nor back).
        let freest = view.extremes().map(|(_, f)| f);
        let single: Vec<(usize, PcpuId)> = view
            .movable
            .iter()
            .filter_map(|&i| {
                let v = view.vcpu(i);
                let (to, lo) = freest.filter(|(f, _)| *f != v.pcpu && view.allowed.contains(&v.pcpu))?;
                // Converge's rule for a step: it narrows the gap between the two pCPUs by MIN_STEP_GAIN at least.
                let (gap, u) = (cap::load_of(&view.load, v.pcpu)? - lo, v.usage.unwrap_or(0.0));
                if gap - (gap - 2.0 * u).abs() < converge::MIN_STEP_GAIN {
                    return None;
                }
                let (cooling, not_to) = converge::last_move_rules(state, v);
                (!cooling && not_to != Some(to)).then_some((i, to))
            })
            .collect();
        let one = cap::limit(&view.load, &view.allowed, &single.iter().map(step).collect::<Vec<_>>(), 1);
        d.moves = one.iter().map(|&k| single[k]).collect();
        match d.moves.first() {
            Some(&(i, to)) => {
                let v = view.vcpu(i);
                format!("none of them helps on its own, so one vCPU instead: {} vCPU {} to pCPU {to}", v.domain, v.vcpu)
            }
            None => "none of them, as no part that fits helps on its own".to_string(),
        }
    } else {
        d.moves = kept.iter().map(|&k| d.moves[k]).collect();
        format!("{} of them, those that lower the imbalance most", kept.len())
    };
    d.reason.push_str(&format!("; --max-moves {max}: the plan has {planned} moves, this round makes {what}"));
    (d, deferred)
}

/// Remembers the affinity of every vCPU this round leaves as it is, so that a later change this controller did not
/// make (an operator's `virsh vcpupin`) is recognised as a manual pin even on a vCPU the controller never had to
/// pin itself. vCPUs held back keep what was remembered; vCPUs about to be pinned are recorded when the agent
/// applies the pin ([`PolicyState::record_applied`]).
/// `remembered[i]` says that vCPU `i`'s affinity is already the remembered one.
fn remember_seen(u: &HostUsage, is_held: &[bool], remembered: &[bool], pins: &[PinRequest], next: &mut PolicyState) {
    let pinned: HashSet<(&str, u32)> = pins.iter().map(|p| (p.domain.as_str(), p.vcpu)).collect();
    for ((v, held), remembered) in u.vcpus.iter().zip(is_held).zip(remembered) {
        // Most rounds change nothing: skip the copy of an affinity that is already remembered.
        if *held || *remembered || pinned.contains(&(&*v.uuid, v.vcpu)) {
            continue;
        }
        std::sync::Arc::make_mut(&mut next.last_pins).insert((v.uuid.clone(), v.vcpu), v.affinity.clone());
    }
}

/// One decision without memory (for one-shot views such as `show`).
pub fn decide_once(u: &HostUsage, cfg: &PolicyConfig) -> Plan {
    decide(u, cfg, &PolicyState::default()).0
}

/// Whether [`prune`] would change `state`. The usual round has the same vCPUs as the last one, in the same order
/// (the agent lists domains in a stable order and usage sorts them), so every key in the state is still present.
/// Comparing the two lists is far cheaper than hashing every key; with [`usage::compute_reusing`] the keys are the
/// same `Arc`s, and each comparison stops at the pointer.
///
/// [`usage::compute_reusing`]: crate::controller::usage::compute_reusing
fn needs_pruning(u: &HostUsage, state: &PolicyState) -> bool {
    let same_vcpus = state.seen.len() == u.vcpus.len()
        && state.seen.iter().zip(&u.vcpus).all(|(k, v)| k.1 == v.vcpu && k.0 == v.uuid);
    !(same_vcpus && u.fresh.is_empty())
}

/// The state without the vCPUs that are gone, and without the pins of domains that restarted: a restarted
/// domain takes its affinity from its configuration again, which is not an operator's manual pin.
fn prune(u: &HostUsage, state: &PolicyState) -> PolicyState {
    if !needs_pruning(u, state) {
        return state.clone();
    }
    let seen = u.vcpus.iter().map(|v| (v.uuid.clone(), v.vcpu)).collect();
    let fresh: HashSet<&str> = u.fresh.iter().map(|(name, _)| name.as_str()).collect();
    // A domain with vCPUs plugged or unplugged did not restart: its other vCPUs keep their pins, and an operator's
    // pin among them is still the operator's.
    let restarted: HashSet<&str> =
        u.fresh.iter().filter(|(_, why)| *why != usage::VCPU_COUNT_CHANGED).map(|(name, _)| name.as_str()).collect();
    // Hashed, not ordered: this runs for every host every round, and sorting a thousand keys showed up in the
    // controller's profile (BENCHMARKS.md).
    let present: HashSet<(&str, u32)> =
        u.vcpus.iter().filter(|v| !restarted.contains(&*v.domain)).map(|v| (&*v.uuid, v.vcpu)).collect();
    let keep = |k: &VcpuKey| present.contains(&(&*k.0, k.1));
    // A domain that came, restarted or went changes what a good placement is: moves made for the old set of
    // domains no longer say anything about where a vCPU should not go back to, so cooldowns start over.
    let uuids: HashSet<&str> = u.vcpus.iter().map(|v| &*v.uuid).collect();
    let churn = !fresh.is_empty() || state.last_pins.keys().any(|(uuid, _)| !uuids.contains(&**uuid));
    PolicyState {
        round: state.round,
        last_pins: std::sync::Arc::new(
            state.last_pins.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.clone(), v.clone())).collect(),
        ),
        last_moved: if churn {
            VcpuMap::default()
        } else {
            state.last_moved.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.clone(), *v)).collect()
        },
        manual_reported: state.manual_reported.iter().filter(|k| keep(k)).cloned().collect(),
        unconfirmed: state.unconfirmed.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.clone(), v.clone())).collect(),
        smoothed: {
            let was: HashMap<(&str, u32), f64> =
                state.seen.iter().zip(&state.smoothed).filter_map(|(k, a)| Some(((&*k.0, k.1), (*a)?))).collect();
            u.vcpus
                .iter()
                .map(|v| if present.contains(&(&*v.uuid, v.vcpu)) { was.get(&(&*v.uuid, v.vcpu)).copied() } else { None })
                .collect()
        },
        was_over: state.was_over,
        saturated: state.saturated.clone(),
        settled: state.settled && !churn,
        stalled: state.stalled.filter(|_| !churn),
        seen,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::controller::usage::PcpuUsage;
    use proptest::prelude::*;

    /// A host from `(domain, pcpu, usage, pinned)` vCPUs over `n` pCPUs.
    pub fn host(n: u32, vcpus: &[(&str, u32, f64, bool)]) -> HostUsage {
        let vcpus: Vec<VcpuUsage> = vcpus
            .iter()
            .map(|(d, p, u, pinned)| VcpuUsage {
                domain: (*d).into(),
                uuid: format!("uuid-{d}").into(),
                vcpu: 0,
                pcpu: *p,
                affinity: if *pinned { [*p].into() } else { (0..n).collect() },
                usage: Some(*u),
            })
            .collect();
        with_loads(n, vcpus)
    }

    /// pCPU usages summed from `vcpus`.
    pub fn with_loads(n: u32, vcpus: Vec<VcpuUsage>) -> HostUsage {
        let pcpus = (0..n)
            .map(|id| PcpuUsage { id, usage: vcpus.iter().filter(|v| v.pcpu == id).filter_map(|v| v.usage).sum() })
            .collect();
        HostUsage { elapsed_ns: 1, pcpus, vcpus, fresh: vec![] }
    }

    pub fn cfg(kind: PolicyKind) -> PolicyConfig {
        PolicyConfig::with_kind(kind)
    }

    /// pCPU loads after the plan's moves, from the measured usage.
    pub fn apply(h: &HostUsage, p: &Plan) -> Vec<f64> {
        let mut loads: Vec<f64> = h.pcpus.iter().map(|p| p.usage).collect();
        for m in &p.moves {
            loads[m.from as usize] -= m.usage;
            loads[m.to as usize] += m.usage;
        }
        loads
    }

    pub fn arb_host() -> impl Strategy<Value = HostUsage> {
        (1u32..8).prop_flat_map(|n| {
            proptest::collection::vec((0..n, 0.0f64..=100.0, any::<bool>()), 0..24).prop_map(move |vs| {
                let names: Vec<String> = (0..vs.len()).map(|i| format!("d{i:02}")).collect();
                let spec: Vec<(&str, u32, f64, bool)> =
                    vs.iter().zip(&names).map(|((p, u, pin), n)| (n.as_str(), *p, *u, *pin)).collect();
                host(n, &spec)
            })
        })
    }

    fn arb_kind() -> impl Strategy<Value = PolicyKind> {
        prop_oneof![Just(PolicyKind::Seed), Just(PolicyKind::Guarded), Just(PolicyKind::Converge)]
    }

    #[test]
    fn policy_names_round_trip() {
        for k in PolicyKind::ALL {
            assert_eq!(k.as_str().parse::<PolicyKind>().unwrap(), k);
        }
        assert!("ten".parse::<PolicyKind>().unwrap_err().contains("seed, guarded, converge"));
    }

    #[test]
    fn excluded_domains_are_never_moved_or_pinned() {
        // db-1 is the only candidate the 10 % rule would move; excluding it leaves nothing to move.
        let h = host(2, &[("db-1", 0, 60.0, false), ("web", 0, 30.0, true)]);
        for k in PolicyKind::ALL {
            let mut c = cfg(k);
            c.constraints.exclude = vec![DomainMatcher::parse("db-*")];
            let p = decide_once(&h, &c);
            assert!(p.moves.iter().all(|m| m.domain != "db-1"), "{k}: {p:?}");
            assert!(p.pins.iter().all(|pin| pin.domain != "uuid-db-1"), "{k}: {p:?}");
            assert_eq!(p.held.len(), 1, "{k}");
            assert!(p.reason.contains("excluded"), "{k}: {}", p.reason);
        }
    }

    #[test]
    fn excluded_by_uuid() {
        let mut h = host(2, &[("a", 0, 60.0, false), ("b", 0, 30.0, false)]);
        h.vcpus[0].uuid = "6f1c2d3e-0000-4000-8000-00000000000a".into();
        let mut c = cfg(PolicyKind::Guarded);
        c.constraints.exclude = vec![DomainMatcher::parse("6F1C2D3E-0000-4000-8000-00000000000A")];
        let p = decide_once(&h, &c);
        assert!(p.pins.iter().all(|pin| !pin.domain.starts_with("6f1c")), "{p:?}");
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.moves[0].domain, "b");
    }

    #[test]
    fn reserved_pcpus_are_never_targets_and_are_emptied() {
        // pCPU 0 is reserved and holds two vCPUs; pCPU 1 is busy and 2, 3 are idle. Nothing may land on 0.
        let h = host(4, &[("a", 0, 20.0, true), ("b", 0, 30.0, true), ("c", 1, 50.0, true), ("d", 1, 40.0, true)]);
        for k in PolicyKind::ALL {
            let mut c = cfg(k);
            c.constraints.reserved = vec![0];
            let mut state = PolicyState::default();
            let mut cur = h.clone();
            for _ in 0..6 {
                let (p, next) = decide(&cur, &c, &state);
                state = next;
                assert!(p.pins.iter().all(|pin| pin.pcpus != vec![0]), "{k}: {p:?}");
                assert!(p.moves.iter().all(|m| m.to != 0), "{k}: {p:?}");
                // Apply the moves to the input, as the host would.
                let mut vs = cur.vcpus.clone();
                for m in &p.moves {
                    let v = vs.iter_mut().find(|v| *v.domain == *m.domain).unwrap();
                    v.pcpu = m.to;
                    v.affinity = [m.to].into();
                }
                cur = with_loads(4, vs);
            }
            assert!(cur.vcpus.iter().all(|v| v.pcpu != 0), "{k}: reserved pCPU 0 still holds {:?}", cur.vcpus);
        }
    }

    #[test]
    fn spread_ignores_reserved_pcpus() {
        // pCPU 0 is reserved and idle: it must not make a balanced host look unbalanced.
        let h = host(3, &[("a", 1, 40.0, true), ("b", 2, 40.0, true)]);
        let mut c = cfg(PolicyKind::Guarded);
        c.constraints.reserved = vec![0];
        let p = decide_once(&h, &c);
        assert_eq!(p.spread, 0.0);
        assert!(p.moves.is_empty() && p.pins.is_empty());
    }

    #[test]
    fn all_reserved_means_nothing_to_do() {
        let h = host(2, &[("a", 0, 90.0, true), ("b", 0, 40.0, true)]);
        let mut c = cfg(PolicyKind::Converge);
        c.constraints.reserved = vec![0, 1];
        let p = decide_once(&h, &c);
        assert!(p.pins.is_empty() && p.reason.contains("reserved"), "{p:?}");
    }

    #[test]
    fn manual_pins_are_left_alone_and_logged_once() {
        let h = host(2, &[("a", 0, 60.0, true), ("b", 0, 30.0, true), ("c", 1, 0.0, true)]);
        // The controller pinned "a" to pCPU 1 last time; the operator has since put it on 0.
        let mut state = PolicyState::default();
        state.record_applied(&PinRequest { domain: "uuid-a".into(), vcpu: 0, pcpus: vec![1], persist: false });
        for k in PolicyKind::ALL {
            let (p, next) = decide(&h, &cfg(k), &state);
            assert!(p.moves.iter().all(|m| m.domain != "a"), "{k}: {p:?}");
            assert!(p.pins.iter().all(|pin| pin.domain != "uuid-a"), "{k}: {p:?}");
            assert_eq!(p.newly_manual.len(), 1, "{k}");
            assert!(p.reason.contains("pinned by someone else"), "{k}: {}", p.reason);
            // Next round it is still left alone, but not announced again.
            let (p2, _) = decide(&h, &cfg(k), &next);
            assert!(p2.pins.iter().all(|pin| pin.domain != "uuid-a"), "{k}");
            assert!(p2.newly_manual.is_empty(), "{k}");
            // --override-manual takes it back.
            let mut c = cfg(k);
            c.constraints.override_manual = true;
            let (p3, _) = decide(&h, &c, &state);
            assert!(p3.held.is_empty(), "{k}");
        }
    }

    #[test]
    fn own_pins_are_not_mistaken_for_manual_ones() {
        let h = host(2, &[("a", 0, 40.0, true), ("b", 1, 40.0, true)]);
        let mut state = PolicyState::default();
        state.record_applied(&PinRequest { domain: "uuid-a".into(), vcpu: 0, pcpus: vec![0], persist: false });
        let (p, _) = decide(&h, &cfg(PolicyKind::Converge), &state);
        assert!(p.held.is_empty(), "{p:?}");
    }

    fn pin_a(pcpu: PcpuId) -> PinRequest {
        PinRequest { domain: "uuid-a".into(), vcpu: 0, pcpus: vec![pcpu], persist: false }
    }

    /// The controller pinned "a" to pCPU 1, then sent a batch moving it to pCPU 0 that got no answer.
    fn lost_pin_to_0() -> PolicyState {
        let mut state = PolicyState::default();
        state.record_applied(&pin_a(1));
        state.record_unconfirmed(&pin_a(0));
        state
    }

    #[test]
    fn a_pin_applied_after_its_answer_was_lost_is_the_controllers_own() {
        // The controller pinned "a" to pCPU 1, then sent a batch moving it to pCPU 0 that got no answer; the host
        // now shows it on 0.
        let h = host(2, &[("a", 0, 40.0, true), ("b", 1, 40.0, true)]);
        let state = lost_pin_to_0();
        let key: VcpuKey = ("uuid-a".into(), 0);
        for k in PolicyKind::ALL {
            let (p, next) = decide(&h, &cfg(k), &state);
            assert!(p.held.is_empty() && p.newly_manual.is_empty(), "{k}: {p:?}");
            assert_eq!(next.last_pins.get(&key), Some(&[0].into()), "{k}: adopted as the controller's pin");
            assert!(next.unconfirmed.is_empty(), "{k}");
            // Adopted, it is the reference from now on: someone moving "a" afterwards is a manual pin again.
            let moved = host(2, &[("a", 1, 40.0, true), ("b", 1, 40.0, true)]);
            let (p2, _) = decide(&moved, &cfg(k), &next);
            assert_eq!(p2.newly_manual.len(), 1, "{k}: {p2:?}");
        }
    }

    #[test]
    fn re_recording_the_same_pin_leaves_the_memory_shared() {
        let mut state = PolicyState::default();
        state.record_applied(&pin_a(1));
        let kept = std::sync::Arc::clone(&state.last_pins);
        state.record_applied(&pin_a(1));
        assert!(std::sync::Arc::ptr_eq(&kept, &state.last_pins), "the same pin again copies nothing");
        state.record_applied(&pin_a(0));
        assert!(!std::sync::Arc::ptr_eq(&kept, &state.last_pins), "a new pin is a change");
        assert_eq!(state.last_pins.get(&("uuid-a".into(), 0)), Some(&[0].into()));
    }

    #[test]
    fn a_lost_pin_that_did_not_land_changes_nothing() {
        // "a" still shows the last pin the controller knows applied: not manual, and the lost pin is still awaited.
        let h = host(2, &[("a", 1, 40.0, true), ("b", 0, 40.0, true)]);
        let mut state = lost_pin_to_0();
        for k in PolicyKind::ALL {
            let (p, next) = decide(&h, &cfg(k), &state);
            assert!(p.held.is_empty(), "{k}: {p:?}");
            assert_eq!(next.unconfirmed.get(&("uuid-a".into(), 0)).map(|(_, p)| p), Some(&[0].into()), "{k}");
        }
        // A newer pin that the agent confirms supersedes it.
        state.record_applied(&pin_a(1));
        assert!(state.unconfirmed.is_empty());
    }

    #[test]
    fn a_lost_pin_is_looked_for_a_few_rounds_only() {
        // The lost pin (pCPU 0) never lands; "a" stays on pCPU 1 for UNCONFIRMED_ROUNDS rounds, then an operator
        // happens to pin it to pCPU 0: that is a manual pin, not the lost one arriving late.
        let stays = host(2, &[("a", 1, 40.0, true), ("b", 0, 40.0, true)]);
        let operator = host(2, &[("a", 0, 40.0, true), ("b", 0, 40.0, true)]);
        for k in PolicyKind::ALL {
            // The state after `rounds` rounds in which "a" stayed on pCPU 1.
            let after = |rounds: u64| (0..rounds).fold(lost_pin_to_0(), |state, _| decide(&stays, &cfg(k), &state).1);
            let (p, next) = decide(&operator, &cfg(k), &after(UNCONFIRMED_ROUNDS));
            assert_eq!(p.newly_manual.len(), 1, "{k}: {p:?}");
            assert!(next.unconfirmed.is_empty(), "{k}: given up after {UNCONFIRMED_ROUNDS} rounds");
            // One round earlier it would still have been taken for the lost pin.
            let (p, _) = decide(&operator, &cfg(k), &after(UNCONFIRMED_ROUNDS - 1));
            assert!(p.newly_manual.is_empty(), "{k}: {p:?}");
        }
    }

    #[test]
    fn an_operators_pin_is_manual_even_with_a_lost_pin_pending() {
        let h = host(3, &[("a", 2, 40.0, true), ("b", 0, 40.0, true)]);
        let state = lost_pin_to_0();
        for k in PolicyKind::ALL {
            let (p, _) = decide(&h, &cfg(k), &state);
            assert_eq!(p.newly_manual.len(), 1, "{k}: {p:?}");
        }
    }

    #[test]
    fn a_restarted_domain_forgets_the_controller_pins() {
        let mut h = host(2, &[("a", 0, 40.0, false), ("b", 1, 40.0, true)]);
        h.fresh = vec![("a".into(), "domain restarted (new id)")];
        h.vcpus[0].usage = None;
        let mut state = PolicyState::default();
        state.record_applied(&PinRequest { domain: "uuid-a".into(), vcpu: 0, pcpus: vec![1], persist: false });
        let (p, next) = decide(&h, &cfg(PolicyKind::Guarded), &state);
        assert!(p.held.is_empty(), "{p:?}");
        assert_ne!(next.last_pins.get(&("uuid-a".into(), 0)), Some(&[1].into()), "the old pin is forgotten");
    }

    #[test]
    fn a_vcpu_hot_plug_keeps_the_other_vcpus_pins_and_manual_pins() {
        // The controller pinned a/0 to pCPU 0; an operator then widened it to 0-1, and a second vCPU was plugged in.
        let mut state = PolicyState::default();
        state.record_applied(&PinRequest { domain: "uuid-a".into(), vcpu: 0, pcpus: vec![0], persist: false });
        state.record_applied(&PinRequest { domain: "uuid-b".into(), vcpu: 0, pcpus: vec![1], persist: false });
        let mut h = host(2, &[("a", 0, 40.0, false), ("b", 1, 40.0, true)]);
        let mut plugged = h.vcpus[0].clone();
        plugged.vcpu = 1;
        h.vcpus.insert(1, plugged);
        h.vcpus[0].affinity = [0, 1].into();
        h.vcpus[0].usage = None;
        h.vcpus[1].usage = None;
        h.fresh = vec![("a".into(), usage::VCPU_COUNT_CHANGED)];
        for k in PolicyKind::ALL {
            let (p, next) = decide(&h, &cfg(k), &state);
            assert!(p.held.iter().any(|x| x.domain == "a" && x.vcpu == 0 && x.why == HeldWhy::Manual), "{k}: {p:?}");
            assert!(p.pins.iter().all(|x| !(x.domain == "uuid-a" && x.vcpu == 0)), "{k}: the operator's pin stays: {p:?}");
            assert_eq!(next.last_pins.get(&("uuid-a".into(), 0)), Some(&[0].into()), "{k}");
        }
        // A restart, by contrast, forgets them (a_restarted_domain_forgets_the_controller_pins).
        h.fresh = vec![("a".into(), "domain restarted (new id)")];
        let (p, _) = decide(&h, &cfg(PolicyKind::Guarded), &state);
        assert!(p.held.is_empty(), "{p:?}");
    }

    #[test]
    fn churn_lifts_the_no_return_rule() {
        // c was moved from pCPU 1 to pCPU 0 last round; then domain b went away, leaving 87 | 50. The cooldown and
        // the no-return rule of that move are forgotten because the set of domains changed.
        let mut state = PolicyState { round: 5, ..PolicyState::default() };
        state.last_moved.insert(("uuid-c".into(), 0), (5, 1));
        state.record_applied(&PinRequest { domain: "uuid-b".into(), vcpu: 0, pcpus: vec![1], persist: false });
        let h = host(2, &[("a", 1, 50.0, true), ("c", 0, 30.0, true), ("n", 0, 57.0, true)]);
        let (p, next) = decide(&h, &cfg(PolicyKind::Converge), &state);
        assert_ne!(next.last_moved.get(&("uuid-c".into(), 0)), Some(&(5, 1)), "the old move is forgotten");
        assert!(!p.moves.is_empty(), "the host is rebalanced after the churn: {p:?}");
        // Without churn, the rule holds.
        let mut calm = state.clone();
        calm.last_pins = Default::default();
        for (d, p) in [("uuid-a", 1), ("uuid-c", 0), ("uuid-n", 0)] {
            calm.record_applied(&PinRequest { domain: d.into(), vcpu: 0, pcpus: vec![p], persist: false });
        }
        let (p, _) = decide(&h, &cfg(PolicyKind::Converge), &calm);
        assert!(p.moves.iter().all(|m| !(m.domain == "c" && m.to == 1)), "{p:?}");
    }

    #[test]
    fn a_vcpu_seen_pinned_then_repinned_by_someone_else_is_manual() {
        // The controller never pinned a: it found it on pCPU 0 and left it there. Then an operator moved it.
        let before = host(2, &[("a", 0, 40.0, true), ("b", 1, 40.0, true)]);
        for k in [PolicyKind::Seed, PolicyKind::Guarded, PolicyKind::Converge] {
            let (_, state) = decide(&before, &cfg(k), &PolicyState::default());
            let after = host(2, &[("a", 1, 40.0, true), ("b", 1, 40.0, true)]);
            let (p, _) = decide(&after, &cfg(k), &state);
            assert!(p.held.iter().any(|h| h.domain == "a" && h.why == HeldWhy::Manual), "{k}: {p:?}");
            assert!(p.pins.iter().all(|x| x.domain != "uuid-a"), "{k}: a is left where the operator put it");
            assert!(p.reason.contains("pinned by someone else"), "{k}: {}", p.reason);
        }
    }

    #[test]
    fn no_pcpus_no_plan() {
        let h = HostUsage { elapsed_ns: 1, pcpus: vec![], vcpus: vec![], fresh: vec![] };
        for k in PolicyKind::ALL {
            assert!(decide_once(&h, &cfg(k)).pins.is_empty());
        }
    }

    /// 8 vCPUs of 10 % on pCPU 0 of 4 idle ones: converge spreads them in one round, 6 moves.
    fn all_on_one() -> HostUsage {
        let names: Vec<String> = (0..8).map(|i| format!("v{i}")).collect();
        let spec: Vec<(&str, u32, f64, bool)> = names.iter().map(|n| (n.as_str(), 0, 10.0, true)).collect();
        host(4, &spec)
    }

    #[test]
    fn max_moves_bounds_the_moves_of_a_round_and_keeps_those_that_help_most() {
        let h = all_on_one();
        let unlimited = decide_once(&h, &cfg(PolicyKind::Converge));
        assert!(unlimited.moves.len() > 2, "{unlimited:?}");
        let mut c = cfg(PolicyKind::Converge);
        c.constraints.max_moves = std::num::NonZeroUsize::new(2);
        let (p, next) = decide(&h, &c, &PolicyState::default());
        assert_eq!(p.moves.len(), 2, "{p:?}");
        assert_eq!(p.pins.len(), 2, "only the moves made are pinned: {p:?}");
        // To two different idle pCPUs: both to one would help less.
        assert_ne!(p.moves[0].to, p.moves[1].to, "{p:?}");
        assert!(p.moves.iter().all(|m| m.from == 0 && m.to != 0), "{p:?}");
        assert!(p.reason.contains(&format!("--max-moves 2: the plan has {} moves", unlimited.moves.len())), "{}", p.reason);
        assert_eq!(next.last_moved.len(), 2);
        assert_eq!(p.deferred, unlimited.moves.len() - 2);
        assert_eq!(unlimited.deferred, 0);
        // The next rounds go on, two moves at most each, until the host is balanced.
        let (mut cur, mut state) = (h, next);
        let mut plan = p;
        for _ in 0..10 {
            for m in &plan.moves {
                let v = cur.vcpus.iter_mut().find(|v| *v.domain == *m.domain).unwrap();
                v.pcpu = m.to;
                v.affinity = [m.to].into();
            }
            for pin in &plan.pins {
                state.record_applied(pin);
            }
            cur = with_loads(4, cur.vcpus);
            (plan, state) = decide(&cur, &c, &state);
            assert!(plan.moves.len() <= 2, "{plan:?}");
        }
        assert!(plan.spread <= 10.0, "{plan:?}");
    }

    #[test]
    fn max_moves_below_a_swap_makes_the_single_move_that_helps_most() {
        // pCPU 0 runs 50 + 20 + 4, pCPU 1 runs 40 + 12: converge swaps 50 and 40 (gap 22 to 2). Neither half of
        // the swap helps alone, so under --max-moves 1 the best single move to pCPU 1 is made instead: the 4.
        let h = host(2, &[("a", 0, 50.0, true), ("b", 0, 20.0, true), ("c", 0, 4.0, true), ("d", 1, 40.0, true), ("e", 1, 12.0, true)]);
        let unlimited = decide_once(&h, &cfg(PolicyKind::Converge));
        let mut moved: Vec<&str> = unlimited.moves.iter().map(|m| m.domain.as_str()).collect();
        moved.sort_unstable();
        assert_eq!(moved, ["a", "d"], "{unlimited:?}");
        let mut c = cfg(PolicyKind::Converge);
        c.constraints.max_moves = std::num::NonZeroUsize::new(1);
        let p = decide_once(&h, &c);
        assert_eq!(p.moves.len(), 1, "{p:?}");
        assert_eq!((p.moves[0].domain.as_str(), p.moves[0].to), ("c", 1), "{p:?}");
        assert!(p.reason.contains("none of them helps on its own, so one vCPU instead: c vCPU 0 to pCPU 1"), "{}", p.reason);
        assert_eq!(p.deferred, 2, "neither move of the plan was made");
        // With two allowed, the swap itself.
        c.constraints.max_moves = std::num::NonZeroUsize::new(2);
        assert_eq!(decide_once(&h, &c).moves, unlimited.moves);
    }

    proptest! {
        /// The bitmap answers as an ordered set of the same ids does, for ids inside and beyond its words.
        #[test]
        fn pcpu_set_is_a_set(ids in proptest::collection::vec(0u32..300, 0..40), probes in proptest::collection::vec(0u32..400, 0..40)) {
            let bits: PcpuSet = ids.iter().copied().collect();
            let set: BTreeSet<PcpuId> = ids.iter().copied().collect();
            for p in ids.iter().chain(&probes) {
                prop_assert_eq!(bits.contains(p), set.contains(p), "{}", p);
            }
        }

        /// The shortcut that skips pruning when the vCPUs are those of the last round decides exactly what the full
        /// pruning decides: same plan, same next state.
        #[test]
        fn pruning_shortcut_changes_nothing(h in arb_host(), kind in arb_kind(), rounds in 1usize..4) {
            let mut state = PolicyState::default();
            for _ in 0..rounds {
                state = decide(&h, &cfg(kind), &state).1;
            }
            let forced = PolicyState { seen: Vec::new(), ..state.clone() };
            let (plan_fast, next_fast) = decide(&h, &cfg(kind), &state);
            let (plan_full, next_full) = decide(&h, &cfg(kind), &forced);
            prop_assert_eq!(plan_fast, plan_full);
            prop_assert_eq!(next_fast, next_full);
        }

        /// The in-place form that the per-host task uses decides exactly as [`decide`], round after round, both
        /// when the vCPUs stay (no pruning) and when they change, with the applied pins recorded in between.
        #[test]
        fn decide_mut_is_decide(hosts in proptest::collection::vec((arb_host(), 1usize..3), 1..4), kind in arb_kind()) {
            let (mut by_value, mut in_place) = (PolicyState::default(), PolicyState::default());
            for (h, repeat) in &hosts {
                for _ in 0..*repeat {
                    let (plan, mut next) = decide(h, &cfg(kind), &by_value);
                    let mut hm = h.clone();
                    let plan_mut = decide_mut(&mut hm, &cfg(kind), &mut in_place);
                    prop_assert_eq!(&hm, h, "the usage is given back unchanged");
                    prop_assert_eq!(&plan, &plan_mut);
                    for pin in &plan.pins {
                        next.record_applied(pin);
                        in_place.record_applied(pin);
                    }
                    prop_assert_eq!(&next, &in_place);
                    by_value = next;
                }
            }
        }

        /// Spread at or under the threshold: no move, whatever the policy.
        #[test]
        fn no_move_when_balanced(h in arb_host(), kind in arb_kind()) {
            let p = decide_once(&h, &cfg(kind));
            if p.spread <= DEFAULT_THRESHOLD { prop_assert!(p.moves.is_empty()); }
        }

        /// Every pin targets one online pCPU, changes something, and only moved vCPUs leave their pCPU.
        #[test]
        fn pins_are_minimal_and_in_place(h in arb_host(), kind in arb_kind()) {
            let p = decide_once(&h, &cfg(kind));
            for pin in &p.pins {
                prop_assert_eq!(pin.pcpus.len(), 1);
                prop_assert!(h.pcpus.iter().any(|c| c.id == pin.pcpus[0]));
                let v = h.vcpus.iter().find(|v| *v.uuid == *pin.domain && v.vcpu == pin.vcpu).unwrap();
                prop_assert!(*v.affinity != *pin.pcpus);
                let moved = p.moves.iter().any(|m| *m.uuid == *v.uuid && m.vcpu == v.vcpu);
                prop_assert_eq!(pin.pcpus[0] == v.pcpu, !moved);
            }
            // A vCPU is moved at most once per round.
            let keys: BTreeSet<(&str, u32)> = p.moves.iter().map(|m| (m.uuid.as_str(), m.vcpu)).collect();
            prop_assert_eq!(keys.len(), p.moves.len());
        }

        /// Constraints hold for every policy on any input: excluded domains are never pinned, and nothing goes
        /// to a reserved pCPU.
        #[test]
        fn constraints_hold(
            h in arb_host(),
            kind in arb_kind(),
            reserved in 0u32..8,
            was_over in any::<bool>(),
            max_moves in proptest::option::of(1usize..4),
        ) {
            let mut c = cfg(kind);
            c.constraints.exclude = vec![DomainMatcher::parse("d0*")];
            c.constraints.reserved = vec![reserved];
            c.constraints.max_moves = max_moves.and_then(std::num::NonZeroUsize::new);
            let (p, next) = decide(&h, &c, &PolicyState { was_over, ..Default::default() });
            for pin in &p.pins {
                prop_assert!(!pin.domain.starts_with("uuid-d0"), "{:?}", pin);
                prop_assert!(pin.pcpus != vec![reserved]);
            }
            if let Some(max) = max_moves {
                prop_assert!(p.moves.len() <= max, "{} moves over --max-moves {max}: {:?}", p.moves.len(), p.moves);
            }
            // Only the moves made are remembered as moved (the cooldown and the no-return rule).
            prop_assert_eq!(next.last_moved.len(), p.moves.len());
        }

        /// Same input, same plan.
        #[test]
        fn deterministic(h in arb_host(), kind in arb_kind()) {
            let s = PolicyState::default();
            prop_assert_eq!(decide(&h, &cfg(kind), &s), decide(&h.clone(), &cfg(kind), &s.clone()));
        }
    }
}
