//! Many simulated hosts from one agent process (`vcpu-agent --backend sim --sim-hosts N`), each on its own port, so
//! a fleet of a thousand hosts can be tried, and benchmarked, on one machine.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::hypervisor::sim::{Clock, MonotonicClock, Scenario, SimHypervisor};

/// A port of the fleet that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (simulated host {index} of {count}): {error}")]
pub struct FleetBindError {
    pub addr: SocketAddr,
    pub index: usize,
    pub count: usize,
    /// In the message, not a `source()`: printed with its chain, it would be said twice.
    pub error: std::io::Error,
}

/// Raises this process's open-file limit to its hard limit: a fleet of N hosts needs N listeners plus their
/// connections, more than the usual soft limit of 1024.
pub fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// Binds `count` ports from `base_port` on `ip` (all of them, before serving any, so a taken port fails the whole
/// fleet), then serves simulated host `i` (hostname `sim-<i>`, running `scenario`) on `base_port + i` until
/// `shutdown`. Returns the bound addresses through `on_ready` before serving.
pub async fn serve_sim_fleet(
    scenario: &Scenario,
    count: usize,
    ip: IpAddr,
    base_port: u16,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&[SocketAddr]),
) -> Result<(), FleetBindError> {
    let mut listeners = Vec::with_capacity(count);
    for index in 0..count {
        // Past 65535 there is no port to bind: refused as such, never a second bind of the last port.
        let port = match u16::try_from(usize::from(base_port) + index) {
            _ if base_port == 0 => 0,
            Ok(p) => p,
            Err(_) => {
                let error = std::io::Error::new(std::io::ErrorKind::InvalidInput, "port number past 65535");
                return Err(FleetBindError { addr: SocketAddr::new(ip, u16::MAX), index, count, error });
            }
        };
        let addr = SocketAddr::new(ip, port);
        let l = TcpListener::bind(addr).await.map_err(|error| FleetBindError { addr, index, count, error })?;
        listeners.push(l);
    }
    let addrs: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    on_ready(&addrs);
    // One clock for the fleet: every host's monotonic time is the process's.
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
    let mut servers = tokio::task::JoinSet::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        let hv = Arc::new(SimHypervisor::new(scenario, format!("sim-{index}"), clock.clone()));
        let stop = shutdown.clone();
        servers.spawn(async move { crate::agent::serve_quiet(hv, listener, stop.cancelled_owned()).await });
    }
    while let Some(r) = servers.join_next().await {
        match r {
            Ok(Err(e)) => tracing::error!(error = %e, "simulated host stopped with an error"),
            Err(e) => tracing::error!(error = %e, "simulated host task panicked"),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}
