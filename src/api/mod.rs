//! The HTTP surface: axum handlers, registered together with their OpenAPI documentation
//! (`utoipa-axum`), over a shared [`AppState`]. Handlers turn wire types into validated ones
//! and hand work to the engine; nothing here runs a forward pass.

pub mod auth;
pub mod generate;
pub mod health;
pub mod inspect;
pub mod json;
pub mod lens;
pub mod openai;
pub mod patch;
pub mod playground;
pub mod progress;
pub mod saes;
pub mod tokenize;
pub mod vectors;

use crate::config::Config;
use crate::engine::EngineHandle;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::steering::sae::SaeStore;
use crate::steering::spec::{validate, InterventionSpec, ModelLimits, SteeringPlan};
use crate::steering::store::VectorStore;
use axum::extract::DefaultBodyLimit;
use axum::Router;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Everything handlers share.
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

pub struct AppInner {
    pub engine: EngineHandle,
    pub store: Arc<VectorStore>,
    pub saes: Arc<SaeStore>,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    /// Places for `/inspect/patch` sweeps running at once (`limits.max_concurrent_patches`).
    pub patch_sweeps: Arc<tokio::sync::Semaphore>,
    ready: AtomicBool,
}

impl std::ops::Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl AppState {
    pub fn new(
        engine: EngineHandle,
        store: Arc<VectorStore>,
        saes: Arc<SaeStore>,
        config: Config,
        metrics: Arc<Metrics>,
    ) -> Self {
        let patch_sweeps = Arc::new(tokio::sync::Semaphore::new(
            config.limits.max_concurrent_patches,
        ));
        Self(Arc::new(AppInner {
            engine,
            store,
            saes,
            patch_sweeps,
            config,
            metrics,
            started: Instant::now(),
            ready: AtomicBool::new(true),
        }))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Marks the server as draining (shutting down): `/ready` answers 503.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed)
    }

    /// The request's steering, validated against the served model and the stored vectors:
    /// the body's `steering` list, else the `X-Steering` header (a JSON list or the compact
    /// form). Every route that steers reads it here; a malformed header is a 400 even when
    /// the body's list wins.
    pub async fn steering_plan(
        &self,
        body: Option<&[InterventionSpec]>,
        headers: &axum::http::HeaderMap,
    ) -> Result<Option<Arc<SteeringPlan>>, ApiError> {
        let from_header = header_steering(headers)?;
        let specs = body.or(from_header.as_deref()).unwrap_or_default();
        // A vector written through another replica may not have reached this one's copy yet.
        if self.store.shared().is_some() && specs.len() <= self.config.limits.max_interventions {
            let names: Vec<&str> = specs
                .iter()
                .flat_map(InterventionSpec::vector_names)
                .collect();
            self.store.lookup_many(&names).await.map_err(|e| {
                vectors::store_unavailable(format!(
                    "a vector the request names is not known to this replica, and {e}"
                ))
            })?;
        }
        self.plan_of(specs)
    }

    /// [`Self::steering_plan`] against the vectors this replica holds now, asking no database.
    pub fn steering_plan_now(
        &self,
        body: Option<&[InterventionSpec]>,
        headers: &axum::http::HeaderMap,
    ) -> Result<Option<Arc<SteeringPlan>>, ApiError> {
        let from_header = header_steering(headers)?;
        self.plan_of(body.or(from_header.as_deref()).unwrap_or_default())
    }

    /// The validated plan of a steering list (`None` when it is empty).
    fn plan_of(&self, specs: &[InterventionSpec]) -> Result<Option<Arc<SteeringPlan>>, ApiError> {
        if specs.is_empty() {
            return Ok(None);
        }
        let cfg = self.engine.model.dims();
        let plan = validate(
            specs,
            &ModelLimits::new(
                cfg,
                self.config.limits.max_interventions,
                &self.store,
                &self.saes,
            ),
        )?;
        Ok(Some(Arc::new(plan)))
    }
}

impl AppState {
    /// The stored or built-in vector `name`, asking the shared database when this replica's
    /// copy lacks it; a 503 when it had to be asked and could not be.
    pub async fn vector(
        &self,
        name: &str,
    ) -> Result<Option<crate::steering::store::StoreEntry>, ApiError> {
        self.store.lookup(name).await.map_err(|e| {
            vectors::store_unavailable(format!(
                "vector `{name}` is not known to this replica, and {e}"
            ))
        })
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tiller",
        description = "An HTTP inference server for activation steering: every request can add, ablate or clamp feature directions and ablate or scale MLP neurons inside the forward pass."
    ),
    components(schemas(crate::error::ErrorBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// utoipa drops `example` on fields typed as free-form JSON (`value_type = Object`); these are
/// their examples, set on the document directly.
struct UntypedExamples;

const UNTYPED_EXAMPLES: &[(&str, &str, &str)] = &[
    ("GenerateRequest", "stop", r#"["\n\n"]"#),
    ("ChatCompletionRequest", "stop", r#"["\n\n"]"#),
    ("CompletionRequest", "stop", r#"["\n"]"#),
    ("ChatCompletionRequest", "tools", "[]"),
    ("CompletionRequest", "prompt", r#""Once upon a time""#),
    (
        "OpenAiMessage",
        "content",
        r#""What is the capital of France?""#,
    ),
    ("VectorJson", "layers", r#"{"12": [0.1, -0.2, 0.3]}"#),
    ("VectorInfo", "norms", r#"{"12": 28.3}"#),
    (
        "CompletionLogprobs",
        "top_logprobs",
        r#"[{" a": -0.5, " the": -1.1}]"#,
    ),
];

impl utoipa::Modify for UntypedExamples {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{RefOr, Schema};
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        for (schema, property, example) in UNTYPED_EXAMPLES {
            let Some(RefOr::T(schema)) = components.schemas.get_mut(*schema) else {
                continue;
            };
            // A struct with a flattened field is an `allOf` of objects.
            let objects: Vec<&mut utoipa::openapi::schema::Object> = match schema {
                Schema::Object(o) => vec![o],
                Schema::AllOf(all) => all
                    .items
                    .iter_mut()
                    .filter_map(|i| match i {
                        RefOr::T(Schema::Object(o)) => Some(o),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            for obj in objects {
                if let Some(RefOr::T(Schema::Object(prop))) = obj.properties.get_mut(*property) {
                    if let Ok(v) = serde_json::from_str(example) {
                        prop.examples = vec![v];
                    }
                }
            }
        }
    }
}

/// Declares the optional bearer-key scheme.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("Needed when the server has API keys; writes and extraction need an admin key"))
                    .build(),
            ),
        );
    }
}

/// Every documented route, registered once with its OpenAPI description.
fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(generate::generate))
        .routes(routes!(openai::chat_completions))
        .routes(routes!(openai::completions::completions))
        .routes(routes!(openai::list_models))
        .routes(routes!(openai::get_model))
        .routes(routes!(inspect::activations))
        .routes(routes!(lens::logit_lens))
        .routes(routes!(patch::patch))
        .routes(routes!(inspect::logprobs))
        .routes(routes!(inspect::neurons_top))
        .routes(routes!(saes::list_saes))
        .routes(routes!(saes::get_sae, saes::put_sae, saes::delete_sae))
        .routes(routes!(saes::inspect_features))
        .routes(routes!(saes::feature_top))
        .routes(routes!(vectors::list_vectors))
        .routes(routes!(vectors::extract_vector))
        .routes(routes!(
            vectors::get_vector,
            vectors::put_vector,
            vectors::delete_vector
        ))
        .routes(routes!(tokenize::tokenize))
        .routes(routes!(tokenize::detokenize))
        .routes(routes!(tokenize::tokenizer_info))
        .routes(routes!(health::health))
        .routes(routes!(health::ready))
        .routes(routes!(health::info))
        .routes(routes!(health::metrics))
}

/// Every route but the probes answers 401 without a key when API keys are configured.
fn add_unauthorized(spec: &mut utoipa::openapi::OpenApi) {
    add_error_response(
        spec,
        |path| !matches!(path, "/health" | "/ready"),
        "401",
        "API keys are configured and the request has none, or a wrong one",
    );
}

/// Routes that name stored vectors answer 503 when a shared vector database (`store.url`)
/// has to be asked for one and cannot be.
fn add_store_unavailable(spec: &mut utoipa::openapi::OpenApi) {
    const NAMING_VECTORS: [&str; 10] = [
        "/generate",
        "/v1/chat/completions",
        "/v1/completions",
        "/inspect/activations",
        "/inspect/logit_lens",
        "/inspect/logprobs",
        "/inspect/neurons/top",
        "/inspect/features",
        "/vectors/{name}",
        "/vectors/extract",
    ];
    add_error_response(
        spec,
        |path| NAMING_VECTORS.contains(&path),
        "503",
        "The shared vector database cannot be reached (`store_unavailable`, with `Retry-After`): \
         a write, or a vector this replica has not seen yet",
    );
}

/// Adds an error response (the envelope) to every operation of the paths `on` selects that
/// does not document `status` already.
fn add_error_response(
    spec: &mut utoipa::openapi::OpenApi,
    on: impl Fn(&str) -> bool,
    status: &str,
    description: &str,
) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    for (path, item) in spec.paths.paths.iter_mut() {
        if !on(path.as_str()) {
            continue;
        }
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            op.responses
                .responses
                .entry(status.to_string())
                .or_insert_with(|| {
                    ResponseBuilder::new()
                        .description(description)
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name("ErrorBody")))
                                .build(),
                        )
                        .build()
                        .into()
                });
        }
    }
}

/// The OpenAPI document (what `GET /openapi.json` serves and `tiller openapi` writes).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut spec) = api_router().split_for_parts();
    spec.info.version = env!("CARGO_PKG_VERSION").to_string();
    utoipa::Modify::modify(&UntypedExamples, &mut spec);
    add_unauthorized(&mut spec);
    add_store_unavailable(&mut spec);
    spec
}

/// The OpenAPI document as pretty JSON with a trailing newline.
pub fn openapi_json() -> String {
    let mut s = openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

/// The routes and their OpenAPI description.
pub fn router_and_spec(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let max_body = state.config.server.max_body_bytes;
    let (router, spec) = api_router().split_for_parts();
    let doc = Arc::new(openapi_json());
    let router = router
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        doc.as_str().to_owned(),
                    )
                }
            }),
        )
        .merge(playground::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(envelope_rejections))
        .layer(axum::middleware::from_fn(catch_panics))
        .with_state(state);
    (router, spec)
}

/// axum's own rejections (a path segment or query string that does not parse, a missing
/// content type) are plain-text 4xx replies; they get the error envelope like every other.
async fn envelope_rejections(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let resp = next.run(req).await;
    let plain = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !resp.status().is_client_error() || !plain {
        return resp;
    }
    let status = resp.status();
    let text = match axum::body::to_bytes(resp.into_body(), 1 << 16).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => String::new(),
    };
    let code = match status {
        axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        _ => "malformed_request",
    };
    crate::error::ApiError::new(status, code, text).into_response()
}

/// A safety net: a handler that panics answers a 500 envelope (and logs the panic) instead of
/// dropping the connection. Panics are bugs; inputs are refused before they can cause one.
async fn catch_panics(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use futures_util::FutureExt;
    let path = req.uri().path().to_string();
    match std::panic::AssertUnwindSafe(next.run(req))
        .catch_unwind()
        .await
    {
        Ok(resp) => resp,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            tracing::error!(%path, panic = %what, "a handler panicked");
            crate::error::ApiError::internal("handling the request", "the handler failed")
                .into_response()
        }
    }
}

/// The request header that carries steering on every route that steers.
pub const STEERING_HEADER: &str = "x-steering";

/// The steering list of the `X-Steering` header, if one was sent.
fn header_steering(
    headers: &axum::http::HeaderMap,
) -> Result<Option<Vec<InterventionSpec>>, ApiError> {
    let bad = |what: String| {
        ApiError::malformed(format!("`X-Steering`: {what}")).with_param("X-Steering")
    };
    let Some(raw) = headers.get(STEERING_HEADER) else {
        return Ok(None);
    };
    let text = raw
        .to_str()
        .map_err(|_| bad("the header is not valid text".into()))?
        .trim();
    if text.is_empty() {
        return Err(bad("the header is empty".into()));
    }
    if !text.starts_with('[') {
        return crate::steering::compact::parse(text)
            .map(Some)
            .map_err(|e| bad(e.to_string()));
    }
    let de = &mut serde_json::Deserializer::from_str(text);
    let list = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        bad(format!(
            "not a valid steering list at `{path}`: {}",
            e.into_inner()
        ))
    })?;
    de.end()
        .map_err(|e| bad(format!("unexpected text after the JSON list: {e}")))?;
    Ok(Some(list))
}

/// Counts every request by route template and status.
async fn count_requests(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    state.metrics.add(
        crate::metrics::HTTP_REQUESTS,
        &[("route", &route), ("status", &status)],
        1.0,
    );
    resp
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found("not_found", format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
