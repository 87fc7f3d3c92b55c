//! The agent's gRPC service, generic over a [`Hypervisor`], and the server that hosts it with health and reflection.
//!
//! Every handler follows the same path: take the request, check its shape (`convert`), call the backend, convert
//! the reply. Backend errors become statuses through the one mapping in `convert.rs`. The pin RPCs first check the
//! caller's certificate against the pin allow-list ([`PinPolicy`]), so a read-only client changes nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

pub mod metrics_layer;
pub mod status_layer;

use crate::convert;
use crate::hypervisor::Hypervisor;
use crate::model::PinRequest;
use crate::pb;
use crate::pb::agent_server::{Agent, AgentServer};
use crate::security::{self, PinPolicy};

pub mod fleet;

/// Longest a request may run on the agent before it is cancelled; a libvirt call stuck longer than this is not
/// going to help a balancing round.
pub const SERVER_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection quiet for this long gets an HTTP/2 ping, and is closed if the answer takes longer than
/// [`KEEPALIVE_TIMEOUT`]. A controller whose host crashed or was cut off leaves its connections open on the agent
/// (the FIN never comes), each holding a socket and its buffers, and a controller that re-dials after every missed
/// deadline leaves one per missed round; pings close them. A controller polling every few seconds is never quiet
/// this long, so healthy connections carry no pings at all.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// How long the agent waits for the answer to a keepalive ping before it closes the connection.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest request the agent decodes; a full `ApplyPins` for thousands of vCPUs stays far below it.
pub const MAX_DECODING_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
/// Largest reply the agent sends (a `GetStats` of hundreds of domains is a few hundred KiB).
pub const MAX_ENCODING_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// The gRPC `Agent` service over one hypervisor backend.
pub struct AgentService<H: Hypervisor> {
    hv: Arc<H>,
    /// Random per process: tells the controller that the monotonic clock behind `sample_time_ns` restarted.
    instance: String,
    pins: PinPolicy,
}

impl<H: Hypervisor> AgentService<H> {
    /// A service on which anyone may pin (plaintext; see [`PinPolicy::Anyone`]).
    pub fn new(hv: Arc<H>) -> Self {
        Self::with_pin_policy(hv, PinPolicy::Anyone)
    }

    /// A service on which only callers allowed by `pins` may pin.
    pub fn with_pin_policy(hv: Arc<H>, pins: PinPolicy) -> Self {
        let instance = format!("{:016x}", rand::random::<u64>());
        AgentService { hv, instance, pins }
    }

    // Checked before the request is even decoded into pins, so a refused caller learns nothing about the host and
    // changes nothing. Returns who the caller is, for the audit log of every pin.
    fn may_pin<T>(&self, req: &Request<T>, method: &'static str) -> Result<String, Status> {
        let certs = req.peer_certs();
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "?".into());
        self.pins.check(certs.as_deref().map(Vec::as_slice)).map_err(|e| {
            warn!(method, peer = %peer, error = %e, "pin refused");
            Status::from(e)
        })?;
        let names = certs.as_deref().and_then(|c| c.first()).map(|leaf| security::identities(leaf.as_ref()));
        Ok(match names {
            Some(n) if !n.is_empty() => format!("{}@{peer}", n[0]),
            _ => peer,
        })
    }
}

#[tonic::async_trait]
impl<H: Hypervisor> Agent for AgentService<H> {
    async fn get_host_info(
        &self,
        _req: Request<pb::GetHostInfoRequest>,
    ) -> Result<Response<pb::HostInfo>, Status> {
        let info = self.hv.host_info().await?;
        Ok(Response::new(info.into()))
    }

    async fn list_domains(
        &self,
        _req: Request<pb::ListDomainsRequest>,
    ) -> Result<Response<pb::ListDomainsResponse>, Status> {
        let domains = self.hv.list_domains().await?;
        Ok(Response::new(pb::ListDomainsResponse { domains: domains.into_iter().map(Into::into).collect() }))
    }

    async fn get_stats(&self, _req: Request<pb::GetStatsRequest>) -> Result<Response<pb::GetStatsResponse>, Status> {
        let mut stats = self.hv.stats().await?;
        stats.agent_instance.clone_from(&self.instance);
        Ok(Response::new(stats.into()))
    }

    async fn get_vcpu_placement(
        &self,
        req: Request<pb::GetVcpuPlacementRequest>,
    ) -> Result<Response<pb::GetVcpuPlacementResponse>, Status> {
        let domain = req.into_inner().domain;
        convert::domain_arg(&domain)?;
        let placement = self.hv.placement(&domain).await?;
        Ok(Response::new(placement.into()))
    }

    async fn pin_vcpu(&self, req: Request<pb::PinVcpuRequest>) -> Result<Response<pb::PinVcpuResponse>, Status> {
        let client = self.may_pin(&req, "PinVcpu")?;
        let pin = PinRequest::try_from(req.into_inner())?;
        let mut results = self.hv.apply_pins(std::slice::from_ref(&pin)).await?;
        match results.pop() {
            Some(Ok(())) => {
                info!(client = %client, domain = %pin.domain, vcpu = pin.vcpu, pcpus = ?pin.pcpus, "pinned by request");
                Ok(Response::new(pb::PinVcpuResponse {}))
            }
            Some(Err(e)) => Err(e.into()),
            None => Err(Status::internal("backend returned no result for the pin")),
        }
    }

    async fn apply_pins(
        &self,
        req: Request<pb::ApplyPinsRequest>,
    ) -> Result<Response<pb::ApplyPinsResponse>, Status> {
        let client = self.may_pin(&req, "ApplyPins")?;
        let pins = convert::pins_from_pb(req.into_inner().pins)?;
        let results = self.hv.apply_pins(&pins).await?;
        if results.len() != pins.len() {
            return Err(Status::internal("backend returned a result count different from the pin count"));
        }
        for (pin, r) in pins.iter().zip(&results) {
            match r {
                Ok(()) => info!(client = %client, domain = %pin.domain, vcpu = pin.vcpu, pcpus = ?pin.pcpus, "pinned"),
                Err(e) => warn!(client = %client, domain = %pin.domain, vcpu = pin.vcpu, error = %e, "pin failed"),
            }
        }
        Ok(Response::new(pb::ApplyPinsResponse { results: results.iter().map(convert::pin_result_to_pb).collect() }))
    }
}

/// How the agent is exposed: plaintext with anyone pinning, or mutual TLS with a pin allow-list.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Mutual TLS; `None` serves plaintext.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Who may pin.
    pub pins: PinPolicy,
    /// When set, every `vcpu.v1.Agent` call is timed and its errors counted (see [`metrics_layer`]).
    pub metrics: Option<Arc<crate::metrics::AgentMetrics>>,
    /// Quiet time before a connection is pinged ([`KEEPALIVE_INTERVAL`]).
    pub keepalive_interval: Duration,
    /// Wait for the ping's answer before the connection is closed ([`KEEPALIVE_TIMEOUT`]).
    pub keepalive_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            tls: None,
            pins: PinPolicy::Anyone,
            metrics: None,
            keepalive_interval: KEEPALIVE_INTERVAL,
            keepalive_timeout: KEEPALIVE_TIMEOUT,
        }
    }
}

/// Serves the agent service, gRPC health and reflection on `listener`, in plaintext, until `shutdown` resolves.
pub async fn serve<H: Hypervisor>(
    hv: Arc<H>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    serve_with(hv, listener, ServeOptions::default(), shutdown).await
}

/// [`serve`] without the per-server start-up log line (a fleet of simulated hosts logs once for all).
pub async fn serve_quiet<H: Hypervisor>(
    hv: Arc<H>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    serve_inner(hv, listener, ServeOptions::default(), shutdown, false).await
}

/// [`serve`], and every `vcpu.v1.Agent` call is timed and its errors counted in `metrics`.
pub async fn serve_with_metrics<H: Hypervisor>(
    hv: Arc<H>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
    metrics: Option<Arc<crate::metrics::AgentMetrics>>,
) -> Result<(), tonic::transport::Error> {
    serve_with(hv, listener, ServeOptions { metrics, ..ServeOptions::default() }, shutdown).await
}

/// Serves like [`serve`], with TLS, a pin allow-list and metrics as `opts` say.
pub async fn serve_with<H: Hypervisor>(
    hv: Arc<H>,
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    serve_inner(hv, listener, opts, shutdown, true).await
}

async fn serve_inner<H: Hypervisor>(
    hv: Arc<H>,
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
    announce: bool,
) -> Result<(), tonic::transport::Error> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AgentServer<AgentService<H>>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let tls = opts.tls.is_some();
    let svc = AgentServer::new(AgentService::with_pin_policy(hv, opts.pins.clone()))
        .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE);
    match addr {
        Some(a) if announce => info!(addr = %a, tls, pin_allow = ?opts.pins, "agent listening"),
        Some(a) => tracing::debug!(addr = %a, tls, "agent listening"),
        None => info!("agent listening"),
    }
    // Nagle off on every accepted connection: a unary reply goes out as several small HTTP/2 writes (headers, data,
    // trailers), and with Nagle on the last one waits for the controller's delayed ACK, about 40 ms per call
    // (measured by benches/controller_fleet.rs). `serve_with_incoming` does not apply the server's own nodelay
    // setting to a stream it is handed.
    let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |conn| {
        if let Ok(c) = &conn {
            if let Err(e) = c.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
            }
        }
        conn
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = opts.tls {
        builder = builder.tls_config(t)?;
    }
    builder
        .timeout(SERVER_REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(opts.keepalive_interval))
        .http2_keepalive_timeout(Some(opts.keepalive_timeout))
        .layer(metrics_layer::MetricsLayer::new(opts.metrics))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            health_reporter.set_not_serving::<AgentServer<AgentService<H>>>().await;
        })
        .await
}
