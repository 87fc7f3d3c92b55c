//! The agent on a real libvirt daemon (not the in-process test driver): a domain destroyed between `GetStats` and
//! `ApplyPins`, libvirtd restarted under a running agent, and libvirtd hung (stopped) under it.
//!
//! Each test starts its own private `libvirtd` as a child process, so it never touches the system daemon or its
//! guests: the daemon runs as an unprivileged user (`nobody`) in session mode, with HOME and XDG dirs in a fresh
//! temporary directory, and the agent talks to its `test` driver through its private socket
//! (`test+unix:///default?socket=...`). That is the same RPC path as `qemu:///system` (client library, socket,
//! daemon), so disconnects and restarts are real.
//!
//! Needs: root (to drop the daemon to `nobody` and to reach its socket), `libvirtd` in PATH or /usr/sbin, and a build
//! with `--features libvirt,root-tests`. Run: `cargo test --features libvirt,root-tests --test libvirt_real`.
#![cfg(all(feature = "libvirt", feature = "root-tests"))]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tonic::Code;
use vcpu_balancer::pb;

/// The unprivileged account the private daemon runs as.
const DAEMON_UID: u32 = 65534;
const DAEMON_GID: u32 = 65534;
/// Attempts (each one short RPC or socket check, then this pause) before a daemon or agent counts as not coming up.
const ATTEMPTS: u32 = 150;
const PAUSE: Duration = Duration::from_millis(200);
/// The client's own bound on one call, far above any agent deadline: a regression fails instead of hanging the test.
const CLIENT_WAIT: Duration = Duration::from_secs(30);

fn libvirtd() -> PathBuf {
    for p in ["/usr/sbin/libvirtd", "/usr/local/sbin/libvirtd"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("libvirtd")
}

/// A private libvirtd: its own user, HOME, XDG dirs and socket. Stopped and removed on drop.
struct PrivateDaemon {
    dir: PathBuf,
    child: Option<Child>,
    /// The test driver's state lives only while some connection to it is open: this one keeps the domains the test
    /// made alive between its own calls and the agent's.
    keep: std::sync::Mutex<Option<virt::connect::Connect>>,
}

impl PrivateDaemon {
    fn start(tag: &str) -> PrivateDaemon {
        assert_eq!(unsafe_free_geteuid(), 0, "libvirt_real tests must run as root (they start a private libvirtd as nobody)");
        let dir = std::env::temp_dir().join(format!("vcpub-libvirtd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["home", "run", "config", "cache"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // The daemon (as nobody) must own its dirs; the test (as root) can reach them anyway.
        for sub in ["", "home", "run", "config", "cache"] {
            std::os::unix::fs::chown(dir.join(sub), Some(DAEMON_UID), Some(DAEMON_GID)).unwrap();
        }
        let mut d = PrivateDaemon { dir, child: None, keep: std::sync::Mutex::new(None) };
        d.spawn();
        d
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/libvirt/libvirt-sock")
    }

    fn uri(&self) -> String {
        format!("test+unix:///default?socket={}", self.socket().display())
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let child = Command::new("setpriv")
            .args([&format!("--reuid={DAEMON_UID}"), &format!("--regid={DAEMON_GID}"), "--clear-groups", "--"])
            .arg(libvirtd())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", self.dir.join("home"))
            .env("XDG_RUNTIME_DIR", self.dir.join("run"))
            .env("XDG_CONFIG_HOME", self.dir.join("config"))
            .env("XDG_CACHE_HOME", self.dir.join("cache"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a private libvirtd (setpriv and libvirtd must be installed)");
        self.child = Some(child);
        for _ in 0..ATTEMPTS {
            if self.socket().exists() {
                return;
            }
            std::thread::sleep(PAUSE);
        }
        panic!("private libvirtd did not create {}", self.socket().display());
    }

    /// Stops the daemon (SIGTERM, as `systemctl stop` does) and waits for it.
    fn stop(&mut self) {
        drop(self.keep.lock().unwrap().take());
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            // A daemon left paused by a failed test only acts on the SIGTERM once continued.
            let _ = Command::new("kill").arg("-CONT").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// Sends `sig` (e.g. `STOP`, `CONT`) to the daemon.
    fn signal(&self, sig: &str) {
        let c = self.child.as_ref().expect("daemon running");
        let st = Command::new("kill").arg(format!("-{sig}")).arg(c.id().to_string()).status().unwrap();
        assert!(st.success(), "kill -{sig} {}", c.id());
    }

    fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Runs `f` on the test's own connection to the daemon, opened on first use and kept open.
    fn with_conn<T>(&self, f: impl FnOnce(&virt::connect::Connect) -> T) -> T {
        let mut keep = self.keep.lock().unwrap();
        if keep.is_none() {
            *keep = Some(virt::connect::Connect::open(Some(&self.uri())).expect("connect to the private libvirtd"));
        }
        f(keep.as_ref().unwrap())
    }

    /// Creates a transient running domain with `nvcpus` vCPUs.
    fn create_domain(&self, name: &str, nvcpus: u32) {
        let xml = format!(
            "<domain type='test'><name>{name}</name><memory>8192</memory><vcpu>{nvcpus}</vcpu><os><type>hvm</type></os></domain>"
        );
        self.with_conn(|c| c.create_domain_xml(&xml, 0).expect("create domain"));
    }

    fn destroy_domain(&self, name: &str) {
        self.with_conn(|c| c.lookup_domain_by_name(name).expect("lookup").destroy().expect("destroy"));
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// `geteuid` without unsafe: the owner of /proc/self is the effective uid.
fn unsafe_free_geteuid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX)
}

fn pin(domain: &str, vcpu: u32, pcpus: &[u32]) -> pb::PinVcpuRequest {
    pb::PinVcpuRequest { domain: domain.into(), vcpu, pcpus: pcpus.to_vec(), persist: false }
}

/// Retries `GetStats` until the agent that answered `before` samples its daemon again: only UNAVAILABLE meanwhile,
/// then the same agent process (same instance id) serving the test driver's domain, without being restarted.
async fn serves_again(
    c: &mut pb::agent_client::AgentClient<tonic::transport::Channel>,
    before: &pb::GetStatsResponse,
) {
    let mut back = None;
    for _ in 0..ATTEMPTS {
        match tokio::time::timeout(CLIENT_WAIT, c.get_stats(pb::GetStatsRequest {})).await.expect("the agent answers") {
            Ok(r) => {
                back = Some(r.into_inner());
                break;
            }
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "only UNAVAILABLE until libvirtd answers again: {s}"),
        }
        tokio::time::sleep(PAUSE).await;
    }
    let back = back.expect("the agent serves again once libvirtd answers");
    assert_eq!(back.agent_instance, before.agent_instance, "same agent process");
    assert!(back.domains.iter().any(|d| d.name == "test"), "the daemon's test driver is served");
}

/// (a) A domain destroyed between `GetStats` and `ApplyPins`: its pin fails alone with NOT_FOUND, the other pin of
/// the batch is applied, and the agent goes on (the next `GetStats` no longer lists it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_destroyed_between_stats_and_pins_fails_alone() {
    let daemon = PrivateDaemon::start("destroyed");
    let (gone, stays) = (format!("vcpub-gone-{}", std::process::id()), format!("vcpub-stays-{}", std::process::id()));
    daemon.create_domain(&gone, 2);
    daemon.create_domain(&stays, 2);
    let agent = common::AgentProcess::start(&["--backend", "libvirt", "--uri", &daemon.uri()]);
    let mut c = agent.client().await;

    let stats = c.get_stats(pb::GetStatsRequest {}).await.expect("GetStats").into_inner();
    assert!(stats.domains.iter().any(|d| d.name == gone) && stats.domains.iter().any(|d| d.name == stays));
    let target = *stats.online_pcpus.last().expect("an online pCPU");

    daemon.destroy_domain(&gone);
    let res = c
        .apply_pins(pb::ApplyPinsRequest { pins: vec![pin(&gone, 0, &[target]), pin(&stays, 1, &[target])] })
        .await
        .expect("the batch is answered")
        .into_inner()
        .results;
    assert_eq!(Code::from_i32(res[0].code), Code::NotFound, "{res:?}");
    assert_eq!(Code::from_i32(res[1].code), Code::Ok, "{res:?}");
    let p = c.get_vcpu_placement(pb::GetVcpuPlacementRequest { domain: stays.clone() }).await.unwrap().into_inner();
    assert_eq!(p.vcpus[1].affinity, vec![target]);
    let after = c.get_stats(pb::GetStatsRequest {}).await.expect("the agent goes on").into_inner();
    assert!(after.domains.iter().all(|d| d.name != gone), "destroyed domain still listed");
}

/// (b) libvirtd restarted under a running agent: UNAVAILABLE while it is down, then samples again from the same
/// agent process (same instance id), without restarting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_survives_a_daemon_restart() {
    let mut daemon = PrivateDaemon::start("restart");
    let agent = common::AgentProcess::start(&["--backend", "libvirt", "--uri", &daemon.uri()]);
    let mut c = agent.client().await;
    let before = c.get_stats(pb::GetStatsRequest {}).await.expect("GetStats before").into_inner();

    daemon.stop();
    let down = c.get_stats(pb::GetStatsRequest {}).await.expect_err("GetStats with the daemon down");
    assert_eq!(down.code(), Code::Unavailable, "{down}");
    let pin_down = c.pin_vcpu(pin("test", 0, &[0])).await.expect_err("PinVcpu with the daemon down");
    assert_eq!(pin_down.code(), Code::Unavailable, "{pin_down}");

    daemon.restart();
    serves_again(&mut c, &before).await;
}

/// (c) libvirtd hangs without dying under a running agent (SIGSTOP: it still holds its socket, it just never answers):
/// a call answers UNAVAILABLE at the agent's `--libvirt-timeout`, not whenever the daemon comes back; the calls after
/// it, while it still waits, are not sent to libvirt and answer UNAVAILABLE at once; and the agent serves again by
/// itself once the daemon does (SIGCONT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_daemon_costs_a_deadline_not_a_hung_agent() {
    let daemon = PrivateDaemon::start("hung");
    let agent = common::AgentProcess::start(&["--backend", "libvirt", "--uri", &daemon.uri(), "--libvirt-timeout", "1s"]);
    let mut c = agent.client().await;
    let before = c.get_stats(pb::GetStatsRequest {}).await.expect("GetStats before").into_inner();

    daemon.signal("STOP");
    let hung = tokio::time::timeout(CLIENT_WAIT, c.get_stats(pb::GetStatsRequest {}))
        .await
        .expect("the agent answers while libvirtd hangs")
        .expect_err("GetStats with libvirtd hung");
    assert_eq!(hung.code(), Code::Unavailable, "{hung}");
    assert!(hung.message().contains("did not answer a stats sample within 1s"), "{hung}");
    // That sample still waits for libvirt on a blocking thread: later calls are not sent at all (each would hold
    // one more thread for as long as the hang lasts), and answer at once.
    let pin_hung = tokio::time::timeout(CLIENT_WAIT, c.pin_vcpu(pin("test", 0, &[0])))
        .await
        .expect("the agent answers while libvirtd hangs")
        .expect_err("PinVcpu with libvirtd hung");
    assert_eq!(pin_hung.code(), Code::Unavailable, "{pin_hung}");
    assert!(pin_hung.message().contains("no new call is sent until libvirt answers it"), "{pin_hung}");
    let again = c.get_stats(pb::GetStatsRequest {}).await.expect_err("GetStats with libvirtd still hung");
    assert!(again.message().contains("no new call is sent until libvirt answers it"), "{again}");

    daemon.signal("CONT");
    serves_again(&mut c, &before).await;
}
