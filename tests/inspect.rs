//! The inspection endpoints on the tiny model, checked against values computed by hand from
//! the same forward pass.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{json, Value};
use tiller::model::hooks::{HookSite, NoHooks};
use tiller::model::PackedBatch;
use tiller::AppState;

const D: usize = 64;

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

async fn store_vector(s: &AppState, name: &str, layer: usize, v: &[f32]) {
    let body = json!({"layers": {layer.to_string(): v}}).to_string();
    let r = call(
        s,
        axum::http::Request::put(format!("/vectors/{name}"))
            .body(axum::body::Body::from(body))
            .unwrap(),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.text());
}

#[tokio::test]
async fn projections_norms_and_top_dimensions_match_the_residual_stream() {
    let s = tiny_state(test_config(None));
    let v = tiller::testing::pseudo_random(D, 21, 1.0);
    store_vector(&s, "probe", 1, &v).await;
    let prompt = "the theater in a tin";
    let tokens = s.engine.model.encode_prompt(prompt).unwrap();
    let r = post_json(
        &s,
        "/inspect/activations",
        json!({"prompt": prompt, "layers": [1], "top_k": 3, "project_onto": ["probe"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    assert_eq!(b["site"], "resid_post");
    let h = record(&s, &tokens, HookSite::ResidPost, 1);
    let toks = b["tokens"].as_array().unwrap();
    assert_eq!(toks.len(), tokens.len());
    let vn = dot(&v, &v).sqrt();
    for (p, t) in toks.iter().enumerate() {
        assert_eq!(t["id"], tokens[p]);
        let l = &t["layers"][0];
        assert_eq!(l["layer"], 1);
        let hn = dot(&h[p], &h[p]).sqrt();
        assert!((l["norm"].as_f64().unwrap() - hn).abs() < 1e-3 * hn);
        let pr = &l["projections"][0];
        let want = dot(&h[p], &v);
        assert!(
            (pr["dot"].as_f64().unwrap() - want).abs() < 1e-3 * (1.0 + want.abs()),
            "{pr} vs {want}"
        );
        assert!((pr["cosine"].as_f64().unwrap() - want / (vn * hn)).abs() < 1e-4);
        assert!((pr["scalar"].as_f64().unwrap() - want / vn).abs() < 1e-3);
        // Top dimensions by magnitude.
        let mut mags: Vec<(usize, f32)> = h[p].iter().map(|x| x.abs()).enumerate().collect();
        mags.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top: Vec<usize> = l["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["index"].as_u64().unwrap() as usize)
            .collect();
        assert_eq!(top, mags[..3].iter().map(|m| m.0).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn neurons_and_steering_inside_the_inspected_pass() {
    let s = tiny_state(test_config(None));
    let prompt = "a heather";
    let tokens = s.engine.model.encode_prompt(prompt).unwrap();
    let act = record(&s, &tokens, HookSite::MlpAct, 2);
    let r = post_json(
        &s,
        "/inspect/activations",
        json!({"prompt": prompt, "layers": [2], "site": "mlp_act", "top_k": 4,
        "neurons": [{"layer": 2, "index": 7}, {"layer": 0, "index": 95}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let act0 = record(&s, &tokens, HookSite::MlpAct, 0);
    for (p, t) in r.json()["tokens"].as_array().unwrap().iter().enumerate() {
        let top = t["layers"][0]["top"].as_array().unwrap();
        let mut vals: Vec<f32> = act[p].clone();
        vals.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(top[0]["value"].as_f64().unwrap() as f32, vals[0]);
        assert_eq!(top[3]["value"].as_f64().unwrap() as f32, vals[3]);
        assert_eq!(t["neurons"][0]["value"].as_f64().unwrap() as f32, act[p][7]);
        assert_eq!(
            t["neurons"][1]["value"].as_f64().unwrap() as f32,
            act0[p][95]
        );
    }
    // Steering applies during the pass: adding c·v at layer 1 moves the projection onto v by
    // exactly c·|v|² there.
    let v = tiller::testing::pseudo_random(D, 5, 1.0);
    store_vector(&s, "push", 1, &v).await;
    let ask = |steer: Value| json!({"prompt": prompt, "layers": [1], "project_onto": ["push"], "steering": steer});
    let plain = post_json(&s, "/inspect/activations", ask(json!([])))
        .await
        .json();
    let steered = post_json(
        &s,
        "/inspect/activations",
        ask(json!([{"vector": "push", "layer": 1, "coefficient": 2.0}])),
    )
    .await
    .json();
    assert_eq!(steered["steering"][0]["op"], "add");
    let vv = dot(&v, &v);
    for p in 0..tokens.len() {
        let a = plain["tokens"][p]["layers"][0]["projections"][0]["dot"]
            .as_f64()
            .unwrap();
        let b = steered["tokens"][p]["layers"][0]["projections"][0]["dot"]
            .as_f64()
            .unwrap();
        assert!(
            (b - a - 2.0 * vv).abs() < 1e-3 * (1.0 + vv),
            "{a} + 2|v|² != {b}"
        );
    }
}

#[tokio::test]
async fn logprobs_match_a_teacher_forced_pass_and_mean_ablation_to_its_own_value_is_identity() {
    let s = tiny_state(test_config(None));
    let prompt = "the theater";
    let model = s.engine.model.clone();
    let ptoks = model.encode_prompt(prompt).unwrap();
    let target = " in a tin";
    let ttoks = model.tokenizer.encode(target, false).unwrap();
    assert!(ttoks.len() > 1);
    // By hand: run prompt + target and read each target token's log-probability.
    let mut all = ptoks.clone();
    all.extend(&ttoks);
    let mut cache = model.new_cache();
    let mut b = PackedBatch::default();
    b.push_scored(&all, 0);
    let rows: Vec<Vec<f32>> = model
        .forward(&b, &mut [&mut cache], &mut NoHooks)
        .unwrap()
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut want = 0f64;
    for (k, &t) in ttoks.iter().enumerate() {
        let row = &rows[ptoks.len() - 1 + k];
        want += tiller::engine::sampling::log_softmax(row)[t as usize] as f64;
    }
    let r = post_json(
        &s,
        "/inspect/logprobs",
        json!({"prompt": prompt, "targets": [target, " the"], "top_k": 3}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    let got = b["targets"][0]["unsteered"]["logprob"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    assert!(b["targets"][0].get("steered").is_none());
    assert_eq!(b["top"]["unsteered"].as_array().unwrap().len(), 3);
    assert_eq!(
        b["targets"][0]["token_ids"].as_array().unwrap().len(),
        ttoks.len()
    );

    // Mean-ablation with means equal to the neuron's own value changes nothing (one token, so
    // the neuron has a single value).
    let one = model.encode_prompt("a").unwrap();
    assert_eq!(one.len(), 1);
    let act = record(&s, &one, HookSite::MlpAct, 1);
    let mut means = vec![0.0f32; 96];
    means[11] = act[0][11];
    let body = json!({"layers": {"1": means}, "kind": "neuron_means"}).to_string();
    let r = call(
        &s,
        axum::http::Request::put("/vectors/own")
            .body(axum::body::Body::from(body))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let ask = |means: &str| json!({"prompt": "a", "targets": [" the", "a"], "steering": [{"neuron": {"layer": 1, "index": 11}, "op": "mean", "means": means}]});
    let b = post_json(&s, "/inspect/logprobs", ask("own")).await.json();
    for t in b["targets"].as_array().unwrap() {
        assert_eq!(t["delta_logprob"].as_f64().unwrap(), 0.0, "{t}");
    }
    // While a different mean does change the distribution.
    let mut other = vec![0.0f32; 96];
    other[11] = act[0][11] + 5.0;
    let body = json!({"layers": {"1": other}, "kind": "neuron_means"}).to_string();
    call(
        &s,
        axum::http::Request::put("/vectors/other")
            .body(axum::body::Body::from(body))
            .unwrap(),
    )
    .await;
    let b = post_json(&s, "/inspect/logprobs", ask("other"))
        .await
        .json();
    assert!(b["targets"][0]["delta_logprob"].as_f64().unwrap() != 0.0);
}

#[tokio::test]
async fn top_contexts_rank_tokens_by_the_signal() {
    let s = tiny_state(test_config(None));
    let prompts = [
        "the theater in a tin",
        "a cat sat on the mat",
        "heather and the air",
    ];
    let r = post_json(
        &s,
        "/inspect/neurons/top",
        json!({"prompts": prompts, "neuron": {"layer": 2, "index": 3}, "top_n": 4, "context": 2}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    assert_eq!(b["signal"], "neuron 2:3");
    let ctx = b["contexts"].as_array().unwrap();
    assert_eq!(ctx.len(), 4);
    // The best value over all tokens but each prompt's first.
    let mut best = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let toks = s.engine.model.encode_prompt(p).unwrap();
        for (pos, row) in record(&s, &toks, HookSite::MlpAct, 2)
            .iter()
            .enumerate()
            .skip(1)
        {
            best.push((row[3], i, pos));
        }
    }
    best.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (c, want) in ctx.iter().zip(&best) {
        assert_eq!(c["value"].as_f64().unwrap() as f32, want.0);
        assert_eq!(c["prompt_index"], want.1);
        assert_eq!(c["position"], want.2);
    }
    let values: Vec<f64> = ctx.iter().map(|c| c["value"].as_f64().unwrap()).collect();
    assert!(values.windows(2).all(|w| w[0] >= w[1]));
}

#[tokio::test]
async fn inspection_errors_name_the_field() {
    let mut cfg = test_config(None);
    cfg.limits.max_prompt_tokens = 40;
    cfg.limits.max_inspect_values = 500;
    let s = tiny_state(cfg);
    let long = "the theater ".repeat(60);
    let neurons: Vec<_> = (0..90).map(|i| json!({"layer": 1, "index": i})).collect();
    let cases = [
        // Every request's work is bounded: the numbers an answer holds, and prompt tokens on
        // the top-context routes as everywhere.
        (
            "/inspect/activations",
            json!({"prompt": "the theater is", "layers": [0, 1], "neurons": neurons}),
            "too_much_output",
            "limits.max_inspect_values",
        ),
        (
            "/inspect/neurons/top",
            json!({"prompts": ["a", long], "neuron": {"layer": 0, "index": 0}}),
            "prompt_too_long",
            "`prompts[1]`",
        ),
        (
            "/inspect/activations",
            json!({"prompt": "a", "site": "nowhere"}),
            "invalid_field",
            "`site`",
        ),
        (
            "/inspect/activations",
            json!({"prompt": "a", "layers": [3]}),
            "invalid_layer",
            "`layers[0]`",
        ),
        (
            "/inspect/activations",
            json!({"prompt": "a", "top_k": 1000}),
            "invalid_top_k",
            "`top_k`",
        ),
        (
            "/inspect/activations",
            json!({"prompt": "a", "project_onto": ["nope"]}),
            "unknown_vector",
            "`project_onto[0]`",
        ),
        (
            "/inspect/activations",
            json!({"prompt": "a", "neurons": [{"layer": 0, "index": 96}]}),
            "invalid_neuron",
            "`neurons[0].index`",
        ),
        (
            "/inspect/activations",
            json!({"layers": [0]}),
            "missing_input",
            "`prompt`",
        ),
        (
            "/inspect/logprobs",
            json!({"prompt": "a", "targets": []}),
            "invalid_targets",
            "`targets`",
        ),
        (
            "/inspect/logprobs",
            json!({"prompt": "a", "targets": [""]}),
            "invalid_targets",
            "`targets[0]`",
        ),
        (
            "/inspect/logprobs",
            json!({"prompt": "a", "targets": ["b"], "steering": [{"vector": "x", "layer": 0}]}),
            "unknown_vector",
            "`steering[0].vector`",
        ),
        (
            "/inspect/neurons/top",
            json!({"prompts": ["a"]}),
            "missing_target",
            "`neuron`",
        ),
        (
            "/inspect/neurons/top",
            json!({"prompts": [], "neuron": {"layer": 0, "index": 0}}),
            "invalid_examples",
            "`prompts`",
        ),
        (
            "/inspect/neurons/top",
            json!({"prompts": ["a"], "neuron": {"layer": 9, "index": 0}}),
            "invalid_layer",
            "`neuron.layer`",
        ),
        (
            "/inspect/neurons/top",
            json!({"prompts": ["a"], "vector": "nope", "layer": 1}),
            "unknown_vector",
            "`vector`",
        ),
    ];
    for (path, body, code, field) in cases {
        let r = post_json(&s, path, body.clone()).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path} {body}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), code, "{path} {body}: {}", r.text());
        assert!(r.text().contains(field), "{path} {body}: {}", r.text());
    }
}

/// The logit lens at the last layer is the model's own next-token distribution, bit for bit,
/// steered or not; earlier layers differ; targets get their rank and probability; the bounds
/// are refused with the field named.
#[tokio::test]
async fn the_logit_lens_at_the_last_layer_is_the_models_own_distribution() {
    let mut cfg = test_config(None);
    cfg.engine.prefill_chunk = 3;
    let s = tiny_state(cfg);
    let n_layers = s.engine.model.dims().n_layers;
    let prompt = "the theater in a tin";
    let d = s.engine.model.dims().d_model;
    let steer = json!([{"values": vec![0.7; d], "layer": 1, "coefficient": 3.0}]);
    for steering in [json!(null), steer] {
        let own = post_json(
            &s,
            "/inspect/logprobs",
            json!({"prompt": prompt, "targets": ["a"], "top_k": 5, "steering": steering}),
        )
        .await
        .json();
        let own_top = if steering.is_null() {
            &own["top"]["unsteered"]
        } else {
            &own["top"]["steered"]
        };
        let r = post_json(&s, "/inspect/logit_lens", json!({"prompt": prompt, "positions": [-1], "top_k": 5, "targets": ["a"], "steering": steering})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let b = r.json();
        assert_eq!(b["layers"].as_array().unwrap().len(), n_layers);
        let last = &b["cells"][n_layers - 1][0];
        assert_eq!(&last["top"], own_top, "steering {steering}");
        assert_ne!(
            &b["cells"][0][0]["top"], own_top,
            "the first layer reads differently"
        );
        // The target's log-probability is the model's own; its rank places it in the top list.
        let t = &last["targets"][0];
        let which = if steering.is_null() {
            "unsteered"
        } else {
            "steered"
        };
        assert_eq!(t["logprob"], own["targets"][0][which]["logprob"]);
        let lp = t["logprob"].as_f64().unwrap();
        assert!((t["prob"].as_f64().unwrap() - lp.exp()).abs() < 1e-6);
        let rank = t["rank"].as_u64().unwrap() as usize;
        let above = last["top"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["logprob"].as_f64().unwrap() > lp)
            .count();
        assert!(
            rank >= 1 && (rank > 5 || rank == above + 1),
            "rank {rank}, {above} above"
        );
        if rank <= 5 {
            assert_eq!(last["top"][rank - 1]["id"], b["targets"][0]["id"]);
        }
    }
    // Every position by default, in order; bounds refused.
    let all = post_json(
        &s,
        "/inspect/logit_lens",
        json!({"prompt": prompt, "layers": [0]}),
    )
    .await
    .json();
    let n = all["positions"].as_array().unwrap().len();
    assert!(n > 3 && all["cells"][0].as_array().unwrap().len() == n);
    for (body, code, field) in [
        (
            json!({"prompt": prompt, "positions": [99]}),
            "invalid_positions",
            "positions[0]",
        ),
        (
            json!({"prompt": prompt, "targets": ["the theater"]}),
            "invalid_targets",
            "targets[0]",
        ),
        (
            json!({"prompt": prompt, "top_k": 21}),
            "invalid_top_k",
            "top_k",
        ),
        (
            json!({"prompt": prompt, "layers": [n_layers]}),
            "invalid_layer",
            "layers[0]",
        ),
    ] {
        let r = post_json(&s, "/inspect/logit_lens", body.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(r.error_code(), code, "{body}");
        assert_eq!(r.json()["error"]["param"], field, "{body}");
    }
    let mut cfg = test_config(None);
    cfg.limits.max_lens_cells = 4;
    let small = tiny_state(cfg);
    let r = post_json(&small, "/inspect/logit_lens", json!({"prompt": prompt})).await;
    assert_eq!(r.error_code(), "too_much_output");
}

fn grid(v: &Value) -> Vec<Vec<Value>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Patching between prompts that differ in one token, checked against what must hold exactly:
/// the same prompt twice changes nothing anywhere; before the differing token nothing is
/// restored; the differing token's embedding, or the last block's output at the last token,
/// restores the clean metric; noising the differing embedding gives the corrupted one.
#[tokio::test]
async fn activation_patching_is_exact_where_it_must_be() {
    let s = tiny_state(test_config(None));
    let (clean, corrupted) = ("in a tin", "in the tin");
    let enc = |t: &str| s.engine.model.encode_prompt(t).unwrap();
    let (ct, xt) = (enc(clean), enc(corrupted));
    assert_eq!(ct.len(), xt.len());
    let differ: Vec<usize> = (0..ct.len()).filter(|&i| ct[i] != xt[i]).collect();
    assert_eq!(differ.len(), 1, "{ct:?} {xt:?}");
    let k = differ[0];
    let last_layer = s.engine.model.dims().n_layers - 1;
    let metric = json!({"logit_diff": ["a", "n"]});

    let same = post_json(
        &s,
        "/inspect/patch",
        json!({"clean": corrupted, "corrupted": corrupted, "metric": metric}),
    )
    .await;
    assert_eq!(same.status, StatusCode::OK, "{}", same.text());
    let b = same.json();
    assert_eq!(b["clean"], b["corrupted"]);
    for row in grid(&b["values"]) {
        assert!(row.iter().all(|v| *v == b["corrupted"]), "{row:?}");
    }
    assert!(grid(&b["recovery"]).iter().flatten().all(Value::is_null));

    let r = post_json(
        &s,
        "/inspect/patch",
        json!({"clean": clean, "corrupted": corrupted, "metric": metric, "layers": [0]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    assert_ne!(b["clean"], b["corrupted"]);
    assert_eq!(b["site"], "resid_pre");
    let rec = grid(&b["recovery"]);
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].len(), ct.len());
    for (p, v) in rec[0].iter().enumerate() {
        let want = if p == k { 1.0 } else { 0.0 };
        if p <= k {
            assert_eq!(v.as_f64(), Some(want), "position {p}");
        }
    }
    assert_eq!(grid(&b["values"])[0][k], b["clean"]);

    let r = post_json(
        &s,
        "/inspect/patch",
        json!({"clean": clean, "corrupted": corrupted, "metric": {"logprob": "a"},
               "site": "resid_post", "layers": [last_layer, 0], "positions": [-1]}),
    )
    .await;
    let b = r.json();
    assert_eq!(b["layers"], json!([0, last_layer]), "rows ascend");
    assert_eq!(grid(&b["recovery"])[1][0].as_f64(), Some(1.0));

    let r = post_json(
        &s,
        "/inspect/patch",
        json!({"clean": clean, "corrupted": corrupted, "metric": metric, "layers": [0],
               "positions": [k], "direction": "noising"}),
    )
    .await;
    let b = r.json();
    assert_eq!(grid(&b["values"])[0][0], b["corrupted"], "{b}");

    let r = post_json(
        &s,
        "/inspect/patch",
        json!({"clean": clean, "corrupted": corrupted, "metric": metric, "site": "attn_head",
               "layers": [1], "heads": [0, 2], "stream": true}),
    )
    .await;
    let events = sse_events(&r.text());
    assert!(events.iter().any(|(e, _)| e == "progress"), "{events:?}");
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "result", "{events:?}");
    let b: Value = serde_json::from_str(data).unwrap();
    let heads: Vec<Vec<Vec<Value>>> = serde_json::from_value(b["values"].clone()).unwrap();
    assert_eq!(
        (heads.len(), heads[0].len(), heads[0][0].len()),
        (1, ct.len(), 2)
    );
    assert_eq!(b["cells"], 2 * ct.len());
}

#[tokio::test]
async fn patching_errors_name_the_field() {
    let s = tiny_state(test_config(None));
    let m = json!({"logprob": "a"});
    for (body, code, field) in [
        (
            json!({"clean": "the theater", "corrupted": "the theater in a tin", "metric": m}),
            "unequal_lengths",
            "corrupted",
        ),
        (
            json!({"clean": "in a tin", "corrupted": "in the tin", "metric": m, "heads": [0]}),
            "invalid_site",
            "heads",
        ),
        (
            json!({"clean": "in a tin", "corrupted": "in the tin", "metric": m, "site": "attn_head", "heads": [9]}),
            "invalid_head",
            "heads[0]",
        ),
        (
            json!({"clean": "in a tin", "corrupted": "in the tin", "metric": {}}),
            "invalid_metric",
            "metric",
        ),
        (
            json!({"clean": "in a tin", "corrupted": "in the tin", "metric": {"logprob": "a", "logit_diff": ["a", "n"]}}),
            "invalid_metric",
            "metric",
        ),
        (
            json!({"clean": "in a tin", "corrupted": "in the tin", "metric": {"logit_diff": ["the"]}}),
            "invalid_metric",
            "metric.logit_diff",
        ),
        (
            json!({"clean": "in a tin", "corrupted": "in the tin", "metric": {"logprob": "the theater"}}),
            "invalid_targets",
            "metric.logprob",
        ),
        (
            json!({"clean": "", "corrupted": "in the tin", "metric": m}),
            "empty_prompt",
            "clean",
        ),
        (
            json!({"clean": "in a tin", "corrupted": "in the tin", "metric": m, "positions": [4]}),
            "invalid_positions",
            "positions[0]",
        ),
    ] {
        let r = post_json(&s, "/inspect/patch", body.clone()).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), code, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], field, "{body}");
    }
    let mut cfg = test_config(None);
    cfg.limits.max_patch_cells = 4;
    let small = tiny_state(cfg);
    let r = post_json(
        &small,
        "/inspect/patch",
        json!({"clean": "in a tin", "corrupted": "in the tin", "metric": m}),
    )
    .await;
    assert_eq!(r.error_code(), "too_many_cells", "{}", r.text());
    let mut cfg = test_config(None);
    cfg.limits.max_concurrent_patches = 0;
    let none = tiny_state(cfg);
    let r = post_json(
        &none,
        "/inspect/patch",
        json!({"clean": "in a tin", "corrupted": "in the tin", "metric": m}),
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.error_code(), "too_many_patches");
    assert!(r.headers.contains_key("retry-after"));
    let mut cfg = test_config(None);
    cfg.limits.max_patch_prompt_tokens = 3;
    let small = tiny_state(cfg);
    let r = post_json(
        &small,
        "/inspect/patch",
        json!({"clean": {"messages": [{"role": "user", "content": "in a tin"}]}, "corrupted": "in the tin", "metric": m}),
    )
    .await;
    assert_eq!(r.error_code(), "prompt_too_long", "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "clean");
}
