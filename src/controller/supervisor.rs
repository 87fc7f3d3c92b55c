//! The set of per-host tasks of a running controller: one task per host, each with its own cancellation token, so
//! that a reload can start and stop hosts without touching the others (their baselines live in their tasks). Every
//! report passes through one recorder that feeds the status page's state and the metrics, then `--json`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use crate::security::ClientTls;

use crate::controller::client::{address_key, AgentClient, ClientError};
use crate::controller::host::{self, LoopConfig};
use crate::controller::report::RoundReport;
use crate::controller::{state, REPORT_BUFFER_PER_HOST};
use crate::metrics::ControllerMetrics;

/// Where the run loop records each report besides `out`: the status page's state and the metrics.
#[derive(Clone, Default)]
pub struct Observers {
    pub state: Option<state::StateStore>,
    pub metrics: Option<Arc<ControllerMetrics>>,
}

/// What travels from the host tasks to the recorder. `Removed` goes through the same channel as the reports, so
/// it comes after the last report of the host's task and the host's state is not brought back by a late report.
enum Msg {
    Report(Box<RoundReport>),
    Removed(String),
}

/// One running host task.
struct Running {
    stop: CancellationToken,
    id: tokio::task::Id,
}

/// How the supervisor makes the client of a host: the same way for the hosts given at start and for those a
/// reload adds, so a host added on SIGHUP talks mutual TLS exactly like the others.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Deadline of each RPC.
    pub rpc_timeout: Duration,
    /// Mutual TLS to the agents; `None` = plaintext.
    pub tls: Option<ClientTls>,
}

impl ClientSettings {
    /// Plaintext clients with this RPC deadline.
    pub fn plaintext(rpc_timeout: Duration) -> Self {
        ClientSettings { rpc_timeout, tls: None }
    }

    /// The client of `host` (checks the address; connects on first use).
    pub fn client(&self, host: &str) -> Result<AgentClient, ClientError> {
        AgentClient::with_tls(host, self.rpc_timeout, self.tls.as_ref())
    }
}

/// [`crate::controller::run`] with a host list that changes while it runs: each `Vec<String>` received on
/// `reload` is the new host list. Hosts added start (first round is a baseline), hosts removed stop (a GetStats in
/// flight is dropped, an ApplyPins in flight is waited for and its pins recorded), and the others keep running
/// untouched, with their baselines. Every address is checked first (a typo refuses the whole command); a reloaded
/// list with an invalid address is refused whole and the current hosts keep running. Returns when every host has done `cfg.rounds` rounds, or after `shutdown` once every host task has
/// stopped.
pub async fn run_dynamic(
    hosts: Vec<String>,
    clients: ClientSettings,
    cfg: LoopConfig,
    obs: Observers,
    reload: mpsc::Receiver<Vec<String>>,
    out: mpsc::Sender<RoundReport>,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let initial = hosts.iter().map(|h| clients.client(h)).collect::<Result<Vec<_>, _>>()?;
    supervise(initial, Some(clients), cfg, obs, reload, out, shutdown).await;
    Ok(())
}

/// Runs one task per client in `initial` and applies the host lists received on `reload`, making the clients of
/// added hosts with `factory` (without one, reloads are refused). One semaphore of `cfg.max_inflight` permits is
/// shared by every host task, those a reload starts included.
pub(crate) async fn supervise(
    initial: Vec<AgentClient>,
    factory: Option<ClientSettings>,
    cfg: LoopConfig,
    obs: Observers,
    mut reload: mpsc::Receiver<Vec<String>>,
    out: mpsc::Sender<RoundReport>,
    shutdown: CancellationToken,
) {
    let inflight = Arc::new(Semaphore::new(cfg.max_inflight.max(1)));
    let (tx, rx) = mpsc::channel(REPORT_BUFFER_PER_HOST * initial.len().max(1));
    let recorder = tokio::spawn(record(rx, obs.clone(), out));
    let mut tasks = tokio::task::JoinSet::new();
    let mut running: HashMap<String, Running> = HashMap::new();
    // Tasks asked to stop, by task id, until they have.
    let mut stopping: HashMap<tokio::task::Id, String> = HashMap::new();
    let start = |mut client: AgentClient, tasks: &mut tokio::task::JoinSet<()>, running: &mut HashMap<String, Running>| {
        let host = client.host().to_string();
        if let Some(m) = &obs.metrics {
            client = client.with_metrics(m.clone());
        }
        if let Some(s) = &obs.state {
            s.add_host(&host);
        }
        let (tx, stop) = (tx.clone(), shutdown.child_token());
        let (cfg, task_stop, inflight) = (cfg.clone(), stop.clone(), inflight.clone());
        // The task ends only after its last report is in the recorder's channel, so a `Removed` sent after the
        // task has joined always comes after that report.
        let id = tasks
            .spawn(async move {
                let (rtx, mut rrx) = mpsc::channel::<RoundReport>(REPORT_BUFFER_PER_HOST);
                let forward = async move {
                    while let Some(r) = rrx.recv().await {
                        if tx.send(Msg::Report(Box::new(r))).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::join!(host::run_host(client, cfg, inflight, rtx, task_stop), forward);
            })
            .id();
        running.insert(host, Running { stop, id });
    };
    let mut seen = HashMap::new();
    for client in initial {
        match seen.entry(address_key(client.host())) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(client.host().to_string());
                start(client, &mut tasks, &mut running);
            }
            std::collections::hash_map::Entry::Occupied(e) => {
                // Two tasks on one agent would each take the other's pins for an operator's.
                tracing::warn!(host = %client.host(), same_as = %e.get(), "host given twice: balanced once");
            }
        }
    }
    let mut reload_open = true;
    loop {
        if let Some(m) = &obs.metrics {
            m.set_hosts_configured(running.len());
        }
        if tasks.is_empty() && (cfg.rounds.is_some() || !reload_open || shutdown.is_cancelled()) {
            break;
        }
        tokio::select! {
            joined = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let id = match joined {
                    Some(Ok((id, ()))) => id,
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "host task panicked");
                        e.id()
                    }
                    None => continue,
                };
                if let Some(host) = stopping.remove(&id) {
                    // Re-added while it was stopping: the new task owns the host's state now.
                    if !running.contains_key(&host) {
                        let _ = tx.send(Msg::Removed(host)).await;
                    }
                } else {
                    running.retain(|_, r| r.id != id);
                }
            }
            new = reload.recv(), if reload_open && !shutdown.is_cancelled() => {
                let Some(new) = new else {
                    reload_open = false;
                    continue;
                };
                let Some(factory) = &factory else {
                    tracing::error!("reload refused: this controller was started with fixed clients");
                    continue;
                };
                let new = dedup(new);
                // A host written another way (`hv1` then `hv1:50151`) is the same agent: its task keeps running.
                let new_keys: std::collections::HashSet<String> = new.iter().map(|h| address_key(h)).collect();
                let running_keys: std::collections::HashSet<String> = running.keys().map(|h| address_key(h)).collect();
                // Clients for the added hosts are made before anything changes: one bad address refuses the list.
                let added: Result<Vec<AgentClient>, ClientError> =
                    new.iter().filter(|h| !running_keys.contains(&address_key(h))).map(|h| factory.client(h)).collect();
                let added = match added {
                    Ok(a) => a,
                    Err(bad) => {
                        tracing::error!(error = %bad, "reload refused; the current hosts keep running");
                        continue;
                    }
                };
                let gone: Vec<String> = running.keys().filter(|h| !new_keys.contains(&address_key(h))).cloned().collect();
                for h in gone {
                    if let Some(r) = running.remove(&h) {
                        tracing::info!(host = %h, "host removed from the host list; stopping it");
                        r.stop.cancel();
                        stopping.insert(r.id, h);
                    }
                }
                for client in added {
                    tracing::info!(host = %client.host(), "host added to the host list; starting it");
                    start(client, &mut tasks, &mut running);
                }
            }
            () = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
        }
    }
    drop(tx);
    let _ = recorder.await;
}

/// The host list without repeats (the same agent written two ways is a repeat, see [`address_key`]), in the given
/// order, names trimmed.
fn dedup(hosts: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    hosts.into_iter().map(|h| h.trim().to_string()).filter(|h| seen.insert(address_key(h))).collect()
}

/// Records every report in the state and the metrics, then passes it on to `out`.
async fn record(mut rx: mpsc::Receiver<Msg>, obs: Observers, out: mpsc::Sender<RoundReport>) {
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Report(r) => {
                if let Some(s) = &obs.state {
                    s.record(&r);
                }
                if let Some(m) = &obs.metrics {
                    m.observe_round(&r);
                }
                // A consumer that went away does not stop the balancing.
                let _ = out.send(*r).await;
            }
            Msg::Removed(host) => {
                if let Some(s) = &obs.state {
                    s.remove_host(&host);
                }
                // Also without a status page (`--metrics-listen` alone): the metrics know their own pCPU gauges.
                if let Some(m) = &obs.metrics {
                    m.forget_host(&host);
                }
            }
        }
    }
}

