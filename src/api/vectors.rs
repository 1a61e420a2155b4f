//! Named feature vectors over HTTP: list, read and download (JSON, safetensors, llama.cpp
//! control-vector GGUF), write with compare-and-set (`If-Match`), delete, and extract new
//! ones from contrasting examples on the server.

use super::json::{ApiJson, RawBody};
use super::progress::{self, Progress};
use super::AppState;
use crate::config::Config;
use crate::error::{ApiError, ErrorBody};
use crate::model::hooks::HookSite;
use crate::model::Model;
use crate::steering::extract::{
    self, Activations, Example, ExampleSpec, LayerReport, Method, Position,
};
use crate::steering::formats::{self, VectorFormat};
use crate::steering::store::{valid_name, Precondition, StoreEntry, StoreError, VectorOrigin};
use crate::steering::vector::{now_rfc3339, SteeringVector, VectorKind, VectorMeta};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use utoipa::{IntoParams, ToSchema};

/// A stored vector's metadata.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VectorInfo {
    /// The vector's name.
    #[schema(example = "golden_gate")]
    pub name: String,
    /// Metadata.
    #[serde(flatten)]
    pub meta: VectorMeta,
    /// Layers holding a direction.
    #[schema(example = json!([12]))]
    pub layers: Vec<usize>,
    /// Norm of each layer's direction, by layer.
    #[schema(value_type = Object, example = json!({"12": 14.8}))]
    pub norms: BTreeMap<String, f32>,
    /// The ETag of this version (for `If-Match`).
    #[schema(example = "\"v1-3fa2c01d\"")]
    pub etag: String,
    /// `builtin` (read-only) or `stored`.
    pub origin: VectorOrigin,
}

impl VectorInfo {
    pub fn of(e: &StoreEntry) -> Self {
        let v = &e.vector;
        Self {
            name: v.name.clone(),
            meta: v.meta.clone(),
            layers: v.layers.keys().copied().collect(),
            norms: v
                .norms()
                .into_iter()
                .map(|(l, n)| (l.to_string(), n))
                .collect(),
            etag: e.etag.clone(),
            origin: e.origin,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VectorList {
    /// Every vector, by name.
    pub vectors: Vec<VectorInfo>,
}

/// List the stored vectors.
#[utoipa::path(get, path = "/vectors", tag = "vectors",
    responses((status = 200, description = "Every vector with its metadata", body = VectorList)))]
pub async fn list_vectors(State(state): State<AppState>) -> Json<VectorList> {
    Json(VectorList {
        vectors: state.store.list().iter().map(VectorInfo::of).collect(),
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FormatQuery {
    /// `json`, `safetensors` or `gguf` (a llama.cpp control vector). Without it, `GET` returns
    /// the metadata and `PUT` reads the body's format from its content.
    pub format: Option<String>,
}

fn parse_format(q: &FormatQuery) -> Result<Option<VectorFormat>, ApiError> {
    q.format
        .as_deref()
        .map(|f| {
            VectorFormat::parse(f).ok_or_else(|| {
                ApiError::invalid(
                    "format",
                    "invalid_format",
                    format!("`{f}` is not json, safetensors or gguf"),
                )
            })
        })
        .transpose()
}

async fn lookup(state: &AppState, name: &str) -> Result<StoreEntry, ApiError> {
    state
        .vector(name)
        .await?
        .ok_or_else(|| ApiError::not_found("vector_not_found", format!("no vector named `{name}`")))
}

fn with_etag(mut resp: Response, etag: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// A vector's metadata, or the vector itself in a file format.
#[utoipa::path(get, path = "/vectors/{name}", tag = "vectors",
    params(("name" = String, Path, description = "Vector name"), FormatQuery),
    responses(
        (status = 200, description = "Metadata (JSON); with `format`, the file (JSON, safetensors or GGUF)", body = VectorInfo),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 404, description = "No such vector", body = ErrorBody),
        (status = 422, description = "Unknown format, or a format that cannot hold this vector", body = ErrorBody)))]
pub async fn get_vector(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<FormatQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let format = parse_format(&q)?;
    let entry = lookup(&state, &name).await?;
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        if etags(inm).iter().any(|t| t == &entry.etag || t == "*") {
            return Ok(with_etag(
                StatusCode::NOT_MODIFIED.into_response(),
                &entry.etag,
            ));
        }
    }
    let Some(format) = format else {
        return Ok(with_etag(
            Json(VectorInfo::of(&entry)).into_response(),
            &entry.etag,
        ));
    };
    let arch = &state.engine.model.dims().architecture;
    let bytes = formats::encode(&entry.vector, format, arch)
        .map_err(|e| ApiError::invalid("format", "unsupported_format", format!("{e:#}")))?;
    let mut resp = bytes.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{name}.{}\"",
        format.extension()
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(with_etag(resp, &entry.etag))
}

/// Splits an `If-Match` / `If-None-Match` value into entity tags.
fn etags(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|t| t.trim().trim_start_matches("W/").to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn precondition(headers: &HeaderMap) -> Precondition {
    Precondition {
        if_match: headers
            .get(header::IF_MATCH)
            .and_then(|v| v.to_str().ok())
            .map(etags),
        if_none_match_any: headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() == "*"),
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidName(_) => ApiError::invalid("name", "invalid_name", e),
            StoreError::ReadOnly(_) => {
                ApiError::new(StatusCode::CONFLICT, "read_only", e.to_string())
            }
            StoreError::NotFound(_) => ApiError::not_found("vector_not_found", e.to_string()),
            StoreError::VersionMismatch { .. } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "version_mismatch",
                e.to_string(),
            ),
            StoreError::ModelMismatch(_) => ApiError::invalid("body", "model_mismatch", e),
            StoreError::Invalid(_) => ApiError::invalid("body", "invalid_vector", e),
            StoreError::Io(io) => storage_error(&io),
            StoreError::Unavailable(why) => store_unavailable(format!(
                "{why}; vectors cannot be written or deleted until it is back (generation \
                 with known vectors goes on)"
            )),
        }
    }
}

/// 503 `store_unavailable`: the shared vector database cannot be reached (logged).
pub fn store_unavailable(message: String) -> ApiError {
    tracing::warn!(error = %message, "vector database unavailable");
    ApiError {
        code: "store_unavailable",
        retry_after: Some(2),
        ..ApiError::unavailable(message)
    }
}

/// A failed write to a store (vectors, SAE uploads): 507 when the disk is full, else 503 with
/// `Retry-After` (a read-only or failing store); the detail goes to the log.
pub fn storage_error(e: &std::io::Error) -> ApiError {
    tracing::error!(error = %e, "writing to the store");
    if e.kind() == std::io::ErrorKind::StorageFull {
        return ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "storage_full",
            "the store's disk is full; free space or remove vectors or SAEs",
        );
    }
    ApiError {
        code: "store_unavailable",
        ..ApiError::unavailable(format!(
            "the store cannot be written ({}); retry later",
            e.kind()
        ))
    }
}

/// Create or replace a vector.
///
/// The body is JSON (`{"layers": {"12": [...]}, "description": ...}`), a safetensors file
/// (tensors `layer.N`), or a llama.cpp / repeng control-vector GGUF (`direction.N`, added to
/// the output of block N). `If-Match: <etag>` replaces only that version; `If-None-Match: *`
/// creates only.
#[utoipa::path(put, path = "/vectors/{name}", tag = "vectors",
    params(("name" = String, Path, description = "Vector name: 1-64 of a-z 0-9 _ . -"), FormatQuery),
    request_body(content = VectorJson, description = "JSON, or a safetensors / GGUF file body"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Replaced", body = VectorInfo),
        (status = 201, description = "Created", body = VectorInfo),
        (status = 403, description = "An admin key is needed", body = ErrorBody),
        (status = 409, description = "Built-in vectors are read-only", body = ErrorBody),
        (status = 412, description = "If-Match / If-None-Match failed", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Invalid name, unreadable file, or made for another model or width", body = ErrorBody)))]
pub async fn put_vector(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<FormatQuery>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    if !valid_name(&name) {
        return Err(StoreError::InvalidName(name).into());
    }
    let format = match parse_format(&q)? {
        Some(f) => f,
        None => match headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            Some(ct) if ct.starts_with("application/json") => VectorFormat::Json,
            _ => VectorFormat::sniff(&body),
        },
    };
    let method = if format == VectorFormat::Json {
        "manual"
    } else {
        "import"
    };
    let defaults = formats::defaults_for(&name, &state.engine.model.id, method);
    let v = formats::decode(&body, format, &defaults)
        .map_err(|e| ApiError::invalid("body", "invalid_vector", format!("{e:#}")))?;
    let (entry, created) = state.store.write(v, &precondition(&headers)).await?;
    tracing::info!(name = %name, version = entry.vector.meta.version, "vector stored");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut resp = (status, Json(VectorInfo::of(&entry))).into_response();
    if let Ok(loc) = HeaderValue::from_str(&format!("/vectors/{name}")) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(with_etag(resp, &entry.etag))
}

/// Delete a stored vector. Requests already running keep the version they started with.
#[utoipa::path(delete, path = "/vectors/{name}", tag = "vectors",
    params(("name" = String, Path, description = "Vector name")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "An admin key is needed", body = ErrorBody),
        (status = 404, description = "No such vector", body = ErrorBody),
        (status = 409, description = "Built-in vectors are read-only", body = ErrorBody),
        (status = 412, description = "If-Match failed", body = ErrorBody)))]
pub async fn delete_vector(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    state.store.remove(&name, &precondition(&headers)).await?;
    tracing::info!(name = %name, "vector deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// An extraction request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "name": "bridge",
    "method": "mean_diff",
    "positive": ["The Golden Gate Bridge glows orange in the fog.", "Cars cross the Golden Gate Bridge into Marin."],
    "negative": ["The library opens at nine.", "She planted tomatoes in spring."],
    "layers": [10, 12, 14],
    "position": "mean"
}))]
pub struct ExtractRequest {
    #[schema(example = "bridge")]
    /// Where to store the vector (a new version if it exists).
    pub name: String,
    #[schema(example = "mean_diff")]
    /// `mean_diff` (default), `pca`, `caa` (pairs: same prompt, two completions),
    /// `neuron_means` (mean `mlp_act` over `prompts`, for the neuron `mean` op) or
    /// `head_means` (mean `attn_head` over `prompts`, for the head `mean` op).
    #[serde(default)]
    pub method: Option<String>,
    /// Where directions are read: `resid_post` (default), `resid_pre`, `attn_out`, `mlp_out`,
    /// or `attn_head` (every head's mean difference side by side: a `head_direction` whose
    /// part for head `h` steers that head with `head: h`).
    #[serde(default)]
    pub site: Option<HookSite>,
    #[schema(example = json!(["The Golden Gate Bridge glows in the fog."]))]
    /// Examples showing the behaviour: texts, or `{"prompt", "completion"}`.
    #[serde(default)]
    pub positive: Vec<ExampleSpec>,
    #[schema(example = json!(["The library opens at nine."]))]
    /// Examples not showing it (paired with `positive` by index for `pca` and `caa`).
    #[serde(default)]
    pub negative: Vec<ExampleSpec>,
    #[schema(example = json!(["Any text to average over."]))]
    /// For `neuron_means` and `head_means`: the prompts to average over.
    #[serde(default)]
    pub prompts: Vec<ExampleSpec>,
    #[schema(example = json!([8, 12, 16]))]
    /// Blocks to read (default: all).
    #[serde(default)]
    pub layers: Option<Vec<i64>>,
    #[schema(example = "mean")]
    /// `last` (default), `mean` (all tokens but the first) or `response` (the completion's
    /// tokens; `neuron_means` defaults to `mean`).
    #[serde(default)]
    pub position: Option<String>,
    #[schema(example = false)]
    /// Render each prompt as a user turn in the chat template (completions become the
    /// assistant's prefilled reply).
    #[serde(default)]
    pub chat: Option<bool>,
    /// Stored with the vector.
    #[schema(example = "Golden Gate Bridge sentences minus neutral ones")]
    #[serde(default)]
    pub description: Option<String>,
    #[schema(example = false)]
    /// Send `progress` events, then `result` (SSE).
    #[serde(default)]
    pub stream: Option<bool>,
}

/// Example counts of an extraction.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExampleCounts {
    /// Positive examples (or prompts for neuron_means).
    #[schema(example = 20)]
    pub positive: usize,
    /// Negative examples.
    #[schema(example = 20)]
    pub negative: usize,
    #[schema(example = 8)]
    /// Held out to measure separation.
    pub heldout: usize,
}

/// The result of an extraction.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExtractResponse {
    /// The stored vector's metadata.
    pub vector: VectorInfo,
    /// The method used.
    pub method: Method,
    /// The positions read.
    pub position: Position,
    /// Per layer: vector norm, mean residual norm, held-out accuracy, separation.
    pub layers: Vec<LayerReport>,
    #[schema(example = 12)]
    /// The layer whose direction best separates held-out examples.
    pub recommended_layer: Option<usize>,
    /// How many examples were used and held out.
    pub examples: ExampleCounts,
    /// Time taken.
    #[schema(example = 1.5)]
    pub seconds: f64,
}

/// Data of an SSE `progress` event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExtractProgress {
    /// Examples run so far.
    #[schema(example = 24)]
    pub done: usize,
    /// Examples in all.
    #[schema(example = 40)]
    pub total: usize,
}

/// A validated extraction.
pub struct ExtractPlan {
    pub name: String,
    pub method: Method,
    pub position: Position,
    pub site: HookSite,
    pub layers: Vec<usize>,
    pub positive: Vec<Example>,
    pub negative: Vec<Example>,
    pub description: String,
}

fn bad(field: &str, code: &'static str, msg: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(field, code, msg)
}

impl ExtractPlan {
    pub fn validate(model: &Model, config: &Config, req: ExtractRequest) -> Result<Self, ApiError> {
        if !valid_name(&req.name) {
            return Err(StoreError::InvalidName(req.name).into());
        }
        let method = match req.method.as_deref() {
            None => Method::MeanDiff,
            Some(m) => Method::parse(m).ok_or_else(|| {
                bad(
                    "method",
                    "invalid_method",
                    format!("`{m}`: use mean_diff, pca, caa, neuron_means or head_means"),
                )
            })?,
        };
        let position = match req.position.as_deref() {
            None if method.is_means() => Position::Mean,
            None => Position::Last,
            Some(p) => Position::parse(p).ok_or_else(|| {
                bad(
                    "position",
                    "invalid_position",
                    format!("`{p}`: use last, mean or response"),
                )
            })?,
        };
        let cfg = model.dims();
        let layers = match &req.layers {
            None => (0..cfg.n_layers).collect(),
            Some(ls) if ls.is_empty() => {
                return Err(bad(
                    "layers",
                    "invalid_layer",
                    "must list at least one layer",
                ))
            }
            Some(ls) => {
                let mut out = Vec::new();
                for (i, &l) in ls.iter().enumerate() {
                    if l < 0 || l as usize >= cfg.n_layers {
                        return Err(bad(
                            &format!("layers[{i}]"),
                            "invalid_layer",
                            format!(
                                "layer {l} is out of range: the model has {} layers (0-{})",
                                cfg.n_layers,
                                cfg.n_layers - 1
                            ),
                        ));
                    }
                    if !out.contains(&(l as usize)) {
                        out.push(l as usize);
                    }
                }
                out.sort_unstable();
                out
            }
        };
        let chat = req.chat.unwrap_or(false);
        let max = config.vectors.max_extract_examples;
        let total = req.positive.len() + req.negative.len() + req.prompts.len();
        if total > max {
            return Err(bad(
                "positive",
                "too_many_examples",
                format!("{total} examples; at most {max} per extraction"),
            ));
        }
        let encode = |field: &str, items: &[ExampleSpec]| -> Result<Vec<Example>, ApiError> {
            items
                .iter()
                .enumerate()
                .map(|(i, ex)| {
                    let e = extract::encode_example(model, ex, chat, position)
                        .map_err(|m| bad(&format!("{field}[{i}]"), "invalid_example", m))?;
                    if e.tokens.len() > config.limits.max_prompt_tokens.min(cfg.context_length) {
                        return Err(bad(
                            &format!("{field}[{i}]"),
                            "prompt_too_long",
                            format!("{} tokens is too long", e.tokens.len()),
                        ));
                    }
                    Ok(e)
                })
                .collect()
        };
        let site = match (method, req.site) {
            (Method::NeuronMeans, None | Some(HookSite::MlpAct)) => HookSite::MlpAct,
            (Method::HeadMeans, None | Some(HookSite::AttnHead)) => HookSite::AttnHead,
            (m, Some(site)) if m.is_means() => {
                return Err(bad(
                    "site",
                    "invalid_site",
                    format!("`{}` reads its own site, not `{site}`", m.as_str()),
                ))
            }
            (_, None) => HookSite::ResidPost,
            (_, Some(HookSite::MlpAct)) => {
                return Err(bad(
                    "site",
                    "invalid_site",
                    "directions are read at a residual site or `attn_head`; for neurons use \
                     `neuron_means`",
                ))
            }
            (_, Some(site)) => site,
        };
        let (positive, negative) = if method.is_means() {
            let m = method.as_str();
            if req.prompts.is_empty() {
                return Err(bad(
                    "prompts",
                    "missing_examples",
                    format!("`{m}` needs `prompts`"),
                ));
            }
            if !req.positive.is_empty() || !req.negative.is_empty() {
                return Err(bad(
                    "positive",
                    "invalid_examples",
                    format!("`{m}` takes `prompts`, not positive/negative"),
                ));
            }
            (encode("prompts", &req.prompts)?, Vec::new())
        } else {
            if !req.prompts.is_empty() {
                return Err(bad(
                    "prompts",
                    "invalid_examples",
                    "`prompts` is for `neuron_means` and `head_means`; use positive and negative",
                ));
            }
            if req.positive.is_empty() {
                return Err(bad(
                    "positive",
                    "missing_examples",
                    "needs at least one example",
                ));
            }
            if req.negative.is_empty() {
                return Err(bad(
                    "negative",
                    "missing_examples",
                    "needs at least one example",
                ));
            }
            if method.is_paired() && req.positive.len() != req.negative.len() {
                return Err(bad(
                    "negative",
                    "unpaired_examples",
                    format!(
                        "`{}` pairs examples by index: {} positive but {} negative",
                        method.as_str(),
                        req.positive.len(),
                        req.negative.len()
                    ),
                ));
            }
            (
                encode("positive", &req.positive)?,
                encode("negative", &req.negative)?,
            )
        };
        Ok(Self {
            name: req.name,
            method,
            position,
            site,
            layers,
            positive,
            negative,
            description: req.description.unwrap_or_default(),
        })
    }
}

/// An extraction's outcome, before it is stored.
pub struct ExtractionDone {
    pub vector: SteeringVector,
    pub reports: Vec<LayerReport>,
    pub recommended_layer: Option<usize>,
    pub heldout: usize,
}

impl ExtractPlan {
    /// Computes the vector from the collected activations (positives first, `n_pos` of them).
    pub fn finish(&self, model_id: &str, acts: Vec<Activations>, n_pos: usize) -> ExtractionDone {
        let (pos, neg) = acts.split_at(n_pos.min(acts.len()));
        let (vectors, reports, recommended_layer, heldout, kind) = if self.method.is_means() {
            let kind = match self.method {
                Method::HeadMeans => VectorKind::HeadMeans,
                _ => VectorKind::NeuronMeans,
            };
            (extract::means(pos, &self.layers), Vec::new(), None, 0, kind)
        } else {
            let e = extract::compute(self.method, pos, neg, &self.layers);
            (
                e.vectors,
                e.reports,
                e.recommended_layer,
                e.heldout,
                match self.site {
                    HookSite::AttnHead => VectorKind::HeadDirection,
                    _ => VectorKind::Direction,
                },
            )
        };
        let width = vectors.values().next().map_or(0, Vec::len);
        ExtractionDone {
            vector: SteeringVector {
                name: self.name.clone(),
                meta: VectorMeta {
                    model: model_id.to_string(),
                    d_model: width,
                    kind,
                    method: self.method.as_str().to_string(),
                    description: self.description.clone(),
                    created: now_rfc3339(),
                    version: 1,
                },
                layers: vectors
                    .into_iter()
                    .map(|(l, v)| (l, Arc::from(v)))
                    .collect(),
            },
            reports,
            recommended_layer,
            heldout,
        }
    }

    /// All examples, positives first.
    pub fn examples(&self) -> Vec<Example> {
        self.positive
            .iter()
            .chain(&self.negative)
            .cloned()
            .collect()
    }
}

/// Splits examples into forward passes of about `budget` tokens.
pub fn batches(examples: Vec<Example>, budget: usize) -> Vec<Vec<Example>> {
    let mut out: Vec<Vec<Example>> = Vec::new();
    let mut tokens = 0;
    for ex in examples {
        if out.is_empty()
            || (tokens + ex.tokens.len() > budget && !out.last().is_some_and(Vec::is_empty))
        {
            out.push(Vec::new());
            tokens = 0;
        }
        tokens += ex.tokens.len();
        if let Some(last) = out.last_mut() {
            last.push(ex);
        }
    }
    out
}

/// One batch's activations, in order: runs of short examples packed into one engine job, and
/// each example longer than a prefill chunk alone, in chunks like a prefill.
async fn collect_batch(
    state: &AppState,
    batch: Vec<Example>,
    layers: Arc<Vec<usize>>,
    site: HookSite,
) -> Result<Vec<Activations>, ApiError> {
    let chunk = state.config.engine.prefill_chunk;
    let failed = |e: anyhow::Error| ApiError::internal("extraction", format!("{e:#}"));
    let mut out = Vec::with_capacity(batch.len());
    let mut rest = batch.as_slice();
    while !rest.is_empty() {
        let short = rest.iter().take_while(|e| e.tokens.len() <= chunk).count();
        if short > 0 {
            let (run, layers) = (rest[..short].to_vec(), layers.clone());
            let job = move |m: &crate::model::Model| extract::collect(m, &run, layers, site);
            out.extend(state.engine.run_job(job).await?.map_err(failed)?);
            rest = &rest[short..];
            continue;
        }
        let one = &rest[..1];
        let rec = extract::Recorder::new(one, layers.clone(), site);
        let done = super::inspect::run_chunked(state, &one[0].tokens, None, rec, "extraction");
        out.extend(done.await?.hooks.finish(one));
        rest = &rest[1..];
    }
    Ok(out)
}

/// Runs an extraction: collects activations pass by pass on the engine thread (other requests
/// are served in between), computes the vectors and stores them. Dropping the future (the
/// client went away) stops it after the pass in flight.
pub async fn run_extraction(
    state: &AppState,
    plan: ExtractPlan,
    progress: Progress<ExtractProgress>,
) -> Result<ExtractResponse, ApiError> {
    let started = Instant::now();
    let (n_pos, n_neg) = (plan.positive.len(), plan.negative.len());
    let total = n_pos + n_neg;
    let all = plan.examples();
    let layers = Arc::new(plan.layers.clone());
    let mut acts: Vec<Activations> = Vec::with_capacity(total);
    let mut logged = 0;
    for batch in batches(all, state.config.vectors.extract_batch_tokens.max(1)) {
        progress::gone(&progress)?;
        let got = collect_batch(state, batch, layers.clone(), plan.site).await?;
        acts.extend(got);
        let done = acts.len();
        progress::report(&progress, ExtractProgress { done, total }).await?;
        if acts.len() * 10 / total.max(1) > logged {
            logged = acts.len() * 10 / total.max(1);
            tracing::info!(name = %plan.name, done = acts.len(), total, "extraction progress");
        }
    }
    let done = plan.finish(&state.engine.model.id, acts, n_pos);
    let v = done.vector;
    let (reports, recommended, heldout) = (done.reports, done.recommended_layer, done.heldout);
    let (entry, _) = state.store.write(v, &Precondition::default()).await?;
    tracing::info!(name = %plan.name, method = plan.method.as_str(), examples = total, recommended_layer = ?recommended, "vector extracted");
    Ok(ExtractResponse {
        vector: VectorInfo::of(&entry),
        method: plan.method,
        position: plan.position,
        layers: reports,
        recommended_layer: recommended,
        examples: ExampleCounts {
            positive: n_pos,
            negative: n_neg,
            heldout,
        },
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Extract a vector from contrasting examples and store it.
#[utoipa::path(post, path = "/vectors/extract", tag = "vectors",
    request_body = ExtractRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The stored vector and the per-layer report; with `stream: true`, SSE `progress` events (ExtractProgress) then `result` (ExtractResponse)", body = ExtractResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 403, description = "An admin key is needed", body = ErrorBody),
        (status = 409, description = "The name is a built-in vector (`read_only`)", body = ErrorBody),
        (status = 422, description = "Invalid examples, method, position or layers", body = ErrorBody),
        (status = 503, description = "The store cannot be written (`store_unavailable`)", body = ErrorBody),
        (status = 507, description = "The disk is full (`storage_full`)", body = ErrorBody)))]
pub async fn extract_vector(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ExtractRequest>,
) -> Result<Response, ApiError> {
    let stream = req.stream.unwrap_or(false);
    let plan = ExtractPlan::validate(&state.engine.model, &state.config, req)?;
    // The result is stored at the end: refuse now rather than after the whole run.
    if state.store.health().status != "ok" {
        return Err(store_unavailable(
            "the vector database cannot be reached, so an extracted vector could not be stored"
                .into(),
        ));
    }
    if !stream {
        return Ok(Json(run_extraction(&state, plan, None).await?).into_response());
    }
    Ok(progress::stream(&state.clone(), move |p| async move {
        run_extraction(&state, plan, p).await
    }))
}

pub use formats::VectorJson;
