//! Commands that run without the HTTP server: one generation, and the speed benchmark.

use crate::api::generate::{
    collect, encode_input, start, validate_settings, GenerateRequest, RawSettings,
};
use crate::config::Config;
use crate::model::hooks::NoHooks;
use crate::model::llama::PackedBatch;
use crate::model::Model;
use crate::server::{build_state, load_model};
use crate::steering::intervention::BatchSteering;
use crate::steering::spec::{validate, InterventionSpec, ModelLimits};
use crate::steering::store::{ModelShape, VectorStore};
use anyhow::{anyhow, Result};
use serde::Serialize;
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
        let plan = state.steering_plan(req.steering.as_deref())?;
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
    let c = model.llama.config();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(prompt_tokens / 5 + 10);
    let mut prompt = model.encode_prompt(&text)?;
    prompt.truncate(prompt_tokens);
    let store = VectorStore::in_memory(ModelShape {
        model_id: model.id.clone(),
        d_model: c.d_model,
        n_neurons: c.intermediate_size,
    });
    // A fixed pseudo-random direction of norm ~10 at every layer.
    let values: Vec<f64> = (0..c.d_model)
        .map(|i| ((i as f64 * 0.7).sin()) * 0.6)
        .collect();
    let spec = InterventionSpec {
        values: Some(values),
        layers: Some((0..c.n_layers as i64).collect()),
        coefficient: Some(1.0),
        ..Default::default()
    };
    let plan = validate(
        &[spec],
        &ModelLimits {
            n_layers: c.n_layers,
            d_model: c.d_model,
            n_neurons: c.intermediate_size,
            max_interventions: 1,
            store: &store,
        },
    )
    .map_err(|e| anyhow!("{e}"))?;
    let runs = [
        Runner::new(&model, None, prompt.len()),
        Runner::new(&model, Some(&plan), prompt.len()),
    ];
    let mut prefill = [0f64; 2];
    let mut caches = [model.llama.new_cache(), model.llama.new_cache()];
    let mut logits: [Vec<f32>; 2] = Default::default();
    for r in 0..repeats.max(1) {
        for k in [r % 2, 1 - r % 2] {
            caches[k] = model.llama.new_cache();
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
        weights: model.llama.weight_format_name().into(),
        kernels: crate::model::cpu::matmul::isa().name().into(),
        threads: model.llama.threads(),
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

    fn step(&self, tokens: &[u32], cache: &mut crate::model::llama::KvCache) -> Result<Vec<f32>> {
        let mut batch = PackedBatch::default();
        batch.push(tokens, cache.len(), true);
        let n_layers = self.model.llama.config().n_layers;
        let logits = match self.plan {
            Some(p) => {
                let mut hooks = BatchSteering::new(n_layers, vec![(Some(p), self.prompt_len)]);
                self.model.llama.forward(&batch, &mut [cache], &mut hooks)?
            }
            None => self
                .model
                .llama
                .forward(&batch, &mut [cache], &mut NoHooks)?,
        };
        Ok(logits
            .ok_or_else(|| anyhow!("no logits"))?
            .squeeze(0)?
            .to_vec1()?)
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
