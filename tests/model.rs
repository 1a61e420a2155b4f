//! The forward pass on tiny random models: checkpoint formats agree, our kernels agree with
//! the plain candle reference, and results do not depend on batching or chunking.

mod common;

use candle_core::quantized::GgmlDType;
use tiller::model::hooks::NoHooks;
use tiller::model::Model;
use tiller::model::{Backend, LoadOptions, PackedBatch};
use tiller::testing::{write_tiny_gguf, write_tiny_hf, TinySpec};

/// Logits after each of several steps: a prompt, then single tokens.
fn run(model: &Model, steps: &[&[u32]]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    steps
        .iter()
        .map(|toks| {
            let mut b = PackedBatch::default();
            b.push(toks, cache.len(), true);
            let l = model
                .forward(&b, &mut [&mut cache], &mut NoHooks)
                .unwrap()
                .unwrap();
            l.squeeze(0).unwrap().to_vec1().unwrap()
        })
        .collect()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const STEPS: &[&[u32]] = &[&[1, 40, 41, 42, 200, 7, 9], &[100], &[3], &[250]];

#[test]
fn gguf_and_safetensors_give_the_same_logits() {
    for spec in [
        TinySpec::default(),
        TinySpec {
            qkv_bias: true,
            seed: 5,
            ..Default::default()
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let gguf = write_tiny_gguf(dir.path(), &spec, GgmlDType::F32).unwrap();
        let hf = write_tiny_hf(dir.path(), &spec).unwrap();
        for backend in [Backend::CpuKernels, Backend::Candle] {
            let opts = LoadOptions {
                backend,
                ..Default::default()
            };
            let a = Model::load(&gguf, None, &opts).unwrap();
            let b = Model::load(&hf, None, &opts).unwrap();
            let arch = if spec.qkv_bias { "qwen2" } else { "llama" };
            assert_eq!(
                (
                    a.dims().architecture.as_str(),
                    b.dims().architecture.as_str()
                ),
                (arch, arch)
            );
            let (la, lb) = (run(&a, STEPS), run(&b, STEPS));
            let d = max_abs_diff(&la, &lb);
            assert!(
                d < 1e-4,
                "{backend:?} bias={}: GGUF and safetensors logits differ by {d}",
                spec.qkv_bias
            );
            // The two tokenizers agree too.
            let text = "the theater in a tiny test";
            assert_eq!(
                a.tokenizer.encode(text, true).unwrap(),
                b.tokenizer.encode(text, true).unwrap()
            );
        }
    }
}

#[test]
fn cpu_kernels_match_the_plain_candle_reference() {
    for dtype in [GgmlDType::F32, GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_tiny_gguf(dir.path(), &TinySpec::default(), dtype).unwrap();
        let ours = Model::load(&path, None, &LoadOptions::default()).unwrap();
        let reference = Model::load(
            &path,
            None,
            &LoadOptions {
                backend: Backend::Candle,
                ..Default::default()
            },
        )
        .unwrap();
        let (a, b) = (run(&ours, STEPS), run(&reference, STEPS));
        let d = max_abs_diff(&a, &b);
        let scale = a.iter().flatten().map(|x| x.abs()).fold(0.0, f32::max);
        assert!(scale > 0.1, "logits are degenerate ({scale})");
        // Quantized weights meet 16-bit activations in the kernels: a relative error of about
        // 1e-5 per product (about 1e-4 of the logits here), far below what changes a token.
        assert!(
            d < 3e-4 * scale,
            "{dtype:?}: kernels differ from the reference by {d} (scale {scale})"
        );
    }
}

#[test]
fn a_sequence_gets_the_same_logits_alone_chunked_or_batched() {
    let model = common::tiny_model(&TinySpec::default(), GgmlDType::Q4_1, Backend::CpuKernels);
    let prompt: Vec<u32> = (10..40).collect();
    let other: Vec<u32> = (100..117).collect();
    // Alone, in one prefill.
    let alone = run(&model, &[&prompt]);
    // In chunks of 7.
    let mut cache = model.new_cache();
    let mut last: Vec<f32> = Vec::new();
    for chunk in prompt.chunks(7) {
        let mut b = PackedBatch::default();
        b.push(chunk, cache.len(), true);
        last = model
            .forward(&b, &mut [&mut cache], &mut NoHooks)
            .unwrap()
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
    }
    assert_eq!(alone[0], last, "chunked prefill changed the logits");
    // Packed with another sequence, which is mid-way through its own prompt.
    let (mut c1, mut c2) = (model.new_cache(), model.new_cache());
    let mut b = PackedBatch::default();
    b.push(&other[..5], 0, false);
    model.forward(&b, &mut [&mut c2], &mut NoHooks).unwrap();
    let mut b = PackedBatch::default();
    b.push(&other[5..], 5, true);
    b.push(&prompt, 0, true);
    let l = model
        .forward(&b, &mut [&mut c2, &mut c1], &mut NoHooks)
        .unwrap()
        .unwrap();
    let rows: Vec<Vec<f32>> = l.to_vec2().unwrap();
    assert_eq!(rows[1], alone[0], "batching changed the logits");
    assert_eq!(rows[0], run(&model, &[&other])[0]);
}

#[test]
fn forward_rejects_bad_batches_without_panicking() {
    let model = common::tiny_model(&TinySpec::default(), GgmlDType::Q8_0, Backend::CpuKernels);
    let mut cache = model.new_cache();
    let mut b = PackedBatch::default();
    b.push(&[999_999], 0, true);
    let err = model
        .forward(&b, &mut [&mut cache], &mut NoHooks)
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let mut b = PackedBatch::default();
    b.push(&[1, 2], 5, true);
    let err = model
        .forward(&b, &mut [&mut cache], &mut NoHooks)
        .unwrap_err();
    assert!(err.to_string().contains("cache holds 0"), "{err}");
    let long: Vec<u32> = vec![5; 300];
    let mut b = PackedBatch::default();
    b.push(&long, 0, true);
    let err = model
        .forward(&b, &mut [&mut cache], &mut NoHooks)
        .unwrap_err();
    assert!(err.to_string().contains("context length"), "{err}");
}
