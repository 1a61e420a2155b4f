//! `POST /inspect/patch`: activation patching over layers x positions (x heads) between a
//! clean and a corrupted prompt of equal token length (`crate::steering::patch`). The clean
//! and corrupted runs go through the engine in prefill-sized jobs; the patched runs in jobs
//! of a bounded number of batched rows, each starting from the base run's cache of the
//! positions before its patch, with generation steps between jobs. With `stream: true` the
//! client gets `progress` events; when it goes away the sweep stops.

use super::generate::encode_input;
use super::inspect::{layer_list, run_chunked};
use super::json::ApiJson;
use super::lens::{positions as position_list, single_token, LensToken};
use super::progress::{self, Progress};
use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::model::chat::ChatMessage;
use crate::model::hooks::HookSite;
use crate::steering::patch::{
    patched_metrics, recovery, BaseRun, Metric, PatchPoint, SourceActs, SourceRecorder,
};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;
use utoipa::ToSchema;

/// Most patched runs in one engine job.
const ROWS_PER_JOB: usize = 256;
/// Most bytes of cached prefix copied for one engine job (bounds its memory).
const PREFIX_BYTES_PER_JOB: usize = 256 << 20;

/// A prompt: raw text, or a conversation rendered with the chat template.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PatchPrompt {
    #[schema(example = "The Eiffel Tower is in the city of")]
    Text(String),
    Chat(ChatPrompt),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatPrompt {
    /// A conversation rendered with the model's chat template.
    pub messages: Vec<ChatMessage>,
}

/// What is measured on the next-token logits: give one of the two.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    /// `logit[a] - logit[b]`: two single tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = json!([" Paris", " Rome"]))]
    pub logit_diff: Option<Vec<String>>,
    /// The log-probability of one token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = " Paris")]
    pub logprob: Option<String>,
}

/// Which run receives the other's activations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PatchDirection {
    /// Clean activations into the corrupted run: which places suffice to restore the clean
    /// behaviour.
    #[default]
    Denoising,
    /// Corrupted activations into the clean run: which places are needed for it.
    Noising,
}

/// An activation-patching sweep.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"clean": "The Eiffel Tower is in the city of", "corrupted": "The Colosseum is in the city of", "metric": {"logit_diff": [" Paris", " Rome"]}, "site": "resid_pre", "layers": [0, 10, 20], "positions": [-1]}))]
pub struct PatchRequest {
    /// The prompt showing the behaviour.
    pub clean: PatchPrompt,
    /// A prompt of the same token length that does not.
    pub corrupted: PatchPrompt,
    /// `{"logit_diff": [a, b]}` or `{"logprob": target}`.
    pub metric: MetricSpec,
    /// The hook site patched (default `resid_pre`).
    #[serde(default)]
    pub site: Option<HookSite>,
    /// Blocks to patch (default: all); answered in ascending order.
    #[serde(default)]
    #[schema(example = json!([0, 10, 20]))]
    pub layers: Option<Vec<i64>>,
    /// Token positions to patch (default: all); negative counts from the end.
    #[serde(default)]
    #[schema(example = json!([-1]))]
    pub positions: Option<Vec<i64>>,
    /// At `attn_head`: the heads to patch one at a time (default: all).
    #[serde(default)]
    #[schema(example = json!([0, 3]))]
    pub heads: Option<Vec<i64>>,
    /// `denoising` (default) or `noising`.
    #[serde(default)]
    pub direction: Option<PatchDirection>,
    /// Send `progress` events, then `result` (SSE).
    #[serde(default)]
    #[schema(example = false)]
    pub stream: Option<bool>,
}

/// Per layer and position (and head, at `attn_head`), one number.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PatchGrid {
    /// `[layer][position]`.
    Cells(Vec<Vec<Option<f32>>>),
    /// `[layer][position][head]`.
    Heads(Vec<Vec<Vec<Option<f32>>>>),
}

/// Data of an SSE `progress` event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PatchProgress {
    /// Patched runs done.
    #[schema(example = 120)]
    pub done: usize,
    /// Patched runs in all.
    #[schema(example = 600)]
    pub total: usize,
}

/// The answer of `POST /inspect/patch`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PatchResponse {
    /// The served model.
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// The patched site.
    pub site: HookSite,
    /// Which run received the other's activations.
    pub direction: PatchDirection,
    /// The metric as given.
    pub metric: MetricSpec,
    /// The clean prompt's tokens.
    pub clean_tokens: Vec<LensToken>,
    /// The corrupted prompt's tokens.
    pub corrupted_tokens: Vec<LensToken>,
    /// The rows of the grids, ascending.
    #[schema(example = json!([0, 10, 20]))]
    pub layers: Vec<usize>,
    /// The columns of the grids.
    #[schema(example = json!([7]))]
    pub positions: Vec<usize>,
    /// The third axis, at `attn_head`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = json!([0, 3]))]
    pub heads: Option<Vec<usize>>,
    /// The metric of the clean run.
    #[schema(example = 4.2)]
    pub clean: f32,
    /// The metric of the corrupted run.
    #[schema(example = -2.1)]
    pub corrupted: f32,
    /// The metric of every patched run.
    pub values: PatchGrid,
    /// `(patched - corrupted) / (clean - corrupted)` per cell (null when clean = corrupted).
    pub recovery: PatchGrid,
    /// Patched runs made.
    #[schema(example = 3)]
    pub cells: usize,
    /// Time taken.
    #[schema(example = 1.5)]
    pub seconds: f64,
}

/// A validated sweep.
struct PatchPlan {
    clean: Vec<u32>,
    corrupted: Vec<u32>,
    metric: Metric,
    spec: MetricSpec,
    site: HookSite,
    layers: Vec<usize>,
    positions: Vec<usize>,
    heads: Option<Vec<usize>>,
    direction: PatchDirection,
}

impl PatchPlan {
    fn validate(state: &AppState, req: &PatchRequest) -> Result<Self, ApiError> {
        let encode = |field: &str, p: &PatchPrompt| -> Result<Vec<u32>, ApiError> {
            let tokens = match p {
                PatchPrompt::Text(t) => encode_input(state, Some(t), None),
                PatchPrompt::Chat(c) => encode_input(state, None, Some(&c.messages)),
            }
            .map_err(|e| e.for_field(field))?;
            let max = state.config.limits.max_patch_prompt_tokens;
            if tokens.is_empty() || tokens.len() > max {
                return Err(ApiError::invalid(
                    field,
                    "prompt_too_long",
                    format!(
                        "{} tokens; patching takes 1 to {max} (limits.max_patch_prompt_tokens)",
                        tokens.len()
                    ),
                ));
            }
            Ok(tokens)
        };
        let clean = encode("clean", &req.clean)?;
        let corrupted = encode("corrupted", &req.corrupted)?;
        if clean.len() != corrupted.len() {
            return Err(ApiError::invalid(
                "corrupted",
                "unequal_lengths",
                format!(
                    "the clean prompt has {} tokens and the corrupted one {}; patching pairs \
                     positions, so they must be equally long",
                    clean.len(),
                    corrupted.len()
                ),
            ));
        }
        let model = &state.engine.model;
        let metric = match (&req.metric.logit_diff, &req.metric.logprob) {
            (Some(ts), None) => {
                let [a, b] = ts.as_slice() else {
                    return Err(ApiError::invalid(
                        "metric.logit_diff",
                        "invalid_metric",
                        "give two tokens: [a, b] for logit[a] - logit[b]",
                    ));
                };
                Metric::LogitDiff {
                    a: single_token(model, "metric.logit_diff[0]", a)?,
                    b: single_token(model, "metric.logit_diff[1]", b)?,
                }
            }
            (None, Some(t)) => Metric::Logprob {
                target: single_token(model, "metric.logprob", t)?,
            },
            _ => {
                return Err(ApiError::invalid(
                    "metric",
                    "invalid_metric",
                    "give one of `logit_diff: [a, b]` or `logprob: token`",
                ))
            }
        };
        let site = req.site.unwrap_or(HookSite::ResidPre);
        let mut layers = layer_list(state, "layers", req.layers.as_deref())?;
        layers.sort_unstable();
        let positions = position_list(req.positions.as_deref(), clean.len())?;
        let heads = Self::heads(state, site, req.heads.as_deref())?;
        let cells = layers.len() * positions.len() * heads.as_ref().map_or(1, Vec::len);
        let max = state.config.limits.max_patch_cells;
        if cells > max {
            return Err(ApiError::invalid(
                "layers",
                "too_many_cells",
                format!(
                    "{} layers x {} positions{} is {cells} patched runs, more than \
                     limits.max_patch_cells ({max}); ask for fewer",
                    layers.len(),
                    positions.len(),
                    heads
                        .as_ref()
                        .map_or(String::new(), |h| format!(" x {} heads", h.len()))
                ),
            ));
        }
        Ok(Self {
            clean,
            corrupted,
            metric,
            spec: req.metric.clone(),
            site,
            layers,
            positions,
            heads,
            direction: req.direction.unwrap_or_default(),
        })
    }

    /// The heads to patch one at a time at `attn_head` (none elsewhere).
    fn heads(
        state: &AppState,
        site: HookSite,
        heads: Option<&[i64]>,
    ) -> Result<Option<Vec<usize>>, ApiError> {
        let n = state.engine.model.dims().n_heads;
        match (site, heads) {
            (HookSite::AttnHead, None) => Ok(Some((0..n).collect())),
            (HookSite::AttnHead, Some([])) => Err(ApiError::invalid(
                "heads",
                "invalid_head",
                "must list at least one head",
            )),
            (HookSite::AttnHead, Some(hs)) => {
                let mut out = Vec::with_capacity(hs.len());
                for (i, &h) in hs.iter().enumerate() {
                    if h < 0 || h as usize >= n {
                        return Err(ApiError::invalid(
                            &format!("heads[{i}]"),
                            "invalid_head",
                            format!(
                                "head {h} is out of range: attention layers have {n} heads (0-{})",
                                n - 1
                            ),
                        ));
                    }
                    if !out.contains(&(h as usize)) {
                        out.push(h as usize);
                    }
                }
                Ok(Some(out))
            }
            (_, None) => Ok(None),
            (site, Some(_)) => Err(ApiError::invalid(
                "heads",
                "invalid_site",
                format!("`heads` needs the `attn_head` site, not `{site}`"),
            )),
        }
    }

    /// Every patched run, layer-major, each with its one patch point.
    fn cells(&self, head_dim: usize) -> Vec<PatchPoint> {
        let heads: Vec<Option<usize>> = match &self.heads {
            Some(hs) => hs.iter().map(|&h| Some(h)).collect(),
            None => vec![None],
        };
        let mut out = Vec::new();
        for &layer in &self.layers {
            for &position in &self.positions {
                for h in &heads {
                    out.push(PatchPoint {
                        layer,
                        position,
                        span: h.map(|h| (h * head_dim, head_dim)),
                    });
                }
            }
        }
        out
    }
}

/// Consecutive cells grouped into engine jobs of one block each (a job's runs start at its
/// block): at most [`ROWS_PER_JOB`] runs, about `budget` new tokens and
/// [`PREFIX_BYTES_PER_JOB`] of copied cache (`token_bytes` a token) each.
fn jobs(
    cells: &[PatchPoint],
    n_tokens: usize,
    budget: usize,
    token_bytes: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut new, mut copied) = (0, 0, 0);
    for (i, c) in cells.iter().enumerate() {
        let (n, p) = (n_tokens - c.position, c.position * token_bytes);
        if i > start
            && (i - start >= ROWS_PER_JOB
                || new + n > budget
                || copied + p > PREFIX_BYTES_PER_JOB
                || cells[i - 1].layer != c.layer)
        {
            out.push(start..i);
            (start, new, copied) = (i, 0, 0);
        }
        new += n;
        copied += p;
    }
    if start < cells.len() {
        out.push(start..cells.len());
    }
    out
}

/// Runs a sweep: the source run (recording), the base run (its cache), then the patched runs.
async fn run_patch(
    state: &AppState,
    plan: PatchPlan,
    progress: Progress<PatchProgress>,
) -> Result<PatchResponse, ApiError> {
    let started = Instant::now();
    let (source, base) = match plan.direction {
        PatchDirection::Denoising => (&plan.clean, &plan.corrupted),
        PatchDirection::Noising => (&plan.corrupted, &plan.clean),
    };
    let first = plan.positions.first().copied().unwrap_or(0);
    let recorder = SourceRecorder::new(plan.site, plan.layers.clone(), source.len())
        .keeping(plan.positions.clone());
    let src = run_chunked(state, source, None, recorder, "patching").await?;
    let source_metric = plan.metric.of(&src.last_logits);
    let acts: Arc<SourceActs> = Arc::new(src.hooks.finish());
    progress::gone(&progress)?;
    let recorder = SourceRecorder::new(HookSite::ResidPre, plan.layers.clone(), base.len())
        .keeping((first..base.len()).collect());
    let base_run = run_chunked(state, base, None, recorder, "patching").await?;
    let base_metric = plan.metric.of(&base_run.last_logits);
    let base_resid: Arc<SourceActs> = Arc::new(base_run.hooks.finish());
    let (clean, corrupted) = match plan.direction {
        PatchDirection::Denoising => (source_metric, base_metric),
        PatchDirection::Noising => (base_metric, source_metric),
    };
    let cache = Arc::new(base_run.cache);
    let base: Arc<[u32]> = base.clone().into();
    let cells = plan.cells(state.engine.model.dims().head_dim);
    let mut values = Vec::with_capacity(cells.len());
    let budget = state.config.engine.prefill_chunk.max(1);
    let token_bytes = cache.size_in_bytes() / cache.len().max(1);
    for range in jobs(&cells, base.len(), budget, token_bytes) {
        progress::gone(&progress)?;
        let patches: Vec<Vec<PatchPoint>> = cells[range].iter().map(|&c| vec![c]).collect();
        let (base, cache, acts) = (base.clone(), cache.clone(), acts.clone());
        let base_resid = base_resid.clone();
        let (site, metric) = (plan.site, plan.metric);
        let job = move |m: &crate::model::Model| {
            let run = BaseRun {
                tokens: &base,
                cache: &cache,
                resid_pre: &base_resid,
            };
            patched_metrics(m, &run, site, &acts, &patches, metric)
        };
        let got = state
            .engine
            .run_job(job)
            .await?
            .map_err(|e| ApiError::internal("patching", format!("{e:#}")))?;
        values.extend(got);
        let (done, total) = (values.len(), cells.len());
        progress::report(&progress, PatchProgress { done, total }).await?;
    }
    let grid = |f: &dyn Fn(f32) -> Option<f32>| -> PatchGrid {
        let per_cell = plan.heads.as_ref().map_or(1, Vec::len);
        let rows = values.chunks(per_cell * plan.positions.len().max(1));
        match plan.heads {
            None => PatchGrid::Cells(rows.map(|r| r.iter().map(|&v| f(v)).collect()).collect()),
            Some(_) => PatchGrid::Heads(
                rows.map(|r| {
                    r.chunks(per_cell)
                        .map(|c| c.iter().map(|&v| f(v)).collect())
                        .collect()
                })
                .collect(),
            ),
        }
    };
    let model = &state.engine.model;
    let token_list = |ids: &[u32]| -> Vec<LensToken> {
        ids.iter()
            .enumerate()
            .map(|(position, &id)| LensToken {
                position,
                id,
                text: model.tokenizer.token_text(id),
            })
            .collect()
    };
    Ok(PatchResponse {
        model: model.id.clone(),
        site: plan.site,
        direction: plan.direction,
        metric: plan.spec.clone(),
        clean_tokens: token_list(&plan.clean),
        corrupted_tokens: token_list(&plan.corrupted),
        layers: plan.layers.clone(),
        positions: plan.positions.clone(),
        heads: plan.heads.clone(),
        clean,
        corrupted,
        values: grid(&|v| Some(v).filter(|v| v.is_finite())),
        recovery: grid(&|v| recovery(v, clean, corrupted).filter(|r| r.is_finite())),
        cells: cells.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Activation patching between a clean and a corrupted prompt.
#[utoipa::path(post, path = "/inspect/patch", tag = "inspect",
    request_body = PatchRequest,
    responses(
        (status = 200, description = "The metric of the clean, corrupted and every patched run, and each cell's recovery; with `stream: true`, SSE `progress` events (PatchProgress) then `result` (PatchResponse)", body = PatchResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 422, description = "Prompts of unequal length or too long, bad metric tokens, layers, positions or heads, or more cells than `limits.max_patch_cells`", body = ErrorBody),
        (status = 429, description = "Queue full, or `limits.max_concurrent_patches` sweeps running", body = ErrorBody)))]
pub async fn patch(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<PatchRequest>,
) -> Result<Response, ApiError> {
    let plan = PatchPlan::validate(&state, &req)?;
    let Ok(place) = state.patch_sweeps.clone().try_acquire_owned() else {
        let n = state.config.limits.max_concurrent_patches;
        return Err(ApiError {
            code: "too_many_patches",
            ..ApiError::overloaded(format!(
                "{n} patching sweeps are running (limits.max_concurrent_patches); retry later"
            ))
        });
    };
    if !req.stream.unwrap_or(false) {
        let done = run_patch(&state, plan, None).await;
        drop(place);
        return Ok(Json(done?).into_response());
    }
    Ok(progress::stream(&state.clone(), move |p| async move {
        let done = run_patch(&state, plan, p).await;
        drop(place);
        done
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_cover_every_cell_once_within_their_budgets() {
        let cells: Vec<PatchPoint> = (0..30)
            .flat_map(|layer| {
                (0..20).map(move |position| PatchPoint {
                    layer,
                    position,
                    span: None,
                })
            })
            .collect();
        let jobs = jobs(&cells, 20, 256, 46_080);
        assert_eq!(jobs.first().map(|r| r.start), Some(0));
        assert_eq!(jobs.last().map(|r| r.end), Some(cells.len()));
        for w in jobs.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        for r in &jobs {
            let new: usize = cells[r.clone()].iter().map(|c| 20 - c.position).sum();
            assert!(new <= 256 || r.len() == 1, "{r:?} computes {new} tokens");
            let layer = cells[r.start].layer;
            assert!(
                cells[r.clone()].iter().all(|c| c.layer == layer),
                "{r:?} mixes blocks"
            );
        }
        assert!(jobs.len() <= 2 * 30, "{} jobs", jobs.len());
    }
}
