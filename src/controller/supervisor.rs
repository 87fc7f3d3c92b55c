//! The set of per-host tasks of a running controller: one task per host, each with its own cancellation token, so
//! that a reload can start and stop hosts without touching the others (their baselines live in their tasks). Every
//! report passes through one recorder that feeds the status page's state and the metrics, then `--json`. A host
//! task that panics (a bug, never an unreachable host: those are reported rounds) is reported as an error round and
//! started again after a delay that grows while it keeps panicking, so one host's bug costs only that host.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use crate::security::ClientTls;

use crate::controller::client::{address_key, AgentClient, ClientError};
use crate::controller::host::{self, LoopConfig};
use crate::controller::report::{ActionReport, ActionType, RoundReport};
use crate::controller::{state, REPORT_BUFFER_PER_HOST};
use crate::metrics::ControllerMetrics;

/// The wait before a host task that panicked is started again, doubled for each further panic in a row.
pub const TASK_RESTART_DELAY: Duration = Duration::from_secs(1);
/// The longest wait before a host task that keeps panicking is started again; a task that ran this long without
/// panicking starts its count over.
pub const TASK_RESTART_MAX_DELAY: Duration = Duration::from_secs(60);

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
    /// A handle on the same connection, to start the task again if it panics.
    client: AgentClient,
    /// Panics in a row, for the restart delay.
    panics: u32,
    started: Instant,
    /// The last round the task reported, so that the report of its panic follows it.
    last_round: Arc<AtomicU64>,
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
/// stopped, with the hosts still in the list whose last round was an `error` (see [`LastFailures`]).
pub async fn run_dynamic(
    hosts: Vec<String>,
    clients: ClientSettings,
    cfg: LoopConfig,
    obs: Observers,
    reload: mpsc::Receiver<Vec<String>>,
    out: mpsc::Sender<RoundReport>,
    shutdown: CancellationToken,
) -> Result<LastFailures, ClientError> {
    let initial = hosts.iter().map(|h| clients.client(h)).collect::<Result<Vec<_>, _>>()?;
    Ok(supervise(initial, Some(clients), cfg, obs, reload, out, shutdown).await)
}

/// Each host whose last round was an `error`, with that round's reason: `run --rounds N` exits with whether every
/// host ended reachable and obeyed. A host a reload removed is not in it, whatever its last round was.
pub type LastFailures = std::collections::BTreeMap<String, String>;

/// Runs one task per client in `initial` and applies the host lists received on `reload`, making the clients of
/// added hosts with `factory` (without one, reloads are refused). One semaphore of `cfg.max_inflight` permits is
/// shared by every host task, those a reload starts included.
pub(crate) async fn supervise(
    initial: Vec<AgentClient>,
    factory: Option<ClientSettings>,
    cfg: LoopConfig,
    obs: Observers,
    reload: mpsc::Receiver<Vec<String>>,
    out: mpsc::Sender<RoundReport>,
    shutdown: CancellationToken,
) -> LastFailures {
    supervise_with(initial, factory, cfg, obs, reload, out, shutdown, host::run_host).await
}

/// [`supervise`] with the per-host task given: [`host::run_host`], or in tests one that fails on purpose.
#[allow(clippy::too_many_arguments)]
async fn supervise_with<F, Fut>(
    initial: Vec<AgentClient>,
    factory: Option<ClientSettings>,
    cfg: LoopConfig,
    obs: Observers,
    mut reload: mpsc::Receiver<Vec<String>>,
    out: mpsc::Sender<RoundReport>,
    shutdown: CancellationToken,
    run_host: F,
) -> LastFailures
where
    F: Fn(AgentClient, LoopConfig, Arc<Semaphore>, mpsc::Sender<RoundReport>, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let inflight = Arc::new(Semaphore::new(cfg.max_inflight.max(1)));
    let (tx, rx) = mpsc::channel(REPORT_BUFFER_PER_HOST * initial.len().max(1));
    let recorder = tokio::spawn(record(rx, obs.clone(), out));
    let mut tasks = tokio::task::JoinSet::new();
    let mut running: HashMap<String, Running> = HashMap::new();
    // Tasks asked to stop, by task id, until they have.
    let mut stopping: HashMap<tokio::task::Id, String> = HashMap::new();
    // `delay` holds back a restarted task; `panics` carries its count over.
    let start = |mut client: AgentClient,
                 delay: Duration,
                 panics: u32,
                 tasks: &mut tokio::task::JoinSet<()>,
                 running: &mut HashMap<String, Running>| {
        let host = client.host().to_string();
        if let Some(m) = &obs.metrics {
            client = client.with_metrics(m.clone());
        }
        if let Some(s) = &obs.state {
            s.add_host(&host);
        }
        let (tx, stop) = (tx.clone(), shutdown.child_token());
        let last_round = Arc::new(AtomicU64::new(0));
        let seen = last_round.clone();
        let (rtx, mut rrx) = mpsc::channel::<RoundReport>(REPORT_BUFFER_PER_HOST);
        let task = run_host(client.clone(), cfg.clone(), inflight.clone(), rtx, stop.clone());
        let task_stop = stop.clone();
        // The task ends only after its last report is in the recorder's channel, so a `Removed` sent after the
        // task has joined always comes after that report.
        let id = tasks
            .spawn(async move {
                let forward = async move {
                    while let Some(r) = rrx.recv().await {
                        seen.store(r.round, Ordering::Relaxed);
                        if tx.send(Msg::Report(Box::new(r))).await.is_err() {
                            break;
                        }
                    }
                };
                if !delay.is_zero() {
                    tokio::select! {
                        () = task_stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                tokio::join!(task, forward);
            })
            .id();
        running.insert(host, Running { stop, id, client, panics, started: Instant::now(), last_round });
    };
    let mut seen = HashMap::new();
    for client in initial {
        match seen.entry(address_key(client.host())) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(client.host().to_string());
                start(client, Duration::ZERO, 0, &mut tasks, &mut running);
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
                let (id, panic) = match joined {
                    Some(Ok((id, ()))) => (id, None),
                    Some(Err(e)) => (e.id(), Some(panic_message(e))),
                    None => continue,
                };
                if let Some(host) = stopping.remove(&id) {
                    // Re-added while it was stopping: the new task owns the host's state now.
                    if !running.contains_key(&host) {
                        let _ = tx.send(Msg::Removed(host)).await;
                    }
                    continue;
                }
                let Some(host) = running.iter().find(|(_, r)| r.id == id).map(|(h, _)| h.clone()) else { continue };
                let Some(r) = running.remove(&host) else { continue };
                let Some(panic) = panic else { continue };
                if shutdown.is_cancelled() {
                    tracing::error!(host = %host, panic = %panic, "host task panicked while stopping");
                    continue;
                }
                // Its baseline and its memory of its pins went with it: the restarted task starts from a baseline
                // (and from the pins file with `--state-dir`), as after a controller restart.
                let panics = if r.started.elapsed() >= TASK_RESTART_MAX_DELAY { 1 } else { r.panics + 1 };
                let delay = restart_delay(panics);
                tracing::error!(host = %host, panic = %panic, restart_in = ?delay, panics, "host task panicked; restarting it");
                let reason = format!("host task failed ({panic}); restarting it in {:.0}s", delay.as_secs_f64());
                let round = r.last_round.load(Ordering::Relaxed) + 1;
                let report = RoundReport::bare(&host, round, ActionReport::simple(ActionType::Error, reason), cfg.dry_run);
                let _ = tx.send(Msg::Report(Box::new(report))).await;
                start(r.client, delay, panics, &mut tasks, &mut running);
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
                    start(client, Duration::ZERO, 0, &mut tasks, &mut running);
                }
            }
            () = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
        }
    }
    drop(tx);
    recorder.await.unwrap_or_default()
}

/// How long to wait before starting a host task again after its `panics`-th panic in a row.
fn restart_delay(panics: u32) -> Duration {
    TASK_RESTART_DELAY.saturating_mul(1 << panics.saturating_sub(1).min(16)).min(TASK_RESTART_MAX_DELAY)
}

/// What a panicking task said, for the log and the status page.
fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let p = e.into_panic();
    p.downcast_ref::<&str>().map(|s| (*s).to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "panic".into())
}

/// The host list without repeats (the same agent written two ways is a repeat, see [`address_key`]), in the given
/// order, names trimmed.
fn dedup(hosts: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    hosts.into_iter().map(|h| h.trim().to_string()).filter(|h| seen.insert(address_key(h))).collect()
}

/// Records every report in the state and the metrics, then passes it on to `out`. Returns, once every sender is
/// gone, the hosts whose last round failed.
async fn record(mut rx: mpsc::Receiver<Msg>, obs: Observers, out: mpsc::Sender<RoundReport>) -> LastFailures {
    let mut failed = LastFailures::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Report(r) => {
                if r.action.kind == ActionType::Error {
                    failed.insert(r.host.clone(), r.action.reason.clone());
                } else {
                    failed.remove(&r.host);
                }
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
                failed.remove(&host);
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
    failed
}


#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn the_restart_delay_doubles_up_to_its_cap() {
        assert_eq!(restart_delay(1), TASK_RESTART_DELAY);
        assert_eq!(restart_delay(2), TASK_RESTART_DELAY * 2);
        assert_eq!(restart_delay(3), TASK_RESTART_DELAY * 4);
        assert_eq!(restart_delay(40), TASK_RESTART_MAX_DELAY);
    }

    /// A report of `kind` from `host`'s task.
    fn report(host: &str, round: u64, kind: ActionType) -> RoundReport {
        RoundReport::bare(host, round, ActionReport::simple(kind, "test"), false)
    }

    /// The hosts a run ends with failed are those whose last round was an error and that are still in the list: a
    /// host that recovered is not, nor one a reload removed while it was failing.
    #[tokio::test(start_paused = true)]
    async fn the_run_ends_with_the_hosts_whose_last_round_failed() {
        let task = |client: AgentClient, cfg: LoopConfig, _: Arc<Semaphore>, out: mpsc::Sender<RoundReport>, stop: CancellationToken| async move {
            let host = client.host().to_string();
            for round in 1..=cfg.rounds.unwrap() {
                let kind = match host.as_str() {
                    "recovers:1" if round == 1 => ActionType::Error,
                    "recovers:1" => ActionType::None,
                    _ => ActionType::Error,
                };
                out.send(report(&host, round, kind)).await.unwrap();
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        };
        let hosts = ["down:1", "removed:1", "recovers:1"];
        let clients = hosts.map(|h| AgentClient::new(h, Duration::from_secs(1)).unwrap()).to_vec();
        let (out, mut rx) = mpsc::channel(64);
        let (reload_tx, reload) = mpsc::channel(1);
        let cfg = LoopConfig { rounds: Some(3), ..LoopConfig::default() };
        let factory = Some(ClientSettings::plaintext(Duration::from_secs(1)));
        let sup = tokio::spawn(supervise_with(clients, factory, cfg, Observers::default(), reload, out, CancellationToken::new(), task));
        // Every host has failed once before the reload takes `removed` out.
        let mut first = std::collections::HashSet::new();
        while first.len() < hosts.len() {
            first.insert(rx.recv().await.unwrap().host);
        }
        reload_tx.send(vec!["down:1".into(), "recovers:1".into()]).await.unwrap();
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let failed = sup.await.unwrap();
        drain.await.unwrap();
        assert_eq!(failed.keys().collect::<Vec<_>>(), ["down:1"], "{failed:?}");
        assert_eq!(failed["down:1"], "test");
    }

    /// Host `bad`'s task reports one round and then panics in the next, the first time only; `good`'s reports every second.
    /// The panic is reported as an error round of `bad`, its task comes back after the restart delay, and `good`
    /// is not held up meanwhile.
    #[tokio::test(start_paused = true)]
    async fn a_host_task_that_panics_is_reported_and_started_again() {
        let starts = Arc::new(AtomicUsize::new(0));
        let counted = starts.clone();
        let task = move |client: AgentClient, _: LoopConfig, _: Arc<Semaphore>, out: mpsc::Sender<RoundReport>, stop: CancellationToken| {
            let bad_start = (client.host() == "bad:1").then(|| counted.fetch_add(1, Ordering::SeqCst));
            async move {
                let host = client.host().to_string();
                for round in 1.. {
                    if bad_start == Some(0) && round == 2 {
                        panic!("boom in round {round}");
                    }
                    out.send(report(&host, round, ActionType::None)).await.unwrap();
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let clients = ["bad:1", "good:1"].map(|h| AgentClient::new(h, Duration::from_secs(1)).unwrap()).to_vec();
        let state = state::StateStore::new(state::ConfigView::default());
        let obs = Observers { state: Some(state.clone()), metrics: None };
        let (out, mut rx) = mpsc::channel(64);
        let (_reload_tx, reload) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let cfg = LoopConfig::default();
        let sup = tokio::spawn(supervise_with(clients, None, cfg, obs, reload, out, stop.clone(), task));
        let t0 = tokio::time::Instant::now();
        let mut bad = Vec::new();
        let mut good_during_restart = 0;
        while bad.len() < 3 {
            // Virtual time: ten minutes pass at once if `bad` never comes back.
            let r = tokio::time::timeout_at(t0 + Duration::from_secs(600), rx.recv()).await;
            let r = r.expect("no report from `bad` after its panic").expect("the supervisor stopped early");
            if r.host == "bad:1" {
                if bad.len() == 1 {
                    let up = state.snapshot().hosts.iter().find(|h| h.host == "bad:1").map(|h| h.up);
                    assert_eq!(up, Some(false), "the status page shows the panicked host down");
                }
                if bad.len() == 2 {
                    // The restarted task's first report: the status page has the host up again.
                    let up = state.snapshot().hosts.iter().find(|h| h.host == "bad:1").map(|h| h.up);
                    assert_eq!(up, Some(true));
                }
                bad.push((r, t0.elapsed()));
            } else if bad.len() == 2 {
                good_during_restart += 1;
            }
        }
        assert_eq!(bad[0].0.action.kind, ActionType::None);
        let (failed, at) = (&bad[1].0, bad[1].1);
        assert_eq!((failed.action.kind, failed.round), (ActionType::Error, 2), "{failed:?}");
        assert!(failed.action.reason.contains("boom in round 2") && failed.action.reason.contains("restarting"), "{failed:?}");
        assert_eq!((bad[2].0.action.kind, bad[2].0.round), (ActionType::None, 1));
        assert!(bad[2].1 - at >= TASK_RESTART_DELAY, "restarted after {:?}", bad[2].1 - at);
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        assert!(good_during_restart >= 1, "the other host waited for the restart");
        stop.cancel();
        sup.await.unwrap();
    }
}
