//! Usage maths: two samples of one host in, per-vCPU and per-pCPU usage out. Pure: no I/O, no clock.
//!
//! usage(vCPU) = Δ vCPU time / Δ agent sample time × 100 (% of one pCPU), attributed to the pCPU the vCPU runs on
//! at the later sample; usage(pCPU) = sum over its vCPUs. A domain that appeared, restarted (new id, fewer vCPUs, or
//! a vCPU time that went backwards) gets a fresh baseline: its usage is unknown this round, never negative.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use crate::model::{HostStats, PcpuId};

/// Upper bound of one vCPU's usage: a vCPU is one thread and cannot run on more than one pCPU at a time. Sampling
/// skew can make a 100 % vCPU read 100.3 %; clamping keeps the arithmetic honest.
pub const MAX_VCPU_USAGE: f64 = 100.0;

/// One vCPU in a round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VcpuUsage {
    /// Shared by the domain's vCPUs and by every map the policy keys on them: a round clones these many times, and
    /// a clone of an `Arc` is not an allocation.
    pub domain: Arc<str>,
    pub uuid: Arc<str>,
    pub vcpu: u32,
    pub pcpu: PcpuId,
    /// Shared for the same reason: the policy copies it into its memory of each vCPU's last affinity.
    pub affinity: Arc<[PcpuId]>,
    /// % of one pCPU over the round; `None` for a fresh baseline.
    pub usage: Option<f64>,
}

/// One pCPU in a round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PcpuUsage {
    pub id: PcpuId,
    pub usage: f64,
}

/// Usage of one host over one round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostUsage {
    pub elapsed_ns: u64,
    /// Online pCPUs, in id order.
    pub pcpus: Vec<PcpuUsage>,
    /// Every vCPU of every running domain, sorted by domain name then vCPU index.
    pub vcpus: Vec<VcpuUsage>,
    /// Domains whose baseline was reset this round, with why.
    pub fresh: Vec<(String, &'static str)>,
}

/// Why no usage could be computed this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BaselineReason {
    FirstSample,
    AgentRestarted,
    ClockDidNotAdvance,
}

impl BaselineReason {
    pub fn as_str(self) -> &'static str {
        match self {
            BaselineReason::FirstSample => "first sample",
            BaselineReason::AgentRestarted => "agent restarted",
            BaselineReason::ClockDidNotAdvance => "agent clock did not advance",
        }
    }
}

/// Usage between `prev` and `cur`, or why there is none (the caller keeps `cur` as the new baseline either way).
pub fn compute(prev: Option<&HostStats>, cur: &HostStats) -> Result<HostUsage, BaselineReason> {
    compute_reusing(prev, cur, None)
}

/// [`compute`], taking the shared names, UUIDs and affinities from `last` (the previous round's usage) wherever
/// they are unchanged, instead of allocating them again. A host's domains and pins rarely change, so in most rounds
/// this allocates nothing per vCPU, and the policy's comparisons with its memory of the last round (whose keys
/// are these same `Arc`s) stop at the pointer. The result is the same as [`compute`]'s.
pub fn compute_reusing(
    prev: Option<&HostStats>,
    cur: &HostStats,
    last: Option<&HostUsage>,
) -> Result<HostUsage, BaselineReason> {
    let prev = prev.ok_or(BaselineReason::FirstSample)?;
    if prev.agent_instance != cur.agent_instance {
        return Err(BaselineReason::AgentRestarted);
    }
    if cur.sample_time_ns <= prev.sample_time_ns {
        return Err(BaselineReason::ClockDidNotAdvance);
    }
    let elapsed_ns = cur.sample_time_ns - prev.sample_time_ns;
    // The agent lists domains in the same order every round, so the previous sample of a domain is almost always at
    // the same position; the map is only for the rounds where domains came or went.
    let aligned =
        prev.domains.len() == cur.domains.len() && prev.domains.iter().zip(&cur.domains).all(|(a, b)| a.uuid == b.uuid);
    let by_uuid: HashMap<&str, &crate::model::DomainStats> =
        if aligned { HashMap::new() } else { prev.domains.iter().map(|d| (d.uuid.as_str(), d)).collect() };
    let before_of = |i: usize, d: &crate::model::DomainStats| {
        if aligned { prev.domains.get(i) } else { by_uuid.get(d.uuid.as_str()).copied() }
    };
    let mut vcpus = Vec::with_capacity(cur.domains.iter().map(|d| d.vcpus.len()).sum());
    let mut fresh = Vec::new();
    let mut domains: Vec<_> = cur.domains.iter().enumerate().collect();
    domains.sort_by(|(_, a), (_, b)| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
    for (i, d) in domains {
        let p = before_of(i, d);
        let why: Option<&'static str> = match p {
            None => Some("new domain"),
            Some(p) if p.id != d.id => Some("domain restarted (new id)"),
            Some(p) if p.vcpus.len() != d.vcpus.len() => Some("vCPU count changed"),
            Some(p) if p.vcpus.iter().zip(&d.vcpus).any(|(a, b)| b.time_ns < a.time_ns || a.index != b.index) => {
                Some("vCPU time went backwards")
            }
            Some(_) => None,
        };
        if let Some(why) = why {
            fresh.push((d.name.clone(), why));
        }
        // The vCPU at this place of the last usage, if it is this domain's first: both lists are sorted the same way,
        // so with the same domains they line up.
        let was = last.and_then(|l| l.vcpus.get(vcpus.len())).filter(|w| *w.uuid == *d.uuid);
        let (name, uuid): (Arc<str>, Arc<str>) = match was {
            Some(w) if *w.domain == *d.name => (w.domain.clone(), w.uuid.clone()),
            _ => (d.name.as_str().into(), d.uuid.as_str().into()),
        };
        // Agents send vCPUs in index order; sorting (and its allocation) is only for one that does not.
        let order: Option<Vec<usize>> = (!d.vcpus.is_sorted_by_key(|v| v.index)).then(|| {
            let mut o: Vec<usize> = (0..d.vcpus.len()).collect();
            o.sort_by_key(|&i| d.vcpus[i].index);
            o
        });
        for k in 0..d.vcpus.len() {
            let i = order.as_ref().map_or(k, |o| o[k]);
            let v = &d.vcpus[i];
            let usage = match (why, p) {
                (None, Some(p)) => {
                    let delta = v.time_ns - p.vcpus[i].time_ns;
                    Some((delta as f64 / elapsed_ns as f64 * 100.0).clamp(0.0, MAX_VCPU_USAGE))
                }
                _ => None,
            };
            let affinity = match last.and_then(|l| l.vcpus.get(vcpus.len())) {
                Some(w) if Arc::ptr_eq(&w.uuid, &uuid) && w.vcpu == v.index && *w.affinity == *v.affinity => {
                    w.affinity.clone()
                }
                _ => v.affinity.as_slice().into(),
            };
            vcpus.push(VcpuUsage { domain: name.clone(), uuid: uuid.clone(), vcpu: v.index, pcpu: v.pcpu, affinity, usage });
        }
    }
    let mut online = cur.online_pcpus.clone();
    online.sort_unstable();
    online.dedup();
    let mut u = HostUsage { elapsed_ns, pcpus: online.iter().map(|&id| PcpuUsage { id, usage: 0.0 }).collect(), vcpus, fresh };
    sum_pcpus(&mut u);
    Ok(u)
}

/// Sets each pCPU's usage to the sum of its vCPUs' known usages, in one pass over the vCPUs (a host can have a
/// thousand vCPUs on a hundred pCPUs). `u.pcpus` must be sorted by id. Sums start at +0.0: an empty f64 sum is
/// -0.0, which prints as "-0.0".
pub fn sum_pcpus(u: &mut HostUsage) {
    for p in &mut u.pcpus {
        p.usage = 0.0;
    }
    for v in &u.vcpus {
        if let (Some(x), Ok(i)) = (v.usage, u.pcpus.binary_search_by_key(&v.pcpu, |p| p.id)) {
            u.pcpus[i].usage += x;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{DomainStats, VcpuStats};
    use proptest::prelude::*;

    /// `(name, id, [(vCPU time ns, pCPU)])` per domain.
    type DomSpec<'a> = (&'a str, u32, &'a [(u64, u32)]);

    pub fn stats(t_ns: u64, doms: &[DomSpec<'_>]) -> HostStats {
        HostStats {
            sample_time_ns: t_ns,
            npcpus: 4,
            online_pcpus: vec![0, 1, 2, 3],
            agent_instance: "a".into(),
            domains: doms
                .iter()
                .map(|(name, id, vcpus)| DomainStats {
                    uuid: format!("uuid-{name}"),
                    name: name.to_string(),
                    id: *id,
                    cpu_time_ns: vcpus.iter().map(|v| v.0).sum(),
                    vcpus: vcpus
                        .iter()
                        .enumerate()
                        .map(|(i, (t, p))| VcpuStats { index: i as u32, time_ns: *t, pcpu: *p, affinity: vec![*p] })
                        .collect(),
                })
                .collect(),
        }
    }

    const S: u64 = 1_000_000_000;

    /// vCPUs that an agent lists out of index order come out in index order, each with its own usage.
    #[test]
    fn vcpus_out_of_order_are_sorted_and_keep_their_usage() {
        let mut a = stats(10 * S, &[("a", 1, &[(0, 0), (0, 1)])]);
        let mut b = stats(12 * S, &[("a", 1, &[(S, 0), (2 * S, 1)])]);
        for h in [&mut a, &mut b] {
            h.domains[0].vcpus.reverse();
        }
        let u = compute(Some(&a), &b).unwrap();
        let got: Vec<(u32, u32, Option<f64>)> = u.vcpus.iter().map(|v| (v.vcpu, v.pcpu, v.usage)).collect();
        assert_eq!(got, vec![(0, 0, Some(50.0)), (1, 1, Some(100.0))]);
    }

    /// The positional fast path must not pair a domain with another one that happens to sit at its old place.
    #[test]
    fn domains_are_matched_by_uuid_whatever_their_order() {
        let a = stats(10 * S, &[("a", 1, &[(0, 0)]), ("b", 2, &[(S, 1)])]);
        let swapped = stats(12 * S, &[("b", 2, &[(2 * S, 1)]), ("a", 1, &[(S / 2, 0)])]);
        let u = compute(Some(&a), &swapped).unwrap();
        let got: Vec<(&str, Option<f64>)> = u.vcpus.iter().map(|v| (&*v.domain, v.usage)).collect();
        assert_eq!(got, vec![("a", Some(25.0)), ("b", Some(50.0))]);
        let replaced = stats(12 * S, &[("a", 1, &[(S, 0)]), ("c", 2, &[(3 * S, 1)])]);
        let u = compute(Some(&a), &replaced).unwrap();
        assert_eq!(u.vcpus[1].usage, None, "c is new even though it has b's place and id");
        assert_eq!(u.fresh, vec![("c".to_string(), "new domain")]);
    }

    /// Reusing the last usage's names and affinities gives the same usage, shares what did not change, and takes
    /// what did change from the new sample.
    #[test]
    fn reusing_the_last_usage_changes_nothing_but_allocations() {
        let a = stats(10 * S, &[("a", 1, &[(0, 0), (0, 1)]), ("b", 2, &[(S, 2)])]);
        let b = stats(12 * S, &[("a", 1, &[(S, 0), (S, 1)]), ("b", 2, &[(2 * S, 2)])]);
        let last = compute(Some(&a), &b).unwrap();
        let mut c = stats(14 * S, &[("a", 1, &[(2 * S, 0), (3 * S, 1)]), ("b", 2, &[(3 * S, 2)])]);
        c.domains[0].vcpus[1].affinity = vec![1, 3];
        let plain = compute(Some(&b), &c).unwrap();
        let reused = compute_reusing(Some(&b), &c, Some(&last)).unwrap();
        assert_eq!(plain, reused);
        assert!(Arc::ptr_eq(&reused.vcpus[0].uuid, &last.vcpus[0].uuid));
        assert!(Arc::ptr_eq(&reused.vcpus[0].affinity, &last.vcpus[0].affinity));
        assert!(!Arc::ptr_eq(&reused.vcpus[1].affinity, &last.vcpus[1].affinity), "a changed affinity is new");
        assert_eq!(*reused.vcpus[1].affinity, [1, 3]);
        // Another set of domains: nothing lines up, and nothing is taken from the wrong vCPU.
        let d = stats(16 * S, &[("b", 2, &[(4 * S, 2)]), ("c", 3, &[(0, 0)])]);
        assert_eq!(compute_reusing(Some(&c), &d, Some(&last)).unwrap(), compute(Some(&c), &d).unwrap());
    }

    #[test]
    fn usage_is_delta_over_elapsed() {
        let a = stats(10 * S, &[("a", 1, &[(0, 0)]), ("b", 2, &[(S, 0), (0, 1)])]);
        let b = stats(12 * S, &[("a", 1, &[(S, 0)]), ("b", 2, &[(2 * S, 0), (S / 2, 1)])]);
        let u = compute(Some(&a), &b).unwrap();
        let got: Vec<f64> = u.vcpus.iter().map(|v| v.usage.unwrap()).collect();
        assert_eq!(got, vec![50.0, 50.0, 25.0]);
        assert_eq!(u.pcpus[0].usage, 100.0);
        assert_eq!(u.pcpus[1].usage, 25.0);
        assert_eq!(u.pcpus[2].usage, 0.0);
        assert!(u.fresh.is_empty());
    }

    #[test]
    fn first_sample_restart_and_stuck_clock_are_baselines() {
        let a = stats(S, &[("a", 1, &[(0, 0)])]);
        assert_eq!(compute(None, &a), Err(BaselineReason::FirstSample));
        let mut b = stats(2 * S, &[("a", 1, &[(S, 0)])]);
        b.agent_instance = "b".into();
        assert_eq!(compute(Some(&a), &b), Err(BaselineReason::AgentRestarted));
        assert_eq!(compute(Some(&a), &stats(S, &[])), Err(BaselineReason::ClockDidNotAdvance));
    }

    #[test]
    fn counters_that_go_backwards_give_a_fresh_baseline() {
        let a = stats(S, &[("a", 1, &[(5 * S, 0)]), ("b", 2, &[(0, 1)])]);
        let b = stats(2 * S, &[("a", 1, &[(S, 0)]), ("b", 2, &[(S / 2, 1)])]);
        let u = compute(Some(&a), &b).unwrap();
        assert_eq!(u.vcpus[0].usage, None);
        assert_eq!(u.fresh, vec![("a".to_string(), "vCPU time went backwards")]);
        assert_eq!(u.pcpus[0].usage, 0.0);
        assert_eq!(u.vcpus[1].usage, Some(50.0));
    }

    #[test]
    fn restarted_new_and_vanished_domains() {
        let a = stats(S, &[("a", 1, &[(0, 0)]), ("gone", 3, &[(0, 0)])]);
        let b = stats(2 * S, &[("a", 7, &[(S, 0)]), ("new", 9, &[(S, 1)])]);
        let u = compute(Some(&a), &b).unwrap();
        assert!(u.vcpus.iter().all(|v| v.usage.is_none()));
        assert_eq!(u.fresh.len(), 2);
        assert!(u.vcpus.iter().all(|v| &*v.domain != "gone"));
    }

    proptest! {
        /// Whatever the counters do, usage is within [0, 100] per vCPU and pCPU usage is the sum of its vCPUs'.
        #[test]
        fn usage_bounded(t0 in 0u64..1_000, dt in 1u64..5_000, times in proptest::collection::vec((0u64..10_000, 0u64..10_000, 0u32..4), 1..12)) {
            let before: Vec<(u64, u32)> = times.iter().map(|t| (t.0 * 1_000_000, t.2)).collect();
            let after: Vec<(u64, u32)> = times.iter().map(|t| (t.1 * 1_000_000, t.2)).collect();
            let a = stats(t0 * 1_000_000, &[("d", 1, &before)]);
            let b = stats((t0 + dt) * 1_000_000, &[("d", 1, &after)]);
            let u = compute(Some(&a), &b).unwrap();
            for v in &u.vcpus {
                if let Some(x) = v.usage { prop_assert!((0.0..=100.0).contains(&x)); }
            }
            for p in &u.pcpus {
                let sum: f64 = u.vcpus.iter().filter(|v| v.pcpu == p.id).filter_map(|v| v.usage).sum();
                prop_assert!((p.usage - sum).abs() < 1e-9);
            }
        }
    }
}
