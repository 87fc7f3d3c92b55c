//! Property-based fuzzing of the pin RPCs: arbitrary `PinVcpuRequest`s and `ApplyPinsRequest`s (domains by name,
//! UUID, unknown, empty, oversized or with control characters; any vCPU; pCPU lists empty, duplicated, out of range
//! or oversized; `persist` either way) go through the agent service (validation, then the simulated backend).
//!
//! For every request: no panic; only the documented codes (the call: OK or INVALID_ARGUMENT, plus NOT_FOUND or
//! FAILED_PRECONDITION for a single pin; per pin in a batch: OK, NOT_FOUND or FAILED_PRECONDITION); a refused
//! request changes nothing; an accepted one changes exactly what its successful pins say, in order.
//!
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz_requests` runs it longer. Cases it found are kept at the
//! bottom as plain regression tests.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use tonic::{Code, Request};
use vcpu_balancer::agent::AgentService;
use vcpu_balancer::convert::{MAX_DOMAIN_LEN, MAX_PCPUS_PER_PIN};
use vcpu_balancer::hypervisor::sim::{ManualClock, Scenario, SimHypervisor};
use vcpu_balancer::hypervisor::Hypervisor;
use vcpu_balancer::pb;
use vcpu_balancer::pb::agent_server::Agent;

const PCPUS: u32 = 4;
const SCENARIO: &str = r#"
pcpus = 4
[[domain]]
name = "vm1"
vcpus = 2
affinity = [0]
load = 50
[[domain]]
name = "vm2"
vcpus = 1
load = 20
"#;

type Placement = BTreeMap<String, Vec<Vec<u32>>>;

struct Harness {
    rt: tokio::runtime::Runtime,
    hv: Arc<SimHypervisor>,
    svc: AgentService<SimHypervisor>,
    uuids: BTreeMap<String, String>,
}

impl Harness {
    fn new() -> Harness {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let sc = Scenario::parse(SCENARIO, "fuzz").unwrap();
        let hv = Arc::new(SimHypervisor::new(&sc, "sim-fuzz", Arc::new(ManualClock::new(0))));
        let svc = AgentService::new(hv.clone());
        let uuids = rt
            .block_on(hv.list_domains())
            .unwrap()
            .into_iter()
            .map(|d| (d.uuid.to_ascii_lowercase(), d.name))
            .collect();
        Harness { rt, hv, svc, uuids }
    }

    fn placement(&self) -> Placement {
        self.hv.with_host(|h, _| {
            h.list()
                .into_iter()
                .map(|d| {
                    let p = h.placement(&d.name).unwrap();
                    (d.name, p.vcpus.into_iter().map(|v| v.affinity).collect())
                })
                .collect()
        })
    }

    /// The domain name a request's domain field resolves to, if any (by name or UUID, as the backend does).
    fn resolve(&self, domain: &str, now: &Placement) -> Option<String> {
        if now.contains_key(domain) {
            return Some(domain.to_string());
        }
        self.uuids.get(&domain.to_ascii_lowercase()).cloned()
    }

    /// `now` after a successful pin.
    fn apply(&self, now: &mut Placement, pin: &pb::PinVcpuRequest) {
        let name = self.resolve(&pin.domain, now).expect("a successful pin names a domain");
        let mut pcpus = pin.pcpus.clone();
        pcpus.sort_unstable();
        pcpus.dedup();
        now.get_mut(&name).unwrap()[pin.vcpu as usize] = pcpus;
    }
}

fn domain() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("vm1".to_string()),
        2 => Just("vm2".to_string()),
        1 => Just("UUID:vm1".to_string()), // replaced by vm1's UUID in the test
        1 => Just("nope".to_string()),
        1 => Just(String::new()),
        1 => Just("  ".to_string()),
        1 => Just("x".repeat(MAX_DOMAIN_LEN + 1)),
        1 => Just("vm1\0".to_string()),
        1 => "\\PC{0,12}",
        1 => any::<String>(),
    ]
}

fn pcpus() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        8 => prop::collection::vec(0..PCPUS + 2, 0..6),
        1 => prop::collection::vec(any::<u32>(), 0..4),
        1 => Just(vec![0; MAX_PCPUS_PER_PIN + 1]),
    ]
}

fn pin() -> impl Strategy<Value = pb::PinVcpuRequest> {
    (domain(), prop_oneof![8 => 0u32..4, 1 => any::<u32>()], pcpus(), any::<bool>())
        .prop_map(|(domain, vcpu, pcpus, persist)| pb::PinVcpuRequest { domain, vcpu, pcpus, persist })
}

fn fix_uuid(h: &Harness, mut p: pb::PinVcpuRequest) -> pb::PinVcpuRequest {
    if p.domain == "UUID:vm1" {
        p.domain = h.uuids.iter().find(|(_, n)| *n == "vm1").unwrap().0.to_ascii_uppercase();
    }
    p
}

/// One `PinVcpu`: checks the code and the placement, returns the code.
fn check_pin_vcpu(h: &Harness, p: pb::PinVcpuRequest) -> Result<Code, TestCaseError> {
    let p = fix_uuid(h, p);
    let before = h.placement();
    let r = h.rt.block_on(h.svc.pin_vcpu(Request::new(p.clone())));
    let after = h.placement();
    match r {
        Ok(_) => {
            let mut want = before;
            h.apply(&mut want, &p);
            prop_assert_eq!(after, want, "accepted pin {:?}", p);
            Ok(Code::Ok)
        }
        Err(s) => {
            prop_assert!(
                matches!(s.code(), Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition),
                "undocumented code {:?} for {:?}: {}",
                s.code(),
                p,
                s.message()
            );
            prop_assert_eq!(after, before, "refused pin {:?} changed the placement", p);
            Ok(s.code())
        }
    }
}

/// One `ApplyPins`: checks the codes and the placement.
fn check_apply_pins(h: &Harness, pins: Vec<pb::PinVcpuRequest>) -> Result<(), TestCaseError> {
    let pins: Vec<_> = pins.into_iter().map(|p| fix_uuid(h, p)).collect();
    let before = h.placement();
    let r = h.rt.block_on(h.svc.apply_pins(Request::new(pb::ApplyPinsRequest { pins: pins.clone() })));
    let after = h.placement();
    match r {
        Ok(resp) => {
            let results = resp.into_inner().results;
            prop_assert_eq!(results.len(), pins.len());
            let mut want = before;
            for (p, res) in pins.iter().zip(&results) {
                let code = Code::from_i32(res.code);
                prop_assert!(matches!(code, Code::Ok | Code::NotFound | Code::FailedPrecondition), "pin {:?}: {:?}", p, res);
                if code == Code::Ok {
                    h.apply(&mut want, p);
                }
            }
            prop_assert_eq!(after, want, "batch {:?}", pins);
        }
        Err(s) => {
            prop_assert_eq!(s.code(), Code::InvalidArgument, "undocumented batch code: {}", s.message());
            prop_assert_eq!(after, before, "refused batch changed the placement");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_pin_vcpu(reqs in prop::collection::vec(pin(), 1..6)) {
        let h = Harness::new();
        for p in reqs {
            check_pin_vcpu(&h, p)?;
        }
    }

    #[test]
    fn arbitrary_apply_pins(batches in prop::collection::vec(prop::collection::vec(pin(), 0..8), 1..4)) {
        let h = Harness::new();
        for b in batches {
            check_apply_pins(&h, b)?;
        }
    }
}

// Regression cases: inputs the fuzzer found or that sit on a boundary. Each asserts the documented outcome.

/// A domain name with a NUL or another control character is malformed: INVALID_ARGUMENT before any backend lookup
/// (libvirt's C API cannot even take a NUL; before the fix the sim said NOT_FOUND and libvirt an internal error).
#[test]
fn control_characters_in_a_domain_are_invalid() {
    let h = Harness::new();
    for d in ["vm1\0", "vm\n1", "\u{7f}"] {
        let p = pb::PinVcpuRequest { domain: d.into(), vcpu: 0, pcpus: vec![1], persist: false };
        assert_eq!(check_pin_vcpu(&h, p).unwrap(), Code::InvalidArgument, "{d:?}");
    }
}

/// The size bounds are inclusive: a domain of exactly the maximum length is looked up (NOT_FOUND), one more byte is
/// refused; a pin of exactly the maximum pCPU count is range-checked, one more is refused.
#[test]
fn bounds_are_exact() {
    let h = Harness::new();
    let p = |domain: String, pcpus: Vec<u32>| pb::PinVcpuRequest { domain, vcpu: 0, pcpus, persist: false };
    assert_eq!(check_pin_vcpu(&h, p("x".repeat(MAX_DOMAIN_LEN), vec![1])).unwrap(), Code::NotFound);
    assert_eq!(check_pin_vcpu(&h, p("x".repeat(MAX_DOMAIN_LEN + 1), vec![1])).unwrap(), Code::InvalidArgument);
    // Duplicates collapse to one pCPU, so the maximum-length list is a valid pin.
    assert_eq!(check_pin_vcpu(&h, p("vm1".into(), vec![1; MAX_PCPUS_PER_PIN])).unwrap(), Code::Ok);
    assert_eq!(check_pin_vcpu(&h, p("vm1".into(), vec![1; MAX_PCPUS_PER_PIN + 1])).unwrap(), Code::InvalidArgument);
}

/// A batch that names the same vCPU twice applies both in order: the last one wins.
#[test]
fn the_last_pin_of_a_batch_wins() {
    let h = Harness::new();
    let p = |pcpu| pb::PinVcpuRequest { domain: "vm1".into(), vcpu: 1, pcpus: vec![pcpu], persist: false };
    check_apply_pins(&h, vec![p(2), p(3)]).unwrap();
    assert_eq!(h.placement()["vm1"][1], vec![3]);
}
