//! A tower layer counting gRPC requests by method and status code, with
//! their latency.

use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;

use crate::metrics::{GrpcLabels, MethodLabels, Metrics};

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
        let method = request.uri().path().trim_start_matches('/').to_string();
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
