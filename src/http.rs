//! The binaries' small HTTP servers (axum): `GET /metrics` on both, and on the controller the status page
//! (`/`, with its assets embedded in the binary: no Node toolchain, nothing to install beside it) and
//! `GET /api/state`, the page's data as JSON.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::controller::state::StateStore;
use crate::metrics::{AgentMetrics, ControllerMetrics, CONTENT_TYPE};

const INDEX_HTML: &str = include_str!("../assets/status/index.html");
const APP_JS: &str = include_str!("../assets/status/app.js");
const STYLE_CSS: &str = include_str!("../assets/status/style.css");

/// Anything that can render its metrics as OpenMetrics text.
pub trait Exposition: Send + Sync + 'static {
    fn exposition(&self) -> String;
}

impl Exposition for ControllerMetrics {
    fn exposition(&self) -> String {
        self.encode()
    }
}

impl Exposition for AgentMetrics {
    fn exposition(&self) -> String {
        self.encode()
    }
}

async fn metrics_handler<M: Exposition>(State(m): State<Arc<M>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], m.exposition())
}

/// `GET /metrics` (and `/healthz` for load balancers and probes).
pub fn metrics_router<M: Exposition>(metrics: Arc<M>) -> Router {
    Router::new().route("/metrics", get(metrics_handler::<M>)).route("/healthz", get(|| async { "ok\n" })).with_state(metrics)
}

async fn api_state(State(s): State<StateStore>) -> impl IntoResponse {
    // The page polls: a cached answer would freeze it.
    ([(header::CACHE_CONTROL, "no-store")], Json(s.snapshot()))
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse + Clone {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body)
}

/// The status page, its assets and `GET /api/state`; also `/metrics` when `metrics` is given, so one port can
/// serve both.
pub fn status_router(state: StateStore, metrics: Option<Arc<ControllerMetrics>>) -> Router {
    let page = Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/api/state", get(api_state))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state);
    match metrics {
        Some(m) => page.route("/metrics", get(metrics_handler::<ControllerMetrics>).with_state(m)),
        None => page,
    }
}

/// Most connections one HTTP listener holds at once. Further ones wait in the kernel's backlog until one closes: a
/// client that opens connections and never finishes a request can use up these, never the process's file
/// descriptors, which the agent's gRPC needs.
pub const MAX_HTTP_CONNECTIONS: usize = 256;
/// A connection with no byte read or written for this long is closed: a request's headers that never end, or a
/// response nobody reads, would otherwise hold its slot for good.
pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` until `shutdown` resolves, with [`MAX_HTTP_CONNECTIONS`] and [`HTTP_IDLE_TIMEOUT`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_limited(listener, router, shutdown, MAX_HTTP_CONNECTIONS, HTTP_IDLE_TIMEOUT).await
}

/// [`serve`] with the connection limit and idle timeout given.
pub async fn serve_limited(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    max_connections: usize,
    idle: Duration,
) -> std::io::Result<()> {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, max_connections, "http listening");
    }
    let listener = Limited { inner: listener, slots: Arc::new(Semaphore::new(max_connections.max(1))), idle };
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// A listener that accepts only while it holds fewer than its limit of connections.
struct Limited {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
}

impl axum::serve::Listener for Limited {
    type Io = LimitedIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (LimitedIo, std::net::SocketAddr) {
        // The slot is taken before accepting, so a full server leaves new connections in the backlog.
        let Ok(slot) = Arc::clone(&self.slots).acquire_owned().await else { unreachable!("the semaphore is never closed") };
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let idle = self.idle;
        (LimitedIo { inner: io, _slot: slot, idle, timer: Box::pin(tokio::time::sleep(idle)) }, addr)
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

/// One accepted connection: gives its slot back when dropped, and fails once idle for too long.
struct LimitedIo {
    inner: tokio::net::TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl LimitedIo {
    /// Progress restarts the idle clock; no progress past it is an error, which closes the connection.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.timer.as_mut().reset(tokio::time::Instant::now() + self.idle);
                Poll::Ready(r)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle connection"))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.watch(cx, r)
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A bound on the test's own waits, far above what the server needs: a regression fails instead of hanging.
    const GUARD: Duration = Duration::from_secs(30);

    async fn server(max: usize, idle: Duration) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let router = Router::new().route("/healthz", get(|| async { "ok\n" }));
        tokio::spawn(serve_limited(l, router, std::future::pending(), max, idle));
        addr
    }

    /// Opens a connection and sends a request's first header lines only, as a slow or hostile client does.
    async fn half_request(addr: std::net::SocketAddr) -> TcpStream {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        c
    }

    #[tokio::test]
    async fn a_request_that_never_ends_is_closed_when_idle() {
        let addr = server(4, Duration::from_millis(200)).await;
        let mut c = half_request(addr).await;
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(GUARD, c.read(&mut buf)).await.expect("the idle connection was never closed");
        // Closed: end of file, or a reset.
        if let Ok(n) = n {
            assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
        }
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_free_slot() {
        let addr = server(2, Duration::from_secs(600)).await;
        let held = [half_request(addr).await, half_request(addr).await];
        let mut third = TcpStream::connect(addr).await.unwrap();
        third.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        // Both slots are held: the third is not served (a wait that the server's answer would cut short).
        let early = tokio::time::timeout(Duration::from_millis(500), third.read_to_end(&mut buf)).await;
        assert!(early.is_err(), "served beyond the limit: {:?}", String::from_utf8_lossy(&buf));
        drop(held);
        tokio::time::timeout(GUARD, third.read_to_end(&mut buf)).await.expect("never served").unwrap();
        assert!(buf.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf));
    }
}
