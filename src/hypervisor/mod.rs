//! The `Hypervisor` trait: what the agent needs from a host, implemented by the libvirt backend (production) and by
//! the simulator (demo, evaluation, tests of the controller on any machine).
//!
//! The gRPC service in `agent` is generic over this trait and never touches a backend's internals. Backends share
//! the pin validation rules below, so both refuse exactly the same requests.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::AgentError;
use crate::model::{DomainPlacement, DomainSummary, HostInfo, HostStats, PcpuId, PinRequest};

#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod instrumented;
pub mod sim;

/// Default for the longest any one libvirt backend call (a whole stats sample included) may take before the agent
/// answers UNAVAILABLE (`vcpu-agent --libvirt-timeout`). libvirt has no per-call timeout: a daemon that hangs
/// without dying would otherwise hold RPCs until keepalive gives up (about 20 s), and an open to it forever. Here and
/// not in `libvirt` so that the agent's flag has its default in builds without libvirt too.
pub const LIBVIRT_CALL_DEADLINE: Duration = Duration::from_secs(5);

/// Shortest libvirt call deadline accepted: below it a healthy host's calls would time out (a sample of 32 busy guests
/// takes tens of milliseconds).
pub const MIN_LIBVIRT_CALL_DEADLINE: Duration = Duration::from_millis(100);

/// One result per pin of a batch, in request order.
pub type PinResults = Vec<Result<(), AgentError>>;

/// A host whose domains' vCPUs can be observed and pinned.
#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// Host facts: hostname, backend name, versions, pCPUs.
    async fn host_info(&self) -> Result<HostInfo, AgentError>;

    /// Running domains.
    async fn list_domains(&self) -> Result<Vec<DomainSummary>, AgentError>;

    /// One sample of every running domain, as one round needs it. `agent_instance` may be left empty: the service
    /// fills it.
    async fn stats(&self) -> Result<HostStats, AgentError>;

    /// Placement of one domain's vCPUs; `domain` is a name or a UUID.
    async fn placement(&self, domain: &str) -> Result<DomainPlacement, AgentError>;

    /// Applies a batch of pins. The whole batch is validated first: if any pin has an invalid argument (vCPU or
    /// pCPU out of range, pCPU offline, empty list) the call returns that error and applies nothing. A pin whose
    /// domain is unknown or not running gets its own error in the result list and the others are applied.
    async fn apply_pins(&self, pins: &[PinRequest]) -> Result<PinResults, AgentError>;
}

/// The vCPU numbers a pin may name in one domain.
#[derive(Debug, Clone, Copy)]
pub enum VcpuNumbers<'a> {
    /// `0..n`.
    Count(u32),
    /// The running vCPUs' numbers, in order. After a vCPU hot-unplug (or with `<vcpus>` enabling some), libvirt
    /// numbers them with gaps: 0 and 3 of 4, say.
    Online(&'a [u32]),
}

/// The 16 bytes of `key` read as a UUID the way libvirt reads one (`virUUIDParse`): 32 hex digits in pairs, with
/// dashes (or spaces) allowed between pairs, not inside one, and surrounding white space. `None` if it is not a UUID
/// by that rule; such a key can only be a name. Both backends look domains up by it first, then by name.
pub fn parse_uuid(key: &str) -> Option<[u8; 16]> {
    let b = key.trim().as_bytes();
    let mut out = [0u8; 16];
    let (mut i, mut n) = (0, 0);
    while n < 16 {
        match b.get(i)? {
            b'-' | b' ' => i += 1,
            _ => {
                let hi = (*b.get(i)? as char).to_digit(16)?;
                let lo = (*b.get(i + 1)? as char).to_digit(16)?;
                out[n] = (hi * 16 + lo) as u8;
                n += 1;
                i += 2;
            }
        }
    }
    (i == b.len()).then_some(out)
}

/// What an agent says of a pin batch that libvirt did not answer in time: its pins may still be applied, so a caller
/// must not read the UNAVAILABLE as "nothing changed" (the controller's `pin` command looks for these words).
pub const LATE_PIN_BATCH: &str =
    "a pin batch (its pins may still take effect when libvirt answers: read the placement before pinning again)";

/// `6695eb01-f6a4-8304-79aa-97f2502e193f`: how libvirt prints a UUID, and so how agents report one.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// Checks one pin against the host's pCPUs and the domain's vCPUs: the rules both backends enforce.
pub fn validate_pin(
    pin: &PinRequest,
    domain_name: &str,
    vcpus: VcpuNumbers<'_>,
    npcpus: u32,
    online: &[PcpuId],
) -> Result<(), AgentError> {
    if pin.pcpus.is_empty() {
        return Err(AgentError::EmptyPcpuList { domain: domain_name.to_string(), vcpu: pin.vcpu });
    }
    match vcpus {
        VcpuNumbers::Count(nvcpus) if pin.vcpu >= nvcpus => {
            return Err(AgentError::VcpuOutOfRange { domain: domain_name.to_string(), vcpu: pin.vcpu, nvcpus });
        }
        VcpuNumbers::Online(list) if !list.contains(&pin.vcpu) => {
            let dense = list.iter().enumerate().all(|(i, &v)| v as usize == i);
            return Err(if dense {
                AgentError::VcpuOutOfRange { domain: domain_name.to_string(), vcpu: pin.vcpu, nvcpus: list.len() as u32 }
            } else {
                AgentError::VcpuNotOnline { domain: domain_name.to_string(), vcpu: pin.vcpu, online: list.to_vec() }
            });
        }
        _ => {}
    }
    validate_pcpus(pin, domain_name, npcpus, online)
}

/// The part of [`validate_pin`] that needs no domain: a pin to a pCPU the host lacks is malformed whether or not its
/// domain exists, so both backends check it also for a pin whose domain they cannot find, and refuse the batch.
pub fn validate_pcpus(pin: &PinRequest, domain_name: &str, npcpus: u32, online: &[PcpuId]) -> Result<(), AgentError> {
    if pin.pcpus.is_empty() {
        return Err(AgentError::EmptyPcpuList { domain: domain_name.to_string(), vcpu: pin.vcpu });
    }
    for &pcpu in &pin.pcpus {
        if pcpu >= npcpus {
            return Err(AgentError::PcpuOutOfRange {
                domain: domain_name.to_string(),
                vcpu: pin.vcpu,
                pcpu,
                npcpus,
            });
        }
        if !online.contains(&pcpu) {
            return Err(AgentError::PcpuOffline { domain: domain_name.to_string(), vcpu: pin.vcpu, pcpu });
        }
    }
    Ok(())
}

/// Splits a batch's per-pin lookups into the batch outcome: the first invalid-argument error refuses the batch;
/// other errors stay per pin. `checks[i]` is the validation outcome of pin `i`.
pub fn batch_verdict(checks: &[Result<(), AgentError>]) -> Result<(), AgentError> {
    for c in checks {
        if let Err(e) = c {
            if e.kind() == crate::error::ErrorKind::InvalidArgument {
                return Err(e.clone());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_read_as_libvirt_reads_them() {
        let bytes = [0x66, 0x95, 0xeb, 0x01, 0xf6, 0xa4, 0x83, 0x04, 0x79, 0xaa, 0x97, 0xf2, 0x50, 0x2e, 0x19, 0x3f];
        for key in [
            "6695eb01-f6a4-8304-79aa-97f2502e193f",
            "6695EB01-F6A4-8304-79AA-97F2502E193F",
            "6695eb01f6a4830479aa97f2502e193f",
            "66-95eb01f6a4830479aa97f2502e193f",
            " 6695eb01-f6a4-8304-79aa-97f2502e193f\n",
        ] {
            assert_eq!(parse_uuid(key), Some(bytes), "{key:?}");
        }
        for key in [
            "test",
            "",
            "6695eb01-f6a4-8304-79aa-97f2502e193",
            "6695eb01-f6a4-8304-79aa-97f2502e193g",
            "6695eb01-f6a4-8304-79aa-97f2502e193f-",
            "6695eb01-f6a4-8304-79aa-97f2502e193f0",
            "6-695eb01f6a4830479aa97f2502e193f",
            "6695eb01-f6a4-8304-79aa-97f2502e193é",
        ] {
            assert_eq!(parse_uuid(key), None, "{key:?}");
        }
    }

    fn pin(vcpu: u32, pcpus: &[u32]) -> PinRequest {
        PinRequest { domain: "d".into(), vcpu, pcpus: pcpus.to_vec(), persist: false }
    }

    #[test]
    fn validation_rules() {
        let online = [0, 1, 3];
        assert!(validate_pin(&pin(0, &[1]), "d", VcpuNumbers::Count(2), 4, &online).is_ok());
        assert!(matches!(validate_pin(&pin(2, &[1]), "d", VcpuNumbers::Count(2), 4, &online), Err(AgentError::VcpuOutOfRange { .. })));
        assert!(matches!(validate_pin(&pin(0, &[4]), "d", VcpuNumbers::Count(2), 4, &online), Err(AgentError::PcpuOutOfRange { .. })));
        assert!(matches!(validate_pin(&pin(0, &[2]), "d", VcpuNumbers::Count(2), 4, &online), Err(AgentError::PcpuOffline { .. })));
        assert!(matches!(validate_pin(&pin(0, &[]), "d", VcpuNumbers::Count(2), 4, &online), Err(AgentError::EmptyPcpuList { .. })));
        // vCPUs 0 and 3 online of 4: 3 may be pinned, 1 is not online, 4 does not exist.
        let gaps = VcpuNumbers::Online(&[0, 3]);
        assert!(validate_pin(&pin(3, &[1]), "d", gaps, 4, &online).is_ok());
        assert!(matches!(validate_pin(&pin(1, &[1]), "d", gaps, 4, &online), Err(AgentError::VcpuNotOnline { .. })));
        assert!(matches!(validate_pin(&pin(4, &[1]), "d", gaps, 4, &online), Err(AgentError::VcpuNotOnline { .. })));
        let e = validate_pin(&pin(2, &[1]), "d", VcpuNumbers::Online(&[0, 1]), 4, &online).unwrap_err();
        assert!(matches!(e, AgentError::VcpuOutOfRange { nvcpus: 2, .. }), "{e:?}");
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument);
        let e = validate_pin(&pin(1, &[1]), "d", gaps, 4, &online).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("0, 3"), "{e}");
    }

    #[test]
    fn batch_refused_only_for_invalid_arguments() {
        let nf = Err(AgentError::DomainNotFound { domain: "x".into() });
        assert!(batch_verdict(&[Ok(()), nf.clone()]).is_ok());
        let bad = Err(AgentError::InvalidArgument("x".into()));
        assert!(batch_verdict(&[nf, Ok(()), bad]).is_err());
    }
}
