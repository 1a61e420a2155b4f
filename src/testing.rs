//! Test support: tiny random-weight Llama models written to disk in both checkpoint formats
//! (GGUF with llama.cpp's q/k permutation, and a Hugging Face folder), with a small byte-level
//! BPE tokenizer and SmolLM2's chat template. Used by unit and integration tests; not part of
//! the served API.

use anyhow::Result;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// SmolLM2-135M-Instruct's chat template (as in its GGUF file).
pub const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Shape of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub ffn: usize,
    pub context: usize,
    pub qkv_bias: bool,
    pub seed: u32,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            d_model: 64,
            n_layers: 3,
            n_heads: 4,
            n_kv_heads: 2,
            ffn: 96,
            context: 256,
            qkv_bias: false,
            seed: 1,
        }
    }
}

/// GPT-2's byte-to-character map used by byte-level BPE vocabularies.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        map[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    map
}

/// The tiny vocabulary: three special tokens, the 256 byte symbols, and a few merges.
pub fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3, 3, 3];
    for c in bytes_to_unicode() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (
        tokens,
        types,
        merges.iter().map(|s| s.to_string()).collect(),
    )
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

/// The weights of a tiny model in Hugging Face layout and names.
pub fn tiny_weights(spec: &TinySpec) -> Result<Vec<(String, Tensor)>> {
    let dev = Device::Cpu;
    let (vocab, _, _) = tiny_vocab();
    let v = vocab.len();
    let hd = spec.d_model / spec.n_heads;
    let mut seed = spec.seed * 1000;
    let mut t = |shape: (usize, usize), scale: f32| -> Result<Tensor> {
        seed += 1;
        Ok(Tensor::from_vec(
            pseudo_random(shape.0 * shape.1, seed, scale),
            shape,
            &dev,
        )?)
    };
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        t((v, spec.d_model), 0.5)?,
    )];
    for l in 0..spec.n_layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        out.push((
            p("self_attn.q_proj.weight"),
            t((spec.n_heads * hd, spec.d_model), 0.2)?,
        ));
        out.push((
            p("self_attn.k_proj.weight"),
            t((spec.n_kv_heads * hd, spec.d_model), 0.2)?,
        ));
        out.push((
            p("self_attn.v_proj.weight"),
            t((spec.n_kv_heads * hd, spec.d_model), 0.2)?,
        ));
        out.push((
            p("self_attn.o_proj.weight"),
            t((spec.d_model, spec.n_heads * hd), 0.2)?,
        ));
        out.push((p("mlp.gate_proj.weight"), t((spec.ffn, spec.d_model), 0.2)?));
        out.push((p("mlp.up_proj.weight"), t((spec.ffn, spec.d_model), 0.2)?));
        out.push((p("mlp.down_proj.weight"), t((spec.d_model, spec.ffn), 0.2)?));
        out.push((
            p("input_layernorm.weight"),
            (t((1, spec.d_model), 0.1)? + 1.0)?.squeeze(0)?,
        ));
        out.push((
            p("post_attention_layernorm.weight"),
            (t((1, spec.d_model), 0.1)? + 1.0)?.squeeze(0)?,
        ));
        if spec.qkv_bias {
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
    out.push((
        "model.norm.weight".into(),
        (t((1, spec.d_model), 0.1)? + 1.0)?.squeeze(0)?,
    ));
    Ok(out)
}

/// llama.cpp's `permute` of q/k rows (Hugging Face half-split rotary to interleaved pairs).
fn permute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((n_head, 2, rows / n_head / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn gguf_name(hf: &str) -> String {
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
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        other => other,
    };
    format!("blk.{l}.{g}")
}

/// Writes the tiny model as a GGUF file; 2-D weights in `dtype` (norms and biases stay f32).
pub fn write_tiny_gguf(dir: &Path, spec: &TinySpec, dtype: GgmlDType) -> Result<PathBuf> {
    use gguf_file::Value as V;
    let (tokens, types, merges) = tiny_vocab();
    // Qwen2 checkpoints keep Hugging Face's q/k order (NeoX rotary); llama.cpp permutes Llama's.
    let arch = if spec.qkv_bias { "qwen2" } else { "llama" };
    let permute = arch == "llama";
    let hd = spec.d_model / spec.n_heads;
    let md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        ("general.name".into(), V::String("tiny".into())),
        (format!("{arch}.block_count"), V::U32(spec.n_layers as u32)),
        (
            format!("{arch}.context_length"),
            V::U32(spec.context as u32),
        ),
        (
            format!("{arch}.embedding_length"),
            V::U32(spec.d_model as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            V::U32(spec.ffn as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            V::U32(spec.n_heads as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            V::U32(spec.n_kv_heads as u32),
        ),
        (format!("{arch}.rope.freq_base"), V::F32(10_000.0)),
        (format!("{arch}.rope.dimension_count"), V::U32(hd as u32)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            V::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(types.into_iter().map(V::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            V::Array(merges.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            V::String(SMOLLM2_TEMPLATE.into()),
        ),
    ];
    let mut tensors = Vec::new();
    for (name, t) in tiny_weights(spec)? {
        let t = if permute && name.ends_with("q_proj.weight") {
            permute_qk(&t, spec.n_heads)?
        } else if permute && name.ends_with("k_proj.weight") {
            permute_qk(&t, spec.n_kv_heads)?
        } else {
            t
        };
        let dt = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
        tensors.push((gguf_name(&name), QTensor::quantize(&t, dt)?));
    }
    let path = dir.join("tiny.gguf");
    let mut f = std::fs::File::create(&path)?;
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(path)
}

/// Writes the tiny model as a Hugging Face folder (config, safetensors, tokenizer).
pub fn write_tiny_hf(dir: &Path, spec: &TinySpec) -> Result<PathBuf> {
    let folder = dir.join("tiny-hf");
    std::fs::create_dir_all(&folder)?;
    let (tokens, _, _) = tiny_vocab();
    let config = serde_json::json!({
        "model_type": if spec.qkv_bias { "qwen2" } else { "llama" },
        "hidden_size": spec.d_model,
        "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "max_position_embeddings": spec.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": tokens.len(),
        "tie_word_embeddings": true
    });
    std::fs::write(
        folder.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let weights: HashMap<String, Tensor> = tiny_weights(spec)?.into_iter().collect();
    candle_core::safetensors::save(&weights, folder.join("model.safetensors"))?;
    // The tokenizer.json of the same vocabulary, written from the GGUF-built tokenizer.
    let gguf = write_tiny_gguf(dir, spec, GgmlDType::F32)?;
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
