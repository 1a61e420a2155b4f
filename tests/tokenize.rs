//! `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info` on tiny models: vLLM's and
//! llama-server's field names, the same ids generation uses, errors that name the field.
//! (On real models the fixture of 200+ strings goes through these routes in `fidelity.rs`.)

mod common;

use axum::http::StatusCode;
use candle_core::quantized::GgmlDType;
use common::*;
use serde_json::json;
use tiller::model::Backend;
use tiller::testing::{TinyArch, TinySpec};

fn state_of(arch: TinyArch) -> tiller::AppState {
    let model = tiny_model(&TinySpec::of(arch), GgmlDType::Q8_0, Backend::CpuKernels);
    tiller::server::build_state(test_config(None), model).unwrap()
}

#[tokio::test]
async fn tokenize_speaks_vllm_and_llama_server() {
    let s = tiny_state(test_config(None));
    let text = "the theater<|im_end|> in a tin";
    let want = s.engine.model.tokenizer.encode(text, false).unwrap();
    // vLLM: {prompt, add_special_tokens} -> {count, max_model_len, tokens}.
    let r = post_json(
        &s,
        "/tokenize",
        json!({"prompt": text, "add_special_tokens": false}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    assert_eq!(b["tokens"], json!(want));
    assert_eq!(b["count"], want.len());
    assert_eq!(b["max_model_len"], 256);
    assert!(b.get("token_strs").is_none());
    // The special token's text became its id.
    assert!(want.contains(&2));
    // llama-server: {content, with_pieces} -> tokens as {id, piece}.
    let r = post_json(
        &s,
        "/tokenize",
        json!({"content": text, "with_pieces": true}),
    )
    .await;
    let pieces = r.json()["tokens"].as_array().unwrap().clone();
    let ids: Vec<u64> = pieces.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, want.iter().map(|&i| i as u64).collect::<Vec<_>>());
    let joined: String = pieces
        .iter()
        .map(|p| p["piece"].as_str().unwrap())
        .collect();
    assert_eq!(joined, text);
    let r = post_json(
        &s,
        "/tokenize",
        json!({"prompt": text, "return_token_strs": true}),
    )
    .await;
    assert_eq!(r.json()["token_strs"].as_array().unwrap().len(), want.len());
    // Chat: the ids generation prefills.
    let messages = json!([{"role": "user", "content": "Hi there"}]);
    let r = post_json(&s, "/tokenize", json!({"messages": messages})).await;
    let chat_ids: Vec<u32> = serde_json::from_value(r.json()["tokens"].clone()).unwrap();
    let msgs: Vec<tiller::model::chat::ChatMessage> = serde_json::from_value(messages).unwrap();
    assert_eq!(chat_ids, s.engine.model.encode_chat(&msgs).unwrap());
    // Detokenize answers in both shapes.
    let r = post_json(&s, "/detokenize", json!({"tokens": want})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["prompt"], "the theater in a tin");
    assert_eq!(r.json()["content"], "the theater in a tin");
}

#[tokio::test]
async fn bos_is_added_as_the_model_says_on_a_sentencepiece_model() {
    let s = state_of(TinyArch::Gemma3);
    let r = post_json(&s, "/tokenize", json!({"prompt": "the cat"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let ids = r.json()["tokens"].as_array().unwrap().clone();
    assert_eq!(ids[0], 2, "vLLM's default adds BOS on Gemma");
    let r = post_json(&s, "/tokenize", json!({"content": "the cat"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.json()["tokens"][0].is_u64());
    assert_ne!(r.json()["tokens"][0], 2, "llama-server's default does not");
    let r = post_json(
        &s,
        "/tokenize",
        json!({"prompt": "the cat", "add_special_tokens": false}),
    )
    .await;
    let plain: Vec<u32> = serde_json::from_value(r.json()["tokens"].clone()).unwrap();
    let tok = &s.engine.model.tokenizer;
    assert_eq!(plain, tok.encode("the cat", false).unwrap());
    assert_eq!(tok.token_text(plain[0]), "the");
    let info = get(&s, "/tokenizer_info").await.json();
    assert_eq!(info["tokenizer_class"], "llama");
    assert_eq!(info["bos_token"], "<bos>");
    assert_eq!(info["eos_token"], "<eos>");
    assert_eq!(info["pad_token"], "<pad>");
    assert_eq!(info["add_bos_token"], true);
    assert_eq!(info["chat_template"], serde_json::Value::Null);
    // lm-evaluation-harness finds the EOS id by tokenizing its text.
    let r = post_json(
        &s,
        "/tokenize",
        json!({"prompt": "<eos>", "add_special_tokens": false}),
    )
    .await;
    assert_eq!(r.json()["tokens"], json!([1]));
}

#[tokio::test]
async fn tokenizer_info_has_what_remote_tokenizers_read() {
    let s = tiny_state(test_config(None));
    let r = get(&s, "/tokenizer_info").await;
    assert_eq!(r.status, StatusCode::OK);
    let b = r.json();
    assert_eq!(b["bos_token"], "<|im_start|>");
    assert_eq!(b["eos_token"], "<|im_end|>");
    assert_eq!(b["tokenizer_class"], "gpt2");
    assert_eq!(b["model_max_length"], 256);
    assert!(b["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
}

#[tokio::test]
async fn tokenizer_errors_name_the_field() {
    let s = tiny_state(test_config(None));
    for (body, field, code) in [
        (json!({}), "prompt", "missing_input"),
        (
            json!({"prompt": "a", "content": "b"}),
            "prompt",
            "conflicting_input",
        ),
        (
            json!({"prompt": "a", "messages": []}),
            "prompt",
            "conflicting_input",
        ),
        (json!({"messages": []}), "messages", "empty_messages"),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
            "invalid_role",
        ),
        (json!({"prompt": 5}), "prompt", "invalid_field"),
        (json!({"prompt": "a", "extra": 1}), "extra", "invalid_field"),
    ] {
        let r = post_json(&s, "/tokenize", body.clone()).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), code, "{body}");
        assert!(r.text().contains(field), "{body}: {}", r.text());
    }
    let r = post_json(&s, "/tokenize", json!({"model": "other", "prompt": "a"})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "unknown_model");
    let r = post_json(&s, "/detokenize", json!({"tokens": [1, 99999]})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text().contains("tokens[1]"), "{}", r.text());
    let r = post(&s, "/detokenize", "{not json").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // A model without a chat template says how to give it one.
    let g = state_of(TinyArch::Gemma3);
    let r = post_json(
        &g,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.error_code(), "no_chat_template");
    assert!(r.text().contains("model.chat_template"), "{}", r.text());
    // The token limit.
    let mut cfg = test_config(None);
    cfg.limits.max_tokenize_tokens = 3;
    let small = tiny_state(cfg);
    let r = post_json(
        &small,
        "/tokenize",
        json!({"prompt": "the theater in a tin"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.text().contains("limits.max_tokenize_tokens"),
        "{}",
        r.text()
    );
}
