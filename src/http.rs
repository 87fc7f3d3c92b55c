//! The binaries' small HTTP servers (axum): `GET /metrics` on both, and on the controller the status page
//! (`/`, with its assets embedded in the binary: no Node toolchain, nothing to install beside it) and
//! `GET /api/state`, the page's data as JSON.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

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

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "http listening");
    }
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}
