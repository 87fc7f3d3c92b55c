//! Conversions between the model and the protobuf types, and the one mapping from errors to gRPC status codes.
//!
//! Incoming requests are checked here for shape (non-empty domain, non-empty pCPU list, bounded sizes) so that a
//! malformed request is refused with INVALID_ARGUMENT before any backend is asked.

use tonic::{Code, Status};

use crate::error::{AgentError, ErrorKind};
use crate::model::{
    DomainPlacement, DomainStats, DomainSummary, HostInfo, HostStats, PinRequest, VcpuPlacement, VcpuStats,
};
use crate::pb;

/// Most pins one `ApplyPins` call may carry; a host with more vCPUs than this is not a real host.
pub const MAX_PINS_PER_BATCH: usize = 65_536;
/// Most pCPUs one pin may name.
pub const MAX_PCPUS_PER_PIN: usize = 8_192;
/// Longest domain name or UUID accepted (libvirt names are far shorter in practice).
pub const MAX_DOMAIN_LEN: usize = 1_024;

/// The gRPC code of an error kind.
pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        Status::new(code_of(e.kind()), e.to_string())
    }
}

impl From<HostInfo> for pb::HostInfo {
    fn from(h: HostInfo) -> Self {
        pb::HostInfo {
            hostname: h.hostname,
            backend: h.backend,
            hypervisor_version: h.hypervisor_version,
            library_version: h.library_version,
            npcpus: h.npcpus,
            online_pcpus: h.online_pcpus,
            agent_version: h.agent_version,
        }
    }
}

impl From<pb::HostInfo> for HostInfo {
    fn from(h: pb::HostInfo) -> Self {
        HostInfo {
            hostname: h.hostname,
            backend: h.backend,
            hypervisor_version: h.hypervisor_version,
            library_version: h.library_version,
            npcpus: h.npcpus,
            online_pcpus: h.online_pcpus,
            agent_version: h.agent_version,
        }
    }
}

impl From<DomainSummary> for pb::DomainSummary {
    fn from(d: DomainSummary) -> Self {
        pb::DomainSummary { name: d.name, uuid: d.uuid, id: d.id, vcpus: d.vcpus, state: d.state }
    }
}

impl From<pb::DomainSummary> for DomainSummary {
    fn from(d: pb::DomainSummary) -> Self {
        DomainSummary { name: d.name, uuid: d.uuid, id: d.id, vcpus: d.vcpus, state: d.state }
    }
}

impl From<HostStats> for pb::GetStatsResponse {
    fn from(s: HostStats) -> Self {
        pb::GetStatsResponse {
            sample_time_ns: s.sample_time_ns,
            npcpus: s.npcpus,
            online_pcpus: s.online_pcpus,
            agent_instance: s.agent_instance,
            domains: s
                .domains
                .into_iter()
                .map(|d| pb::DomainStats {
                    uuid: d.uuid,
                    name: d.name,
                    id: d.id,
                    cpu_time_ns: d.cpu_time_ns,
                    vcpus: d
                        .vcpus
                        .into_iter()
                        .map(|v| pb::VcpuStats {
                            index: v.index,
                            time_ns: v.time_ns,
                            pcpu: v.pcpu,
                            affinity: v.affinity,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl From<pb::GetStatsResponse> for HostStats {
    fn from(s: pb::GetStatsResponse) -> Self {
        HostStats {
            sample_time_ns: s.sample_time_ns,
            npcpus: s.npcpus,
            online_pcpus: s.online_pcpus,
            agent_instance: s.agent_instance,
            domains: s
                .domains
                .into_iter()
                .map(|d| DomainStats {
                    uuid: d.uuid,
                    name: d.name,
                    id: d.id,
                    cpu_time_ns: d.cpu_time_ns,
                    vcpus: d
                        .vcpus
                        .into_iter()
                        .map(|v| VcpuStats { index: v.index, time_ns: v.time_ns, pcpu: v.pcpu, affinity: v.affinity })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl From<DomainPlacement> for pb::GetVcpuPlacementResponse {
    fn from(p: DomainPlacement) -> Self {
        pb::GetVcpuPlacementResponse {
            domain: p.name,
            uuid: p.uuid,
            vcpus: p
                .vcpus
                .into_iter()
                .map(|v| pb::VcpuPlacement { index: v.index, pcpu: v.pcpu, affinity: v.affinity })
                .collect(),
        }
    }
}

impl From<pb::GetVcpuPlacementResponse> for DomainPlacement {
    fn from(p: pb::GetVcpuPlacementResponse) -> Self {
        DomainPlacement {
            name: p.domain,
            uuid: p.uuid,
            vcpus: p
                .vcpus
                .into_iter()
                .map(|v| VcpuPlacement { index: v.index, pcpu: v.pcpu, affinity: v.affinity })
                .collect(),
        }
    }
}

impl From<PinRequest> for pb::PinVcpuRequest {
    fn from(p: PinRequest) -> Self {
        pb::PinVcpuRequest { domain: p.domain, vcpu: p.vcpu, pcpus: p.pcpus, persist: p.persist }
    }
}

/// Checks the shape of a domain argument.
pub fn domain_arg(domain: &str) -> Result<(), AgentError> {
    if domain.trim().is_empty() {
        return Err(AgentError::InvalidArgument("domain (name or UUID) is required".into()));
    }
    if domain.len() > MAX_DOMAIN_LEN {
        return Err(AgentError::InvalidArgument(format!("domain is longer than {MAX_DOMAIN_LEN} bytes")));
    }
    // libvirt's C API cannot take a NUL, and no domain name or UUID holds a control character: refuse them here so
    // every backend answers the same INVALID_ARGUMENT instead of a backend-specific failure.
    if domain.chars().any(char::is_control) {
        return Err(AgentError::InvalidArgument(format!("domain {domain:?} contains a control character")));
    }
    Ok(())
}

impl TryFrom<pb::PinVcpuRequest> for PinRequest {
    type Error = AgentError;

    /// Checks the shape of a pin; range checks need the host and are done by the backend.
    fn try_from(p: pb::PinVcpuRequest) -> Result<Self, AgentError> {
        domain_arg(&p.domain)?;
        if p.pcpus.is_empty() {
            return Err(AgentError::EmptyPcpuList { domain: p.domain, vcpu: p.vcpu });
        }
        if p.pcpus.len() > MAX_PCPUS_PER_PIN {
            return Err(AgentError::InvalidArgument(format!(
                "domain {:?} vCPU {}: more than {MAX_PCPUS_PER_PIN} pCPUs",
                p.domain, p.vcpu
            )));
        }
        let mut pcpus = p.pcpus;
        pcpus.sort_unstable();
        pcpus.dedup();
        Ok(PinRequest { domain: p.domain, vcpu: p.vcpu, pcpus, persist: p.persist })
    }
}

/// Converts a whole batch; one malformed pin refuses the batch.
pub fn pins_from_pb(pins: Vec<pb::PinVcpuRequest>) -> Result<Vec<PinRequest>, AgentError> {
    if pins.len() > MAX_PINS_PER_BATCH {
        return Err(AgentError::InvalidArgument(format!("more than {MAX_PINS_PER_BATCH} pins in one batch")));
    }
    pins.into_iter().map(PinRequest::try_from).collect()
}

/// The wire form of one pin's outcome.
pub fn pin_result_to_pb(r: &Result<(), AgentError>) -> pb::PinResult {
    match r {
        Ok(()) => pb::PinResult { code: Code::Ok as i32, message: String::new() },
        Err(e) => pb::PinResult { code: code_of(e.kind()) as i32, message: e.to_string() },
    }
}

/// The outcome of one pin as the controller sees it: `Ok` or the agent's status.
pub fn pin_result_from_pb(r: &pb::PinResult) -> Result<(), Status> {
    if r.code == Code::Ok as i32 {
        Ok(())
    } else {
        Err(Status::new(Code::from_i32(r.code), r.message.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes() {
        let cases = [
            (AgentError::DomainNotFound { domain: "x".into() }, Code::NotFound),
            (AgentError::DomainNotRunning { domain: "x".into(), state: "shut off".into() }, Code::FailedPrecondition),
            (AgentError::VcpuOutOfRange { domain: "x".into(), vcpu: 3, nvcpus: 1 }, Code::InvalidArgument),
            (AgentError::PcpuOutOfRange { domain: "x".into(), vcpu: 0, pcpu: 9, npcpus: 2 }, Code::InvalidArgument),
            (AgentError::PcpuOffline { domain: "x".into(), vcpu: 0, pcpu: 1 }, Code::InvalidArgument),
            (AgentError::EmptyPcpuList { domain: "x".into(), vcpu: 0 }, Code::InvalidArgument),
            (AgentError::PermissionDenied("reader".into()), Code::PermissionDenied),
            (AgentError::Unavailable("down".into()), Code::Unavailable),
            (AgentError::Internal("?".into()), Code::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e.clone()).code(), code, "{e}");
        }
    }

    #[test]
    fn malformed_pins_refused() {
        let ok = pb::PinVcpuRequest { domain: "vm".into(), vcpu: 0, pcpus: vec![2, 1, 2], persist: false };
        assert_eq!(PinRequest::try_from(ok.clone()).unwrap().pcpus, vec![1, 2]);
        let empty = pb::PinVcpuRequest { pcpus: vec![], ..ok.clone() };
        assert!(pins_from_pb(vec![ok.clone(), empty]).is_err());
        let nodom = pb::PinVcpuRequest { domain: " ".into(), ..ok };
        assert_eq!(Status::from(PinRequest::try_from(nodom).unwrap_err()).code(), Code::InvalidArgument);
    }

    #[test]
    fn pin_results_round_trip() {
        let e = AgentError::DomainNotFound { domain: "gone".into() };
        let back = pin_result_from_pb(&pin_result_to_pb(&Err(e))).unwrap_err();
        assert_eq!(back.code(), Code::NotFound);
        assert!(pin_result_from_pb(&pin_result_to_pb(&Ok(()))).is_ok());
    }
}
