//! Transport-neutral domain types shared by the agent, its backends and the controller.
//!
//! Nothing here knows about protobuf: `convert.rs` is the only place that maps these to and from the wire types, so
//! the policy and the backends can be tested without gRPC.

use serde::{Deserialize, Serialize};

/// Index of a physical CPU on a host.
pub type PcpuId = u32;

/// What an agent's host is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    /// `libvirt` or `sim`.
    pub backend: String,
    pub hypervisor_version: String,
    pub library_version: String,
    /// Valid pCPU ids are `0..npcpus`.
    pub npcpus: u32,
    /// Only these pCPUs may be pin targets.
    pub online_pcpus: Vec<PcpuId>,
    pub agent_version: String,
}

/// A running domain, as `ListDomains` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSummary {
    pub name: String,
    pub uuid: String,
    pub id: u32,
    pub vcpus: u32,
    pub state: String,
}

/// One vCPU in one sample.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStats {
    pub index: u32,
    /// Cumulative run time in ns.
    pub time_ns: u64,
    /// The pCPU the vCPU runs on now.
    pub pcpu: PcpuId,
    /// The pCPUs it may run on, sorted, no duplicates.
    pub affinity: Vec<PcpuId>,
}

/// One running domain in one sample.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainStats {
    pub uuid: String,
    pub name: String,
    /// Hypervisor id; a new id means the domain restarted.
    pub id: u32,
    /// Cumulative CPU time of the whole domain in ns.
    pub cpu_time_ns: u64,
    pub vcpus: Vec<VcpuStats>,
}

/// Everything one round needs from one host, taken at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStats {
    /// The agent's monotonic clock at the sample, in ns.
    pub sample_time_ns: u64,
    pub npcpus: u32,
    pub online_pcpus: Vec<PcpuId>,
    /// Changes when the agent restarts (its monotonic clock restarts with it).
    pub agent_instance: String,
    /// The host's boot, as the agent read it (empty: unknown). A new value means every domain restarted.
    #[serde(default)]
    pub boot_id: String,
    pub domains: Vec<DomainStats>,
}

/// Where one vCPU runs and may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuPlacement {
    pub index: u32,
    pub pcpu: PcpuId,
    pub affinity: Vec<PcpuId>,
}

/// Placement of every vCPU of one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainPlacement {
    pub name: String,
    pub uuid: String,
    pub vcpus: Vec<VcpuPlacement>,
}

/// A request to pin one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRequest {
    /// Domain name or UUID.
    pub domain: String,
    pub vcpu: u32,
    /// Target pCPUs; one element pins to one pCPU.
    pub pcpus: Vec<PcpuId>,
    /// Also persist in the domain's config.
    pub persist: bool,
}

/// Parses a pCPU list such as `0-3,6,8-9` (the `virsh`/cpuset syntax).
pub fn parse_cpu_list(s: &str) -> Result<Vec<PcpuId>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!("empty element in pCPU list {s:?}"));
        }
        let bad = || format!("invalid pCPU list {s:?}: {part:?} is not a number or a range a-b");
        if let Some((a, b)) = part.split_once('-') {
            let a: PcpuId = a.trim().parse().map_err(|_| bad())?;
            let b: PcpuId = b.trim().parse().map_err(|_| bad())?;
            if a > b {
                return Err(format!("invalid pCPU range {part:?} in {s:?}: start after end"));
            }
            if b - a > 65_535 {
                return Err(format!("pCPU range {part:?} is too large"));
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| bad())?);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Formats a sorted pCPU list compactly (`0-3,6`).
pub fn format_cpu_list(cpus: &[PcpuId]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_ranges_and_singles() {
        assert_eq!(parse_cpu_list("0-2,5, 7").unwrap(), vec![0, 1, 2, 5, 7]);
        assert_eq!(parse_cpu_list("3,1,3").unwrap(), vec![1, 3]);
    }

    #[test]
    fn refuses_garbage() {
        for bad in ["", "a", "1-", "3-1", "1,,2", "-1"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(mut v in proptest::collection::vec(0u32..200, 1..40)) {
            v.sort_unstable();
            v.dedup();
            prop_assert_eq!(parse_cpu_list(&format_cpu_list(&v)).unwrap(), v);
        }
    }
}
