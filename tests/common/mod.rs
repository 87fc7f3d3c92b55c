//! Helpers shared by the integration tests: simulated agents served over real gRPC on 127.0.0.1:0.
#![allow(dead_code)]

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vcpu_balancer::hypervisor::sim::{Clock, ScaledClock, Scenario, SimHypervisor};

/// A simulated agent running in this process.
pub struct SimAgent {
    pub addr: String,
    pub hv: Arc<SimHypervisor>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl SimAgent {
    /// Serves `scenario` on an ephemeral loopback port; the simulated clock runs `speed` times real time.
    pub async fn start(scenario: &Scenario, speed: f64) -> SimAgent {
        let clock: Arc<dyn Clock> = Arc::new(ScaledClock::new(speed));
        Self::start_with(Arc::new(SimHypervisor::new(scenario, "sim-test", clock)), "127.0.0.1:0").await
    }

    /// Serves an existing simulated hypervisor on `bind`.
    pub async fn start_with(hv: Arc<SimHypervisor>, bind: &str) -> SimAgent {
        Self::start_opts(hv, bind, vcpu_balancer::agent::ServeOptions::default()).await
    }

    /// Serves an existing simulated hypervisor on `bind` with TLS and a pin policy as `opts` say.
    pub async fn start_opts(hv: Arc<SimHypervisor>, bind: &str, opts: vcpu_balancer::agent::ServeOptions) -> SimAgent {
        let listener = TcpListener::bind(bind).await.expect("bind loopback");
        let addr = listener.local_addr().unwrap().to_string();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let h = hv.clone();
        let task = tokio::spawn(async move {
            vcpu_balancer::agent::serve_with(h, listener, opts, s.cancelled_owned()).await.expect("agent serves");
        });
        SimAgent { addr, hv, stop, task }
    }

    /// Stops serving and waits until the port is closed.
    pub async fn stop(self) -> Arc<SimHypervisor> {
        self.stop.cancel();
        let _ = self.task.await;
        self.hv
    }
}

/// A small host for contract tests: 4 pCPUs, `vm1` with 2 vCPUs pinned to pCPU 0 and `vm2` unpinned.
pub const SMALL_HOST: &str = r#"
pcpus = 4
[[domain]]
name = "vm1"
vcpus = 2
affinity = [0]
load = 50
[[domain]]
name = "vm2"
load = 20
"#;

/// A built-in scenario by name.
pub fn builtin(name: &str) -> Scenario {
    vcpu_balancer::hypervisor::sim::scenario::builtin(name).expect("built-in scenario")
}

/// A scenario from TOML text.
pub fn scenario(text: &str) -> Scenario {
    Scenario::parse(text, "test").expect("valid scenario")
}

/// A loopback address where nothing listens.
pub async fn dead_address() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap().to_string();
    drop(l);
    a
}

/// A `vcpu-agent` process listening on 127.0.0.1:0, found through its JSON log line; killed on drop.
pub struct AgentProcess {
    child: std::process::Child,
    pub addr: String,
}

impl AgentProcess {
    /// Starts `vcpu-agent` with `args` (plus `--listen 127.0.0.1:0 --log-format json`).
    pub fn start(args: &[&str]) -> AgentProcess {
        Self::start_on("127.0.0.1:0", args)
    }

    /// Starts `vcpu-agent` with `args` listening on `listen`.
    pub fn start_on(listen: &str, args: &[&str]) -> AgentProcess {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_vcpu-agent"))
            .args(args)
            .args(["--listen", listen, "--log-format", "json"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start vcpu-agent");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("agent exited before listening").unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["fields"]["message"] == "agent listening" {
                break v["fields"]["addr"].as_str().unwrap().to_string();
            }
        };
        // Keep draining the agent's log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        AgentProcess { child, addr }
    }

    /// A gRPC client to it.
    pub async fn client(&self) -> vcpu_balancer::pb::agent_client::AgentClient<tonic::transport::Channel> {
        vcpu_balancer::pb::agent_client::AgentClient::connect(format!("http://{}", self.addr)).await.unwrap()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
