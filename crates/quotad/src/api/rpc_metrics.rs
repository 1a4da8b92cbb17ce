//! A tower layer around every gRPC service that records each call's latency
//! by method and status code (telemetry::rpc_finished). It sits outside the
//! auth interceptor and the services, so refused and unknown calls count too.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tower_layer::Layer;
use tower_service::Service;

use crate::telemetry;

#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for RpcMetrics<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let started = Instant::now();
        let rpc = telemetry::rpc_index(request.uri().path());
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            // A unary error is a trailers-only answer: grpc-status is in the
            // headers. A success carries it in the trailers, after the body
            // this layer does not wait for; no grpc-status header means OK.
            let code = match &answer {
                Ok(response) => telemetry::grpc_code_index(
                    response.headers().get("grpc-status").map(|v| v.as_bytes()),
                ),
                Err(_) => telemetry::GRPC_CODE_UNKNOWN,
            };
            telemetry::rpc_finished(rpc, code, started.elapsed());
            answer
        })
    }
}
