//! The simulated hypervisor: a [`Hypervisor`] backed by a [`SimHost`] model, so the whole system runs and can be
//! demonstrated on any machine. It is a product feature (quick start, demo, policy evaluation), not a test double.
//!
//! Time comes from a [`Clock`]: the agent's monotonic clock in production, a manual clock for virtual-time runs.
//! For fault drills the backend can be made slow ([`SimHypervisor::set_latency`]) or unreachable
//! ([`SimHypervisor::set_unavailable`]).

pub mod model;
pub mod rng;
pub mod scenario;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

pub use model::SimHost;
pub use scenario::{LoadProfile, Scenario, ScenarioError};

use crate::error::AgentError;
use crate::hypervisor::{Hypervisor, PinResults};
use crate::model::{DomainPlacement, DomainSummary, HostInfo, HostStats, PinRequest};

/// A source of monotonic time in ns.
pub trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> u64;
}

/// The process's monotonic clock, counted from when this clock was made.
#[derive(Debug)]
pub struct MonotonicClock {
    start: std::time::Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        MonotonicClock { start: std::time::Instant::now() }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// The monotonic clock sped up by a factor: simulated load phases of minutes play out in seconds (demo, tests).
#[derive(Debug)]
pub struct ScaledClock {
    start: std::time::Instant,
    factor: f64,
}

impl ScaledClock {
    pub fn new(factor: f64) -> Self {
        ScaledClock { start: std::time::Instant::now(), factor: factor.max(f64::MIN_POSITIVE) }
    }
}

impl Clock for ScaledClock {
    fn now_ns(&self) -> u64 {
        (self.start.elapsed().as_nanos() as f64 * self.factor) as u64
    }
}

/// A clock that moves only when told: virtual time for evaluations and deterministic tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    pub fn new(start_ns: u64) -> Self {
        ManualClock { now: AtomicU64::new(start_ns) }
    }

    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// The simulated backend.
pub struct SimHypervisor {
    hostname: String,
    /// New for every simulated host, as a boot: its domains all start afresh, numbered from 1 again.
    boot_id: String,
    host: Mutex<SimHost>,
    clock: Arc<dyn Clock>,
    latency_ns: AtomicU64,
    unavailable: AtomicBool,
}

impl SimHypervisor {
    /// A simulated host running `scenario`, timed by `clock`.
    pub fn new(scenario: &Scenario, hostname: impl Into<String>, clock: Arc<dyn Clock>) -> Self {
        let host = SimHost::new(scenario, clock.now_ns());
        SimHypervisor {
            hostname: hostname.into(),
            boot_id: crate::hypervisor::format_uuid(&rand::random::<u128>().to_be_bytes()),
            host: Mutex::new(host),
            clock,
            latency_ns: AtomicU64::new(0),
            unavailable: AtomicBool::new(false),
        }
    }

    /// Delays every call by `latency` (a slow host).
    pub fn set_latency(&self, latency: Duration) {
        self.latency_ns.store(latency.as_nanos() as u64, Ordering::SeqCst);
    }

    /// Makes every call fail with UNAVAILABLE (a hypervisor that went away) until set back.
    pub fn set_unavailable(&self, down: bool) {
        self.unavailable.store(down, Ordering::SeqCst);
    }

    /// Runs `f` on the model at the current time: for tests and drills that start, stop or change domains.
    pub fn with_host<T>(&self, f: impl FnOnce(&mut SimHost, u64) -> T) -> T {
        let now = self.clock.now_ns();
        f(&mut self.lock(), now)
    }

    // The lock is never held across an await, and poisoning only follows a panic in the model, after which the
    // model's state is still consistent (every mutation is completed before it can panic), so keep serving.
    fn lock(&self) -> MutexGuard<'_, SimHost> {
        self.host.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn gate(&self) -> Result<(), AgentError> {
        let latency = self.latency_ns.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_nanos(latency)).await;
        }
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(AgentError::Unavailable("simulated hypervisor is down".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Hypervisor for SimHypervisor {
    async fn host_info(&self) -> Result<HostInfo, AgentError> {
        self.gate().await?;
        let npcpus = self.lock().npcpus();
        Ok(HostInfo {
            hostname: self.hostname.clone(),
            backend: "sim".into(),
            hypervisor_version: format!("sim {}", crate::VERSION),
            library_version: format!("vcpu-balancer {}", crate::VERSION),
            npcpus,
            online_pcpus: (0..npcpus).collect(),
            agent_version: crate::VERSION.into(),
        })
    }

    async fn list_domains(&self) -> Result<Vec<DomainSummary>, AgentError> {
        self.gate().await?;
        Ok(self.lock().list())
    }

    async fn stats(&self) -> Result<HostStats, AgentError> {
        self.gate().await?;
        let now = self.clock.now_ns();
        let mut host = self.lock();
        let domains = host.stats(now);
        let npcpus = host.npcpus();
        Ok(HostStats {
            sample_time_ns: host.now_ns(),
            npcpus,
            online_pcpus: (0..npcpus).collect(),
            agent_instance: String::new(),
            boot_id: self.boot_id.clone(),
            domains,
        })
    }

    async fn placement(&self, domain: &str) -> Result<DomainPlacement, AgentError> {
        self.gate().await?;
        self.lock().placement(domain)
    }

    async fn apply_pins(&self, pins: &[PinRequest]) -> Result<PinResults, AgentError> {
        self.gate().await?;
        let now = self.clock.now_ns();
        self.lock().apply_pins(pins, now)
    }
}
