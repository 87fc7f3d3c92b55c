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
