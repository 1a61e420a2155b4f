//! OpenAI-compatible endpoints: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models`. Existing clients work unchanged; steering reaches the model through the
//! body field `steering` (OpenAI clients send it with `extra_body`) or the `X-Steering` header
//! (a JSON list, or the compact `name:layer:coefficient` form); the body wins when both are
//! present, and `X-Steering-Applied` echoes the validated plan. Errors use OpenAI's envelope
//! and status codes (400 for any invalid parameter, 404 for an unknown model).

use super::generate::{
    encode_input, logprobs_param, new_id, request_id, start, validate_settings, GenerationSettings,
    RawSettings,
};
use super::json::{body_error, parse_json};
use super::AppState;
use crate::engine::{FinishReason, GenerationEvent, TokenLogprob};
use crate::error::{ApiError, ErrorBody};
use crate::model::chat::ChatMessage;
use crate::steering::compact;
use crate::steering::intervention::{format_fired, ConditionReport};
use crate::steering::spec::{AppliedIntervention, InterventionSpec, SteeringPlan};
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

pub mod completions;
mod wire;
pub use wire::*;

pub const APPLIED_HEADER: &str = "x-steering-applied";
/// What conditional interventions did (`crate::steering::intervention::format_fired`).
pub const FIRED_HEADER: &str = "x-steering-fired";

/// An error in OpenAI's terms: every invalid parameter is a 400.
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(mut e: ApiError) -> Self {
        if e.status == StatusCode::UNPROCESSABLE_ENTITY {
            e.status = StatusCode::BAD_REQUEST;
        }
        if e.status == StatusCode::BAD_REQUEST {
            e.kind_override = Some("invalid_request_error");
        }
        OpenAiError(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}

/// A JSON body for the OpenAI routes: unknown fields ignored, wrong types a 400.
pub struct OpenAiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for OpenAiJson<T> {
    type Rejection = OpenAiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, OpenAiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(body_error)?;
        let parsed = parse_json(&bytes)?;
        refuse_unimplemented(&bytes)?;
        Ok(OpenAiJson(parsed))
    }
}

/// OpenAI parameters tiller does not implement (see [`refuse_unimplemented`]).
const UNIMPLEMENTED: [&str; 7] = [
    "logit_bias",
    "response_format",
    "tool_choice",
    "function_call",
    "functions",
    "best_of",
    "suffix",
];

/// OpenAI parameters that change what a client gets back and that tiller does not implement:
/// refused with a 400 naming them rather than silently ignored. Their neutral values (what a
/// client sends when it means "none") pass.
fn refuse_unimplemented(bytes: &[u8]) -> Result<(), ApiError> {
    use serde_json::Value;
    // Most bodies name none of them: skip the second parse.
    let named = |key: &str| bytes.windows(key.len()).any(|w| w == key.as_bytes());
    if !UNIMPLEMENTED.iter().any(|k| named(k)) {
        return Ok(());
    }
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(bytes) else {
        return Ok(());
    };
    let neutral = |key: &str, v: &Value| match (key, v) {
        (_, Value::Null) => true,
        ("logit_bias", Value::Object(m)) => m.is_empty(),
        ("response_format", Value::Object(m)) => m.get("type").is_some_and(|t| t == "text"),
        ("tool_choice" | "function_call", Value::String(s)) => s == "none" || s == "auto",
        ("functions", Value::Array(a)) => a.is_empty(),
        ("best_of", v) => v.as_u64() == Some(1),
        ("suffix", Value::String(s)) => s.is_empty(),
        _ => false,
    };
    for key in UNIMPLEMENTED {
        if body.get(key).is_some_and(|v| !neutral(key, v)) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_parameter",
                format!("`{key}` is not supported by this server; leave it out"),
            )
            .with_param(key));
        }
    }
    Ok(())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn fingerprint(state: &AppState) -> String {
    use sha2::{Digest, Sha256};
    let m = &state.engine.model;
    let h = Sha256::digest(format!("{}|{}", m.id, m.runtime().weights).as_bytes());
    format!(
        "fp_tiller_{}_{:02x}{:02x}{:02x}{:02x}",
        env!("CARGO_PKG_VERSION"),
        h[0],
        h[1],
        h[2],
        h[3]
    )
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None => Err(ApiError::invalid(
            "model",
            "missing_model",
            "you must provide a model parameter",
        )),
        Some(m) if m == state.engine.model.id => Ok(()),
        Some(m) => Err(ApiError {
            param: Some("model".into()),
            kind_override: Some("invalid_request_error"),
            ..ApiError::not_found(
                "model_not_found",
                format!(
                    "The model `{m}` does not exist; this server serves `{}`.",
                    state.engine.model.id
                ),
            )
        }),
    }
}

/// Longest `X-Steering-Applied` sent: clients and proxies limit response headers (h11 and
/// nginx to 16 KiB or less); a longer echo (inline values) is left to the body's `steering`.
const MAX_APPLIED_HEADER: usize = 8192;

fn with_applied(mut resp: Response, applied: &[AppliedIntervention]) -> Response {
    let echo = compact::format(applied);
    if !applied.is_empty() && echo.len() <= MAX_APPLIED_HEADER {
        if let Ok(v) = HeaderValue::from_str(&echo) {
            resp.headers_mut().insert(APPLIED_HEADER, v);
        }
    }
    resp
}

/// Adds `X-Steering-Fired`: what each conditional intervention did, per choice (choices
/// separated by `; `), when the plan has any.
pub(crate) fn with_fired(mut resp: Response, per_choice: &[Vec<ConditionReport>]) -> Response {
    if per_choice.iter().all(Vec::is_empty) {
        return resp;
    }
    let text: Vec<String> = per_choice.iter().map(|c| format_fired(c)).collect();
    let text = text.join("; ");
    if text.len() <= MAX_APPLIED_HEADER {
        if let Ok(v) = HeaderValue::from_str(&text) {
            resp.headers_mut().insert(FIRED_HEADER, v);
        }
    }
    resp
}

fn messages(ms: &[OpenAiMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    ms.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].role"),
                        "invalid_role",
                        format!("`{other}` messages are not supported (system, user, assistant)"),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content[{j}]"),
                                    "unsupported_content",
                                    "only text content parts are supported",
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage::new(role, &content))
        })
        .collect()
}

fn token_bytes(t: &str) -> Vec<u8> {
    t.as_bytes().to_vec()
}

fn chat_logprob(lp: &TokenLogprob) -> TokenLogprobEntry {
    TokenLogprobEntry {
        token: lp.token.clone(),
        logprob: lp.logprob,
        bytes: token_bytes(&lp.token),
        top_logprobs: lp
            .top
            .iter()
            .map(|t| TopTokenLogprob {
                token: t.token.clone(),
                logprob: t.logprob,
                bytes: token_bytes(&t.token),
            })
            .collect(),
    }
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Timeout | FinishReason::Shutdown => "length",
    }
}

fn check_n(n: Option<u64>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(ApiError::invalid(
            "n",
            "unsupported_n",
            format!("n = {n} is not supported; only n = 1"),
        )),
    }
}

fn temperature(t: Option<f64>) -> Result<Option<f64>, ApiError> {
    match t {
        Some(x) if !(0.0..=2.0).contains(&x) => Err(ApiError::invalid(
            "temperature",
            "invalid_temperature",
            "must be between 0 and 2",
        )),
        // OpenAI's default temperature is 1.
        None => Ok(Some(1.0)),
        t => Ok(t),
    }
}

/// What a streamed OpenAI response needs to know.
struct StreamSpec {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    include_usage: bool,
    chat: bool,
}

impl StreamSpec {
    fn chunk(&self, choices: serde_json::Value, usage: Option<serde_json::Value>) -> Event {
        let mut v = serde_json::json!({
            "id": self.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Event::default().data(v.to_string())
    }

    fn delta(&self, text: &str, logprob: Option<&TokenLogprob>, finish: Option<&str>) -> Event {
        let choice = if self.chat {
            let delta = if text.is_empty() {
                serde_json::json!({})
            } else {
                serde_json::json!({"content": text})
            };
            serde_json::json!({
                "index": 0, "delta": delta,
                "logprobs": logprob.map(|lp| serde_json::json!({"content": [chat_logprob(lp)]})),
                "finish_reason": finish,
            })
        } else {
            serde_json::json!({
                "index": 0, "text": text,
                "logprobs": logprob.map(|lp| serde_json::json!({
                    "tokens": [lp.token], "token_logprobs": [lp.logprob],
                    "top_logprobs": [top_map(lp)], "text_offset": [0],
                })),
                "finish_reason": finish,
            })
        };
        self.chunk(serde_json::json!([choice]), None)
    }
}

fn top_map(lp: &TokenLogprob) -> serde_json::Map<String, serde_json::Value> {
    lp.top
        .iter()
        .map(|t| (t.token.clone(), logprob_json(t.logprob)))
        .collect()
}

/// A log-probability as JSON, written as its `f32` is everywhere else (`-0.33782566`, not
/// `-0.3378256559371948`), so a client comparing a token's log-probability with the same
/// value in `top_logprobs` finds them equal.
fn logprob_json(x: f32) -> serde_json::Value {
    serde_json::Number::from_f64(compact::shortest_f64(x))
        .map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn openai_stream(
    spec: StreamSpec,
    rx: mpsc::UnboundedReceiver<GenerationEvent>,
    keep_alive: Duration,
) -> Response {
    let spec = Arc::new(spec);
    let first = if spec.chat {
        let choice = serde_json::json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
        vec![spec.chunk(choice, None)]
    } else {
        Vec::new()
    };
    let s2 = spec.clone();
    let body = UnboundedReceiverStream::new(rx).flat_map(move |ev| {
        let spec = &s2;
        let events: Vec<Event> = match ev {
            GenerationEvent::Token(t) => {
                if t.text.is_empty() && t.logprob.is_none() {
                    Vec::new()
                } else {
                    vec![spec.delta(&t.text, t.logprob.as_ref(), None)]
                }
            }
            GenerationEvent::Done(f) => {
                let mut out = Vec::new();
                if !f.tail.is_empty() {
                    out.push(spec.delta(&f.tail, None, None));
                }
                out.push(spec.delta("", None, Some(finish_reason(f.reason))));
                if spec.include_usage {
                    let usage = serde_json::json!({
                        "prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                        "total_tokens": f.prompt_tokens + f.completion_tokens,
                    });
                    out.push(spec.chunk(serde_json::json!([]), Some(usage)));
                }
                out
            }
            GenerationEvent::Error(e) => {
                vec![Event::default().data(ApiError::internal("generation", e).to_json())]
            }
        };
        futures_util::stream::iter(events)
    });
    let done = futures_util::stream::once(async { Event::default().data("[DONE]") });
    let stream = futures_util::stream::iter(first)
        .chain(body)
        .chain(done)
        .map(Ok::<_, Infallible>);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(keep_alive))
        .into_response()
}

/// Validated common parts of both endpoints.
struct Prepared {
    settings: GenerationSettings,
    plan: Option<Arc<SteeringPlan>>,
    applied: Vec<AppliedIntervention>,
}

async fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    prompt: Vec<u32>,
    raw: &RawSettings<'_>,
    steering: Option<Vec<InterventionSpec>>,
) -> Result<Prepared, ApiError> {
    let settings = validate_settings(state, prompt, raw)?;
    let plan = state.steering_plan(steering.as_deref(), headers).await?;
    let applied = plan.as_ref().map(|p| p.applied()).unwrap_or_default();
    Ok(Prepared {
        settings,
        plan,
        applied,
    })
}

/// How a response is delivered.
struct Streaming {
    stream: bool,
    include_usage: bool,
    chat: bool,
}

impl Streaming {
    fn new(stream: Option<bool>, options: Option<StreamOptions>, chat: bool) -> Self {
        Self {
            stream: stream.unwrap_or(false),
            include_usage: options.and_then(|o| o.include_usage).unwrap_or(false),
            chat,
        }
    }
}

/// A generation to answer in one response: its settings and plan, and its events.
struct Collected {
    p: Prepared,
    rx: mpsc::UnboundedReceiver<GenerationEvent>,
    id: String,
    created: u64,
}

/// A started generation: already a streamed response, or events to collect into one.
enum Launched {
    Streamed(Response),
    Collect(Collected),
}

/// Validates, admits the request to the engine, and for `stream: true` answers with SSE.
async fn launch(
    state: &AppState,
    headers: &HeaderMap,
    prompt: Vec<u32>,
    raw: &RawSettings<'_>,
    steering: Option<Vec<InterventionSpec>>,
    how: Streaming,
) -> Result<Launched, ApiError> {
    let p = prepare(state, headers, prompt, raw, steering).await?;
    let rx = start(state, &p.settings, p.plan.clone(), &request_id(headers))?;
    let id = new_id(if how.chat { "chatcmpl" } else { "cmpl" });
    let created = now();
    if !how.stream {
        return Ok(Launched::Collect(Collected { p, rx, id, created }));
    }
    let spec = StreamSpec {
        id,
        created,
        model: state.engine.model.id.clone(),
        fingerprint: fingerprint(state),
        include_usage: how.include_usage,
        chat: how.chat,
    };
    let keep = Duration::from_secs(state.config.server.sse_keep_alive_secs.max(1));
    Ok(Launched::Streamed(with_applied(
        openai_stream(spec, rx, keep),
        &p.applied,
    )))
}

/// Chat completion (OpenAI format), optionally steered.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    request_body = ChatCompletionRequest,
    params(("X-Steering" = Option<String>, Header, description = "Steering as a JSON list or the compact form (docs/steering.md); the body's `steering` wins")),
    responses(
        (status = 200, description = "The completion, or with `stream: true` SSE `chat.completion.chunk` events ending `data: [DONE]`; header `X-Steering-Applied` echoes the plan", body = ChatCompletion),
        (status = 400, description = "Invalid parameter, bad `X-Steering` header, or wrong types (OpenAI error envelope)", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiJson(req): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, OpenAiError> {
    check_model(&state, req.model.as_deref())?;
    check_n(req.n)?;
    if req
        .tools
        .as_ref()
        .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()))
    {
        return Err(ApiError::invalid(
            "tools",
            "unsupported_tools",
            "tool calling is not supported",
        )
        .into());
    }
    let msgs = messages(&req.messages)?;
    let prompt = encode_input(&state, None, Some(&msgs))?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), k) => Some(k.unwrap_or(0)),
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "invalid_logprobs",
                "needs `logprobs: true`",
            )
            .into())
        }
        _ => None,
    };
    let raw = RawSettings {
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: temperature(req.temperature)?,
        top_p: req.top_p,
        top_k: None,
        seed: req.seed,
        stop: req.stop.as_ref(),
        logprobs,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
    };
    let how = Streaming::new(req.stream, req.stream_options, true);
    let Collected { p, rx, id, created } =
        match launch(&state, &headers, prompt, &raw, req.steering, how).await? {
            Launched::Streamed(resp) => return Ok(resp),
            Launched::Collect(c) => c,
        };
    let (text, reason, usage, lps, fired) = collect_openai(rx).await?;
    let resp = Json(ChatCompletion {
        id,
        object: "chat.completion".into(),
        created,
        model: state.engine.model.id.clone(),
        system_fingerprint: fingerprint(&state),
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".into(),
                content: text,
            },
            logprobs: p.settings.logprobs.map(|_| ChoiceLogprobs {
                content: lps.iter().map(chat_logprob).collect(),
            }),
            finish_reason: reason.into(),
        }],
        usage,
        steering: p.applied.clone(),
    })
    .into_response();
    Ok(with_fired(with_applied(resp, &p.applied), &[fired]))
}

/// A finished OpenAI generation: text, finish reason, usage, log-probabilities and what its
/// conditions did.
pub(super) type Collected5 = (
    String,
    &'static str,
    OpenAiUsage,
    Vec<TokenLogprob>,
    Vec<ConditionReport>,
);

async fn collect_openai(
    mut rx: mpsc::UnboundedReceiver<GenerationEvent>,
) -> Result<Collected5, ApiError> {
    let mut lps = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenerationEvent::Token(t) => lps.extend(t.logprob),
            GenerationEvent::Done(f) => {
                let usage = OpenAiUsage {
                    prompt_tokens: f.prompt_tokens,
                    completion_tokens: f.completion_tokens,
                    total_tokens: f.prompt_tokens + f.completion_tokens,
                };
                return Ok((f.text, finish_reason(f.reason), usage, lps, f.conditions));
            }
            GenerationEvent::Error(e) => return Err(ApiError::internal("generation", e)),
        }
    }
    Err(ApiError::internal(
        "generation",
        "the engine dropped the request",
    ))
}

fn card(state: &AppState) -> ModelCard {
    let started = now().saturating_sub(state.started.elapsed().as_secs());
    ModelCard {
        id: state.engine.model.id.clone(),
        object: "model".into(),
        created: started,
        owned_by: "tiller".into(),
    }
}

/// The served model (OpenAI format).
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, description = "The one model this server serves", body = ModelList)))]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![card(&state)],
    })
}

/// One model (OpenAI format).
#[utoipa::path(get, path = "/v1/models/{model}", tag = "openai",
    params(("model" = String, Path, description = "Model id")),
    responses(
        (status = 200, description = "The model", body = ModelCard),
        (status = 404, description = "Unknown model", body = ErrorBody)))]
pub async fn get_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, OpenAiError> {
    check_model(&state, Some(&model))?;
    Ok(Json(card(&state)))
}
