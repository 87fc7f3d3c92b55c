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
        let listener = TcpListener::bind(bind).await.expect("bind loopback");
        let addr = listener.local_addr().unwrap().to_string();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let h = hv.clone();
        let task = tokio::spawn(async move {
            vcpu_balancer::agent::serve(h, listener, s.cancelled_owned()).await.expect("agent serves");
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
