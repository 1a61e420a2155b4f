//! Liveness, readiness, and what model is being served.

use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::steering::store::StoreHealth;
use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Health {
    /// `ok` (health) or `ready`.
    #[schema(example = "ok")]
    pub status: String,
    /// The vector store (`/health` only): its backend, and `degraded` while a shared database
    /// cannot be reached. A degraded store does not fail the check: generation goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreHealth>,
}

/// The process is up, and the state of its vector store.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, description = "The server is running", body = Health)))]
pub async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        store: Some(state.store.health()),
    })
}

/// The model is loaded and new requests are accepted (503 while shutting down).
#[utoipa::path(get, path = "/ready", tag = "health",
    responses(
        (status = 200, description = "Ready for requests", body = Health),
        (status = 503, description = "Shutting down", body = ErrorBody)))]
pub async fn ready(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    if state.is_ready() {
        Ok(Json(Health {
            status: "ready".into(),
            store: None,
        }))
    } else {
        Err(ApiError::unavailable("the server is shutting down"))
    }
}

/// The served model and its shape: what layers, neurons and widths a steering spec may name.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ModelInfo {
    /// The model id clients use.
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// The model family.
    #[schema(example = "llama")]
    pub architecture: String,
    /// Number of blocks; steering layers are 0..n_layers-1.
    #[schema(example = 30)]
    pub n_layers: usize,
    /// Width of the residual stream.
    #[schema(example = 576)]
    pub d_model: usize,
    /// MLP neurons per block (width of `mlp_act`).
    #[schema(example = 1536)]
    pub n_neurons: usize,
    /// Attention query heads.
    #[schema(example = 9)]
    pub n_heads: usize,
    /// Values per attention head (the width of one head at `attn_head`).
    #[schema(example = 64)]
    pub head_dim: usize,
    /// Attention key/value heads.
    #[schema(example = 3)]
    pub n_kv_heads: usize,
    /// Tokens in the vocabulary.
    #[schema(example = 49152)]
    pub vocab_size: usize,
    /// Longest sequence, prompt plus generation.
    #[schema(example = 8192)]
    pub context_length: usize,
    #[schema(example = true)]
    /// Whether a chat template is available (`messages` can be used).
    pub chat_template: bool,
    /// Hook sites a steering spec may name.
    #[schema(example = json!(["resid_pre", "attn_out", "mlp_act", "mlp_out", "resid_post"]))]
    pub sites: Vec<String>,
    /// `cpu_kernels` or `candle`.
    #[schema(example = "cpu_kernels")]
    pub backend: String,
    /// Where the model runs.
    #[schema(example = "cpu")]
    pub device: String,
    /// Storage of the linear weights.
    #[schema(example = "q4_1")]
    pub weights: String,
    /// Instruction set of the CPU kernels.
    #[schema(example = "avx2+fma")]
    pub kernels: String,
    /// Kernel threads.
    #[schema(example = 2)]
    pub threads: usize,
    /// Server version.
    #[schema(example = "0.1.0")]
    pub version: String,
    /// Seconds since start.
    #[schema(example = 3600)]
    pub uptime_secs: u64,
    /// Weight, file and resident bytes (the weights stay packed as in the file).
    pub memory: MemoryInfo,
}

/// What the process holds in memory, against the size of the model on disk.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct MemoryInfo {
    /// Bytes of weight data the model holds (packed blocks as stored in the file).
    #[schema(example = 91_634_304)]
    pub weight_bytes: u64,
    /// Size of the checkpoint on disk.
    #[schema(example = 92_091_648)]
    pub checkpoint_bytes: u64,
    /// Resident set size now (Linux `VmRSS`; absent elsewhere).
    #[schema(example = 150_000_000)]
    pub resident_bytes: Option<u64>,
    /// Highest resident set size since start, loading included (Linux `VmHWM`).
    #[schema(example = 160_000_000)]
    pub peak_resident_bytes: Option<u64>,
}

impl MemoryInfo {
    fn now(weight_bytes: usize, checkpoint_bytes: u64) -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        // Lines such as `VmRSS:    123456 kB`.
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        };
        Self {
            weight_bytes: weight_bytes as u64,
            checkpoint_bytes,
            resident_bytes: field("VmRSS:"),
            peak_resident_bytes: field("VmHWM:"),
        }
    }
}

/// The served model.
#[utoipa::path(get, path = "/info", tag = "health",
    responses((status = 200, description = "Model and server facts", body = ModelInfo)))]
pub async fn info(State(state): State<AppState>) -> Json<ModelInfo> {
    let m = &state.engine.model;
    let c = m.dims();
    let rt = m.runtime();
    Json(ModelInfo {
        model: m.id.clone(),
        architecture: c.architecture.clone(),
        n_layers: c.n_layers,
        d_model: c.d_model,
        n_neurons: c.intermediate_size,
        n_heads: c.n_heads,
        head_dim: c.head_dim,
        n_kv_heads: c.n_kv_heads,
        vocab_size: c.vocab_size,
        context_length: c.context_length,
        chat_template: m.chat_template.is_some(),
        sites: crate::model::hooks::HookSite::ALL
            .iter()
            .map(|s| s.to_string())
            .collect(),
        backend: serde_json::to_value(rt.backend)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        device: rt.device.clone(),
        weights: rt.weights.clone(),
        kernels: crate::model::cpu::matmul::isa().name().to_string(),
        threads: rt.threads,
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_secs: state.started.elapsed().as_secs(),
        memory: MemoryInfo::now(rt.weight_bytes, rt.checkpoint_bytes),
    })
}

/// Prometheus metrics: requests by route and status, queue depth, batch size, time to first
/// token, inter-token latency, token counts, interventions applied by op.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String)))]
pub async fn metrics(
    State(state): State<AppState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    use crate::metrics as k;
    state
        .metrics
        .set(k::QUEUE_DEPTH, state.engine.queue_depth() as f64);
    if state.store.shared().is_some() {
        let up = state.store.health().status == "ok";
        state
            .metrics
            .set(k::STORE_CONNECTED, f64::from(u8::from(up)));
    }
    state.metrics.set(
        k::ACTIVE_SEQUENCES,
        state
            .engine
            .stats
            .active
            .load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}
