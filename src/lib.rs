//! vcpu-balancer: keeps the physical CPUs of libvirt/KVM hosts evenly loaded by pinning each vCPU to the best pCPU.
//!
//! # Layout
//! - [`model`]: transport-neutral types (samples, placements, pin requests).
//! - [`error`]: the agent's error type; [`convert`] maps it and the model to and from protobuf, in one place.
//! - [`pb`]: the generated gRPC code (`proto/vcpu/v1/agent.proto`).
//! - [`hypervisor`]: the `Hypervisor` trait and its backends: `libvirt` (feature `libvirt`) and `sim`.
//! - [`agent`]: the gRPC service, generic over a `Hypervisor`, plus health and reflection.
//! - [`controller`]: usage maths and policy (pure), the per-host loop, the gRPC client, reports, the demo.
//! - [`certs`]: a private CA and the certificates of a small fleet (`vcpu-controller certs`).
//! - [`security`]: mutual TLS settings, the pin allow-list and the plaintext listen check.
//! - [`metrics`]: Prometheus metrics of both binaries; [`http`]: `/metrics`, the status page and `/api/state`.
//! - [`shutdown`]: SIGINT/SIGTERM handling shared by both binaries.
//!
//! The binaries in `agent/` and `controller/` only parse flags, set up tracing and call into this library.
#![deny(unsafe_code)]

pub mod agent;
pub mod certs;
pub mod controller;
pub mod convert;
pub mod error;
pub mod flags;
pub mod http;
pub mod hypervisor;
pub mod metrics;
pub mod model;
pub mod pb;
pub mod security;
pub mod shutdown;
pub mod telemetry;

/// The version of this crate, reported by `GetHostInfo`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The agent's default gRPC port.
pub const DEFAULT_AGENT_PORT: u16 = 50151;
