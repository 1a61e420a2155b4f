//! `POST /generate`: a completion of a prompt or a chat, steered by the request's own plan,
//! optionally streamed (SSE) and optionally compared with the unsteered completion under the
//! same seed.

use super::json::ApiJson;
use super::AppState;
use crate::engine::sampling::SamplingParams;
use crate::engine::{GenerationEvent, GenerationRequest, TokenLogprob};
use crate::error::{ApiError, ErrorBody};
use crate::model::chat::ChatMessage;
use crate::steering::spec::{AppliedIntervention, InterventionSpec, SteeringPlan};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use utoipa::ToSchema;

/// A generation request.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "messages": [{"role": "user", "content": "Tell me about yourself."}],
    "max_tokens": 64,
    "steering": [{"vector": "golden_gate", "layer": 12, "coefficient": 8.0}],
    "compare": true
}))]
pub struct GenerateRequest {
    /// Raw text to continue. Give this or `messages`.
    #[serde(default)]
    #[schema(example = "The Golden Gate Bridge is")]
    pub prompt: Option<String>,
    /// A conversation, rendered with the model's chat template; the reply is the assistant's.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// Most tokens to generate (default `limits.default_max_tokens`).
    #[serde(default)]
    #[schema(example = 64)]
    pub max_tokens: Option<u64>,
    /// 0 (default) is greedy; higher is more random.
    #[serde(default)]
    #[schema(example = 0.7)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[serde(default)]
    #[schema(example = 0.95)]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens.
    #[serde(default)]
    #[schema(example = 40)]
    pub top_k: Option<u64>,
    /// Seed for sampling; the same seed gives the same text (random if absent).
    #[serde(default)]
    #[schema(example = 42)]
    pub seed: Option<u64>,
    /// A string or a list of strings that end generation (not included in the text).
    #[serde(default)]
    #[schema(value_type = Object, example = json!(["\n\n"]))]
    pub stop: Option<StopSpec>,
    /// Stream tokens as server-sent events (`token`, then `done`).
    #[serde(default)]
    pub stream: Option<bool>,
    /// Interventions applied during the forward pass (DESIGN §3).
    #[serde(default)]
    pub steering: Option<Vec<InterventionSpec>>,
    /// Also return the unsteered completion with the same seed.
    #[serde(default)]
    pub compare: Option<bool>,
    /// Return the top-n log-probabilities of each generated token.
    #[serde(default)]
    #[schema(example = 5)]
    pub logprobs: Option<u64>,
}

/// One stop sequence or several.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

/// Token counts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    #[schema(example = 37)]
    pub prompt_tokens: usize,
    #[schema(example = 8)]
    pub completion_tokens: usize,
}

/// One finished completion.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Completion {
    #[schema(example = "The capital of France is Paris.")]
    pub text: String,
    /// `stop` (end of sequence or a stop string), `length` or `timeout`.
    #[schema(example = "stop")]
    pub finish_reason: String,
    pub usage: Usage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// The result of a generation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    #[schema(example = "gen-3f2a9c1d0b7e4a55")]
    pub id: String,
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// The seed used (send it back to reproduce the text).
    pub seed: u64,
    #[serde(flatten)]
    pub completion: Completion,
    /// The validated steering plan that was applied.
    pub steering: Vec<AppliedIntervention>,
    /// The unsteered completion with the same seed (`compare: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Completion>,
}

/// Data of an SSE `token` event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamToken {
    pub index: usize,
    pub id: u32,
    /// Text released with this token (empty while a character or a possible stop string is
    /// incomplete).
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprob: Option<TokenLogprob>,
    /// With `compare: true`: `steered` or `baseline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<String>,
}

/// Data of the SSE `done` event that ends each sequence.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamDone {
    pub finish_reason: String,
    pub usage: Usage,
    /// Text released only at the end (held back as a possible stop string), if any.
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<String>,
    /// The applied plan (on the steered sequence's event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steering: Option<Vec<AppliedIntervention>>,
}

/// Sampling and length settings shared by every generation endpoint, validated.
#[derive(Debug, Clone)]
pub struct GenerationSettings {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
}

/// Raw settings as they arrive (OpenAI endpoints fill the same).
#[derive(Debug, Clone, Default)]
pub struct RawSettings<'a> {
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    pub seed: Option<u64>,
    pub stop: Option<&'a StopSpec>,
    pub logprobs: Option<u64>,
}

/// Tokenizes `prompt` or `messages` (exactly one).
pub fn encode_input(
    state: &AppState,
    prompt: Option<&str>,
    messages: Option<&[ChatMessage]>,
) -> Result<Vec<u32>, ApiError> {
    let model = &state.engine.model;
    let ids = match (prompt, messages) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "prompt",
                "conflicting_input",
                "give `prompt` or `messages`, not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "prompt",
                "missing_input",
                "give `prompt` or `messages`",
            ))
        }
        (Some(p), None) => {
            if p.is_empty() {
                return Err(ApiError::invalid(
                    "prompt",
                    "empty_prompt",
                    "must not be empty",
                ));
            }
            model
                .encode_prompt(p)
                .map_err(|e| ApiError::invalid("prompt", "tokenization_failed", e))?
        }
        (None, Some(ms)) => {
            if ms.is_empty() {
                return Err(ApiError::invalid(
                    "messages",
                    "empty_messages",
                    "must hold at least one message",
                ));
            }
            for (i, m) in ms.iter().enumerate() {
                if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].role"),
                        "invalid_role",
                        format!("`{}` is not a role; use system, user or assistant", m.role),
                    ));
                }
            }
            if model.chat_template.is_none() {
                return Err(ApiError::invalid(
                    "messages",
                    "no_chat_template",
                    "this model has no chat template; send `prompt`",
                ));
            }
            model.encode_chat(ms).map_err(|e| {
                ApiError::invalid("messages", "chat_template_failed", format!("{e:#}"))
            })?
        }
    };
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "empty_prompt",
            "encodes to no tokens",
        ));
    }
    Ok(ids)
}

/// Validates sampling and length settings for an encoded prompt.
pub fn validate_settings(
    state: &AppState,
    prompt: Vec<u32>,
    raw: &RawSettings,
) -> Result<GenerationSettings, ApiError> {
    let limits = &state.config.limits;
    let ctx = state.engine.model.llama.config().context_length;
    let max_prompt = limits.max_prompt_tokens.min(ctx - 1);
    if prompt.len() > max_prompt {
        return Err(ApiError::invalid(
            "prompt",
            "prompt_too_long",
            format!(
                "the prompt is {} tokens; at most {max_prompt} are accepted",
                prompt.len()
            ),
        ));
    }
    let max_tokens = match raw.max_tokens {
        None => limits.default_max_tokens,
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "invalid_max_tokens",
                "must be at least 1",
            ))
        }
        Some(n) if n as u128 > limits.max_tokens as u128 => {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens_too_large",
                format!("{n} is above this server's limit of {}", limits.max_tokens),
            ))
        }
        Some(n) => n as usize,
    };
    let max_tokens = if raw.max_tokens.is_none() {
        max_tokens.min(ctx - prompt.len())
    } else if prompt.len() + max_tokens > ctx {
        return Err(ApiError::invalid(
            "max_tokens",
            "context_length_exceeded",
            format!(
                "the prompt ({} tokens) plus max_tokens ({max_tokens}) exceeds the context length of {ctx}",
                prompt.len()
            ),
        ));
    } else {
        max_tokens
    };
    let temperature = raw.temperature.unwrap_or(0.0);
    if !temperature.is_finite() || !(0.0..=5.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            "invalid_temperature",
            "must be between 0 and 5",
        ));
    }
    let top_p = raw.top_p.unwrap_or(1.0);
    if !top_p.is_finite() || top_p <= 0.0 || top_p > 1.0 {
        return Err(ApiError::invalid(
            "top_p",
            "invalid_top_p",
            "must be in (0, 1]",
        ));
    }
    let top_k = match raw.top_k {
        Some(0) => {
            return Err(ApiError::invalid(
                "top_k",
                "invalid_top_k",
                "must be at least 1",
            ))
        }
        k => k.map(|k| k.min(u32::MAX as u64) as usize),
    };
    let stop = match raw.stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    if stop.len() > limits.max_stop_sequences {
        return Err(ApiError::invalid(
            "stop",
            "too_many_stop_sequences",
            format!(
                "{} given; at most {}",
                stop.len(),
                limits.max_stop_sequences
            ),
        ));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(
            "stop",
            "invalid_stop",
            "stop sequences must not be empty",
        ));
    }
    let logprobs = match raw.logprobs {
        None => None,
        Some(n) if n as u128 > limits.max_logprobs as u128 => {
            return Err(ApiError::invalid(
                "logprobs",
                "invalid_logprobs",
                format!("at most {} alternatives per token", limits.max_logprobs),
            ))
        }
        Some(n) => Some(n as usize),
    };
    Ok(GenerationSettings {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: raw.seed.unwrap_or_else(rand::random),
        },
        stop,
        logprobs,
    })
}

/// Submits one sequence to the engine and returns its event stream.
pub fn start(
    state: &AppState,
    settings: &GenerationSettings,
    steering: Option<Arc<SteeringPlan>>,
    request_id: &str,
) -> Result<mpsc::UnboundedReceiver<GenerationEvent>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let timeout = state.config.server.request_timeout_secs;
    state.engine.submit(GenerationRequest {
        prompt: settings.prompt.clone(),
        max_tokens: settings.max_tokens,
        sampling: settings.sampling.clone(),
        stop: settings.stop.clone(),
        logprobs: settings.logprobs,
        steering,
        deadline: (timeout > 0).then(|| Instant::now() + Duration::from_secs(timeout)),
        events: tx,
        request_id: request_id.to_string(),
    })?;
    Ok(rx)
}

/// Waits for a sequence to finish and gathers its text.
pub async fn collect(
    mut rx: mpsc::UnboundedReceiver<GenerationEvent>,
    with_logprobs: bool,
) -> Result<Completion, ApiError> {
    let mut logprobs = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenerationEvent::Token(t) => {
                if let Some(lp) = t.logprob {
                    logprobs.push(lp);
                }
            }
            GenerationEvent::Done(f) => {
                return Ok(Completion {
                    text: f.text,
                    finish_reason: f.reason.as_str().to_string(),
                    usage: Usage {
                        prompt_tokens: f.prompt_tokens,
                        completion_tokens: f.completion_tokens,
                    },
                    logprobs: with_logprobs.then_some(logprobs),
                });
            }
            GenerationEvent::Error(e) => return Err(ApiError::internal("generation", e)),
        }
    }
    Err(ApiError::internal(
        "generation",
        "the engine dropped the request",
    ))
}

/// The request id the HTTP layer assigned (or the client sent).
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(crate::telemetry::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

/// A fresh id for a response.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Generate text, optionally steered.
#[utoipa::path(post, path = "/generate", tag = "generate",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "The completion (JSON), or with `stream: true` an SSE stream of `token` events (StreamToken) then `done` (StreamDone)", body = GenerateResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Invalid field: unknown vector, layer out of range, dimension mismatch, max_tokens too large, ...", body = ErrorBody),
        (status = 429, description = "Queue full; retry after the Retry-After header", body = ErrorBody)))]
pub async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<GenerateRequest>,
) -> Result<Response, ApiError> {
    let rid = request_id(&headers);
    let prompt = encode_input(&state, req.prompt.as_deref(), req.messages.as_deref())?;
    let settings = validate_settings(
        &state,
        prompt,
        &RawSettings {
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed,
            stop: req.stop.as_ref(),
            logprobs: req.logprobs,
        },
    )?;
    let plan = state.steering_plan(req.steering.as_deref())?;
    let applied = plan.as_ref().map(|p| p.applied()).unwrap_or_default();
    let compare = req.compare.unwrap_or(false);
    let steered = start(&state, &settings, plan, &rid)?;
    let baseline = if compare {
        Some(start(&state, &settings, None, &rid)?)
    } else {
        None
    };
    let id = new_id("gen");
    if req.stream.unwrap_or(false) {
        let keep_alive = Duration::from_secs(state.config.server.sse_keep_alive_secs.max(1));
        return Ok(stream_response(steered, baseline, applied, keep_alive).into_response());
    }
    let with_lp = settings.logprobs.is_some();
    let (completion, baseline) = match baseline {
        Some(b) => {
            let (s, b) = tokio::join!(collect(steered, with_lp), collect(b, with_lp));
            (s?, Some(b?))
        }
        None => (collect(steered, with_lp).await?, None),
    };
    Ok(Json(GenerateResponse {
        id,
        model: state.engine.model.id.clone(),
        seed: settings.sampling.seed,
        completion,
        steering: applied,
        baseline,
    })
    .into_response())
}

fn sse_events(
    rx: mpsc::UnboundedReceiver<GenerationEvent>,
    label: Option<&'static str>,
    applied: Option<Vec<AppliedIntervention>>,
) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    let sequence = label.map(str::to_string);
    UnboundedReceiverStream::new(rx).map(move |ev| {
        let event = match ev {
            GenerationEvent::Token(t) => Event::default().event("token").json_data(StreamToken {
                index: t.index,
                id: t.id,
                text: t.text,
                logprob: t.logprob,
                sequence: sequence.clone(),
            }),
            GenerationEvent::Done(f) => Event::default().event("done").json_data(StreamDone {
                finish_reason: f.reason.as_str().to_string(),
                usage: Usage {
                    prompt_tokens: f.prompt_tokens,
                    completion_tokens: f.completion_tokens,
                },
                text: f.tail,
                sequence: sequence.clone(),
                steering: applied.clone(),
            }),
            GenerationEvent::Error(e) => Ok(Event::default()
                .event("error")
                .data(ApiError::internal("generation", e).to_json())),
        };
        Ok(event.unwrap_or_else(|e| {
            Event::default()
                .event("error")
                .data(ApiError::internal("encoding an event", e).to_json())
        }))
    })
}

fn stream_response(
    steered: mpsc::UnboundedReceiver<GenerationEvent>,
    baseline: Option<mpsc::UnboundedReceiver<GenerationEvent>>,
    applied: Vec<AppliedIntervention>,
    keep_alive: Duration,
) -> Response {
    let ka = KeepAlive::new().interval(keep_alive);
    match baseline {
        Some(b) => {
            let s = sse_events(steered, Some("steered"), Some(applied));
            let b = sse_events(b, Some("baseline"), None);
            Sse::new(futures_util::stream::select(s, b))
                .keep_alive(ka)
                .into_response()
        }
        None => Sse::new(sse_events(steered, None, Some(applied)))
            .keep_alive(ka)
            .into_response(),
    }
}
