//! The forward pass on tiny random models of every architecture: checkpoint formats agree,
//! our kernels agree with the plain candle reference, Gemma agrees with candle-transformers'
//! independent implementation, and results do not depend on batching or chunking.

mod common;

use candle_core::quantized::GgmlDType;
use tiller::model::hooks::NoHooks;
use tiller::model::Model;
use tiller::model::{Backend, LoadOptions, PackedBatch};
use tiller::testing::{write_tiny_gguf, write_tiny_hf, TinyArch, TinySpec};

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
fn gguf_and_safetensors_give_the_same_logits_in_every_architecture() {
    for arch in TinyArch::ALL {
        let spec = TinySpec::of(arch);
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
            assert_eq!(a.dims().architecture, arch.gguf_name());
            assert_eq!(b.dims().architecture, arch.hf_name());
            // Gemma 3's GGUF has the larger SentencePiece vocabulary; the rows both share
            // must agree.
            let (la, lb) = (run(&a, STEPS), run(&b, STEPS));
            let n = lb[0].len();
            let la: Vec<Vec<f32>> = la.iter().map(|r| r[..n].to_vec()).collect();
            let d = max_abs_diff(&la, &lb);
            // The two layouts rotate keys in different orders (interleaved pairs against
            // halves): the f32 keys agree to rounding, but the f16 cache of the CPU kernels can
            // round one of them to the neighbouring f16 (2^-11 of it), moving logits by up to
            // a few 1e-4. A wrong mapping moves them by far more.
            assert!(
                d < 1e-3,
                "{arch:?} {backend:?}: GGUF and safetensors logits differ by {d}"
            );
            if arch != TinyArch::Gemma3 {
                let text = "the theater in a tiny test";
                assert_eq!(
                    a.tokenizer.encode(text, true).unwrap(),
                    b.tokenizer.encode(text, true).unwrap()
                );
            }
        }
    }
}

/// Logits of an independent implementation (candle-transformers' f32 Gemma 2 and Gemma 3) on
/// the same tiny Hugging Face folder, after `tokens`. The tokens go in one at a time: then
/// candle's local layers keep exactly `sliding_window` keys in their rotating caches, as
/// Hugging Face and llama.cpp attend (its prefill mask lets one more key in).
fn candle_gemma_logits(
    folder: &std::path::Path,
    cfg: serde_json::Value,
    arch: TinyArch,
    tokens: &[u32],
) -> Vec<f32> {
    use candle_transformers::models::{gemma2, gemma3};
    let dev = candle_core::Device::Cpu;
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[folder.join("model.safetensors")],
            candle_core::DType::F32,
            &dev,
        )
        .unwrap()
    };
    type Step = Box<dyn FnMut(&candle_core::Tensor, usize) -> candle_core::Tensor>;
    let mut step: Step = match arch {
        TinyArch::Gemma2 => {
            let cfg: gemma2::Config = serde_json::from_value(cfg).unwrap();
            let mut m = gemma2::Model::new(false, &cfg, vb).unwrap();
            Box::new(move |ids, pos| m.forward(ids, pos).unwrap())
        }
        TinyArch::Gemma3 => {
            let cfg: gemma3::Config = serde_json::from_value(cfg).unwrap();
            let mut m = gemma3::Model::new(false, &cfg, vb).unwrap();
            Box::new(move |ids, pos| m.forward(ids, pos).unwrap())
        }
        _ => unreachable!(),
    };
    let mut logits = None;
    for (pos, &t) in tokens.iter().enumerate() {
        let ids = candle_core::Tensor::new(&[t], &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = Some(step(&ids, pos));
    }
    logits.unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn gemma_matches_candle_transformers_on_tiny_random_weights() {
    // Gemma 3: more tokens than the window, so local layers differ from global ones. candle's
    // Gemma 2 has no sliding window, so its prompt stays within the window.
    // The third case leaves the Gemma 3 layer pattern to the default (five local layers, then
    // a global one) over seven layers.
    let cases = [
        (TinyArch::Gemma3, 14, 4),
        (TinyArch::Gemma2, 6, 4),
        (TinyArch::Gemma3, 14, 7),
    ];
    for (arch, len, n_layers) in cases {
        let spec = TinySpec {
            n_layers,
            ..TinySpec::of(arch)
        };
        let dir = tempfile::tempdir().unwrap();
        let hf = write_tiny_hf(dir.path(), &spec).unwrap();
        let path = hf.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if n_layers == 7 {
            cfg["sliding_window_pattern"] = 6.into();
            let mut ours = cfg.clone();
            ours.as_object_mut()
                .unwrap()
                .remove("sliding_window_pattern");
            std::fs::write(&path, ours.to_string()).unwrap();
        }
        let model = Model::load(&hf, None, &LoadOptions::default()).unwrap();
        let tokens: Vec<u32> = (0..len).map(|i| 40 + 7 * i).collect();
        let ours = run(&model, &[&tokens]).remove(0);
        let theirs = candle_gemma_logits(&hf, cfg, arch, &tokens);
        let d = max_abs_diff(std::slice::from_ref(&ours), &[theirs]);
        let scale = ours.iter().map(|x| x.abs()).fold(0.0, f32::max);
        assert!(scale > 0.1, "{arch:?}: logits are degenerate ({scale})");
        // tiller's KV cache holds keys and values in f16 (as llama.cpp's does), candle's in
        // f32: about 1.5e-4 of the logits here.
        assert!(
            d < 5e-4 * scale.max(1.0),
            "{arch:?}: tiller and candle-transformers differ by {d} (scale {scale})"
        );
    }
}

#[test]
fn cpu_kernels_match_the_plain_candle_reference_in_every_architecture() {
    for arch in TinyArch::ALL {
        for dtype in [GgmlDType::F32, GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let dir = tempfile::tempdir().unwrap();
            let path = write_tiny_gguf(dir.path(), &TinySpec::of(arch), dtype).unwrap();
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
            assert!(scale > 0.1, "{arch:?}: logits are degenerate ({scale})");
            // Quantized weights meet 16-bit activations in the kernels (a relative error of
            // about 1e-5 per product), and the KV cache holds keys and values in f16 (2^-12
            // each on average, as in llama.cpp): together up to about 4e-4 of the logits here,
            // far below what changes a token.
            assert!(
                d < 1e-3 * scale,
                "{arch:?} {dtype:?}: kernels differ from the reference by {d} (scale {scale})"
            );
        }
    }
}

#[test]
fn a_sequence_gets_the_same_logits_alone_chunked_or_batched_in_every_architecture() {
    for arch in TinyArch::ALL {
        let model = common::tiny_model(&TinySpec::of(arch), GgmlDType::Q4_1, Backend::CpuKernels);
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
        assert_eq!(
            alone[0], last,
            "{arch:?}: chunked prefill changed the logits"
        );
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
        assert_eq!(rows[1], alone[0], "{arch:?}: batching changed the logits");
        assert_eq!(rows[0], run(&model, &[&other])[0]);
    }
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

/// `tiller bench --batch` reports every size asked for, and refuses sizes and contexts it
/// cannot run.
#[test]
fn the_batch_benchmark_reports_each_size_and_refuses_bad_ones() {
    let model = common::tiny_model(&TinySpec::default(), GgmlDType::Q8_0, Backend::CpuKernels);
    let r = tiller::cli::bench_batch(&model, &[1, 3], 8, 4).unwrap();
    assert_eq!(r.iter().map(|b| b.batch).collect::<Vec<_>>(), [1, 3]);
    for b in &r {
        assert!(b.decode_tok_s > 0.0 && b.decode_tok_s.is_finite(), "{b:?}");
        assert_eq!((b.context, b.decode_tokens), (8, 4));
    }
    assert!(tiller::cli::bench_batch(&model, &[0], 8, 4).is_err());
    let too_long = model.dims().context_length;
    assert!(tiller::cli::bench_batch(&model, &[1], too_long, 4).is_err());
}
