//! One task per host: every interval, sample the host, compute usage against the previous sample (which this task
//! alone owns), decide, and apply the plan in one `ApplyPins`. The task also owns the policy's state for its host,
//! including the last pin it applied to each vCPU, which is how a pin made by someone else is recognised. A host that fails is retried with jittered
//! exponential backoff and comes back with a fresh baseline; other hosts never wait for it.

use std::time::Duration;

use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::controller::client::{AgentClient, PinFailure};
use crate::controller::pins_file;
use crate::controller::policy::{self, PolicyConfig, PolicyState};
use crate::controller::report::{ActionReport, ActionType, RoundReport};
use crate::controller::usage;
use crate::model::HostStats;

/// Default time between two rounds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Longest wait between two attempts on a host that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Backoff delays are spread by ± this fraction so that hosts that failed together do not retry together.
pub const BACKOFF_JITTER: f64 = 0.2;

/// Settings of the per-host loop.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub interval: Duration,
    pub policy: PolicyConfig,
    pub dry_run: bool,
    /// Stop after this many rounds (ticks) per host; `None` = until shutdown.
    pub rounds: Option<u64>,
    /// Most RPCs in flight at once across all hosts: bounds the controller's sockets, memory and CPU bursts when
    /// a large fleet ticks together.
    pub max_inflight: usize,
    /// Where each host's task keeps its memory of its own pins ([`pins_file`]); `None` keeps it in memory only.
    pub state_dir: Option<std::path::PathBuf>,
}

/// Default bound on concurrent RPCs across all hosts.
pub const DEFAULT_MAX_INFLIGHT: usize = 256;

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            interval: DEFAULT_INTERVAL,
            policy: PolicyConfig::default(),
            dry_run: false,
            rounds: None,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            state_dir: None,
        }
    }
}

/// Delay before the next attempt after `failures` consecutive failures: interval × 2^(failures−1), capped, with
/// jitter `j` in [-1, 1] scaled by [`BACKOFF_JITTER`]. Pure so it can be tested.
pub fn backoff_delay(interval: Duration, failures: u32, j: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = interval.saturating_mul(1u32 << exp).min(MAX_BACKOFF).max(interval);
    base.mul_f64(1.0 + BACKOFF_JITTER * j.clamp(-1.0, 1.0))
}

/// State a host task keeps between rounds.
struct HostState {
    prev: Option<HostStats>,
    /// The sample before `prev`, no longer needed: the next reply is decoded into its allocations.
    spare: Option<HostStats>,
    /// The last round's usage: the next one is written over it, or takes its unchanged names and affinities
    /// ([`usage::compute_into`]).
    last_usage: Option<usage::HostUsage>,
    /// Kept across outages: the pins the controller applied are still the host's business when it comes back.
    policy: PolicyState,
    failures: u32,
    next_attempt: Option<Instant>,
    was_down: bool,
    /// This host's pins file, with `--state-dir`.
    pins_path: Option<std::path::PathBuf>,
    /// Pins read from it at start, applied to the first sample (which tells which of them still hold).
    restored: Option<pins_file::PinsFile>,
    /// The pins last written, to write again only when they change.
    saved: Option<Arc<policy::VcpuMap<Arc<[crate::model::PcpuId]>>>>,
    /// Whether the last write failed: only a change is logged at warn.
    save_failing: bool,
    /// Reserved pCPUs this host lacks, as last warned about: warned again only when that changes.
    reserved_missing: Vec<crate::model::PcpuId>,
    /// Why the last attempt failed, repeated in the rounds that wait for the next one.
    last_error: String,
}

impl HostState {
    fn new() -> Self {
        HostState {
            prev: None,
            spare: None,
            last_usage: None,
            policy: PolicyState::default(),
            failures: 0,
            next_attempt: None,
            was_down: false,
            pins_path: None,
            restored: None,
            saved: None,
            save_failing: false,
            reserved_missing: Vec::new(),
            last_error: String::new(),
        }
    }

    /// A host's state with its pins file under `dir`, read now. A file that cannot be read is logged and left alone
    /// (it is overwritten with the next pins): losing the controller's memory of its pins must not stop a host. A
    /// file that can be read but not used (damaged, of a newer version, another host's) is first moved aside to
    /// `NAME.unusable`, so that it is still there to look at, or to give back to the newer controller after a
    /// downgrade. A dry run changes nothing on disk: it reads a file where it is, and moves none.
    fn with_pins_file(dir: &std::path::Path, host: &str, dry_run: bool) -> Self {
        let path = pins_file::path_for(dir, host);
        // A file an earlier version wrote under the host as written moves to the address's name.
        let legacy = pins_file::legacy_path_for(dir, host);
        let mut read_from = path.clone();
        if legacy != path && !path.exists() && legacy.exists() {
            if dry_run {
                read_from.clone_from(&legacy);
            } else if let Err(e) = std::fs::rename(&legacy, &path) {
                tracing::warn!(host = %host, error = %e, from = %legacy.display(), "cannot rename the old pins file");
                read_from.clone_from(&legacy);
            }
        }
        let restored = match pins_file::load(&read_from, host) {
            Ok(Some(f)) => {
                tracing::info!(host = %host, path = %read_from.display(), domains = f.domains.len(), "read the controller's pins of this host");
                Some(f)
            }
            Ok(None) => None,
            Err(e) => {
                let aside = read_from.with_extension("json.unusable");
                let kept = match &e {
                    pins_file::PinsFileError::Io { .. } => None,
                    _ if dry_run => None,
                    _ => std::fs::rename(&read_from, &aside).ok().map(|()| aside.display().to_string()),
                };
                tracing::warn!(host = %host, error = %e, moved_to = kept.as_deref().unwrap_or("-"),
                    "cannot use this host's pins file; starting without it");
                None
            }
        };
        HostState { pins_path: Some(path), restored, ..HostState::new() }
    }

    /// Writes this host's pins if they changed since the last write. Called after a round, so the file never runs
    /// ahead of what the agent confirmed.
    async fn save_pins(&mut self, host: &str) {
        // Every round of every host comes here, and most change no pin: that check comes first and costs a pointer
        // comparison.
        if self.saved.as_ref().is_some_and(|s| Arc::ptr_eq(s, &self.policy.last_pins)) {
            return;
        }
        let (Some(path), Some(sample)) = (self.pins_path.clone(), self.prev.as_ref()) else { return };
        let file = pins_file::PinsFile::from_pins(host, &self.policy.last_pins, sample);
        // A file that could not be replaced still holds older pins: a controller started later would take the pins
        // made since for an operator's and hold them, so it goes. Without it the next controller starts as one
        // without `--state-dir` would. Removing can fail too (a read-only directory); that is reported with the rest.
        let written = tokio::task::spawn_blocking(move || {
            pins_file::save(&path, &file).map_err(|e| {
                let removed = match std::fs::remove_file(&path) {
                    Ok(()) => "removed the older one",
                    Err(r) if r.kind() == std::io::ErrorKind::NotFound => "there was none",
                    Err(_) => "the older one could not be removed either",
                };
                (e, removed)
            })
        })
        .await;
        match written {
            Ok(Ok(())) => {
                self.saved = Some(Arc::clone(&self.policy.last_pins));
                if std::mem::take(&mut self.save_failing) {
                    tracing::info!(host = %host, "this host's pins file is written again");
                }
            }
            Ok(Err((e, removed))) if !self.save_failing => {
                self.save_failing = true;
                tracing::warn!(host = %host, error = %e, old_file = removed,
                    "cannot write this host's pins file; a restarted controller will not know its pins");
            }
            Ok(Err((e, _))) => tracing::debug!(host = %host, error = %e, "this host's pins file still cannot be written"),
            Err(e) => tracing::warn!(host = %host, error = %e, "writing this host's pins file failed"),
        }
    }
}

/// One host's round, without the timer: what the loop runs each tick, and what benchmarks drive directly.
pub struct HostWorker {
    client: AgentClient,
    cfg: LoopConfig,
    inflight: Arc<Semaphore>,
    st: HostState,
}

impl HostWorker {
    pub fn new(client: AgentClient, cfg: LoopConfig, inflight: Arc<Semaphore>) -> Self {
        HostWorker { client, cfg, inflight, st: HostState::new() }
    }

    /// Samples the host, decides and applies; the previous sample stays in this worker for the next round.
    pub async fn round(&mut self, round: u64) -> RoundReport {
        let never = CancellationToken::new();
        one_round(&mut self.client, &self.cfg, &self.inflight, &mut self.st, round, &never)
            .await
            .expect("a round that is never stopped always reports")
    }
}

/// Runs the loop for one host until `rounds` are done or `shutdown` is cancelled; each round's report goes to `out`.
/// Every RPC first takes a permit from `inflight`, shared by all hosts.
pub async fn run_host(
    mut client: AgentClient,
    cfg: LoopConfig,
    inflight: Arc<Semaphore>,
    out: mpsc::Sender<RoundReport>,
    shutdown: CancellationToken,
) {
    let host = client.host().to_string();
    let mut ticker = tokio::time::interval(cfg.interval);
    // A round that overruns its interval makes the loop skip the ticks it missed rather than fire them in a burst.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut st = match &cfg.state_dir {
        Some(dir) => HostState::with_pins_file(dir, &host, cfg.dry_run),
        None => HostState::new(),
    };
    let mut round: u64 = 0;
    let mut skipped: u64 = 0;
    loop {
        // A host in backoff is tried again at its own jittered time, not at the next tick after it: hosts that went
        // down together (a switch, a rack, the controller's own link) would otherwise all retry on the same ticks.
        // The ticker then starts over from that attempt, so the host keeps the phase the jitter gave it.
        let retry_at = st.next_attempt.filter(|t| *t > Instant::now());
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
            () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => ticker.reset(),
        }
        let started = Instant::now();
        if cfg.rounds.is_some_and(|n| round >= n) {
            break;
        }
        round += 1;
        let report = if st.next_attempt.is_some_and(|t| Instant::now() < t) {
            let wait = st.next_attempt.map(|t| t - Instant::now()).unwrap_or_default();
            // The status page shows the latest round's reason: it keeps saying why the host is down, not only when
            // it is tried again.
            let why = format!("host down ({}); next attempt in {:.1}s (backoff)", st.last_error, wait.as_secs_f64());
            RoundReport::bare(&host, round, ActionReport::simple(ActionType::Error, why), cfg.dry_run)
        } else {
            // A stop cuts a round short only before its pins are sent: an ApplyPins in flight is waited for (its
            // deadline bounds the wait), so that the pins it made are recorded, and saved with `--state-dir`, and
            // are not taken for an operator's by the next controller.
            let Some(mut r) = one_round(&mut client, &cfg, &inflight, &mut st, round, &shutdown).await else { break };
            r.duration = Some(started.elapsed());
            r
        };
        let mut report = report;
        report.skipped_ticks = std::mem::take(&mut skipped);
        // Rounds never pile up: ticks that came while this round ran are skipped (MissedTickBehavior::Skip), and
        // the next report says how many.
        let overran = (started.elapsed().as_nanos() / cfg.interval.as_nanos().max(1)) as u64;
        if overran > 0 {
            tracing::warn!(host = %host, round, skipped = overran, "round overran its interval; skipping ticks");
            skipped = overran;
        }
        // A dry run changes nothing, on disk either.
        if !cfg.dry_run {
            st.save_pins(&host).await;
        }
        report.log();
        if out.send(report).await.is_err() {
            break;
        }
        // The last round's report is out: waiting for one more tick would only hold `--rounds` an interval longer.
        if cfg.rounds.is_some_and(|n| round >= n) {
            break;
        }
    }
}

async fn one_round(
    client: &mut AgentClient,
    cfg: &LoopConfig,
    inflight: &Semaphore,
    st: &mut HostState,
    round: u64,
    shutdown: &CancellationToken,
) -> Option<RoundReport> {
    let host = client.host().to_string();
    let stats = tokio::select! {
        biased;
        () = shutdown.cancelled() => return None,
        s = async {
            let _permit = inflight.acquire().await.expect("the semaphore is never closed");
            client.get_stats_into(st.spare.take()).await
        } => s,
    };
    let cur = match stats {
        Ok(s) => s,
        Err(e) => return Some(failed(st, cfg, &host, round, e.to_string())),
    };
    if std::mem::take(&mut st.was_down) {
        tracing::info!(host = %host, "host is back; taking a fresh baseline");
    }
    // A sample that cannot be compared with the last one (an agent restarted, as on a host reboot) may show domains
    // that restarted too, with their config affinity: the pins kept for them are checked as after an outage.
    if let Some(prev) = st.prev.as_ref().filter(|p| p.agent_instance != cur.agent_instance) {
        st.restored.get_or_insert_with(|| pins_file::PinsFile::from_pins(&host, &st.policy.last_pins, prev));
    }
    if let Some(file) = st.restored.take() {
        // Before any decision: the first one must already know which affinities are the controller's.
        let pins = file.restore(&cur);
        tracing::info!(host = %host, vcpus = pins.len(), "the controller's pins from before the gap still hold for these vCPUs");
        st.policy.last_pins = Arc::new(pins);
    }
    st.failures = 0;
    st.next_attempt = None;
    // `--reserve-pcpus` is one list for the fleet: on a smaller host part of it is meaningless, most likely a typo
    // (`64` for `6-4`), and would otherwise pass silently while the pCPUs meant to be kept free are used.
    let missing = reserved_beyond(&cfg.policy.constraints.reserved, cur.npcpus);
    if missing != st.reserved_missing {
        if !missing.is_empty() {
            tracing::warn!(host = %host, pcpus = %crate::model::format_cpu_list(&missing), npcpus = cur.npcpus,
                "reserved pCPUs this host does not have: they reserve nothing here");
        }
        st.reserved_missing = missing;
    }
    let computed = match st.last_usage.take() {
        Some(last) => usage::compute_into(st.prev.as_ref(), &cur, last),
        None => usage::compute(st.prev.as_ref(), &cur),
    };
    st.spare = st.prev.replace(cur);
    let mut u = match computed {
        Ok(u) => u,
        Err(why) => {
            return Some(RoundReport::bare(
                &host,
                round,
                ActionReport::simple(ActionType::Baseline, why.as_str()),
                cfg.dry_run,
            ))
        }
    };
    for (domain, why) in &u.fresh {
        tracing::info!(host = %host, domain = %domain, reason = why, "fresh baseline for domain");
    }
    // Nothing is moved in a dry run, so nothing may cool down: each round shows what a real run would do now.
    let unmoved = cfg.dry_run.then(|| st.policy.last_moved.clone());
    let plan = policy::decide_mut(&mut u, &cfg.policy, &mut st.policy);
    if let Some(m) = unmoved {
        st.policy.last_moved = m;
    }
    for h in &plan.newly_manual {
        tracing::info!(host = %host, domain = %h.domain, vcpu = h.vcpu, pcpu = h.pcpu,
            "vCPU pinned by someone else since the controller's last pin: left where it is (--override-manual takes it back)");
    }
    let mut report = RoundReport::from_plan(&host, round, &u, &plan, cfg.dry_run);
    st.last_usage = Some(u);
    if cfg.dry_run || plan.pins.is_empty() {
        return Some(report);
    }
    // Stopping: no new pins are sent (the waiting for a permit is cut too), only those already sent are waited for.
    let permit = tokio::select! {
        biased;
        () = shutdown.cancelled() => None,
        p = inflight.acquire() => Some(p.expect("the semaphore is never closed")),
    };
    let Some(_permit) = permit else {
        report.action.reason.push_str(" (not applied: the controller is stopping)");
        return Some(report);
    };
    let applied = client.apply_pins(&plan.pins).await;
    match applied {
        Ok(results) => {
            for (pin, r) in plan.pins.iter().zip(results) {
                match r {
                    Ok(()) => {
                        report.pins_applied += 1;
                        st.policy.record_applied(pin);
                    }
                    Err(s) => report.pins_failed.push(format!("{} vCPU {}: {}", pin.domain, pin.vcpu, s.message())),
                }
            }
            // A refused pin means the sample is stale (a domain went away): the next round re-reads the host.
            let refused = |m: &policy::Move| {
                report.pins_failed.iter().any(|f| f.starts_with(&format!("{} vCPU {}:", m.uuid, m.vcpu)))
            };
            if plan.moves.iter().any(refused) {
                report.action.reason.push_str(" (pin refused by the agent)");
                report.moves.retain(|m| !refused(m));
            }
        }
        Err(e) => {
            // Without an answer nothing says which pins took effect: the agent may still apply the batch (its libvirt
            // work finishes in the background), and the next sample must not take those pins for an operator's. A
            // batch the agent refused, or that was never sent, changed nothing: its pins are not the controller's.
            let outcome = crate::controller::client::pin_failure(&e);
            if outcome == PinFailure::NotConfirmed {
                for pin in &plan.pins {
                    st.policy.record_unconfirmed(pin);
                }
            }
            // The report's moves are what was moved: metrics count them, and JSON readers sum them.
            let planned = std::mem::take(&mut report.moves).len();
            let what = if outcome == PinFailure::NotConfirmed { "not confirmed" } else { "not applied" };
            report.action = ActionReport::simple(
                ActionType::Error,
                format!("ApplyPins failed: {e} ({planned} planned move(s) {what})"),
            );
        }
    }
    Some(report)
}

/// The reserved pCPUs at or past `npcpus` (pCPU numbers run from 0), in order, each once.
fn reserved_beyond(reserved: &[crate::model::PcpuId], npcpus: u32) -> Vec<crate::model::PcpuId> {
    let mut out: Vec<_> = reserved.iter().copied().filter(|&p| p >= npcpus).collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn failed(st: &mut HostState, cfg: &LoopConfig, host: &str, round: u64, err: String) -> RoundReport {
    // Whatever happened in between is unknown: start over from a fresh baseline when the host is back. Domains may
    // have rebooted meanwhile (back on their config affinity, which is no operator's pin), and the fresh baseline
    // cannot see that: the pins are kept with what identifies each domain, and checked against the first sample
    // after the gap, like a pins file after a restart of the controller (one still waiting is that check already).
    if let Some(prev) = st.prev.take() {
        st.restored.get_or_insert_with(|| pins_file::PinsFile::from_pins(host, &st.policy.last_pins, &prev));
    }
    st.last_usage = None;
    st.last_error.clone_from(&err);
    st.failures += 1;
    st.was_down = true;
    let delay = backoff_delay(cfg.interval, st.failures, rand::random::<f64>() * 2.0 - 1.0);
    // The first failure retries at the next tick; repeated ones back off.
    if st.failures > 1 {
        st.next_attempt = Some(Instant::now() + delay);
    }
    RoundReport::bare(host, round, ActionReport::simple(ActionType::Error, err), cfg.dry_run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reserved_pcpus_past_the_host_are_named_once_each() {
        assert_eq!(reserved_beyond(&[0, 1], 8), Vec::<u32>::new());
        assert_eq!(reserved_beyond(&[64, 0, 7, 8, 64], 8), vec![8, 64]);
        assert_eq!(reserved_beyond(&[], 0), Vec::<u32>::new());
    }

    #[test]
    fn a_pins_file_under_the_old_name_is_moved_and_read() {
        let dir = std::env::temp_dir().join(format!("vcpub-legacy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (old, new) = (pins_file::legacy_path_for(&dir, "hv1"), pins_file::path_for(&dir, "hv1"));
        assert_ne!(old, new);
        let file = pins_file::PinsFile {
            version: pins_file::PINS_FILE_VERSION,
            host: "hv1".into(),
            boot_id: String::new(),
            domains: vec![],
        };
        pins_file::save(&old, &file).unwrap();
        // A dry run reads it where it is and moves nothing.
        let st = HostState::with_pins_file(&dir, "hv1", true);
        assert_eq!(st.restored.as_ref(), Some(&file));
        assert!(old.exists() && !new.exists(), "a dry run moved {}", old.display());
        let st = HostState::with_pins_file(&dir, "hv1", false);
        assert_eq!(st.restored, Some(file));
        assert!(new.exists() && !old.exists(), "moved to {}", new.display());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file that cannot be used is moved aside, not left to be overwritten: a newer controller's (after a
    /// downgrade) can be given back to it, a damaged one looked at. A dry run leaves it where it is.
    #[test]
    fn an_unusable_pins_file_is_kept_aside() {
        let dir = std::env::temp_dir().join(format!("vcpub-unusable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = pins_file::path_for(&dir, "hv1");
        let aside = path.with_extension("json.unusable");
        let newer = r#"{"version": 9, "host": "hv1", "domains": []}"#;
        std::fs::write(&path, newer).unwrap();
        assert!(HostState::with_pins_file(&dir, "hv1", true).restored.is_none());
        assert!(path.exists() && !aside.exists(), "a dry run moved the file");
        assert!(HostState::with_pins_file(&dir, "hv1", false).restored.is_none());
        assert!(!path.exists(), "left where the next pins overwrite it");
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), newer);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A host that stays down is tried again at its backoff's jittered times, not on its ticks: otherwise every
    /// host that went down with it would retry on the same ticks. Virtual time: the attempts' times are exact.
    #[tokio::test(start_paused = true)]
    async fn retries_of_a_down_host_are_not_held_to_its_ticks() {
        // Nothing listens on port 1: each attempt is refused at once.
        let client = AgentClient::new("127.0.0.1:1", Duration::from_millis(200)).unwrap();
        let interval = Duration::from_secs(1);
        let cfg = LoopConfig { interval, rounds: Some(40), ..Default::default() };
        let (tx, mut rx) = mpsc::channel(64);
        let t0 = Instant::now();
        let run = tokio::spawn(run_host(client, cfg, Arc::new(Semaphore::new(1)), tx, CancellationToken::new()));
        let mut attempts = Vec::new();
        while let Some(r) = rx.recv().await {
            assert_eq!(r.action.kind, ActionType::Error, "{r:?}");
            // Rounds that only say "down, next attempt in ..." contact nobody.
            if !r.action.reason.contains("(backoff)") {
                attempts.push(t0.elapsed());
            }
        }
        run.await.unwrap();
        assert!(attempts.len() >= 4, "{attempts:?}");
        let off_tick = |t: &Duration| {
            let phase = t.as_nanos() % interval.as_nanos();
            phase.min(interval.as_nanos() - phase) > Duration::from_millis(10).as_nanos()
        };
        // The first two are on ticks (the first failure retries at the next tick); the backoff's jitter (±20 %
        // of at least one interval) puts the later ones off the grid, except by a chance of about 1 in 50 each.
        let later = &attempts[2..];
        assert!(later.iter().filter(|t| off_tick(t)).count() * 2 > later.len(), "attempts at {attempts:?}");
        // And each one comes when its backoff says, not a tick later: no two attempts closer than one interval.
        assert!(attempts.windows(2).all(|w| w[1] - w[0] >= interval.mul_f64(0.79)), "attempts at {attempts:?}");
    }

    /// Rounds that wait out a backoff still say why the host is down (the status page shows the latest reason).
    #[tokio::test(start_paused = true)]
    async fn rounds_in_backoff_repeat_why_the_host_is_down() {
        let client = AgentClient::new("127.0.0.1:1", Duration::from_millis(200)).unwrap();
        let cfg = LoopConfig { interval: Duration::from_secs(1), rounds: Some(12), ..Default::default() };
        let (tx, mut rx) = mpsc::channel(64);
        let run = tokio::spawn(run_host(client, cfg, Arc::new(Semaphore::new(1)), tx, CancellationToken::new()));
        let mut last_error = None;
        let mut waiting = 0;
        while let Some(r) = rx.recv().await {
            if r.action.reason.contains("(backoff)") {
                let why: &String = last_error.as_ref().expect("an attempt failed before any backoff");
                assert!(r.action.reason.starts_with(&format!("host down ({why});")), "{} / {why}", r.action.reason);
                waiting += 1;
            } else {
                last_error = Some(r.action.reason.clone());
            }
        }
        run.await.unwrap();
        assert!(waiting > 0, "no round waited out a backoff");
    }

    /// `--rounds N` ends with the Nth report: no wait for a tick that would start no round.
    #[tokio::test(start_paused = true)]
    async fn the_last_round_is_not_followed_by_a_wait() {
        let client = AgentClient::new("127.0.0.1:1", Duration::from_millis(200)).unwrap();
        let interval = Duration::from_secs(3600);
        let cfg = LoopConfig { interval, rounds: Some(1), ..Default::default() };
        let (tx, mut rx) = mpsc::channel(4);
        let t0 = Instant::now();
        run_host(client, cfg, Arc::new(Semaphore::new(1)), tx, CancellationToken::new()).await;
        assert_eq!(rx.recv().await.map(|r| r.round), Some(1));
        assert!(t0.elapsed() < interval, "ended {:?} after the start", t0.elapsed());
    }

    #[test]
    fn backoff_grows_and_caps() {
        let i = Duration::from_secs(2);
        assert_eq!(backoff_delay(i, 1, 0.0), i);
        assert_eq!(backoff_delay(i, 3, 0.0), Duration::from_secs(8));
        assert_eq!(backoff_delay(i, 30, 0.0), MAX_BACKOFF);
    }

    proptest! {
        #[test]
        fn backoff_stays_within_jitter_bounds(ms in 1u64..60_000, failures in 0u32..100, j in -5.0f64..5.0) {
            let i = Duration::from_millis(ms);
            let d = backoff_delay(i, failures, j);
            let lo = i.min(MAX_BACKOFF).mul_f64(1.0 - BACKOFF_JITTER);
            let hi = i.max(MAX_BACKOFF).mul_f64(1.0 + BACKOFF_JITTER);
            prop_assert!(d >= lo.saturating_sub(Duration::from_nanos(1)) && d <= hi + Duration::from_nanos(1));
        }
    }
}
