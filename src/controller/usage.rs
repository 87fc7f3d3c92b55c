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

/// The reason in [`HostUsage::fresh`] of a domain that runs on (same id, times going on) with vCPUs plugged or
/// unplugged: unlike a restart, the affinities of its other vCPUs are what they were.
pub const VCPU_COUNT_CHANGED: &str = "vCPU count changed";

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
    let (prev, elapsed_ns) = elapsed(prev, cur)?;
    Ok(rebuild(prev, cur, elapsed_ns, last))
}

/// The body of [`compute_reusing`], once the two samples are known to be comparable.
fn rebuild(prev: &HostStats, cur: &HostStats, elapsed_ns: u64, last: Option<&HostUsage>) -> HostUsage {
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
            Some(p) if p.vcpus.len() != d.vcpus.len() => Some(VCPU_COUNT_CHANGED),
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
                (None, Some(p)) => Some(vcpu_usage(v.time_ns - p.vcpus[i].time_ns, elapsed_ns)),
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
    u
}

/// One vCPU's usage: `delta_ns` of run time over `elapsed_ns`, in % of one pCPU.
fn vcpu_usage(delta_ns: u64, elapsed_ns: u64) -> f64 {
    (delta_ns as f64 / elapsed_ns as f64 * 100.0).clamp(0.0, MAX_VCPU_USAGE)
}

/// [`compute_reusing`] in `last`'s own storage: when the host has the same domains, vCPUs and affinities as in the
/// last round (most rounds), only each vCPU's usage and pCPU change, so they are written over `last`'s, and no
/// `Arc` is cloned or dropped (that reference counting was about a third of a 64-vCPU host's usage maths, on top of
/// building and freeing the vector). Any other host goes the way of [`compute_reusing`]. The result is the same
/// as [`compute`]'s.
pub fn compute_into(
    prev: Option<&HostStats>,
    cur: &HostStats,
    mut last: HostUsage,
) -> Result<HostUsage, BaselineReason> {
    let (prev, elapsed_ns) = elapsed(prev, cur)?;
    if !update_in_place(prev, cur, elapsed_ns, &mut last) {
        last = rebuild(prev, cur, elapsed_ns, Some(&last));
    }
    Ok(last)
}

/// The time between two samples of one agent, or why they cannot be compared.
fn elapsed<'a>(prev: Option<&'a HostStats>, cur: &HostStats) -> Result<(&'a HostStats, u64), BaselineReason> {
    let prev = prev.ok_or(BaselineReason::FirstSample)?;
    if prev.agent_instance != cur.agent_instance {
        return Err(BaselineReason::AgentRestarted);
    }
    if cur.sample_time_ns <= prev.sample_time_ns {
        return Err(BaselineReason::ClockDidNotAdvance);
    }
    Ok((prev, cur.sample_time_ns - prev.sample_time_ns))
}

/// [`compute_into`]'s usual round: every domain at the same place in `prev`, `cur` and `last`, in the order usage
/// sorts them, with no fresh baseline, and every vCPU with the same index and affinity as in `last`. Writes each
/// vCPU's usage and pCPU into `last` as it checks; on `false` those writes are partial, which is harmless because
/// [`rebuild`] reads only names, UUIDs, indices and affinities from it.
fn update_in_place(prev: &HostStats, cur: &HostStats, elapsed_ns: u64, last: &mut HostUsage) -> bool {
    // `last` is in usage's order (domains by name then UUID, vCPUs by index), so a sample that matches it at every
    // position is in that order too, and needs no sorting.
    let same_shape = prev.domains.len() == cur.domains.len()
        && last.vcpus.len() == cur.domains.iter().map(|d| d.vcpus.len()).sum::<usize>()
        && last.pcpus.len() == cur.online_pcpus.len()
        && last.pcpus.iter().zip(&cur.online_pcpus).all(|(p, &id)| p.id == id);
    if !same_shape {
        return false;
    }
    let mut k = 0;
    for (p, d) in prev.domains.iter().zip(&cur.domains) {
        if p.uuid != d.uuid || p.id != d.id || p.vcpus.len() != d.vcpus.len() {
            return false;
        }
        for (a, v) in p.vcpus.iter().zip(&d.vcpus) {
            let w = &mut last.vcpus[k];
            k += 1;
            if a.index != v.index
                || v.time_ns < a.time_ns
                || w.vcpu != v.index
                || *w.uuid != *d.uuid
                || *w.domain != *d.name
                || *w.affinity != *v.affinity
            {
                return false;
            }
            w.pcpu = v.pcpu;
            w.usage = Some(vcpu_usage(v.time_ns - a.time_ns, elapsed_ns));
        }
    }
    last.elapsed_ns = elapsed_ns;
    last.fresh.clear();
    sum_pcpus(last);
    true
}

/// Sets each pCPU's usage to the sum of its vCPUs' known usages, in one pass over the vCPUs (a host can have a
/// thousand vCPUs on a hundred pCPUs). `u.pcpus` must be sorted by id. Sums start at +0.0: an empty f64 sum is
/// -0.0, which prints as "-0.0".
pub fn sum_pcpus(u: &mut HostUsage) {
    for p in &mut u.pcpus {
        p.usage = 0.0;
    }
    for v in &u.vcpus {
        let Some(x) = v.usage else { continue };
        // Usually every pCPU is online and pCPU n is at place n; the search is for hosts with offline pCPUs.
        let at = match u.pcpus.get(v.pcpu as usize) {
            Some(p) if p.id == v.pcpu => Some(v.pcpu as usize),
            _ => u.pcpus.binary_search_by_key(&v.pcpu, |p| p.id).ok(),
        };
        if let Some(i) = at {
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
            boot_id: String::new(),
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

    /// `compute_into` takes nothing from a last usage that is not this host's last round (other UUIDs under the same
    /// names, other vCPU numbers, another set of domains), nor from a previous sample that does not line up.
    #[test]
    fn compute_into_checks_every_vcpu_against_the_last_usage() {
        let a = stats(10 * S, &[("a", 1, &[(0, 0), (0, 1)]), ("b", 2, &[(0, 2)])]);
        let b = stats(12 * S, &[("a", 1, &[(S, 0), (S, 1)]), ("b", 2, &[(S, 2)])]);
        let want = compute(Some(&a), &b).unwrap();
        let mut other_uuids = want.clone();
        other_uuids.vcpus[2].uuid = "uuid-other".into();
        assert_eq!(compute_into(Some(&a), &b, other_uuids).unwrap(), want);
        let mut other_vcpu = want.clone();
        other_vcpu.vcpus[1].vcpu = 2;
        assert_eq!(compute_into(Some(&a), &b, other_vcpu).unwrap(), want);
        // vCPU 1 unplugged and vCPU 2 plugged between the samples: the same count, other vCPUs.
        let mut a2 = a.clone();
        a2.domains[0].vcpus[1].index = 2;
        assert_eq!(compute_into(Some(&a2), &b, want.clone()).unwrap(), compute(Some(&a2), &b).unwrap());
        // A last usage with a domain more than the samples have.
        let three = |t| stats(t, &[("a", 1, &[(t, 0), (t, 1)]), ("b", 2, &[(t, 2)]), ("c", 3, &[(t, 3)])]);
        let more = compute(Some(&three(10 * S)), &three(12 * S)).unwrap();
        assert_eq!(compute_into(Some(&a), &b, more).unwrap(), want);
        // The last usage is the new sample's, but the previous sample had another domain in that place, or another
        // number of vCPUs, or a domain fewer (one without vCPUs).
        let one = |t, n: &[(u64, u32)]| stats(t, &[("a", 1, n)]);
        let last = compute(Some(&one(8 * S, &[(0, 0)])), &one(10 * S, &[(0, 0)])).unwrap();
        let x = stats(10 * S, &[("x", 1, &[(0, 0)])]);
        let cur = one(12 * S, &[(S, 0)]);
        assert_eq!(compute_into(Some(&x), &cur, last).unwrap(), compute(Some(&x), &cur).unwrap());
        let two = |t| one(t, &[(t, 0), (t, 1)]);
        let last = compute(Some(&two(8 * S)), &two(10 * S)).unwrap();
        let (p, c) = (one(10 * S, &[(0, 0)]), two(12 * S));
        assert_eq!(compute_into(Some(&p), &c, last).unwrap(), compute(Some(&p), &c).unwrap());
        let empty: &[(u64, u32)] = &[];
        let with_b = |t| stats(t, &[("a", 1, &[(t, 0)]), ("b", 2, empty)]);
        let last = compute(Some(&with_b(8 * S)), &with_b(10 * S)).unwrap();
        let (p, c) = (one(10 * S, &[(0, 0)]), with_b(12 * S));
        assert_eq!(compute_into(Some(&p), &c, last).unwrap(), compute(Some(&p), &c).unwrap());
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

    /// One change to a host between two samples, for `compute_into_is_compute`.
    #[derive(Debug, Clone)]
    enum Change {
        Nothing,
        Move(usize, u32),
        Pin(usize, Vec<u32>),
        Restart(usize),
        Remove(usize),
        Add(u32),
        AddVcpu(usize),
        Reverse(usize),
        Unsort,
        Backwards(usize),
        Offline(u32),
        Replug(u32),
        Rename(usize),
        NewInstance,
    }

    fn arb_change() -> impl Strategy<Value = Change> {
        prop_oneof![
            6 => Just(Change::Nothing),
            2 => (0usize..8, 0u32..4).prop_map(|(i, p)| Change::Move(i, p)),
            1 => (0usize..8, proptest::collection::vec(0u32..4, 1..3)).prop_map(|(i, a)| Change::Pin(i, a)),
            1 => (0usize..8).prop_map(Change::Restart),
            1 => (0usize..8).prop_map(Change::Remove),
            1 => (0u32..100).prop_map(Change::Add),
            1 => (0usize..8).prop_map(Change::AddVcpu),
            1 => (0usize..8).prop_map(Change::Reverse),
            1 => Just(Change::Unsort),
            1 => (0usize..8).prop_map(Change::Backwards),
            1 => (0u32..4).prop_map(Change::Offline),
            1 => (0u32..4).prop_map(Change::Replug),
            1 => (0usize..8).prop_map(Change::Rename),
            1 => Just(Change::NewInstance),
        ]
    }

    /// The next sample of `h`, 2 to 3 s later, with every vCPU busier by its own amount, and `change` applied.
    fn next_sample(h: &HostStats, change: &Change, busy: u64) -> HostStats {
        let mut n = h.clone();
        n.sample_time_ns += 2 * S + busy % S;
        for (i, d) in n.domains.iter_mut().enumerate() {
            for v in &mut d.vcpus {
                v.time_ns += busy * (i as u64 + v.index as u64 + 1) % (2 * S);
            }
        }
        let k = n.domains.len().max(1);
        match change.clone() {
            Change::Nothing => {}
            Change::Move(i, p) => {
                if let Some(v) = n.domains.get_mut(i % k).and_then(|d| d.vcpus.first_mut()) {
                    v.pcpu = p;
                }
            }
            Change::Pin(i, a) => {
                if let Some(v) = n.domains.get_mut(i % k).and_then(|d| d.vcpus.last_mut()) {
                    v.affinity = a;
                }
            }
            Change::Restart(i) => {
                if let Some(d) = n.domains.get_mut(i % k) {
                    d.id += 100;
                }
            }
            Change::Remove(i) => {
                if !n.domains.is_empty() {
                    n.domains.remove(i % k);
                }
            }
            Change::Add(x) => {
                let name = format!("d{x:02}");
                if n.domains.iter().all(|d| d.name != name) {
                    let pos = n.domains.partition_point(|d| d.name < name);
                    let vcpus = vec![VcpuStats { index: 0, time_ns: 0, pcpu: x % 4, affinity: vec![x % 4] }];
                    let d = DomainStats { uuid: format!("u-{name}"), name, id: x, cpu_time_ns: 0, vcpus };
                    n.domains.insert(pos, d);
                }
            }
            Change::AddVcpu(i) => {
                if let Some(d) = n.domains.get_mut(i % k) {
                    let index = d.vcpus.len() as u32;
                    d.vcpus.push(VcpuStats { index, time_ns: 0, pcpu: 0, affinity: vec![0, 1] });
                }
            }
            Change::Reverse(i) => {
                if let Some(d) = n.domains.get_mut(i % k) {
                    d.vcpus.reverse();
                }
            }
            Change::Unsort => n.domains.reverse(),
            Change::Backwards(i) => {
                if let Some(v) = n.domains.get_mut(i % k).and_then(|d| d.vcpus.first_mut()) {
                    v.time_ns = 0;
                }
            }
            Change::Offline(p) => n.online_pcpus.retain(|&x| x != p),
            // As many pCPUs online as before, but another one.
            Change::Replug(p) => {
                if let Some(x) = n.online_pcpus.iter_mut().find(|x| **x == p) {
                    *x = p + 4;
                    n.online_pcpus.sort_unstable();
                }
            }
            // The same UUID under a new name, in the same place of the order.
            Change::Rename(i) => {
                if let Some(d) = n.domains.get_mut(i % k) {
                    d.name.push('r');
                }
            }
            Change::NewInstance => n.agent_instance.push('x'),
        }
        n
    }

    proptest! {
        /// Writing a round's usage over the last one gives what computing it afresh gives, over a run of rounds in
        /// which domains come, go, restart, move, are pinned, list their vCPUs out of order, and the agent restarts.
        #[test]
        fn compute_into_is_compute(
            doms in proptest::collection::vec((1usize..4, 0u32..4), 0..6),
            changes in proptest::collection::vec((arb_change(), 1u64..2 * S), 1..12),
        ) {
            let mut cur = HostStats {
                sample_time_ns: 10 * S,
                npcpus: 4,
                online_pcpus: vec![0, 1, 2, 3],
                agent_instance: "a".into(),
                boot_id: String::new(),
                domains: doms
                    .iter()
                    .enumerate()
                    .map(|(i, &(n, p))| DomainStats {
                        uuid: format!("u-{i}"),
                        name: format!("d{i:02}"),
                        id: i as u32 + 1,
                        cpu_time_ns: 0,
                        vcpus: (0..n as u32)
                            .map(|j| VcpuStats { index: j, time_ns: 0, pcpu: (p + j) % 4, affinity: vec![(p + j) % 4] })
                            .collect(),
                    })
                    .collect(),
            };
            let mut last: Option<HostUsage> = None;
            for (change, busy) in &changes {
                let next = next_sample(&cur, change, *busy);
                let want = compute(Some(&cur), &next);
                let got = match last.take() {
                    Some(l) => compute_into(Some(&cur), &next, l),
                    None => compute(Some(&cur), &next),
                };
                prop_assert_eq!(&got, &want, "after {:?}", change);
                // Each pCPU's usage is its vCPUs', found by id whether or not pCPU n is at place n.
                for p in got.iter().flat_map(|u| &u.pcpus) {
                    let u = got.as_ref().unwrap();
                    let sum: f64 = u.vcpus.iter().filter(|v| v.pcpu == p.id).filter_map(|v| v.usage).sum();
                    prop_assert!((p.usage - sum).abs() < 1e-9, "pCPU {} after {:?}", p.id, change);
                }
                last = got.ok();
                cur = next;
            }
        }

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
