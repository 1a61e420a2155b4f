//! The HTTP surface on a tiny random model, through `app().oneshot` (no port): every endpoint
//! of the foundation and every error path answers with the one error envelope.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::json;

fn chat(content: &str) -> serde_json::Value {
    json!([{"role": "user", "content": content}])
}

#[tokio::test]
async fn health_ready_and_info() {
    let s = tiny_state(test_config(None));
    assert_eq!(get(&s, "/health").await.json()["status"], "ok");
    assert_eq!(get(&s, "/ready").await.json()["status"], "ready");
    let info = get(&s, "/info").await;
    assert_eq!(info.status, StatusCode::OK);
    let i = info.json();
    assert_eq!(i["model"], "tiny");
    assert_eq!(i["n_layers"], 3);
    assert_eq!(i["d_model"], 64);
    assert_eq!(i["n_neurons"], 96);
    assert_eq!(i["vocab_size"], 265);
    assert_eq!(i["context_length"], 256);
    assert_eq!(i["chat_template"], true);
    assert!(info.headers.contains_key("x-request-id"));
    s.set_ready(false);
    let r = get(&s, "/ready").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "unavailable");
}

#[tokio::test]
async fn generate_prompt_and_chat() {
    let s = tiny_state(test_config(None));
    let r = post_json(
        &s,
        "/generate",
        json!({"prompt": "the theater", "max_tokens": 5}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    let expected = s.engine.model.encode_prompt("the theater").unwrap().len();
    assert_eq!(b["usage"]["prompt_tokens"], expected);
    let n = b["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n <= 5);
    assert!(b["finish_reason"] == "length" || b["finish_reason"] == "stop");
    assert_eq!(b["steering"], json!([]));
    assert!(b["id"].as_str().unwrap().starts_with("gen-"));
    // A chat is rendered with the template (its default system prompt adds many tokens).
    let r = post_json(
        &s,
        "/generate",
        json!({"messages": chat("hi"), "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.json()["usage"]["prompt_tokens"].as_u64().unwrap() > 60);
}

#[tokio::test]
async fn same_seed_same_text_and_steering_is_deterministic() {
    let s = tiny_state(test_config(None));
    let values: Vec<f64> = (0..64).map(|i| ((i as f64) * 0.3).cos() * 2.0).collect();
    let body = |seed: u64, steer: bool| {
        let mut b =
            json!({"prompt": "in a theater", "max_tokens": 12, "temperature": 1.0, "seed": seed});
        if steer {
            b["steering"] = json!([{"values": values, "layer": 1, "coefficient": 3.0}]);
        }
        b
    };
    let text = |r: Reply| r.json()["text"].as_str().unwrap().to_string();
    let a = text(post_json(&s, "/generate", body(7, false)).await);
    assert_eq!(a, text(post_json(&s, "/generate", body(7, false)).await));
    let st = text(post_json(&s, "/generate", body(7, true)).await);
    assert_eq!(st, text(post_json(&s, "/generate", body(7, true)).await));
    assert_ne!(a, st, "steering should change the sampled text");
    let r = post_json(&s, "/generate", body(7, true)).await.json();
    assert_eq!(r["seed"], 7);
    assert_eq!(r["steering"][0]["op"], "add");
    assert_eq!(r["steering"][0]["layers"], json!([1]));
}

#[tokio::test]
async fn compare_returns_both_completions() {
    let s = tiny_state(test_config(None));
    let values: Vec<f64> = (0..64).map(|i| ((i as f64) * 0.9).sin() * 3.0).collect();
    let r = post_json(
        &s,
        "/generate",
        json!({"prompt": "the", "max_tokens": 10, "compare": true, "temperature": 1.0, "seed": 11,
               "steering": [{"values": values, "layers": [0, 1, 2], "coefficient": 4.0}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = r.json();
    let plain = post_json(
        &s,
        "/generate",
        json!({"prompt": "the", "max_tokens": 10, "temperature": 1.0, "seed": 11}),
    )
    .await
    .json();
    assert_eq!(b["seed"], 11);
    assert_eq!(
        b["baseline"]["text"], plain["text"],
        "baseline is the unsteered completion"
    );
    assert_ne!(b["text"], b["baseline"]["text"]);
}

#[tokio::test]
async fn streaming_sends_tokens_then_done_and_matches_the_plain_text() {
    let s = tiny_state(test_config(None));
    let req = json!({"prompt": "the theater", "max_tokens": 8, "temperature": 0.8, "seed": 3, "logprobs": 2});
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let r = post_json(&s, "/generate", streamed).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(&r.text());
    let (last, rest) = events.split_last().unwrap();
    assert_eq!(last.0, "done");
    assert!(rest.iter().all(|(e, _)| e == "token"));
    let mut text = String::new();
    for (i, (_, d)) in rest.iter().enumerate() {
        let t: serde_json::Value = serde_json::from_str(d).unwrap();
        assert_eq!(t["index"], i);
        assert_eq!(t["logprob"]["top"].as_array().unwrap().len(), 2);
        text.push_str(t["text"].as_str().unwrap());
    }
    let done: serde_json::Value = serde_json::from_str(&last.1).unwrap();
    text.push_str(done["text"].as_str().unwrap());
    assert_eq!(done["usage"]["completion_tokens"], rest.len());
    let plain = post_json(&s, "/generate", req).await.json();
    assert_eq!(plain["text"], text);
    assert_eq!(plain["logprobs"].as_array().unwrap().len(), rest.len());
}

#[tokio::test]
async fn stop_sequences_end_and_trim_the_text() {
    let s = tiny_state(test_config(None));
    let full = post_json(&s, "/generate", json!({"prompt": "the", "max_tokens": 30}))
        .await
        .json();
    let text = full["text"].as_str().unwrap().to_string();
    // Stop at some character that occurs after the first few.
    let Some(stop) = text
        .chars()
        .skip(3)
        .find(|c| !c.is_whitespace())
        .map(|c| c.to_string())
    else {
        return;
    };
    let cut = text.find(&stop).unwrap();
    let r = post_json(
        &s,
        "/generate",
        json!({"prompt": "the", "max_tokens": 30, "stop": [stop]}),
    )
    .await
    .json();
    assert_eq!(r["finish_reason"], "stop");
    assert_eq!(r["text"].as_str().unwrap(), &text[..cut]);
}

#[tokio::test]
async fn malformed_and_mistyped_bodies() {
    let s = tiny_state(test_config(None));
    let r = post(&s, "/generate", "{\"prompt\": ").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert_eq!(r.error_code(), "malformed_request");
    let r = post(&s, "/generate", "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = post_json(
        &s,
        "/generate",
        json!({"prompt": "x", "max_tokens": "many"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`max_tokens`"),
        "{}",
        r.text()
    );
    let r = post_json(&s, "/generate", json!({"promt": "x"})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text().contains("promt"), "{}", r.text());
    let r = post_json(
        &s,
        "/generate",
        json!({"prompt": "x", "steering": [{"vector": "v", "layer": "twelve"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text().contains("steering[0].layer"), "{}", r.text());
    // A number too large for a float is refused, not turned into infinity.
    let r = post(
        &s,
        "/generate",
        "{\"prompt\": \"x\", \"temperature\": 1e999}",
    )
    .await;
    assert!(r.status == StatusCode::BAD_REQUEST || r.status == StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text().contains("out of range"), "{}", r.text());
}

#[tokio::test]
async fn input_and_limit_errors_name_the_field() {
    let s = tiny_state(test_config(None));
    let cases = [
        (
            json!({"prompt": "x", "messages": chat("y")}),
            "conflicting_input",
            "`prompt`",
        ),
        (json!({"max_tokens": 3}), "missing_input", "`prompt`"),
        (json!({"prompt": ""}), "empty_prompt", "`prompt`"),
        (json!({"messages": []}), "empty_messages", "`messages`"),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "invalid_role",
            "`messages[0].role`",
        ),
        (
            json!({"prompt": "x", "max_tokens": 1_000_000_000_000u64}),
            "max_tokens_too_large",
            "`max_tokens`",
        ),
        (
            json!({"prompt": "x", "max_tokens": 0}),
            "invalid_max_tokens",
            "`max_tokens`",
        ),
        (
            json!({"prompt": "x", "temperature": -1}),
            "invalid_temperature",
            "`temperature`",
        ),
        (
            json!({"prompt": "x", "top_p": 0}),
            "invalid_top_p",
            "`top_p`",
        ),
        (
            json!({"prompt": "x", "top_k": 0}),
            "invalid_top_k",
            "`top_k`",
        ),
        (
            json!({"prompt": "x", "stop": [""]}),
            "invalid_stop",
            "`stop`",
        ),
        (
            json!({"prompt": "x", "logprobs": 100}),
            "invalid_logprobs",
            "`logprobs`",
        ),
        (
            json!({"prompt": "a".repeat(300)}),
            "prompt_too_long",
            "`prompt`",
        ),
        (
            json!({"prompt": "a".repeat(100), "max_tokens": 200}),
            "context_length_exceeded",
            "`max_tokens`",
        ),
    ];
    for (body, code, field) in cases {
        let r = post_json(&s, "/generate", body.clone()).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), code, "{body}: {}", r.text());
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(field),
            "{body}: {}",
            r.text()
        );
    }
}

#[tokio::test]
async fn steering_errors_name_the_field() {
    let s = tiny_state(test_config(None));
    let v64: Vec<f64> = vec![0.5; 64];
    let many: Vec<serde_json::Value> = (0..17)
        .map(|_| json!({"values": v64, "layer": 0}))
        .collect();
    let cases = [
        (
            json!([{"vector": "nope", "layer": 1}]),
            "unknown_vector",
            "steering[0].vector",
        ),
        (
            json!([{"values": v64, "layer": 3}]),
            "invalid_layer",
            "steering[0].layer",
        ),
        (
            json!([{"values": v64, "layer": -1}]),
            "invalid_layer",
            "steering[0].layer",
        ),
        (
            json!([{"values": v64, "layers": [0, 7]}]),
            "invalid_layer",
            "steering[0].layers[1]",
        ),
        (
            json!([{"values": [1.0, 2.0], "layer": 1}]),
            "dimension_mismatch",
            "steering[0].values",
        ),
        (
            json!([{"values": v64}]),
            "missing_layer",
            "steering[0].layer",
        ),
        (
            json!([{"values": v64, "layer": 1, "op": "explode"}]),
            "invalid_field",
            "steering[0].op",
        ),
        (
            json!([{"values": v64, "layer": 1, "op": "zero"}]),
            "invalid_op",
            "steering[0].op",
        ),
        (
            json!([{"values": v64, "layer": 1, "op": "clamp"}]),
            "missing_coefficient",
            "steering[0].coefficient",
        ),
        (
            json!([{"values": v64, "layer": 1, "positions": "middle"}]),
            "invalid_field",
            "steering[0].positions",
        ),
        (
            json!([{"values": v64, "layer": 1, "site": "nowhere"}]),
            "invalid_field",
            "steering[0].site",
        ),
        (
            json!([{"values": v64, "layer": 1, "coefficient": 1e300}]),
            "invalid_coefficient",
            "steering[0].coefficient",
        ),
        (
            json!([{"neuron": {"layer": 1, "index": 96}, "op": "zero"}]),
            "invalid_neuron",
            "steering[0].neuron.index",
        ),
        (
            json!([{"neuron": {"layer": 5, "index": 1}}]),
            "invalid_layer",
            "steering[0].neuron.layer",
        ),
        (
            json!([{"neuron": {"layer": 1, "index": 1}, "op": "scale"}]),
            "missing_coefficient",
            "steering[0].coefficient",
        ),
        (
            json!([{"neuron": {"layer": 1, "index": 1}, "op": "mean"}]),
            "neuron_means_missing",
            "steering[0].means",
        ),
        (
            json!([{"feature": {"sae": "none", "index": 1}}]),
            "unknown_sae",
            "steering[0].feature.sae",
        ),
        (json!([{"layer": 1}]), "missing_target", "steering[0]"),
        (
            json!([{"site": "attn_head", "layer": 1, "head": 4, "op": "zero"}]),
            "invalid_head",
            "steering[0].head",
        ),
        (
            json!([{"site": "resid_post", "layer": 1, "head": 0}]),
            "invalid_site",
            "steering[0].head",
        ),
        (
            json!([{"layer": 1, "head": 0, "op": "add"}]),
            "invalid_op",
            "steering[0].op",
        ),
        (
            json!([{"head": 0, "op": "zero"}]),
            "missing_layer",
            "steering[0].layer",
        ),
        (
            json!([{"layer": 1, "head": 0, "op": "mean"}]),
            "head_means_missing",
            "steering[0].means",
        ),
        (
            json!([{"values": v64, "layer": 1, "head": 0}]),
            "dimension_mismatch",
            "steering[0].values",
        ),
        (
            json!([{"neuron": {"layer": 1, "index": 1}, "head": 0}]),
            "conflicting_targets",
            "steering[0]",
        ),
        (
            json!([{"values": v64, "vector": "x", "layer": 1}]),
            "conflicting_targets",
            "steering[0]",
        ),
        (
            json!([{"values": v64, "layer": 1, "layers": [1]}]),
            "conflicting_layers",
            "steering[0].layers",
        ),
        (json!(many), "too_many_interventions", "steering"),
        // Values that are finite but would overflow the forward pass or a norm.
        (
            json!([{"values": vec![1e38; 64], "layer": 1}]),
            "steering_too_large",
            "steering[0].values",
        ),
        (
            json!([{"values": vec![1e20; 64], "layer": 1, "coefficient": 1e6}]),
            "steering_too_large",
            "steering[0].values",
        ),
        (
            json!([{"values": vec![f32::MAX as f64; 64], "layer": 1, "normalize": true}]),
            "non_finite",
            "steering[0].values[0]",
        ),
        (
            json!([{"values": vec![1e20; 64], "layer": 1, "op": "ablate"}]),
            "steering_too_large",
            "steering[0].values",
        ),
        (
            json!([{"values": vec![1e3; 64], "layer": 1, "coefficient": 1e6}]),
            "steering_too_large",
            "steering[0].values",
        ),
    ];
    for (steering, code, field) in cases {
        let r = post_json(
            &s,
            "/generate",
            json!({"prompt": "x", "steering": steering}),
        )
        .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{steering}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), code, "{steering}: {}", r.text());
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.starts_with(&format!("`{field}`")), "{steering}: {msg}");
        assert_eq!(r.json()["error"]["param"], field, "{steering}");
    }
}

/// The largest allowed values still give finite log-probabilities, and `last: u64::MAX`
/// covers the whole prompt instead of wrapping around.
#[tokio::test]
async fn steering_at_the_limits_stays_finite() {
    let s = tiny_state(test_config(None));
    let plans = [
        json!([{"values": vec![1.0; 64], "layer": 1, "coefficient": 1e6, "normalize": true}]),
        json!([{"values": vec![1e6; 64], "layer": 1, "op": "ablate"}]),
        json!([{"values": vec![1e6; 64], "layer": 1, "op": "clamp", "coefficient": 1e6}]),
        json!([{"values": vec![0.5; 64], "layer": 1, "positions": {"last": u64::MAX}}]),
    ];
    for steering in plans {
        let r = post_json(
            &s,
            "/generate",
            json!({"prompt": "hello there", "max_tokens": 3, "temperature": 0,
                   "logprobs": 2, "steering": steering}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{steering}: {}", r.text());
        for t in r.json()["logprobs"].as_array().unwrap() {
            let lp = t["logprob"].as_f64().unwrap();
            assert!(lp.is_finite() && lp <= 0.0, "{steering}: {t}");
        }
    }
    let all = json!([{"values": vec![0.5; 64], "layer": 1, "positions": "all"}]);
    let last = json!([{"values": vec![0.5; 64], "layer": 1, "positions": {"last": u64::MAX}}]);
    let run = |steering: serde_json::Value| {
        post_json(
            &s,
            "/generate",
            json!({"prompt": "hello there", "max_tokens": 4, "temperature": 0,
                   "ignore_eos": true, "steering": steering}),
        )
    };
    assert_eq!(
        run(all).await.json()["text"],
        run(last).await.json()["text"]
    );
}

/// Path segments and query strings that do not parse get the error envelope, not plain text.
#[tokio::test]
async fn path_and_query_rejections_use_the_envelope() {
    let s = tiny_state(test_config(None));
    let sae = post_json(&s, "/saes/x/features/not-a-number/top", json!({})).await;
    let put = Request::put("/saes/x?k=minus-one")
        .body(Body::from("{}"))
        .unwrap();
    let query = call(&s, put).await;
    for (path, r) in [("sae feature", sae), ("sae query", query)] {
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
        assert_eq!(r.error_code(), "malformed_request", "{path}: {}", r.text());
        assert!(!r.json()["error"]["message"].as_str().unwrap().is_empty());
    }
}

#[tokio::test]
async fn body_limit_unknown_routes_and_methods() {
    let mut cfg = test_config(None);
    cfg.server.max_body_bytes = 1024;
    let s = tiny_state(cfg);
    let r = post_json(&s, "/generate", json!({"prompt": "x".repeat(5000)})).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error_code(), "payload_too_large");
    let r = get(&s, "/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    let r = call(
        &s,
        Request::delete("/generate").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.error_code(), "method_not_allowed");
}

#[tokio::test]
async fn overload_is_a_prompt_429_and_accepted_requests_stay_correct() {
    let mut cfg = test_config(None);
    cfg.engine.max_batch_size = 1;
    cfg.engine.max_queue = 1;
    cfg.limits.max_tokens = 200;
    let s = tiny_state(cfg);
    let body = |i: usize| json!({"prompt": format!("the theater {i}"), "max_tokens": 200, "ignore_eos": true, "temperature": 1.0, "seed": i});
    // What each request produces when it runs alone.
    let mut alone = Vec::new();
    for i in 0..12 {
        alone.push(post_json(&s, "/generate", body(i)).await.json()["text"].clone());
    }
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { (i, post_json(&s, "/generate", body(i)).await) })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r.status {
            StatusCode::OK => {
                ok += 1;
                assert_eq!(r.json()["text"], alone[i], "request {i} got another's text");
            }
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert_eq!(r.headers["retry-after"], "1");
                assert_eq!(r.error_code(), "queue_full");
                assert_eq!(r.json()["error"]["type"], "rate_limit_error");
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    assert!(started.elapsed().as_secs() < 30);
    let m = get(&s, "/metrics").await.text();
    assert!(
        m.contains(&format!(
            "tiller_requests_rejected_total{{reason=\"queue_full\"}} {refused}"
        )),
        "{m}"
    );
    assert!(
        m.contains("tiller_http_requests_total{route=\"/generate\",status=\"429\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn the_playground_is_served_from_the_binary_without_a_key() {
    let mut cfg = test_config(None);
    cfg.auth.api_keys = vec!["user-key-123".into()];
    let s = tiny_state(cfg);
    for path in ["/", "/playground"] {
        let r = get(&s, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert!(r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let csp = r.headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'self'") && csp.contains("script-src 'self'"),
            "{csp}"
        );
        let html = r.text();
        assert!(html.contains("/playground/app.js") && html.contains("/playground/style.css"));
        // Nothing from another origin: no CDN scripts, styles or fonts.
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "external reference in the page"
        );
    }
    let js = get(&s, "/playground/app.js").await;
    assert_eq!(js.status, StatusCode::OK);
    assert!(js.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    assert!(js.text().contains("/inspect/activations"));
    assert!(
        !js.text().contains("https://"),
        "the script loads nothing external"
    );
    let css = get(&s, "/playground/style.css").await;
    assert_eq!(css.status, StatusCode::OK);
    assert!(!css.text().contains("@import") && !css.text().contains("url("));
    // The API behind it still needs the key (the page asks for one on 401).
    assert_eq!(get(&s, "/info").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        get(&s, "/playground/other.js").await.status,
        StatusCode::NOT_FOUND
    );
}

/// A schedule (`from`, `until`, `decay`) decides which generated tokens an intervention
/// shapes: before `from` the distributions are the unsteered ones bit for bit; a strong vector
/// changes the ones it covers; the echo carries it; bad schedules name the field.
#[tokio::test]
async fn schedules_steer_only_the_generated_tokens_they_cover() {
    let s = tiny_state(test_config(None));
    let d = s.engine.model.dims().d_model;
    let v: Vec<f64> = (0..d).map(|i| ((i as f64) * 0.7).sin()).collect();
    let run = |steering: serde_json::Value| {
        let s = s.clone();
        async move {
            let body = json!({"prompt": "the theater", "max_tokens": 8, "temperature": 0,
                "ignore_eos": true, "logprobs": 1, "steering": steering});
            let r = post_json(&s, "/generate", body).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            r.json()
        }
    };
    let plain = run(json!(null)).await;
    let iv = |extra: serde_json::Value| {
        let mut spec = json!({"values": v, "layer": 1, "coefficient": 40.0, "normalize": true});
        for (k, x) in extra.as_object().unwrap() {
            spec[k] = x.clone();
        }
        json!([spec])
    };
    let late = run(iv(json!({"from": 3}))).await;
    let lps = |r: &serde_json::Value| -> Vec<serde_json::Value> {
        r["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["top"].clone())
            .collect()
    };
    let (p, l) = (lps(&plain), lps(&late));
    assert_eq!(
        p[..3],
        l[..3],
        "tokens before `from` are chosen as unsteered"
    );
    assert_ne!(p[3..], l[3..], "tokens from `from` on are steered");
    assert_eq!(late["steering"][0]["schedule"], json!({"from": 3}));
    let early = run(iv(json!({"until": 2, "decay": "linear"}))).await;
    assert_ne!(lps(&early)[0], p[0], "the first token is steered");
    assert_eq!(
        early["steering"][0]["schedule"],
        json!({"from": 0, "until": 2, "decay": "linear"})
    );
    for (extra, code, field) in [
        (
            json!({"from": 4, "until": 4}),
            "invalid_schedule",
            "steering[0].until",
        ),
        (
            json!({"decay": "linear"}),
            "invalid_schedule",
            "steering[0].decay",
        ),
        (
            json!({"until": 3, "positions": "prompt"}),
            "invalid_schedule",
            "steering[0].positions",
        ),
        (
            json!({"until": 3, "decay": "linear", "op": "clamp"}),
            "invalid_schedule",
            "steering[0].decay",
        ),
    ] {
        let body = json!({"prompt": "the theater", "max_tokens": 2, "steering": iv(extra.clone())});
        let r = post_json(&s, "/generate", body).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{extra}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), code, "{extra}");
        assert_eq!(r.json()["error"]["param"], field, "{extra}");
    }
}

/// Conditional steering over HTTP: the response and `X-Steering-Fired` say whether each
/// condition held; a condition that never holds leaves the text unsteered; the compact form
/// carries conditions; bad conditions are 422s naming the field.
#[tokio::test]
async fn conditions_are_reported_and_validated() {
    let s = tiny_state(test_config(None));
    let d = s.engine.model.dims().d_model;
    let v: Vec<f32> = (0..d).map(|i| ((i as f32) * 0.7).sin()).collect();
    let r = call(
        &s,
        Request::put("/vectors/topic")
            .body(Body::from(json!({"layers": {"0": v}}).to_string()))
            .unwrap(),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.text());
    let gen = |steering: serde_json::Value| {
        let s = s.clone();
        async move {
            let body = json!({"prompt": "the theater", "max_tokens": 6, "temperature": 0,
                "ignore_eos": true, "steering": steering});
            post_json(&s, "/generate", body).await
        }
    };
    let iv = |when: serde_json::Value| json!([{"vector": "topic", "layer": 1, "coefficient": 30.0, "normalize": true, "when": when}]);
    let plain = gen(json!(null)).await.json();
    let r = gen(iv(json!({"vector": "topic", "layer": 0, "above": -2.0}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers["x-steering-fired"], "0:fired");
    let b = r.json();
    assert_eq!(b["conditions"][0]["fired"], true, "{b}");
    assert!(b["conditions"][0]["value"].is_number());
    assert_ne!(b["text"], plain["text"]);
    assert_eq!(b["steering"][0]["when"]["scope"], "prompt");

    let r = gen(iv(json!({"vector": "topic", "layer": 0, "above": 2.0}))).await;
    assert_eq!(r.headers["x-steering-fired"], "0:not_fired");
    assert_eq!(r.json()["text"], plain["text"]);

    let r = gen(iv(
        json!({"vector": "topic", "layer": 0, "below": 2.0, "scope": "token"}),
    ))
    .await;
    assert_eq!(r.headers["x-steering-fired"], "0:tokens=0-5");
    assert_eq!(
        r.json()["conditions"][0]["tokens"],
        json!([0, 1, 2, 3, 4, 5])
    );

    let r = call(
        &s,
        Request::post("/generate")
            .header("content-type", "application/json")
            .header("x-steering", "topic:1:30;normalize;when=topic:0>-2")
            .body(Body::from(json!({"prompt": "the theater", "max_tokens": 6, "temperature": 0, "ignore_eos": true}).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.json()["text"], b["text"], "{}", r.text());

    for (when, code, field) in [
        (
            json!({"vector": "topic", "layer": 0, "above": 1.0, "below": 2.0}),
            "invalid_condition",
            "steering[0].when",
        ),
        (
            json!({"vector": "nope", "layer": 0, "above": 1.0}),
            "unknown_vector",
            "steering[0].when.vector",
        ),
        (
            json!({"vector": "topic", "layer": 1, "above": 0.0, "scope": "token"}),
            "invalid_condition",
            "steering[0].when.layer",
        ),
        (
            json!({"vector": "topic", "layer": 0, "above": 1e39}),
            "invalid_threshold",
            "steering[0].when.above",
        ),
        (
            json!({"vector": "topic", "layer": 9, "above": 0.0}),
            "invalid_layer",
            "steering[0].when.layer",
        ),
        (
            json!({"vector": "topic", "layer": 0, "above": 0.0, "measure": "cosine", "feature": {"sae": "x", "index": 0}}),
            "invalid_condition",
            "steering[0].when",
        ),
    ] {
        let r = gen(iv(when.clone())).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{when}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), code, "{when}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], field, "{when}");
    }
    let r = call(
        &s,
        Request::post("/generate")
            .header("content-type", "application/json")
            .header("x-steering", "topic:1:3;when=topic:0>NaN")
            .body(Body::from(json!({"prompt": "x"}).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}
