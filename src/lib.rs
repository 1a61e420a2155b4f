//! tiller: an HTTP inference server for activation steering.
//!
//! Dependencies run one way: `api` -> `engine` -> `steering` -> `model` (docs/architecture.md).
//! [`app`] is the seam tests use: the whole HTTP surface over a given state, no port.

pub mod api;
pub mod cli;
pub mod config;
pub mod connections;
pub mod device_check;
pub mod engine;
pub mod error;
pub mod loadgen;
pub mod metrics;
pub mod model;
pub mod server;
pub mod steering;
pub mod telemetry;
#[doc(hidden)]
pub mod testing;

pub use api::AppState;

/// The HTTP application: every route, its error handling and request tracing.
pub fn app(state: AppState) -> axum::Router {
    let (router, _spec) = api::router_and_spec(state);
    telemetry::http_layers(router)
}
