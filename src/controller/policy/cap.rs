//! `--max-moves N`: at most N vCPUs sent to another pCPU per host and round, whatever the policy planned.
//!
//! Moving a vCPU costs its guest a cold cache, and an operator watching a fleet may want a bound on that churn
//! per round, like the "migrations per cycle" limit of cluster balancers. `seed` and `guarded` move at most one
//! vCPU a round anyway; `converge` may plan dozens (a whole-host plan, a placement from scratch).
//!
//! A plan is a set of final places, and any part of it may be worse than none: a swap's first half alone
//! overloads the pCPU the second half would have relieved. So the part kept is chosen, not truncated: first the
//! moves off reserved (or offline) pCPUs, which a constraint asks for, in the plan's order; then, one at a time,
//! the move, or the pair of moves that share a pCPU (a swap, or two links of a chain), that lowers the sum of
//! squared pCPU loads the most per move; a pair only while two more moves are allowed. A cycle of three or more
//! moves gains only whole, so the groups of moves that share pCPUs compete too, where one fits. Each choice is
//! applied before the next is weighed. It stops at N, or when nothing left lowers the sum, so it may keep fewer
//! than N, or none. The next round plans again from what was done.
//!
//! Pure: plain numbers in, the indices of the moves kept out.

use crate::model::PcpuId;

use super::PcpuSet;

/// One planned move, as the limit weighs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub from: PcpuId,
    pub to: PcpuId,
    /// The usage the policy planned with (points of one pCPU).
    pub usage: f64,
}

/// A kept choice must lower the sum of squared loads by more than this: rounding is not an improvement.
const MIN_GAIN: f64 = 1e-9;

/// Which of `steps` to apply when at most `max` may be: indices into `steps`, in the order chosen. All of them,
/// in order, when there are no more than `max`. `load` is every online pCPU's usage in id order (as in
/// [`super::View::load`]); `allowed` the pCPUs the spread is taken over, and the only ones the sum counts.
pub fn limit(load: &[(PcpuId, f64)], allowed: &PcpuSet, steps: &[Step], max: usize) -> Vec<usize> {
    if steps.len() <= max {
        return (0..steps.len()).collect();
    }
    let mut load: Vec<(PcpuId, f64)> = load.to_vec();
    let mut kept = Vec::with_capacity(max);
    let mut taken = vec![false; steps.len()];
    for (k, s) in steps.iter().enumerate() {
        if kept.len() < max && !allowed.contains(&s.from) {
            apply(&mut load, s);
            taken[k] = true;
            kept.push(k);
        }
    }
    // Every pair that shares a pCPU, by the pCPU: two moves on four different pCPUs gain what each gains alone,
    // so only pairs that share one can gain where no single move does.
    let mut touching: std::collections::HashMap<PcpuId, Vec<usize>> = std::collections::HashMap::new();
    for (k, s) in steps.iter().enumerate() {
        touching.entry(s.from).or_default().push(k);
        touching.entry(s.to).or_default().push(k);
    }
    while kept.len() < max {
        let left = max - kept.len();
        let gain = |ks: &[usize], load: &[(PcpuId, f64)]| gain(load, allowed, ks.iter().map(|&k| &steps[k]));
        // Weighed per move, since each uses up the same budget.
        let mut best: Option<(f64, Vec<usize>)> = None;
        let mut consider = |ks: Vec<usize>, g: f64| {
            let per = g / ks.len() as f64;
            if g > MIN_GAIN && best.as_ref().is_none_or(|(b, _)| per > *b) {
                best = Some((per, ks));
            }
        };
        for a in (0..steps.len()).filter(|&a| !taken[a]) {
            consider(vec![a], gain(&[a], &load));
            if left < 2 {
                continue;
            }
            for p in [steps[a].from, steps[a].to] {
                for &b in touching.get(&p).into_iter().flatten().filter(|&&b| b > a && !taken[b]) {
                    consider(vec![a, b], gain(&[a, b], &load));
                }
            }
        }
        // A cycle of three or more (a vCPU each from p to q, q to r, r to p) gains only whole: the groups of the
        // moves left that share pCPUs, where one fits.
        for group in groups(steps, &taken).into_iter().filter(|g| g.len() > 2 && g.len() <= left) {
            let g = gain(&group, &load);
            consider(group, g);
        }
        let Some((_, ks)) = best else { break };
        for k in ks {
            apply(&mut load, &steps[k]);
            taken[k] = true;
            kept.push(k);
        }
    }
    kept
}

/// The moves not `taken`, grouped by shared pCPUs (connected components), each group in the plan's order.
fn groups(steps: &[Step], taken: &[bool]) -> Vec<Vec<usize>> {
    let mut parent: Vec<usize> = (0..steps.len()).collect();
    fn root(parent: &mut [usize], mut k: usize) -> usize {
        while parent[k] != k {
            parent[k] = parent[parent[k]];
            k = parent[k];
        }
        k
    }
    let mut first: std::collections::HashMap<PcpuId, usize> = std::collections::HashMap::new();
    for (k, s) in steps.iter().enumerate().filter(|&(k, _)| !taken[k]) {
        for p in [s.from, s.to] {
            let other = *first.entry(p).or_insert(k);
            let (x, y) = (root(&mut parent, k), root(&mut parent, other));
            parent[x.max(y)] = x.min(y);
        }
    }
    let mut out: std::collections::BTreeMap<usize, Vec<usize>> = std::collections::BTreeMap::new();
    for k in (0..steps.len()).filter(|&k| !taken[k]) {
        let r = root(&mut parent, k);
        out.entry(r).or_default().push(k);
    }
    out.into_values().collect()
}

fn at(load: &[(PcpuId, f64)], p: PcpuId) -> Option<usize> {
    load.binary_search_by_key(&p, |&(id, _)| id).ok()
}

/// The usage of pCPU `p` in `load` (every online pCPU's usage in id order), if it is online.
pub fn load_of(load: &[(PcpuId, f64)], p: PcpuId) -> Option<f64> {
    at(load, p).map(|i| load[i].1)
}

fn apply(load: &mut [(PcpuId, f64)], s: &Step) {
    if let Some(i) = at(load, s.from) {
        load[i].1 -= s.usage;
    }
    if let Some(i) = at(load, s.to) {
        load[i].1 += s.usage;
    }
}

/// How much applying `steps` together lowers the sum of squared loads of the allowed pCPUs.
fn gain<'a>(load: &[(PcpuId, f64)], allowed: &PcpuSet, steps: impl Iterator<Item = &'a Step>) -> f64 {
    let mut touched: Vec<(PcpuId, f64, f64)> = Vec::with_capacity(4);
    for s in steps {
        for (p, d) in [(s.from, -s.usage), (s.to, s.usage)] {
            if !allowed.contains(&p) {
                continue;
            }
            match touched.iter_mut().find(|t| t.0 == p) {
                Some(t) => t.2 += d,
                None => {
                    let l = load_of(load, p).unwrap_or(0.0);
                    touched.push((p, l, l + d));
                }
            }
        }
    }
    touched.iter().map(|&(_, before, after)| before * before - after * after).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loads(l: &[f64]) -> Vec<(PcpuId, f64)> {
        l.iter().enumerate().map(|(i, &u)| (i as PcpuId, u)).collect()
    }

    fn all(n: u32) -> PcpuSet {
        (0..n).collect()
    }

    fn step(from: PcpuId, to: PcpuId, usage: f64) -> Step {
        Step { from, to, usage }
    }

    fn sum_sq(load: &[(PcpuId, f64)], allowed: &PcpuSet) -> f64 {
        load.iter().filter(|(p, _)| allowed.contains(p)).map(|(_, l)| l * l).sum()
    }

    #[test]
    fn a_plan_within_the_limit_is_kept_whole_and_in_order() {
        let steps = [step(0, 1, 30.0), step(1, 0, 10.0)];
        assert_eq!(limit(&loads(&[80.0, 20.0]), &all(2), &steps, 2), vec![0, 1]);
        assert_eq!(limit(&loads(&[80.0, 20.0]), &all(2), &steps, 5), vec![0, 1]);
    }

    #[test]
    fn the_moves_that_help_most_are_kept_first() {
        // pCPU 0 at 90 sheds three vCPUs to three idle pCPUs; with room for two, the two heaviest go.
        let steps = [step(0, 1, 10.0), step(0, 2, 30.0), step(0, 3, 20.0)];
        assert_eq!(limit(&loads(&[90.0, 0.0, 0.0, 0.0]), &all(4), &steps, 2), vec![1, 2]);
    }

    #[test]
    fn a_swap_is_kept_whole_or_not_at_all() {
        // pCPU 0 runs 50 + 10, pCPU 1 runs 40 + 5: swapping 50 and 40 evens them (50 / 55 from 60 / 45), while
        // either half alone makes it worse.
        let l = loads(&[60.0, 45.0]);
        let steps = [step(0, 1, 50.0), step(1, 0, 40.0)];
        assert_eq!(limit(&l, &all(2), &steps, 2), vec![0, 1]);
        let chain = [step(0, 1, 50.0), step(1, 0, 40.0), step(0, 2, 1.0)];
        assert_eq!(limit(&loads(&[60.0, 45.0, 58.0]), &all(3), &chain, 2), vec![0, 1]);
        // With room for one move, only the small one helps on its own.
        assert_eq!(limit(&loads(&[60.0, 45.0, 58.0]), &all(3), &chain, 1), vec![2]);
        assert_eq!(limit(&l, &all(2), &steps, 1), Vec::<usize>::new());
    }

    #[test]
    fn a_cycle_of_three_is_kept_whole() {
        // 12 from pCPU 0 to 1, 24 from 1 to 2, 36 from 2 to 0: spread 22 to 16, while no one or two of the three
        // lower the sum of squares. A harmful move elsewhere makes the plan longer than the limit.
        let l = loads(&[51.0, 71.0, 73.0, 10.0, 50.0]);
        let steps = [step(0, 1, 12.0), step(3, 4, 5.0), step(1, 2, 24.0), step(2, 0, 36.0)];
        assert_eq!(limit(&l, &all(5), &steps, 3), vec![0, 2, 3]);
        assert_eq!(limit(&l, &all(5), &steps, 2), Vec::<usize>::new());
    }

    #[test]
    fn moves_off_reserved_pcpus_come_first() {
        // pCPU 0 is reserved: its vCPU leaves it before any move between allowed pCPUs, even a better one.
        let allowed: PcpuSet = [1, 2].into_iter().collect();
        let steps = [step(1, 2, 40.0), step(0, 2, 5.0), step(1, 2, 1.0)];
        assert_eq!(limit(&loads(&[5.0, 90.0, 0.0]), &allowed, &steps, 1), vec![1]);
        assert_eq!(limit(&loads(&[5.0, 90.0, 0.0]), &allowed, &steps, 2), vec![1, 0]);
    }

    proptest! {
        /// Whatever is kept: no more than the limit, each move at most once, and the sum of squared loads lower
        /// after the kept moves between allowed pCPUs than before (unless nothing but moves off reserved
        /// pCPUs was kept).
        #[test]
        fn what_is_kept_fits_and_lowers_the_imbalance(
            l in proptest::collection::vec(0.0f64..=100.0, 2..8),
            raw in proptest::collection::vec((0u32..8, 0u32..8, 0.5f64..=60.0), 0..12),
            max in 1usize..6,
            reserve in proptest::option::of(0u32..8),
        ) {
            let n = l.len() as u32;
            let allowed: PcpuSet = (0..n).filter(|p| Some(*p) != reserve).collect();
            let steps: Vec<Step> = raw
                .iter()
                .map(|&(f, t, u)| step(f % n, t % n, u))
                .filter(|s| s.from != s.to && allowed.contains(&s.to))
                .collect();
            let before = loads(&l);
            let kept = limit(&before, &allowed, &steps, max);
            prop_assert!(kept.len() <= max);
            let mut seen = kept.clone();
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), kept.len());
            if steps.len() <= max {
                prop_assert_eq!(kept, (0..steps.len()).collect::<Vec<_>>());
            } else {
                let stranded: Vec<usize> = kept.iter().copied().filter(|&k| !allowed.contains(&steps[k].from)).collect();
                let mut after = before.clone();
                for &k in &stranded {
                    apply(&mut after, &steps[k]);
                }
                let base = sum_sq(&after, &allowed);
                for &k in kept.iter().filter(|k| !stranded.contains(k)) {
                    apply(&mut after, &steps[k]);
                }
                if kept.len() > stranded.len() {
                    prop_assert!(sum_sq(&after, &allowed) < base - MIN_GAIN);
                }
                // Moves off reserved pCPUs are taken first, as many as fit.
                let all_stranded = steps.iter().filter(|s| !allowed.contains(&s.from)).count();
                prop_assert_eq!(stranded.len(), all_stranded.min(max));
            }
        }
    }
}
