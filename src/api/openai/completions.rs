//! `POST /v1/completions`, OpenAI's legacy text completions, as evaluation harnesses use it:
//! `prompt` may be a string, a list of strings, a list of token ids or a list of such lists
//! (one choice per prompt, `index` set), and `echo` returns the prompt before the completion,
//! with its tokens' log-probabilities under `logprobs` (the first `null`), so `max_tokens: 0`
//! scores a text. lm-evaluation-harness (`local-completions`) computes log-likelihoods this way:
//! `{prompt: [[ids…]], max_tokens: 1, logprobs: 1, echo: true}`, reading `token_logprobs` and
//! `top_logprobs` from the context length on. The prompt is scored in prefill-sized engine
//! jobs with the request's steering applied, exactly as generation would see it.

use super::wire::{Completion, CompletionChoice, CompletionLogprobs, CompletionRequest};
use super::*;
use crate::engine::ScoredToken;
use crate::model::hooks::NoHooks;

/// One prompt of a request: its tokens, and its text as echoed.
struct PromptInput {
    ids: Vec<u32>,
    text: String,
}

/// The prompts of `prompt`, tokenized (text) or checked against the vocabulary (token ids).
fn prompts(
    state: &AppState,
    prompt: Option<&serde_json::Value>,
) -> Result<Vec<PromptInput>, ApiError> {
    use serde_json::Value;
    let bad = |field: &str, what: &str| ApiError::invalid(field, "invalid_prompt", what);
    let shape = "give `prompt` as a string, a list of strings, a list of token ids, or a list of token-id lists";
    let model = &state.engine.model;
    let vocab = model.dims().vocab_size;
    let ids_of = |field: &str, items: &[Value]| -> Result<PromptInput, ApiError> {
        let ids = items
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&id| (id as u128) < vocab as u128)
                    .map(|id| id as u32)
                    .ok_or_else(|| {
                        bad(
                            field,
                            &format!("token ids must be integers from 0 to {}", vocab - 1),
                        )
                    })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let text = model.tokenizer.decode(&ids).unwrap_or_default();
        Ok(PromptInput { ids, text })
    };
    let text_of = |s: &str| -> Result<PromptInput, ApiError> {
        Ok(PromptInput {
            ids: encode_input(state, Some(s), None)?,
            text: s.to_string(),
        })
    };
    let max = state.config.limits.max_prompts_per_request;
    if let Some(Value::Array(items)) = prompt {
        let several = items.first().is_some_and(|i| !i.is_number());
        if several && items.len() > max {
            return Err(bad(
                "prompt",
                &format!(
                    "{} prompts given; at most {max} per request (limits.max_prompts_per_request)",
                    items.len()
                ),
            ));
        }
    }
    let list = match prompt {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("prompt", "missing_input", shape))
        }
        Some(Value::String(s)) => vec![text_of(s)?],
        Some(Value::Array(items)) if items.iter().all(Value::is_number) && !items.is_empty() => {
            vec![ids_of("prompt", items)?]
        }
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => text_of(s),
                Value::Array(ids) if !ids.is_empty() => ids_of(&format!("prompt[{i}]"), ids),
                _ => Err(bad(&format!("prompt[{i}]"), shape)),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("prompt", shape)),
    };
    for (i, p) in list.iter().enumerate() {
        if p.ids.is_empty() {
            return Err(bad(&format!("prompt[{i}]"), "the prompt has no tokens"));
        }
        super::super::inspect::check_prompt_len(state, "prompt", p.ids.len())?;
    }
    Ok(list)
}

/// Text completion (legacy OpenAI format), optionally steered.
#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    request_body = CompletionRequest,
    params(("X-Steering" = Option<String>, Header, description = "Steering as a JSON list or the compact form (docs/steering.md); the body's `steering` wins")),
    responses(
        (status = 200, description = "One choice per prompt, or with `stream: true` SSE `text_completion` chunks ending `data: [DONE]`; header `X-Steering-Applied` echoes the plan", body = Completion),
        (status = 400, description = "Invalid parameter or bad `X-Steering` header", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody)))]
pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiJson(req): OpenAiJson<CompletionRequest>,
) -> Result<Response, OpenAiError> {
    check_model(&state, req.model.as_deref())?;
    check_n(req.n)?;
    let echo = req.echo.unwrap_or(false);
    let inputs = prompts(&state, req.prompt.as_ref())?;
    let stream = req.stream.unwrap_or(false);
    if stream && (echo || inputs.len() > 1) {
        let field = if echo { "echo" } else { "prompt" };
        return Err(ApiError::invalid(
            field,
            "unsupported_stream",
            "`stream` takes one prompt and no `echo`",
        )
        .into());
    }
    let max_tokens = req.max_tokens.unwrap_or(16);
    let raw = RawSettings {
        max_tokens: Some(max_tokens),
        temperature: temperature(req.temperature)?,
        top_p: req.top_p,
        top_k: None,
        seed: req.seed,
        stop: req.stop.as_ref(),
        logprobs: req.logprobs,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
    };
    if stream {
        let ids = inputs.into_iter().next().map(|p| p.ids).unwrap_or_default();
        let how = Streaming::new(req.stream, req.stream_options, false);
        if let Launched::Streamed(resp) =
            launch(&state, &headers, ids, &raw, req.steering, how).await?
        {
            return Ok(resp);
        }
        return Err(ApiError::internal("streaming", "the stream did not start").into());
    }
    let plan = state
        .steering_plan(req.steering.as_deref(), &headers)
        .await?;
    let applied = plan.as_ref().map(|p| p.applied()).unwrap_or_default();
    let top = if echo {
        logprobs_param(&state.config.limits, req.logprobs)?
    } else {
        None
    };
    // Every generation is admitted first, so the engine batches them.
    let rid = request_id(&headers);
    let mut running = Vec::with_capacity(inputs.len());
    for p in &inputs {
        running.push(if echo && max_tokens == 0 {
            None
        } else {
            let settings = validate_settings(&state, p.ids.clone(), &raw)?;
            let rx = start(&state, &settings, plan.clone(), &rid)?;
            Some((settings.logprobs, rx))
        });
    }
    let mut choices = Vec::with_capacity(inputs.len());
    let mut fired = Vec::with_capacity(inputs.len());
    let mut usage = OpenAiUsage {
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
    };
    for (index, (p, gen)) in inputs.iter().zip(running).enumerate() {
        let scored = match top {
            Some(n) => Some(score_prompt(&state, &p.ids, plan.clone(), n).await?),
            None => None,
        };
        let (text, reason, lps, wants_logprobs) = match gen {
            Some((wants, rx)) => {
                let (text, reason, u, lps, conditions) = collect_openai(rx).await?;
                usage.completion_tokens += u.completion_tokens;
                fired.push(conditions);
                (text, reason, lps, wants.is_some())
            }
            None => (String::new(), "length", Vec::new(), req.logprobs.is_some()),
        };
        usage.prompt_tokens += p.ids.len();
        let echoed = echo.then_some((p, scored.as_deref()));
        let logprobs = wants_logprobs.then(|| choice_logprobs(&state, echoed, &lps));
        choices.push(CompletionChoice {
            text: if echo {
                format!("{}{text}", p.text)
            } else {
                text
            },
            index,
            logprobs,
            finish_reason: reason.into(),
        });
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    let resp = Json(Completion {
        id: new_id("cmpl"),
        object: "text_completion".into(),
        created: now(),
        model: state.engine.model.id.clone(),
        system_fingerprint: fingerprint(&state),
        choices,
        usage,
        steering: applied.clone(),
    })
    .into_response();
    Ok(with_fired(with_applied(resp, &applied), &fired))
}

/// Every prompt token's log-probability after the ones before it (steered as generation
/// would be), with the `top` likeliest tokens there.
async fn score_prompt(
    state: &AppState,
    ids: &[u32],
    plan: Option<Arc<SteeringPlan>>,
    top: usize,
) -> Result<Vec<ScoredToken>, ApiError> {
    let what = "scoring the prompt";
    let done = super::super::inspect::run_pass(state, ids, plan, NoHooks, Some(top), what);
    Ok(done.await?.scored)
}

/// The legacy `logprobs` object: the echoed prompt's tokens (the first without a
/// log-probability), then the generated ones, with character offsets into the choice's text.
fn choice_logprobs(
    state: &AppState,
    echoed: Option<(&PromptInput, Option<&[ScoredToken]>)>,
    generated: &[TokenLogprob],
) -> CompletionLogprobs {
    let tok = &state.engine.model.tokenizer;
    let mut out = CompletionLogprobs {
        tokens: Vec::new(),
        token_logprobs: Vec::new(),
        top_logprobs: Vec::new(),
        text_offset: Vec::new(),
    };
    let push = |out: &mut CompletionLogprobs, offset: usize, token: String, lp, top| {
        out.text_offset.push(offset);
        out.tokens.push(token);
        out.token_logprobs.push(lp);
        out.top_logprobs.push(top);
    };
    let mut offset = 0;
    if let Some((p, scored)) = echoed {
        for (i, &id) in p.ids.iter().enumerate() {
            let at = i.checked_sub(1).and_then(|j| scored?.get(j));
            let top = at.map(|s| {
                let mut m: serde_json::Map<String, serde_json::Value> = s
                    .top
                    .iter()
                    .map(|&(t, lp)| (tok.token_text(t), logprob_json(lp)))
                    .collect();
                m.entry(tok.token_text(id))
                    .or_insert_with(|| logprob_json(s.logprob));
                m
            });
            push(
                &mut out,
                offset,
                tok.token_text(id),
                at.map(|s| s.logprob),
                top,
            );
            // What the token adds to the echoed text (nothing for a special token like BOS).
            offset += tok.decode(&[id]).map_or(0, |t| t.chars().count());
        }
        // The generated text starts right after the prompt as the choice spells it.
        offset = p.text.chars().count();
    }
    for lp in generated {
        push(
            &mut out,
            offset,
            lp.token.clone(),
            Some(lp.logprob),
            Some(top_map(lp)),
        );
        offset += lp.token.chars().count();
    }
    out
}
