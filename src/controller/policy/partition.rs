//! A placement of a whole host planned from scratch, for `converge` when it is stuck over the threshold.
//!
//! `converge`'s steps change two pCPUs at a time, and its whole-host plan sheds from the busiest pCPUs and keeps
//! the rest in place. Both can stop at a spread over the threshold on a host that a placement moving many vCPUs at
//! once would balance (POLICIES.md, "Beyond the suite": 13.4 where 9.1 is reachable). This module finds such a
//! placement with two classic heuristics for partitioning numbers into `n` sets of near-equal sums:
//! - longest processing time first (LPT): each vCPU, heaviest first, to the least loaded pCPU, and a sticky variant
//!   that keeps a vCPU where it runs while that pCPU is within half the threshold of the least loaded one (fewer
//!   moves, where it balances);
//! - the largest differencing method of Karmarkar and Karp (KK), for `n` sets: every vCPU starts as an `n`-tuple
//!   of sums with its usage in one set; the two tuples with the widest range are merged, the fullest set of one
//!   with the emptiest of the other, until one tuple is left. It often balances where LPT does not, at
//!   O(v·n·log) for v vCPUs, so it runs only within [`KK_BUDGET`].
//!
//! A partition says which vCPUs share a pCPU, not which pCPU: pCPUs with the same fixed load (from vCPUs that
//! cannot move) can swap their sets. Each set goes to the pCPU that already runs most of its vCPUs (an optimal
//! assignment, [`assign`]), so that few vCPUs move. Then each moved vCPU that can go back where it was with the host
//! still within the threshold goes back, heaviest first. The plan with the fewest moves that is within the threshold
//! wins. Pure functions on plain numbers: the caller maps its vCPUs and pCPUs to indices.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Floating-point slack when comparing sums with the threshold.
const EPS: f64 = 1e-9;

/// Most vCPUs × pCPUs for which [`kk`] runs (its tuples hold that many sums). LPT alone beyond it.
pub const KK_BUDGET: usize = 40_000;

/// Rounds of the pass that sends moved vCPUs back where they were. Each one reverts at least one, or the pass stops.
const REVERT_PASSES: usize = 3;

/// A vCPU to place: its usage, the pCPU (index) it runs on, and a pCPU it must not be sent to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Item {
    pub usage: f64,
    pub at: usize,
    pub not_to: Option<usize>,
}

/// A placement of `items` on the pCPUs whose fixed loads are `fixed` (the load of what cannot move), with every
/// pCPU's total within `threshold` of every other's, and as few items away from `at` as the heuristics find.
/// Returns each item's pCPU, or `None` if no heuristic gets within the threshold.
pub fn balance(items: &[Item], fixed: &[f64], threshold: f64) -> Option<Vec<usize>> {
    let n = fixed.len();
    if n == 0 || items.iter().any(|x| x.at >= n || x.not_to.is_some_and(|q| q >= n)) {
        return None;
    }
    // LPT ignores where vCPUs run; its sticky variant keeps a vCPU in place while its pCPU is within half the
    // threshold of the least loaded one, which often balances with fewer moves.
    let mut sets = vec![lpt(items, fixed, None), lpt(items, fixed, Some(threshold / 2.0))];
    if items.len().saturating_mul(n) <= KK_BUDGET {
        sets.push(kk(items, fixed));
    }
    let mut best: Option<(usize, f64, Vec<usize>)> = None;
    for set in sets {
        // The assignment only swaps sets between pCPUs of equal fixed load, so it keeps the totals' range: a
        // partition over the threshold is dropped before its O(n³) assignment (a host that cannot be balanced
        // would pay it for nothing).
        if range(&sums(items, fixed, &set)) > threshold + EPS {
            continue;
        }
        let Some(mut to) = assign(items, fixed, &set) else { continue };
        let mut sum = sums(items, fixed, &to);
        if range(&sum) > threshold + EPS {
            continue;
        }
        revert(items, &mut to, &mut sum, threshold);
        let moved = items.iter().zip(&to).filter(|(x, t)| x.at != **t).count();
        let r = range(&sum);
        if best.as_ref().is_none_or(|(m, br, _)| moved < *m || (moved == *m && r < *br - EPS)) {
            best = Some((moved, r, to));
        }
    }
    best.map(|(_, _, to)| to)
}

/// The pCPUs' totals with each item at `to`.
fn sums(items: &[Item], fixed: &[f64], to: &[usize]) -> Vec<f64> {
    let mut s = fixed.to_vec();
    for (x, &t) in items.iter().zip(to) {
        s[t] += x.usage;
    }
    s
}

fn range(s: &[f64]) -> f64 {
    let hi = s.iter().copied().fold(f64::MIN, f64::max);
    let lo = s.iter().copied().fold(f64::MAX, f64::min);
    hi - lo
}

/// Items heaviest first (ties by index), the order both heuristics take them in.
fn heaviest_first(items: &[Item]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| items[b].usage.total_cmp(&items[a].usage).then(a.cmp(&b)));
    order
}

/// LPT: each item, heaviest first, to the pCPU with the least total so far (ties: the lowest index). With a
/// `stick` slack, the sticky variant: an item stays where it runs while that pCPU is within the slack of the least
/// loaded one.
fn lpt(items: &[Item], fixed: &[f64], stick: Option<f64>) -> Vec<usize> {
    let mut sum = fixed.to_vec();
    let mut to = vec![0; items.len()];
    for j in heaviest_first(items) {
        let least = (0..sum.len()).min_by(|&a, &b| sum[a].total_cmp(&sum[b]).then(a.cmp(&b))).expect("n > 0");
        let here = items[j].at;
        let i = if stick.is_some_and(|slack| sum[here] <= sum[least] + slack) { here } else { least };
        sum[i] += items[j].usage;
        to[j] = i;
    }
    to
}

/// One set of a KK tuple: its sum, its items, and the pCPU it is bound to (only the fixed loads' tuple has these).
#[derive(Debug, Clone, Default)]
struct Part {
    sum: f64,
    items: Vec<usize>,
    pcpu: Option<usize>,
}

/// A KK tuple in the heap: the widest range first (ties: the earliest made, so the result is deterministic).
struct Tuple {
    range: f64,
    seq: usize,
    parts: Vec<Part>,
}

impl PartialEq for Tuple {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o).is_eq()
    }
}
impl Eq for Tuple {}
impl PartialOrd for Tuple {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Tuple {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.range.total_cmp(&o.range).then(Reverse(self.seq).cmp(&Reverse(o.seq)))
    }
}

/// KK for `n` sets. The fixed loads are one more tuple, whose sets are bound to their pCPUs; a merge keeps a set's
/// binding, so the last tuple says which items share each pCPU.
fn kk(items: &[Item], fixed: &[f64]) -> Vec<usize> {
    let n = fixed.len();
    let tuple = |parts: Vec<Part>, seq: usize| {
        let hi = parts.iter().map(|p| p.sum).fold(f64::MIN, f64::max);
        let lo = parts.iter().map(|p| p.sum).fold(f64::MAX, f64::min);
        Tuple { range: hi - lo, seq, parts }
    };
    let mut heap = BinaryHeap::new();
    let bound = fixed.iter().enumerate().map(|(i, &f)| Part { sum: f, items: Vec::new(), pcpu: Some(i) }).collect();
    heap.push(tuple(bound, 0));
    for (seq, j) in heaviest_first(items).into_iter().enumerate() {
        let mut parts = vec![Part::default(); n];
        parts[0] = Part { sum: items[j].usage, items: vec![j], pcpu: None };
        heap.push(tuple(parts, seq + 1));
    }
    let mut seq = items.len() + 1;
    while heap.len() > 1 {
        let (mut a, mut b) = (heap.pop().expect("two").parts, heap.pop().expect("two").parts);
        a.sort_by(|x, y| y.sum.total_cmp(&x.sum));
        b.sort_by(|x, y| x.sum.total_cmp(&y.sum));
        let merged = a
            .into_iter()
            .zip(b)
            .map(|(mut x, mut y)| {
                x.items.append(&mut y.items);
                Part { sum: x.sum + y.sum, items: x.items, pcpu: x.pcpu.or(y.pcpu) }
            })
            .collect();
        heap.push(tuple(merged, seq));
        seq += 1;
    }
    let mut to = vec![0; items.len()];
    for p in heap.pop().expect("the bound tuple").parts {
        let i = p.pcpu.expect("every set of the last tuple is bound: the bound tuple was merged into it");
        for j in p.items {
            to[j] = i;
        }
    }
    to
}

/// Gives each set of `to` (the items a heuristic put on one pCPU) to the pCPU, among those with the same fixed load,
/// that already runs most of its items: an optimal assignment per group of equal fixed loads. `None` if a set can
/// only go to a pCPU that one of its items must not be sent to.
fn assign(items: &[Item], fixed: &[f64], to: &[usize]) -> Option<Vec<usize>> {
    let n = fixed.len();
    // Groups of pCPUs with equal fixed loads (within EPS), by fixed load.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| fixed[a].total_cmp(&fixed[b]).then(a.cmp(&b)));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in order {
        match groups.last_mut() {
            Some(g) if fixed[i] - fixed[g[0]] <= EPS => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    // Per set (the pCPU the heuristic chose), its items' current pCPUs and forbidden ones.
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (j, &t) in to.iter().enumerate() {
        members[t].push(j);
    }
    let mut label = vec![0; n];
    for g in &groups {
        // cost[s][k]: minus the items of set g[s] already on pCPU g[k]; a forbidden pair costs more than any plan.
        let forbidden = (items.len() + 1) as f64;
        let cost: Vec<Vec<f64>> = g
            .iter()
            .map(|&s| {
                g.iter()
                    .map(|&k| {
                        let m = &members[s];
                        if m.iter().any(|&j| items[j].not_to == Some(k)) {
                            forbidden
                        } else {
                            -(m.iter().filter(|&&j| items[j].at == k).count() as f64)
                        }
                    })
                    .collect()
            })
            .collect();
        let pick = hungarian(&cost);
        for (s, &k) in pick.iter().enumerate() {
            if cost[s][k] >= forbidden {
                return None;
            }
            label[g[s]] = g[k];
        }
    }
    Some(to.iter().map(|&t| label[t]).collect())
}

/// The assignment of rows to columns of a square cost matrix with the least total cost (Kuhn–Munkres with
/// potentials, O(n³)): `result[row] = column`.
fn hungarian(cost: &[Vec<f64>]) -> Vec<usize> {
    let n = cost.len();
    // 1-based, with row/column 0 as the sentinel, as in the textbook form.
    let (mut u, mut v) = (vec![0.0; n + 1], vec![0.0; n + 1]);
    let (mut col_row, mut way) = (vec![0usize; n + 1], vec![0usize; n + 1]);
    for i in 1..=n {
        col_row[0] = i;
        let mut j0 = 0;
        let mut minv = vec![f64::INFINITY; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = col_row[j0];
            let (mut delta, mut j1) = (f64::INFINITY, 0);
            for j in 1..=n {
                if !used[j] {
                    let cur = cost[i0 - 1][j - 1] - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[col_row[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if col_row[j0] == 0 {
                break;
            }
        }
        // Augment along the path found.
        while j0 != 0 {
            let j1 = way[j0];
            col_row[j0] = col_row[j1];
            j0 = j1;
        }
    }
    let mut result = vec![0; n];
    for j in 1..=n {
        result[col_row[j] - 1] = j - 1;
    }
    result
}

/// Sends moved items back where they were, heaviest first, wherever the totals stay within `threshold`.
fn revert(items: &[Item], to: &mut [usize], sum: &mut [f64], threshold: f64) {
    let order = heaviest_first(items);
    for _ in 0..REVERT_PASSES {
        let mut any = false;
        for &j in &order {
            let (from, home) = (to[j], items[j].at);
            if from == home {
                continue;
            }
            sum[from] -= items[j].usage;
            sum[home] += items[j].usage;
            if range(sum) <= threshold + EPS {
                to[j] = home;
                any = true;
            } else {
                sum[from] += items[j].usage;
                sum[home] -= items[j].usage;
            }
        }
        if !any {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn items(v: &[(f64, usize)]) -> Vec<Item> {
        v.iter().map(|&(usage, at)| Item { usage, at, not_to: None }).collect()
    }

    #[test]
    fn hungarian_finds_the_cheapest_assignment() {
        let cost = vec![vec![4.0, 1.0, 3.0], vec![2.0, 0.0, 5.0], vec![3.0, 2.0, 2.0]];
        let pick = hungarian(&cost);
        let total: f64 = pick.iter().enumerate().map(|(r, &c)| cost[r][c]).sum();
        assert_eq!(total, 5.0, "{pick:?}");
        // Every assignment of 3 rows, by brute force: none is cheaper.
        let perms = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        let least = perms.iter().map(|p| (0..3).map(|r| cost[r][p[r]]).sum::<f64>()).fold(f64::MAX, f64::min);
        assert_eq!(total, least);
    }

    /// Two pCPUs, 60 + 40 | 50 + 30: no move or swap gets within 10 points while keeping both in place, but the
    /// sets {60, 30} and {50, 40} do. The relabelling then keeps two of the four vCPUs where they are.
    #[test]
    fn a_partition_is_given_to_the_pcpus_that_run_most_of_it() {
        let it = items(&[(60.0, 0), (40.0, 0), (50.0, 1), (30.0, 1)]);
        let to = balance(&it, &[0.0, 0.0], 10.0).expect("balances");
        let s = sums(&it, &[0.0, 0.0], &to);
        assert!(range(&s) <= 10.0, "{s:?}");
        assert_eq!(it.iter().zip(&to).filter(|(x, t)| x.at != **t).count(), 2, "{to:?}");
    }

    /// LPT puts the heaviest first on pCPU 0, 1, 2; the relabelling gives each set back to the pCPU that runs it,
    /// so a host already balanced keeps every vCPU where it is (without it, two would swap places).
    #[test]
    fn a_balanced_host_keeps_its_placement() {
        let it = items(&[(50.0, 2), (50.0, 1), (50.0, 0)]);
        assert_eq!(lpt(&it, &[0.0; 3], None), vec![0, 1, 2]);
        assert_eq!(balance(&it, &[0.0; 3], 10.0), Some(vec![2, 1, 0]));
    }

    /// 60 + 15 + 5 | 40: LPT's sets {60} | {40, 15, 5} move the 15 and the 5; the 5 can go back (65 | 55), and does.
    #[test]
    fn a_moved_vcpu_goes_back_where_the_balance_allows() {
        let it = items(&[(60.0, 1), (15.0, 1), (40.0, 0), (5.0, 1)]);
        assert_eq!(balance(&it, &[0.0, 0.0], 10.0), Some(vec![1, 0, 0, 1]));
    }

    /// 45 + 20 | 15 | 60 + 20 + 20: LPT's sets need 3 moves even once relabelled and sent back, the sticky variant's
    /// 2 (a 20 from pCPU 2 to pCPU 1, and the other 20 from pCPU 0 to pCPU 1).
    #[test]
    fn the_sticky_variant_moves_fewer() {
        let it = items(&[(15.0, 1), (20.0, 2), (20.0, 2), (20.0, 0), (60.0, 2), (45.0, 0)]);
        let fixed = [0.0; 3];
        let moved = |to: &[usize]| it.iter().zip(to).filter(|(x, t)| x.at != **t).count();
        let to = balance(&it, &fixed, 10.0).expect("balances");
        assert!(range(&sums(&it, &fixed, &to)) <= 10.0);
        assert_eq!(moved(&to), 2, "{to:?}");
    }

    /// KK balances where LPT does not: 8, 7, 6, 5, 4 on 2 pCPUs, LPT 17 | 13, KK 16 | 14 (threshold 3).
    #[test]
    fn kk_balances_where_lpt_does_not() {
        let it = items(&[(8.0, 0), (7.0, 0), (6.0, 0), (5.0, 0), (4.0, 0)]);
        let l = sums(&it, &[0.0, 0.0], &lpt(&it, &[0.0, 0.0], None));
        assert_eq!(range(&l), 4.0, "LPT {l:?}");
        let k = sums(&it, &[0.0, 0.0], &kk(&it, &[0.0, 0.0]));
        assert_eq!(range(&k), 2.0, "KK {k:?}");
        assert!(balance(&it, &[0.0, 0.0], 3.0).is_some());
    }

    /// Fixed loads bind their pCPUs: the heavy fixed pCPU gets the light items, and sets do not swap between pCPUs
    /// whose fixed loads differ.
    #[test]
    fn fixed_loads_stay_on_their_pcpus() {
        let it = items(&[(30.0, 0), (30.0, 0), (10.0, 0), (10.0, 0)]);
        let fixed = [40.0, 0.0];
        let to = balance(&it, &fixed, 5.0).expect("balances");
        let s = sums(&it, &fixed, &to);
        assert!(range(&s) <= 5.0, "{s:?}");
        assert!(s[0] >= 40.0);
    }

    #[test]
    fn a_vcpu_is_not_sent_where_it_must_not_go() {
        // Only {50} | {30, 20} balances 50, 30, 20 on 2 pCPUs; 50 may not go to pCPU 1, and sits on pCPU 1 now.
        let it = vec![
            Item { usage: 50.0, at: 1, not_to: None },
            Item { usage: 30.0, at: 1, not_to: Some(0) },
            Item { usage: 20.0, at: 1, not_to: None },
        ];
        let to = balance(&it, &[0.0, 0.0], 5.0).expect("balances");
        assert_eq!(to, vec![0, 1, 1]);
        // With the 50 barred from pCPU 0 as well as the 30, no split is allowed.
        let mut barred = it.clone();
        barred[0] = Item { usage: 50.0, at: 0, not_to: Some(1) };
        barred[1] = Item { usage: 30.0, at: 1, not_to: Some(0) };
        barred[2] = Item { usage: 20.0, at: 0, not_to: Some(1) };
        assert_eq!(balance(&barred, &[0.0, 0.0], 5.0), None);
    }

    proptest! {
        /// The assignment is the cheapest, against every permutation.
        #[test]
        fn hungarian_is_optimal(n in 1usize..6, raw in proptest::collection::vec(-5i32..10, 36)) {
            let cost: Vec<Vec<f64>> = (0..n).map(|r| (0..n).map(|c| f64::from(raw[r * 6 + c])).collect()).collect();
            let pick = hungarian(&cost);
            let mut seen = pick.clone();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..n).collect::<Vec<_>>());
            let total: f64 = pick.iter().enumerate().map(|(r, &c)| cost[r][c]).sum();
            // Heap's algorithm over the columns.
            let mut p: Vec<usize> = (0..n).collect();
            let mut least = f64::MAX;
            let mut c = vec![0; n];
            let mut i = 0;
            least = least.min((0..n).map(|r| cost[r][p[r]]).sum());
            while i < n {
                if c[i] < i {
                    if i % 2 == 0 { p.swap(0, i) } else { p.swap(c[i], i) }
                    least = least.min((0..n).map(|r| cost[r][p[r]]).sum());
                    c[i] += 1;
                    i = 0;
                } else {
                    c[i] = 0;
                    i += 1;
                }
            }
            prop_assert_eq!(total, least);
        }

        /// Whatever it returns is within the threshold, respects `not_to`, and moves no more items than there are.
        #[test]
        fn a_plan_is_balanced_and_allowed(
            n in 1usize..8,
            raw in proptest::collection::vec((1.0f64..60.0, 0usize..8, proptest::option::of(0usize..8)), 0..24),
            fixed in proptest::collection::vec(prop_oneof![Just(0.0f64), 0.0f64..30.0], 8),
            threshold in 1.0f64..20.0,
        ) {
            let it: Vec<Item> =
                raw.iter().map(|&(usage, at, not)| Item { usage, at: at % n, not_to: not.map(|q| q % n) }).collect();
            let fixed = &fixed[..n];
            if let Some(to) = balance(&it, fixed, threshold) {
                prop_assert_eq!(to.len(), it.len());
                prop_assert!(range(&sums(&it, fixed, &to)) <= threshold + 1e-6);
                for (x, &t) in it.iter().zip(&to) {
                    prop_assert!(t < n);
                    prop_assert!(x.at == t || x.not_to != Some(t), "{:?} sent to {}", x, t);
                }
            }
        }

        /// Where LPT alone is within the threshold (no fixed load, no barred pCPU), a plan is found, and it moves
        /// no more vCPUs than LPT's own sets would.
        #[test]
        fn what_lpt_balances_is_found(
            n in 1usize..8,
            raw in proptest::collection::vec((1.0f64..60.0, 0usize..8), 0..24),
            threshold in 1.0f64..30.0,
        ) {
            let it: Vec<Item> = raw.iter().map(|&(usage, at)| Item { usage, at: at % n, not_to: None }).collect();
            let fixed = vec![0.0; n];
            let l = lpt(&it, &fixed, None);
            if range(&sums(&it, &fixed, &l)) <= threshold {
                let to = balance(&it, &fixed, threshold);
                prop_assert!(to.is_some());
                let moved = |to: &[usize]| it.iter().zip(to).filter(|(x, t)| x.at != **t).count();
                prop_assert!(moved(&to.unwrap()) <= moved(&l));
            }
        }
    }
}
