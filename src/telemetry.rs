//! Logging and request tracing: a `tracing` subscriber configured from `[log]`, and the HTTP
//! layers that give every request an id (`x-request-id`, echoed back) and a span carrying it,
//! so every log line of a request can be found. Metric names live here too (one place).

use axum::http::{HeaderName, Request};
use axum::Router;
use std::sync::atomic::{AtomicU64, Ordering};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use tracing_subscriber::EnvFilter;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Installs the global subscriber (`RUST_LOG` wins over `level`). Safe to call twice.
pub fn init(level: &str, format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Request ids `req-<process start>-<counter>`, unless the client sent one.
#[derive(Clone, Default)]
struct Counter;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl MakeRequestId for Counter {
    fn make_request_id<B>(&mut self, _req: &Request<B>) -> Option<RequestId> {
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        format!("req-{n:08x}").parse().ok().map(RequestId::new)
    }
}

/// Wraps the router with request ids and a trace span per request.
pub fn http_layers(router: Router) -> Router {
    let header = HeaderName::from_static(REQUEST_ID_HEADER);
    router
        .layer(PropagateRequestIdLayer::new(header.clone()))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let id = req
                    .headers()
                    .get(REQUEST_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path())
            }),
        )
        .layer(SetRequestIdLayer::new(header, Counter))
}
