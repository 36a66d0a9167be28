//! A tower layer counting gRPC requests by method and status code, with
//! their latency.
//!
//! The `method` label takes only the methods the agent serves
//! ([`KNOWN_METHODS`]); any other path is counted as [`UNKNOWN_METHOD`], so
//! a client cannot grow the metrics without bound by calling random paths.

use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;

use crate::metrics::{GrpcLabels, MethodLabels, Metrics};

/// The methods served, as the `method` label spells them (the path without
/// its leading slash): AgentService, the health service and reflection.
pub const KNOWN_METHODS: &[&str] = &[
    "persys.agent.v1.AgentService/ApplyWorkload",
    "persys.agent.v1.AgentService/DeleteWorkload",
    "persys.agent.v1.AgentService/GetWorkloadStatus",
    "persys.agent.v1.AgentService/ListWorkloads",
    "persys.agent.v1.AgentService/HealthCheck",
    "persys.agent.v1.AgentService/ListActions",
    "persys.agent.v1.AgentService/Watch",
    "persys.agent.v1.AgentService/DescribeWorkload",
    "persys.agent.v1.AgentService/StreamLogs",
    "persys.agent.v1.AgentService/Exec",
    "persys.agent.v1.AgentService/Console",
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
];

/// The `method` label of any path not in [`KNOWN_METHODS`].
pub const UNKNOWN_METHOD: &str = "unknown";

/// The `method` label for a request path.
pub fn method_label(path: &str) -> &'static str {
    let method = path.strip_prefix('/').unwrap_or(path);
    KNOWN_METHODS
        .iter()
        .find(|known| **known == method)
        .copied()
        .unwrap_or(UNKNOWN_METHOD)
}

#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Metrics,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Metrics) -> Self {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Metrics,
}

/// The gRPC status of a response: in the headers for errors (a
/// "trailers-only" response), else OK — a streaming call's final status
/// travels in trailers and is counted as OK once the stream starts.
fn status_code<B>(response: &http::Response<B>) -> String {
    match response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
    {
        Some(code) => match tonic::Code::from_bytes(code.as_bytes()) {
            tonic::Code::Ok => "OK".to_string(),
            other => format!("{other:?}"),
        },
        None if response.status().is_success() => "OK".to_string(),
        None => format!("HTTP_{}", response.status().as_u16()),
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path()).to_string();
        // The ready service handles this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let requests = self.metrics.grpc_requests.clone();
        let seconds = self.metrics.grpc_seconds.clone();
        Box::pin(async move {
            let started = Instant::now();
            let response = inner.call(request).await;
            let code = match &response {
                Ok(response) => status_code(response),
                Err(_) => "TRANSPORT_ERROR".to_string(),
            };
            requests
                .get_or_create(&GrpcLabels {
                    method: method.clone(),
                    code,
                })
                .inc();
            seconds
                .get_or_create(&MethodLabels { method })
                .observe(started.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn known_methods_keep_their_label_and_anything_else_is_unknown() {
        for method in KNOWN_METHODS {
            assert_eq!(method_label(&format!("/{method}")), *method);
        }
        for path in [
            "/persys.agent.v1.AgentService/Nope",
            "/persys.agent.v1.AgentService/ApplyWorkload/extra",
            "/persys.agent.v1.AgentService/applyworkload",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "/x9f3a1c",
            "/",
            "",
        ] {
            assert_eq!(method_label(path), UNKNOWN_METHOD, "{path}");
        }
    }

    #[test]
    fn every_agent_service_method_is_known() {
        let set =
            prost_types::FileDescriptorSet::decode(persys_api::v1::FILE_DESCRIPTOR_SET).unwrap();
        let mut served = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    served.push(format!(
                        "{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        assert!(!served.is_empty());
        for method in &served {
            assert!(
                KNOWN_METHODS.contains(&method.as_str()),
                "{method} is served but not in KNOWN_METHODS"
            );
        }
    }
}
