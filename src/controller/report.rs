//! What one round did on one host: the JSON object `--json` prints, and the one human line logged per decision.

use serde::Serialize;

use crate::controller::policy::{Held, Move, Plan};
use crate::controller::usage::{HostUsage, PcpuUsage};
use crate::model::PcpuId;

/// One vCPU in a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VcpuReport {
    pub domain: std::sync::Arc<str>,
    pub vcpu: u32,
    pub pcpu: PcpuId,
    /// `null` while the domain has a fresh baseline.
    pub usage: Option<f64>,
}

/// The kind of action of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionType {
    Baseline,
    None,
    Move,
    Error,
}

/// The action of a round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionReport {
    #[serde(rename = "type")]
    pub kind: ActionType,
    pub domain: Option<String>,
    pub vcpu: Option<u32>,
    pub from: Option<PcpuId>,
    pub to: Option<PcpuId>,
    pub reason: String,
}

impl ActionReport {
    pub fn simple(kind: ActionType, reason: impl Into<String>) -> Self {
        ActionReport { kind, domain: None, vcpu: None, from: None, to: None, reason: reason.into() }
    }
}

/// One host, one round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundReport {
    pub host: String,
    pub round: u64,
    pub pcpus: Vec<PcpuUsage>,
    pub vcpus: Vec<VcpuReport>,
    pub spread: Option<f64>,
    pub action: ActionReport,
    /// Every move of the round (`action` shows the first; `converge` may make several).
    pub moves: Vec<Move>,
    /// vCPUs a constraint kept the policy away from (excluded domains, manual pins).
    pub held: Vec<Held>,
    /// Pins the agent applied this round (pins that change nothing are never sent).
    pub pins_applied: usize,
    /// Pins the agent refused, with its message.
    pub pins_failed: Vec<String>,
    pub dry_run: bool,
    /// How long the round took (for the round-duration histogram); not part of the JSON line.
    #[serde(skip)]
    pub duration: Option<std::time::Duration>,
    /// Ticks skipped before this round because the previous round overran its interval.
    pub skipped_ticks: u64,
    /// The policy holds this host over the threshold at the best it found (see [`Plan::at_best`]).
    pub at_best: bool,
    /// Moves of the plan that `--max-moves` left for later rounds (see [`Plan::deferred`]).
    pub deferred_moves: usize,
}

impl RoundReport {
    /// A report with usage from a computed round.
    pub fn from_plan(host: &str, round: u64, u: &HostUsage, plan: &Plan, dry_run: bool) -> Self {
        let action = match plan.movement() {
            Some(m) => ActionReport {
                kind: ActionType::Move,
                domain: Some(m.domain.clone()),
                vcpu: Some(m.vcpu),
                from: Some(m.from),
                to: Some(m.to),
                reason: plan.reason.clone(),
            },
            None => ActionReport::simple(ActionType::None, plan.reason.clone()),
        };
        RoundReport {
            host: host.to_string(),
            round,
            pcpus: u.pcpus.clone(),
            vcpus: u
                .vcpus
                .iter()
                .map(|v| VcpuReport { domain: v.domain.clone(), vcpu: v.vcpu, pcpu: v.pcpu, usage: v.usage })
                .collect(),
            spread: Some(plan.spread),
            action,
            moves: plan.moves.clone(),
            held: plan.held.clone(),
            pins_applied: 0,
            pins_failed: Vec::new(),
            dry_run,
            duration: None,
            skipped_ticks: 0,
            at_best: plan.at_best,
            deferred_moves: plan.deferred,
        }
    }

    /// A report for a round without usage (baseline or error).
    pub fn bare(host: &str, round: u64, action: ActionReport, dry_run: bool) -> Self {
        RoundReport {
            host: host.to_string(),
            round,
            pcpus: Vec::new(),
            vcpus: Vec::new(),
            spread: None,
            action,
            moves: Vec::new(),
            held: Vec::new(),
            pins_applied: 0,
            pins_failed: Vec::new(),
            dry_run,
            duration: None,
            skipped_ticks: 0,
            at_best: false,
            deferred_moves: 0,
        }
    }

    /// `0:80.0 1:75.3 ...`: compact pCPU usage for log lines.
    pub fn pcpu_summary(&self) -> String {
        self.pcpus.iter().map(|p| format!("{}:{:.1}", p.id, p.usage)).collect::<Vec<_>>().join(" ")
    }

    /// Logs the round once, at info (warn for errors).
    pub fn log(&self) {
        let a = &self.action;
        let kind = format!("{:?}", a.kind).to_lowercase();
        match a.kind {
            ActionType::Error => tracing::warn!(host = %self.host, round = self.round, action = %kind, reason = %a.reason, "round failed"),
            ActionType::Move => tracing::info!(
                host = %self.host, round = self.round, spread = format!("{:.1}", self.spread.unwrap_or(0.0)),
                action = %kind, moves = self.moves.len(), domain = a.domain.as_deref().unwrap_or(""), vcpu = a.vcpu.unwrap_or(0),
                from = a.from.unwrap_or(0), pcpu = a.to.unwrap_or(0), pins_applied = self.pins_applied,
                dry_run = self.dry_run, pcpus = %self.pcpu_summary(), reason = %a.reason, "round"),
            _ => tracing::info!(
                host = %self.host, round = self.round, spread = self.spread.map(|s| format!("{s:.1}")).unwrap_or_default(),
                action = %kind, pins_applied = self.pins_applied, dry_run = self.dry_run,
                pcpus = %self.pcpu_summary(), reason = %a.reason, "round"),
        }
    }
}

/// Writes every report received on `rx` to `out` as one JSON line (`--json`), on a thread of its own, so that an
/// output nobody reads (a stalled pipe, a stopped pager) never holds the balancing back: at most `queue` lines wait
/// for it, and reports beyond that are dropped and counted in a warning, which says again when the output catches
/// up. An output that is closed (EPIPE) is no longer written to. Returns once `rx` is closed and every queued line
/// is written, so a run with `--rounds` prints all of its reports to a reader that is only slow.
pub async fn write_json_lines<W: std::io::Write + Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<RoundReport>,
    out: W,
    queue: usize,
) {
    let (tx, lines) = std::sync::mpsc::sync_channel::<String>(queue.max(1));
    // Waited for without a blocking task: a runtime waits for its blocking tasks when dropped, and a writer stuck
    // on a stalled pipe must not keep the process from exiting after a signal.
    let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
    let writer = std::thread::Builder::new().name("json-out".into()).spawn(move || {
        let mut out = out;
        for line in lines {
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                break;
            }
        }
        let _ = done_tx.send(());
    });
    if let Err(e) = writer {
        tracing::error!(error = %e, "cannot start the --json writer thread; reports are not printed");
        while rx.recv().await.is_some() {}
        return;
    }
    let mut dropped: u64 = 0;
    let mut closed = false;
    while let Some(r) = rx.recv().await {
        let Ok(line) = serde_json::to_string(&r) else { continue };
        match tx.try_send(line) {
            Ok(()) if dropped > 0 => {
                tracing::warn!(dropped, "--json output is read again; reports were dropped meanwhile");
                dropped = 0;
            }
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                if dropped == 0 {
                    tracing::warn!(queued = queue, "--json output is not being read; dropping reports until it is (balancing goes on)");
                }
                dropped += 1;
            }
            // The output is closed (`run --json | head -1`): reports are still received, so that the balancing goes
            // on, and the log says once that they are no longer printed.
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                if !std::mem::replace(&mut closed, true) {
                    tracing::warn!("--json output is closed; reports are no longer printed (balancing goes on)");
                }
            }
        }
    }
    drop(tx);
    let _ = done.await;
}
