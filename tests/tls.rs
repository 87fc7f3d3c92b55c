//! Mutual TLS and roles over real gRPC on 127.0.0.1:0: the trusted controller reads and pins; a client without a
//! certificate, one from another CA, a read-only identity trying to pin, and plaintext are all refused, and the
//! placement they tried to change is unchanged when read back through the trusted controller. The controller also
//! refuses an agent whose certificate does not name the address it dialled.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::SimAgent;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::Code;
use vcpu_balancer::agent::ServeOptions;
use vcpu_balancer::certs::{generate_fleet, FleetSpec};
use vcpu_balancer::controller::AgentClient;
use vcpu_balancer::hypervisor::sim::{ManualClock, SimHypervisor};
use vcpu_balancer::model::PinRequest;
use vcpu_balancer::pb;
use vcpu_balancer::security::{PinPolicy, TlsFiles};

const TIMEOUT: Duration = Duration::from_secs(5);

const SCENARIO: &str = r#"
pcpus = 4
[[domain]]
name = "vm1"
vcpus = 2
affinity = [0]
load = 50
"#;

/// A fleet's certificates in a fresh directory, removed on drop.
struct Fleet {
    dir: PathBuf,
}

impl Fleet {
    fn new(tag: &str, hosts: &[&str]) -> Fleet {
        let dir = std::env::temp_dir().join(format!("vcpu-tls-{tag}-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        let spec = FleetSpec { readers: vec!["monitor".into()], ..FleetSpec::new(hosts.iter().map(|h| h.to_string()).collect()) };
        generate_fleet(&dir, &spec).expect("certificates");
        Fleet { dir }
    }

    fn files(&self, name: &str) -> TlsFiles {
        TlsFiles { cert: self.dir.join(format!("{name}.crt")), key: self.dir.join(format!("{name}.key")), ca: self.dir.join("ca.crt") }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn tls_agent(fleet: &Fleet, agent_cert: &str, pins: PinPolicy) -> SimAgent {
    let hv = Arc::new(SimHypervisor::new(&common::scenario(SCENARIO), "sim-tls", Arc::new(ManualClock::new(0))));
    let opts = ServeOptions { tls: Some(fleet.files(agent_cert).server_config().unwrap()), pins, ..Default::default() };
    SimAgent::start_opts(hv, "127.0.0.1:0", opts).await
}

fn client(addr: &str, files: &TlsFiles) -> AgentClient {
    AgentClient::with_tls(addr, TIMEOUT, Some(&files.client_tls().unwrap())).unwrap()
}

fn pin(vcpu: u32, pcpu: u32) -> PinRequest {
    PinRequest { domain: "vm1".into(), vcpu, pcpus: vec![pcpu], persist: false }
}

async fn affinity(c: &mut AgentClient) -> Vec<Vec<u32>> {
    c.placement("vm1").await.unwrap().vcpus.into_iter().map(|v| v.affinity).collect()
}

/// A raw client with the given TLS settings, for clients the controller would never build.
async fn raw_pin(addr: &str, tls: ClientTlsConfig) -> Result<(), Code> {
    let ep = Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap().timeout(TIMEOUT);
    let ch = match ep.connect().await {
        Ok(ch) => ch,
        Err(_) => return Err(Code::Unavailable),
    };
    let mut c = pb::agent_client::AgentClient::new(ch);
    let req = pb::ApplyPinsRequest { pins: vec![pb::PinVcpuRequest { domain: "vm1".into(), vcpu: 0, pcpus: vec![3], persist: false }] };
    c.apply_pins(req).await.map(|_| ()).map_err(|s| s.code())
}

fn pem(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// The controller's certificate reads and pins; a read-only identity reads but may not pin.
#[tokio::test]
async fn the_controller_pins_and_a_reader_only_reads() {
    let fleet = Fleet::new("roles", &["127.0.0.1"]);
    let agent = tls_agent(&fleet, "agent-127.0.0.1", PinPolicy::for_agent(true, &[])).await;
    let mut ctl = client(&agent.addr, &fleet.files("controller"));
    assert_eq!(ctl.get_stats().await.unwrap().domains.len(), 1);
    ctl.pin_vcpu(pin(1, 2)).await.unwrap();
    assert_eq!(affinity(&mut ctl).await, vec![vec![0], vec![2]]);

    let mut reader = client(&agent.addr, &fleet.files("reader-monitor"));
    assert_eq!(reader.get_stats().await.unwrap().domains.len(), 1, "a reader may read");
    let e = reader.pin_vcpu(pin(0, 3)).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert!(e.message().contains("monitor"), "the refusal names the identity: {e}");
    let e = reader.apply_pins(&[pin(0, 3), pin(1, 3)]).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    // Even a malformed batch from a reader is refused for its identity, before it is looked at.
    let e = reader.apply_pins(&[PinRequest { pcpus: vec![], ..pin(0, 0) }]).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert_eq!(affinity(&mut ctl).await, vec![vec![0], vec![2]], "the reader changed nothing");
    agent.stop().await;
}

/// No client certificate, a certificate from another CA, and plaintext: all refused, nothing changes.
#[tokio::test]
async fn untrusted_clients_are_refused_and_change_nothing() {
    let fleet = Fleet::new("refuse", &["127.0.0.1"]);
    let other = Fleet::new("other", &["127.0.0.1"]);
    let agent = tls_agent(&fleet, "agent-127.0.0.1", PinPolicy::for_agent(true, &[])).await;
    let mut ctl = client(&agent.addr, &fleet.files("controller"));
    let before = affinity(&mut ctl).await;

    // Trusts the agent, but presents no certificate.
    let no_cert = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem(&fleet.path("ca.crt"))));
    assert!(raw_pin(&agent.addr, no_cert).await.is_err(), "a client without a certificate pinned");

    // Trusts the agent, presents the other fleet's controller certificate (same name, wrong CA).
    let foreign = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem(&fleet.path("ca.crt"))))
        .identity(tonic::transport::Identity::from_pem(pem(&other.path("controller.crt")), pem(&other.path("controller.key"))));
    assert!(raw_pin(&agent.addr, foreign).await.is_err(), "a certificate from another CA pinned");

    // The other fleet's controller as the controller builds it: it does not trust this agent either.
    let mut stranger = client(&agent.addr, &other.files("controller"));
    assert!(stranger.pin_vcpu(pin(0, 3)).await.is_err());

    // Plaintext against the TLS port.
    let mut plain = AgentClient::new(&agent.addr, TIMEOUT).unwrap();
    assert!(plain.pin_vcpu(pin(0, 3)).await.is_err(), "plaintext pinned on a TLS agent");
    assert!(plain.get_stats().await.is_err(), "plaintext read a TLS agent");

    assert_eq!(affinity(&mut ctl).await, before, "a refused client changed the placement");
    agent.stop().await;
}

/// The allow-list is what `--pin-allow` says: the default controller identity is refused when it is not on it.
#[tokio::test]
async fn a_custom_allow_list_replaces_the_default() {
    let fleet = Fleet::new("allow", &["127.0.0.1"]);
    let agent = tls_agent(&fleet, "agent-127.0.0.1", PinPolicy::for_agent(true, &["monitor".into()])).await;
    let mut ctl = client(&agent.addr, &fleet.files("controller"));
    assert_eq!(ctl.pin_vcpu(pin(0, 1)).await.unwrap_err().code(), Some(Code::PermissionDenied));
    let mut monitor = client(&agent.addr, &fleet.files("reader-monitor"));
    monitor.pin_vcpu(pin(0, 1)).await.unwrap();
    assert_eq!(affinity(&mut ctl).await[0], vec![1]);
    agent.stop().await;
}

/// The controller refuses an agent whose certificate names another host than the one dialled.
#[tokio::test]
async fn the_controller_checks_the_agents_name() {
    let fleet = Fleet::new("name", &["hv-elsewhere"]);
    let agent = tls_agent(&fleet, "agent-hv-elsewhere", PinPolicy::for_agent(true, &[])).await;
    let mut ctl = client(&agent.addr, &fleet.files("controller"));
    let e = ctl.get_stats().await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
    // The same agent, read through a client that is told the right name, works: the refusal was the name.
    let tls = fleet.files("controller").client_config().unwrap().domain_name("hv-elsewhere");
    let ch = Endpoint::from_shared(format!("https://{}", agent.addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let mut c = pb::agent_client::AgentClient::new(ch);
    assert!(c.get_stats(pb::GetStatsRequest {}).await.is_ok());
    agent.stop().await;
}

/// The controller's host set and TLS together: a host added by a reload gets a TLS client like the hosts given at
/// start (a plaintext client could not even complete the handshake), and an agent serving TLS also counts the calls
/// it serves in its metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_added_by_a_reload_talks_tls_like_the_others() {
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;
    use vcpu_balancer::controller::report::ActionType;
    use vcpu_balancer::controller::{self, ClientSettings, LoopConfig, Observers};
    use vcpu_balancer::metrics::AgentMetrics;

    let fleet = Fleet::new("reload", &["127.0.0.1"]);
    let a = tls_agent(&fleet, "agent-127.0.0.1", PinPolicy::for_agent(true, &[])).await;
    let m = AgentMetrics::new();
    let hv = Arc::new(SimHypervisor::new(&common::scenario(SCENARIO), "sim-tls-b", Arc::new(ManualClock::new(0))));
    let opts = ServeOptions {
        tls: Some(fleet.files("agent-127.0.0.1").server_config().unwrap()),
        pins: PinPolicy::for_agent(true, &[]),
        metrics: Some(m.clone()),
        ..Default::default()
    };
    let b = SimAgent::start_opts(hv, "127.0.0.1:0", opts).await;
    let clients = ClientSettings { rpc_timeout: TIMEOUT, tls: Some(fleet.files("controller").client_tls().unwrap()) };
    let cfg = LoopConfig { interval: Duration::from_millis(100), dry_run: true, max_inflight: 1, ..Default::default() };
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let (tx, mut rx) = controller::report_channel(2);
    let stop = CancellationToken::new();
    let ctl = tokio::spawn(controller::run_dynamic(
        vec![a.addr.clone()],
        clients,
        cfg,
        Observers::default(),
        reload_rx,
        tx,
        stop.clone(),
    ));
    reload_tx.send(vec![a.addr.clone(), b.addr.clone()]).await.unwrap();
    let mut answered = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while answered.len() < 2 {
        let r = tokio::time::timeout_at(deadline, rx.recv()).await.expect("both hosts answer").expect("a report");
        assert_ne!(r.action.kind, ActionType::Error, "{}: {}", r.host, r.action.reason);
        answered.insert(r.host.clone());
    }
    assert!(answered.contains(&b.addr), "{answered:?}");
    let text = m.encode();
    assert!(
        text.lines().any(|l| l.starts_with(r#"vcpu_balancer_agent_rpc_duration_seconds_count{method="GetStats"}"#)),
        "the TLS agent counted the controller's GetStats:\n{text}"
    );
    stop.cancel();
    ctl.await.unwrap().unwrap();
    a.stop().await;
    b.stop().await;
}

/// The agent checks its TLS files before it listens, and a bad one is named: a key that is not the certificate's
/// and a CA file that holds no certificate. (tonic read them only when it started serving, after "agent listening",
/// with messages such as "no root trust anchors were provided".)
#[test]
fn bad_agent_tls_files_are_refused_naming_the_file() {
    let fleet = Fleet::new("badfiles", &["127.0.0.1", "127.0.0.2"]);
    let good = fleet.files("agent-127.0.0.1");
    assert!(good.server_config().is_ok());
    let mismatched = TlsFiles { key: fleet.path("agent-127.0.0.2.key"), ..good.clone() };
    let e = mismatched.server_config().expect_err("a key of another certificate").to_string();
    assert!(e.contains("agent-127.0.0.2.key"), "{e}");
    std::fs::write(fleet.path("garbage.pem"), "garbage\n").unwrap();
    let e = TlsFiles { ca: fleet.path("garbage.pem"), ..good.clone() }.server_config().expect_err("no CA").to_string();
    assert!(e.contains("garbage.pem") && e.contains("CA certificate"), "{e}");
    // The binary refuses to start, before it logs that it listens.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vcpu-agent"))
        .args(["--backend", "sim", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&good.cert)
        .arg("--tls-key")
        .arg(fleet.path("agent-127.0.0.2.key"))
        .arg("--tls-ca")
        .arg(&good.ca)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("agent-127.0.0.2.key") && !err.contains("listening"), "{err}");
}
