//! The controller's HTTP/2 transport to one agent: one h2 connection, made on first use, remade on the next call
//! after it fails, and driven by one task. tonic's generated client and codec run on top of it, because it is a tower
//! `Service` (see [`H2Channel`]).
//!
//! Why not tonic's `Channel`: at 1,000 hosts (BENCHMARKS.md, "Controller rounds on simulated fleets") a `Channel`
//! held about 70 KiB per host: a tower `Buffer` worker and hyper's dispatch queue each keep their own mpsc blocks
//! (about 9 KiB each, and a second one after 32 calls, which is why memory grew over the first rounds). Every call
//! also hopped through both tasks. Talking to h2 directly hands a call straight to the connection and keeps only h2's
//! own buffers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::security::ClientTls;

/// Errors of the transport, as tonic expects them (a `Status` inside is reported as is).
pub type BoxError = tonic::codegen::StdError;

/// A cloneable handle on one agent's connection; clones share it.
#[derive(Clone)]
pub struct H2Channel {
    inner: Arc<Inner>,
}

struct Inner {
    /// `HOST:PORT` as dialled (names are resolved on every connect, so a moved host is found again).
    addr: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Bounds the whole dial: TCP, TLS and the HTTP/2 handshake.
    connect_timeout: Duration,
    /// The live connection, with a number that tells it from the ones before it.
    conn: Mutex<(u64, Option<h2::client::SendRequest<Bytes>>)>,
}

impl H2Channel {
    /// A lazy channel to `authority` (`HOST:PORT`, IPv6 in brackets); nothing is dialled until the first call.
    pub fn new(authority: &http::uri::Authority, tls: Option<&ClientTls>, connect_timeout: Duration) -> Result<H2Channel, String> {
        let tls = match tls {
            None => None,
            Some(t) => {
                // rustls wants the bare address for an IP, and checks it against the certificate's IP SAN.
                let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
                let name = ServerName::try_from(host).map_err(|e| format!("not a valid TLS server name: {e}"))?;
                Some((TlsConnector::from(t.config()), name))
            }
        };
        let inner = Inner { addr: authority.as_str().to_string(), tls, connect_timeout, conn: Mutex::new((0, None)) };
        Ok(H2Channel { inner: Arc::new(inner) })
    }

    /// Drops the connection, so that the next call dials again. For a call that got no answer within its deadline:
    /// the connection may be dead without the kernel knowing yet (a host powered off or cut off keeps unacknowledged
    /// data in retransmission, with backoff up to two minutes, before the socket fails). Dialling again costs one
    /// handshake; keeping a dead connection would keep the host "down" for minutes after it is back.
    pub async fn reset(&self) {
        self.inner.conn.lock().await.1 = None;
    }
}

impl Inner {
    /// The live connection, or a new one. Holding the lock while connecting keeps concurrent calls to one host on one
    /// connection.
    async fn sender(&self) -> Result<(u64, h2::client::SendRequest<Bytes>), BoxError> {
        let mut slot = self.conn.lock().await;
        if let Some(s) = slot.1.as_ref() {
            // A connection that closed while idle (an agent restarted between two rounds) says so at once; the call
            // dials the new agent instead of failing on the old connection and costing the host a round. Pending
            // (the stream limit reached) means open: the call waits for its turn under its own deadline.
            if !matches!(s.clone().ready().now_or_never(), Some(Err(_))) {
                return Ok((slot.0, s.clone()));
            }
        }
        let s = tokio::time::timeout(self.connect_timeout, self.connect())
            .await
            .map_err(|_| format!("connecting to {} took longer than {:?}", self.addr, self.connect_timeout))??;
        slot.0 += 1;
        slot.1 = Some(s.clone());
        Ok((slot.0, s))
    }

    async fn connect(&self) -> Result<h2::client::SendRequest<Bytes>, BoxError> {
        let tcp = TcpStream::connect(&self.addr).await?;
        // A reply's last small write must not wait for a delayed ACK (see the agent's TCP_NODELAY).
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => handshake(tcp).await,
            Some((connector, name)) => handshake(connector.connect(name.clone(), tcp).await?).await,
        }
    }

    /// Forgets connection number `failed` so that the next call dials again, unless another call already replaced
    /// it with a newer one.
    async fn forget(&self, failed: u64) {
        let mut slot = self.conn.lock().await;
        if slot.0 == failed {
            slot.1 = None;
        }
    }

    async fn call(&self, req: http::Request<tonic::body::Body>) -> Result<http::Response<RecvBody>, BoxError> {
        let (parts, body) = req.into_parts();
        // A unary call's body is one length-prefixed message; collecting it first lets it go out in one DATA frame.
        let data = body.collect().await.map_err(|s| -> BoxError { Box::new(s) })?.to_bytes();
        // tonic reports a `Status` found in the error as is: a host that cannot be reached is UNAVAILABLE, as with
        // tonic's own transport, so that metrics and logs tell "down" from "broken".
        let (number, sender) = self
            .sender()
            .await
            .map_err(|e| {
                let why = e.to_string();
                let hint = mismatch_hint(self.tls.is_some(), &why);
                tonic::Status::unavailable(format!("{CANNOT_REACH}{}: {why}{hint}", self.addr))
            })?;
        match send(sender, http::Request::from_parts(parts, ()), data).await {
            Ok(r) => Ok(r),
            // A stream reset by the agent leaves the connection usable, and tonic maps its reason code.
            Err(e) if e.is_reset() && !e.is_go_away() => Err(e.into()),
            // Anything else (GOAWAY, I/O, a closed connection): dial again on the next call.
            Err(e) => {
                self.forget(number).await;
                let why = e.to_string();
                let hint = mismatch_hint(self.tls.is_some(), &why);
                Err(tonic::Status::unavailable(format!("{CONNECTION_FAILED}{} failed: {why}{hint}", self.addr)).into())
            }
        }
    }
}

/// What a TLS mismatch looks like from here, said in the operator's words: HTTP/2 reading a TLS record (or any
/// other protocol) as a frame, or rustls reading plaintext HTTP/2 as a record. Empty when the error is not one.
fn mismatch_hint(tls: bool, error: &str) -> &'static str {
    if !tls && error.contains("frame with invalid size") {
        "; the answer is not plaintext HTTP/2: an agent that wants TLS (--tls-cert, --tls-key, --tls-ca), or no agent"
    } else if tls && (error.contains("InvalidContentType") || error.contains("corrupt message")) {
        "; the answer is not TLS: an agent serving plaintext (drop the TLS settings), or no agent"
    } else {
        ""
    }
}

/// How an UNAVAILABLE of this transport begins when nothing was sent: no connection could be made.
pub const CANNOT_REACH: &str = "cannot reach ";
/// How it begins when a connection failed with a call on it: the request may have reached the agent.
pub const CONNECTION_FAILED: &str = "connection to ";

async fn send(
    mut sender: h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    data: Bytes,
) -> Result<http::Response<RecvBody>, h2::Error> {
    sender = sender.ready().await?;
    let (resp, mut stream) = sender.send_request(req, data.is_empty())?;
    if !data.is_empty() {
        // h2 buffers what the peer's window does not take yet; requests are a few KiB.
        stream.send_data(data, true)?;
    }
    let resp = resp.await?;
    let (parts, recv) = resp.into_parts();
    Ok(http::Response::from_parts(parts, RecvBody { recv, data_done: false, done: false }))
}

async fn handshake<T>(io: T) -> Result<h2::client::SendRequest<Bytes>, BoxError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = h2::client::Builder::new()
        // The agent's replies carry the same few headers each time; an HPACK table for them would be per-host memory
        // that saves a few dozen bytes per reply.
        .header_table_size(0)
        .handshake::<T, Bytes>(io)
        .await?;
    tokio::spawn(async move {
        // Ends when every handle is dropped (the host left the fleet) or the connection fails; the next call dials
        // again in that case.
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "agent connection closed");
        }
    });
    Ok(sender)
}

impl tower::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<RecvBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is per connection and per stream; it is awaited inside the call, under the call's deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.call(req).await })
    }
}

/// A reply body: h2's DATA frames, then its trailers (where gRPC puts the status).
pub struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
    done: bool,
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(b)) => {
                    // Hand the window back at once: tonic buffers the message itself.
                    let _ = this.recv.flow_control().release_capacity(b.len());
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        let t = std::task::ready!(this.recv.poll_trailers(cx));
        this.done = true;
        match t {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_mismatches_are_named() {
        assert!(mismatch_hint(false, "connection error detected: frame with invalid size").contains("wants TLS"));
        assert!(mismatch_hint(true, "received corrupt message of type InvalidContentType").contains("plaintext"));
        assert_eq!(mismatch_hint(true, "frame with invalid size"), "");
        assert_eq!(mismatch_hint(false, "Connection refused (os error 111)"), "");
    }
    use tokio::net::TcpListener;

    /// Serves one h2 connection on `listener`, answering every request with a bare 200; returns how many requests
    /// it served once the client's connection ends.
    async fn serve_one(listener: TcpListener) -> usize {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::handshake(tcp).await.unwrap();
        let mut served = 0;
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            served += 1;
            respond.send_response(http::Response::new(()), true).unwrap();
        }
        served
    }

    /// Such a server on a free loopback port.
    async fn server() -> (http::uri::Authority, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: http::uri::Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        (authority, tokio::spawn(serve_one(listener)))
    }

    fn request(a: &http::uri::Authority) -> http::Request<tonic::body::Body> {
        http::Request::builder().uri(format!("http://{a}/x")).body(tonic::body::Body::empty()).unwrap()
    }

    /// Calls share one connection, and dropping the last handle (a host removed from the fleet by a reload) closes
    /// it: the controller does not keep connections to hosts it no longer balances.
    #[tokio::test]
    async fn calls_share_one_connection_that_closes_with_the_last_handle() {
        let (a, done) = server().await;
        let ch = H2Channel::new(&a, None, Duration::from_secs(2)).unwrap();
        let clone = ch.clone();
        for c in [&ch, &clone, &ch] {
            let r = c.inner.call(request(&a)).await.unwrap();
            assert_eq!(r.status(), 200);
        }
        drop(ch);
        drop(clone);
        let served = tokio::time::timeout(Duration::from_secs(5), done).await.expect("connection closed").unwrap();
        assert_eq!(served, 3, "one server connection saw every call");
    }

    /// After [`H2Channel::reset`] the next call dials a new connection, and the old one closes (its last handle is
    /// gone).
    #[tokio::test]
    async fn a_reset_channel_dials_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a: http::uri::Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let ch = H2Channel::new(&a, None, Duration::from_secs(2)).unwrap();
        let first = tokio::spawn(serve_one(listener));
        assert_eq!(ch.inner.call(request(&a)).await.unwrap().status(), 200);
        ch.reset().await;
        // The first connection ends once the channel let go of it, having served one call.
        let served = tokio::time::timeout(Duration::from_secs(5), first).await.expect("old connection closed").unwrap();
        assert_eq!(served, 1);
    }

    /// An agent restarted between two calls (its connection closed while idle) answers the next call on a new
    /// connection: the call does not fail.
    #[tokio::test]
    async fn a_connection_closed_while_idle_is_dialled_again_for_the_next_call() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a: http::uri::Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let ch = H2Channel::new(&a, None, Duration::from_secs(2)).unwrap();
        let agent = tokio::spawn(async move {
            // The first agent answers one call and shuts down gracefully (GOAWAY, then close).
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
            respond.send_response(http::Response::new(()), true).unwrap();
            conn.graceful_shutdown();
            while conn.accept().await.is_some() {}
            drop(conn);
            // Its successor on the same address.
            serve_one(listener).await
        });
        assert_eq!(ch.inner.call(request(&a)).await.unwrap().status(), 200);
        // Wait until this side has seen the first connection close.
        let old = ch.inner.conn.lock().await.1.clone().unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while old.clone().ready().await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the first connection never closed");
        let r = ch.inner.call(request(&a)).await.map_err(tonic::Status::from_error);
        assert_eq!(r.unwrap().status(), 200);
        drop(ch);
        assert_eq!(agent.await.unwrap(), 1, "the successor served the second call");
    }

    /// A host that is down is UNAVAILABLE (so that metrics and logs say "down"), and the next call dials again.
    #[tokio::test]
    async fn a_host_that_is_down_is_unavailable_and_dialled_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a: http::uri::Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let ch = H2Channel::new(&a, None, Duration::from_secs(2)).unwrap();
        let Err(e) = ch.inner.call(request(&a)).await else { panic!("a closed port answered") };
        let status = tonic::Status::from_error(e);
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        // The same address comes up: the same channel reaches it.
        tokio::spawn(serve_one(TcpListener::bind(a.as_str()).await.unwrap()));
        assert_eq!(ch.inner.call(request(&a)).await.unwrap().status(), 200);
    }
}
