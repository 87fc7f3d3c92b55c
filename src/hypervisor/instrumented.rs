//! [`Instrumented`]: a `Hypervisor` that wraps another one and records each call's latency and errors in
//! [`AgentMetrics`]. Instrumenting at the trait boundary covers every backend the same way and leaves the backends
//! themselves untouched.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use crate::error::AgentError;
use crate::hypervisor::{Hypervisor, PinResults};
use crate::metrics::AgentMetrics;
use crate::model::{DomainPlacement, DomainSummary, HostInfo, HostStats, PinRequest};

/// A backend whose calls are timed and counted.
pub struct Instrumented<H: Hypervisor> {
    inner: Arc<H>,
    backend: &'static str,
    metrics: Arc<AgentMetrics>,
}

impl<H: Hypervisor> Instrumented<H> {
    /// Wraps `inner`; `backend` (`libvirt`, `sim`) labels its metrics.
    pub fn new(inner: Arc<H>, backend: &'static str, metrics: Arc<AgentMetrics>) -> Self {
        Instrumented { inner, backend, metrics }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &Arc<H> {
        &self.inner
    }

    async fn timed<T>(
        &self,
        operation: &'static str,
        fut: impl std::future::Future<Output = Result<T, AgentError>>,
    ) -> Result<T, AgentError> {
        let start = Instant::now();
        let r = fut.await;
        let kind = r.as_ref().err().map(|e| format!("{:?}", e.kind()));
        self.metrics.observe_hypervisor(self.backend, operation, start.elapsed(), kind.as_deref());
        r
    }
}

#[async_trait]
impl<H: Hypervisor> Hypervisor for Instrumented<H> {
    async fn host_info(&self) -> Result<HostInfo, AgentError> {
        self.timed("host_info", self.inner.host_info()).await
    }

    async fn list_domains(&self) -> Result<Vec<DomainSummary>, AgentError> {
        self.timed("list_domains", self.inner.list_domains()).await
    }

    async fn stats(&self) -> Result<HostStats, AgentError> {
        self.timed("stats", self.inner.stats()).await
    }

    async fn placement(&self, domain: &str) -> Result<DomainPlacement, AgentError> {
        self.timed("placement", self.inner.placement(domain)).await
    }

    async fn apply_pins(&self, pins: &[PinRequest]) -> Result<PinResults, AgentError> {
        // Per-pin failures (a domain that went away) are results, not a failed call; count them apart so that a
        // backend that refuses pins one by one still shows up.
        let r = self.timed("apply_pins", self.inner.apply_pins(pins)).await;
        if let Ok(results) = &r {
            for e in results.iter().filter_map(|x| x.as_ref().err()) {
                self.metrics.observe_hypervisor_pin_error(self.backend, &format!("{:?}", e.kind()));
            }
        }
        r
    }
}
