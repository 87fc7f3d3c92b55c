//! A tower layer around the agent's gRPC server that times every `vcpu.v1.Agent` call and counts its errors by
//! gRPC code. A layer sees every method the same way, so the handlers stay free of bookkeeping.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::metrics::AgentMetrics;

/// Path prefix of the service whose calls are measured (health checks and reflection are not).
const AGENT_PATH_PREFIX: &str = "/vcpu.v1.Agent/";

/// Measures calls when it holds metrics; passes them through untouched otherwise.
#[derive(Clone, Default)]
pub struct MetricsLayer {
    metrics: Option<Arc<AgentMetrics>>,
}

impl MetricsLayer {
    pub fn new(metrics: Option<Arc<AgentMetrics>>) -> Self {
        MetricsLayer { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Option<Arc<AgentMetrics>>,
}

/// The gRPC code of a response: tonic puts an error's `grpc-status` in the headers (a trailers-only response);
/// a success carries it in the trailers, which come after the body, so a response without it in the headers is OK.
fn code_of<B>(resp: &http::Response<B>) -> tonic::Code {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

impl<S, B, RB> Service<http::Request<B>> for MetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().strip_prefix(AGENT_PATH_PREFIX).map(str::to_string);
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            if let (Some(m), Some(method)) = (metrics, method) {
                let code = match &r {
                    Ok(resp) => code_of(resp),
                    Err(_) => tonic::Code::Internal,
                };
                m.observe_rpc(&method, start.elapsed(), (code != tonic::Code::Ok).then_some(code));
            }
            r
        })
    }
}
