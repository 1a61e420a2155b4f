//! Serving many users at once on the default model, through a real port: batch invariance
//! with a different steering plan per request, overload, timeouts, metrics, and a graceful
//! shutdown; and replicas sharing a PostgreSQL vector store behind nginx ([`replicas`]).

mod common;
mod replicas;

use serde_json::{json, Value};
use std::sync::{Arc, Barrier};
use tiller::loadgen::post_json;

/// Tests of this binary that start servers run one at a time: they measure and time out on
/// a machine whose cores they would otherwise share.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn generate(addr: &str, body: &Value) -> (u16, Value) {
    let (status, text) = post_json(addr, "/generate", &body.to_string()).unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text})),
    )
}

fn metrics(addr: &str) -> String {
    common::http_get(addr, "/metrics")
}

/// Eight concurrent requests with eight different plans each get exactly the text they get
/// alone.
#[test]
fn batched_requests_with_different_plans_match_their_solo_runs() {
    let _serial = one_at_a_time();
    let server = common::Server::start(&[]);
    let addr = format!("127.0.0.1:{}", server.port);
    let plans = [
        json!([]),
        json!([{"vector": "golden_gate", "layer": 12, "coefficient": 2.5}]),
        json!([{"vector": "golden_gate", "layer": 6, "coefficient": 3.0}]),
        json!([{"vector": "refusal", "layer": 20, "coefficient": 1.5, "positions": "generated"}]),
        json!([{"vector": "refusal", "op": "ablate"}]),
        json!([{"neuron": {"layer": 10, "index": 100}, "op": "zero"}, {"neuron": {"layer": 3, "index": 7}, "op": "scale", "coefficient": 4.0}]),
        json!([{"vector": "sycophancy", "layer": 12, "op": "clamp", "coefficient": 20.0}]),
        json!([{"neuron": {"layer": 15, "index": 1000}, "op": "mean"}, {"vector": "golden_gate", "layers": [10, 11], "coefficient": 1.0, "normalize": true}]),
    ];
    let prompts = [
        "Tell me about yourself.",
        "What should I do this weekend?",
        "How do plants grow?",
        "Write a haiku about rain.",
    ];
    let bodies: Vec<Value> = plans
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({"messages": [{"role": "user", "content": prompts[i % prompts.len()]}],
                   "max_tokens": 24, "ignore_eos": true, "steering": p})
        })
        .collect();
    let solo: Vec<String> = bodies
        .iter()
        .map(|b| {
            let (status, r) = generate(&addr, b);
            assert_eq!(status, 200, "{r}");
            r["text"].as_str().unwrap().to_string()
        })
        .collect();
    let barrier = Arc::new(Barrier::new(bodies.len()));
    let handles: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|b| {
            let (addr, barrier) = (addr.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                generate(&addr, &b)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, r) = h.join().unwrap();
        assert_eq!(status, 200, "{r}");
        assert_eq!(
            r["text"].as_str().unwrap(),
            solo[i],
            "request {i} changed when batched"
        );
    }
    // The requests really shared forward passes.
    let m = metrics(&addr);
    let shared: u64 = m
        .lines()
        .find(|l| l.starts_with("tiller_batch_size_bucket{le=\"4\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    let total: u64 = m
        .lines()
        .find(|l| l.starts_with("tiller_batch_size_count"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(
        total > shared,
        "no step ran more than four sequences together:\n{m}"
    );
    for name in [
        "tiller_http_requests_total{route=\"/generate\",status=\"200\"} 16",
        "tiller_steering_interventions_total{op=\"add\"}",
        "tiller_steering_interventions_total{op=\"ablate\"}",
        "tiller_steering_interventions_total{op=\"zero\"}",
        "tiller_generated_tokens_total 384",
        "tiller_time_to_first_token_seconds_count 16",
        "tiller_inter_token_latency_seconds_count 368",
        "tiller_queue_depth 0",
    ] {
        assert!(m.contains(name), "metrics lack `{name}`:\n{m}");
    }
}

#[test]
fn timeouts_and_a_graceful_shutdown_end_requests_cleanly() {
    let _serial = one_at_a_time();
    let server = common::Server::start(&[
        ("TILLER_SERVER_REQUEST_TIMEOUT_SECS", "3"),
        ("TILLER_SERVER_SHUTDOWN_GRACE_SECS", "1"),
    ]);
    let addr = format!("127.0.0.1:{}", server.port);
    let started = std::time::Instant::now();
    let (status, r) = generate(
        &addr,
        &json!({"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["finish_reason"], "timeout");
    let took = started.elapsed().as_secs_f64();
    assert!((2.5..10.0).contains(&took), "the timeout took {took}s");
    // A stream running when SIGTERM arrives ends with a clean `done` event after the grace
    // period, and the process exits.
    let a2 = addr.clone();
    let stream = std::thread::spawn(move || {
        let mut events = Vec::new();
        let body = json!({"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": true, "stream": true}).to_string();
        let status = tiller::loadgen::stream_post(&a2, "/generate", &body, |e, d| {
            events.push((e.to_string(), d.to_string()))
        });
        (status.ok(), events)
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut server = server;
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (status, events) = stream.join().unwrap();
    assert_eq!(status, Some(200));
    let (last, data) = events.last().expect("some events");
    assert_eq!(last, "done", "{events:?}");
    let done: Value = serde_json::from_str(data).unwrap();
    assert_eq!(done["finish_reason"], "shutdown", "{done}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if let Some(code) = server.child.try_wait().unwrap() {
            assert!(code.success(), "exit status {code}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
