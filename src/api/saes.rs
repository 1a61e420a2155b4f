//! Sparse autoencoders over HTTP: list and load them (`GET/PUT/DELETE /saes`), read the active
//! features of every token of a prompt (`POST /inspect/features`), and find the contexts where
//! one feature fires most (`POST /saes/{name}/features/{index}/top`). Steering by feature goes
//! through the ordinary steering spec (`{"feature": {"sae": ..., "index": ...}}`).

use super::generate::encode_input;
use super::inspect::{
    check_prompt_len, encode_prompts, rank_contexts, top_k_param, TopContext, TopContextsResponse,
};
use super::json::{ApiJson, RawBody};
use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::model::chat::ChatMessage;
use crate::model::hooks::SiteRecorder;
use crate::steering::extract::ExampleSpec;
use crate::steering::sae::{owned_folder, Sae, SaeArchitecture, SaeConfig, SaeParts};
use crate::steering::spec::{AppliedIntervention, InterventionSpec};
use crate::steering::store::valid_name;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

/// A loaded SAE.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SaeInfo {
    /// Its name (use it in `{"feature": {"sae": ...}}`).
    #[schema(example = "res12_4k")]
    pub name: String,
    /// Width of the activation it reads.
    #[schema(example = 576)]
    pub d_in: usize,
    /// Number of features.
    #[schema(example = 4096)]
    pub d_sae: usize,
    /// `standard`, `jumprelu` or `topk`.
    #[schema(example = "topk")]
    pub architecture: String,
    /// Active features per token (topk only).
    #[schema(example = 32)]
    pub k: Option<usize>,
    /// The TransformerLens hook it reads.
    #[schema(example = "blocks.12.hook_resid_post")]
    pub hook_name: String,
    /// The hook site it reads.
    pub site: crate::model::hooks::HookSite,
    /// The block (`layer` in a steering spec).
    #[schema(example = 12)]
    pub layer: usize,
    /// Whether `b_dec` is subtracted from the input before encoding.
    #[schema(example = true)]
    pub apply_b_dec_to_input: bool,
    /// Compiled into tiller (made for the default model); a folder of the same name in
    /// `saes.dir` replaces it.
    #[schema(example = true)]
    pub builtin: bool,
}

impl SaeInfo {
    pub fn of(s: &Sae) -> Self {
        let (architecture, k) = match s.architecture {
            SaeArchitecture::Standard => ("standard", None),
            SaeArchitecture::Jumprelu => ("jumprelu", None),
            SaeArchitecture::Topk { k } => ("topk", Some(k)),
        };
        Self {
            name: s.name.clone(),
            d_in: s.d_in,
            d_sae: s.d_sae,
            architecture: architecture.into(),
            k,
            hook_name: s.hook_name.clone(),
            site: s.site,
            layer: s.layer,
            apply_b_dec_to_input: s.apply_b_dec_to_input,
            builtin: s.builtin,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SaeList {
    /// Every loaded SAE.
    pub saes: Vec<SaeInfo>,
}

/// List the loaded sparse autoencoders.
#[utoipa::path(get, path = "/saes", tag = "saes",
    responses((status = 200, description = "The loaded SAEs", body = SaeList)))]
pub async fn list_saes(State(state): State<AppState>) -> Json<SaeList> {
    Json(SaeList {
        saes: state.saes.list().iter().map(|s| SaeInfo::of(s)).collect(),
    })
}

fn lookup(state: &AppState, name: &str) -> Result<Arc<Sae>, ApiError> {
    state.saes.get(name).ok_or_else(|| {
        ApiError::not_found(
            "sae_not_found",
            format!("no sparse autoencoder named `{name}`"),
        )
    })
}

/// One SAE.
#[utoipa::path(get, path = "/saes/{name}", tag = "saes",
    params(("name" = String, Path, description = "SAE name")),
    responses(
        (status = 200, description = "The SAE", body = SaeInfo),
        (status = 404, description = "No such SAE", body = ErrorBody)))]
pub async fn get_sae(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<SaeInfo>, ApiError> {
    let sae = lookup(&state, &name)?;
    Ok(Json(SaeInfo::of(&sae)))
}

/// How to read a `PUT /saes/{name}` file body.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SaeQuery {
    /// The hook the SAE reads, e.g. `blocks.12.hook_resid_post` (needed for a file body).
    pub hook: Option<String>,
    /// `standard` (default), `jumprelu` (default for a body with `threshold`) or `topk`.
    pub architecture: Option<String>,
    /// Active features per token, for `topk`.
    pub k: Option<usize>,
    /// Subtract `b_dec` before encoding (default true for safetensors, as SAELens; false for
    /// npz, as Gemma Scope).
    pub apply_b_dec_to_input: Option<bool>,
}

/// Load an SAE from the server's SAE folder.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SaePathBody {
    /// A folder inside `saes.dir` holding SAELens files or Gemma Scope's `params.npz` (with a
    /// `cfg.json` naming `hook_name`).
    #[schema(example = "gemma-scope/layer_12/width_16k")]
    pub path: String,
}

/// Load a sparse autoencoder.
///
/// The body is either JSON `{"path": "<folder in saes.dir>"}`, or a file: SAELens'
/// `sae_weights.safetensors` or Gemma Scope's `params.npz` (`W_enc`, `W_dec`, `b_enc`, `b_dec`,
/// `threshold`), with the hook and architecture in the query. The file is kept in
/// `saes.dir/{name}` and loaded again at start.
#[utoipa::path(put, path = "/saes/{name}", tag = "saes",
    params(("name" = String, Path, description = "SAE name: 1-64 of a-z 0-9 _ . -"), SaeQuery),
    request_body(content = SaePathBody, description = "JSON naming a folder, or a safetensors / npz file"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Loaded", body = SaeInfo),
        (status = 400, description = "Malformed JSON or an invalid query parameter", body = ErrorBody),
        (status = 403, description = "An admin key is needed", body = ErrorBody),
        (status = 409, description = "The folder holds files tiller did not write (`folder_not_owned`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Unreadable, or its width does not match the model at its hook", body = ErrorBody),
        (status = 503, description = "The SAE folder cannot be written (`store_unavailable`)", body = ErrorBody),
        (status = 507, description = "The disk is full (`storage_full`)", body = ErrorBody)))]
pub async fn put_sae(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<SaeQuery>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    if !valid_name(&name) {
        return Err(ApiError::invalid(
            "name",
            "invalid_name",
            "use 1-64 characters from a-z, 0-9, `_`, `.` and `-`",
        ));
    }
    let bad = |e: anyhow::Error| ApiError::invalid("body", "invalid_sae", format!("{e:#}"));
    let root = state.config.saes.dir.clone();
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"))
        // Without the header, a body is JSON when it parses as JSON: a safetensors file can
        // start with `{` too (the low byte of its header length), but is not JSON.
        || body.first() == Some(&b'{') && serde_json::from_slice::<serde_json::Value>(&body).is_ok();
    let from_file = !is_json;
    let sae = if !from_file {
        let p: SaePathBody = super::json::parse_json(&body)?;
        let rel = std::path::Path::new(&p.path);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(ApiError::invalid(
                "path",
                "invalid_path",
                "must be a relative folder inside saes.dir",
            ));
        }
        let dir = root.join(rel);
        // A link inside saes.dir must not lead out of it.
        let inside = match (dir.canonicalize(), root.canonicalize()) {
            (Ok(d), Ok(r)) => d.starts_with(r),
            _ => true, // missing: load_dir reports it
        };
        if !inside {
            return Err(ApiError::invalid(
                "path",
                "invalid_path",
                "leads out of saes.dir (through a link)",
            ));
        }
        tokio::task::spawn_blocking(move || Sae::load_dir(&name, &dir))
            .await
            .map_err(|e| ApiError::internal("loading the SAE", e))?
            .map_err(bad)?
    } else {
        let hook = q.hook.clone().ok_or_else(|| {
            ApiError::invalid(
                "hook",
                "missing_hook",
                "a file body needs `?hook=blocks.N.hook_resid_post`",
            )
        })?;
        let cfg = SaeConfig {
            architecture: q.architecture.clone(),
            k: q.k,
            ..Default::default()
        };
        let bytes = body.to_vec();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Sae> {
            let parts = if bytes.starts_with(b"PK") {
                let tmp = tempfile_in(&root)?;
                std::fs::write(&tmp, &bytes)?;
                let parts = SaeParts::from_npz(&tmp);
                let _ = std::fs::remove_file(&tmp);
                parts?
            } else {
                SaeParts::from_safetensors(&bytes)?
            };
            let mut arch = cfg.architecture()?;
            if q.architecture.is_none() && parts.threshold.is_some() {
                arch = SaeArchitecture::Jumprelu;
            }
            // SAELens' default; Gemma Scope (npz) encodes `x · W_enc + b_enc`.
            let default_b_dec = !bytes.starts_with(b"PK");
            Sae::new(
                &name,
                parts,
                arch,
                q.apply_b_dec_to_input.unwrap_or(default_b_dec),
                &hook,
            )
        })
        .await
        .map_err(|e| ApiError::internal("loading the SAE", e))?
        .map_err(bad)?
    };
    let c = state.engine.model.dims();
    if sae.layer >= c.n_layers {
        return Err(ApiError::invalid(
            "hook",
            "invalid_layer",
            format!("the model has no layer {}", sae.layer),
        ));
    }
    let width = c.site_width(sae.site);
    if sae.d_in != width {
        return Err(ApiError::invalid(
            "body",
            "dimension_mismatch",
            format!(
                "the SAE reads {} dimensions but the model's `{}` has {width}",
                sae.d_in, sae.site
            ),
        ));
    }
    // Kept only once it is known to fit the model, so a bad upload never reloads at start.
    let sae = if from_file {
        let dir = state.config.saes.dir.join(&sae.name);
        check_upload_folder(&dir)?;
        let mut sae = sae;
        tokio::task::spawn_blocking(move || {
            sae.save_dir(&dir, candle_core::DType::F32)?;
            sae.files = Some(dir);
            Ok::<_, anyhow::Error>(sae)
        })
        .await
        .map_err(|e| ApiError::internal("saving the SAE", e))?
        .map_err(|e| match e.downcast_ref::<std::io::Error>() {
            Some(io) => super::vectors::storage_error(io),
            None => ApiError::internal("saving the SAE", format!("{e:#}")),
        })?
    } else {
        sae
    };
    let info = SaeInfo::of(&sae);
    state.saes.insert(sae);
    tracing::info!(sae = %info.name, hook = %info.hook_name, d_sae = info.d_sae, "SAE loaded");
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// An upload writes `dir` only when it is new, or a folder tiller wrote before: never through
/// a link, never over files a user put there (409).
fn check_upload_folder(dir: &std::path::Path) -> Result<(), ApiError> {
    let Ok(meta) = dir.symlink_metadata() else {
        return Ok(());
    };
    let conflict = |why: &str| {
        ApiError::new(
            StatusCode::CONFLICT,
            "folder_not_owned",
            format!("{}: {why}; pick another name", dir.display()),
        )
    };
    if !meta.is_dir() {
        return Err(conflict(
            "exists and is not a folder tiller wrote (a link or a file)",
        ));
    }
    let empty = std::fs::read_dir(dir).is_ok_and(|mut r| r.next().is_none());
    if !empty && !owned_folder(dir) {
        return Err(conflict("holds files tiller did not write"));
    }
    Ok(())
}

fn tempfile_in(dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    Ok(dir.join(format!(
        ".upload-{}-{}.npz",
        std::process::id(),
        rand::random::<u32>()
    )))
}

/// Unload an SAE, and delete its folder when it was uploaded or loaded at start (an SAE
/// loaded from a folder by path leaves that folder alone).
#[utoipa::path(delete, path = "/saes/{name}", tag = "saes",
    params(("name" = String, Path, description = "SAE name")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Unloaded"),
        (status = 403, description = "An admin key is needed", body = ErrorBody),
        (status = 404, description = "No such SAE", body = ErrorBody)))]
pub async fn delete_sae(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let sae = lookup(&state, &name)?;
    state.saes.remove(&name);
    if let Some(dir) = sae.files.as_ref().filter(|d| owned_folder(d)) {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(sae = %name, dir = %dir.display(), error = %e, "could not delete the SAE's folder");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Active features of a prompt.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeaturesRequest {
    /// Raw text. Give this or `messages`.
    #[serde(default)]
    #[schema(example = "The Golden Gate Bridge is in San Francisco.")]
    pub prompt: Option<String>,
    /// A conversation rendered with the chat template.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// The SAE to encode with.
    #[schema(example = "res12_4k")]
    pub sae: String,
    /// Features per token to list (default 10, at most 100).
    #[serde(default)]
    #[schema(example = 5)]
    pub top_k: Option<u64>,
    /// Interventions applied during the pass (features are read after them).
    #[serde(default)]
    pub steering: Option<Vec<InterventionSpec>>,
}

/// One active feature.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FeatureActivation {
    /// Feature index.
    #[schema(example = 3124)]
    pub index: usize,
    /// Its activation.
    #[schema(example = 8.4)]
    pub activation: f32,
}

/// The features of one token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenFeatures {
    /// Token position.
    #[schema(example = 3)]
    pub position: usize,
    /// Token id.
    #[schema(example = 13480)]
    pub id: u32,
    /// The token as text.
    #[schema(example = " Bridge")]
    pub text: String,
    /// Active features (nonzero) at this token.
    #[schema(example = 32)]
    pub l0: usize,
    /// `|h - x̂| / |h|` at this token.
    #[schema(example = 0.21)]
    pub relative_error: f32,
    /// The most active features, largest first.
    pub top: Vec<FeatureActivation>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FeaturesResponse {
    /// The SAE used.
    #[schema(example = "res12_4k")]
    pub sae: String,
    /// Mean active features per token (first token excluded).
    #[schema(example = 32.0)]
    pub l0: f64,
    /// Fraction of variance unexplained over the prompt's tokens (first excluded); null when
    /// the prompt has too few tokens to have a variance.
    #[schema(example = 0.18)]
    pub fvu: Option<f64>,
    /// One entry per token.
    pub tokens: Vec<TokenFeatures>,
    /// The validated steering applied during the pass.
    pub steering: Vec<AppliedIntervention>,
}

/// The SAE's active features at every token of a prompt, with reconstruction error and L0.
#[utoipa::path(post, path = "/inspect/features", tag = "saes",
    request_body = FeaturesRequest,
    params(("X-Steering" = Option<String>, Header, description = "Steering as a JSON list or the compact form (docs/steering.md); the body's `steering` wins")),
    responses(
        (status = 200, description = "Per-token features", body = FeaturesResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 422, description = "Unknown SAE, invalid top_k or steering", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody)))]
pub async fn inspect_features(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<FeaturesRequest>,
) -> Result<Json<FeaturesResponse>, ApiError> {
    let sae = state.saes.get(&req.sae).ok_or_else(|| {
        ApiError::invalid(
            "sae",
            "unknown_sae",
            format!("no sparse autoencoder named `{}`", req.sae),
        )
    })?;
    let tokens = encode_input(&state, req.prompt.as_deref(), req.messages.as_deref())?;
    check_prompt_len(&state, "prompt", tokens.len())?;
    let top_k = top_k_param(req.top_k)?;
    let plan = state
        .steering_plan(req.steering.as_deref(), &headers)
        .await?;
    let applied = plan.as_ref().map(|p| p.applied()).unwrap_or_default();
    let grab = SiteRecorder::new(sae.site, sae.layer);
    let rows = super::inspect::run_chunked(&state, &tokens, plan, grab, "inspection")
        .await?
        .hooks
        .rows;
    let n = rows.len();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let s3 = sae.clone();
    // An [n, d_sae] matmul: too long for an async worker.
    let (f, recon) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
            let f = s3.encode(&flat, n)?;
            let recon = s3.decode(&f, n)?;
            Ok((f, recon))
        })
        .await
        .map_err(|e| ApiError::internal("encoding", e))?
        .map_err(|e| ApiError::internal("encoding", format!("{e:#}")))?;
    let d = sae.d_in;
    let tok = &state.engine.model.tokenizer;
    let mut out = Vec::with_capacity(n);
    let (mut l0_sum, mut err_sum, mut var_sum) = (0.0, 0.0, 0.0);
    // The first token's activations are an outlier (attention sink); it is left out of L0 and FVU.
    let first = usize::from(n > 1);
    let counted = n - first;
    let mean: Vec<f64> = (0..d)
        .map(|j| rows[first..].iter().map(|r| r[j] as f64).sum::<f64>() / counted.max(1) as f64)
        .collect();
    for p in 0..n {
        let fr = &f[p * sae.d_sae..(p + 1) * sae.d_sae];
        let l0 = fr.iter().filter(|v| **v != 0.0).count();
        let err: f64 = (0..d)
            .map(|j| (rows[p][j] as f64 - recon[p * d + j] as f64).powi(2))
            .sum();
        let norm: f64 = rows[p].iter().map(|v| (*v as f64).powi(2)).sum();
        if p >= first {
            l0_sum += l0 as f64;
            err_sum += err;
            var_sum += (0..d)
                .map(|j| (rows[p][j] as f64 - mean[j]).powi(2))
                .sum::<f64>();
        }
        out.push(TokenFeatures {
            position: p,
            id: tokens[p],
            text: tok.token_text(tokens[p]),
            l0,
            relative_error: if norm > 0.0 {
                (err / norm).sqrt() as f32
            } else {
                0.0
            },
            top: crate::engine::sampling::top_n(fr, top_k)
                .into_iter()
                .filter(|(_, v)| *v > 0.0)
                .map(|(index, activation)| FeatureActivation {
                    index: index as usize,
                    activation,
                })
                .collect(),
        });
    }
    Ok(Json(FeaturesResponse {
        sae: sae.name.clone(),
        l0: l0_sum / counted.max(1) as f64,
        fvu: (var_sum > 0.0).then(|| err_sum / var_sum),
        tokens: out,
        steering: applied,
    }))
}

/// Where a feature fires most.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeatureTopRequest {
    /// Texts to search (default: the server's corpus, `saes.corpus_dir/*.txt`).
    #[serde(default)]
    #[schema(example = json!(["The Golden Gate Bridge is in San Francisco."]))]
    pub prompts: Vec<ExampleSpec>,
    /// Render prompts as user turns in the chat template.
    #[serde(default)]
    #[schema(example = false)]
    pub chat: Option<bool>,
    /// How many contexts (default 10, at most 100).
    #[serde(default)]
    #[schema(example = 10)]
    pub top_n: Option<u64>,
    /// Tokens of context on each side (default 8).
    #[serde(default)]
    #[schema(example = 8)]
    pub context: Option<u64>,
}

/// The corpus searched when a request gives no prompts: one text per line of
/// `saes.corpus_dir/*.txt`.
/// When the folder does not exist, the corpus shipped with tiller (compiled from
/// `data/corpus/`), so the top-contexts view works from any working directory.
pub fn default_corpus(dir: &std::path::Path) -> Vec<ExampleSpec> {
    let lines = |text: &str| -> Vec<ExampleSpec> {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| ExampleSpec::Text(l.to_string()))
            .collect()
    };
    let Ok(read) = std::fs::read_dir(dir) else {
        return EMBEDDED_CORPUS.iter().flat_map(|t| lines(t)).collect();
    };
    let mut files: Vec<_> = read
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| lines(&t))
        .collect()
}

/// `data/corpus/*.txt`, in file-name order.
const EMBEDDED_CORPUS: [&str; 2] = [
    include_str!("../../data/corpus/prompts.txt"),
    include_str!("../../data/corpus/texts.txt"),
];

/// The contexts where one feature is most active.
#[utoipa::path(post, path = "/saes/{name}/features/{index}/top", tag = "saes",
    params(("name" = String, Path, description = "SAE name"), ("index" = usize, Path, description = "Feature index")),
    request_body = FeatureTopRequest,
    responses(
        (status = 200, description = "The top contexts, largest activation first", body = TopContextsResponse),
        (status = 400, description = "Malformed JSON or an invalid path parameter", body = ErrorBody),
        (status = 404, description = "No such SAE", body = ErrorBody),
        (status = 422, description = "Feature out of range, invalid prompts, or none given and an empty corpus", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody)))]
pub async fn feature_top(
    State(state): State<AppState>,
    Path((name, index)): Path<(String, usize)>,
    ApiJson(req): ApiJson<FeatureTopRequest>,
) -> Result<Json<TopContextsResponse>, ApiError> {
    let sae = lookup(&state, &name)?;
    if index >= sae.d_sae {
        return Err(ApiError::invalid(
            "index",
            "invalid_feature",
            format!("feature {index} is out of range (0-{})", sae.d_sae - 1),
        ));
    }
    let top_n = match req.top_n {
        None => 10,
        Some(n) if n == 0 || n > 100 => {
            return Err(ApiError::invalid(
                "top_n",
                "invalid_top_n",
                "must be 1 to 100",
            ))
        }
        Some(n) => n as usize,
    };
    let prompts = if req.prompts.is_empty() {
        let corpus = default_corpus(&state.config.saes.corpus_dir);
        if corpus.is_empty() {
            return Err(ApiError::invalid(
                "prompts",
                "no_prompts",
                format!(
                    "no prompts given, and the server's corpus ({}/*.txt) holds none",
                    state.config.saes.corpus_dir.display()
                ),
            ));
        }
        corpus
    } else {
        req.prompts.clone()
    };
    let sequences = encode_prompts(&state, &prompts, req.chat.unwrap_or(false))?;
    let signal = crate::steering::inspect::Signal::Feature {
        sae: sae.clone(),
        index,
    };
    let contexts: Vec<TopContext> = rank_contexts(
        &state,
        sequences,
        signal,
        top_n,
        req.context.unwrap_or(8).min(64) as usize,
    )
    .await?;
    Ok(Json(TopContextsResponse {
        signal: format!("{}#{index} @ {} {}", sae.name, sae.site, sae.layer),
        contexts,
    }))
}
