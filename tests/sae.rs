//! Sparse autoencoders on the tiny model: loading both file layouts (at start and over HTTP),
//! `/inspect/features` against the SAE maths applied by hand to the same forward pass, feature
//! `add` and `clamp` inside a real pass (clamping to a feature's own value is the identity and
//! keeps the error term), feature steering through /generate and the OpenAI header, top
//! contexts, and a training run that lowers the reconstruction error.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::{Device, Tensor};
use common::*;
use serde_json::{json, Value};
use std::path::Path;
use tiller::model::hooks::{BatchRows, HookSite, Hooks};
use tiller::model::PackedBatch;
use tiller::steering::intervention::BatchSteering;
use tiller::steering::sae::{Sae, SaeArchitecture, SaeParts};
use tiller::steering::spec::InterventionSpec;
use tiller::testing::pseudo_random;
use tiller::AppState;

const D: usize = 64;
const D_SAE: usize = 48;
const LAYER: usize = 1;
const HOOK: &str = "blocks.1.hook_resid_post";
const PROMPT: &str = "the theater in a tin of the bridge";

/// Random SAE weights for the tiny model's residual stream (bias chosen so about half the
/// features fire on a typical activation).
fn parts(seed: u32, d_in: usize, jumprelu: bool) -> SaeParts {
    SaeParts {
        w_enc: pseudo_random(d_in * D_SAE, seed, 0.3),
        w_dec: pseudo_random(D_SAE * d_in, seed + 1, 0.3),
        b_enc: pseudo_random(D_SAE, seed + 2, 0.1),
        b_dec: pseudo_random(d_in, seed + 3, 0.05),
        threshold: jumprelu.then(|| {
            pseudo_random(D_SAE, seed + 4, 0.2)
                .iter()
                .map(|t| t.abs())
                .collect()
        }),
        d_in,
        d_sae: D_SAE,
    }
}

fn tensors(p: &SaeParts) -> Vec<(&'static str, Tensor)> {
    let dev = &Device::Cpu;
    let mut t = vec![
        (
            "W_enc",
            Tensor::from_slice(&p.w_enc, (p.d_in, p.d_sae), dev).unwrap(),
        ),
        (
            "W_dec",
            Tensor::from_slice(&p.w_dec, (p.d_sae, p.d_in), dev).unwrap(),
        ),
        ("b_enc", Tensor::from_slice(&p.b_enc, p.d_sae, dev).unwrap()),
        ("b_dec", Tensor::from_slice(&p.b_dec, p.d_in, dev).unwrap()),
    ];
    if let Some(th) = &p.threshold {
        t.push(("threshold", Tensor::from_slice(th, p.d_sae, dev).unwrap()));
    }
    t
}

fn safetensors_bytes(p: &SaeParts) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let map: std::collections::HashMap<_, _> = tensors(p).into_iter().collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    std::fs::read(path).unwrap()
}

fn write_npz(p: &SaeParts, path: &Path) {
    let ts = tensors(p);
    let refs: Vec<(&str, &Tensor)> = ts.iter().map(|(n, t)| (*n, t)).collect();
    Tensor::write_npz(&refs, path).unwrap();
}

/// A SAELens folder (cfg.json + sae_weights.safetensors), with the hook nested under
/// `metadata` as newer SAELens versions write it.
fn write_saelens(dir: &Path, p: &SaeParts, hook: &str, arch: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = json!({"architecture": arch, "d_in": p.d_in, "d_sae": p.d_sae, "apply_b_dec_to_input": true,
        "metadata": {"hook_name": hook}});
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("sae_weights.safetensors"), safetensors_bytes(p)).unwrap();
}

/// A tiny-model state with `std` (standard) loaded at start from the SAE folder.
fn state_with_sae() -> AppState {
    let cfg = test_config(None);
    write_saelens(
        &cfg.saes.dir.join("std"),
        &parts(3, D, false),
        HOOK,
        "standard",
    );
    tiny_state(cfg)
}

/// Rows at `(site, layer)`, before and after the steering hooks, for one token sequence.
fn steered_rows(
    s: &AppState,
    tokens: &[u32],
    specs: Option<Value>,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    struct Watch<'a> {
        inner: BatchSteering<'a>,
        before: Vec<Vec<f32>>,
        after: Vec<Vec<f32>>,
    }
    impl Hooks for Watch<'_> {
        fn is_active(&self, site: HookSite, layer: usize) -> bool {
            site == HookSite::ResidPost && layer == LAYER
        }
        fn apply(
            &mut self,
            site: HookSite,
            layer: usize,
            x: &Tensor,
            rows: &BatchRows,
        ) -> candle_core::Result<Option<Tensor>> {
            self.before = x.to_vec2()?;
            let out = if self.inner.is_active(site, layer) {
                self.inner.apply(site, layer, x, rows)?
            } else {
                None
            };
            self.after = match &out {
                Some(t) => t.to_vec2()?,
                None => self.before.clone(),
            };
            Ok(out)
        }
    }
    let specs: Option<Vec<InterventionSpec>> = specs.map(|v| serde_json::from_value(v).unwrap());
    let plan = s
        .steering_plan_now(specs.as_deref(), &Default::default())
        .unwrap();
    let model = &s.engine.model;
    let mut w = Watch {
        inner: BatchSteering::new(model.dims().n_layers, vec![(plan.as_deref(), tokens.len())]),
        before: Vec::new(),
        after: Vec::new(),
    };
    let mut cache = model.new_cache();
    let mut b = PackedBatch::default();
    b.push(tokens, 0, false);
    model.forward(&b, &mut [&mut cache], &mut w).unwrap();
    (w.before, w.after)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[tokio::test]
async fn saes_load_at_start_and_over_http_in_both_layouts() {
    let s = state_with_sae();
    let r = get(&s, "/saes").await;
    assert_eq!(r.status, StatusCode::OK);
    let list = r.json();
    assert_eq!(list["saes"][0]["name"], "std");
    assert_eq!(list["saes"][0]["hook_name"], HOOK);
    assert_eq!(list["saes"][0]["layer"], LAYER);
    assert_eq!(list["saes"][0]["d_sae"], D_SAE);

    // Gemma Scope's params.npz as a file body: the threshold makes it JumpReLU.
    let gemma = parts(11, D, true);
    let npz = scratch_dir().join("params.npz");
    write_npz(&gemma, &npz);
    let r = call(
        &s,
        Request::put(format!("/saes/gs?hook={HOOK}"))
            .body(Body::from(std::fs::read(&npz).unwrap()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json()["architecture"], "jumprelu");
    // Gemma Scope encodes x·W_enc + b_enc: b_dec is not subtracted first.
    assert_eq!(r.json()["apply_b_dec_to_input"], false);
    // It encodes exactly as the same weights do in memory.
    let by_hand = Sae::new("x", gemma.clone(), SaeArchitecture::Jumprelu, false, HOOK).unwrap();
    let loaded = s.saes.get("gs").unwrap();
    let h = pseudo_random(D, 5, 2.0);
    assert_eq!(
        loaded.encode(&h, 1).unwrap(),
        by_hand.encode(&h, 1).unwrap()
    );
    // ... and is kept for the next start.
    assert!(s
        .config
        .saes
        .dir
        .join("gs/sae_weights.safetensors")
        .exists());

    // A Gemma Scope folder in saes.dir (params.npz + a cfg.json naming the hook), by path.
    let folder = s.config.saes.dir.join("scope/layer_1");
    std::fs::create_dir_all(&folder).unwrap();
    write_npz(&gemma, &folder.join("params.npz"));
    std::fs::write(
        folder.join("cfg.json"),
        json!({"hook_name": HOOK}).to_string(),
    )
    .unwrap();
    let r = call(
        &s,
        Request::put("/saes/scope1")
            .header("content-type", "application/json")
            .body(Body::from(json!({"path": "scope/layer_1"}).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(
        s.saes.get("scope1").unwrap().encode(&h, 1).unwrap(),
        by_hand.encode(&h, 1).unwrap()
    );

    // SAELens safetensors as a file body, TopK from the query.
    let body = safetensors_bytes(&parts(21, D, false));
    let r = call(
        &s,
        Request::put(format!("/saes/tk?hook={HOOK}&architecture=topk&k=4"))
            .body(Body::from(body))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json()["k"], 4);
    let f = s.saes.get("tk").unwrap().encode(&h, 1).unwrap();
    assert!(f.iter().filter(|v| **v > 0.0).count() <= 4);

    // A width that does not match the model's residual stream: 422, and nothing kept.
    let body = safetensors_bytes(&parts(31, D + 8, false));
    let r = call(
        &s,
        Request::put(format!("/saes/wide?hook={HOOK}"))
            .body(Body::from(body))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.error_code(), "dimension_mismatch");
    assert!(!s.config.saes.dir.join("wide").exists());
    assert!(s.saes.get("wide").is_none());

    // A layer the model does not have, a missing hook, garbage, a path escaping saes.dir.
    let body = safetensors_bytes(&parts(3, D, false));
    let r = call(
        &s,
        Request::put("/saes/deep?hook=blocks.9.hook_resid_post")
            .body(Body::from(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_layer")
    );
    let r = call(
        &s,
        Request::put("/saes/nohook").body(Body::from(body)).unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "missing_hook")
    );
    let r = call(
        &s,
        Request::put(format!("/saes/junk?hook={HOOK}"))
            .body(Body::from("not a tensor file"))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_sae")
    );
    let r = call(
        &s,
        Request::put("/saes/up")
            .header("content-type", "application/json")
            .body(Body::from(json!({"path": "../x"}).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_path")
    );
    // A JSON body that is not `{"path": ...}` says so (it is not taken for a file).
    let r = call(
        &s,
        Request::put("/saes/up")
            .header("content-type", "application/json")
            .body(Body::from(json!({"paht": "scope/layer_1"}).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"),
        "{}",
        r.text()
    );

    // An upload never writes into a folder of the user's, nor through a link (409), and a
    // path body cannot leave saes.dir through a link.
    let root = s.config.saes.dir.clone();
    std::fs::create_dir_all(root.join("mine")).unwrap();
    std::fs::write(root.join("mine/notes.txt"), "mine").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(folder.join("params.npz"), outside.path().join("params.npz")).unwrap();
    std::fs::copy(folder.join("cfg.json"), outside.path().join("cfg.json")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("linked")).unwrap();
    for name in ["mine", "linked"] {
        let body = safetensors_bytes(&parts(5, D, false));
        let r = call(
            &s,
            Request::put(format!("/saes/{name}?hook={HOOK}"))
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::CONFLICT, "folder_not_owned"),
            "{name}: {}",
            r.text()
        );
    }
    assert_eq!(
        std::fs::read_to_string(root.join("mine/notes.txt")).unwrap(),
        "mine"
    );
    let r = call(
        &s,
        Request::put("/saes/out")
            .header("content-type", "application/json")
            .body(Body::from(json!({"path": "linked"}).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_path"),
        "{}",
        r.text()
    );
    std::fs::remove_file(root.join("linked")).unwrap();
    std::fs::remove_dir_all(root.join("mine")).unwrap();
    // A copy of an uploaded SAE put there by hand (no marker) loads at start but is never
    // deleted with it.
    let by_hand = root.join("copied");
    std::fs::create_dir_all(&by_hand).unwrap();
    for f in ["cfg.json", "sae_weights.safetensors"] {
        std::fs::copy(root.join("tk").join(f), by_hand.join(f)).unwrap();
    }

    // A fresh state over the same folder loads what was uploaded.
    let again = tiny_state(s.config.clone());
    let mut names = again.saes.names();
    names.sort();
    assert_eq!(names, ["copied", "gs", "std", "tk"]);
    let r = call(
        &again,
        Request::delete("/saes/copied").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(by_hand.join("sae_weights.safetensors").exists());
    std::fs::remove_dir_all(&by_hand).unwrap();

    // Delete unloads and removes the folder.
    let r = call(&s, Request::delete("/saes/gs").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(!s.config.saes.dir.join("gs").exists());
    assert_eq!(get(&s, "/saes/gs").await.status, StatusCode::NOT_FOUND);
    // One loaded by path is unloaded, but its folder is the user's and stays.
    let r = call(
        &s,
        Request::delete("/saes/scope1").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(folder.join("params.npz").exists());
    assert!(s.saes.get("scope1").is_none());
}

#[tokio::test]
async fn inspect_features_matches_the_sae_applied_by_hand() {
    let s = state_with_sae();
    let sae = s.saes.get("std").unwrap();
    let tokens = s.engine.model.encode_prompt(PROMPT).unwrap();
    let (h, _) = steered_rows(&s, &tokens, None);
    let r = post_json(
        &s,
        "/inspect/features",
        json!({"prompt": PROMPT, "sae": "std", "top_k": 3}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    let toks = b["tokens"].as_array().unwrap();
    assert_eq!(toks.len(), tokens.len());
    let (mut l0, mut err, mut var) = (0.0, 0.0, 0.0);
    let n = tokens.len();
    let mean: Vec<f64> = (0..D)
        .map(|j| h[1..].iter().map(|r| r[j] as f64).sum::<f64>() / (n - 1) as f64)
        .collect();
    for (p, t) in toks.iter().enumerate() {
        // f = ReLU(W_encᵀ(h - b_dec) + b_enc), one feature at a time.
        let f: Vec<f32> = (0..D_SAE)
            .map(|i| sae.feature_activation(&h[p], i))
            .collect();
        let mut order: Vec<usize> = (0..D_SAE).filter(|i| f[*i] > 0.0).collect();
        order.sort_by(|a, b| f[*b].total_cmp(&f[*a]));
        let top = t["top"].as_array().unwrap();
        assert_eq!(top.len(), order.len().min(3));
        for (k, e) in top.iter().enumerate() {
            assert_eq!(e["index"], order[k], "position {p}");
            assert!((e["activation"].as_f64().unwrap() - f[order[k]] as f64).abs() < 1e-4);
        }
        assert_eq!(t["l0"], order.len());
        let recon = sae.decode(&f, 1).unwrap();
        let e: f64 = h[p]
            .iter()
            .zip(&recon)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum();
        let norm: f64 = h[p].iter().map(|a| (*a as f64).powi(2)).sum();
        assert!((t["relative_error"].as_f64().unwrap() - (e / norm).sqrt()).abs() < 1e-4);
        if p > 0 {
            l0 += order.len() as f64;
            err += e;
            var += h[p]
                .iter()
                .zip(&mean)
                .map(|(a, m)| (*a as f64 - m).powi(2))
                .sum::<f64>();
        }
    }
    assert!((b["l0"].as_f64().unwrap() - l0 / (n - 1) as f64).abs() < 1e-9);
    assert!((b["fvu"].as_f64().unwrap() - err / var).abs() < 1e-4);
    // One token has no variance to explain: null, not a perfect 0.
    let r = post_json(
        &s,
        "/inspect/features",
        json!({"prompt": "a", "sae": "std"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.json()["fvu"].is_null(), "{}", r.text());

    let r = post_json(
        &s,
        "/inspect/features",
        json!({"prompt": PROMPT, "sae": "nope"}),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "unknown_sae")
    );
    let r = post_json(
        &s,
        "/inspect/features",
        json!({"prompt": PROMPT, "sae": "std", "top_k": 1000}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
}

/// The feature active at the last token with the largest activation, and that activation.
fn strongest_last(s: &AppState, tokens: &[u32]) -> (usize, f32) {
    let sae = s.saes.get("std").unwrap();
    let (h, _) = steered_rows(s, tokens, None);
    let last = h.last().unwrap();
    (0..D_SAE)
        .map(|i| (i, sae.feature_activation(last, i)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap()
}

#[tokio::test]
async fn feature_clamp_keeps_the_error_term_and_add_adds_the_decoder_row() {
    let s = state_with_sae();
    let sae = s.saes.get("std").unwrap();
    let tokens = s.engine.model.encode_prompt(PROMPT).unwrap();
    let (index, value) = strongest_last(&s, &tokens);
    assert!(value > 0.0);
    let clamp = |c: f32| json!([{"feature": {"sae": "std", "index": index}, "op": "clamp", "coefficient": c, "positions": {"last": 1}}]);

    // Clamping to the feature's own value changes nothing.
    let (before, after) = steered_rows(&s, &tokens, Some(clamp(value)));
    for (b, a) in before.iter().zip(&after) {
        assert!(max_diff(b, a) < 1e-5, "{}", max_diff(b, a));
    }

    // Clamping to c: h' = x̂(f with f_i = c) + (h - x̂(f)), i.e. the SAE's error term is kept.
    for c in [0.0f32, 3.0 * value + 1.0] {
        let (before, after) = steered_rows(&s, &tokens, Some(clamp(c)));
        let h = before.last().unwrap();
        let f = sae.encode(h, 1).unwrap();
        let mut f_c = f.clone();
        f_c[index] = c;
        let (x_hat, x_hat_c) = (sae.decode(&f, 1).unwrap(), sae.decode(&f_c, 1).unwrap());
        let expected: Vec<f32> = (0..D).map(|j| x_hat_c[j] + (h[j] - x_hat[j])).collect();
        assert!(max_diff(after.last().unwrap(), &expected) < 1e-4, "c = {c}");
        // Earlier positions are untouched.
        assert!(max_diff(&before[0], &after[0]) == 0.0);
    }

    // add: every position moves by exactly c · W_dec[i].
    let (before, after) = steered_rows(
        &s,
        &tokens,
        Some(json!([{"feature": {"sae": "std", "index": index}, "coefficient": 8.0}])),
    );
    let row = sae.decoder_row(index);
    for (b, a) in before.iter().zip(&after) {
        let expected: Vec<f32> = b.iter().zip(row).map(|(x, d)| x + 8.0 * d).collect();
        assert!(max_diff(a, &expected) < 1e-4);
    }
}

#[tokio::test]
async fn feature_steering_in_generate_and_the_openai_endpoints() {
    let s = state_with_sae();
    let base = json!({"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let plain = post_json(&s, "/generate", base.clone()).await;
    assert_eq!(plain.status, StatusCode::OK, "{}", plain.text());
    let mut steered_req = base.clone();
    steered_req["steering"] = json!([{"feature": {"sae": "std", "index": 7}, "coefficient": 40.0}]);
    let steered = post_json(&s, "/generate", steered_req).await;
    assert_eq!(steered.status, StatusCode::OK, "{}", steered.text());
    let sb = steered.json();
    assert_ne!(
        sb["text"],
        plain.json()["text"],
        "a large feature addition changes the greedy text"
    );
    assert_eq!(sb["steering"][0]["feature"]["sae"], "std");
    assert_eq!(sb["steering"][0]["layers"], json!([LAYER]));

    // The header form on the OpenAI endpoint gives the same text as the native body.
    let chat = |steer: Option<&str>| {
        let mut req = Request::post("/v1/completions").header("content-type", "application/json");
        if let Some(h) = steer {
            req = req.header("x-steering", h);
        }
        req.body(Body::from(json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": true}).to_string()))
            .unwrap()
    };
    let r = call(&s, chat(Some("std#7:1:40"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["text"], sb["text"]);
    assert!(r.headers["x-steering-applied"]
        .to_str()
        .unwrap()
        .contains("std#7"));

    // Errors: unknown SAE, index out of range, a layer the SAE does not read, bad clamp.
    for (steer, code) in [
        (
            json!({"feature": {"sae": "nope", "index": 1}, "coefficient": 1.0}),
            "unknown_sae",
        ),
        (
            json!({"feature": {"sae": "std", "index": D_SAE}, "coefficient": 1.0}),
            "invalid_feature",
        ),
        (
            json!({"feature": {"sae": "std", "index": 1}, "coefficient": 1.0, "layer": 2}),
            "invalid_layer",
        ),
        (
            json!({"feature": {"sae": "std", "index": 1}, "op": "clamp"}),
            "missing_coefficient",
        ),
        (
            json!({"feature": {"sae": "std", "index": 1}, "op": "ablate", "coefficient": 1.0}),
            "invalid_op",
        ),
    ] {
        let mut req = base.clone();
        req["steering"] = json!([steer]);
        let r = post_json(&s, "/generate", req).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::UNPROCESSABLE_ENTITY, code.to_string()),
            "{}",
            r.text()
        );
    }
    let r = call(&s, chat(Some("std#999:1:4"))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

#[tokio::test]
async fn top_contexts_rank_tokens_by_the_feature() {
    let s = state_with_sae();
    let sae = s.saes.get("std").unwrap();
    let prompts = [
        "the bridge over the bay",
        "a tin theater",
        "in the fog the bridge stands",
    ];
    let tokens = s.engine.model.encode_prompt(prompts[0]).unwrap();
    let (index, _) = strongest_last(&s, &tokens);
    let r = post_json(
        &s,
        &format!("/saes/std/features/{index}/top"),
        json!({"prompts": prompts, "top_n": 4, "context": 2}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    let ctx = b["contexts"].as_array().unwrap();
    assert!(!ctx.is_empty() && ctx.len() <= 4);
    // The best context's value is the feature's activation at that token, and values fall.
    let best = &ctx[0];
    let p = best["prompt_index"].as_u64().unwrap() as usize;
    let toks = s.engine.model.encode_prompt(prompts[p]).unwrap();
    let (h, _) = steered_rows(&s, &toks, None);
    let pos = best["position"].as_u64().unwrap() as usize;
    let expected = sae.feature_activation(&h[pos], index);
    assert!((best["value"].as_f64().unwrap() - expected as f64).abs() < 1e-4);
    let values: Vec<f64> = ctx.iter().map(|c| c["value"].as_f64().unwrap()).collect();
    assert!(values.windows(2).all(|w| w[0] >= w[1]), "{values:?}");
    // No token of any prompt beats the best one.
    for text in prompts {
        let toks = s.engine.model.encode_prompt(text).unwrap();
        let (h, _) = steered_rows(&s, &toks, None);
        for row in &h[1..] {
            assert!(sae.feature_activation(row, index) <= expected + 1e-4);
        }
    }
    let r = post_json(
        &s,
        &format!("/saes/std/features/{D_SAE}/top"),
        json!({"prompts": prompts}),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_feature")
    );
    let r = post_json(&s, "/saes/none/features/1/top", json!({"prompts": prompts})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// With no prompts in the request, the top contexts come from `saes.corpus_dir/*.txt`; an
/// empty corpus is a clear 422, not an empty answer.
#[tokio::test]
async fn top_contexts_default_to_the_configured_corpus() {
    let mut cfg = test_config(None);
    write_saelens(
        &cfg.saes.dir.join("std"),
        &parts(3, D, false),
        HOOK,
        "standard",
    );
    let corpus = common::scratch_dir();
    cfg.saes.corpus_dir = corpus.clone();
    let s = tiny_state(cfg);
    let r = post_json(&s, "/saes/std/features/0/top", json!({})).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "no_prompts"),
        "{}",
        r.text()
    );
    let lines = ["the bridge over the bay", "", "a tin theater"];
    std::fs::write(corpus.join("a.txt"), lines.join("\n")).unwrap();
    std::fs::write(corpus.join("ignored.md"), "not a corpus file").unwrap();
    let tokens = s.engine.model.encode_prompt(lines[0]).unwrap();
    let (index, _) = strongest_last(&s, &tokens);
    let r = post_json(
        &s,
        &format!("/saes/std/features/{index}/top"),
        json!({"top_n": 100, "context": 1}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    let ctx = b["contexts"].as_array().unwrap();
    // Two texts (the blank line skipped, the .md file ignored), searched as given.
    let indices: std::collections::BTreeSet<u64> = ctx
        .iter()
        .map(|c| c["prompt_index"].as_u64().unwrap())
        .collect();
    assert!(indices.iter().all(|&i| i < 2), "{indices:?}");
    assert!(indices.contains(&0), "{indices:?}");
}

#[test]
fn training_on_the_tiny_model_lowers_the_reconstruction_error_and_is_seeded() {
    use tiller::steering::sae_train::{collect_rows, train, TrainConfig};
    let s = state_with_sae();
    let model = &s.engine.model;
    let texts = [
        "the theater in a tin",
        "a bridge over the bay in the fog",
        "tin and theater and bridge",
        "the fog in the bay",
        "over the tin the theater stands",
        "in a bridge of tin",
    ];
    let seqs: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| model.encode_prompt(t).unwrap())
        .collect();
    let (rows, n) = collect_rows(model, &seqs, HookSite::ResidPost, LAYER, 64).unwrap();
    assert_eq!(n, seqs.iter().map(|s| s.len() - 1).sum::<usize>());
    assert_eq!(rows.len(), n * D);
    let cfg = TrainConfig {
        d_sae: 32,
        k: 4,
        epochs: 60,
        batch: 16,
        lr: 1e-2,
        seed: 7,
    };
    let (sae, report) = train("t", HOOK, &rows, n, D, &cfg, |_, _, _| {}).unwrap();
    // The same data and seed give the same SAE, bit for bit; another seed does not.
    let (again, again_report) = train("t", HOOK, &rows, n, D, &cfg, |_, _, _| {}).unwrap();
    let weights = |s: &Sae| -> (Vec<f32>, Vec<f32>) {
        let dec = (0..s.d_sae)
            .flat_map(|i| s.decoder_row(i).to_vec())
            .collect();
        (dec, s.encode(&rows, n).unwrap())
    };
    assert_eq!(weights(&again), weights(&sae));
    assert_eq!(again_report.loss_curve, report.loss_curve);
    let reseeded = TrainConfig {
        seed: 8,
        ..cfg.clone()
    };
    let (other, _) = train("t", HOOK, &rows, n, D, &reseeded, |_, _, _| {}).unwrap();
    assert_ne!(weights(&other), weights(&sae));
    assert!(
        report.fvu < 0.7 * report.initial_fvu,
        "fvu {} from {}",
        report.fvu,
        report.initial_fvu
    );
    assert!(report.l0 <= 4.0 + 1e-9);
    let first = report.loss_curve.first().unwrap().1;
    let last = report.loss_curve.last().unwrap().1;
    assert!(last < first, "loss {first} -> {last}");
    // The saved SAE reads raw activations: its FVU on the training rows matches the report's
    // order of magnitude, and it round-trips through the SAELens layout.
    let dir = scratch_dir().join("t");
    sae.save_dir(&dir, candle_core::DType::F32).unwrap();
    let back = Sae::load_dir("t", &dir).unwrap();
    assert_eq!(back.architecture, SaeArchitecture::Topk { k: 4 });
    assert_eq!(
        back.encode(&rows[..D], 1).unwrap(),
        sae.encode(&rows[..D], 1).unwrap()
    );
    // Same data, same seed: the same SAE.
    let (again, _) = train("t", HOOK, &rows, n, D, &cfg, |_, _, _| {}).unwrap();
    assert_eq!(again.decoder_row(3), sae.decoder_row(3));
}
