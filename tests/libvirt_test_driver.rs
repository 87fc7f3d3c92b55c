//! The libvirt backend against libvirt's built-in `test:///default` driver, through the `Hypervisor` trait.
//!
//! The test driver runs in-process: no daemon, no KVM. It starts with one running domain, `test` (2 vCPUs); its node
//! map reports 8 pCPUs of which only some are online.
//!
//! Connections to `test:///default` in one process share one state while any of them is open, and tests run in
//! parallel. So tests never change the shared `test` domain: each one that pins or stops something creates its own
//! domain, with a unique name, on the backend's own connection (`with_connect`), so it is visible to the backend
//! whether or not state is shared. Lists are checked with "contains", never for equality.
#![cfg(feature = "libvirt")]

use std::sync::atomic::{AtomicU32, Ordering};

use vcpu_balancer::error::{AgentError, ErrorKind};
use vcpu_balancer::hypervisor::libvirt::LibvirtHypervisor;
use vcpu_balancer::hypervisor::Hypervisor;
use vcpu_balancer::model::{DomainPlacement, PcpuId, PinRequest};

const URI: &str = "test:///default";
const DEFAULT_DOMAIN: &str = "test";
const DEFAULT_UUID: &str = "6695eb01-f6a4-8304-79aa-97f2502e193f";

fn backend() -> LibvirtHypervisor {
    LibvirtHypervisor::new(URI)
}

fn pin(domain: &str, vcpu: u32, pcpus: &[PcpuId]) -> PinRequest {
    PinRequest { domain: domain.to_string(), vcpu, pcpus: pcpus.to_vec(), persist: false }
}

fn domain_xml(name: &str, nvcpus: u32) -> String {
    format!(
        "<domain type='test'><name>{name}</name><memory>8192</memory><vcpu>{nvcpus}</vcpu>\
         <os><type>hvm</type></os></domain>"
    )
}

fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("vcpub-{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// How a test domain is made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Created running, gone once destroyed.
    Transient,
    /// Defined and started.
    PersistentRunning,
    /// Defined, never started.
    PersistentStopped,
}

/// A domain private to one test, on the backend's own connection; removed on drop.
struct TestDomain {
    backend: LibvirtHypervisor,
    name: String,
    uuid: String,
}

impl TestDomain {
    fn new(backend: &LibvirtHypervisor, tag: &str, nvcpus: u32, kind: Kind) -> TestDomain {
        let name = unique_name(tag);
        let xml = domain_xml(&name, nvcpus);
        let uuid = backend
            .with_connect(|conn| {
                let dom = match kind {
                    Kind::Transient => conn.create_domain_xml(&xml, 0).expect("create transient domain"),
                    Kind::PersistentRunning | Kind::PersistentStopped => {
                        conn.define_domain_xml(&xml).expect("define domain")
                    }
                };
                if kind == Kind::PersistentRunning {
                    dom.create().expect("start domain");
                }
                dom.uuid_string().expect("uuid")
            })
            .expect("test driver connection");
        TestDomain { backend: backend.clone(), name, uuid }
    }

    /// Stops the domain (a transient one disappears).
    fn destroy(&self) {
        self.backend
            .with_connect(|conn| conn.lookup_domain_by_name(&self.name).expect("lookup").destroy().expect("destroy"))
            .expect("test driver connection");
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        let _ = self.backend.with_connect(|conn| {
            if let Ok(dom) = conn.lookup_domain_by_name(&self.name) {
                let _ = dom.destroy();
                let _ = dom.undefine();
            }
        });
    }
}

/// Two distinct online pCPUs of the test host.
async fn two_online_pcpus(backend: &LibvirtHypervisor) -> (PcpuId, PcpuId) {
    let info = backend.host_info().await.expect("host_info");
    assert!(info.online_pcpus.len() >= 2, "test host needs two online pCPUs: {:?}", info.online_pcpus);
    (info.online_pcpus[0], info.online_pcpus[info.online_pcpus.len() - 1])
}

async fn placement(backend: &LibvirtHypervisor, domain: &str) -> DomainPlacement {
    backend.placement(domain).await.expect("placement")
}

#[tokio::test]
async fn host_info_describes_the_test_host() {
    let info = backend().host_info().await.expect("host_info");
    assert_eq!(info.backend, "libvirt");
    assert!(!info.hostname.is_empty());
    assert!(info.hypervisor_version.starts_with("TEST "), "{}", info.hypervisor_version);
    assert!(info.library_version.starts_with("libvirt "), "{}", info.library_version);
    assert_eq!(info.agent_version, vcpu_balancer::VERSION);
    assert!(info.npcpus > 0);
    assert!(!info.online_pcpus.is_empty());
    assert!(info.online_pcpus.windows(2).all(|w| w[0] < w[1]), "sorted: {:?}", info.online_pcpus);
    assert!(info.online_pcpus.iter().all(|&p| p < info.npcpus));
}

#[tokio::test]
async fn list_domains_shows_the_default_domain() {
    let domains = backend().list_domains().await.expect("list_domains");
    let test = domains.iter().find(|d| d.name == DEFAULT_DOMAIN).expect("default domain listed");
    assert_eq!(test.uuid, DEFAULT_UUID);
    assert_eq!(test.vcpus, 2);
    assert_eq!(test.state, "running");
    assert!(test.id > 0);
    assert!(domains.windows(2).all(|w| w[0].name <= w[1].name), "sorted by name");
}

#[tokio::test]
async fn stats_report_every_vcpu_with_affinity() {
    let backend = backend();
    let first = backend.stats().await.expect("stats");
    assert!(first.npcpus > 0);
    assert!(first.agent_instance.is_empty(), "the service fills agent_instance");
    // A local URI: this machine's boot, which tells the controller when every domain restarted at once.
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(first.boot_id, boot.trim());
    assert!(first.domains.windows(2).all(|w| w[0].name <= w[1].name), "sorted by name");
    let test = first.domains.iter().find(|d| d.name == DEFAULT_DOMAIN).expect("default domain sampled");
    assert_eq!(test.uuid, DEFAULT_UUID);
    assert!(test.id > 0);
    assert!(test.cpu_time_ns > 0);
    assert_eq!(test.vcpus.iter().map(|v| v.index).collect::<Vec<_>>(), vec![0, 1]);
    for v in &test.vcpus {
        assert!(v.time_ns > 0);
        assert!(v.pcpu < first.npcpus, "current pCPU {} outside 0..{}", v.pcpu, first.npcpus);
        assert!(!v.affinity.is_empty());
        assert!(v.affinity.iter().all(|&p| p < first.npcpus));
        assert!(v.affinity.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates: {:?}", v.affinity);
    }

    let second = backend.stats().await.expect("stats");
    assert!(second.sample_time_ns > first.sample_time_ns, "monotonic sample clock");
}

#[tokio::test]
async fn placement_by_name_and_by_uuid_agree() {
    let backend = backend();
    let by_name = placement(&backend, DEFAULT_DOMAIN).await;
    let by_uuid = placement(&backend, DEFAULT_UUID).await;
    assert_eq!(by_name.name, DEFAULT_DOMAIN);
    assert_eq!(by_name.uuid, DEFAULT_UUID);
    assert_eq!(by_name, by_uuid);
    assert_eq!(by_name.vcpus.len(), 2);
    // Dashless UUIDs are UUIDs too.
    assert_eq!(placement(&backend, &DEFAULT_UUID.replace('-', "")).await, by_name);
}

/// Both backends find a domain from the same keys, and refuse the same keys as unknown: UUIDs in every form libvirt
/// reads (dashes between any byte pairs or none, upper case, surrounding spaces) and keys that only look like one.
/// The simulated host has a domain with the test driver's name and UUID.
#[tokio::test]
async fn both_backends_resolve_the_same_keys() {
    use vcpu_balancer::hypervisor::sim::{MonotonicClock, Scenario, SimHypervisor};
    let scenario = format!("pcpus = 2\n[[domain]]\nname = \"{DEFAULT_DOMAIN}\"\nuuid = \"{DEFAULT_UUID}\"\nvcpus = 2\nload = 10\n");
    let scenario = Scenario::parse(&scenario, "same-keys").unwrap();
    let sim = SimHypervisor::new(&scenario, "sim", std::sync::Arc::new(MonotonicClock::new()));
    let libvirt = backend();
    let dashless = DEFAULT_UUID.replace('-', "");
    let found = [
        DEFAULT_DOMAIN.to_string(),
        DEFAULT_UUID.to_string(),
        DEFAULT_UUID.to_uppercase(),
        dashless.clone(),
        // Dashes between other byte pairs.
        format!("{}-{}", &dashless[..2], &dashless[2..]),
        format!(" {DEFAULT_UUID} "),
    ];
    let unknown = [
        "no-such-domain".to_string(),
        "00000000-0000-0000-0000-000000000001".to_string(),
        format!("{DEFAULT_UUID}-"),
        // A dash inside a byte pair: not a UUID to libvirt, and no domain has that name.
        format!("{}-{}", &dashless[..1], &dashless[1..]),
        dashless[..30].to_string(),
    ];
    for key in &found {
        let (l, s) = (libvirt.placement(key).await, sim.placement(key).await);
        assert_eq!(l.as_ref().map(|p| p.uuid.as_str()), Ok(DEFAULT_UUID), "libvirt, {key:?}");
        assert_eq!(s.as_ref().map(|p| p.uuid.as_str()), Ok(DEFAULT_UUID), "sim, {key:?}");
    }
    for key in &unknown {
        let not_found = Err(AgentError::DomainNotFound { domain: key.clone() });
        assert_eq!(libvirt.placement(key).await.map(|p| p.uuid), not_found, "libvirt, {key:?}");
        assert_eq!(sim.placement(key).await.map(|p| p.uuid), not_found, "sim, {key:?}");
    }
}

/// Both backends answer the same malformed batches with the same error, word for word, naming the domain as the
/// caller did; a pCPU the host lacks refuses the batch even when the pin's domain does not exist.
#[tokio::test]
async fn both_backends_refuse_the_same_batches_the_same_way() {
    use vcpu_balancer::hypervisor::sim::{MonotonicClock, Scenario, SimHypervisor};
    let libvirt = backend();
    let npcpus = libvirt.host_info().await.unwrap().npcpus;
    let scenario = format!(
        "pcpus = {npcpus}\n[[domain]]\nname = \"{DEFAULT_DOMAIN}\"\nuuid = \"{DEFAULT_UUID}\"\nvcpus = 2\nload = 10\n"
    );
    let sim = SimHypervisor::new(&Scenario::parse(&scenario, "same").unwrap(), "sim", std::sync::Arc::new(MonotonicClock::new()));
    let (a, _) = two_online_pcpus(&libvirt).await;
    for batch in [
        vec![pin("no-such-domain", 0, &[npcpus]), pin(DEFAULT_DOMAIN, 0, &[a])],
        vec![pin("no-such-domain", 0, &[]), pin(DEFAULT_DOMAIN, 0, &[a])],
        vec![pin(DEFAULT_UUID, 7, &[a])],
        vec![pin(&DEFAULT_UUID.to_uppercase(), 0, &[npcpus + 3])],
    ] {
        let (l, s) = (libvirt.apply_pins(&batch).await, sim.apply_pins(&batch).await);
        let l = l.expect_err("libvirt refuses the batch");
        assert_eq!(l.kind(), ErrorKind::InvalidArgument, "{l}");
        assert_eq!(Err(l), s, "{batch:?}");
    }
}

#[tokio::test]
async fn unknown_domain_is_not_found() {
    let backend = backend();
    // The last looks like a UUID to the agent (32 hex digits) but not to libvirt (a dash at the end), which refuses
    // it as an invalid argument: that is still an unknown domain, not an internal error.
    for key in [
        "no-such-domain",
        "00000000-0000-0000-0000-000000000001",
        "6695eb01-f6a4-8304-79aa-97f2502e193f-",
    ] {
        let err = backend.placement(key).await.expect_err("unknown domain");
        assert_eq!(err, AgentError::DomainNotFound { domain: key.to_string() });
    }
}

#[tokio::test]
async fn pin_is_reflected_in_placement_and_stats() {
    let backend = backend();
    let (a, b) = two_online_pcpus(&backend).await;
    let dom = TestDomain::new(&backend, "pin", 2, Kind::Transient);

    let results = backend.apply_pins(&[pin(&dom.name, 0, &[a]), pin(&dom.uuid, 1, &[b])]).await.expect("apply");
    assert_eq!(results, vec![Ok(()), Ok(())]);

    let p = placement(&backend, &dom.name).await;
    assert_eq!(p.uuid, dom.uuid);
    assert_eq!((p.vcpus[0].index, p.vcpus[0].pcpu, p.vcpus[0].affinity.clone()), (0, a, vec![a]));
    assert_eq!((p.vcpus[1].index, p.vcpus[1].pcpu, p.vcpus[1].affinity.clone()), (1, b, vec![b]));

    let stats = backend.stats().await.expect("stats");
    let d = stats.domains.iter().find(|d| d.name == dom.name).expect("own domain sampled");
    assert_eq!(d.uuid, dom.uuid);
    assert_eq!((d.vcpus[0].pcpu, d.vcpus[0].affinity.clone()), (a, vec![a]));
    assert_eq!((d.vcpus[1].pcpu, d.vcpus[1].affinity.clone()), (b, vec![b]));

    // Re-pinning to several pCPUs widens the affinity.
    backend.apply_pins(&[pin(&dom.name, 0, &[b, a])]).await.expect("apply");
    assert_eq!(placement(&backend, &dom.name).await.vcpus[0].affinity, vec![a.min(b), a.max(b)]);
}

/// The test driver takes flags = 0 only, so it cannot write a pin into a domain's config: a pin asked to persist is
/// refused (FAILED_PRECONDITION) and not made live either, while the same pin without `persist` is made live.
/// (`tests/kvm_e2e.rs` test 5 persists a pin on a real guest.)
#[tokio::test]
async fn persist_on_a_driver_that_cannot_is_refused_and_changes_nothing() {
    let backend = backend();
    let (a, b) = two_online_pcpus(&backend).await;
    let dom = TestDomain::new(&backend, "persist", 1, Kind::PersistentRunning);
    let before = placement(&backend, &dom.name).await;
    let target = if before.vcpus[0].affinity == vec![a] { b } else { a };
    let mut request = pin(&dom.name, 0, &[target]);
    request.persist = true;
    let results = backend.apply_pins(&[request.clone()]).await.expect("per-pin errors only");
    assert!(matches!(&results[0], Err(AgentError::CannotPersist { domain, .. }) if *domain == dom.name), "{results:?}");
    assert_eq!(results[0].as_ref().unwrap_err().kind(), ErrorKind::FailedPrecondition);
    assert_eq!(placement(&backend, &dom.name).await, before, "the refused pin changed nothing");
    request.persist = false;
    assert_eq!(backend.apply_pins(&[request]).await.expect("apply"), vec![Ok(())]);
    assert_eq!(placement(&backend, &dom.name).await.vcpus[0].affinity, vec![target]);
}

/// A transient domain has no config: a pin asked to persist there is refused (FAILED_PRECONDITION) and not made
/// live either, while the other pins of the batch are applied.
#[tokio::test]
async fn persist_on_a_transient_domain_is_refused_and_changes_nothing() {
    let backend = backend();
    let (a, b) = two_online_pcpus(&backend).await;
    let transient = TestDomain::new(&backend, "transient", 1, Kind::Transient);
    let other = TestDomain::new(&backend, "other", 1, Kind::Transient);
    let before = placement(&backend, &transient.name).await;
    let mut request = pin(&transient.name, 0, &[if before.vcpus[0].affinity == vec![a] { b } else { a }]);
    request.persist = true;
    let results = backend.apply_pins(&[request, pin(&other.name, 0, &[a])]).await.expect("per-pin errors only");
    assert_eq!(results[0], Err(AgentError::NotPersistent { domain: transient.name.clone() }));
    assert_eq!(results[0].as_ref().unwrap_err().kind(), ErrorKind::FailedPrecondition);
    assert_eq!(results[1], Ok(()));
    assert_eq!(placement(&backend, &transient.name).await, before, "the refused pin changed nothing");
    assert_eq!(placement(&backend, &other.name).await.vcpus[0].affinity, vec![a]);

    // A malformed pin is malformed whatever else is wrong with it: the whole batch is refused, nothing applied.
    let before_other = placement(&backend, &other.name).await;
    let mut malformed = pin(&transient.name, 99, &[a]);
    malformed.persist = true;
    let err = backend.apply_pins(&[malformed, pin(&other.name, 0, &[b])]).await.expect_err("a malformed pin");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert_eq!(placement(&backend, &other.name).await, before_other, "nothing of the batch was applied");
}

#[tokio::test]
async fn out_of_range_pins_are_refused_and_change_nothing() {
    let backend = backend();
    let info = backend.host_info().await.expect("host_info");
    let (a, _) = two_online_pcpus(&backend).await;
    let dom = TestDomain::new(&backend, "range", 2, Kind::Transient);
    let before = placement(&backend, &dom.name).await;

    let err = backend.apply_pins(&[pin(&dom.name, 2, &[a])]).await.expect_err("vCPU 2 of 2");
    assert!(matches!(err, AgentError::VcpuOutOfRange { vcpu: 2, nvcpus: 2, .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);

    let err = backend.apply_pins(&[pin(&dom.name, 0, &[info.npcpus])]).await.expect_err("pCPU out of range");
    assert!(matches!(err, AgentError::PcpuOutOfRange { .. }), "{err:?}");

    let err = backend.apply_pins(&[pin(&dom.name, 0, &[])]).await.expect_err("empty pCPU list");
    assert!(matches!(err, AgentError::EmptyPcpuList { .. }), "{err:?}");

    if let Some(offline) = (0..info.npcpus).find(|p| !info.online_pcpus.contains(p)) {
        let err = backend.apply_pins(&[pin(&dom.name, 0, &[offline])]).await.expect_err("offline pCPU");
        assert!(matches!(err, AgentError::PcpuOffline { .. }), "{err:?}");
    }

    assert_eq!(placement(&backend, &dom.name).await, before);
}

#[tokio::test]
async fn a_batch_with_one_invalid_pin_applies_nothing() {
    let backend = backend();
    let (a, b) = two_online_pcpus(&backend).await;
    let dom = TestDomain::new(&backend, "batch-invalid", 2, Kind::Transient);
    let before = placement(&backend, &dom.name).await;

    let batch = [pin(&dom.name, 0, &[a]), pin(&dom.name, 1, &[b]), pin(&dom.name, 7, &[a])];
    let err = backend.apply_pins(&batch).await.expect_err("batch refused");
    assert!(matches!(err, AgentError::VcpuOutOfRange { vcpu: 7, .. }), "{err:?}");
    assert_eq!(placement(&backend, &dom.name).await, before);
}

#[tokio::test]
async fn a_batch_with_an_unknown_domain_applies_the_others() {
    let backend = backend();
    let (a, b) = two_online_pcpus(&backend).await;
    let dom = TestDomain::new(&backend, "batch-unknown", 2, Kind::Transient);

    let batch = [pin(&dom.name, 0, &[a]), pin("no-such-domain", 0, &[a]), pin(&dom.name, 1, &[b])];
    let results = backend.apply_pins(&batch).await.expect("batch applied");
    assert_eq!(results.len(), 3);
    assert_eq!(results[0], Ok(()));
    assert_eq!(results[1], Err(AgentError::DomainNotFound { domain: "no-such-domain".into() }));
    assert_eq!(results[2], Ok(()));
    let p = placement(&backend, &dom.name).await;
    assert_eq!(p.vcpus[0].affinity, vec![a]);
    assert_eq!(p.vcpus[1].affinity, vec![b]);
}

#[tokio::test]
async fn stopped_domains_are_not_running_and_vanished_ones_not_found() {
    let backend = backend();
    let (a, _) = two_online_pcpus(&backend).await;

    // Defined, never started.
    let defined = TestDomain::new(&backend, "defined", 1, Kind::PersistentStopped);
    let err = backend.placement(&defined.name).await.expect_err("not running");
    assert!(
        matches!(&err, AgentError::DomainNotRunning { domain, state } if *domain == defined.name && state == "shut off"),
        "{err:?}"
    );
    let results = backend.apply_pins(&[pin(&defined.name, 0, &[a])]).await.expect("per-pin error only");
    assert_eq!(results[0].as_ref().map_err(AgentError::kind), Err(ErrorKind::FailedPrecondition));

    // Started, then destroyed: persistent, so it stays defined and stopped.
    let stopped = TestDomain::new(&backend, "stopped", 1, Kind::PersistentRunning);
    backend.placement(&stopped.name).await.expect("running at first");
    stopped.destroy();
    let err = backend.placement(&stopped.uuid).await.expect_err("not running");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err:?}");

    // A transient domain disappears when destroyed.
    let transient = TestDomain::new(&backend, "vanished", 1, Kind::Transient);
    transient.destroy();
    let err = backend.placement(&transient.name).await.expect_err("gone");
    assert_eq!(err, AgentError::DomainNotFound { domain: transient.name.clone() });
    let results = backend.apply_pins(&[pin(&transient.name, 0, &[a])]).await.expect("per-pin error only");
    assert_eq!(results, vec![Err(AgentError::DomainNotFound { domain: transient.name.clone() })]);

    // Neither is listed nor sampled.
    let listed = backend.list_domains().await.expect("list");
    let sampled = backend.stats().await.expect("stats");
    for name in [&defined.name, &stopped.name, &transient.name] {
        assert!(listed.iter().all(|d| &d.name != name), "{name} listed");
        assert!(sampled.domains.iter().all(|d| &d.name != name), "{name} sampled");
    }
}

#[tokio::test]
async fn unreachable_daemon_is_unavailable_not_a_panic() {
    // Nothing listens on port 1.
    let backend = LibvirtHypervisor::new("qemu+tcp://127.0.0.1:1/system");
    let unavailable = |r: Result<(), AgentError>| assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::Unavailable));
    unavailable(backend.host_info().await.map(drop));
    unavailable(backend.list_domains().await.map(drop));
    unavailable(backend.stats().await.map(drop));
    unavailable(backend.placement("vm").await.map(drop));
    unavailable(backend.apply_pins(&[pin("vm", 0, &[0])]).await.map(drop));
    // Still unavailable, and still no panic, on a second round (a reconnect is attempted each call).
    unavailable(backend.host_info().await.map(drop));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_backend() {
    let backend = backend();
    let calls = (0..8).map(|_| {
        let b = backend.clone();
        tokio::spawn(async move { b.stats().await.map(|s| s.domains.len()) })
    });
    for joined in futures::future::join_all(calls).await {
        assert!(joined.expect("task").expect("stats") >= 1);
    }
}

// The daemon-restart drill that used to be here (#[ignore]d, manual) is now an automated test on a private libvirtd:
// tests/libvirt_real.rs, `the_agent_survives_a_daemon_restart`.
