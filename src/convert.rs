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
            boot_id: s.boot_id,
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
            boot_id: s.boot_id,
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

/// `GetStatsResponse` wire bytes straight into [`HostStats`], without the generated types in between. `None` for
/// anything it does not take exactly as prost would: malformed bytes, a known field with an unexpected wire type,
/// groups. The caller then decodes with prost, which gives the same result or the error. A proptest checks that
/// whenever this returns a sample, prost decodes the same bytes to the same sample.
pub fn stats_from_wire(bytes: &[u8]) -> Option<HostStats> {
    let mut s = HostStats::default();
    stats_into(bytes, &mut s).then_some(s)
}

/// [`stats_from_wire`] into `s`, a sample that is no longer needed, reusing its strings and vectors: the
/// controller decodes one reply per host and round, and allocating (then freeing) two strings per domain and one
/// vector per vCPU was most of the cost of decoding (BENCHMARKS.md, "Controller rounds on simulated fleets"). A host's
/// reply has the same shape round after round, so in the usual round this allocates nothing. Whatever `s` held
/// before makes no difference to the result; `false` (and `s` left in some state) where [`stats_from_wire`] gives
/// `None`.
pub fn stats_into(bytes: &[u8], s: &mut HostStats) -> bool {
    fn read(bytes: &[u8], s: &mut HostStats) -> Option<()> {
        let mut w = Wire(bytes);
        (s.sample_time_ns, s.npcpus) = (0, 0);
        s.online_pcpus.clear();
        s.agent_instance.clear();
        s.boot_id.clear();
        let mut domains = 0;
        while let Some((field, wt)) = w.key()? {
            match (field, wt) {
                (1, VARINT) => s.sample_time_ns = w.varint()?,
                (2, LEN) => {
                    domain_into(w.len_delimited()?, slot(&mut s.domains, domains))?;
                    domains += 1;
                }
                (3, VARINT) => s.npcpus = w.varint()? as u32,
                (4, _) => w.repeated_u32(wt, &mut s.online_pcpus)?,
                (5, LEN) => w.string_into(&mut s.agent_instance)?,
                (6, LEN) => w.string_into(&mut s.boot_id)?,
                (1..=6, _) => return None,
                _ => w.skip(wt)?,
            }
        }
        s.domains.truncate(domains);
        Some(())
    }
    read(bytes, s).is_some()
}

fn domain_into(bytes: &[u8], d: &mut DomainStats) -> Option<()> {
    let mut w = Wire(bytes);
    (d.id, d.cpu_time_ns) = (0, 0);
    d.uuid.clear();
    d.name.clear();
    let mut vcpus = 0;
    while let Some((field, wt)) = w.key()? {
        match (field, wt) {
            (1, LEN) => w.string_into(&mut d.uuid)?,
            (2, LEN) => w.string_into(&mut d.name)?,
            (3, VARINT) => d.id = w.varint()? as u32,
            (4, VARINT) => d.cpu_time_ns = w.varint()?,
            (5, LEN) => {
                vcpu_into(w.len_delimited()?, slot(&mut d.vcpus, vcpus))?;
                vcpus += 1;
            }
            (1..=5, _) => return None,
            _ => w.skip(wt)?,
        }
    }
    d.vcpus.truncate(vcpus);
    Some(())
}

fn vcpu_into(bytes: &[u8], v: &mut VcpuStats) -> Option<()> {
    let mut w = Wire(bytes);
    (v.index, v.time_ns, v.pcpu) = (0, 0, 0);
    v.affinity.clear();
    while let Some((field, wt)) = w.key()? {
        match (field, wt) {
            (1, VARINT) => v.index = w.varint()? as u32,
            (2, VARINT) => v.time_ns = w.varint()?,
            (3, VARINT) => v.pcpu = w.varint()? as u32,
            (4, _) => w.repeated_u32(wt, &mut v.affinity)?,
            (1..=4, _) => return None,
            _ => w.skip(wt)?,
        }
    }
    Some(())
}

/// Element `i` of `v`, which has at least `i` elements, to read a repeated message into: the old one there, whose
/// allocations the read reuses, or a new one at the end. The caller truncates `v` to the elements it read.
fn slot<T: Default>(v: &mut Vec<T>, i: usize) -> &mut T {
    if i == v.len() {
        v.push(T::default());
    }
    &mut v[i]
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// Protobuf wire bytes not read yet. Every read returns `None` where prost would fail (or, for groups, where this
/// reader does not follow prost).
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Option<u64> {
        // Most are one byte: every key, every index and pCPU of a small host.
        if let Some((&b, rest)) = self.0.split_first().filter(|(&b, _)| b < 0x80) {
            self.0 = rest;
            return Some(u64::from(b));
        }
        let mut x = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            x |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                // The tenth byte may carry only the top bit.
                return (i < 9 || b < 2).then_some(x);
            }
        }
        None
    }

    /// The next field's number and wire type; `Some(None)` at the end.
    fn key(&mut self) -> Option<Option<(u32, u8)>> {
        if self.0.is_empty() {
            return Some(None);
        }
        let k = u32::try_from(self.varint()?).ok()?;
        let (field, wt) = (k >> 3, (k & 7) as u8);
        (field != 0).then_some(Some((field, wt)))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        (n <= self.0.len()).then(|| {
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            head
        })
    }

    fn len_delimited(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        self.take(n)
    }

    /// A string field into `out`, replacing what it held (the last occurrence of a field wins, as in prost).
    fn string_into(&mut self, out: &mut String) -> Option<()> {
        let s = std::str::from_utf8(self.len_delimited()?).ok()?;
        out.clear();
        out.push_str(s);
        Some(())
    }

    /// A `repeated uint32`, packed or not (a parser must take both).
    fn repeated_u32(&mut self, wt: u8, out: &mut Vec<u32>) -> Option<()> {
        match wt {
            VARINT => out.push(self.varint()? as u32),
            LEN => {
                let mut packed = Wire(self.len_delimited()?);
                while !packed.0.is_empty() {
                    out.push(packed.varint()? as u32);
                }
            }
            _ => return None,
        }
        Some(())
    }

    /// Skips a field this version does not know (a newer agent may send more).
    fn skip(&mut self, wt: u8) -> Option<()> {
        match wt {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            LEN => self.len_delimited().map(drop),
            I32 => self.take(4).map(drop),
            _ => None,
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
            (AgentError::NotPersistent { domain: "x".into() }, Code::FailedPrecondition),
            (AgentError::CannotPersist { domain: "x".into(), reason: "unsupported flags".into() }, Code::FailedPrecondition),
            (AgentError::PinRefused { domain: "x".into(), vcpu: 0, reason: "cgroup".into() }, Code::FailedPrecondition),
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

    use proptest::prelude::*;

    fn arb_stats() -> impl Strategy<Value = pb::GetStatsResponse> {
        let vcpu = (any::<u32>(), any::<u64>(), any::<u32>(), proptest::collection::vec(any::<u32>(), 0..4))
            .prop_map(|(index, time_ns, pcpu, affinity)| pb::VcpuStats { index, time_ns, pcpu, affinity });
        let domain = (".{0,40}", "\\PC{0,12}", any::<u32>(), any::<u64>(), proptest::collection::vec(vcpu, 0..4))
            .prop_map(|(uuid, name, id, cpu_time_ns, vcpus)| pb::DomainStats { uuid, name, id, cpu_time_ns, vcpus });
        let ids = (".{0,20}", ".{0,36}");
        (any::<u64>(), proptest::collection::vec(domain, 0..5), any::<u32>(), proptest::collection::vec(any::<u32>(), 0..5), ids)
            .prop_map(|(sample_time_ns, domains, npcpus, online_pcpus, (agent_instance, boot_id))| pb::GetStatsResponse {
                sample_time_ns,
                domains,
                npcpus,
                online_pcpus,
                agent_instance,
                boot_id,
            })
    }

    /// Prost's reading of `bytes`, in the model.
    fn prost_reading(bytes: &[u8]) -> Option<HostStats> {
        <pb::GetStatsResponse as prost::Message>::decode(bytes).ok().map(HostStats::from)
    }

    proptest! {
        /// Every reply an agent encodes is read by hand exactly as prost reads it, with unknown fields of every wire
        /// type (a newer agent's) skipped.
        #[test]
        fn stats_are_read_from_the_wire_as_prost_reads_them(s in arb_stats(), extra in proptest::collection::vec(any::<u8>(), 0..3)) {
            let mut bytes = prost::Message::encode_to_vec(&s);
            prop_assert_eq!(stats_from_wire(&bytes), Some(HostStats::from(s.clone())));
            // Unknown fields 9 (varint), 10 (fixed64), 11 (bytes), 12 (fixed32), appended.
            for (i, b) in extra.iter().enumerate() {
                match i % 4 {
                    0 => bytes.extend([9 << 3, *b & 0x7f]),
                    1 => bytes.extend([(10 << 3) | 1, *b, 0, 0, 0, 0, 0, 0, 0]),
                    2 => bytes.extend([(11 << 3) | 2, 1, *b]),
                    _ => bytes.extend([(12 << 3) | 5, *b, 0, 0, 0]),
                }
            }
            prop_assert_eq!(stats_from_wire(&bytes), prost_reading(&bytes));
        }

        /// Decoding into a sample that held anything before (another host's, a bigger or smaller one) gives what
        /// decoding from nothing gives.
        #[test]
        fn decoding_into_an_old_sample_is_decoding_afresh(s in arb_stats(), old in arb_stats()) {
            let bytes = prost::Message::encode_to_vec(&s);
            let mut reused = HostStats::from(old);
            prop_assert!(stats_into(&bytes, &mut reused));
            prop_assert_eq!(Some(reused), stats_from_wire(&bytes));
        }

        /// On any bytes (valid replies cut or corrupted at one place, or noise), a sample read by hand is prost's
        /// sample: where the two could differ, the hand reader gives up and prost decides.
        #[test]
        fn a_sample_read_by_hand_is_always_prosts(s in arb_stats(), cut in any::<prop::sample::Index>(), flip in any::<(prop::sample::Index, u8)>(), noise in proptest::collection::vec(any::<u8>(), 0..64)) {
            let bytes = prost::Message::encode_to_vec(&s);
            let mut flipped = bytes.clone();
            if !flipped.is_empty() {
                let i = flip.0.index(flipped.len());
                flipped[i] ^= flip.1;
            }
            let cut = &bytes[..cut.index(bytes.len() + 1)];
            for b in [cut, &flipped[..], &noise[..]] {
                if let Some(mine) = stats_from_wire(b) {
                    prop_assert_eq!(Some(mine), prost_reading(b));
                }
            }
        }
    }

    /// Unpacked repeated fields (an older encoder's) are read too, and a known field with the wrong wire type is
    /// left to prost, which refuses it.
    #[test]
    fn unpacked_repeated_and_wrong_wire_types() {
        // online_pcpus = [3, 5], unpacked; agent_instance = "a".
        let bytes = [4 << 3, 3, 4 << 3, 5, (5 << 3) | 2, 1, b'a'];
        let s = stats_from_wire(&bytes).unwrap();
        assert_eq!((s.online_pcpus, s.agent_instance.as_str()), (vec![3, 5], "a"));
        assert_eq!(Some(prost_reading(&bytes).unwrap().online_pcpus), Some(vec![3, 5]));
        // sample_time_ns (field 1) sent as a string.
        let wrong = [(1 << 3) | 2, 1, b'x'];
        assert_eq!(stats_from_wire(&wrong), None);
        assert_eq!(prost_reading(&wrong), None, "prost refuses it too");
    }

    #[test]
    fn pin_results_round_trip() {
        let e = AgentError::DomainNotFound { domain: "gone".into() };
        let back = pin_result_from_pb(&pin_result_to_pb(&Err(e))).unwrap_err();
        assert_eq!(back.code(), Code::NotFound);
        assert!(pin_result_from_pb(&pin_result_to_pb(&Ok(()))).is_ok());
    }
}
