//! The controller's gRPC client for one agent: one lazily made connection reused across rounds (tonic's generated
//! client on the controller's own h2 transport, [`super::transport`]), and a deadline on every call, sent to the
//! agent as `grpc-timeout` too, so it stops working on a call nobody waits for. With mutual TLS the address becomes
//! `https://`, and rustls checks the agent's certificate against the dialled host.

use std::time::Duration;

use bytes::Buf;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Request, Status};

use crate::convert;
use crate::model::{DomainPlacement, HostInfo, HostStats, PinRequest};
use crate::pb;
use crate::pb::agent_client::AgentClient as PbClient;
use crate::security::ClientTls;
use super::transport::H2Channel;

/// Default deadline of one RPC. A round is one `GetStats` and at most one `ApplyPins`, so two deadlines must fit in
/// the default interval.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_millis(800);
/// Longest wait for a TCP connection to an agent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);
/// Largest reply the controller accepts (a `GetStats` of thousands of vCPUs is well below it).
pub const MAX_REPLY_SIZE: usize = 64 * 1024 * 1024;

/// A failed call to an agent, with the host it concerns.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("host {host}: invalid address: {reason}")]
    BadAddress { host: String, reason: String },
    #[error("host {host}: {method}: {code:?}: {message}")]
    Rpc { host: String, method: &'static str, code: Code, message: String },
}

impl ClientError {
    /// The gRPC code, if the call reached the point of having one.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            ClientError::BadAddress { .. } => None,
        }
    }

    /// The agent's own message (without host and method), for CLI output.
    pub fn message(&self) -> String {
        match self {
            ClientError::Rpc { message, .. } => message.clone(),
            ClientError::BadAddress { reason, .. } => reason.clone(),
        }
    }
}

/// What an operator can conclude from a pin that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinFailure {
    /// It never left: a bad address, or no connection to the agent. Nothing changed.
    NotSent,
    /// It may have been applied: no answer within the deadline, a connection lost with the call on it, or the
    /// agent's libvirt did not answer in time (libvirt cannot take back a call it was sent).
    NotConfirmed,
    /// The agent answered that it did not apply it (its code and message say why).
    Refused,
}

/// Classifies a failed pin (`vcpu-controller pin`), so that a pin that may have been applied is never reported as
/// refused, and one that was never sent is not reported as the agent's refusal.
pub fn pin_failure(e: &ClientError) -> PinFailure {
    let (code, message) = match e {
        ClientError::BadAddress { .. } => return PinFailure::NotSent,
        ClientError::Rpc { code, message, .. } => (*code, message.as_str()),
    };
    match code {
        Code::DeadlineExceeded => PinFailure::NotConfirmed,
        Code::Unavailable if message.starts_with(crate::controller::transport::CANNOT_REACH) => PinFailure::NotSent,
        Code::Unavailable
            if message.starts_with(crate::controller::transport::CONNECTION_FAILED)
                || message.contains(crate::hypervisor::LATE_PIN_BATCH) =>
        {
            PinFailure::NotConfirmed
        }
        _ => PinFailure::Refused,
    }
}

/// Turns `HOST`, `HOST:PORT` or `http://HOST:PORT` into a URI, adding the default agent port when none is given.
pub fn normalize_address(host: &str) -> Result<String, ClientError> {
    normalize_address_for(host, false)
}

/// Like [`normalize_address`]; with `tls` the scheme is `https`, and an explicit `http://` is refused, because
/// tonic would silently talk plaintext to it.
pub fn normalize_address_for(host: &str, tls: bool) -> Result<String, ClientError> {
    let bad = |reason: &str| ClientError::BadAddress { host: host.to_string(), reason: reason.to_string() };
    let h = host.trim();
    if h.is_empty() {
        return Err(bad("empty host"));
    }
    let default_scheme = if tls { "https" } else { "http" };
    let (scheme, rest) = match h.split_once("://") {
        Some(("http", _)) if tls => return Err(bad("http:// is plaintext, but TLS is configured (use https:// or none)")),
        Some(("https", _)) if !tls => return Err(bad("https:// needs --tls-cert, --tls-key and --tls-ca")),
        Some(("http", r)) => ("http", r),
        Some(("https", r)) => ("https", r),
        Some((s, _)) => return Err(bad(&format!("unsupported scheme {s:?} (use {default_scheme}:// or none)"))),
        None => (default_scheme, h),
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains(char::is_whitespace) {
        return Err(bad("expected HOST or HOST:PORT"));
    }
    // A bracketed IPv6 address or a name/IPv4 with an optional port.
    let has_port = if let Some(end) = rest.find(']') {
        rest[end + 1..].starts_with(':')
    } else {
        match rest.matches(':').count() {
            0 => false,
            1 => true,
            _ => return Err(bad("IPv6 addresses must be in brackets, e.g. [::1]:50151")),
        }
    };
    let with_port = if has_port {
        let port = rest.rsplit(':').next().unwrap_or("");
        port.parse::<u16>().map_err(|_| bad(&format!("invalid port {port:?}")))?;
        rest.to_string()
    } else {
        format!("{rest}:{}", crate::DEFAULT_AGENT_PORT)
    };
    let uri = format!("{scheme}://{with_port}");
    uri.parse::<tonic::transport::Uri>().map_err(|e| bad(&e.to_string()))?;
    Ok(uri)
}

/// What tells agents apart in a host list: `hv1`, ` hv1`, `hv1:50151` and `http://hv1:50151/` are one agent (the
/// scheme follows the TLS flags anyway). An address that does not parse is its own key; it is refused elsewhere.
pub fn address_key(host: &str) -> String {
    let h = host.trim();
    let rest = h.split_once("://").map_or(h, |(_, r)| r);
    normalize_address(rest).unwrap_or_else(|_| h.to_string())
}

/// The gRPC path of `GetStats`, which [`AgentClient::get_stats`] calls without the generated client.
const GET_STATS_PATH: &str = "/vcpu.v1.Agent/GetStats";

/// The codec of `GetStats`: the reply is read from one contiguous slice straight into [`HostStats`] by
/// [`convert::stats_into`], into the sample the caller no longer needs (the one before its previous one) when it
/// gives one, so a steady host's round allocates nothing to decode. prost decodes only where that reader gives up
/// (and then gives the same sample, or the error). Decoding was the largest part of the controller's work on a
/// fleet (BENCHMARKS.md, "Controller rounds on simulated fleets"): prost reading tonic's `DecodeBuf` goes through
/// `BytesMut` for every field, and most of the rest was allocating and freeing two strings per domain and a vector
/// per vCPU.
#[derive(Default)]
struct StatsCodec(Option<HostStats>);

impl Codec for StatsCodec {
    type Encode = pb::GetStatsRequest;
    type Decode = HostStats;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        StatsCodec(None)
    }

    fn decoder(&mut self) -> Self {
        StatsCodec(self.0.take())
    }
}

impl Encoder for StatsCodec {
    type Item = pb::GetStatsRequest;
    type Error = Status;

    fn encode(&mut self, item: pb::GetStatsRequest, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode_raw(dst);
        Ok(())
    }
}

impl Decoder for StatsCodec {
    type Item = HostStats;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<HostStats>, Status> {
        let n = src.remaining();
        // tonic hands over one frame's message, which is normally one chunk; copy only when it is not.
        let copied;
        let bytes = if src.chunk().len() == n {
            src.chunk()
        } else {
            copied = src.copy_to_bytes(n);
            &copied[..]
        };
        let mut s = self.0.take().unwrap_or_default();
        let decoded = if convert::stats_into(bytes, &mut s) {
            Ok(s)
        } else {
            pb::GetStatsResponse::decode(bytes).map(HostStats::from)
        };
        if src.remaining() == n {
            src.advance(n);
        }
        // The same status tonic's prost codec gives a message that does not decode.
        decoded.map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

/// A client for one agent.
#[derive(Clone)]
pub struct AgentClient {
    host: String,
    inner: PbClient<H2Channel>,
    /// The same channel without the generated client, for calls made with another codec.
    grpc: tonic::client::Grpc<H2Channel>,
    /// The connection under both, to drop after a call that missed its deadline.
    channel: H2Channel,
    timeout: Duration,
    metrics: Option<std::sync::Arc<crate::metrics::ControllerMetrics>>,
}

impl AgentClient {
    /// A plaintext client for `host`; connects on first use, so a host that is down does not delay start-up.
    pub fn new(host: &str, timeout: Duration) -> Result<AgentClient, ClientError> {
        Self::with_tls(host, timeout, None)
    }

    /// A client for `host`, over mutual TLS when `tls` is given (the agent's certificate must name the host part
    /// of `host`).
    pub fn with_tls(host: &str, timeout: Duration, tls: Option<&ClientTls>) -> Result<AgentClient, ClientError> {
        let bad = |e: &dyn std::fmt::Display| ClientError::BadAddress { host: host.to_string(), reason: e.to_string() };
        let uri: http::Uri = normalize_address_for(host, tls.is_some())?.parse().map_err(|e| bad(&e))?;
        let authority = uri.authority().cloned().ok_or_else(|| bad(&"no host in the address"))?;
        let channel = H2Channel::new(&authority, tls, CONNECT_TIMEOUT.min(timeout)).map_err(|e| bad(&e))?;
        let grpc = tonic::client::Grpc::with_origin(channel.clone(), uri.clone()).max_decoding_message_size(MAX_REPLY_SIZE);
        let inner = PbClient::with_origin(channel.clone(), uri).max_decoding_message_size(MAX_REPLY_SIZE);
        // Spaces around a name (`VCPU_HOSTS="hv1, hv2"`) are not part of it: not in reports, metrics or the pins file.
        Ok(AgentClient { host: host.trim().to_string(), inner, grpc, channel, timeout, metrics: None })
    }

    /// Times every call and counts its errors in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::ControllerMetrics>) -> AgentClient {
        self.metrics = Some(metrics);
        self
    }

    /// The host as given by the user.
    pub fn host(&self) -> &str {
        &self.host
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    fn err(&self, method: &'static str, s: Status) -> ClientError {
        ClientError::Rpc { host: self.host.clone(), method, code: s.code(), message: s.message().to_string() }
    }

    // The channel's own timeout covers connecting and waiting; this outer one also bounds a server that accepts
    // the connection and never answers.
    async fn deadline<T>(
        &self,
        method: &'static str,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, ClientError> {
        let started = std::time::Instant::now();
        let r = match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.err(method, s)),
            Err(_) => {
                // No answer at all: the connection may be dead (see `H2Channel::reset`); the next call dials again.
                self.channel.reset().await;
                Err(self.err(method, Status::deadline_exceeded(format!("no answer within {:?}", self.timeout))))
            }
        };
        if let Some(m) = &self.metrics {
            m.observe_rpc(&self.host, method, started.elapsed(), r.as_ref().err().and_then(ClientError::code));
        }
        r
    }

    pub async fn host_info(&mut self) -> Result<HostInfo, ClientError> {
        let req = self.request(pb::GetHostInfoRequest {});
        let mut c = self.inner.clone();
        Ok(self.deadline("GetHostInfo", c.get_host_info(req)).await?.into())
    }

    /// The host's sample now.
    pub async fn get_stats(&mut self) -> Result<HostStats, ClientError> {
        self.get_stats_into(None).await
    }

    /// The round's one sample, decoded into `spare` (a sample the caller no longer needs) if given. Called every
    /// round on every host, so it skips the generated client for a codec that decodes the reply from one slice
    /// into [`HostStats`], reusing `spare`'s allocations (see [`StatsCodec`]).
    pub async fn get_stats_into(&mut self, spare: Option<HostStats>) -> Result<HostStats, ClientError> {
        let mut req = self.request(pb::GetStatsRequest {});
        req.extensions_mut().insert(tonic::GrpcMethod::new("vcpu.v1.Agent", "GetStats"));
        let mut grpc = self.grpc.clone();
        let call = async move {
            grpc.ready().await.map_err(|e| Status::unknown(format!("Service was not ready: {e}")))?;
            let path = http::uri::PathAndQuery::from_static(GET_STATS_PATH);
            grpc.unary(req, path, StatsCodec(spare)).await
        };
        self.deadline("GetStats", call).await
    }

    pub async fn placement(&mut self, domain: &str) -> Result<DomainPlacement, ClientError> {
        let req = self.request(pb::GetVcpuPlacementRequest { domain: domain.to_string() });
        let mut c = self.inner.clone();
        Ok(self.deadline("GetVcpuPlacement", c.get_vcpu_placement(req)).await?.into())
    }

    pub async fn pin_vcpu(&mut self, pin: PinRequest) -> Result<(), ClientError> {
        let req = self.request(pb::PinVcpuRequest::from(pin));
        let mut c = self.inner.clone();
        self.deadline("PinVcpu", c.pin_vcpu(req)).await.map(|_| ())
    }

    /// One result per pin; the call fails as a whole only when the agent refused the batch.
    pub async fn apply_pins(&mut self, pins: &[PinRequest]) -> Result<Vec<Result<(), Status>>, ClientError> {
        let req = self.request(pb::ApplyPinsRequest { pins: pins.iter().cloned().map(Into::into).collect() });
        let mut c = self.inner.clone();
        let resp = self.deadline("ApplyPins", c.apply_pins(req)).await?;
        if resp.results.len() != pins.len() {
            return Err(self.err("ApplyPins", Status::internal("agent returned a result count different from the pin count")));
        }
        Ok(resp.results.iter().map(convert::pin_result_from_pb).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_pin_is_refused_only_when_the_agent_said_so() {
        let rpc = |code, message: &str| ClientError::Rpc { host: "h".into(), method: "PinVcpu", code, message: message.into() };
        let late = format!("libvirt did not answer {} within 5s", crate::hypervisor::LATE_PIN_BATCH);
        for (e, want) in [
            (ClientError::BadAddress { host: "h".into(), reason: "empty host".into() }, PinFailure::NotSent),
            (rpc(Code::Unavailable, "cannot reach 127.0.0.1:1: Connection refused"), PinFailure::NotSent),
            (rpc(Code::DeadlineExceeded, "timeout"), PinFailure::NotConfirmed),
            (rpc(Code::Unavailable, "connection to 127.0.0.1:1 failed: broken pipe"), PinFailure::NotConfirmed),
            (rpc(Code::Unavailable, &late), PinFailure::NotConfirmed),
            (rpc(Code::Unavailable, "libvirt is unavailable: cannot connect"), PinFailure::Refused),
            (rpc(Code::NotFound, "domain \"x\" not found"), PinFailure::Refused),
            (rpc(Code::InvalidArgument, "pCPU 9 does not exist"), PinFailure::Refused),
        ] {
            assert_eq!(pin_failure(&e), want, "{e}");
        }
    }

    /// A call that gets no answer within its deadline drops the connection: the next call dials a new one, rather
    /// than queueing behind data a dead peer never acknowledges.
    #[tokio::test]
    async fn a_call_past_its_deadline_makes_the_next_one_dial_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        // Completes the HTTP/2 handshake and takes every request, but never answers one.
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                accepted_tx.send(()).unwrap();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.unwrap();
                    let mut held = Vec::new();
                    while let Some(Ok(r)) = conn.accept().await {
                        held.push(r);
                    }
                });
            }
        });
        let mut c = AgentClient::new(&addr.to_string(), Duration::from_millis(200)).unwrap();
        for _ in 0..2 {
            let e = c.get_stats().await.unwrap_err();
            assert_eq!(e.code(), Some(Code::DeadlineExceeded), "{e}");
        }
        let mut connections = 0;
        while accepted.try_recv().is_ok() {
            connections += 1;
        }
        assert_eq!(connections, 2, "each call past its deadline left the next one a new connection");
    }

    #[test]
    fn addresses() {
        assert_eq!(normalize_address("10.0.0.1").unwrap(), "http://10.0.0.1:50151");
        for same in ["hv1", " hv1", "hv1:50151", "http://hv1:50151/", "https://hv1"] {
            assert_eq!(address_key(same), address_key("hv1"), "{same:?}");
        }
        assert_ne!(address_key("hv1:50152"), address_key("hv1"));
        assert_ne!(address_key("hv2"), address_key("hv1"));
        assert_eq!(normalize_address("host-a:7000").unwrap(), "http://host-a:7000");
        assert_eq!(normalize_address("http://h:1/").unwrap(), "http://h:1");
        assert_eq!(normalize_address("[::1]:9").unwrap(), "http://[::1]:9");
        assert_eq!(normalize_address("[::1]").unwrap(), "http://[::1]:50151");
        for bad in ["", "h:99999", "h:x", "ftp://h", "::1", "a b", "h/x", "https://h"] {
            assert!(normalize_address(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(normalize_address_for("hv1", true).unwrap(), "https://hv1:50151");
        assert_eq!(normalize_address_for("https://10.0.0.1:7", true).unwrap(), "https://10.0.0.1:7");
        assert!(normalize_address_for("http://hv1", true).is_err(), "plaintext scheme accepted with TLS");
    }
}
