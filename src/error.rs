//! Errors of the agent and its backends, with the context an operator needs (domain, vCPU, pCPU).
//!
//! Each variant belongs to one [`ErrorKind`]; `convert.rs` maps kinds to gRPC status codes in one place.

use crate::model::PcpuId;

/// The class of an error, which decides its gRPC status code and whether a caller may retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    InvalidArgument,
    FailedPrecondition,
    /// The caller is known but its identity may not do this (a read-only client asking to pin).
    PermissionDenied,
    Unavailable,
    Internal,
}

/// An error raised by a [`crate::hypervisor::Hypervisor`] or by request validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("domain {domain:?} not found")]
    DomainNotFound { domain: String },
    #[error("domain {domain:?} is not running (state: {state})")]
    DomainNotRunning { domain: String, state: String },
    #[error("domain {domain:?} is transient: it has no config to persist a pin in (pin without persist)")]
    NotPersistent { domain: String },
    #[error("domain {domain:?} vCPU {vcpu}: the hypervisor refused the pin: {reason}")]
    PinRefused { domain: String, vcpu: u32, reason: String },
    #[error("domain {domain:?}: this hypervisor driver cannot persist pins ({reason}): pin without persist")]
    CannotPersist { domain: String, reason: String },
    #[error("domain {domain:?}: vCPU {vcpu} does not exist (the domain has {nvcpus} vCPUs)")]
    VcpuOutOfRange { domain: String, vcpu: u32, nvcpus: u32 },
    #[error("domain {domain:?}: vCPU {vcpu} is not online (its online vCPUs are {})", list(online))]
    VcpuNotOnline { domain: String, vcpu: u32, online: Vec<u32> },
    #[error("domain {domain:?} vCPU {vcpu}: pCPU {pcpu} does not exist (the host has {npcpus} pCPUs)")]
    PcpuOutOfRange { domain: String, vcpu: u32, pcpu: PcpuId, npcpus: u32 },
    #[error("domain {domain:?} vCPU {vcpu}: pCPU {pcpu} is offline")]
    PcpuOffline { domain: String, vcpu: u32, pcpu: PcpuId },
    #[error("domain {domain:?} vCPU {vcpu}: the pCPU list is empty")]
    EmptyPcpuList { domain: String, vcpu: u32 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("hypervisor unavailable: {0}")]
    Unavailable(String),
    #[error("hypervisor error: {0}")]
    Internal(String),
}

impl AgentError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::DomainNotFound { .. } => ErrorKind::NotFound,
            AgentError::DomainNotRunning { .. }
            | AgentError::NotPersistent { .. }
            | AgentError::CannotPersist { .. }
            | AgentError::PinRefused { .. } => ErrorKind::FailedPrecondition,
            AgentError::VcpuOutOfRange { .. }
            | AgentError::VcpuNotOnline { .. }
            | AgentError::PcpuOutOfRange { .. }
            | AgentError::PcpuOffline { .. }
            | AgentError::EmptyPcpuList { .. }
            | AgentError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            AgentError::PermissionDenied(_) => ErrorKind::PermissionDenied,
            AgentError::Unavailable(_) => ErrorKind::Unavailable,
            AgentError::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// `0, 3`: a list of numbers as an operator reads it.
fn list(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}
