//! The OpenAI-compatible endpoints on the tiny model: wire format, streaming, steering from
//! the body or the `X-Steering` header, and OpenAI's error envelope.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::{json, Value};
use tiller::AppState;

async fn post_with(s: &AppState, path: &str, body: Value, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::post(path).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    call(s, req.body(Body::from(body.to_string())).unwrap()).await
}

fn chat(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

#[tokio::test]
async fn models_list_and_lookup() {
    let s = tiny_state(test_config(None));
    let r = get(&s, "/v1/models").await.json();
    assert_eq!(r["object"], "list");
    assert_eq!(r["data"][0]["id"], "tiny");
    assert_eq!(r["data"][0]["object"], "model");
    assert!(r["data"][0]["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(get(&s, "/v1/models/tiny").await.status, StatusCode::OK);
    let r = get(&s, "/v1/models/gpt-4").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn chat_completion_wire_format() {
    let s = tiny_state(test_config(None));
    let r = post_with(
        &s,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
               "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 2, "unknown_field": {"ignored": true}}),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    assert!(b["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(b["object"], "chat.completion");
    assert_eq!(b["model"], "tiny");
    assert!(b["system_fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("fp_tiller_"));
    let c = &b["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant");
    assert!(c["finish_reason"] == "stop" || c["finish_reason"] == "length");
    let u = &b["usage"];
    assert_eq!(
        u["total_tokens"],
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    let lps = c["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lps.len() as u64, u["completion_tokens"].as_u64().unwrap());
    if let Some(first) = lps.first() {
        assert_eq!(first["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(
            first["bytes"].as_array().unwrap().len(),
            first["token"].as_str().unwrap().len()
        );
    }
    // The same request through /generate gives the same text (same prompt rendering).
    let g = post_json(&s, "/generate", json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], "max_tokens": 6})).await;
    assert_eq!(g.json()["text"], c["message"]["content"]);
    assert!(r.headers.get("x-steering-applied").is_none());
}

#[tokio::test]
async fn chat_streaming_sends_role_deltas_finish_usage_and_done() {
    let s = tiny_state(test_config(None));
    let body = json!({"model": "tiny", "messages": chat("hello there"), "max_tokens": 8, "seed": 3, "temperature": 0.9});
    let plain = post_with(&s, "/v1/chat/completions", body.clone(), &[])
        .await
        .json();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = post_with(&s, "/v1/chat/completions", streamed, &[]).await;
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(&r.text());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], plain["usage"]);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(
        finish["choices"][0]["finish_reason"],
        plain["choices"][0]["finish_reason"]
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        plain["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn completions_wire_format_and_streaming() {
    let s = tiny_state(test_config(None));
    let body = json!({"model": "tiny", "prompt": "the theater", "max_tokens": 5, "temperature": 0, "logprobs": 2});
    let r = post_with(&s, "/v1/completions", body.clone(), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    assert_eq!(b["object"], "text_completion");
    assert!(b["id"].as_str().unwrap().starts_with("cmpl-"));
    let lp = &b["choices"][0]["logprobs"];
    let n = b["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    assert_eq!(lp["text_offset"].as_array().unwrap().len(), n);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = sse_events(&post_with(&s, "/v1/completions", streamed, &[]).await.text());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, b["choices"][0]["text"].as_str().unwrap());
    // A prompt given as a one-element list is accepted; max_tokens defaults to 16.
    let r = post_with(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": ["the"], "temperature": 0}),
        &[],
    )
    .await
    .json();
    assert!(r["usage"]["completion_tokens"].as_u64().unwrap() <= 16);
}

#[tokio::test]
async fn steering_from_body_or_header_and_the_echo() {
    let s = tiny_state(test_config(None));
    let values: Vec<f32> = tiller::testing::pseudo_random(64, 8, 3.0);
    let body = json!({"layers": {"1": values}}).to_string();
    call(
        &s,
        Request::put("/vectors/push")
            .body(Body::from(body))
            .unwrap(),
    )
    .await;
    let base = json!({"model": "tiny", "messages": chat("hello"), "max_tokens": 10, "temperature": 1.0, "seed": 7});
    let plain = post_with(&s, "/v1/chat/completions", base.clone(), &[])
        .await
        .json()["choices"][0]["message"]["content"]
        .clone();
    let mut with_body = base.clone();
    with_body["steering"] = json!([{"vector": "push", "layer": 1, "coefficient": 4.0}]);
    let a = post_with(&s, "/v1/chat/completions", with_body.clone(), &[]).await;
    assert_eq!(a.headers["x-steering-applied"], "push:1:4");
    let a_text = a.json()["choices"][0]["message"]["content"].clone();
    assert_ne!(a_text, plain);
    // The compact header form gives the same plan and text.
    let b = post_with(
        &s,
        "/v1/chat/completions",
        base.clone(),
        &[("x-steering", "push:1:4")],
    )
    .await;
    assert_eq!(b.headers["x-steering-applied"], "push:1:4");
    assert_eq!(b.json()["choices"][0]["message"]["content"], a_text);
    // The JSON header form too.
    let c = post_with(
        &s,
        "/v1/chat/completions",
        base.clone(),
        &[(
            "x-steering",
            r#"[{"vector": "push", "layer": 1, "coefficient": 4}]"#,
        )],
    )
    .await;
    assert_eq!(c.json()["choices"][0]["message"]["content"], a_text);
    // The body wins over the header.
    let d = post_with(
        &s,
        "/v1/chat/completions",
        with_body,
        &[("x-steering", "push:0:-9")],
    )
    .await;
    assert_eq!(d.headers["x-steering-applied"], "push:1:4");
    // Ranges and several items.
    let e = post_with(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "the", "max_tokens": 3}),
        &[("x-steering", "push:0-2:1.5, push:*:0:ablate")],
    )
    .await;
    assert_eq!(e.status, StatusCode::OK, "{}", e.text());
    assert_eq!(
        e.headers["x-steering-applied"],
        "push:0-2:1.5,push:*:0:ablate"
    );
}

#[tokio::test]
async fn errors_use_openai_envelope_and_400() {
    let s = tiny_state(test_config(None));
    type Case<'a> = (Value, Vec<(&'a str, &'a str)>, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        (
            json!({"model": "gpt-4", "messages": chat("x")}),
            vec![],
            StatusCode::NOT_FOUND,
            "model_not_found",
        ),
        (
            json!({"messages": chat("x")}),
            vec![],
            StatusCode::BAD_REQUEST,
            "missing_model",
        ),
        (
            json!({"model": "tiny", "messages": chat("x"), "n": 2}),
            vec![],
            StatusCode::BAD_REQUEST,
            "unsupported_n",
        ),
        (
            json!({"model": "tiny", "messages": chat("x"), "max_tokens": "lots"}),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            json!({"model": "tiny", "messages": chat("x"), "temperature": 3}),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_temperature",
        ),
        (
            json!({"model": "tiny", "messages": chat("x"), "max_tokens": 100000000}),
            vec![],
            StatusCode::BAD_REQUEST,
            "max_tokens_too_large",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_role",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            vec![],
            StatusCode::BAD_REQUEST,
            "unsupported_content",
        ),
        (
            json!({"model": "tiny", "messages": chat("x"), "tools": [{"type": "function"}]}),
            vec![],
            StatusCode::BAD_REQUEST,
            "unsupported_tools",
        ),
        (
            json!({"model": "tiny", "messages": chat("x"), "steering": [{"vector": "nope", "layer": 1}]}),
            vec![],
            StatusCode::BAD_REQUEST,
            "unknown_vector",
        ),
        (
            json!({"model": "tiny", "messages": chat("x")}),
            vec![("x-steering", "nope:1")],
            StatusCode::BAD_REQUEST,
            "malformed_request",
        ),
        (
            json!({"model": "tiny", "messages": chat("x")}),
            vec![("x-steering", "[{\"vector\": 3}]")],
            StatusCode::BAD_REQUEST,
            "malformed_request",
        ),
        (
            json!({"model": "tiny", "messages": chat("x")}),
            vec![("x-steering", "nope:1:2")],
            StatusCode::BAD_REQUEST,
            "unknown_vector",
        ),
    ];
    for (body, headers, status, code) in cases {
        let r = post_with(&s, "/v1/chat/completions", body.clone(), &headers).await;
        assert_eq!(r.status, status, "{body} {headers:?}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["code"], code, "{body} {headers:?}: {}", r.text());
        assert_eq!(e["type"], "invalid_request_error");
        assert!(e["message"].as_str().unwrap().len() > 10);
    }
    // Parameters that would change the answer and are not implemented are refused by name;
    // their neutral values pass.
    for (key, value) in [
        ("logit_bias", json!({"42": 100})),
        ("response_format", json!({"type": "json_object"})),
        ("tool_choice", json!("required")),
        ("best_of", json!(3)),
    ] {
        let mut body = json!({"model": "tiny", "messages": chat("x"), "max_tokens": 2});
        body[key] = value;
        let r = post(&s, "/v1/chat/completions", body.to_string()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{key}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "unsupported_parameter", "{key}");
        assert_eq!(r.json()["error"]["param"], key);
    }
    let neutral = json!({"model": "tiny", "messages": chat("x"), "max_tokens": 2,
        "logit_bias": {}, "response_format": {"type": "text"}, "tool_choice": "none",
        "best_of": 1, "suffix": null});
    let r = post(&s, "/v1/chat/completions", neutral.to_string()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "x", "suffix": "end"}).to_string(),
    )
    .await;
    assert_eq!(r.json()["error"]["param"], "suffix", "{}", r.text());
    // Invalid parameters name themselves in `param`.
    let r = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": chat("x"), "max_tokens": 100_000_000}).to_string(),
    )
    .await;
    assert_eq!(r.json()["error"]["param"], "max_tokens", "{}", r.text());
    let r = post_with(
        &s,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": chat("x")}),
        &[("x-steering", "nope:1")],
    )
    .await;
    assert_eq!(r.json()["error"]["param"], "X-Steering");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("item 1 (`nope:1`)"));
    let r = post(&s, "/v1/chat/completions", "{not json").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    for (body, code, param) in [
        (
            json!({"prompt": "x", "echo": true, "stream": true}),
            "unsupported_stream",
            "echo",
        ),
        (
            json!({"prompt": ["a", "b"], "stream": true}),
            "unsupported_stream",
            "prompt",
        ),
        (
            json!({"prompt": "x", "max_tokens": 0}),
            "invalid_max_tokens",
            "max_tokens",
        ),
        (
            json!({"prompt": [[1, 2], [3, 1_000_000]]}),
            "invalid_prompt",
            "prompt[1]",
        ),
        (
            json!({"prompt": [[1, 2], []]}),
            "invalid_prompt",
            "prompt[1]",
        ),
        (json!({"prompt": [1, -2]}), "invalid_prompt", "prompt"),
        (json!({"prompt": [{"a": 1}]}), "invalid_prompt", "prompt[0]"),
        (json!({"prompt": []}), "invalid_prompt", "prompt"),
        (json!({"prompt": vec!["a"; 33]}), "invalid_prompt", "prompt"),
    ] {
        let mut body = body;
        body["model"] = json!("tiny");
        let r = post_with(&s, "/v1/completions", body.clone(), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], code, "{body}");
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
}

/// `echo` with `logprobs` scores the prompt the way lm-evaluation-harness reads it: one choice
/// per prompt (strings or token ids), the prompt's tokens first (the first without a
/// log-probability), each token's log-probability also in its `top_logprobs`, equal to
/// teacher-forced scoring, and changed by steering.
#[tokio::test]
async fn echo_scores_prompts_as_evaluation_harnesses_read_them() {
    let s = tiny_state(test_config(None));
    let tok = &s.engine.model.tokenizer;
    let context = tok.encode("the theater in", false).unwrap();
    let continuation = tok.encode(" a tin", false).unwrap();
    let whole: Vec<u32> = context.iter().chain(&continuation).copied().collect();
    let body = json!({"model": "tiny", "prompt": [whole, context], "temperature": 0,
        "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true});
    let r = post_with(&s, "/v1/completions", body.clone(), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    let choices = b["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(
        (choices[0]["index"].as_u64(), choices[1]["index"].as_u64()),
        (Some(0), Some(1))
    );
    let lp = &choices[0]["logprobs"];
    let lps = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(
        lps.len(),
        whole.len() + 1,
        "prompt tokens and the generated one"
    );
    assert!(lps[0].is_null() && lp["top_logprobs"][0].is_null());
    let text = choices[0]["text"].as_str().unwrap();
    assert!(text.starts_with(&tok.decode(&whole).unwrap()), "{text}");
    // Each token's value is also in its top_logprobs, written the same way.
    for (i, v) in lps.iter().enumerate().skip(1) {
        let top = lp["top_logprobs"][i].as_object().unwrap();
        let token = lp["tokens"][i].as_str().unwrap();
        assert_eq!(&top[token], v, "token {i}");
    }
    // The continuation's log-likelihood, read as lm-eval reads it, is what teacher forcing
    // gives after the context.
    let ctxlen = context.len();
    let summed: f64 = lps[ctxlen..lps.len() - 1]
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    let forced = post_json(&s, "/inspect/logprobs", json!({"prompt": tok.decode(&context).unwrap(), "targets": [tok.decode(&continuation).unwrap()]})).await.json();
    let expected = forced["targets"][0]["unsteered"]["logprob"]
        .as_f64()
        .unwrap();
    assert!((summed - expected).abs() < 1e-3, "{summed} vs {expected}");
    // max_tokens 0 scores only; a list of strings gives the same numbers as token ids.
    let scored = post_with(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "max_tokens": 0,
        "echo": true, "logprobs": 1, "prompt": [tok.decode(&whole).unwrap()]}),
        &[],
    )
    .await
    .json();
    let only = &scored["choices"][0]["logprobs"]["token_logprobs"];
    assert_eq!(only.as_array().unwrap().len(), whole.len());
    assert_eq!(only.as_array().unwrap()[..], lps[..whole.len()]);
    assert_eq!(scored["usage"]["completion_tokens"], 0);
    // Steering from the header changes the scores, and is echoed.
    let v = vec![0.5f64; s.engine.model.dims().d_model];
    let header =
        serde_json::to_string(&json!([{"values": v, "layer": 1, "coefficient": 4.0}])).unwrap();
    let steered = post_with(&s, "/v1/completions", body, &[("x-steering", &header)]).await;
    assert!(steered.headers.get("x-steering-applied").is_some());
    let steered = steered.json();
    assert_ne!(
        steered["choices"][0]["logprobs"]["token_logprobs"],
        lp["token_logprobs"]
    );
}

/// `X-Steering` is read the same way on every route that steers: on `/generate` and the
/// inspection routes it steers like the body's list, and a malformed header (or a JSON list
/// with text after it) is a 400 naming the header everywhere.
#[tokio::test]
async fn the_steering_header_is_one_input_on_every_route() {
    let s = tiny_state(test_config(None));
    let values: Vec<f64> = (0..64).map(|i| ((i % 7) as f64 - 3.0) * 0.5).collect();
    let list = json!([{"values": values, "layer": 1, "coefficient": 4.0}]);
    let header = list.to_string();
    let gen = json!({"prompt": "the", "max_tokens": 6, "temperature": 0, "ignore_eos": true});
    let mut with_body = gen.clone();
    with_body["steering"] = list.clone();
    let by_body = post_with(&s, "/generate", with_body, &[]).await;
    let by_header = post_with(&s, "/generate", gen.clone(), &[("x-steering", &header)]).await;
    let plain = post_with(&s, "/generate", gen.clone(), &[]).await;
    assert_eq!(by_header.status, StatusCode::OK, "{}", by_header.text());
    assert_eq!(by_header.json()["text"], by_body.json()["text"]);
    assert_ne!(by_header.json()["text"], plain.json()["text"]);
    assert_eq!(by_header.json()["steering"].as_array().unwrap().len(), 1);
    let logprobs = json!({"prompt": "the", "targets": [" a"]});
    let steered = post_with(
        &s,
        "/inspect/logprobs",
        logprobs.clone(),
        &[("x-steering", &header)],
    )
    .await;
    let unsteered = post_with(&s, "/inspect/logprobs", logprobs.clone(), &[]).await;
    assert_eq!(steered.status, StatusCode::OK, "{}", steered.text());
    assert_eq!(steered.json()["steering"].as_array().unwrap().len(), 1);
    assert_ne!(steered.json()["targets"], unsteered.json()["targets"]);
    let trailing = format!("{header} trailing");
    for bad in ["nope", "[{\"layer\": }]", trailing.as_str()] {
        for (path, body) in [
            ("/generate", gen.clone()),
            ("/inspect/logprobs", logprobs.clone()),
            (
                "/inspect/activations",
                json!({"prompt": "the", "layers": [1]}),
            ),
        ] {
            let r = post_with(&s, path, body, &[("x-steering", bad)]).await;
            assert_eq!(
                r.status,
                StatusCode::BAD_REQUEST,
                "{path} {bad}: {}",
                r.text()
            );
            assert_eq!(r.json()["error"]["param"], "X-Steering", "{path} {bad}");
        }
    }
}
