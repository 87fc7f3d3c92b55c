//! The simulated host: pure state advanced by an explicit clock, so it runs in real or virtual time alike.
//!
//! Rules of the model:
//! - Each pCPU has 100 % capacity, shared max-min fairly (water-filling) among the vCPUs on it: a vCPU asking less
//!   than an equal share gets all it asks, the rest is split evenly among the others.
//! - A vCPU's demand is its domain's load profile (same for every vCPU of the domain) at the time since the domain
//!   started.
//! - Where a vCPU runs: on its affinity's only pCPU when pinned to one. An unpinned vCPU (affinity of several
//!   pCPUs) stays on the pCPU it runs on as long as that pCPU is in its affinity; when it needs a place (at start, or
//!   when its affinity no longer contains its pCPU) it goes to the pCPU of its affinity that holds the fewest vCPUs,
//!   lowest id on ties. The simulator never migrates vCPUs on its own, unlike Linux's scheduler: moving load is the
//!   balancer's job, and this keeps every run reproducible.
//! - Cumulative vCPU times are integrated exactly between events (pins, phase changes, samples); pins take effect
//!   at once.
//! - With `noise` (points), each sample reports every vCPU's time increment since the previous sample changed by a
//!   uniform, zero-mean, seeded amount of at most `noise` % of the window (never below zero, so counters never go
//!   back). The exact times stay available ([`SimHost::stats_exact`]) so an evaluation can judge the true balance.

use crate::error::AgentError;
use crate::hypervisor::sim::rng::SplitMix64;
use crate::hypervisor::sim::scenario::{DomainSpec, LoadProfile, Scenario};
use crate::hypervisor::{validate_pin, VcpuNumbers};
use crate::model::{DomainPlacement, DomainStats, DomainSummary, PcpuId, PinRequest, VcpuPlacement, VcpuStats};

const NS_PER_SEC: f64 = 1e9;

#[derive(Debug, Clone)]
struct SimVcpu {
    affinity: Vec<PcpuId>,
    /// The affinity in the domain's config: what a restart brings back (pins with `persist` change it).
    config: Vec<PcpuId>,
    pcpu: PcpuId,
    time_ns: f64,
    /// What samples report (equals `time_ns` without noise).
    reported_ns: f64,
    /// `time_ns` at the previous sample, to perturb only the increment.
    sampled_ns: f64,
}

#[derive(Debug, Clone)]
struct SimDomain {
    name: String,
    uuid: String,
    /// `uuid` read once, so that a lookup by UUID (once per pin) compares bytes instead of reparsing every domain's.
    uuid_bytes: Option<[u8; 16]>,
    id: u32,
    load: LoadProfile,
    /// Model time the domain (re)started, in ns.
    started_ns: u64,
    vcpus: Vec<SimVcpu>,
}

/// A simulated hypervisor host.
#[derive(Debug, Clone)]
pub struct SimHost {
    npcpus: u32,
    domains: Vec<SimDomain>,
    now_ns: u64,
    next_id: u32,
    noise: f64,
    rng: SplitMix64,
    last_sample_ns: u64,
}

/// A deterministic UUID for a domain name, so runs and tests are reproducible.
fn uuid_for(name: &str, salt: u64) -> String {
    // Two FNV-1a passes with different seeds give 128 bits; collisions don't matter for a simulator.
    let fnv = |seed: u64| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
        for b in name.bytes().chain(salt.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    };
    let (a, b) = (fnv(1), fnv(2));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0xfff,
        b & 0xffff_ffff_ffff
    )
}

/// Max-min fair shares of one pCPU (capacity 1.0) for `demands` (fractions of a pCPU), in the same order.
pub fn fair_shares(demands: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|&a, &b| demands[a].total_cmp(&demands[b]));
    let mut out = vec![0.0; demands.len()];
    let mut remaining = 1.0_f64;
    let mut left = demands.len();
    for i in order {
        let share = remaining / left as f64;
        let got = demands[i].clamp(0.0, 1.0).min(share);
        out[i] = got;
        remaining = (remaining - got).max(0.0);
        left -= 1;
    }
    out
}

impl SimHost {
    /// A host in the state the scenario describes, at model time `now_ns`.
    pub fn new(scenario: &Scenario, now_ns: u64) -> SimHost {
        let mut host = SimHost {
            npcpus: scenario.pcpus,
            domains: Vec::new(),
            now_ns,
            next_id: 1,
            noise: scenario.noise,
            rng: SplitMix64::new(scenario.seed),
            last_sample_ns: now_ns,
        };
        for spec in &scenario.domains {
            host.add_domain(spec, now_ns).expect("scenario was validated against its own pCPU count");
        }
        host
    }

    pub fn npcpus(&self) -> u32 {
        self.npcpus
    }

    /// Model time of the last event, in ns.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    fn online(&self) -> Vec<PcpuId> {
        (0..self.npcpus).collect()
    }

    /// The pCPU of `affinity` holding the fewest vCPUs, lowest id on ties.
    fn least_crowded(&self, affinity: &[PcpuId]) -> PcpuId {
        let mut count = vec![0usize; self.npcpus as usize];
        for d in &self.domains {
            for v in &d.vcpus {
                count[v.pcpu as usize] += 1;
            }
        }
        *affinity.iter().min_by_key(|&&p| (count[p as usize], p)).expect("affinity is never empty")
    }

    /// Starts a domain (as `virsh create` would). Its vCPUs start at 0 ns.
    pub fn add_domain(&mut self, spec: &DomainSpec, now_ns: u64) -> Result<(), AgentError> {
        self.advance_to(now_ns);
        if self.domains.iter().any(|d| d.name == spec.name) {
            return Err(AgentError::InvalidArgument(format!("domain {:?} already exists", spec.name)));
        }
        let affinity = spec.affinity.clone().unwrap_or_else(|| self.online());
        if let Some(&bad) = affinity.iter().find(|&&p| p >= self.npcpus) {
            return Err(AgentError::InvalidArgument(format!("affinity names pCPU {bad}, host has {}", self.npcpus)));
        }
        let id = self.next_id;
        self.next_id += 1;
        let uuid = spec.uuid.clone().unwrap_or_else(|| uuid_for(&spec.name, 0));
        let mut dom = SimDomain {
            name: spec.name.clone(),
            uuid_bytes: crate::hypervisor::parse_uuid(&uuid),
            uuid,
            id,
            load: spec.load.clone(),
            started_ns: self.now_ns,
            vcpus: Vec::new(),
        };
        for _ in 0..spec.vcpus {
            // Place one at a time so that a domain's own vCPUs spread too.
            let pcpu = self.least_crowded_with(&affinity, &dom);
            dom.vcpus.push(SimVcpu { affinity: affinity.clone(), config: affinity.clone(), pcpu, time_ns: 0.0, reported_ns: 0.0, sampled_ns: 0.0 });
        }
        self.domains.push(dom);
        Ok(())
    }

    fn least_crowded_with(&self, affinity: &[PcpuId], extra: &SimDomain) -> PcpuId {
        let mut count = vec![0usize; self.npcpus as usize];
        for v in self.domains.iter().chain(std::iter::once(extra)).flat_map(|d| &d.vcpus) {
            count[v.pcpu as usize] += 1;
        }
        *affinity.iter().min_by_key(|&&p| (count[p as usize], p)).expect("affinity is never empty")
    }

    /// Stops a domain (as `virsh destroy` would).
    pub fn remove_domain(&mut self, name: &str, now_ns: u64) -> Result<(), AgentError> {
        self.advance_to(now_ns);
        let before = self.domains.len();
        self.domains.retain(|d| d.name != name);
        if self.domains.len() == before {
            return Err(AgentError::DomainNotFound { domain: name.to_string() });
        }
        Ok(())
    }

    /// Restarts a domain (as a reboot would): new id, vCPU times back to 0, affinity back to the config (the
    /// scenario's, or the last pin made with `persist`).
    pub fn restart_domain(&mut self, name: &str, now_ns: u64) -> Result<(), AgentError> {
        self.advance_to(now_ns);
        let di = self
            .domains
            .iter()
            .position(|d| d.name == name)
            .ok_or_else(|| AgentError::DomainNotFound { domain: name.to_string() })?;
        let d = &mut self.domains[di];
        d.id = self.next_id;
        d.started_ns = self.now_ns;
        self.next_id += 1;
        for v in &mut d.vcpus {
            v.time_ns = 0.0;
            v.reported_ns = 0.0;
            v.sampled_ns = 0.0;
        }
        // Like libvirt, a restart starts from the config: live-only pins are gone.
        for vi in 0..self.domains[di].vcpus.len() {
            let config = self.domains[di].vcpus[vi].config.clone();
            self.set_affinity(di, vi, config);
        }
        Ok(())
    }

    /// Gives vCPU `vi` of domain `di` a new affinity; if it runs outside it, it moves to its first pCPU, or with
    /// several targets to the one the model's placement rule picks among them.
    fn set_affinity(&mut self, di: usize, vi: usize, affinity: Vec<PcpuId>) {
        let v = &mut self.domains[di].vcpus[vi];
        v.affinity = affinity;
        if !v.affinity.contains(&v.pcpu) {
            v.pcpu = v.affinity[0];
            if v.affinity.len() > 1 {
                let aff = v.affinity.clone();
                let pcpu = self.least_crowded(&aff);
                self.domains[di].vcpus[vi].pcpu = pcpu;
            }
        }
    }

    /// Changes a domain's load from now on.
    pub fn set_load(&mut self, name: &str, load: LoadProfile, now_ns: u64) -> Result<(), AgentError> {
        self.advance_to(now_ns);
        let d = self
            .domains
            .iter_mut()
            .find(|d| d.name == name)
            .ok_or_else(|| AgentError::DomainNotFound { domain: name.to_string() })?;
        d.load = load;
        Ok(())
    }

    /// Integrates vCPU times up to `now_ns`. Times before the last event are ignored (the clock never goes back).
    pub fn advance_to(&mut self, now_ns: u64) {
        // A pCPU whose vCPUs ask for less than all of it gives each its whole demand: `fair_shares` would return the
        // demands unchanged (bit for bit, with this margin), so only oversubscribed pCPUs pay for it. Simulated
        // fleets sample often: the sorting and allocating was about 6 % of their agents' CPU (BENCHMARKS.md, run 5).
        const ROOM: f64 = 1e-9;
        let npcpus = self.npcpus as usize;
        let mut total = vec![0.0_f64; npcpus];
        let mut demand = vec![0.0_f64; self.domains.len()];
        while self.now_ns < now_ns {
            let t = self.now_ns;
            // Demands are constant until the earliest phase change of any domain.
            let mut until = now_ns;
            total.iter_mut().for_each(|x| *x = 0.0);
            for (d, want) in self.domains.iter().zip(demand.iter_mut()) {
                let since = (t - d.started_ns) as f64 / NS_PER_SEC;
                let (load, left) = d.load.at(since);
                if let Some(left) = left {
                    let end = t + ((left * NS_PER_SEC).ceil() as u64).max(1);
                    until = until.min(end);
                }
                *want = load / 100.0;
                for v in &d.vcpus {
                    total[v.pcpu as usize] += want.clamp(0.0, 1.0);
                }
            }
            let dt = (until - t) as f64;
            let mut oversubscribed: Vec<Vec<(usize, usize, f64)>> = Vec::new();
            for (di, (d, &want)) in self.domains.iter_mut().zip(&demand).enumerate() {
                for (vi, v) in d.vcpus.iter_mut().enumerate() {
                    let p = v.pcpu as usize;
                    if total[p] <= 1.0 - ROOM {
                        v.time_ns += want.clamp(0.0, 1.0) * dt;
                    } else {
                        if oversubscribed.is_empty() {
                            oversubscribed = vec![Vec::new(); npcpus];
                        }
                        oversubscribed[p].push((di, vi, want));
                    }
                }
            }
            for on_cpu in &oversubscribed {
                let demands: Vec<f64> = on_cpu.iter().map(|x| x.2).collect();
                for (&(di, vi, _), share) in on_cpu.iter().zip(fair_shares(&demands)) {
                    self.domains[di].vcpus[vi].time_ns += share * dt;
                }
            }
            self.now_ns = until;
        }
    }

    /// Running domains.
    pub fn list(&self) -> Vec<DomainSummary> {
        let mut out: Vec<DomainSummary> = self
            .domains
            .iter()
            .map(|d| DomainSummary {
                name: d.name.clone(),
                uuid: d.uuid.clone(),
                id: d.id,
                vcpus: d.vcpus.len() as u32,
                state: "running".into(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// A sample of every domain at `now_ns`, with the scenario's measurement noise if it has some.
    pub fn stats(&mut self, now_ns: u64) -> Vec<DomainStats> {
        self.advance_to(now_ns);
        let window = (self.now_ns - self.last_sample_ns.min(self.now_ns)) as f64;
        self.last_sample_ns = self.now_ns;
        for d in &mut self.domains {
            for v in &mut d.vcpus {
                if self.noise > 0.0 {
                    let jitter = self.rng.range_f64(-1.0, 1.0) * self.noise / 100.0 * window;
                    v.reported_ns += (v.time_ns - v.sampled_ns + jitter).max(0.0);
                } else {
                    v.reported_ns = v.time_ns;
                }
                v.sampled_ns = v.time_ns;
            }
        }
        self.sample(|v| v.reported_ns)
    }

    /// A sample of every domain at `now_ns` with the exact times, whatever the noise; it does not count as a
    /// sample for the noise.
    pub fn stats_exact(&mut self, now_ns: u64) -> Vec<DomainStats> {
        self.advance_to(now_ns);
        self.sample(|v| v.time_ns)
    }

    fn sample(&self, time: impl Fn(&SimVcpu) -> f64) -> Vec<DomainStats> {
        let mut out: Vec<DomainStats> = self
            .domains
            .iter()
            .map(|d| {
                let vcpus: Vec<VcpuStats> = d
                    .vcpus
                    .iter()
                    .enumerate()
                    .map(|(i, v)| VcpuStats {
                        index: i as u32,
                        time_ns: time(v) as u64,
                        pcpu: v.pcpu,
                        affinity: v.affinity.clone(),
                    })
                    .collect();
                DomainStats {
                    uuid: d.uuid.clone(),
                    name: d.name.clone(),
                    id: d.id,
                    cpu_time_ns: d.vcpus.iter().map(|v| time(v) as u64).sum(),
                    vcpus,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// As libvirt finds a domain: by UUID when the key reads as one (in any of the forms libvirt accepts), else, or
    /// when no domain has that UUID, by name.
    fn find(&self, domain: &str) -> Result<usize, AgentError> {
        let by_uuid = crate::hypervisor::parse_uuid(domain)
            .and_then(|u| self.domains.iter().position(|d| d.uuid_bytes == Some(u)));
        by_uuid
            .or_else(|| self.domains.iter().position(|d| d.name == domain))
            .ok_or_else(|| AgentError::DomainNotFound { domain: domain.to_string() })
    }

    /// Placement of one domain, by name or UUID.
    pub fn placement(&self, domain: &str) -> Result<DomainPlacement, AgentError> {
        let d = &self.domains[self.find(domain)?];
        Ok(DomainPlacement {
            name: d.name.clone(),
            uuid: d.uuid.clone(),
            vcpus: d
                .vcpus
                .iter()
                .enumerate()
                .map(|(i, v)| VcpuPlacement { index: i as u32, pcpu: v.pcpu, affinity: v.affinity.clone() })
                .collect(),
        })
    }

    /// Validates the whole batch, then applies it at `now_ns` (see [`crate::hypervisor::Hypervisor::apply_pins`]).
    pub fn apply_pins(
        &mut self,
        pins: &[PinRequest],
        now_ns: u64,
    ) -> Result<Vec<Result<(), AgentError>>, AgentError> {
        let online = self.online();
        let checks: Vec<Result<usize, AgentError>> = pins
            .iter()
            .map(|p| {
                // Errors name the domain as the caller did, as libvirt's do.
                let di = self.find(&p.domain).map_err(|e| {
                    crate::hypervisor::validate_pcpus(p, &p.domain, self.npcpus, &online).err().unwrap_or(e)
                })?;
                let d = &self.domains[di];
                validate_pin(p, &p.domain, VcpuNumbers::Count(d.vcpus.len() as u32), self.npcpus, &online)?;
                Ok(di)
            })
            .collect();
        let verdicts: Vec<Result<(), AgentError>> = checks.iter().map(|c| c.clone().map(|_| ())).collect();
        crate::hypervisor::batch_verdict(&verdicts)?;
        self.advance_to(now_ns);
        for (p, c) in pins.iter().zip(&checks) {
            if let Ok(di) = c {
                if p.persist {
                    self.domains[*di].vcpus[p.vcpu as usize].config.clone_from(&p.pcpus);
                }
                self.set_affinity(*di, p.vcpu as usize, p.pcpus.clone());
            }
        }
        Ok(verdicts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;

    fn host(text: &str) -> SimHost {
        SimHost::new(&Scenario::parse(text, "t").unwrap(), 0)
    }

    fn usage(h: &mut SimHost, from: u64, to: u64) -> Vec<(String, f64)> {
        let a = h.stats(from);
        let b = h.stats(to);
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x.name.clone(), (y.vcpus[0].time_ns - x.vcpus[0].time_ns) as f64 / (to - from) as f64 * 100.0))
            .collect()
    }

    #[test]
    fn fair_share_water_fills() {
        let s = fair_shares(&[0.2, 1.0, 1.0]);
        assert!((s[0] - 0.2).abs() < 1e-9 && (s[1] - 0.4).abs() < 1e-9 && (s[2] - 0.4).abs() < 1e-9);
        let s = fair_shares(&[0.3, 0.3]);
        assert!((s[0] - 0.3).abs() < 1e-9);
    }

    #[test]
    fn shared_pcpu_is_split_fairly() {
        let mut h = host("pcpus = 2\n[[domain]]\nname=\"a\"\nload=100\naffinity=[0]\n[[domain]]\nname=\"b\"\nload=30\naffinity=[0]\n[[domain]]\nname=\"c\"\nload=50\naffinity=[1]\n");
        let u = usage(&mut h, 0, 10 * S);
        assert!((u[0].1 - 70.0).abs() < 1e-6, "{u:?}");
        assert!((u[1].1 - 30.0).abs() < 1e-6, "{u:?}");
        assert!((u[2].1 - 50.0).abs() < 1e-6, "{u:?}");
    }

    #[test]
    fn pins_take_effect_at_once() {
        let mut h = host("pcpus = 2\n[[domain]]\nname=\"a\"\nload=100\naffinity=[0]\n[[domain]]\nname=\"b\"\nload=100\naffinity=[0]\n");
        let u = usage(&mut h, 0, 2 * S);
        assert!((u[0].1 - 50.0).abs() < 1e-6);
        let pin = PinRequest { domain: "b".into(), vcpu: 0, pcpus: vec![1], persist: false };
        assert!(h.apply_pins(&[pin], 2 * S).unwrap()[0].is_ok());
        let u = usage(&mut h, 2 * S, 4 * S);
        assert!((u[0].1 - 100.0).abs() < 1e-6 && (u[1].1 - 100.0).abs() < 1e-6, "{u:?}");
        assert_eq!(h.placement("b").unwrap().vcpus[0].pcpu, 1);
    }

    #[test]
    fn phases_change_demand_on_time() {
        let mut h = host("pcpus = 1\n[[domain]]\nname=\"a\"\nphases=[{load=100,secs=2},{load=20,secs=2}]\n");
        assert!((usage(&mut h, 0, 2 * S)[0].1 - 100.0).abs() < 1e-6);
        assert!((usage(&mut h, 2 * S, 4 * S)[0].1 - 20.0).abs() < 1e-6);
        assert!((usage(&mut h, 4 * S, 5 * S)[0].1 - 100.0).abs() < 1e-6);
        // A window across a boundary averages exactly.
        assert!((usage(&mut h, 5 * S, 7 * S)[0].1 - 60.0).abs() < 1e-6);
    }

    #[test]
    fn unpinned_vcpus_spread_by_count_and_stay() {
        let mut h = host("pcpus = 2\n[[domain]]\nname=\"a\"\nload=10\n[[domain]]\nname=\"b\"\nload=10\n[[domain]]\nname=\"c\"\nload=10\nvcpus=2\n");
        let s = h.stats(S);
        let pcpus: Vec<u32> = s.iter().flat_map(|d| d.vcpus.iter().map(|v| v.pcpu)).collect();
        assert_eq!(pcpus, vec![0, 1, 0, 1]);
        assert!(s.iter().all(|d| d.vcpus.iter().all(|v| v.affinity == vec![0, 1])));
    }

    #[test]
    fn invalid_batch_changes_nothing() {
        let mut h = host("pcpus = 2\n[[domain]]\nname=\"a\"\nload=10\naffinity=[0]\nvcpus=2\n");
        let good = PinRequest { domain: "a".into(), vcpu: 0, pcpus: vec![1], persist: false };
        let bad = PinRequest { domain: "a".into(), vcpu: 2, pcpus: vec![1], persist: false };
        let err = h.apply_pins(&[good.clone(), bad], S).unwrap_err();
        assert!(matches!(err, AgentError::VcpuOutOfRange { .. }));
        assert_eq!(h.placement("a").unwrap().vcpus[0].affinity, vec![0]);
        let gone = PinRequest { domain: "zz".into(), ..good.clone() };
        let r = h.apply_pins(&[gone, good], S).unwrap();
        assert!(matches!(r[0], Err(AgentError::DomainNotFound { .. })) && r[1].is_ok());
        assert_eq!(h.placement("a").unwrap().vcpus[0].pcpu, 1);
    }

    #[test]
    fn restart_resets_times_and_id() {
        let mut h = host("pcpus = 1\n[[domain]]\nname=\"a\"\nload=50\n");
        let before = h.stats(4 * S)[0].clone();
        h.restart_domain("a", 4 * S).unwrap();
        let after = h.stats(5 * S)[0].clone();
        assert_ne!(before.id, after.id);
        assert!(after.vcpus[0].time_ns < before.vcpus[0].time_ns);
        assert_eq!(before.uuid, h.placement(&before.uuid).unwrap().uuid);
    }

    #[test]
    fn restart_brings_back_the_config_affinity_and_keeps_persisted_pins() {
        let mut h = host("pcpus = 4\n[[domain]]\nname=\"a\"\nvcpus=2\naffinity=[0]\nload=50\n");
        let pin = |vcpu, pcpu, persist| PinRequest { domain: "a".into(), vcpu, pcpus: vec![pcpu], persist };
        h.apply_pins(&[pin(0, 2, false), pin(1, 3, true)], S).unwrap();
        h.restart_domain("a", 2 * S).unwrap();
        let p = h.placement("a").unwrap();
        // The live-only pin is gone, as on libvirt; the persisted one is the config now.
        assert_eq!((p.vcpus[0].pcpu, p.vcpus[0].affinity.clone()), (0, vec![0]));
        assert_eq!((p.vcpus[1].pcpu, p.vcpus[1].affinity.clone()), (3, vec![3]));
    }

    #[test]
    fn noise_is_bounded_seeded_and_leaves_exact_times_alone() {
        let text = "pcpus = 1\nnoise = 5\nseed = 3\n[[domain]]\nname=\"a\"\nload=50\n";
        let run = || {
            let mut h = host(text);
            (1..=50u64).map(|k| { let s = h.stats(k * S); (s[0].vcpus[0].time_ns, h.stats_exact(k * S)[0].vcpus[0].time_ns) }).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run(), "same seed, same samples");
        let mut prev = (0u64, 0u64);
        let mut differs = false;
        for &(noisy, exact) in &a {
            let u = (noisy - prev.0) as f64 / S as f64 * 100.0;
            assert!((45.0 - 1e-6..=55.0 + 1e-6).contains(&u), "usage {u} outside 50 +- 5");
            assert_eq!(exact - prev.1, S / 2, "exact times are untouched");
            differs |= (u - 50.0).abs() > 0.1;
            prev = (noisy, exact);
        }
        assert!(differs, "noise = 5 changed nothing");
        let mut quiet = host("pcpus = 1\n[[domain]]\nname=\"a\"\nload=50\n");
        assert_eq!(quiet.stats(S)[0].vcpus[0].time_ns, S / 2);
    }

    proptest! {
        /// A pCPU never gives out more than its capacity, and nobody gets more than they ask.
        #[test]
        fn fair_shares_are_feasible(d in proptest::collection::vec(0.0f64..=1.0, 1..20)) {
            let s = fair_shares(&d);
            prop_assert!(s.iter().sum::<f64>() <= 1.0 + 1e-9);
            for (x, y) in s.iter().zip(&d) {
                prop_assert!(*x <= *y + 1e-12 && *x >= 0.0);
            }
            // Work-conserving: either everyone is served or the pCPU is full.
            let total: f64 = d.iter().sum();
            prop_assert!((s.iter().sum::<f64>() - total.min(1.0)).abs() < 1e-9);
        }

        // `advance_to` skips `fair_shares` on pCPUs with room to spare; the times must be those of water-filling
        // every pCPU, to the bit, so that `evaluate` and the simulated agents are unchanged by the shortcut. Loads of
        // 20, 25, 33.3 and 50 fill a pCPU exactly, where rounding would tell the two apart.
        #[test]
        fn advance_gives_every_vcpu_its_fair_share(
            pcpus in 1u32..5,
            doms in proptest::collection::vec(
                (prop_oneof![Just(20.0), Just(25.0), Just(100.0 / 3.0), Just(50.0), 0.0f64..=100.0], 1u32..3, 0u32..5,
                 proptest::option::of((0.0f64..100.0, 0.5f64..3.0))),
                1..10),
            steps in proptest::collection::vec(1u64..3_000_000_000, 1..6),
        ) {
            let mut text = format!("pcpus = {pcpus}\n");
            for (i, (load, vcpus, pin, phase)) in doms.iter().enumerate() {
                let load_line = match phase {
                    None => format!("load = {load}"),
                    Some((l2, secs)) => {
                        format!("phases = [{{load = {load}, secs = {secs}}}, {{load = {l2}, secs = 1.5}}]")
                    }
                };
                let pin = pin % pcpus;
                text += &format!("[[domain]]\nname = \"d{i}\"\n{load_line}\nvcpus = {vcpus}\naffinity = [{pin}]\n");
            }
            let mut fast = host(&text);
            let mut slow = fast.clone();
            let mut now = 0;
            for dt in steps {
                now += dt;
                fast.advance_to(now);
                water_fill_to(&mut slow, now);
                for (a, b) in fast.domains.iter().zip(&slow.domains) {
                    for (x, y) in a.vcpus.iter().zip(&b.vcpus) {
                        prop_assert_eq!(x.time_ns.to_bits(), y.time_ns.to_bits(), "{} at {}", a.name, now);
                    }
                }
            }
        }
    }

    /// `advance_to` without its shortcut: `fair_shares` on every pCPU.
    fn water_fill_to(h: &mut SimHost, now_ns: u64) {
        while h.now_ns < now_ns {
            let t = h.now_ns;
            let mut until = now_ns;
            let mut by_pcpu: Vec<Vec<(usize, usize, f64)>> = vec![Vec::new(); h.npcpus as usize];
            for (di, d) in h.domains.iter().enumerate() {
                let (load, left) = d.load.at((t - d.started_ns) as f64 / NS_PER_SEC);
                if let Some(left) = left {
                    until = until.min(t + ((left * NS_PER_SEC).ceil() as u64).max(1));
                }
                for (vi, v) in d.vcpus.iter().enumerate() {
                    by_pcpu[v.pcpu as usize].push((di, vi, load / 100.0));
                }
            }
            let dt = (until - t) as f64;
            for on_cpu in &by_pcpu {
                let demands: Vec<f64> = on_cpu.iter().map(|x| x.2).collect();
                for (&(di, vi, _), share) in on_cpu.iter().zip(fair_shares(&demands)) {
                    h.domains[di].vcpus[vi].time_ns += share * dt;
                }
            }
            h.now_ns = until;
        }
    }
}
