//! `tiller device-check`: what to confirm when tiller runs on an accelerator. For the
//! configured model (`scripts/gpu_check.sh` runs it once per model): load it on the device,
//! answer "the capital of France" greedily, generate a steered answer and compare its tokens
//! with the same run on the CPU (candle on f32 weights, the same maths, and the CPU kernels),
//! time decode at batch 1, 8 and 32, and count how many hook calls saw activations on the
//! device. Prints one JSON report. With `--device cpu` the device side is candle's backend on
//! the CPU, so the check itself is tested where no GPU is.

use crate::config::Config;
use crate::engine::sampling::argmax;
use crate::model::hooks::{BatchRows, ChainHooks, HookSite, Hooks};
use crate::model::{Backend, LoadOptions, Logits, Model, Segment};
use crate::steering::intervention::BatchSteering;
use crate::steering::spec::{validate, InterventionSpec, ModelLimits, SteeringPlan};
use anyhow::{anyhow, Context, Result};
use candle_core::{DeviceLocation, Tensor};
use serde::Serialize;
use std::time::Instant;

/// Tokens generated for the France answer and the steered answer.
const ANSWER_TOKENS: usize = 12;
const STEERED_TOKENS: usize = 16;
/// Decode steps timed at each batch size.
const DECODE_STEPS: usize = 32;

/// What one model did on the device.
#[derive(Debug, Serialize)]
pub struct DeviceReport {
    pub model: String,
    pub architecture: String,
    pub device: String,
    pub load_secs: f64,
    pub france_prompt: String,
    pub france_answer: String,
    /// `golden_gate` when the model ships one, else a fixed random direction.
    pub steering: String,
    pub steered_answer: String,
    /// The same run with the same maths (candle, f32 weights) on the CPU.
    pub cpu_candle_steered_answer: String,
    /// The same run on the CPU kernels (quantized weights, 16-bit activations).
    pub cpu_kernels_steered_answer: String,
    /// How many leading steered tokens (of `STEERED_TOKENS`) equal the CPU's, same maths.
    pub steered_tokens_equal_to_cpu_candle: usize,
    /// How many leading steered tokens equal the CPU kernels'.
    pub steered_tokens_equal_to_cpu_kernels: usize,
    pub decode_tok_s_batch_1: f64,
    pub decode_tok_s_batch_8: f64,
    pub decode_tok_s_batch_32: f64,
    /// Hook calls during the steered run, and how many saw the activation on the device.
    pub hook_calls: usize,
    pub hook_calls_on_device: usize,
}

/// Counts where each hooked activation lives.
struct DeviceProbe {
    calls: usize,
    on_device: usize,
}

impl Hooks for DeviceProbe {
    fn is_active(&self, _: HookSite, _: usize) -> bool {
        true
    }

    fn apply(
        &mut self,
        _: HookSite,
        _: usize,
        x: &Tensor,
        _: &BatchRows,
    ) -> candle_core::Result<Option<Tensor>> {
        self.calls += 1;
        self.on_device += usize::from(!matches!(x.device().location(), DeviceLocation::Cpu));
        Ok(None)
    }
}

/// Greedy continuation of `prompt` for `n` tokens, steered by `plan` if given, with `probe`
/// (if given) watching every hook site.
fn greedy(
    model: &Model,
    prompt: &[u32],
    n: usize,
    plan: Option<&SteeringPlan>,
    mut probe: Option<&mut DeviceProbe>,
) -> Result<Vec<u32>> {
    let n_layers = model.dims().n_layers;
    let mut cache = model.new_cache();
    let mut out = Vec::with_capacity(n);
    let mut next: Vec<u32> = prompt.to_vec();
    for _ in 0..n {
        let mut steer = BatchSteering::new(n_layers, vec![(plan, prompt.len())]);
        let mut seg = [Segment {
            tokens: &next,
            cache: &mut cache,
            logits: Logits::Last,
        }];
        let rows = match probe.as_deref_mut() {
            Some(p) => model.run(
                &mut seg,
                &mut ChainHooks {
                    first: &mut steer,
                    second: p,
                },
            )?,
            None => model.run(&mut seg, &mut steer)?,
        };
        let t = argmax(rows.first().and_then(|r| r.first()).context("no logits")?);
        if plan.is_none() && model.tokenizer.is_eos(t) {
            break;
        }
        out.push(t);
        next = vec![t];
    }
    Ok(out)
}

/// Decode tokens/s of `batch` sequences stepping together after a short prompt.
fn decode_rate(model: &Model, prompt: &[u32], batch: usize) -> Result<f64> {
    let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
    let mut next: Vec<Vec<u32>> = vec![prompt.to_vec(); batch];
    let mut seconds = 0.0;
    for step in 0..=DECODE_STEPS {
        let started = Instant::now();
        let mut segs: Vec<Segment> = caches
            .iter_mut()
            .zip(&next)
            .map(|(cache, tokens)| Segment {
                tokens,
                cache,
                logits: Logits::Last,
            })
            .collect();
        let rows = model.run(&mut segs, &mut crate::model::hooks::NoHooks)?;
        // The first pass is the prompt; only decode steps are timed.
        if step > 0 {
            seconds += started.elapsed().as_secs_f64();
        }
        next = rows
            .iter()
            .map(|r| r.first().map(|l| vec![argmax(l)]).unwrap_or_default())
            .collect();
    }
    Ok((batch * DECODE_STEPS) as f64 / seconds)
}

/// The steering plan: the model's own golden_gate at 2.5, else a fixed direction at the
/// middle layer as strong as a quarter of the residual there.
fn steering_plan(cfg: &Config, model: &Model, prompt: &[u32]) -> Result<(String, SteeringPlan)> {
    let store = crate::server::vector_store(cfg, model)?;
    let d = model.dims();
    let spec = if store.get("golden_gate").is_some() {
        InterventionSpec {
            vector: Some("golden_gate".into()),
            coefficient: Some(2.5),
            ..Default::default()
        }
    } else {
        let layer = d.n_layers / 2;
        let mut rec = crate::model::hooks::SiteRecorder::new(HookSite::ResidPost, layer);
        model.run_fresh(&[prompt], Logits::None, usize::MAX, &mut rec)?;
        let norm = rec
            .rows
            .last()
            .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
            .unwrap_or(1.0);
        let values: Vec<f64> = (0..d.d_model)
            .map(|i| ((i as f64) * 0.37 + 1.3).sin())
            .collect();
        let n = values.iter().map(|x| x * x).sum::<f64>().sqrt();
        InterventionSpec {
            values: Some(values.iter().map(|x| x / n * norm as f64 * 0.25).collect()),
            layer: Some(layer as i64),
            coefficient: Some(1.0),
            ..Default::default()
        }
    };
    let label = spec
        .vector
        .clone()
        .unwrap_or_else(|| "random direction".into());
    let plan = validate(
        &[spec],
        &ModelLimits::new(d, 1, &store, &Default::default()),
    )
    .map_err(|e| anyhow!("{e}"))?;
    Ok((label, plan))
}

/// Runs the check for the configured model on `device`.
pub fn check(cfg: &Config, device: &str) -> Result<DeviceReport> {
    let path = crate::server::resolve_model_path(cfg)?;
    let started = Instant::now();
    let dev = crate::server::parse_device(device)?;
    let opts = LoadOptions {
        device: dev,
        backend: Backend::Candle,
        ..crate::server::load_options(cfg)?
    };
    let model = Model::load(&path, None, &opts)?;
    let load_secs = started.elapsed().as_secs_f64();
    let cpu = Model::load(&path, None, &LoadOptions::default())?;
    let cpu_candle = Model::load(
        &path,
        None,
        &LoadOptions {
            backend: Backend::Candle,
            ..LoadOptions::default()
        },
    )?;
    let tok = &model.tokenizer;
    let (france_prompt, france) = match model.chat_template {
        Some(_) => (
            "What is the capital of France?".to_string(),
            model.encode_chat(&[crate::model::chat::ChatMessage::new(
                "user",
                "What is the capital of France?",
            )])?,
        ),
        None => {
            let p = "The capital of France is".to_string();
            let ids = model.encode_prompt(&p)?;
            (p, ids)
        }
    };
    let plain = greedy(&model, &france, ANSWER_TOKENS, None, None)?;
    let (steering, plan) = steering_plan(cfg, &cpu, &france)?;
    let mut probe = DeviceProbe {
        calls: 0,
        on_device: 0,
    };
    let steered = greedy(
        &model,
        &france,
        STEERED_TOKENS,
        Some(&plan),
        Some(&mut probe),
    )?;
    let cpu_kernels = greedy(&cpu, &france, STEERED_TOKENS, Some(&plan), None)?;
    let cpu_same_maths = greedy(&cpu_candle, &france, STEERED_TOKENS, Some(&plan), None)?;
    let equal = |other: &[u32]| {
        steered
            .iter()
            .zip(other)
            .take_while(|(a, b)| a == b)
            .count()
    };
    let bench_prompt = model.encode_prompt("The quick brown fox jumps over the lazy dog.")?;
    Ok(DeviceReport {
        model: model.id.clone(),
        architecture: model.dims().architecture.clone(),
        device: model.runtime().device,
        load_secs,
        france_prompt,
        france_answer: tok.decode(&plain)?,
        steering,
        steered_answer: tok.decode(&steered)?,
        cpu_candle_steered_answer: tok.decode(&cpu_same_maths)?,
        cpu_kernels_steered_answer: tok.decode(&cpu_kernels)?,
        steered_tokens_equal_to_cpu_candle: equal(&cpu_same_maths),
        steered_tokens_equal_to_cpu_kernels: equal(&cpu_kernels),
        decode_tok_s_batch_1: decode_rate(&model, &bench_prompt, 1)?,
        decode_tok_s_batch_8: decode_rate(&model, &bench_prompt, 8)?,
        decode_tok_s_batch_32: decode_rate(&model, &bench_prompt, 32)?,
        hook_calls: probe.calls,
        hook_calls_on_device: probe.on_device,
    })
}
