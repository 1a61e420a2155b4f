//! Every feature on every architecture: a tiny random model of each (Llama, Qwen2, Gemma 2,
//! Gemma 3), from a GGUF file and from a Hugging Face folder, goes through generation (raw and
//! chat), the OpenAI routes with steering in the header and the body, extraction, the three
//! inspection routes, SAE training, loading and feature steering, and a concurrent batch of
//! differently steered requests that must equal the same requests run one at a time.
//! (The steering maths at every site of every architecture are in `steering.rs`, fidelity on
//! real weights in `fidelity.rs`.)

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::quantized::GgmlDType;
use common::*;
use serde_json::{json, Value};
use tiller::model::hooks::HookSite;
use tiller::model::Model;
use tiller::testing::{write_tiny_gguf, write_tiny_hf, TinyArch, TinySpec};
use tiller::AppState;

/// The Gemma turn template shipped for instruction-tuned Gemma files.
const GEMMA_TEMPLATE: &str = include_str!("../config/templates/gemma.jinja");

/// A state around a tiny model of `arch`; Gemma 3's GGUF (no template of its own) gets the
/// shipped Gemma template, as `model.chat_template` would give it.
fn state(arch: TinyArch, hf: bool) -> AppState {
    let dir = tempfile::tempdir().unwrap().keep();
    let spec = TinySpec::of(arch);
    let path = if hf {
        write_tiny_hf(&dir, &spec).unwrap()
    } else {
        write_tiny_gguf(&dir, &spec, GgmlDType::Q8_0).unwrap()
    };
    let mut model = Model::load(&path, Some("tiny"), &Default::default()).unwrap();
    if model.chat_template.is_none() {
        model.set_chat_template(GEMMA_TEMPLATE).unwrap();
    }
    tiller::server::build_state(test_config(None), model).unwrap()
}

fn every_model() -> Vec<(String, AppState)> {
    TinyArch::ALL
        .into_iter()
        .flat_map(|a| {
            [false, true].map(|hf| {
                let kind = if hf { "hf" } else { "gguf" };
                (format!("{a:?} {kind}"), state(a, hf))
            })
        })
        .collect()
}

/// The greedy tokens' ids and log-probabilities, from `logprobs` (special and partial-byte
/// tokens included, unlike `text`).
fn tokens(r: &Value) -> Vec<(u64, f64)> {
    r["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["top"][0]["id"].as_u64().unwrap(),
                t["logprob"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn chat(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

async fn ok(s: &AppState, path: &str, body: Value, name: &str) -> Value {
    let r = post_json(s, path, body).await;
    assert_eq!(r.status, StatusCode::OK, "{name} {path}: {}", r.text());
    r.json()
}

/// A random direction of norm `norm` stored as `dir` at every layer.
async fn store_direction(s: &AppState, norm: f32) {
    let d = s.engine.model.dims().clone();
    let v = tiller::testing::pseudo_random(d.d_model, 77, 1.0);
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let v: Vec<f32> = v.iter().map(|x| x * norm / n).collect();
    let layers: serde_json::Map<String, Value> =
        (0..d.n_layers).map(|l| (l.to_string(), json!(v))).collect();
    let r = call(
        s,
        Request::put("/vectors/dir")
            .body(Body::from(json!({ "layers": layers }).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
}

#[tokio::test]
async fn generation_and_the_openai_routes_steer_on_every_architecture() {
    for (name, s) in every_model() {
        store_direction(&s, 40.0).await;
        let layer = s.engine.model.dims().n_layers / 2;
        let body = |steering: Value| {
            json!({"prompt": "the theater", "max_tokens": 8, "ignore_eos": true, "logprobs": 1,
                   "steering": steering})
        };
        let plain = ok(&s, "/generate", body(json!([])), &name).await;
        assert_eq!(plain["usage"]["completion_tokens"], 8, "{name}");
        let steer = json!([{"vector": "dir", "layer": layer, "coefficient": 1.0}]);
        let steered = ok(&s, "/generate", body(steer.clone()), &name).await;
        assert_ne!(
            tokens(&plain),
            tokens(&steered),
            "{name}: steering changed nothing"
        );
        let c = ok(
            &s,
            "/generate",
            json!({"messages": chat("hi"), "max_tokens": 4, "compare": true, "steering": steer}),
            &name,
        )
        .await;
        assert!(c["baseline"]["text"].is_string(), "{name}");
        // OpenAI chat with the header, completions with the body field.
        let r = call(
            &s,
            Request::post("/v1/chat/completions")
                .header("x-steering", format!("dir:{layer}:1"))
                .body(Body::from(
                    json!({"model": "tiny", "messages": chat("hi"), "max_tokens": 4}).to_string(),
                ))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{name}: {}", r.text());
        assert!(
            r.headers["x-steering-applied"]
                .to_str()
                .unwrap()
                .contains("dir"),
            "{name}"
        );
        let greedy =
            json!({"prompt": "the theater", "max_tokens": 8, "temperature": 0, "steering": steer});
        let g = ok(&s, "/generate", greedy.clone(), &name).await;
        let mut v1 = greedy;
        v1["model"] = json!("tiny");
        let r = ok(&s, "/v1/completions", v1, &name).await;
        assert_eq!(
            r["choices"][0]["text"], g["text"],
            "{name}: /v1/completions and /generate differ"
        );
    }
}

#[tokio::test]
async fn extraction_and_inspection_work_on_every_architecture() {
    for (name, s) in every_model() {
        let n_layers = s.engine.model.dims().n_layers;
        let r = ok(
            &s,
            "/vectors/extract",
            json!({"name": "md", "method": "mean_diff", "positive": ["the theater", "in a theater"],
                   "negative": ["a cat sat", "dogs run far"], "position": "mean"}),
            &name,
        )
        .await;
        assert_eq!(r["layers"].as_array().unwrap().len(), n_layers, "{name}");
        let a = ok(
            &s,
            "/inspect/activations",
            json!({"prompt": "the theater in a tin", "layers": [0, n_layers - 1], "top_k": 3,
                   "project_onto": ["md"]}),
            &name,
        )
        .await;
        let tokens = a["tokens"].as_array().unwrap();
        assert!(!tokens.is_empty(), "{name}");
        assert_eq!(tokens[0]["layers"].as_array().unwrap().len(), 2, "{name}");
        let l = ok(
            &s,
            "/inspect/logprobs",
            json!({"prompt": "the theater", "targets": [" in"],
                   "steering": [{"vector": "md", "layer": 1, "coefficient": 4.0}]}),
            &name,
        )
        .await;
        let t = &l["targets"][0];
        assert_ne!(t["steered"]["logprob"], t["unsteered"]["logprob"], "{name}");
        let top = ok(
            &s,
            "/inspect/neurons/top",
            json!({"neuron": {"layer": 1, "index": 3}, "prompts": ["the theater", "a cat sat on a mat"], "top_n": 2}),
            &name,
        )
        .await;
        assert_eq!(
            top["contexts"].as_array().unwrap().len(),
            2,
            "{name}: {top}"
        );
    }
}

#[tokio::test]
async fn saes_train_load_and_steer_on_every_architecture() {
    use tiller::steering::sae_train::{collect_rows, train, TrainConfig};
    for (name, s) in every_model() {
        let model = &s.engine.model;
        let d = model.dims().d_model;
        let texts = [
            "the theater in a tin",
            "a bridge over the bay",
            "the fog in the bay",
            "over the tin",
        ];
        let seqs: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| model.encode_prompt(t).unwrap())
            .collect();
        let (rows, n) = collect_rows(model, &seqs, HookSite::ResidPost, 1, 64).unwrap();
        let cfg = TrainConfig {
            d_sae: 16,
            k: 3,
            epochs: 20,
            batch: 8,
            lr: 1e-2,
            seed: 1,
        };
        let hook = "blocks.1.hook_resid_post";
        let (sae, report) = train("t", hook, &rows, n, d, &cfg, |_, _, _| {}).unwrap();
        assert!(
            report.fvu < report.initial_fvu,
            "{name}: training did not lower the error"
        );
        let dir = scratch_dir().join("t");
        sae.save_dir(&dir, candle_core::DType::F32).unwrap();
        let mut files = Vec::new();
        for f in ["cfg.json", "sae_weights.safetensors"] {
            files.push((f, std::fs::read(dir.join(f)).unwrap()));
        }
        // Loaded over HTTP as a SAELens safetensors body with the hook named in the query.
        let r = call(
            &s,
            Request::put(format!("/saes/t?hook={hook}&architecture=topk&k=3"))
                .body(Body::from(files[1].1.clone()))
                .unwrap(),
        )
        .await;
        assert!(r.status.is_success(), "{name}: {}", r.text());
        let f = ok(
            &s,
            "/inspect/features",
            json!({"sae": "t", "prompt": "the theater", "top_k": 2}),
            &name,
        )
        .await;
        assert!(!f["tokens"].as_array().unwrap().is_empty(), "{name}");
        let l = ok(
            &s,
            "/inspect/logprobs",
            json!({"prompt": "the theater", "targets": [" in"],
                   "steering": [{"feature": {"sae": "t", "index": 0}, "coefficient": 30.0}]}),
            &name,
        )
        .await;
        let t = &l["targets"][0];
        assert_ne!(
            t["steered"]["logprob"], t["unsteered"]["logprob"],
            "{name}: feature steering changed nothing"
        );
    }
}

#[tokio::test]
async fn concurrent_requests_with_different_plans_match_their_solo_runs_on_every_architecture() {
    for (name, s) in every_model() {
        store_direction(&s, 25.0).await;
        let n = s.engine.model.dims().n_layers;
        let plans = [
            json!([]),
            json!([{"vector": "dir", "layer": 1, "coefficient": 1.0}]),
            json!([{"vector": "dir", "op": "ablate"}]),
            json!([{"neuron": {"layer": n - 1, "index": 5}, "op": "scale", "coefficient": 8.0}]),
            json!([{"vector": "dir", "layer": 0, "site": "mlp_out", "coefficient": 2.0, "positions": "generated"}]),
            json!([{"vector": "dir", "layer": n - 1, "op": "clamp", "coefficient": 5.0}]),
        ];
        let prompts = ["the theater", "a cat sat", "over the bay"];
        let body = |i: usize| {
            json!({"prompt": prompts[i % 3], "max_tokens": 10, "ignore_eos": true, "logprobs": 1,
                   "steering": plans[i]})
        };
        let mut solo = Vec::new();
        for i in 0..plans.len() {
            solo.push(tokens(&ok(&s, "/generate", body(i), &name).await));
        }
        let together = futures_util::future::join_all(
            (0..plans.len()).map(|i| post_json(&s, "/generate", body(i))),
        )
        .await;
        for (i, r) in together.iter().enumerate() {
            assert_eq!(
                tokens(&r.json()),
                solo[i],
                "{name}: plan {i} changed in a batch"
            );
        }
    }
}
