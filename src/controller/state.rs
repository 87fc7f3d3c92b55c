//! The controller's live state for the status page and `GET /api/state`: the last report of every host, each
//! host's spread over the last minutes, and the last decisions with their reasons. The run loop feeds it every
//! `RoundReport` (the same reports `--json` prints), so the page shows exactly what the controller decided.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::controller::report::{ActionReport, ActionType, RoundReport, VcpuReport};
use crate::controller::usage::PcpuUsage;

/// How far back the spread chart goes.
pub const HISTORY_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Most spread points kept per host, whatever the interval (10 min at 2 s is 300).
pub const MAX_HISTORY_POINTS: usize = 1200;
/// How many decisions the page lists.
pub const MAX_DECISIONS: usize = 50;

/// Milliseconds since the Unix epoch: what the page's chart and clocks use.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One host as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    pub host: String,
    /// `false` when the last round could not reach the agent or the agent refused it.
    pub up: bool,
    pub round: u64,
    /// Last computed usage (kept while the host is down, so the page still shows where things were).
    pub pcpus: Vec<PcpuUsage>,
    pub vcpus: Vec<VcpuReport>,
    pub spread: Option<f64>,
    /// The last round's action and reason.
    pub action: ActionReport,
    pub pins_applied_total: u64,
    pub moves_total: u64,
    /// When the last round ended (ms since the epoch).
    pub updated_ms: u64,
    /// Since when the host has been failing (ms since the epoch), if it is down.
    pub down_since_ms: Option<u64>,
}

/// One decision in the list of last decisions.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub time_ms: u64,
    pub host: String,
    pub round: u64,
    pub action: ActionReport,
    pub pins_applied: usize,
    pub dry_run: bool,
}

/// Settings shown on the page.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigView {
    pub interval_ms: u64,
    pub threshold: f64,
    /// The balancing policy's name (seed, guarded, converge).
    pub policy: String,
    pub dry_run: bool,
}

/// Everything `GET /api/state` returns.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub now_ms: u64,
    pub version: &'static str,
    pub config: ConfigView,
    pub hosts: Vec<HostView>,
    /// Per host: `[ms since the epoch, spread]` points over [`HISTORY_WINDOW`].
    pub spread_history: BTreeMap<String, Vec<(u64, f64)>>,
    /// Newest first.
    pub decisions: Vec<Decision>,
}

#[derive(Default)]
struct Inner {
    config: ConfigView,
    hosts: BTreeMap<String, HostView>,
    history: BTreeMap<String, VecDeque<(u64, f64)>>,
    decisions: VecDeque<Decision>,
}

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct StateStore {
    inner: Arc<RwLock<Inner>>,
}

impl StateStore {
    pub fn new(config: ConfigView) -> StateStore {
        StateStore { inner: Arc::new(RwLock::new(Inner { config, ..Default::default() })) }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; the page is better served stale than not.
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Shows `host` before its first round ends, so a freshly added host is visible at once.
    pub fn add_host(&self, host: &str) {
        let mut g = self.write();
        g.hosts.entry(host.to_string()).or_insert_with(|| HostView {
            host: host.to_string(),
            up: true,
            round: 0,
            pcpus: Vec::new(),
            vcpus: Vec::new(),
            spread: None,
            action: ActionReport::simple(ActionType::Baseline, "starting"),
            pins_applied_total: 0,
            moves_total: 0,
            updated_ms: now_ms(),
            down_since_ms: None,
        });
    }

    /// Forgets a host that left the host list.
    pub fn remove_host(&self, host: &str) {
        let mut g = self.write();
        g.history.remove(host);
        g.hosts.remove(host);
    }

    /// Accounts one round.
    pub fn record(&self, r: &RoundReport) {
        let now = now_ms();
        let mut g = self.write();
        let up = r.action.kind != ActionType::Error;
        let prev_kind = g.hosts.get(&r.host).map(|h| h.action.kind);
        let h = g.hosts.entry(r.host.clone()).or_insert_with(|| HostView {
            host: r.host.clone(),
            up,
            round: 0,
            pcpus: Vec::new(),
            vcpus: Vec::new(),
            spread: None,
            action: r.action.clone(),
            pins_applied_total: 0,
            moves_total: 0,
            updated_ms: now,
            down_since_ms: None,
        });
        h.round = r.round;
        h.action = r.action.clone();
        h.updated_ms = now;
        h.pins_applied_total += r.pins_applied as u64;
        // Per vCPU, as the `moves_total` metric: `converge` moves several in a round.
        h.moves_total += r.moves.len() as u64;
        if up {
            h.down_since_ms = None;
        } else if h.up || h.down_since_ms.is_none() {
            h.down_since_ms = Some(now);
        }
        h.up = up;
        if !r.pcpus.is_empty() {
            h.pcpus = r.pcpus.clone();
            h.vcpus = r.vcpus.clone();
        }
        if r.spread.is_some() {
            h.spread = r.spread;
        }
        if let Some(s) = r.spread {
            let hist = g.history.entry(r.host.clone()).or_default();
            hist.push_back((now, s));
            let oldest = now.saturating_sub(HISTORY_WINDOW.as_millis() as u64);
            while hist.front().is_some_and(|p| p.0 < oldest) || hist.len() > MAX_HISTORY_POINTS {
                hist.pop_front();
            }
        }
        // Moves are always listed; other actions only when they change (a host that stays balanced or stays down
        // would otherwise push every real decision off the list).
        if r.action.kind == ActionType::Move || prev_kind != Some(r.action.kind) {
            g.decisions.push_front(Decision {
                time_ms: now,
                host: r.host.clone(),
                round: r.round,
                action: r.action.clone(),
                pins_applied: r.pins_applied,
                dry_run: r.dry_run,
            });
            g.decisions.truncate(MAX_DECISIONS);
        }
    }

    /// A consistent copy of everything, for the page.
    pub fn snapshot(&self) -> Snapshot {
        let g = self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        Snapshot {
            now_ms: now_ms(),
            version: crate::VERSION,
            config: g.config.clone(),
            hosts: g.hosts.values().cloned().collect(),
            spread_history: g.history.iter().map(|(k, v)| (k.clone(), v.iter().copied().collect())).collect(),
            decisions: g.decisions.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(host: &str, round: u64, kind: ActionType, spread: Option<f64>) -> RoundReport {
        let mut r = RoundReport::bare(host, round, ActionReport::simple(kind, format!("r{round}")), false);
        r.spread = spread;
        if spread.is_some() {
            r.pcpus = vec![PcpuUsage { id: 0, usage: 50.0 }, PcpuUsage { id: 1, usage: 10.0 }];
        }
        if kind == ActionType::Move {
            // Two vCPUs moved, as `converge` may do in one round.
            let mv = |vcpu| crate::controller::policy::Move {
                domain: "vm".into(),
                uuid: "u".into(),
                vcpu,
                from: 0,
                to: 1,
                usage: 20.0,
            };
            r.moves = vec![mv(0), mv(1)];
        }
        r
    }

    #[test]
    fn down_hosts_keep_their_last_usage_and_say_since_when() {
        let s = StateStore::default();
        s.record(&report("a", 1, ActionType::Baseline, None));
        s.record(&report("a", 2, ActionType::Move, Some(40.0)));
        s.record(&report("a", 3, ActionType::Error, None));
        s.record(&report("a", 4, ActionType::Error, None));
        let snap = s.snapshot();
        let h = &snap.hosts[0];
        assert!(!h.up);
        assert_eq!(h.round, 4);
        assert_eq!(h.pcpus.len(), 2, "last usage kept");
        assert_eq!(h.spread, Some(40.0));
        assert!(h.down_since_ms.is_some());
        // baseline, move, first error; the repeated error is not listed again. Newest first.
        let rounds: Vec<u64> = snap.decisions.iter().map(|d| d.round).collect();
        assert_eq!(rounds, vec![3, 2, 1]);
        assert_eq!(snap.spread_history["a"].len(), 1);
        s.record(&report("a", 5, ActionType::None, Some(5.0)));
        let h = &s.snapshot().hosts[0];
        assert!(h.up && h.down_since_ms.is_none());
    }

    #[test]
    fn decisions_are_bounded_and_removed_hosts_vanish() {
        let s = StateStore::default();
        for i in 0..(MAX_DECISIONS as u64 + 10) {
            s.record(&report("a", i, ActionType::Move, Some(20.0)));
        }
        let snap = s.snapshot();
        assert_eq!(snap.decisions.len(), MAX_DECISIONS);
        assert_eq!(snap.decisions[0].round, MAX_DECISIONS as u64 + 9);
        assert_eq!(snap.hosts[0].moves_total, 2 * (MAX_DECISIONS as u64 + 10));
        s.remove_host("a");
        assert!(s.snapshot().hosts.is_empty());
        assert!(s.snapshot().spread_history.is_empty());
    }
}
