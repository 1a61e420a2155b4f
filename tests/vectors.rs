//! The vector store over HTTP (tiny model, `app().oneshot`): CRUD with ETags, every error
//! path, format round trips, API keys, extraction with exactly computed expectations, and the
//! llama.cpp control-vector semantics.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::{json, Value};
use tiller::model::hooks::{BatchRows, HookSite, Hooks, NoHooks};
use tiller::model::PackedBatch;
use tiller::steering::formats::{self, VectorFormat};
use tiller::AppState;

const D: usize = 64;

fn values(seed: u32) -> Vec<f32> {
    tiller::testing::pseudo_random(D, seed, 1.0)
}

async fn put(s: &AppState, path: &str, body: impl Into<Body>, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::put(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    call(s, req.body(body.into()).unwrap()).await
}

async fn delete(s: &AppState, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::delete(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    call(s, req.body(Body::empty()).unwrap()).await
}

fn json_vector(layers: &[(usize, Vec<f32>)]) -> String {
    let map: serde_json::Map<String, Value> = layers
        .iter()
        .map(|(l, v)| (l.to_string(), json!(v)))
        .collect();
    json!({"layers": map, "description": "test vector"}).to_string()
}

#[tokio::test]
async fn crud_with_etags_and_compare_and_set() {
    let s = tiny_state(test_config(None));
    let r = put(
        &s,
        "/vectors/dir1",
        json_vector(&[(1, values(1))]),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let etag1 = r.headers["etag"].to_str().unwrap().to_string();
    assert_eq!(r.headers["location"], "/vectors/dir1");
    let info = r.json();
    assert_eq!(info["version"], 1);
    assert_eq!(info["model"], "tiny");
    assert_eq!(info["d_model"], D);
    assert_eq!(info["layers"], json!([1]));
    assert_eq!(info["method"], "manual");
    assert_eq!(info["origin"], "stored");
    let norm = values(1).iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((info["norms"]["1"].as_f64().unwrap() as f32 - norm).abs() < 1e-4);

    let listed = get(&s, "/vectors").await.json();
    assert_eq!(listed["vectors"].as_array().unwrap().len(), 1);
    let got = get(&s, "/vectors/dir1").await;
    assert_eq!(got.headers["etag"].to_str().unwrap(), etag1);
    let not_modified = call(
        &s,
        Request::get("/vectors/dir1")
            .header("if-none-match", &etag1)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);

    // Replace: a new version and ETag; a stale If-Match is refused with 412.
    let r = put(&s, "/vectors/dir1", json_vector(&[(1, values(2))]), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["version"], 2);
    let etag2 = r.headers["etag"].to_str().unwrap().to_string();
    assert_ne!(etag1, etag2);
    let r = put(
        &s,
        "/vectors/dir1",
        json_vector(&[(1, values(3))]),
        &[("if-match", &etag1)],
    )
    .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(r.error_code(), "version_mismatch");
    assert!(
        r.text().contains(&etag2.replace('"', "\\\"")),
        "{}",
        r.text()
    );
    let r = put(
        &s,
        "/vectors/dir1",
        json_vector(&[(1, values(3))]),
        &[("if-match", &etag2)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["version"], 3);
    let r = put(
        &s,
        "/vectors/dir1",
        json_vector(&[(1, values(3))]),
        &[("if-none-match", "*")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = put(
        &s,
        "/vectors/fresh",
        json_vector(&[(1, values(3))]),
        &[("if-none-match", "*")],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = put(
        &s,
        "/vectors/absent",
        json_vector(&[(1, values(3))]),
        &[("if-match", "*")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);

    // Delete, with compare-and-set.
    let r = delete(&s, "/vectors/dir1", &[("if-match", &etag1)]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        delete(&s, "/vectors/dir1", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(get(&s, "/vectors/dir1").await.status, StatusCode::NOT_FOUND);
    let r = delete(&s, "/vectors/dir1", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "vector_not_found");

    // The store survives a restart of the server on the same folder.
    let dir = s.config.vectors.dir.clone();
    let mut cfg = test_config(None);
    cfg.vectors.dir = dir;
    let s2 = tiny_state(cfg);
    assert_eq!(get(&s2, "/vectors/fresh").await.json()["version"], 1);
    assert_eq!(
        get(&s2, "/vectors/dir1").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn write_errors() {
    let dir = scratch_dir();
    // A built-in vector to try to overwrite.
    let builtin = tiller::steering::vector::SteeringVector {
        name: "shipped".into(),
        meta: tiller::steering::vector::VectorMeta {
            model: "tiny".into(),
            d_model: D,
            kind: tiller::steering::vector::VectorKind::Direction,
            method: "manual".into(),
            description: String::new(),
            created: String::new(),
            version: 1,
        },
        layers: [(1, std::sync::Arc::from(values(9)))].into_iter().collect(),
    };
    std::fs::write(
        dir.join("shipped.safetensors"),
        builtin.to_safetensors().unwrap(),
    )
    .unwrap();
    let mut cfg = test_config(Some(dir));
    cfg.server.max_body_bytes = 64 * 1024;
    let s = tiny_state(cfg);
    assert_eq!(
        get(&s, "/vectors/shipped").await.json()["origin"],
        "builtin"
    );
    let cases: Vec<(String, String, StatusCode, &str)> = vec![
        (
            "/vectors/Bad%20Name".into(),
            json_vector(&[(1, values(1))]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_name",
        ),
        (
            "/vectors/wide".into(),
            json_vector(&[(1, vec![0.5; 65])]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "model_mismatch",
        ),
        (
            "/vectors/other".into(),
            json!({"layers": {"1": values(1)}, "model": "llama-70b"}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "model_mismatch",
        ),
        (
            "/vectors/huge".into(),
            "{\"layers\": {\"1\": [1e39]}}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_vector",
        ),
        (
            "/vectors/badkey".into(),
            "{\"layers\": {\"one\": [1.0]}}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_vector",
        ),
        (
            "/vectors/nolayers".into(),
            "{\"layers\": {}}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_vector",
        ),
        (
            "/vectors/broken".into(),
            "{\"layers\": ".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_vector",
        ),
        (
            "/vectors/garbage".into(),
            "\u{1}\u{2}not a file".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_vector",
        ),
        (
            "/vectors/x?format=npy".into(),
            json_vector(&[(1, values(1))]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_format",
        ),
        (
            "/vectors/shipped".into(),
            json_vector(&[(1, values(1))]),
            StatusCode::CONFLICT,
            "read_only",
        ),
        (
            "/vectors/big".into(),
            json_vector(&[(1, vec![0.123_456_78; 20000])]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (path, body, status, code) in cases {
        let r = put(&s, &path, body, &[]).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert_eq!(r.error_code(), code, "{path}: {}", r.text());
    }
    let r = delete(&s, "/vectors/shipped", &[]).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = get(&s, "/vectors/shipped?format=xml").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    // Nothing half-written was left behind.
    assert!(
        get(&s, "/vectors").await.json()["vectors"]
            .as_array()
            .unwrap()
            .len()
            == 1
    );
}

#[tokio::test]
async fn formats_round_trip_through_the_api() {
    let s = tiny_state(test_config(None));
    let layers = vec![(0, values(1)), (1, values(2)), (2, values(3))];
    assert_eq!(
        put(&s, "/vectors/orig", json_vector(&layers), &[])
            .await
            .status,
        StatusCode::CREATED
    );
    for format in ["json", "safetensors", "gguf"] {
        let r = get(&s, &format!("/vectors/orig?format={format}")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.headers["content-disposition"]
            .to_str()
            .unwrap()
            .contains(&format!("orig.{format}")));
        let copy = format!("copy-{format}");
        let up = put(
            &s,
            &format!("/vectors/{copy}"),
            r.body.clone(),
            &[("content-type", "application/octet-stream")],
        )
        .await;
        assert_eq!(up.status, StatusCode::CREATED, "{format}: {}", up.text());
        let back = get(&s, &format!("/vectors/{copy}?format=json"))
            .await
            .json();
        let expected: Vec<(usize, Vec<f32>)> = if format == "gguf" {
            // llama.cpp cannot carry block 0.
            layers[1..].to_vec()
        } else {
            layers.clone()
        };
        let got: Vec<usize> = back["layers"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.parse().unwrap())
            .collect();
        assert_eq!(
            got,
            expected.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            "{format}"
        );
        for (l, v) in &expected {
            let vals: Vec<f32> =
                serde_json::from_value(back["layers"][l.to_string()].clone()).unwrap();
            assert_eq!(&vals, v, "{format} layer {l}");
        }
    }
}

#[tokio::test]
async fn api_keys_guard_reads_and_writes() {
    let mut cfg = test_config(None);
    cfg.auth.api_keys = vec!["user-key-123".into()];
    cfg.auth.admin_keys = vec!["admin-key-456".into()];
    let s = tiny_state(cfg);
    let with = |path: &str, method: &str, key: Option<&str>, body: String| {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        b.body(Body::from(body)).unwrap()
    };
    assert_eq!(
        call(&s, with("/health", "GET", None, String::new()))
            .await
            .status,
        StatusCode::OK
    );
    let r = call(&s, with("/vectors", "GET", None, String::new())).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert_eq!(r.error_code(), "missing_api_key");
    let r = call(
        &s,
        with("/vectors", "GET", Some("wrong-key-000"), String::new()),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error_code(), "invalid_api_key");
    assert_eq!(
        call(
            &s,
            with("/vectors", "GET", Some("user-key-123"), String::new())
        )
        .await
        .status,
        StatusCode::OK
    );
    let gen = json!({"prompt": "the", "max_tokens": 2}).to_string();
    assert_eq!(
        call(&s, with("/generate", "POST", Some("user-key-123"), gen))
            .await
            .status,
        StatusCode::OK
    );
    let r = call(
        &s,
        with(
            "/vectors/v",
            "PUT",
            Some("user-key-123"),
            json_vector(&[(1, values(1))]),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "admin_key_required");
    let r = call(
        &s,
        with(
            "/vectors/extract",
            "POST",
            Some("user-key-123"),
            "{}".into(),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = call(
        &s,
        with(
            "/vectors/v",
            "PUT",
            Some("admin-key-456"),
            json_vector(&[(1, values(1))]),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        call(
            &s,
            with("/vectors/v", "DELETE", Some("admin-key-456"), String::new())
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn a_request_keeps_the_vector_version_it_was_admitted_with() {
    let s = tiny_state(test_config(None));
    assert_eq!(
        put(&s, "/vectors/live", json_vector(&[(1, values(4))]), &[])
            .await
            .status,
        StatusCode::CREATED
    );
    let body = json!({"prompt": "the", "max_tokens": 40, "temperature": 1.0, "seed": 5,
                      "steering": [{"vector": "live", "coefficient": 3.0}]});
    let expected = post_json(&s, "/generate", body.clone()).await.json()["text"].clone();
    // Start the same request as a stream; once its first token arrives (it was admitted),
    // replace and then delete the vector, and read the rest.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let req = Request::post("/generate")
        .body(Body::from(streamed.to_string()))
        .unwrap();
    let mut resp = tiller::app(s.clone())
        .oneshot(req)
        .await
        .unwrap()
        .into_body();
    let mut text = String::new();
    let first = resp.frame().await.unwrap().unwrap();
    text.push_str(&String::from_utf8_lossy(first.data_ref().unwrap()));
    assert_eq!(
        put(&s, "/vectors/live", json_vector(&[(1, values(5))]), &[])
            .await
            .json()["version"],
        2
    );
    assert_eq!(
        delete(&s, "/vectors/live", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    while let Some(frame) = resp.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    let mut generated = String::new();
    for (event, data) in sse_events(&text) {
        let d: Value = serde_json::from_str(&data).unwrap();
        generated.push_str(d["text"].as_str().unwrap_or_default());
        if event == "done" {
            assert_eq!(d["steering"][0]["vector_version"], 1);
        }
    }
    assert_eq!(
        generated,
        expected.as_str().unwrap(),
        "the running request kept version 1"
    );
    // New requests see that the vector is gone.
    let r = post_json(&s, "/generate", body).await;
    assert_eq!(r.error_code(), "unknown_vector");
}

/// The residual stream at `layer` of every position of a prompt.
fn residuals(s: &AppState, tokens: &[u32], site: HookSite, layer: usize) -> Vec<Vec<f32>> {
    record(s, tokens, site, layer)
}

fn mean(rows: &[Vec<f32>]) -> Vec<f64> {
    let mut m = vec![0f64; rows[0].len()];
    for r in rows {
        for (a, b) in m.iter_mut().zip(r) {
            *a += *b as f64;
        }
    }
    m.iter().map(|x| x / rows.len() as f64).collect()
}

#[tokio::test]
async fn extraction_gives_the_exact_mean_difference() {
    let s = tiny_state(test_config(None));
    let pos = ["the theater", "in a theater", "the heather"];
    let neg = ["a cat sat", "dogs run far", "an apple"];
    for position in ["last", "mean"] {
        let r = post_json(
            &s,
            "/vectors/extract",
            json!({"name": format!("md-{position}"), "method": "mean_diff", "positive": pos, "negative": neg,
                   "layers": [0, 2], "position": position, "description": "tiny"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let b = r.json();
        assert_eq!(b["examples"]["positive"], 3);
        assert_eq!(b["layers"].as_array().unwrap().len(), 2);
        for layer in [0usize, 2] {
            let pick = |text: &str| -> Vec<f64> {
                let toks = s.engine.model.encode_prompt(text).unwrap();
                let h = residuals(&s, &toks, HookSite::ResidPost, layer);
                if position == "last" {
                    h[h.len() - 1].iter().map(|&x| x as f64).collect()
                } else {
                    mean(&h[1..])
                }
            };
            let mp: Vec<Vec<f32>> = pos
                .iter()
                .map(|t| pick(t).iter().map(|&x| x as f32).collect())
                .collect();
            let mn: Vec<Vec<f32>> = neg
                .iter()
                .map(|t| pick(t).iter().map(|&x| x as f32).collect())
                .collect();
            let want: Vec<f64> = mean(&mp)
                .iter()
                .zip(mean(&mn))
                .map(|(a, b)| a - b)
                .collect();
            let got = get(&s, &format!("/vectors/md-{position}?format=json"))
                .await
                .json();
            let got: Vec<f32> =
                serde_json::from_value(got["layers"][layer.to_string()].clone()).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-4,
                    "{position} layer {layer}: {g} vs {w}"
                );
            }
            let report = b["layers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["layer"] == layer)
                .unwrap();
            let n = want.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((report["norm"].as_f64().unwrap() - n).abs() < 1e-3);
        }
    }
}

#[tokio::test]
async fn caa_pca_and_neuron_means() {
    let s = tiny_state(test_config(None));
    let qs = [
        "the theater",
        "a heather",
        "in the",
        "the air",
        "a tin",
        "the end",
    ];
    let pos: Vec<Value> = qs
        .iter()
        .map(|q| json!({"prompt": q, "completion": "the theater"}))
        .collect();
    let neg: Vec<Value> = qs
        .iter()
        .map(|q| json!({"prompt": q, "completion": "an apple"}))
        .collect();
    let r = post_json(
        &s,
        "/vectors/extract",
        json!({"name": "c", "method": "caa", "positive": pos, "negative": neg,
        "layers": [1], "position": "response", "chat": true}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // With 6 pairs, one is held out.
    assert_eq!(r.json()["examples"]["heldout"], 2);
    assert!(r.json()["layers"][0]["heldout_accuracy"].is_number());
    // PCA: deterministic, and positives project above their negatives.
    let body = json!({"name": "p", "method": "pca", "positive": pos, "negative": neg, "layers": [1], "position": "response", "chat": true});
    post_json(&s, "/vectors/extract", body.clone()).await;
    let a = get(&s, "/vectors/p?format=json").await.json()["layers"].clone();
    post_json(&s, "/vectors/extract", body).await;
    let b = get(&s, "/vectors/p?format=json").await.json()["layers"].clone();
    assert_eq!(a, b);
    let c = get(&s, "/vectors/c?format=json").await.json()["layers"]["1"].clone();
    let (a, c): (Vec<f32>, Vec<f32>) = (
        serde_json::from_value(a["1"].clone()).unwrap(),
        serde_json::from_value(c).unwrap(),
    );
    let cos = a.iter().zip(&c).map(|(x, y)| x * y).sum::<f32>()
        / (a.iter().map(|x| x * x).sum::<f32>().sqrt()
            * c.iter().map(|x| x * x).sum::<f32>().sqrt());
    assert!(
        cos > 0.5,
        "PCA and CAA directions should agree in sign and roughly in direction: cos {cos}"
    );
    // Neuron means: the mean mlp_act over the prompts' tokens (first excluded), then usable by
    // the `mean` op.
    let prompts = ["the theater", "a cat sat on the mat"];
    let r = post_json(
        &s,
        "/vectors/extract",
        json!({"name": "nm", "method": "neuron_means", "prompts": prompts, "layers": [2]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let per: Vec<Vec<f32>> = prompts
        .iter()
        .map(|t| {
            let toks = s.engine.model.encode_prompt(t).unwrap();
            mean(&residuals(&s, &toks, HookSite::MlpAct, 2)[1..])
                .iter()
                .map(|&x| x as f32)
                .collect()
        })
        .collect();
    let want = mean(&per);
    let got = get(&s, "/vectors/nm?format=json").await.json();
    assert_eq!(got["kind"], "neuron_means");
    let got: Vec<f32> = serde_json::from_value(got["layers"]["2"].clone()).unwrap();
    assert_eq!(got.len(), 96);
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-4);
    }
    let r = post_json(
        &s,
        "/generate",
        json!({"prompt": "the", "max_tokens": 2,
        "steering": [{"neuron": {"layer": 2, "index": 5}, "op": "mean", "means": "nm"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["steering"][0]["op"], "mean");
}

#[tokio::test]
async fn extraction_errors_and_progress_stream() {
    let s = tiny_state(test_config(None));
    let cases = [
        (
            json!({"name": "x", "positive": ["a"], "negative": []}),
            "missing_examples",
            "`negative`",
        ),
        (
            json!({"name": "x", "positive": [], "negative": ["a"]}),
            "missing_examples",
            "`positive`",
        ),
        (
            json!({"name": "x", "method": "magic", "positive": ["a"], "negative": ["b"]}),
            "invalid_method",
            "`method`",
        ),
        (
            json!({"name": "x", "position": "middle", "positive": ["a"], "negative": ["b"]}),
            "invalid_position",
            "`position`",
        ),
        (
            json!({"name": "x", "method": "caa", "positive": ["a", "b"], "negative": ["c"]}),
            "unpaired_examples",
            "`negative`",
        ),
        (
            json!({"name": "x", "position": "response", "positive": ["a"], "negative": ["b"]}),
            "invalid_example",
            "`positive[0]`",
        ),
        (
            json!({"name": "x", "layers": [9], "positive": ["a"], "negative": ["b"]}),
            "invalid_layer",
            "`layers[0]`",
        ),
        (
            json!({"name": "Bad Name", "positive": ["a"], "negative": ["b"]}),
            "invalid_name",
            "`name`",
        ),
        (
            json!({"name": "x", "method": "neuron_means", "positive": ["a"]}),
            "missing_examples",
            "`prompts`",
        ),
    ];
    for (body, code, field) in cases {
        let r = post_json(&s, "/vectors/extract", body.clone()).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), code, "{body}");
        assert!(r.text().contains(field), "{body}: {}", r.text());
    }
    let r = post_json(&s, "/vectors/extract", json!({"name": "streamed", "positive": ["a", "b", "c"], "negative": ["d", "e"], "stream": true})).await;
    let events = sse_events(&r.text());
    assert!(events.iter().any(|(e, _)| e == "progress"));
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "result", "{events:?}");
    let result: Value = serde_json::from_str(data).unwrap();
    assert_eq!(result["vector"]["name"], "streamed");
    let p: Value = serde_json::from_str(
        &events
            .iter()
            .rev()
            .find(|(e, _)| e == "progress")
            .unwrap()
            .1,
    )
    .unwrap();
    assert_eq!(p["done"], 5);
    assert_eq!(p["total"], 5);
}

/// llama.cpp's definition: a control vector adds `scale * direction.N` to the output of block N.
#[tokio::test]
async fn an_imported_control_vector_steers_as_llama_cpp_defines() {
    let s = tiny_state(test_config(None));
    let dirs = [(1usize, values(11)), (2, values(12))];
    let v = tiller::steering::vector::SteeringVector {
        name: "cv".into(),
        meta: tiller::steering::vector::VectorMeta {
            model: String::new(),
            d_model: D,
            kind: tiller::steering::vector::VectorKind::Direction,
            method: "x".into(),
            description: String::new(),
            created: String::new(),
            version: 1,
        },
        layers: dirs
            .iter()
            .map(|(l, v)| (*l, std::sync::Arc::from(v.clone())))
            .collect(),
    };
    let gguf = formats::encode(&v, VectorFormat::Gguf, "llama").unwrap();
    assert_eq!(
        put(&s, "/vectors/cv", gguf, &[]).await.status,
        StatusCode::CREATED
    );
    let scale = 0.8f32;
    let store = &s.store;
    let c = s.engine.model.dims();
    let plan = tiller::steering::spec::validate(
        &[serde_json::from_value(json!({"vector": "cv", "coefficient": scale})).unwrap()],
        &tiller::steering::spec::ModelLimits::new(c, 4, store, &Default::default()),
    )
    .unwrap();
    let tokens: Vec<u32> = s
        .engine
        .model
        .encode_prompt("the theater in a tin")
        .unwrap();
    let run = |hooks: &mut dyn Hooks| -> Vec<f32> {
        let model = &s.engine.model;
        let mut cache = model.new_cache();
        let mut b = PackedBatch::default();
        b.push(&tokens, 0, true);
        model
            .forward(&b, &mut [&mut cache], hooks)
            .unwrap()
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let ours = run(&mut tiller::steering::intervention::BatchSteering::new(
        c.n_layers,
        vec![(Some(&plan), tokens.len())],
    ));
    struct LlamaCpp(Vec<(usize, Vec<f32>)>, f32);
    impl Hooks for LlamaCpp {
        fn is_active(&self, site: HookSite, layer: usize) -> bool {
            site == HookSite::ResidPost && self.0.iter().any(|(l, _)| *l == layer)
        }
        fn apply(
            &mut self,
            _: HookSite,
            layer: usize,
            x: &candle_core::Tensor,
            _: &BatchRows,
        ) -> candle_core::Result<Option<candle_core::Tensor>> {
            let (_, d) = self.0.iter().find(|(l, _)| *l == layer).unwrap();
            let dir: Vec<f32> = d.iter().map(|v| v * self.1).collect();
            let t = candle_core::Tensor::from_vec(dir, d.len(), x.device())?;
            Ok(Some(x.broadcast_add(&t)?))
        }
    }
    let reference = run(&mut LlamaCpp(dirs.to_vec(), scale));
    let plain = run(&mut NoHooks);
    assert_ne!(plain, reference);
    let diff = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff < 1e-4,
        "imported control vector differs from llama.cpp's definition by {diff}"
    );
}

/// A store that cannot be written answers 503 with `Retry-After` (the vector stays as it was),
/// a full disk 507; both in the error envelope.
#[tokio::test]
async fn storage_failures_are_503_or_507() {
    let s = tiny_state(test_config(None));
    let r = put(&s, "/vectors/kept", json_vector(&[(1, values(2))]), &[]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    // The store's folder replaced by a file: every write fails.
    let dir = s.config.vectors.dir.clone();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, "not a folder").unwrap();
    let r = put(&s, "/vectors/lost", json_vector(&[(1, values(3))]), &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.error_code(), "store_unavailable");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(get(&s, "/vectors/lost").await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(&s, "/vectors/kept").await.status, StatusCode::OK);
    let full = tiller::api::vectors::storage_error(&std::io::ErrorKind::StorageFull.into());
    assert_eq!(full.status, StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(full.code, "storage_full");
    std::fs::remove_file(&dir).unwrap();
}

/// An example longer than a prefill chunk is extracted in chunks (generation runs between
/// them) and gives the vector one unchunked pass gives.
#[tokio::test]
async fn long_examples_extract_in_chunks_to_the_same_vector() {
    let mut cfg = test_config(None);
    cfg.engine.prefill_chunk = 16;
    let s = tiny_state(cfg);
    let long = |w: &str| [w; 12].join(" ");
    let req = json!({"name": "long", "positive": [long("theater tin"), "the bridge"],
        "negative": [long("apple fog"), "the bay"], "layers": [1, 2], "position": "mean"});
    let r = post_json(&s, "/vectors/extract", req.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let served: Vec<f32> = serde_json::from_value(
        get(&s, "/vectors/long?format=json").await.json()["layers"]["1"].clone(),
    )
    .unwrap();
    let model = &s.engine.model;
    let req: tiller::api::vectors::ExtractRequest = serde_json::from_value(req).unwrap();
    let plan = tiller::api::vectors::ExtractPlan::validate(model, &s.config, req).unwrap();
    let examples = plan.examples();
    assert!(
        examples[0].tokens.len() > 16 * 4,
        "the long example spans several chunks"
    );
    let layers = std::sync::Arc::new(plan.layers.clone());
    let acts = tiller::steering::extract::collect(model, &examples, layers, plan.site).unwrap();
    let whole = plan.finish(&model.id, acts, plan.positive.len()).vector;
    let expected = whole.layers[&1].clone();
    let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (a, b) in served.iter().zip(expected.iter()) {
        assert!((a - b).abs() <= 1e-4 * scale, "{a} vs {b}");
    }
}

/// Per-head extraction: `mean_diff` at `attn_head` is the exact mean difference of every head
/// side by side (a `head_direction`), `head_means` the exact mean, and a head's `mean` op sets
/// that head to its stored mean and leaves the others alone.
#[tokio::test]
async fn per_head_extraction_and_mean_ablation() {
    let s = tiny_state(test_config(None));
    let (pos, neg) = (["the theater", "in a theater"], ["a cat sat", "an apple"]);
    let r = post_json(
        &s,
        "/vectors/extract",
        json!({"name": "heads", "positive": pos, "negative": neg, "layers": [1],
               "site": "attn_head"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["vector"]["kind"], "head_direction");
    let last = |text: &str| -> Vec<f32> {
        let toks = s.engine.model.encode_prompt(text).unwrap();
        record(&s, &toks, HookSite::AttnHead, 1).pop().unwrap()
    };
    let (mp, mn) = (mean(&pos.map(last)), mean(&neg.map(last)));
    let got = get(&s, "/vectors/heads?format=json").await.json();
    let got: Vec<f32> = serde_json::from_value(got["layers"]["1"].clone()).unwrap();
    let d = s.engine.model.dims().clone();
    assert_eq!(got.len(), d.n_heads * d.head_dim);
    for (j, g) in got.iter().enumerate() {
        assert!((*g as f64 - (mp[j] - mn[j])).abs() < 1e-4, "value {j}");
    }
    // A head direction steers the attn_head site, one head's part with `head`.
    let r = post_json(
        &s,
        "/generate",
        json!({"prompt": "the", "max_tokens": 1, "steering": [{"vector": "heads", "head": 2, "coefficient": 3.0}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let applied = &r.json()["steering"][0];
    assert_eq!(
        (applied["site"].as_str(), applied["head"].as_u64()),
        (Some("attn_head"), Some(2))
    );
    let r = post_json(
        &s,
        "/generate",
        json!({"prompt": "the", "steering": [{"vector": "heads", "layer": 1}]}),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a head direction without `head` acts on every head"
    );
    let r = post_json(
        &s,
        "/generate",
        json!({"prompt": "the", "steering": [{"vector": "heads", "layer": 1, "site": "resid_post"}]}),
    )
    .await;
    assert_eq!(r.error_code(), "wrong_vector_kind", "{}", r.text());

    // Head means, then mean ablation of head 1 to them.
    let prompts = ["the theater", "a cat sat", "dogs run far"];
    let r = post_json(
        &s,
        "/vectors/extract",
        json!({"name": "head_means_default", "method": "head_means", "prompts": prompts}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["vector"]["kind"], "head_means");
    // The mean over prompts of each prompt's mean over its tokens but the first.
    let rows: Vec<Vec<f32>> = prompts
        .iter()
        .map(|t| {
            let toks = s.engine.model.encode_prompt(t).unwrap();
            let h = record(&s, &toks, HookSite::AttnHead, 1);
            mean(&h[1..]).iter().map(|&x| x as f32).collect()
        })
        .collect();
    let want = mean(&rows);
    let plan = s
        .steering_plan_now(
            Some(&[serde_json::from_value(json!({"layer": 1, "head": 1, "op": "mean"})).unwrap()]),
            &Default::default(),
        )
        .unwrap()
        .unwrap();
    let vector = plan.interventions[0].points[0].vector.clone().unwrap();
    let hd = d.head_dim;
    assert_eq!(vector.len(), hd);
    for (j, m) in vector.iter().enumerate() {
        assert!(
            (*m as f64 - want[hd + j]).abs() < 1e-4,
            "mean of head 1 value {j}"
        );
    }
}
