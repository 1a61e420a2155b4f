//! `POST /inspect/logit_lens`: per layer and position, the top tokens of the residual stream
//! read through the final norm and unembedding (`crate::steering::lens`), with the rank and
//! probability of named targets; steered or not, so a user sees at which depth a vector
//! changes the prediction. The pass runs in prefill-sized engine jobs, the unembedding in
//! jobs of a bounded number of rows.

use super::generate::encode_input;
use super::inspect::{check_prompt_len, layer_list, run_chunked};
use super::json::ApiJson;
use super::AppState;
use crate::engine::TopLogprob;
use crate::error::{ApiError, ErrorBody};
use crate::model::chat::ChatMessage;
use crate::steering::lens::{self, LensHooks};
use crate::steering::spec::{AppliedIntervention, InterventionSpec};
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Residual rows unembedded in one engine job.
const ROWS_PER_JOB: usize = 64;

/// A logit-lens reading of a prompt.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "The capital of France is", "layers": [4, 8, 12, 29], "positions": [-1], "top_k": 3, "targets": [" Paris"]}))]
pub struct LogitLensRequest {
    /// Raw text to read. Give this or `messages`.
    #[schema(example = "The capital of France is")]
    #[serde(default)]
    pub prompt: Option<String>,
    /// A conversation rendered with the model's chat template.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// Blocks whose output (`resid_post`) to read (default: all).
    #[schema(example = json!([4, 8, 12, 29]))]
    #[serde(default)]
    pub layers: Option<Vec<i64>>,
    /// Token positions to read (default: all); negative counts from the end (-1: the last).
    #[schema(example = json!([-1]))]
    #[serde(default)]
    pub positions: Option<Vec<i64>>,
    /// Likeliest tokens per cell (default 5, at most `limits.max_logprobs`).
    #[schema(example = 3)]
    #[serde(default)]
    pub top_k: Option<u64>,
    /// Tokens (each one token of the vocabulary, as text) whose rank and probability to report
    /// in every cell (at most 16).
    #[schema(example = json!([" Paris"]))]
    #[serde(default)]
    pub targets: Option<Vec<String>>,
    /// Interventions applied during the pass (the residual stream is read after them).
    #[serde(default)]
    pub steering: Option<Vec<InterventionSpec>>,
}

/// A token of the prompt.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LensToken {
    /// Its position in the prompt.
    #[schema(example = 5)]
    pub position: usize,
    /// Its id.
    #[schema(example = 314)]
    pub id: u32,
    /// Its text.
    #[schema(example = " is")]
    pub text: String,
}

/// A target token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LensTarget {
    /// As given.
    #[schema(example = " Paris")]
    pub text: String,
    /// Its id.
    #[schema(example = 7042)]
    pub id: u32,
}

/// A target token's standing in one cell.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TargetStanding {
    /// 1 for the likeliest token.
    #[schema(example = 1)]
    pub rank: usize,
    /// Its log-probability.
    #[schema(example = -0.4)]
    pub logprob: f32,
    /// Its probability.
    #[schema(example = 0.67)]
    pub prob: f32,
}

/// What the lens reads at one layer and position.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LensCell {
    /// The likeliest next tokens.
    pub top: Vec<TopLogprob>,
    /// Each target's rank and probability, in request order.
    pub targets: Vec<TargetStanding>,
}

/// The answer of `POST /inspect/logit_lens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogitLensResponse {
    /// The served model.
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// The layers read, ascending: the rows of `cells`.
    #[schema(example = json!([4, 8, 12, 29]))]
    pub layers: Vec<usize>,
    /// The positions read, ascending: the columns of `cells`.
    pub positions: Vec<LensToken>,
    /// The target tokens, with their ids, in request order.
    pub targets: Vec<LensTarget>,
    /// `cells[i][j]`: layer `layers[i]` at position `positions[j]`.
    #[schema(example = json!([[{"top": [{"token": " Paris", "id": 7042, "logprob": -0.4}], "targets": [{"rank": 1, "logprob": -0.4, "prob": 0.67}]}]]))]
    pub cells: Vec<Vec<LensCell>>,
    /// The validated steering applied during the pass.
    pub steering: Vec<AppliedIntervention>,
}

/// The positions asked for, resolved, checked and sorted.
pub(super) fn positions(req: Option<&[i64]>, n: usize) -> Result<Vec<usize>, ApiError> {
    let Some(ps) = req else {
        return Ok((0..n).collect());
    };
    if ps.is_empty() {
        return Err(ApiError::invalid(
            "positions",
            "invalid_positions",
            "must list at least one position",
        ));
    }
    let mut out = Vec::with_capacity(ps.len());
    for (i, &p) in ps.iter().enumerate() {
        let at = if p < 0 { n as i64 + p } else { p };
        if at < 0 || at >= n as i64 {
            return Err(ApiError::invalid(
                &format!("positions[{i}]"),
                "invalid_positions",
                format!("position {p} is outside the prompt's {n} tokens"),
            ));
        }
        out.push(at as usize);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The id of `text`, which must be one token of the vocabulary.
pub(super) fn single_token(
    model: &crate::model::Model,
    field: &str,
    text: &str,
) -> Result<u32, ApiError> {
    match model.tokenizer.encode(text, false).as_deref() {
        Ok([id]) if (*id as usize) < model.dims().vocab_size => Ok(*id),
        _ => Err(ApiError::invalid(
            field,
            "invalid_targets",
            format!("`{text}` is not a single token of the vocabulary"),
        )),
    }
}

/// The logit lens of a prompt.
#[utoipa::path(post, path = "/inspect/logit_lens", tag = "inspect",
    request_body = LogitLensRequest,
    params(("X-Steering" = Option<String>, Header, description = "Steering as a JSON list or the compact form (docs/steering.md); the body's `steering` wins")),
    responses(
        (status = 200, description = "Top tokens and target standings per layer and position", body = LogitLensResponse),
        (status = 400, description = "Malformed JSON or a bad `X-Steering` header", body = ErrorBody),
        (status = 422, description = "Invalid layers, positions or targets, a prompt too long, or more cells than `limits.max_lens_cells`", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody)))]
pub async fn logit_lens(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<LogitLensRequest>,
) -> Result<Json<LogitLensResponse>, ApiError> {
    let model = state.engine.model.clone();
    let tokens = encode_input(&state, req.prompt.as_deref(), req.messages.as_deref())?;
    check_prompt_len(&state, "prompt", tokens.len())?;
    let layers = layer_list(&state, "layers", req.layers.as_deref())?;
    let mut layers_sorted = layers.clone();
    layers_sorted.sort_unstable();
    let positions = positions(req.positions.as_deref(), tokens.len())?;
    let max_cells = state.config.limits.max_lens_cells;
    if layers_sorted.len() * positions.len() > max_cells {
        return Err(ApiError::invalid(
            "positions",
            "too_much_output",
            format!(
                "{} layers x {} positions is more than limits.max_lens_cells ({max_cells}); \
                 ask for fewer",
                layers_sorted.len(),
                positions.len()
            ),
        ));
    }
    let top_k = match req.top_k {
        None => 5,
        Some(k) if k as u128 > state.config.limits.max_logprobs as u128 => {
            return Err(ApiError::invalid(
                "top_k",
                "invalid_top_k",
                format!(
                    "at most {} (limits.max_logprobs)",
                    state.config.limits.max_logprobs
                ),
            ))
        }
        Some(k) => k as usize,
    };
    let target_texts = req.targets.unwrap_or_default();
    if target_texts.len() > 16 {
        return Err(ApiError::invalid(
            "targets",
            "invalid_targets",
            "at most 16 targets",
        ));
    }
    let targets = target_texts
        .iter()
        .enumerate()
        .map(|(i, t)| single_token(&model, &format!("targets[{i}]"), t))
        .collect::<Result<Vec<_>, _>>()?;
    let plan = state
        .steering_plan(req.steering.as_deref(), &headers)
        .await?;
    let applied = plan.as_ref().map(|p| p.applied()).unwrap_or_default();
    let hooks = LensHooks::new(layers_sorted.clone(), positions.clone());
    let rows: Vec<Vec<f32>> = run_chunked(&state, &tokens, plan, hooks, "logit lens")
        .await?
        .hooks
        .rows
        .into_iter()
        .flatten()
        .collect();
    let mut readings = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(ROWS_PER_JOB) {
        let (chunk, t) = (chunk.to_vec(), targets.clone());
        let read = state
            .engine
            .run_job(move |m| lens::read(m, &chunk, top_k, &t))
            .await?
            .map_err(|e| ApiError::internal("logit lens", format!("{e:#}")))?;
        readings.extend(read);
    }
    let token = |position: usize, id: u32| LensToken {
        position,
        id,
        text: model.tokenizer.token_text(id),
    };
    let cell = |r: lens::LensReading| LensCell {
        top: r
            .top
            .iter()
            .map(|&(id, logprob)| TopLogprob {
                token: model.tokenizer.token_text(id),
                id,
                logprob,
            })
            .collect(),
        targets: r
            .targets
            .iter()
            .map(|&(rank, logprob)| TargetStanding {
                rank,
                logprob,
                prob: logprob.exp(),
            })
            .collect(),
    };
    let mut readings = readings.into_iter();
    let cells = layers_sorted
        .iter()
        .map(|_| readings.by_ref().take(positions.len()).map(cell).collect())
        .collect();
    Ok(Json(LogitLensResponse {
        model: model.id.clone(),
        positions: positions.iter().map(|&p| token(p, tokens[p])).collect(),
        targets: target_texts
            .into_iter()
            .zip(&targets)
            .map(|(text, &id)| LensTarget { text, id })
            .collect(),
        layers: layers_sorted,
        cells,
        steering: applied,
    }))
}
