//! Instruments: per-token activations (`/inspect/activations`), next-token probabilities with
//! and without steering (`/inspect/logprobs`), and the contexts where a neuron or direction
//! fires most (`/inspect/neurons/top`).

use super::generate::encode_input;
use super::json::ApiJson;
use super::AppState;
use crate::engine::{Chunked, TopLogprob};
use crate::error::{ApiError, ErrorBody};
use crate::model::chat::ChatMessage;
use crate::model::hooks::{HookSite, Hooks, NoHooks};
use crate::steering::extract::{encode_example, ExampleSpec, Position};
use crate::steering::inspect::{self, Probe, Signal, TokenActivations};
use crate::steering::spec::{AppliedIntervention, InterventionSpec, NeuronRef, SteeringPlan};
use crate::steering::vector::VectorKind;
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

/// Most values one activation inspection may return (tokens × layers).
const MAX_CELLS: usize = 200_000;

pub(super) fn layer_list(
    state: &AppState,
    field: &str,
    layers: Option<&[i64]>,
) -> Result<Vec<usize>, ApiError> {
    let n = state.engine.model.dims().n_layers;
    let Some(ls) = layers else {
        return Ok((0..n).collect());
    };
    if ls.is_empty() {
        return Err(ApiError::invalid(
            field,
            "invalid_layer",
            "must list at least one layer",
        ));
    }
    let mut out = Vec::new();
    for (i, &l) in ls.iter().enumerate() {
        if l < 0 || l as usize >= n {
            return Err(ApiError::invalid(
                &format!("{field}[{i}]"),
                "invalid_layer",
                format!(
                    "layer {l} is out of range: the model has {n} layers (0-{})",
                    n - 1
                ),
            ));
        }
        if !out.contains(&(l as usize)) {
            out.push(l as usize);
        }
    }
    Ok(out)
}

fn neuron(state: &AppState, field: &str, n: NeuronRef) -> Result<(usize, usize), ApiError> {
    let c = state.engine.model.dims();
    if n.layer < 0 || n.layer as usize >= c.n_layers {
        return Err(ApiError::invalid(
            &format!("{field}.layer"),
            "invalid_layer",
            format!("layer {} is out of range (0-{})", n.layer, c.n_layers - 1),
        ));
    }
    if n.index < 0 || n.index as usize >= c.intermediate_size {
        return Err(ApiError::invalid(
            &format!("{field}.index"),
            "invalid_neuron",
            format!(
                "neuron {} is out of range (0-{})",
                n.index,
                c.intermediate_size - 1
            ),
        ));
    }
    Ok((n.layer as usize, n.index as usize))
}

/// Per-token activations of a prompt.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "The Golden Gate Bridge is", "layers": [12], "site": "resid_post", "top_k": 5, "project_onto": ["golden_gate"]}))]
pub struct ActivationsRequest {
    /// Raw text to inspect. Give this or `messages`.
    #[schema(example = "The Golden Gate Bridge is")]
    #[serde(default)]
    pub prompt: Option<String>,
    /// A conversation rendered with the model's chat template.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    #[schema(example = json!([12]))]
    /// Blocks to read (default: all).
    #[serde(default)]
    pub layers: Option<Vec<i64>>,
    /// The hook site read (default `resid_post`; `mlp_act` for neurons).
    #[serde(default)]
    pub site: Option<HookSite>,
    #[schema(example = 10)]
    /// How many top neurons (by value) or dimensions (by magnitude) per token (default 10).
    #[serde(default)]
    pub top_k: Option<u64>,
    #[schema(example = json!(["golden_gate"]))]
    /// Vectors to project each token's activation onto.
    #[serde(default)]
    pub project_onto: Option<Vec<String>>,
    #[schema(example = json!([{"layer": 10, "index": 1234}]))]
    /// Neurons whose `mlp_act` value to report at every token.
    #[serde(default)]
    pub neurons: Option<Vec<NeuronRef>>,
    /// Interventions applied during the inspected pass (the activations are read after them).
    #[serde(default)]
    pub steering: Option<Vec<InterventionSpec>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ActivationsResponse {
    /// The served model.
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// The inspected hook site.
    pub site: HookSite,
    /// The inspected layers.
    #[schema(example = json!([12]))]
    pub layers: Vec<usize>,
    /// One entry per prompt token.
    pub tokens: Vec<TokenActivations>,
    /// The validated steering applied during the pass.
    pub steering: Vec<AppliedIntervention>,
}

/// A request's `top_k` (default 10, at most 100).
pub(super) fn top_k_param(top_k: Option<u64>) -> Result<usize, ApiError> {
    match top_k {
        None => Ok(10),
        Some(k) if k > 100 => Err(ApiError::invalid("top_k", "invalid_top_k", "at most 100")),
        Some(k) => Ok(k as usize),
    }
}

/// Rejects a prompt longer than `limits.max_prompt_tokens` or the model's context.
pub(super) fn check_prompt_len(state: &AppState, field: &str, len: usize) -> Result<(), ApiError> {
    let max_prompt = state
        .config
        .limits
        .max_prompt_tokens
        .min(state.engine.model.dims().context_length);
    if len > max_prompt {
        return Err(ApiError::invalid(
            field,
            "prompt_too_long",
            format!("{len} tokens; at most {max_prompt} (limits.max_prompt_tokens)"),
        ));
    }
    Ok(())
}

/// Activations at every token: top neurons or dimensions, norms, projections, chosen neurons.
#[utoipa::path(post, path = "/inspect/activations", tag = "inspect",
    request_body = ActivationsRequest,
    params(("X-Steering" = Option<String>, Header, description = "Steering as a JSON list or the compact form (docs/steering.md); the body's `steering` wins")),
    responses(
        (status = 200, description = "Per-token activations", body = ActivationsResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 422, description = "Invalid layer, site, neuron or vector", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody)))]
pub async fn activations(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<ActivationsRequest>,
) -> Result<Json<ActivationsResponse>, ApiError> {
    let tokens = encode_input(&state, req.prompt.as_deref(), req.messages.as_deref())?;
    check_prompt_len(&state, "prompt", tokens.len())?;
    let site = req.site.unwrap_or(HookSite::ResidPost);
    let layers = layer_list(&state, "layers", req.layers.as_deref())?;
    if layers.len() * tokens.len() > MAX_CELLS {
        return Err(ApiError::invalid(
            "layers",
            "too_much_output",
            format!(
                "{} tokens × {} layers is more than {MAX_CELLS} cells; ask for fewer layers",
                tokens.len(),
                layers.len()
            ),
        ));
    }
    let top_k = top_k_param(req.top_k)?;
    let mut project_onto = Vec::new();
    for (i, name) in req.project_onto.unwrap_or_default().into_iter().enumerate() {
        let e = state.vector(&name).await?.ok_or_else(|| {
            ApiError::invalid(
                &format!("project_onto[{i}]"),
                "unknown_vector",
                format!("no vector named `{name}`"),
            )
        })?;
        if site == HookSite::MlpAct {
            return Err(ApiError::invalid(
                "project_onto",
                "invalid_site",
                "projections need a residual-width site or `attn_head`, not mlp_act",
            ));
        }
        let wanted = match site {
            HookSite::AttnHead => VectorKind::HeadDirection,
            _ => VectorKind::Direction,
        };
        if e.vector.meta.kind != wanted {
            return Err(ApiError::invalid(
                &format!("project_onto[{i}]"),
                "wrong_vector_kind",
                format!(
                    "`{name}` is a {}; projections at `{site}` take a {}",
                    e.vector.meta.kind.as_str(),
                    wanted.as_str()
                ),
            ));
        }
        project_onto.push((name, e.vector));
    }
    let neurons = req
        .neurons
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, n)| neuron(&state, &format!("neurons[{i}]"), n))
        .collect::<Result<Vec<_>, _>>()?;
    let limit = state.config.limits.max_inspect_values;
    let per_cell = 1 + top_k + project_onto.len() + neurons.len();
    let values = (layers.len() * tokens.len()).saturating_mul(per_cell);
    if values > limit {
        return Err(ApiError::invalid(
            "project_onto",
            "too_much_output",
            format!(
                "{} tokens × {} layers × {per_cell} values per cell (1 + top_k + projections + \
                 neurons) is {values} numbers, more than limits.max_inspect_values ({limit}); \
                 ask for fewer layers, projections or neurons",
                tokens.len(),
                layers.len()
            ),
        ));
    }
    let plan = state
        .steering_plan(req.steering.as_deref(), &headers)
        .await?;
    let applied = plan.as_ref().map(|p| p.applied()).unwrap_or_default();
    let probe = Arc::new(Probe {
        site,
        layers: layers.clone(),
        top_k,
        project_onto,
        neurons,
        head_dim: state.engine.model.dims().head_dim,
    });
    let hooks = inspect::ProbeHooks::new(probe, tokens.len());
    let done = run_chunked(&state, &tokens, plan, hooks, "inspection").await?;
    let result = done.hooks.report(&state.engine.model, &tokens);
    Ok(Json(ActivationsResponse {
        model: state.engine.model.id.clone(),
        site,
        layers,
        tokens: result,
        steering: applied,
    }))
}

/// Next-token probabilities of chosen continuations, unsteered and steered.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "My favourite landmark is the", "targets": [" Golden", " Eiffel"], "steering": [{"vector": "golden_gate", "coefficient": 2.5}]}))]
pub struct LogprobsRequest {
    /// Raw text after which to score the targets. Give this or `messages`.
    #[schema(example = "My favourite landmark is the")]
    #[serde(default)]
    pub prompt: Option<String>,
    /// A conversation; the targets are scored as the start of the assistant's reply.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    #[schema(example = json!([" Golden", " Eiffel"]))]
    /// Continuations to score; one of several tokens gets its joint log-probability.
    pub targets: Vec<String>,
    /// Interventions for the steered side.
    #[serde(default)]
    pub steering: Option<Vec<InterventionSpec>>,
    #[schema(example = 10)]
    /// How many most likely next tokens to list (default 10).
    #[serde(default)]
    pub top_k: Option<u64>,
}

/// A target's probability under one condition.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TargetScore {
    #[schema(example = -3.6)]
    /// Joint log-probability of all the target's tokens.
    pub logprob: f32,
    /// `exp(logprob)`.
    #[schema(example = 0.027)]
    pub prob: f64,
    #[schema(example = json!([-3.6]))]
    /// Log-probability of each token in turn.
    pub token_logprobs: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TargetReport {
    /// The target as given.
    #[schema(example = " Golden")]
    pub text: String,
    /// Its token ids.
    #[schema(example = json!([13578]))]
    pub token_ids: Vec<u32>,
    /// Its tokens as text.
    #[schema(example = json!([" Golden"]))]
    pub tokens: Vec<String>,
    /// Probability without steering.
    pub unsteered: TargetScore,
    /// Probability with the request's steering (absent without steering).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steered: Option<TargetScore>,
    #[schema(example = 2.8)]
    /// `steered.logprob - unsteered.logprob`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_logprob: Option<f32>,
    #[schema(example = 17.1)]
    /// `steered.prob / unsteered.prob`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopTokens {
    /// The most likely next tokens without steering.
    pub unsteered: Vec<TopLogprob>,
    /// The most likely next tokens with steering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steered: Option<Vec<TopLogprob>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogprobsResponse {
    /// The served model.
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// Tokens in the prompt.
    #[schema(example = 5)]
    pub prompt_tokens: usize,
    /// One report per target, in request order.
    pub targets: Vec<TargetReport>,
    /// The most likely next tokens, side by side.
    pub top: TopTokens,
    /// The validated steering plan.
    pub steering: Vec<AppliedIntervention>,
}

fn target_score(lps: &[f32]) -> TargetScore {
    let logprob: f32 = lps.iter().sum();
    TargetScore {
        logprob,
        prob: (logprob as f64).exp(),
        token_logprobs: lps.to_vec(),
    }
}

/// Score continuations after a prompt, with and without the request's steering.
#[utoipa::path(post, path = "/inspect/logprobs", tag = "inspect",
    request_body = LogprobsRequest,
    params(("X-Steering" = Option<String>, Header, description = "Steering as a JSON list or the compact form (docs/steering.md); the body's `steering` wins")),
    responses(
        (status = 200, description = "Target probabilities and top tokens, side by side", body = LogprobsResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 422, description = "Invalid targets or steering", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody)))]
pub async fn logprobs(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<LogprobsRequest>,
) -> Result<Json<LogprobsResponse>, ApiError> {
    let model = state.engine.model.clone();
    let prompt = encode_input(&state, req.prompt.as_deref(), req.messages.as_deref())?;
    if req.targets.is_empty() || req.targets.len() > 32 {
        return Err(ApiError::invalid(
            "targets",
            "invalid_targets",
            "give between 1 and 32 targets",
        ));
    }
    let mut targets = Vec::new();
    for (i, t) in req.targets.iter().enumerate() {
        let ids = model
            .tokenizer
            .encode(t, false)
            .map_err(|e| ApiError::invalid(&format!("targets[{i}]"), "invalid_targets", e))?;
        if ids.is_empty() || ids.len() > 64 {
            return Err(ApiError::invalid(
                &format!("targets[{i}]"),
                "invalid_targets",
                "must be 1 to 64 tokens",
            ));
        }
        targets.push(ids);
    }
    let ctx = model.dims().context_length;
    let longest = targets.iter().map(Vec::len).max().unwrap_or(0);
    if prompt.len() + longest > state.config.limits.max_prompt_tokens.min(ctx) {
        return Err(ApiError::invalid(
            "prompt",
            "prompt_too_long",
            format!("{} prompt tokens is too long", prompt.len()),
        ));
    }
    let top_k = top_k_param(req.top_k)?;
    let plan = state
        .steering_plan(req.steering.as_deref(), &headers)
        .await?;
    let applied = plan.as_ref().map(|p| p.applied()).unwrap_or_default();
    let base = score(&state, &prompt, &targets, None, top_k).await?;
    let steered = match plan {
        Some(p) => Some(score(&state, &prompt, &targets, Some(p), top_k).await?),
        None => None,
    };
    let tops = |xs: &[(u32, f32)]| -> Vec<TopLogprob> {
        xs.iter()
            .map(|&(id, logprob)| TopLogprob {
                token: model.tokenizer.token_text(id),
                id,
                logprob,
            })
            .collect()
    };
    let reports = req
        .targets
        .iter()
        .zip(&targets)
        .enumerate()
        .map(|(i, (text, ids))| {
            let unsteered = target_score(&base.targets[i]);
            let steered = steered.as_ref().map(|s| target_score(&s.targets[i]));
            TargetReport {
                text: text.clone(),
                token_ids: ids.clone(),
                tokens: ids
                    .iter()
                    .map(|&id| model.tokenizer.token_text(id))
                    .collect(),
                delta_logprob: steered.as_ref().map(|s| s.logprob - unsteered.logprob),
                ratio: steered
                    .as_ref()
                    .map(|s| (s.logprob as f64 - unsteered.logprob as f64).exp()),
                unsteered,
                steered,
            }
        })
        .collect();
    Ok(Json(LogprobsResponse {
        model: model.id.clone(),
        prompt_tokens: prompt.len(),
        targets: reports,
        top: TopTokens {
            unsteered: tops(&base.top),
            steered: steered.as_ref().map(|s| tops(&s.top)),
        },
        steering: applied,
    }))
}

/// Runs `tokens` (all prompt) through the engine in prefill-sized chunks, so that generation
/// steps run between them, with `hooks` recording what is inspected.
pub(super) async fn run_chunked<H: Hooks + Send + 'static>(
    state: &AppState,
    tokens: &[u32],
    plan: Option<Arc<SteeringPlan>>,
    hooks: H,
    what: &str,
) -> Result<Chunked<H>, ApiError> {
    run_pass(state, tokens, plan, hooks, None, what).await
}

/// [`run_chunked`], also scoring every token with the `score_top` likeliest at its place.
pub(super) async fn run_pass<H: Hooks + Send + 'static>(
    state: &AppState,
    tokens: &[u32],
    plan: Option<Arc<SteeringPlan>>,
    hooks: H,
    score_top: Option<usize>,
    what: &str,
) -> Result<Chunked<H>, ApiError> {
    let chunk = state.config.engine.prefill_chunk;
    state
        .engine
        .run_chunked(tokens.into(), chunk, plan, tokens.len(), hooks, score_top)
        .await?
        .map_err(|e| ApiError::internal(what, format!("{e:#}")))
}

/// The prompt's next-token distribution and each target's log-probabilities: the prompt in
/// chunks, then the targets teacher-forced in one job.
async fn score(
    state: &AppState,
    prompt: &[u32],
    targets: &[Vec<u32>],
    plan: Option<Arc<SteeringPlan>>,
    top_k: usize,
) -> Result<inspect::Scores, ApiError> {
    let done = Arc::new(run_chunked(state, prompt, plan.clone(), NoHooks, "scoring").await?);
    // One job per target (at most 64 tokens each), so generation steps run between them.
    let mut scores = inspect::Scores {
        top: Vec::new(),
        targets: Vec::with_capacity(targets.len()),
    };
    for (i, target) in targets.iter().enumerate() {
        let (done, plan, target) = (done.clone(), plan.clone(), vec![target.clone()]);
        let k = if i == 0 { top_k } else { 0 };
        let s = state
            .engine
            .run_job(move |m| {
                let (cache, last) = (&done.cache, &done.last_logits);
                let steering = (plan.as_deref(), &done.conditions);
                inspect::score_continuations(m, cache, last, &target, steering, k)
            })
            .await?
            .map_err(|e| ApiError::internal("scoring", format!("{e:#}")))?;
        if i == 0 {
            scores.top = s.top;
        }
        scores.targets.extend(s.targets);
    }
    Ok(scores)
}

/// Which token contexts make a neuron or a direction fire most.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompts": ["The bridge spans the bay.", "I walked to the store."], "vector": "golden_gate", "layer": 12, "top_n": 5}))]
pub struct TopContextsRequest {
    #[schema(example = json!(["The bridge spans the bay."]))]
    /// Texts to search (or `{"prompt", "completion"}` pairs).
    pub prompts: Vec<ExampleSpec>,
    #[schema(example = false)]
    /// Render prompts as user turns in the chat template.
    #[serde(default)]
    pub chat: Option<bool>,
    /// A neuron (`mlp_act`)...
    #[serde(default)]
    pub neuron: Option<NeuronRef>,
    #[schema(example = "golden_gate")]
    /// ...or a stored direction, projected at `layer` (`resid_post`).
    #[serde(default)]
    pub vector: Option<String>,
    /// The layer whose `resid_post` a `vector` is projected at.
    #[schema(example = 12)]
    #[serde(default)]
    pub layer: Option<i64>,
    #[schema(example = 10)]
    /// How many contexts (default 10, at most 100).
    #[serde(default)]
    pub top_n: Option<u64>,
    #[schema(example = 8)]
    /// Tokens of context on each side (default 8).
    #[serde(default)]
    pub context: Option<u64>,
}

/// One token where the signal is large.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopContext {
    /// Which prompt (0-based).
    #[schema(example = 0)]
    pub prompt_index: usize,
    /// Token position in that prompt.
    #[schema(example = 3)]
    pub position: usize,
    /// The neuron value or projection there.
    #[schema(example = 4.2)]
    pub value: f32,
    /// The token.
    #[schema(example = " bridge")]
    pub token: String,
    #[schema(example = "The")]
    /// Text before the token (up to `context` tokens).
    pub before: String,
    #[schema(example = " spans the bay.")]
    /// Text after it.
    pub after: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopContextsResponse {
    #[schema(example = "golden_gate @ resid_post 12")]
    /// What was ranked, e.g. `neuron 10:1234` or `golden_gate @ resid_post 12`.
    pub signal: String,
    /// The top contexts, largest value first.
    pub contexts: Vec<TopContext>,
}

/// Ranks every token of the sequences by a signal and returns the top ones with context.
pub async fn rank_contexts(
    state: &AppState,
    sequences: Vec<Vec<u32>>,
    signal: Signal,
    top_n: usize,
    context: usize,
) -> Result<Vec<TopContext>, ApiError> {
    let mut values: Vec<Vec<f32>> = Vec::with_capacity(sequences.len());
    let budget = state.config.vectors.extract_batch_tokens.max(1);
    let chunk = state.config.engine.prefill_chunk;
    let mut start = 0;
    while start < sequences.len() {
        if sequences[start].len() > chunk {
            // A long text alone, in chunks like a prefill.
            let hooks = inspect::SignalHooks::new(signal.clone(), [sequences[start].len()]);
            let done = run_chunked(state, &sequences[start], None, hooks, "ranking contexts");
            values.extend(done.await?.hooks.values);
            start += 1;
            continue;
        }
        let mut end = start;
        let mut tokens = 0;
        while end < sequences.len()
            && sequences[end].len() <= chunk
            && (end == start || tokens + sequences[end].len() <= budget)
        {
            tokens += sequences[end].len();
            end += 1;
        }
        let (batch, signal) = (sequences[start..end].to_vec(), signal.clone());
        values.extend(
            state
                .engine
                .run_job(move |m| inspect::signal_values(m, &batch, &signal))
                .await?
                .map_err(|e| ApiError::internal("ranking contexts", format!("{e:#}")))?,
        );
        start = end;
    }
    let mut all: Vec<(usize, usize, f32)> = values
        .iter()
        .enumerate()
        .flat_map(|(i, vs)| vs.iter().enumerate().skip(1).map(move |(p, &v)| (i, p, v)))
        .collect();
    all.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    let tok = &state.engine.model.tokenizer;
    Ok(all
        .into_iter()
        .take(top_n)
        .map(|(i, p, value)| {
            let s = &sequences[i];
            let decode = |ids: &[u32]| tok.decode(ids).unwrap_or_default();
            TopContext {
                prompt_index: i,
                position: p,
                value,
                token: tok.token_text(s[p]),
                before: decode(&s[p.saturating_sub(context)..p]),
                after: decode(&s[p + 1..(p + 1 + context).min(s.len())]),
            }
        })
        .collect())
}

/// Encodes the prompts of a top-contexts request.
pub fn encode_prompts(
    state: &AppState,
    prompts: &[ExampleSpec],
    chat: bool,
) -> Result<Vec<Vec<u32>>, ApiError> {
    if prompts.is_empty() || prompts.len() > state.config.vectors.max_extract_examples {
        return Err(ApiError::invalid(
            "prompts",
            "invalid_examples",
            format!(
                "give between 1 and {} prompts",
                state.config.vectors.max_extract_examples
            ),
        ));
    }
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let field = format!("prompts[{i}]");
            let tokens = encode_example(&state.engine.model, p, chat, Position::Last)
                .map(|e| e.tokens)
                .map_err(|m| ApiError::invalid(&field, "invalid_example", m))?;
            check_prompt_len(state, &field, tokens.len())?;
            Ok(tokens)
        })
        .collect()
}

/// The token contexts where a neuron, or a direction's projection, is largest.
#[utoipa::path(post, path = "/inspect/neurons/top", tag = "inspect",
    request_body = TopContextsRequest,
    responses(
        (status = 200, description = "The top contexts, largest first", body = TopContextsResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 422, description = "Invalid neuron, vector, layer or prompts", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody)))]
pub async fn neurons_top(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TopContextsRequest>,
) -> Result<Json<TopContextsResponse>, ApiError> {
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
    let context = req.context.unwrap_or(8).min(64) as usize;
    let (signal, label) = match (&req.neuron, &req.vector) {
        (Some(n), None) => {
            let (layer, index) = neuron(&state, "neuron", *n)?;
            (
                Signal::Neuron { layer, index },
                format!("neuron {layer}:{index}"),
            )
        }
        (None, Some(name)) => {
            let e = state.vector(name).await?.ok_or_else(|| {
                ApiError::invalid(
                    "vector",
                    "unknown_vector",
                    format!("no vector named `{name}`"),
                )
            })?;
            let layers = layer_list(&state, "layer", req.layer.map(|l| vec![l]).as_deref())?;
            let Some(&layer) = layers.first().filter(|_| req.layer.is_some()) else {
                return Err(ApiError::invalid(
                    "layer",
                    "missing_layer",
                    "a vector needs `layer`",
                ));
            };
            let dir = e.vector.direction_for(layer).ok_or_else(|| {
                ApiError::invalid(
                    "layer",
                    "invalid_layer",
                    format!("`{name}` has no direction for layer {layer}"),
                )
            })?;
            let n = dir.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
            if n == 0.0 {
                return Err(ApiError::invalid(
                    "vector",
                    "zero_vector",
                    "the direction is zero",
                ));
            }
            let unit: Arc<[f32]> = dir.iter().map(|x| x / n).collect();
            (
                Signal::Direction { layer, unit },
                format!("{name} @ resid_post {layer}"),
            )
        }
        _ => {
            return Err(ApiError::invalid(
                "neuron",
                "missing_target",
                "give `neuron` or `vector` (with `layer`)",
            ))
        }
    };
    let sequences = encode_prompts(&state, &req.prompts, req.chat.unwrap_or(false))?;
    let contexts = rank_contexts(&state, sequences, signal, top_n, context).await?;
    Ok(Json(TopContextsResponse {
        signal: label,
        contexts,
    }))
}
