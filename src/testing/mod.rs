//! Test support: tiny random-weight models of every architecture, written to disk in both
//! checkpoint formats (GGUF as llama.cpp's converter writes it, and a Hugging Face folder),
//! with tiny tokenizers ([`vocab`]) and SmolLM2's chat template. Used by unit and integration
//! tests; not part of the served API.

pub mod vocab;

use anyhow::Result;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
pub use vocab::{bytes_to_unicode, tiny_vocab};

/// SmolLM2-135M-Instruct's chat template (as in its GGUF file).
pub const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The architecture of a tiny model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    Llama,
    /// Llama with q/k/v biases and half-split rotary in GGUF.
    Qwen2,
    /// Soft-capped attention and logits, alternating local and global layers.
    Gemma2,
    /// q/k norms, local layers with their own RoPE base; a SentencePiece vocabulary in GGUF.
    Gemma3,
}

impl TinyArch {
    pub const ALL: [TinyArch; 4] = [
        TinyArch::Llama,
        TinyArch::Qwen2,
        TinyArch::Gemma2,
        TinyArch::Gemma3,
    ];

    /// GGUF `general.architecture`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            TinyArch::Llama => "llama",
            TinyArch::Qwen2 => "qwen2",
            TinyArch::Gemma2 => "gemma2",
            TinyArch::Gemma3 => "gemma3",
        }
    }

    /// Hugging Face `model_type`.
    pub fn hf_name(self) -> &'static str {
        match self {
            TinyArch::Gemma3 => "gemma3_text",
            other => other.gguf_name(),
        }
    }

    pub fn is_gemma(self) -> bool {
        matches!(self, TinyArch::Gemma2 | TinyArch::Gemma3)
    }
}

/// Shape of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub arch: TinyArch,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Per-head width (Gemma's differs from `d_model / n_heads`).
    pub head_dim: usize,
    pub ffn: usize,
    pub context: usize,
    /// Keys a local layer sees (Gemma); every other layer is local.
    pub window: usize,
    pub seed: u32,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self::of(TinyArch::Llama)
    }
}

impl TinySpec {
    /// A tiny model of `arch` with the defaults the tests use.
    pub fn of(arch: TinyArch) -> Self {
        Self {
            arch,
            d_model: 64,
            n_layers: if arch.is_gemma() { 4 } else { 3 },
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: if arch.is_gemma() { 24 } else { 16 },
            ffn: 96,
            context: 256,
            window: 6,
            seed: 1,
        }
    }
}

/// Deterministic uniform values in `[-scale, scale]`.
pub fn pseudo_random(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(0x9E37_79B9);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            ((s as f32 / u32::MAX as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The weights of a tiny model in Hugging Face layout and names (Gemma's norm weights as
/// Hugging Face stores them: `w` of `(1 + w)`).
pub fn tiny_weights(spec: &TinySpec) -> Result<Vec<(String, Tensor)>> {
    let v = match spec.arch {
        TinyArch::Gemma3 => vocab::tiny_spm_vocab().0.len(),
        _ => tiny_vocab().0.len(),
    };
    let (d, hd) = (spec.d_model, spec.head_dim);
    let gemma = spec.arch.is_gemma();
    let mut g = WeightGen {
        seed: spec.seed * 1000,
        gemma,
    };
    let mut t = |shape: (usize, usize), scale: f32| g.matrix(shape, scale);
    let mut out = vec![("model.embed_tokens.weight".to_string(), t((v, d), 0.5)?)];
    for l in 0..spec.n_layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        out.push((
            p("self_attn.q_proj.weight"),
            t((spec.n_heads * hd, d), 0.2)?,
        ));
        out.push((
            p("self_attn.k_proj.weight"),
            t((spec.n_kv_heads * hd, d), 0.2)?,
        ));
        out.push((
            p("self_attn.v_proj.weight"),
            t((spec.n_kv_heads * hd, d), 0.2)?,
        ));
        out.push((
            p("self_attn.o_proj.weight"),
            t((d, spec.n_heads * hd), 0.2)?,
        ));
        out.push((p("mlp.gate_proj.weight"), t((spec.ffn, d), 0.2)?));
        out.push((p("mlp.up_proj.weight"), t((spec.ffn, d), 0.2)?));
        out.push((p("mlp.down_proj.weight"), t((d, spec.ffn), 0.2)?));
        let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
        if gemma {
            norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
        }
        for n in norms {
            out.push((p(&format!("{n}.weight")), t((1, d), -1.0)?));
        }
        if spec.arch == TinyArch::Gemma3 {
            out.push((p("self_attn.q_norm.weight"), t((1, hd), -1.0)?));
            out.push((p("self_attn.k_norm.weight"), t((1, hd), -1.0)?));
        }
        if spec.arch == TinyArch::Qwen2 {
            out.push((
                p("self_attn.q_proj.bias"),
                t((1, spec.n_heads * hd), 0.1)?.squeeze(0)?,
            ));
            out.push((
                p("self_attn.k_proj.bias"),
                t((1, spec.n_kv_heads * hd), 0.1)?.squeeze(0)?,
            ));
            out.push((
                p("self_attn.v_proj.bias"),
                t((1, spec.n_kv_heads * hd), 0.1)?.squeeze(0)?,
            ));
        }
    }
    out.push(("model.norm.weight".into(), t((1, d), -1.0)?));
    Ok(out)
}

/// Deterministic weights, one seed after another.
struct WeightGen {
    seed: u32,
    gemma: bool,
}

impl WeightGen {
    /// Uniform values in `[-scale, scale]`; a negative `scale` asks for a norm weight
    /// `[1, n]` -> `[n]`, around 1 as applied (`w` for Llama, `1 + w` for Gemma).
    fn matrix(&mut self, shape: (usize, usize), scale: f32) -> Result<Tensor> {
        self.seed += 1;
        let dev = Device::Cpu;
        if scale < 0.0 {
            let w = Tensor::from_vec(pseudo_random(shape.1, self.seed, 0.1), shape.1, &dev)?;
            return Ok(if self.gemma { w } else { (w + 1.0)? });
        }
        Ok(Tensor::from_vec(
            pseudo_random(shape.0 * shape.1, self.seed, scale),
            shape,
            &dev,
        )?)
    }
}

/// llama.cpp's `permute` of q/k rows (Hugging Face half-split rotary to interleaved pairs).
fn permute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((n_head, 2, rows / n_head / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The GGUF name of a Hugging Face tensor name.
fn gguf_name(hf: &str, arch: TinyArch) -> String {
    if hf == "model.embed_tokens.weight" {
        return "token_embd.weight".into();
    }
    if hf == "model.norm.weight" {
        return "output_norm.weight".into();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap_or(hf);
    let (l, name) = rest.split_once('.').unwrap_or(("0", rest));
    let g = match name {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        // Llama's norm before the MLP, Gemma's after attention.
        "post_attention_layernorm.weight" if arch.is_gemma() => "post_attention_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
        other => other,
    };
    format!("blk.{l}.{g}")
}

/// The architecture's hyper-parameters as GGUF metadata.
fn gguf_hyper_params(spec: &TinySpec) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let arch = spec.arch.gguf_name();
    let k = |key: &str| format!("{arch}.{key}");
    let mut md = vec![
        (k("block_count"), V::U32(spec.n_layers as u32)),
        (k("context_length"), V::U32(spec.context as u32)),
        (k("embedding_length"), V::U32(spec.d_model as u32)),
        (k("feed_forward_length"), V::U32(spec.ffn as u32)),
        (k("attention.head_count"), V::U32(spec.n_heads as u32)),
        (k("attention.head_count_kv"), V::U32(spec.n_kv_heads as u32)),
        (k("attention.key_length"), V::U32(spec.head_dim as u32)),
        (k("attention.value_length"), V::U32(spec.head_dim as u32)),
        (k("rope.freq_base"), V::F32(10_000.0)),
        (k("attention.layer_norm_rms_epsilon"), V::F32(1e-6)),
    ];
    match spec.arch {
        TinyArch::Llama | TinyArch::Qwen2 => {
            md.push((k("rope.dimension_count"), V::U32(spec.head_dim as u32)));
        }
        TinyArch::Gemma2 => {
            md.push((k("attention.sliding_window"), V::U32(spec.window as u32)));
            md.push((k("attn_logit_softcapping"), V::F32(1.5)));
            md.push((k("final_logit_softcapping"), V::F32(4.0)));
        }
        TinyArch::Gemma3 => {
            md.push((k("attention.sliding_window"), V::U32(spec.window as u32)));
            md.push((k("attention.sliding_window_pattern"), V::U32(2)));
            md.push((k("rope.freq_base_swa"), V::F32(1_000.0)));
        }
    }
    md
}

/// Writes the tiny model as a GGUF file as llama.cpp's converter would: Llama's q/k rows
/// permuted, Gemma's norm weights with the 1 added; 2-D weights in `dtype` (norms and biases
/// stay f32). Gemma 3 gets the SentencePiece vocabulary and no chat template, the others the
/// BPE vocabulary and SmolLM2's template.
pub fn write_tiny_gguf(dir: &Path, spec: &TinySpec, dtype: GgmlDType) -> Result<PathBuf> {
    use gguf_file::Value as V;
    let arch = spec.arch;
    let mut md: Vec<(String, V)> = vec![
        (
            "general.architecture".into(),
            V::String(arch.gguf_name().into()),
        ),
        ("general.name".into(), V::String("tiny".into())),
    ];
    md.extend(gguf_hyper_params(spec));
    if arch == TinyArch::Gemma3 {
        md.extend(vocab::spm_metadata());
    } else {
        md.extend(vocab::bpe_metadata());
        md.push((
            "tokenizer.chat_template".into(),
            V::String(SMOLLM2_TEMPLATE.into()),
        ));
    }
    let mut tensors = Vec::new();
    for (name, t) in tiny_weights(spec)? {
        let permute = arch == TinyArch::Llama;
        let t = if permute && name.ends_with("q_proj.weight") {
            permute_qk(&t, spec.n_heads)?
        } else if permute && name.ends_with("k_proj.weight") {
            permute_qk(&t, spec.n_kv_heads)?
        } else if arch.is_gemma() && name.ends_with("norm.weight") {
            (t + 1.0)?
        } else {
            t
        };
        let dt = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
        tensors.push((gguf_name(&name, arch), QTensor::quantize(&t, dt)?));
    }
    let path = dir.join(format!("tiny-{}.gguf", arch.gguf_name()));
    let mut f = std::fs::File::create(&path)?;
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(path)
}

/// The architecture's Hugging Face `config.json` (also readable by candle-transformers'
/// models of the same architecture).
pub fn hf_config(spec: &TinySpec, vocab_size: usize) -> serde_json::Value {
    let mut c = serde_json::json!({
        "model_type": spec.arch.hf_name(),
        "hidden_size": spec.d_model,
        "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.context,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "tie_word_embeddings": true,
        "attention_bias": false,
    });
    let extra = match spec.arch {
        TinyArch::Llama | TinyArch::Qwen2 => serde_json::json!({}),
        TinyArch::Gemma2 => serde_json::json!({
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": spec.head_dim,
            "sliding_window": spec.window,
            "attn_logit_softcapping": 1.5,
            "final_logit_softcapping": 4.0,
        }),
        TinyArch::Gemma3 => serde_json::json!({
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": spec.head_dim,
            "sliding_window": spec.window,
            "sliding_window_pattern": 2,
            "rope_local_base_freq": 1000.0,
            "attn_logit_softcapping": null,
            "final_logit_softcapping": null,
        }),
    };
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c
}

/// Writes the tiny model as a Hugging Face folder (config, safetensors, the BPE vocabulary's
/// tokenizer.json and SmolLM2's chat template).
pub fn write_tiny_hf(dir: &Path, spec: &TinySpec) -> Result<PathBuf> {
    let folder = dir.join(format!("tiny-hf-{}", spec.arch.hf_name()));
    std::fs::create_dir_all(&folder)?;
    // Every tiny HF folder uses the BPE vocabulary: what is tested here is the architecture.
    let bpe_spec = TinySpec {
        arch: TinyArch::Llama,
        ..spec.clone()
    };
    let vocab_size = tiny_vocab().0.len();
    let mut weights: HashMap<String, Tensor> = tiny_weights(&TinySpec {
        seed: spec.seed,
        ..spec.clone()
    })?
    .into_iter()
    .collect();
    if spec.arch == TinyArch::Gemma3 {
        // The SentencePiece vocabulary is larger; keep the BPE vocabulary's rows.
        let e = weights["model.embed_tokens.weight"].narrow(0, 0, vocab_size)?;
        weights.insert("model.embed_tokens.weight".into(), e);
    }
    std::fs::write(
        folder.join("config.json"),
        serde_json::to_string_pretty(&hf_config(spec, vocab_size))?,
    )?;
    candle_core::safetensors::save(&weights, folder.join("model.safetensors"))?;
    // The tokenizer.json of the BPE vocabulary, written from the GGUF-built tokenizer.
    let gguf = write_tiny_gguf(dir, &bpe_spec, GgmlDType::F32)?;
    let ckpt = crate::model::checkpoint::Checkpoint::open(&gguf)?;
    ckpt.tokenizer()?
        .save_json(&folder.join("tokenizer.json"))?;
    let tok_cfg = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": SMOLLM2_TEMPLATE,
    });
    std::fs::write(
        folder.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok_cfg)?,
    )?;
    Ok(folder)
}
