//! Commands that run without the HTTP server: one generation, the speed benchmark,
//! extraction from a data file, and vector import/export.

use crate::api::generate::{
    collect, encode_input, start, validate_settings, GenerateRequest, RawSettings,
};
use crate::api::vectors::{batches, ExtractPlan, ExtractRequest};
use crate::config::Config;
use crate::model::hooks::NoHooks;
use crate::model::Model;
use crate::model::{Logits, Segment};
use crate::server::{build_state, load_model};
use crate::steering::extract::ExampleSpec;
use crate::steering::formats::{self, VectorFormat};
use crate::steering::intervention::BatchSteering;
use crate::steering::spec::{validate, InterventionSpec, ModelLimits};
use crate::steering::store::{write_atomic, Precondition};
use crate::steering::store::{ModelShape, VectorStore};
use crate::steering::vector::{SteeringVector, VectorDefaults, VectorKind, VectorMeta};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// Loads the model, generates once, prints the text (and the applied plan on stderr).
pub async fn generate_once(cfg: Config, req: GenerateRequest) -> Result<()> {
    let model = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || load_model(&cfg)
    })
    .await??;
    let state = build_state(cfg, model)?;
    let run = async {
        let prompt = encode_input(&state, req.prompt.as_deref(), req.messages.as_deref())?;
        let settings = validate_settings(
            &state,
            prompt,
            &RawSettings {
                max_tokens: req.max_tokens,
                temperature: req.temperature,
                seed: req.seed,
                ..Default::default()
            },
        )?;
        let plan = state
            .steering_plan(req.steering.as_deref(), &Default::default())
            .await?;
        if let Some(p) = &plan {
            eprintln!(
                "steering: {}",
                serde_json::to_string(&p.applied()).unwrap_or_default()
            );
        }
        let rx = start(&state, &settings, plan, "cli")?;
        collect(rx, false).await
    };
    let completion = run.await.map_err(|e| anyhow!("{}", e.message))?;
    println!("{}", completion.text);
    eprintln!("finish_reason: {}", completion.finish_reason);
    Ok(())
}

/// Benchmark figures, as tokens per second and ratios measured in the same run.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub weights: String,
    pub kernels: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub repeats: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub steered_prefill_tok_s: f64,
    pub steered_decode_tok_s: f64,
    /// Steered over unsteered tokens/s (1.0 = steering is free).
    pub steered_prefill_ratio: f64,
    pub steered_decode_ratio: f64,
    /// The steering used: `add` of a fixed vector at every layer.
    pub steering: String,
}

/// Prefill of a `prompt_tokens` prompt, then `decode_tokens` single-token steps. Unsteered and
/// steered work is interleaved (prefills alternate; decode steps alternate token by token, in
/// alternating order) so both see the same machine conditions; prefill keeps the best of
/// `repeats`, decode the total time of every step.
pub fn bench(
    cfg: &Config,
    prompt_tokens: usize,
    decode_tokens: usize,
    repeats: usize,
) -> Result<BenchReport> {
    let model = load_model(cfg)?;
    let c = model.dims();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(prompt_tokens / 5 + 10);
    let mut prompt = model.encode_prompt(&text)?;
    prompt.truncate(prompt_tokens);
    let plan = add_everywhere(&model, 0)?;
    let runs = [
        Runner::new(&model, None, prompt.len()),
        Runner::new(&model, Some(&plan), prompt.len()),
    ];
    let mut prefill = [0f64; 2];
    let mut caches = [model.new_cache(), model.new_cache()];
    let mut logits: [Vec<f32>; 2] = Default::default();
    for r in 0..repeats.max(1) {
        for k in [r % 2, 1 - r % 2] {
            caches[k] = model.new_cache();
            let t = Instant::now();
            logits[k] = runs[k].step(&prompt, &mut caches[k])?;
            prefill[k] = prefill[k].max(prompt.len() as f64 / t.elapsed().as_secs_f64());
        }
    }
    let mut decode_secs = [0f64; 2];
    for step in 0..decode_tokens {
        for k in [step % 2, 1 - step % 2] {
            let next = crate::engine::sampling::argmax(&logits[k]);
            let t = Instant::now();
            logits[k] = runs[k].step(&[next], &mut caches[k])?;
            decode_secs[k] += t.elapsed().as_secs_f64();
        }
    }
    let decode = [
        decode_tokens as f64 / decode_secs[0],
        decode_tokens as f64 / decode_secs[1],
    ];
    Ok(BenchReport {
        model: model.id.clone(),
        weights: model.runtime().weights,
        kernels: crate::model::cpu::matmul::isa().name().into(),
        threads: model.runtime().threads,
        prompt_tokens: prompt.len(),
        decode_tokens,
        repeats,
        prefill_tok_s: round1(prefill[0]),
        decode_tok_s: round1(decode[0]),
        steered_prefill_tok_s: round1(prefill[1]),
        steered_decode_tok_s: round1(decode[1]),
        steered_prefill_ratio: round3(prefill[1] / prefill[0]),
        steered_decode_ratio: round3(decode[1] / decode[0]),
        steering: format!("add, all {} layers, |v| = 10", c.n_layers),
    })
}

/// A plan that adds a fixed pseudo-random direction of norm ~10 (one per `seed`) at every
/// layer: the steering the benchmarks time.
fn add_everywhere(model: &Model, seed: usize) -> Result<crate::steering::spec::SteeringPlan> {
    let c = model.dims();
    let store = VectorStore::in_memory(crate::server::model_shape(model));
    let values: Vec<f64> = (0..c.d_model)
        .map(|i| ((i as f64 * 0.7 + seed as f64 * 1.3).sin()) * 0.6)
        .collect();
    let spec = InterventionSpec {
        values: Some(values),
        layers: Some((0..c.n_layers as i64).collect()),
        coefficient: Some(1.0),
        ..Default::default()
    };
    validate(
        &[spec],
        &ModelLimits::new(c, 1, &store, &Default::default()),
    )
    .map_err(|e| anyhow!("{e}"))
}

/// One forward step, steered or not, through the same hooks the engine uses.
struct Runner<'a> {
    model: &'a Model,
    plan: Option<&'a crate::steering::spec::SteeringPlan>,
    prompt_len: usize,
}

impl<'a> Runner<'a> {
    fn new(
        model: &'a Model,
        plan: Option<&'a crate::steering::spec::SteeringPlan>,
        prompt_len: usize,
    ) -> Self {
        Self {
            model,
            plan,
            prompt_len,
        }
    }

    fn step(&self, tokens: &[u32], cache: &mut crate::model::KvCache) -> Result<Vec<f32>> {
        let mut segment = [Segment {
            tokens,
            cache,
            logits: Logits::Last,
        }];
        let n_layers = self.model.dims().n_layers;
        let mut rows = match self.plan {
            Some(p) => {
                let mut hooks = BatchSteering::new(n_layers, vec![(Some(p), self.prompt_len)]);
                self.model.run(&mut segment, &mut hooks)?
            }
            None => self.model.run(&mut segment, &mut NoHooks)?,
        };
        rows.pop()
            .and_then(|mut r| r.pop())
            .ok_or_else(|| anyhow!("no logits"))
    }
}

/// One batch size of `tiller bench --batch`.
#[derive(Debug, Clone, Serialize)]
pub struct BatchBench {
    pub model: String,
    pub batch: usize,
    pub threads: usize,
    pub context: usize,
    pub decode_tokens: usize,
    /// Tokens decoded per second, all sequences together.
    pub decode_tok_s: f64,
    pub per_sequence_tok_s: f64,
    pub step_ms: f64,
    /// The same steps with every sequence steered by its own plan (`add` of a different
    /// vector at every layer), interleaved step by step with the unsteered ones.
    pub steered_decode_tok_s: f64,
    /// Steered over unsteered tokens/s (1.0 = steering is free).
    pub steered_ratio: f64,
}

/// `tiller bench --batch`: the engine's decode throughput per batch size, with no HTTP and no
/// sampling. For each size `n`, `n` sequences are prefilled with the same `context` tokens,
/// then `decode_tokens` steps each run one new row of every sequence in one packed pass, as
/// `scripts/bench_llamacpp_batch.py` does with llama.cpp's batched decode. A second set of
/// `n` sequences, each steered by its own plan, takes the same steps, alternating with the
/// unsteered ones (in alternating order) so both see the same machine.
pub fn bench_batch(
    model: &Model,
    sizes: &[usize],
    context: usize,
    decode_tokens: usize,
) -> Result<Vec<BatchBench>> {
    let d = model.dims();
    if context == 0 || context + decode_tokens > d.context_length {
        anyhow::bail!(
            "a context of {context} plus {decode_tokens} steps does not fit the model's {} tokens",
            d.context_length
        );
    }
    let vocab = d.vocab_size as u32;
    let prompt: Vec<u32> = (0..context as u32)
        .map(|i| (500 + i * 7 % 2000) % vocab)
        .collect();
    let mut out = Vec::with_capacity(sizes.len());
    for &n in sizes {
        if !(1..=256).contains(&n) {
            anyhow::bail!("batch size {n}: use 1 to 256");
        }
        let plans = (0..n)
            .map(|s| add_everywhere(model, s + 1))
            .collect::<Result<Vec<_>>>()?;
        let mut caches: [Vec<_>; 2] = [0, 1].map(|_| (0..n).map(|_| model.new_cache()).collect());
        for cache in caches.iter_mut().flatten() {
            let mut seg = [Segment {
                tokens: &prompt,
                cache,
                logits: Logits::Last,
            }];
            model.run(&mut seg, &mut NoHooks)?;
        }
        let tokens: Vec<[u32; 1]> = (0..n as u32).map(|s| [(504 + s) % vocab]).collect();
        let mut secs = [0f64; 2];
        for step in 0..decode_tokens {
            for k in [step % 2, 1 - step % 2] {
                let mut segs: Vec<Segment> = caches[k]
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(cache, t)| Segment {
                        tokens: t,
                        cache,
                        logits: Logits::Last,
                    })
                    .collect();
                let started = Instant::now();
                if k == 0 {
                    model.run(&mut segs, &mut NoHooks)?;
                } else {
                    let rows = plans.iter().map(|p| (Some(p), context)).collect();
                    model.run(&mut segs, &mut BatchSteering::new(d.n_layers, rows))?;
                }
                secs[k] += started.elapsed().as_secs_f64();
            }
        }
        let rate = secs.map(|s| (n * decode_tokens) as f64 / s.max(1e-9));
        out.push(BatchBench {
            model: model.id.clone(),
            batch: n,
            threads: model.runtime().threads,
            context,
            decode_tokens,
            decode_tok_s: round1(rate[0]),
            per_sequence_tok_s: round1(rate[0] / n as f64),
            step_ms: round3(1000.0 * secs[0] / decode_tokens.max(1) as f64),
            steered_decode_tok_s: round1(rate[1]),
            steered_ratio: round3(rate[1] / rate[0]),
        });
    }
    Ok(out)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One line of an extraction data file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DataLine {
    #[serde(default)]
    config: Option<serde_json::Value>,
    #[serde(default)]
    positive: Option<ExampleSpec>,
    #[serde(default)]
    negative: Option<ExampleSpec>,
    #[serde(default)]
    prompt: Option<ExampleSpec>,
}

/// Reads a JSONL data file into an extraction request.
pub fn read_data_file(path: &Path) -> Result<ExtractRequest> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut req = ExtractRequest::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: DataLine =
            serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
        if let Some(c) = l.config {
            let examples = (req.positive, req.negative, req.prompts);
            req = serde_json::from_value(c)
                .with_context(|| format!("{}:{}: config", path.display(), i + 1))?;
            (req.positive, req.negative, req.prompts) = examples;
        }
        req.positive.extend(l.positive);
        req.negative.extend(l.negative);
        req.prompts.extend(l.prompt);
    }
    Ok(req)
}

/// `tiller extract`: runs an extraction on this machine and stores or writes the vector.
pub fn extract_from_file(
    cfg: &Config,
    data: &Path,
    out: Option<&Path>,
    name: Option<&str>,
) -> Result<()> {
    let mut req = read_data_file(data)?;
    if let Some(n) = name {
        req.name = n.to_string();
    }
    if req.name.is_empty() {
        if let Some(stem) = out.and_then(|o| o.file_stem()) {
            req.name = stem.to_string_lossy().into_owned();
        }
    }
    let model = load_model(cfg)?;
    let plan = ExtractPlan::validate(&model, cfg, req).map_err(|e| anyhow!("{}", e.message))?;
    let n_pos = plan.positive.len();
    let total = n_pos + plan.negative.len();
    let started = Instant::now();
    let mut acts = Vec::with_capacity(total);
    for batch in batches(plan.examples(), cfg.vectors.extract_batch_tokens.max(1)) {
        acts.extend(crate::steering::extract::collect(
            &model,
            &batch,
            std::sync::Arc::new(plan.layers.clone()),
            plan.site,
        )?);
        eprint!("\rextracting: {}/{total} examples", acts.len());
    }
    eprintln!(" ({:.1}s)", started.elapsed().as_secs_f64());
    let done = plan.finish(&model.id, acts, n_pos);
    for r in &done.reports {
        eprintln!(
            "layer {:>2}: norm {:>8.3}  residual {:>8.2}  held-out accuracy {:>5}  separation {:>6.2}",
            r.layer,
            r.norm,
            r.mean_residual_norm,
            r.heldout_accuracy.map_or("-".to_string(), |a| format!("{a:.2}")),
            r.separation
        );
    }
    if let Some(l) = done.recommended_layer {
        eprintln!("recommended layer: {l}");
    }
    match out {
        Some(path) => {
            let format = path
                .extension()
                .and_then(|e| VectorFormat::parse(&e.to_string_lossy()))
                .ok_or_else(|| anyhow!("--out must end in .json, .safetensors or .gguf"))?;
            let bytes = formats::encode(&done.vector, format, &model.dims().architecture)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            write_atomic(path, &bytes)?;
            println!("{}", path.display());
        }
        None => {
            if !cfg.store.url.is_empty() {
                bail!(
                    "store.url names a database: write the vector to a file with --out and \
                     PUT it to a replica, or extract on a replica (POST /vectors/extract)"
                );
            }
            let (store, _) =
                VectorStore::open(crate::server::model_shape(&model), Some(&cfg.vectors.dir))?;
            let (entry, _) = store
                .put(done.vector, &Precondition::default())
                .map_err(|e| anyhow!("{e}"))?;
            println!(
                "stored `{}` version {} in {}",
                entry.vector.name,
                entry.vector.meta.version,
                cfg.vectors.dir.display()
            );
        }
    }
    Ok(())
}

/// `tiller vectors list`.
pub fn vectors_list(cfg: &Config) -> Result<()> {
    for (dir, origin) in [
        (&cfg.vectors.builtin_dir, "builtin"),
        (&cfg.vectors.dir, "stored"),
    ] {
        let Ok(read) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<_> = read
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        for p in paths {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let defaults = VectorDefaults {
                name: Some(name.clone()),
                ..Default::default()
            };
            match std::fs::read(&p)
                .map_err(anyhow::Error::from)
                .and_then(|b| SteeringVector::from_safetensors(&b, &defaults))
            {
                Ok(v) => {
                    let layers: Vec<String> = v.layers.keys().map(|l| l.to_string()).collect();
                    println!(
                        "{name:<24} {origin:<8} v{:<3} {:<13} {:<10} layers {:<12} {}",
                        v.meta.version,
                        v.meta.kind.as_str(),
                        v.meta.method,
                        layers.join(","),
                        v.meta.description
                    );
                }
                Err(e) => println!("{name:<24} {origin:<8} unreadable: {e:#}"),
            }
        }
    }
    Ok(())
}

/// `tiller vectors import`.
/// `tiller vectors migrate`: the stored vectors of a folder, checked against the configured
/// model, copied into a PostgreSQL store.
pub fn vectors_migrate(cfg: &Config, from: &Path, to: Option<&str>) -> Result<()> {
    if !from.is_dir() {
        bail!("{} is not a folder store", from.display());
    }
    let to = match to.unwrap_or(&cfg.store.url) {
        "" => bail!("name the database with --to, store.url or TILLER_STORE_URL"),
        url => url,
    };
    let model = load_model(cfg)?;
    let (store, skipped) = VectorStore::open(crate::server::model_shape(&model), Some(from))?;
    for s in &skipped {
        eprintln!("skipped {s}");
    }
    let entries = store.list();
    let timeout = std::time::Duration::from_secs(cfg.store.timeout_secs.max(1));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let namespace = match cfg.store.namespace.as_str() {
        "" => model.id.clone(),
        n => n.to_string(),
    };
    let report = rt.block_on(crate::steering::store::schema::copy_in(
        to, &namespace, &entries, timeout,
    ))?;
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    println!(
        "copied {} vector(s) for model {}: {}",
        report.copied.len(),
        model.id,
        list(&report.copied)
    );
    println!("already there, same content: {}", list(&report.unchanged));
    if !report.conflicts.is_empty() {
        println!(
            "already there with other content (the database's kept): {}",
            list(&report.conflicts)
        );
    }
    Ok(())
}

pub fn vectors_import(cfg: &Config, file: &Path, name: Option<&str>) -> Result<()> {
    if !cfg.store.url.is_empty() {
        bail!(
            "store.url names a database: store vectors through a replica (PUT /vectors/NAME), \
             or import into a folder and copy it in with `tiller vectors migrate`"
        );
    }
    let name = name
        .map(str::to_string)
        .or_else(|| file.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let format = file
        .extension()
        .and_then(|e| VectorFormat::parse(&e.to_string_lossy()))
        .unwrap_or_else(|| VectorFormat::sniff(&bytes));
    let model = load_model(cfg)?;
    let v = formats::decode(
        &bytes,
        format,
        &formats::defaults_for(&name, &model.id, "import"),
    )?;
    let (store, _) = VectorStore::open(crate::server::model_shape(&model), Some(&cfg.vectors.dir))?;
    let (entry, _) = store
        .put(v, &Precondition::default())
        .map_err(|e| anyhow!("{e}"))?;
    println!(
        "stored `{}` version {} ({})",
        entry.vector.name, entry.vector.meta.version, entry.etag
    );
    Ok(())
}

/// `tiller vectors export`.
pub fn vectors_export(cfg: &Config, name: &str, out: &Path) -> Result<()> {
    let format = out
        .extension()
        .and_then(|e| VectorFormat::parse(&e.to_string_lossy()))
        .ok_or_else(|| anyhow!("--out must end in .json, .safetensors or .gguf"))?;
    let path = [&cfg.vectors.dir, &cfg.vectors.builtin_dir]
        .iter()
        .map(|d| d.join(format!("{name}.safetensors")))
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow!(
                "no vector named `{name}` in {} or {}",
                cfg.vectors.dir.display(),
                cfg.vectors.builtin_dir.display()
            )
        })?;
    let defaults = VectorDefaults {
        name: Some(name.to_string()),
        ..Default::default()
    };
    let v = SteeringVector::from_safetensors(&std::fs::read(&path)?, &defaults)?;
    // The architecture hint: the configured model's, without loading its weights (empty
    // when it cannot be read).
    let arch = crate::server::resolve_model_path(cfg)
        .ok()
        .and_then(|p| crate::model::checkpoint::Checkpoint::open(&p).ok())
        .and_then(|c| c.architecture_name().ok())
        .unwrap_or_default();
    write_atomic(out, &formats::encode(&v, format, &arch)?)?;
    println!("{}", out.display());
    Ok(())
}

/// Writes `count` versions of a wide vector whose every value equals its version number.
pub fn stress_write(dir: &Path, name: &str, count: u64, width: usize) -> Result<()> {
    let shape = ModelShape {
        model_id: "stress".into(),
        d_model: width,
        n_neurons: width,
        head_width: width,
    };
    let (store, _) = VectorStore::open(shape, Some(dir))?;
    for _ in 0..count {
        let next = store.get(name).map_or(1, |e| e.vector.meta.version + 1);
        let v = SteeringVector {
            name: name.to_string(),
            meta: VectorMeta {
                model: "stress".into(),
                d_model: width,
                kind: VectorKind::Direction,
                method: "stress".into(),
                description: String::new(),
                created: String::new(),
                version: next,
            },
            layers: [(0, std::sync::Arc::from(vec![next as f32; width]))]
                .into_iter()
                .collect(),
        };
        store
            .put(v, &Precondition::default())
            .map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

/// The four runs the batching targets are stated in, and their ratios.
#[derive(Debug, Serialize)]
pub struct LoadSuite {
    pub single: crate::loadgen::LoadReport,
    pub unsteered: crate::loadgen::LoadReport,
    pub same_vector: crate::loadgen::LoadReport,
    pub different_vectors: crate::loadgen::LoadReport,
    /// Aggregate tokens/s with N streams over one stream, whole runs.
    pub concurrency_speedup: f64,
    /// The same while every stream runs, leaving out the ramps (target >= 3 for 8).
    pub steady_concurrency_speedup: f64,
    /// N streams with N different vectors over N unsteered (target >= 0.97).
    pub different_vectors_ratio: f64,
    pub same_vector_ratio: f64,
    /// p99 time to first token with N streams over one stream's (target < 2).
    pub ttft_p99_ratio: f64,
    /// p99 inter-token latency with N streams over one stream's (target <= 3).
    pub itl_p99_ratio: f64,
}

/// Runs the load suite against a server (`cfg.concurrency` streams; the single-stream run
/// uses the same per-request settings).
pub fn load_suite(cfg: &crate::loadgen::LoadConfig) -> Result<LoadSuite> {
    use crate::loadgen::{run, SteeringMode};
    let with =
        |concurrency: usize, steering: SteeringMode, requests: usize| crate::loadgen::LoadConfig {
            concurrency,
            steering,
            requests_per_client: requests,
            ..cfg.clone()
        };
    // Warm up (first-touch page faults, rayon threads).
    run(&with(1, SteeringMode::None, 1))?;
    let single = run(&with(
        1,
        SteeringMode::None,
        cfg.requests_per_client.max(2) * 2,
    ))?;
    let unsteered = run(&with(
        cfg.concurrency,
        SteeringMode::None,
        cfg.requests_per_client,
    ))?;
    let same_vector = run(&with(
        cfg.concurrency,
        SteeringMode::Same,
        cfg.requests_per_client,
    ))?;
    let different_vectors = run(&with(
        cfg.concurrency,
        SteeringMode::Different,
        cfg.requests_per_client,
    ))?;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    Ok(LoadSuite {
        concurrency_speedup: r3(unsteered.tokens_per_s / single.tokens_per_s),
        steady_concurrency_speedup: r3(unsteered.steady_tokens_per_s / single.steady_tokens_per_s),
        different_vectors_ratio: r3(different_vectors.tokens_per_s / unsteered.tokens_per_s),
        same_vector_ratio: r3(same_vector.tokens_per_s / unsteered.tokens_per_s),
        ttft_p99_ratio: r3(unsteered.ttft_p99_ms / single.ttft_p99_ms),
        itl_p99_ratio: r3(unsteered.itl_p99_ms / single.itl_p99_ms),
        single,
        unsteered,
        same_vector,
        different_vectors,
    })
}

/// Settings of `tiller sae train` (its command-line flags).
#[derive(Debug, Clone, clap::Args)]
pub struct SaeTrainArgs {
    #[arg(long, default_value = "res12_4k")]
    pub name: String,
    #[arg(long, default_value_t = 12)]
    pub layer: usize,
    /// Number of features (d_sae).
    #[arg(long, default_value_t = 4096)]
    pub features: usize,
    /// Active features per token.
    #[arg(long, default_value_t = 32)]
    pub k: usize,
    #[arg(long, default_value_t = 12)]
    pub epochs: usize,
    /// Sampled replies per prompt.
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// Tokens per reply.
    #[arg(long, default_value_t = 96)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder (default saes.dir/NAME).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Store the weights as f16 (half the size; how the built-in `res12_4k` is shipped).
    #[arg(long)]
    pub half: bool,
}

/// Generates a corpus with the model itself (continuations of `saes.corpus_dir/prompts.txt`),
/// records `resid_post` at the chosen layer over every token, trains a TopK SAE, and writes it
/// in the SAELens layout (with `report.json` and the corpus) to `saes.dir/NAME`.
pub fn sae_train(cfg: &Config, args: &SaeTrainArgs) -> Result<()> {
    use crate::engine::sampling::SamplingParams;
    use crate::engine::scheduler::{Scheduler, SchedulerConfig};
    use crate::engine::{GenerationEvent, GenerationRequest};
    let started = Instant::now();
    let model = load_model(cfg)?;
    let c = model.dims();
    if args.layer >= c.n_layers {
        anyhow::bail!(
            "--layer {} is out of range (0-{})",
            args.layer,
            c.n_layers - 1
        );
    }
    let prompts_file = cfg.saes.corpus_dir.join("prompts.txt");
    let prompts: Vec<String> = std::fs::read_to_string(&prompts_file)
        .with_context(|| format!("reading {}", prompts_file.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    // 1. The corpus: the model's own replies, sampled, in batches of 8.
    let mut sched = Scheduler::new(SchedulerConfig {
        max_batch_size: 8,
        max_batch_tokens: 512,
        prefill_chunk: 256,
        prefill_while_decoding: 512,
    });
    let mut pending = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for s in 0..args.samples {
            let ids = model.encode_chat(&[crate::model::chat::ChatMessage::new("user", p)])?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let mut sampling =
                SamplingParams::greedy(args.seed.wrapping_add((i * args.samples + s) as u64));
            sampling.temperature = 0.8;
            sampling.top_p = 0.95;
            pending.push((
                GenerationRequest {
                    prompt: ids.clone(),
                    max_tokens: args.max_tokens,
                    sampling,
                    stop: Vec::new(),
                    logprobs: None,
                    steering: None,
                    ignore_eos: false,
                    deadline: None,
                    events: tx,
                    request_id: "sae-train".into(),
                },
                ids,
                rx,
            ));
        }
    }
    let total = pending.len();
    let mut sequences = Vec::with_capacity(total);
    let mut texts = Vec::with_capacity(total);
    let mut queue = pending.into_iter();
    let mut running: Vec<(
        Vec<u32>,
        tokio::sync::mpsc::UnboundedReceiver<GenerationEvent>,
    )> = Vec::new();
    let mut reported = usize::MAX;
    loop {
        while sched.has_room() {
            let Some((req, ids, rx)) = queue.next() else {
                break;
            };
            sched.admit(&model, req);
            running.push((ids, rx));
        }
        if sched.is_idle() && running.is_empty() {
            break;
        }
        sched.step(&model)?.deliver();
        running.retain_mut(|(ids, rx)| {
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    GenerationEvent::Token(t) => ids.push(t.id),
                    GenerationEvent::Done(f) => {
                        texts.push(f.text);
                        sequences.push(std::mem::take(ids));
                        return false;
                    }
                    GenerationEvent::Error(_) => return false,
                }
            }
            true
        });
        if sequences.len() != reported {
            reported = sequences.len();
            eprint!("\rgenerating the corpus: {reported}/{total} replies");
        }
    }
    eprintln!(" ({:.0}s)", started.elapsed().as_secs_f64());
    // 2. Activations.
    let (rows, n) = crate::steering::sae_train::collect_rows(
        &model,
        &sequences,
        crate::model::hooks::HookSite::ResidPost,
        args.layer,
        512,
    )?;
    eprintln!("{n} activation rows at resid_post {}", args.layer);
    // 3. Train.
    let tcfg = crate::steering::sae_train::TrainConfig {
        d_sae: args.features,
        k: args.k,
        epochs: args.epochs,
        batch: 1024,
        lr: 1e-3,
        seed: args.seed,
    };
    let hook = format!("blocks.{}.hook_resid_post", args.layer);
    let (sae, report) = crate::steering::sae_train::train(
        &args.name,
        &hook,
        &rows,
        n,
        c.d_model,
        &tcfg,
        |step, total, loss| {
            eprint!("\rtraining: step {step}/{total}, loss {loss:.3}   ");
        },
    )?;
    eprintln!();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| cfg.saes.dir.join(&args.name));
    let dtype = if args.half {
        candle_core::DType::F16
    } else {
        candle_core::DType::F32
    };
    sae.save_dir(&out, dtype)?;
    let report_json = serde_json::json!({"config": tcfg, "report": report, "corpus_replies": texts.len(), "total_seconds": started.elapsed().as_secs_f64()});
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report_json)?,
    )?;
    let corpus: String = texts
        .iter()
        .map(|t| serde_json::to_string(t).unwrap_or_default() + "\n")
        .collect();
    std::fs::write(out.join("corpus.jsonl"), corpus)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "sae": out.display().to_string(), "l0": report.l0, "fvu": report.fvu, "initial_fvu": report.initial_fvu,
            "dead_features": report.dead_features, "dead_fraction": report.dead_fraction,
            "train_tokens": report.train_tokens, "heldout_tokens": report.heldout_tokens,
            "train_seconds": report.seconds, "total_seconds": started.elapsed().as_secs_f64(),
        }))?
    );
    Ok(())
}
