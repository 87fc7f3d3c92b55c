//! The controller: samples each host through its agent every interval, computes usage and applies the policy.
//!
//! - [`usage`] and [`policy`]: pure decision code (samples in, plan out).
//! - [`client`]: the gRPC client with a deadline on every call.
//! - [`host`]: one task per host, owning that host's previous sample; [`pins_file`]: its memory of its own pins on
//!   disk, across restarts.
//! - [`report`]: what a round produced, as a log line or JSON.
//! - [`show`]: one-shot views for operators (`show`, `pin`).
//! - [`supervisor`]: the set of host tasks, changed by reloads; [`state`]: the live state behind the status page;
//!   [`config`]: the controller's config file.
//! - [`demo`]: simulated agents in-process with the controller on them.
//! - [`evaluate`]: policies on simulated hosts in virtual time, with balancing metrics.

pub mod client;
pub mod config;
pub mod demo;
pub mod evaluate;
pub mod host;
pub mod pins_file;
pub mod policy;
pub mod report;
pub mod show;
pub mod state;
pub mod supervisor;
pub mod transport;
pub mod usage;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use client::{AgentClient, ClientError};
pub use host::LoopConfig;
pub use report::RoundReport;
pub use supervisor::{run_dynamic, ClientSettings, LastFailures, Observers};

/// Reports buffered per host before a slow consumer makes host tasks wait.
pub const REPORT_BUFFER_PER_HOST: usize = 16;

/// Checks every host address first (a typo refuses the whole command, before anything is pinned), then runs one
/// task per host until each has done `cfg.rounds` rounds or `shutdown` is cancelled. Reports go to `out`.
pub async fn run(
    hosts: Vec<String>,
    rpc_timeout: Duration,
    cfg: LoopConfig,
    out: mpsc::Sender<RoundReport>,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let clients = hosts.iter().map(|h| AgentClient::new(h, rpc_timeout)).collect::<Result<Vec<_>, _>>()?;
    run_clients(clients, cfg, out, shutdown).await;
    Ok(())
}

/// Runs one task per client (for example TLS clients made with [`AgentClient::with_tls`]) like [`run`], through
/// the same supervisor as [`run_dynamic`], with a host set that never changes.
pub async fn run_clients(
    clients: Vec<AgentClient>,
    cfg: LoopConfig,
    out: mpsc::Sender<RoundReport>,
    shutdown: CancellationToken,
) {
    // No reloads: the sender is dropped at once, so the set of hosts never changes.
    let (_, reload) = mpsc::channel(1);
    supervisor::supervise(clients, None, cfg, Observers::default(), reload, out, shutdown).await;
}

/// A channel sized for `hosts` hosts.
pub fn report_channel(hosts: usize) -> (mpsc::Sender<RoundReport>, mpsc::Receiver<RoundReport>) {
    mpsc::channel(REPORT_BUFFER_PER_HOST * hosts.max(1))
}
