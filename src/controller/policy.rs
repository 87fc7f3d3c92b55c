//! The balancing policy: one round's usage in, a plan out. Pure: no I/O, no clock, deterministic.
//!
//! The policy (the "10 % rule"): spread = busiest pCPU usage − freest pCPU usage. If spread > threshold, move the
//! busiest vCPU of the busiest pCPU to the freest pCPU and pin every other vCPU where it runs now; otherwise pin
//! every vCPU where it runs now. Ties go to the lowest pCPU id, and among vCPUs to the first by (domain name,
//! vCPU index). Only pins that change something are sent: a vCPU already pinned to exactly that pCPU is left alone.
//!
//! The guard (on by default) deviates from the literal rule, because taken literally it moves the same load back
//! and forth forever: moving a vCPU of usage `u` from the busiest pCPU `b` to the freest `f` only narrows their gap
//! when `0 < u < b − f`; otherwise it just mirrors the imbalance (a single heavy vCPU, or two heavy vCPUs facing two
//! light ones). So the guarded policy moves the busiest vCPU of the busiest pCPU *whose usage is below the spread*,
//! and makes no move if there is none. Every guarded move strictly lowers the sum of squared pCPU usages and never
//! widens the host's spread, so the same placement can never come back: no ping-pong.

use serde::Serialize;

use crate::controller::usage::{HostUsage, VcpuUsage};
use crate::model::{PcpuId, PinRequest};

/// Default threshold on the spread, in percentage points of one pCPU.
pub const DEFAULT_THRESHOLD: f64 = 10.0;

/// Policy settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    /// Act only when the spread is above this many points.
    pub threshold: f64,
    /// See the module docs; `false` is the literal rule.
    pub guard: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig { threshold: DEFAULT_THRESHOLD, guard: true }
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

/// What the policy decided for one host in one round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub spread: f64,
    pub busiest: Option<PcpuId>,
    pub freest: Option<PcpuId>,
    pub movement: Option<Move>,
    /// Why: shown in logs and in the JSON `action.reason`.
    pub reason: String,
    /// Pins that change something, keyed by domain UUID.
    pub pins: Vec<PinRequest>,
}

fn busiest_and_freest(u: &HostUsage) -> Option<((PcpuId, f64), (PcpuId, f64))> {
    let first = u.pcpus.first()?;
    let (mut hi, mut lo) = ((first.id, first.usage), (first.id, first.usage));
    for p in &u.pcpus[1..] {
        if p.usage > hi.1 {
            hi = (p.id, p.usage);
        }
        if p.usage < lo.1 {
            lo = (p.id, p.usage);
        }
    }
    Some((hi, lo))
}

/// vCPUs on `pcpu` with known usage, busiest first; ties keep the (domain, vCPU) order of `u.vcpus`.
fn candidates(u: &HostUsage, pcpu: PcpuId) -> Vec<&VcpuUsage> {
    let mut c: Vec<&VcpuUsage> = u.vcpus.iter().filter(|v| v.pcpu == pcpu && v.usage.is_some()).collect();
    c.sort_by(|a, b| b.usage.unwrap_or(0.0).total_cmp(&a.usage.unwrap_or(0.0)));
    c
}

/// Decides one round for one host.
pub fn decide(u: &HostUsage, cfg: &PolicyConfig) -> Plan {
    let Some(((busiest, hi), (freest, lo))) = busiest_and_freest(u) else {
        return Plan {
            spread: 0.0,
            busiest: None,
            freest: None,
            movement: None,
            reason: "host reports no online pCPU".into(),
            pins: Vec::new(),
        };
    };
    let spread = hi - lo;
    let mut movement = None;
    let reason;
    if spread <= cfg.threshold {
        reason = format!("balanced: spread {spread:.1} <= threshold {:.1}", cfg.threshold);
    } else {
        let cands = candidates(u, busiest);
        let pick = if cfg.guard {
            cands.iter().find(|v| v.usage.is_some_and(|x| x > 0.0 && x < spread))
        } else {
            cands.first()
        };
        match pick {
            Some(v) => {
                let usage = v.usage.unwrap_or(0.0);
                reason = format!(
                    "spread {spread:.1} > {:.1}: move {} vCPU {} ({usage:.1}%) from busiest pCPU {busiest} ({hi:.1}%) to freest pCPU {freest} ({lo:.1}%)",
                    cfg.threshold, v.domain, v.vcpu
                );
                movement = Some(Move {
                    domain: v.domain.clone(),
                    uuid: v.uuid.clone(),
                    vcpu: v.vcpu,
                    from: busiest,
                    to: freest,
                    usage,
                });
            }
            None if cands.is_empty() => {
                reason = format!("spread {spread:.1} but busiest pCPU {busiest} holds no vCPU with a known usage");
            }
            None if cands.len() == 1 => {
                reason = format!(
                    "guard: spread {spread:.1} but busiest pCPU {busiest} holds a single vCPU; moving it would only move the imbalance"
                );
            }
            None => {
                reason = format!(
                    "guard: spread {spread:.1} but no vCPU on busiest pCPU {busiest} is lighter than the spread; a move would not narrow it"
                );
            }
        }
    }
    let pins = u
        .vcpus
        .iter()
        .filter_map(|v| {
            let target = match &movement {
                Some(m) if m.uuid == v.uuid && m.vcpu == v.vcpu => m.to,
                _ => v.pcpu,
            };
            (v.affinity.as_slice() != [target]).then(|| PinRequest {
                domain: v.uuid.clone(),
                vcpu: v.vcpu,
                pcpus: vec![target],
                persist: false,
            })
        })
        .collect();
    Plan { spread, busiest: Some(busiest), freest: Some(freest), movement, reason, pins }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::usage::PcpuUsage;
    use proptest::prelude::*;

    /// A host from `(domain, pcpu, usage, pinned)` vCPUs over `n` pCPUs.
    fn host(n: u32, vcpus: &[(&str, u32, f64, bool)]) -> HostUsage {
        let vcpus: Vec<VcpuUsage> = vcpus
            .iter()
            .map(|(d, p, u, pinned)| VcpuUsage {
                domain: d.to_string(),
                uuid: format!("uuid-{d}"),
                vcpu: 0,
                pcpu: *p,
                affinity: if *pinned { vec![*p] } else { (0..n).collect() },
                usage: Some(*u),
            })
            .collect();
        let pcpus = (0..n)
            .map(|id| PcpuUsage { id, usage: vcpus.iter().filter(|v| v.pcpu == id).filter_map(|v| v.usage).sum() })
            .collect();
        HostUsage { elapsed_ns: 1, pcpus, vcpus, fresh: vec![] }
    }

    const GUARDED: PolicyConfig = PolicyConfig { threshold: 10.0, guard: true };
    const SEED: PolicyConfig = PolicyConfig { threshold: 10.0, guard: false };

    #[test]
    fn balanced_input_moves_nothing_and_pins_nothing_already_pinned() {
        let h = host(2, &[("a", 0, 50.0, true), ("b", 1, 45.0, true)]);
        let p = decide(&h, &GUARDED);
        assert!(p.movement.is_none());
        assert!(p.pins.is_empty());
        assert!((p.spread - 5.0).abs() < 1e-9);
    }

    #[test]
    fn unpinned_vcpus_get_pinned_where_they_run() {
        let h = host(2, &[("a", 0, 50.0, false), ("b", 1, 45.0, true)]);
        let p = decide(&h, &GUARDED);
        assert_eq!(p.pins, vec![PinRequest { domain: "uuid-a".into(), vcpu: 0, pcpus: vec![0], persist: false }]);
    }

    #[test]
    fn moves_busiest_vcpu_of_busiest_pcpu_to_freest() {
        let h = host(3, &[("a", 0, 30.0, true), ("b", 0, 40.0, true), ("c", 1, 20.0, true), ("d", 2, 10.0, true)]);
        let p = decide(&h, &GUARDED);
        let m = p.movement.unwrap();
        assert_eq!((m.domain.as_str(), m.from, m.to), ("b", 0, 2));
        assert_eq!(p.pins, vec![PinRequest { domain: "uuid-b".into(), vcpu: 0, pcpus: vec![2], persist: false }]);
    }

    #[test]
    fn ties_go_to_lowest_ids() {
        let h = host(4, &[("b", 1, 50.0, true), ("a", 1, 50.0, true), ("c", 3, 50.0, true), ("x", 3, 50.0, true)]);
        // pCPUs 1 and 3 tie for busiest, 0 and 2 for freest; domain "a" is first among equal vCPUs.
        let mut h = h;
        h.vcpus.sort_by(|a, b| a.domain.cmp(&b.domain));
        let m = decide(&h, &GUARDED).movement.unwrap();
        assert_eq!((m.domain.as_str(), m.from, m.to), ("a", 1, 0));
    }

    #[test]
    fn guard_refuses_to_move_a_lone_vcpu() {
        let h = host(2, &[("a", 0, 100.0, true), ("b", 1, 20.0, true)]);
        assert!(decide(&h, &GUARDED).movement.is_none());
        assert!(decide(&h, &GUARDED).reason.contains("single vCPU"));
        // The literal rule moves it, and the next round would move it back.
        let m = decide(&h, &SEED).movement.unwrap();
        assert_eq!((m.from, m.to), (0, 1));
    }

    #[test]
    fn guard_picks_a_lighter_vcpu_when_the_busiest_would_mirror_the_imbalance() {
        // {H,L,L} = 90 vs {H} = 50 would mirror if H moved; moving an L narrows the gap.
        let h = host(2, &[("h1", 0, 50.0, true), ("l1", 0, 20.0, true), ("l2", 0, 20.0, true), ("h2", 1, 50.0, true)]);
        let m = decide(&h, &GUARDED).movement.unwrap();
        assert_eq!(m.domain, "l1");
        assert_eq!(decide(&h, &SEED).movement.unwrap().domain, "h1");
    }

    #[test]
    fn fresh_vcpus_are_never_moved() {
        let mut h = host(2, &[("a", 0, 0.0, true), ("b", 0, 0.0, true)]);
        h.vcpus[0].usage = None;
        h.pcpus[0].usage = 80.0;
        let p = decide(&h, &SEED);
        assert_eq!(p.movement.as_ref().map(|m| m.domain.as_str()), Some("b"));
    }

    #[test]
    fn no_pcpus_no_plan() {
        let h = HostUsage { elapsed_ns: 1, pcpus: vec![], vcpus: vec![], fresh: vec![] };
        assert!(decide(&h, &GUARDED).pins.is_empty());
    }

    fn apply(h: &HostUsage, p: &Plan) -> Vec<f64> {
        let mut loads: Vec<f64> = h.pcpus.iter().map(|p| p.usage).collect();
        if let Some(m) = &p.movement {
            loads[m.from as usize] -= m.usage;
            loads[m.to as usize] += m.usage;
        }
        loads
    }

    fn arb_host() -> impl Strategy<Value = HostUsage> {
        (1u32..8).prop_flat_map(|n| {
            proptest::collection::vec((0..n, 0.0f64..=100.0, any::<bool>()), 0..24).prop_map(move |vs| {
                let names: Vec<String> = (0..vs.len()).map(|i| format!("d{i:02}")).collect();
                let spec: Vec<(&str, u32, f64, bool)> =
                    vs.iter().zip(&names).map(|((p, u, pin), n)| (n.as_str(), *p, *u, *pin)).collect();
                host(n, &spec)
            })
        })
    }

    proptest! {
        /// Spread at or under the threshold: no move, whatever the policy.
        #[test]
        fn no_move_when_balanced(h in arb_host(), guard in any::<bool>()) {
            let cfg = PolicyConfig { threshold: 10.0, guard };
            let p = decide(&h, &cfg);
            if p.spread <= 10.0 { prop_assert!(p.movement.is_none()); }
        }

        /// A guarded move narrows the gap between the two pCPUs it touches, never widens the host's spread and
        /// strictly lowers the sum of squared pCPU usages (so a placement can never come back).
        #[test]
        fn guarded_move_reduces_imbalance(h in arb_host()) {
            let p = decide(&h, &GUARDED);
            if let Some(m) = &p.movement {
                let before: Vec<f64> = h.pcpus.iter().map(|p| p.usage).collect();
                let after = apply(&h, &p);
                let gap_before = before[m.from as usize] - before[m.to as usize];
                let gap_after = (after[m.from as usize] - after[m.to as usize]).abs();
                prop_assert!(gap_after < gap_before);
                let spread = |v: &[f64]| v.iter().cloned().fold(f64::MIN, f64::max) - v.iter().cloned().fold(f64::MAX, f64::min);
                prop_assert!(spread(&after) <= spread(&before) + 1e-9);
                let sq = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
                prop_assert!(sq(&after) < sq(&before));
            }
        }

        /// Every pin targets one online pCPU, changes something, and only the moved vCPU leaves its pCPU.
        #[test]
        fn pins_are_minimal_and_in_place(h in arb_host(), guard in any::<bool>()) {
            let p = decide(&h, &PolicyConfig { threshold: 10.0, guard });
            for pin in &p.pins {
                prop_assert_eq!(pin.pcpus.len(), 1);
                prop_assert!(h.pcpus.iter().any(|c| c.id == pin.pcpus[0]));
                let v = h.vcpus.iter().find(|v| v.uuid == pin.domain && v.vcpu == pin.vcpu).unwrap();
                prop_assert!(v.affinity != pin.pcpus);
                let moved = p.movement.as_ref().is_some_and(|m| m.uuid == v.uuid && m.vcpu == v.vcpu);
                prop_assert_eq!(pin.pcpus[0] == v.pcpu, !moved);
            }
        }

        /// Same input, same plan.
        #[test]
        fn deterministic(h in arb_host()) {
            prop_assert_eq!(decide(&h, &GUARDED), decide(&h.clone(), &GUARDED));
        }
    }
}
