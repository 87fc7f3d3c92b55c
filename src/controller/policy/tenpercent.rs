//! The "10 % rule", literal (`seed`) or guarded (`guarded`): at most one move per round.
//!
//! spread = busiest − freest allowed pCPU. If spread > threshold, move the busiest vCPU of the busiest pCPU to the
//! freest pCPU. Ties go to the lowest pCPU id, and among vCPUs to the first by (domain name, vCPU index).
//!
//! The guard deviates from the literal rule, because taken literally it moves the same load back and forth
//! forever: moving a vCPU of usage `u` from the busiest pCPU `b` to the freest `f` only narrows their gap when
//! `0 < u < b − f`; otherwise it just mirrors the imbalance (a single heavy vCPU, or two heavy vCPUs facing two
//! light ones). So the guarded policy moves the busiest vCPU of the busiest pCPU *whose usage is below the spread*,
//! and makes no move if there is none. Every guarded move strictly lowers the sum of squared pCPU usages and never
//! widens the host's spread, so the same placement can never come back: no ping-pong.
//!
//! Reserved pCPUs come first: while a movable vCPU sits on one, the round's move takes it off (the busiest such
//! vCPU, to the freest allowed pCPU), since leaving it there would keep load where the operator said none goes.

use crate::controller::policy::{Decision, View};
use crate::model::PcpuId;

/// One round of the 10 % rule; `guard` selects `guarded` over `seed`.
pub fn decide(v: &View<'_>, threshold: f64, guard: bool) -> Decision {
    let Some(((busiest, hi), (freest, lo))) = v.extremes() else {
        return Decision { moves: vec![], reason: "no allowed pCPU".into(), stalled: None };
    };
    let spread = hi - lo;
    if let Some(&i) = busiest_of(v, &v.stranded()).first() {
        let x = v.vcpu(i);
        return Decision {
            moves: vec![(i, freest)],
            reason: format!(
                "pCPU {} is reserved: move {} vCPU {} ({:.1}%) to freest pCPU {freest} ({lo:.1}%)",
                x.pcpu,
                x.domain,
                x.vcpu,
                x.usage.unwrap_or(0.0)
            ),
            stalled: None,
        };
    }
    if spread <= threshold {
        return Decision {
            moves: vec![],
            reason: format!("balanced: spread {spread:.1} <= threshold {threshold:.1}"),
            stalled: None,
        };
    }
    let on_busiest: Vec<usize> = v.movable.iter().copied().filter(|&i| v.vcpu(i).pcpu == busiest).collect();
    let cands = busiest_of(v, &on_busiest);
    let pick = if guard {
        cands.iter().copied().find(|&i| v.vcpu(i).usage.is_some_and(|x| x > 0.0 && x < spread))
    } else {
        cands.first().copied()
    };
    match pick {
        Some(i) => {
            let x = v.vcpu(i);
            let usage = x.usage.unwrap_or(0.0);
            Decision {
                moves: vec![(i, freest)],
                reason: format!(
                    "spread {spread:.1} > {threshold:.1}: move {} vCPU {} ({usage:.1}%) from busiest pCPU {busiest} ({hi:.1}%) to freest pCPU {freest} ({lo:.1}%)",
                    x.domain, x.vcpu
                ),
                stalled: None,
            }
        }
        None => Decision { moves: vec![], reason: no_move_reason(spread, busiest, cands.len()), stalled: None },
    }
}

fn no_move_reason(spread: f64, busiest: PcpuId, candidates: usize) -> String {
    match candidates {
        0 => format!("spread {spread:.1} but busiest pCPU {busiest} holds no vCPU that may be moved (usage unknown, or left alone)"),
        1 => format!(
            "guard: spread {spread:.1} but busiest pCPU {busiest} holds a single vCPU; moving it would only move the imbalance"
        ),
        _ => format!(
            "guard: spread {spread:.1} but no vCPU on busiest pCPU {busiest} is lighter than the spread; a move would not narrow it"
        ),
    }
}

/// `idx` sorted busiest first; ties keep the (domain, vCPU) order of `u.vcpus`.
fn busiest_of(v: &View<'_>, idx: &[usize]) -> Vec<usize> {
    let mut c = idx.to_vec();
    c.sort_by(|&a, &b| {
        let (ua, ub) = (v.vcpu(a).usage.unwrap_or(0.0), v.vcpu(b).usage.unwrap_or(0.0));
        ub.total_cmp(&ua).then(a.cmp(&b))
    });
    c
}

#[cfg(test)]
mod tests {
    use crate::controller::policy::tests::{apply, arb_host, cfg, host};
    use crate::controller::policy::{decide_once, PolicyKind};
    use crate::model::PinRequest;
    use proptest::prelude::*;

    fn guarded() -> crate::controller::policy::PolicyConfig {
        cfg(PolicyKind::Guarded)
    }
    fn seed() -> crate::controller::policy::PolicyConfig {
        cfg(PolicyKind::Seed)
    }

    #[test]
    fn balanced_input_moves_nothing_and_pins_nothing_already_pinned() {
        let h = host(2, &[("a", 0, 50.0, true), ("b", 1, 45.0, true)]);
        let p = decide_once(&h, &guarded());
        assert!(p.moves.is_empty());
        assert!(p.pins.is_empty());
        assert!((p.spread - 5.0).abs() < 1e-9);
    }

    #[test]
    fn unpinned_vcpus_get_pinned_where_they_run() {
        let h = host(2, &[("a", 0, 50.0, false), ("b", 1, 45.0, true)]);
        let p = decide_once(&h, &guarded());
        assert_eq!(p.pins, vec![PinRequest { domain: "uuid-a".into(), vcpu: 0, pcpus: vec![0], persist: false }]);
    }

    #[test]
    fn moves_busiest_vcpu_of_busiest_pcpu_to_freest() {
        let h = host(3, &[("a", 0, 30.0, true), ("b", 0, 40.0, true), ("c", 1, 20.0, true), ("d", 2, 10.0, true)]);
        let p = decide_once(&h, &guarded());
        let m = p.movement().unwrap();
        assert_eq!((m.domain.as_str(), m.from, m.to), ("b", 0, 2));
        assert_eq!(p.pins, vec![PinRequest { domain: "uuid-b".into(), vcpu: 0, pcpus: vec![2], persist: false }]);
    }

    #[test]
    fn ties_go_to_lowest_ids() {
        let mut h = host(4, &[("b", 1, 50.0, true), ("a", 1, 50.0, true), ("c", 3, 50.0, true), ("x", 3, 50.0, true)]);
        // pCPUs 1 and 3 tie for busiest, 0 and 2 for freest; domain "a" is first among equal vCPUs.
        h.vcpus.sort_by(|a, b| a.domain.cmp(&b.domain));
        let p = decide_once(&h, &guarded());
        let m = p.movement().unwrap();
        assert_eq!((m.domain.as_str(), m.from, m.to), ("a", 1, 0));
    }

    #[test]
    fn guard_refuses_to_move_a_lone_vcpu() {
        let h = host(2, &[("a", 0, 100.0, true), ("b", 1, 20.0, true)]);
        let p = decide_once(&h, &guarded());
        assert!(p.moves.is_empty());
        assert!(p.reason.contains("single vCPU"));
        // The literal rule moves it, and the next round would move it back.
        let p = decide_once(&h, &seed());
        let m = p.movement().unwrap();
        assert_eq!((m.from, m.to), (0, 1));
    }

    #[test]
    fn guard_picks_a_lighter_vcpu_when_the_busiest_would_mirror_the_imbalance() {
        // {H,L,L} = 90 vs {H} = 50 would mirror if H moved; moving an L narrows the gap.
        let h = host(2, &[("h1", 0, 50.0, true), ("l1", 0, 20.0, true), ("l2", 0, 20.0, true), ("h2", 1, 50.0, true)]);
        assert_eq!(decide_once(&h, &guarded()).movement().unwrap().domain, "l1");
        assert_eq!(decide_once(&h, &seed()).movement().unwrap().domain, "h1");
    }

    #[test]
    fn fresh_vcpus_are_never_moved() {
        let mut h = host(2, &[("a", 0, 0.0, true), ("b", 0, 0.0, true)]);
        h.vcpus[0].usage = None;
        h.pcpus[0].usage = 80.0;
        let p = decide_once(&h, &seed());
        assert_eq!(p.movement().map(|m| m.domain.as_str()), Some("b"));
    }

    #[test]
    fn at_most_one_move_per_round() {
        let h = host(4, &[("a", 0, 40.0, true), ("b", 0, 40.0, true), ("c", 0, 40.0, true), ("d", 0, 40.0, true)]);
        assert_eq!(decide_once(&h, &guarded()).moves.len(), 1);
        assert_eq!(decide_once(&h, &seed()).moves.len(), 1);
    }

    proptest! {
        /// A guarded move narrows the gap between the two pCPUs it touches, never widens the host's spread and
        /// strictly lowers the sum of squared pCPU usages (so a placement can never come back).
        #[test]
        fn guarded_move_reduces_imbalance(h in arb_host()) {
            let p = decide_once(&h, &guarded());
            if let Some(m) = p.movement() {
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
    }
}
