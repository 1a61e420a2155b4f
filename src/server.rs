//! Starting a server from a [`Config`]: resolve and load the model (fetching the embedded
//! default if none is configured), load the built-in vectors, start the engine thread, and
//! serve HTTP until SIGTERM or ctrl-c, letting in-flight requests finish.

use crate::api::AppState;
use crate::config::Config;
use crate::engine::scheduler::{Scheduler, SchedulerConfig, StepReport};
use crate::engine::{EngineConfig, EngineHandle};
use crate::metrics::Metrics;
use crate::model::cpu::quant::WeightFormat;
use crate::model::{catalogue, Model};
use crate::model::{Backend, LoadOptions};
use crate::steering::sae::SaeStore;
use crate::steering::store::{postgres, schema, ModelShape, VectorStore};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::PathBuf;
use std::sync::Arc;

/// Parses `cpu`, `cuda:N` or `metal`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "metal" => {
            if !cfg!(feature = "metal") {
                bail!("device \"metal\" needs a build with --features metal");
            }
            Ok(Device::new_metal(0)?)
        }
        s if s.starts_with("cuda") => {
            if !cfg!(feature = "cuda") {
                bail!("device \"{s}\" needs a build with --features cuda");
            }
            let n: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("bad CUDA ordinal in {s:?}"))?,
                None if s == "cuda" => 0,
                None => bail!("device must be \"cpu\", \"cuda:N\" or \"metal\", not {s:?}"),
            };
            Ok(Device::new_cuda(n)?)
        }
        other => bail!("device must be \"cpu\", \"cuda:N\" or \"metal\", not {other:?}"),
    }
}

/// The model file or folder to serve: the configured path, a model named in the catalogue
/// (fetched and cached on first use), or the default model when none is configured.
pub fn resolve_model_path(cfg: &Config) -> Result<PathBuf> {
    let spec = cfg.model.path.as_str();
    if spec.is_empty() {
        return catalogue::ensure_default_model(&cfg.model.cache_dir, &cfg.model.python);
    }
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    match catalogue::find(spec) {
        Some(m) => m.ensure(&cfg.model.cache_dir, &cfg.model.python),
        None => bail!(
            "model `{spec}` is neither a file or folder nor a model name (known names: {})",
            catalogue::names()
        ),
    }
}

/// How to load a model under this configuration.
pub fn load_options(cfg: &Config) -> Result<LoadOptions> {
    let device = parse_device(&cfg.model.device)?;
    Ok(LoadOptions {
        backend: if device.is_cpu() {
            Backend::CpuKernels
        } else {
            Backend::Candle
        },
        device,
        weight_format: WeightFormat::parse(&cfg.model.weights).unwrap_or(WeightFormat::Native),
        threads: cfg.model.threads,
    })
}

/// Loads the configured model.
pub fn load_model(cfg: &Config) -> Result<Model> {
    let path = resolve_model_path(cfg)?;
    let opts = load_options(cfg)?;
    let started = std::time::Instant::now();
    let id = (!cfg.model.id.is_empty()).then_some(cfg.model.id.as_str());
    let mut model =
        Model::load(&path, id, &opts).with_context(|| format!("loading {}", path.display()))?;
    if !cfg.model.chat_template.is_empty() {
        let file = &cfg.model.chat_template;
        let source = std::fs::read_to_string(file)
            .with_context(|| format!("reading the chat template {file} (model.chat_template)"))?;
        model
            .set_chat_template(&source)
            .with_context(|| format!("the chat template {file} (model.chat_template)"))?;
    }
    let c = model.dims();
    tracing::info!(
        model = %model.id,
        path = %path.display(),
        layers = c.n_layers,
        d_model = c.d_model,
        weights = model.runtime().weights,
        weight_mb = model.runtime().weight_bytes / (1 << 20),
        kernels = crate::model::cpu::matmul::isa().name(),
        secs = format!("{:.2}", started.elapsed().as_secs_f64()),
        "model loaded"
    );
    Ok(model)
}

/// The shape vectors must have for a model.
pub fn model_shape(model: &Model) -> ModelShape {
    let c = model.dims();
    ModelShape {
        model_id: model.id.clone(),
        d_model: c.d_model,
        n_neurons: c.intermediate_size,
        head_width: c.n_heads * c.head_dim,
    }
}

/// The vector store for a model: built-in vectors (read-only), then the stored ones: those of
/// `vectors.dir`, or none yet when `store.url` names a database ([`attach_database`] fills
/// the copy).
pub fn vector_store(cfg: &Config, model: &Model) -> Result<Arc<VectorStore>> {
    let store = if cfg.store.url.is_empty() {
        let (store, skipped) = VectorStore::open(model_shape(model), Some(&cfg.vectors.dir))
            .with_context(|| format!("opening the vector store {}", cfg.vectors.dir.display()))?;
        for s in skipped {
            tracing::warn!("skipped stored vector {s}");
        }
        store
    } else {
        VectorStore::in_memory(model_shape(model))
    };
    for s in store.load_builtin_dir(&cfg.vectors.builtin_dir) {
        tracing::warn!("skipped built-in vector {s}");
    }
    if cfg.store.url.is_empty() {
        tracing::info!(vectors = store.names().len(), dir = %cfg.vectors.dir.display(), "vector store ready");
    }
    Ok(Arc::new(store))
}

fn folder_has_vectors(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut r| {
        r.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "safetensors")))
    })
}

/// With `store.url` set, makes the store a copy of that database and starts following it;
/// waits up to `store.start_wait_secs` for the first sync, then serves regardless (the copy
/// fills in once the database answers).
pub async fn attach_database(cfg: &Config, store: &Arc<VectorStore>) -> Result<()> {
    if cfg.store.url.is_empty() {
        return Ok(());
    }
    let timeout = std::time::Duration::from_secs(cfg.store.timeout_secs.max(1));
    let db = schema::parse_url(&cfg.store.url, timeout).map_err(anyhow::Error::msg)?;
    let namespace = match cfg.store.namespace.as_str() {
        "" => store.shape().model_id.clone(),
        n => n.to_string(),
    };
    tracing::info!(namespace = %namespace, "vectors are kept in PostgreSQL (store.url)");
    if folder_has_vectors(&cfg.vectors.dir) {
        tracing::warn!(
            dir = %cfg.vectors.dir.display(),
            "vectors.dir holds vectors this server does not read with store.url set; copy them in \
             with `tiller vectors migrate --from {}`",
            cfg.vectors.dir.display()
        );
    }
    let shared = Arc::new(postgres::Shared::new(db, namespace, timeout));
    store.attach(shared.clone());
    let (synced, first_sync) = tokio::sync::oneshot::channel();
    tokio::spawn(shared.follow(store.clone(), synced));
    let wait = std::time::Duration::from_secs(cfg.store.start_wait_secs);
    match tokio::time::timeout(wait, first_sync).await {
        Ok(Ok(())) => tracing::info!(
            vectors = store.names().len(),
            "vector store ready (postgres)"
        ),
        _ => tracing::warn!(
            error = store.health().message.unwrap_or_default(),
            "vector database not reached in {} s: serving built-in vectors until it is",
            wait.as_secs()
        ),
    }
    Ok(())
}

/// Builds the shared state around a loaded model: vectors and the engine thread.
pub fn build_state(cfg: Config, model: Model) -> Result<AppState> {
    let model = Arc::new(model);
    let store = vector_store(&cfg, &model)?;
    let metrics = Arc::new(Metrics::default());
    let engine = EngineHandle::spawn(
        model,
        EngineConfig {
            scheduler: SchedulerConfig {
                max_batch_size: cfg.engine.max_batch_size,
                max_batch_tokens: cfg.engine.max_batch_tokens,
                prefill_chunk: cfg.engine.prefill_chunk,
                prefill_while_decoding: cfg.engine.prefill_while_decoding,
            },
            max_queue: cfg.engine.max_queue,
            max_chunked_passes: cfg.engine.max_chunked_passes,
        },
        Some(step_observer(metrics.clone())),
    )?;
    let saes = Arc::new(SaeStore::default());
    let c = engine.model.dims().clone();
    let width_of = |site: crate::model::hooks::HookSite, layer: usize| {
        (layer < c.n_layers).then(|| c.site_width(site))
    };
    saes.load_builtins(width_of);
    for skipped in saes.load_dir(&cfg.saes.dir, width_of) {
        tracing::warn!("skipped sparse autoencoder {skipped}");
    }
    Ok(AppState::new(engine, store, saes, cfg, metrics))
}

/// Feeds every engine step into the metrics.
fn step_observer(m: Arc<Metrics>) -> crate::engine::StepObserver {
    Arc::new(move |r: &StepReport, sched: &Scheduler| {
        use crate::metrics as k;
        m.observe(k::BATCH_SIZE, r.sequences as f64);
        m.observe(k::BATCH_TOKENS, r.rows as f64);
        m.observe(k::STEP_SECONDS, r.seconds);
        m.add(k::PROMPT_TOKENS, &[], r.prefill_tokens as f64);
        m.add(k::GENERATED_TOKENS, &[], r.generated_tokens as f64);
        for &t in &r.first_token_latencies {
            m.observe(k::TIME_TO_FIRST_TOKEN, t);
        }
        for &t in &r.inter_token_latencies {
            m.observe(k::INTER_TOKEN_LATENCY, t);
        }
        for (op, n) in &r.interventions {
            m.add(k::INTERVENTIONS, &[("op", op)], *n as f64);
        }
        for f in &r.finished {
            m.add(k::FINISHED, &[("reason", f.reason.as_str())], 1.0);
        }
        m.set(k::ACTIVE_SEQUENCES, sched.len() as f64);
    })
}

/// Serves until SIGTERM or ctrl-c.
pub async fn serve(cfg: Config) -> Result<()> {
    let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
    let model = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || load_model(&cfg)
    })
    .await??;
    let state = build_state(cfg, model)?;
    attach_database(&state.config, &state.store).await?;
    let state_for_exit = state.clone();
    let app = crate::app(state.clone());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    let grace = std::time::Duration::from_secs(state.config.server.shutdown_grace_secs);
    let limits = crate::connections::ConnectionLimits::from_config(&state.config.server);
    let metrics = Some(state.metrics.clone());
    crate::connections::serve(listener, app, limits, metrics, async move {
        shutdown_signal().await;
        state.set_ready(false);
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: finishing in-flight requests"
        );
        let engine = state.engine.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            tracing::info!("shutdown grace period over: ending running requests");
            engine.stop();
        });
    })
    .await;
    state_for_exit.engine.stop();
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
