//! A tower layer around the agent's gRPC server that times every `vcpu.v1.Agent` call and counts its errors by
//! gRPC code, after giving a request that does not decode its INVALID_ARGUMENT ([`super::status_layer`]). A layer
//! sees every method the same way, so the handlers stay free of bookkeeping; one layer, so one boxed future per call.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::metrics::AgentMetrics;

/// Path prefix of the service whose calls are measured (health checks and reflection are not).
const AGENT_PATH_PREFIX: &str = "/vcpu.v1.Agent/";

/// The service's RPCs (checked against `proto/` by a test). Only these get a label of their own: a label taken from
/// any path a client sends would let it grow `/metrics` without bound.
const AGENT_METHODS: [&str; 6] = ["GetHostInfo", "ListDomains", "GetStats", "GetVcpuPlacement", "PinVcpu", "ApplyPins"];

/// The `method` label of a request to `path`: the RPC's name, `unknown` for any other method of the service, none
/// for other services (health, reflection).
fn method_label(path: &str) -> Option<&'static str> {
    let m = path.strip_prefix(AGENT_PATH_PREFIX)?;
    Some(AGENT_METHODS.iter().copied().find(|k| *k == m).unwrap_or("unknown"))
}

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
        let method = method_label(req.uri().path());
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut r = fut.await;
            if let Ok(resp) = &mut r {
                super::status_layer::reclassify(resp);
            }
            if let (Some(m), Some(method)) = (metrics, method) {
                let code = match &r {
                    Ok(resp) => code_of(resp),
                    Err(_) => tonic::Code::Internal,
                };
                m.observe_rpc(method, start.elapsed(), (code != tonic::Code::Ok).then_some(code));
            }
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_the_protos_rpcs_and_nothing_else() {
        let proto = include_str!("../../proto/vcpu/v1/agent.proto");
        let rpcs: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split('(').next().unwrap_or("").trim())
            .collect();
        assert_eq!(rpcs, AGENT_METHODS, "AGENT_METHODS must list the service's RPCs");
        for m in AGENT_METHODS {
            assert_eq!(method_label(&format!("{AGENT_PATH_PREFIX}{m}")), Some(m));
        }
        for junk in ["Nope", "GetStats2", "", "a/b", "GetStats/"] {
            assert_eq!(method_label(&format!("{AGENT_PATH_PREFIX}{junk}")), Some("unknown"), "{junk:?}");
        }
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), None);
    }
}
