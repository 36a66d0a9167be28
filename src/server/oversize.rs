//! A request larger than the agent takes answers RESOURCE_EXHAUSTED, as
//! gRPC's status-code table says for a message over the receive limit;
//! tonic answers OUT_OF_RANGE. Only that refusal is rewritten: its
//! message ("decoded message length too large…", with both sizes) stays.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::HeaderValue;

/// What tonic's refusal of an oversized message says.
const TOO_LARGE: &str = "message length too large";

#[derive(Clone, Default)]
pub struct OversizeLayer;

impl<S> tower::Layer<S> for OversizeLayer {
    type Service = OversizeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OversizeService { inner }
    }
}

#[derive(Clone)]
pub struct OversizeService<S> {
    inner: S,
}

/// Rewrites a trailers-only OUT_OF_RANGE refusal of an oversized request.
fn rewrite<B>(response: &mut http::Response<B>) {
    let headers = response.headers();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11");
    let too_large = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| m.contains(TOO_LARGE) || m.contains("message%20length%20too%20large"));
    if out_of_range && too_large {
        response.headers_mut().insert(
            "grpc-status",
            HeaderValue::from_static("8"), // RESOURCE_EXHAUSTED
        );
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for OversizeService<S>
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
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            rewrite(&mut response);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(code: &str, message: &str) -> http::Response<()> {
        let mut response = http::Response::new(());
        response
            .headers_mut()
            .insert("grpc-status", HeaderValue::from_str(code).unwrap());
        response
            .headers_mut()
            .insert("grpc-message", HeaderValue::from_str(message).unwrap());
        response
    }

    #[test]
    fn only_the_oversize_refusal_becomes_resource_exhausted() {
        let status = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5242885 bytes, the limit is: 4194304 bytes",
        );
        let mut oversized = status.into_http::<()>();
        rewrite(&mut oversized);
        assert_eq!(oversized.headers()["grpc-status"], "8");

        let mut other = response("11", "limit: out of range");
        rewrite(&mut other);
        assert_eq!(other.headers()["grpc-status"], "11");
        let mut ok = response("0", "message length too large");
        rewrite(&mut ok);
        assert_eq!(ok.headers()["grpc-status"], "0");
    }
}
