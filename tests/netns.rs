//! The controller across a real network: two `vcpu-agent --backend sim` processes, each in its own network namespace
//! behind its own veth pair and address, and the controller in this process on the host side. One agent is cut off
//! mid-run (its link set down) and brought back: the controller reports it down from the first round after the cut
//! (each round is bounded by one RPC deadline), the other host keeps every round, and the cut-off host is balanced
//! again after it returns.
//!
//! The test creates and deletes its own namespaces and links (names carry this process's id). Needs root and
//! iproute2. Run: `cargo test --features root-tests --test netns` (as root; it fails, rather than skips, without
//! root).
#![cfg(feature = "root-tests")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vcpu_balancer::controller::policy::PolicyConfig;
use vcpu_balancer::controller::report::{ActionType, RoundReport};
use vcpu_balancer::controller::{self, AgentClient, LoopConfig};

const INTERVAL: Duration = Duration::from_millis(300);
const RPC_TIMEOUT: Duration = Duration::from_millis(250);
const ROUNDS: u64 = 45;
const CUT_AT: u64 = 8;
const RESTORE_AT: u64 = 14;
const AGENT_PORT: u16 = 50151;

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip (iproute2)");
    assert!(st.success(), "ip {}", args.join(" "));
}

/// One namespace with a veth pair: host side `host_if` (x.y.z.1/30), namespace side (x.y.z.2/30).
struct Netns {
    name: String,
    host_if: String,
    agent_ip: String,
    agent: Option<Child>,
}

impl Netns {
    fn new(tag: char, subnet: u8) -> Netns {
        let pid = std::process::id();
        let name = format!("vcpub-{pid}-{tag}");
        // Interface names are at most 15 bytes.
        let host_if = format!("vb{}{tag}h", pid % 100_000);
        let ns_if = format!("vb{}{tag}n", pid % 100_000);
        let net = format!("10.{}.{}", 200 + (pid % 50) as u8, subnet);
        ip(&["netns", "add", &name]);
        let ns = Netns { name, host_if, agent_ip: format!("{net}.2"), agent: None };
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{net}.1/30"), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&["-n", &ns.name, "addr", "add", &format!("{net}.2/30"), "dev", &ns_if]);
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Starts the agent in the namespace and waits for its "agent listening" log line.
    fn start_agent(&mut self, scenario: &str) -> String {
        let listen = format!("{}:{AGENT_PORT}", self.agent_ip);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, env!("CARGO_BIN_EXE_vcpu-agent")])
            // Not loopback, so plaintext needs --insecure; the namespace is private to this test.
            .args(["--backend", "sim", "--scenario", scenario, "--listen", &listen, "--insecure", "--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec vcpu-agent");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        loop {
            let line = lines.next().expect("agent exited before listening").unwrap();
            if line.contains("agent listening") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        self.agent = Some(child);
        listen
    }

    fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespace deletes its end of the pair, which deletes the host end too.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).stderr(Stdio::null()).status();
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn settled(rs: &[RoundReport], n: usize) -> bool {
    let ok = |r: &RoundReport| r.action.kind == ActionType::None && r.pins_applied == 0 && r.spread.is_some_and(|s| s <= 10.0);
    (0..rs.len()).any(|i| rs.len() >= i + n && rs[i..].iter().all(ok))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_mid_run_is_reported_and_rebalanced_after_it_returns() {
    assert!(is_root(), "the netns test creates network namespaces: run it as root");
    let mut a = Netns::new('a', 1);
    let mut b = Netns::new('b', 2);
    let addr_a = a.start_agent("all-on-one");
    let addr_b = b.start_agent("split-first-last");

    let clients = vec![
        AgentClient::new(&addr_a, RPC_TIMEOUT).unwrap(),
        AgentClient::new(&addr_b, RPC_TIMEOUT).unwrap(),
    ];
    let cfg = LoopConfig { interval: INTERVAL, policy: PolicyConfig::default(), dry_run: false, rounds: Some(ROUNDS), ..Default::default() };
    let (tx, mut rx) = controller::report_channel(2);
    let ctl = tokio::spawn(controller::run_clients(clients, cfg, tx, CancellationToken::new()));
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    while let Some(r) = rx.recv().await {
        if r.host == addr_a {
            if r.round == CUT_AT {
                a.link(false);
            }
            if r.round == RESTORE_AT {
                a.link(true);
            }
            ra.push(r);
        } else {
            rb.push(r);
        }
    }
    ctl.await.unwrap();

    // Marked down at once: the link went down when round CUT_AT's report arrived, so round CUT_AT+1 (or, if it had
    // already sampled by then, CUT_AT+2) is an error, and every round until the restore is one.
    let cut = CUT_AT as usize;
    let first_err = ra[cut..].iter().position(|r| r.action.kind == ActionType::Error).expect("the cut was reported") + cut;
    assert!(first_err <= cut + 1, "first error only at round {}: {:#?}", ra[first_err].round, &ra[cut..=first_err]);
    assert!(ra[first_err..RESTORE_AT as usize].iter().all(|r| r.action.kind == ActionType::Error), "{ra:#?}");
    // Back after the link returns: a fresh baseline, then balanced again.
    let back = ra[RESTORE_AT as usize..].iter().position(|r| r.action.kind != ActionType::Error).expect("host a came back");
    assert_eq!(ra[RESTORE_AT as usize + back].action.kind, ActionType::Baseline);
    assert!(settled(&ra, 3), "host a balanced again: {:#?}", ra.last());
    // The other host did every round, none failed, and it was balanced.
    assert_eq!(rb.len() as u64, ROUNDS);
    assert!(rb.iter().all(|r| r.action.kind != ActionType::Error), "{rb:#?}");
    assert!(settled(&rb, 3), "host b balanced: {:#?}", rb.last());
}
