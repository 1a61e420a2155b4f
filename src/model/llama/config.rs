//! A Llama-family checkpoint's hyper-parameters, read from GGUF metadata (`llama.*`,
//! `qwen2.*`) or a Hugging Face `config.json`, including Llama 3.1's RoPE frequency scaling.

use crate::model::cpu::attention::{HeadShape, RopeLayout};
use anyhow::{anyhow, bail, Context};
use candle_core::quantized::gguf_file;

/// Hyper-parameters of a Llama-family checkpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub architecture: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub intermediate_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope_layout: RopeLayout,
    /// Llama 3.1-style per-frequency divisors (GGUF `rope_freqs.weight`, or computed from a
    /// Hugging Face `rope_scaling` of type `llama3`).
    #[serde(skip)]
    pub rope_freq_factors: Option<Vec<f32>>,
    pub qkv_bias: bool,
    pub tied_embeddings: bool,
}

impl LlamaConfig {
    pub(super) fn from_gguf(
        md: &std::collections::HashMap<String, gguf_file::Value>,
    ) -> anyhow::Result<Self> {
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .context("GGUF metadata has no `general.architecture`")?;
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            bail!("architecture `{arch}` is not supported (supported: llama, mistral, qwen2)");
        }
        let get = |key: &str| md.get(&format!("{arch}.{key}"));
        let usize_of = |key: &str| -> anyhow::Result<usize> {
            let v = get(key).with_context(|| format!("GGUF metadata has no `{arch}.{key}`"))?;
            v.to_u64()
                .map(|x| x as usize)
                .or_else(|_| v.to_u32().map(|x| x as usize))
                .or_else(|_| v.to_i32().map(|x| x as usize))
                .map_err(|e| anyhow!("`{arch}.{key}`: {e}"))
        };
        let f64_of = |key: &str, default: f64| -> f64 {
            get(key)
                .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
                .unwrap_or(default)
        };
        let d_model = usize_of("embedding_length")?;
        let n_heads = usize_of("attention.head_count")?;
        let n_kv_heads = usize_of("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = usize_of("attention.key_length").unwrap_or(d_model / n_heads);
        if let Ok(rope_dims) = usize_of("rope.dimension_count") {
            if rope_dims != head_dim {
                bail!(
                    "partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported"
                );
            }
        }
        Ok(Self {
            rope_layout: if arch == "qwen2" {
                RopeLayout::HalfSplit
            } else {
                RopeLayout::Interleaved
            },
            qkv_bias: arch == "qwen2",
            n_layers: usize_of("block_count")?,
            intermediate_size: usize_of("feed_forward_length")?,
            context_length: usize_of("context_length").unwrap_or(4096),
            rms_eps: f64_of("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: f64_of("rope.freq_base", 10_000.0),
            vocab_size: 0,
            tied_embeddings: false,
            rope_freq_factors: None,
            architecture: arch,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
        })
    }

    pub(super) fn from_hf(cfg: &serde_json::Value) -> anyhow::Result<Self> {
        let arch = cfg
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("llama")
            .to_string();
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            bail!("model_type `{arch}` is not supported (supported: llama, mistral, qwen2)");
        }
        let usize_of = |key: &str| -> anyhow::Result<usize> {
            cfg.get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .with_context(|| format!("config.json has no integer `{key}`"))
        };
        let d_model = usize_of("hidden_size")?;
        let n_heads = usize_of("num_attention_heads")?;
        let head_dim = usize_of("head_dim").unwrap_or(d_model / n_heads);
        let rope_theta = cfg
            .get("rope_theta")
            .and_then(|v| v.as_f64())
            .unwrap_or(10_000.0);
        let rope_freq_factors = cfg
            .get("rope_scaling")
            .filter(|s| {
                s.get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|t| t.as_str())
                    == Some("llama3")
            })
            .map(|s| llama3_freq_factors(s, head_dim, rope_theta))
            .transpose()?;
        Ok(Self {
            qkv_bias: arch == "qwen2"
                || cfg
                    .get("attention_bias")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
            architecture: arch,
            n_layers: usize_of("num_hidden_layers")?,
            intermediate_size: usize_of("intermediate_size")?,
            n_kv_heads: usize_of("num_key_value_heads").unwrap_or(n_heads),
            vocab_size: usize_of("vocab_size")?,
            context_length: usize_of("max_position_embeddings").unwrap_or(4096),
            rms_eps: cfg
                .get("rms_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-5),
            rope_layout: RopeLayout::HalfSplit,
            tied_embeddings: cfg
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            rope_freq_factors,
            rope_theta,
            d_model,
            n_heads,
            head_dim,
        })
    }

    pub(super) fn heads(&self) -> HeadShape {
        HeadShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    pub(super) fn check(&self) -> anyhow::Result<()> {
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            bail!(
                "{} query heads cannot share {} KV heads",
                self.n_heads,
                self.n_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head dimension {} is odd", self.head_dim);
        }
        Ok(())
    }
}

/// Llama 3.1's frequency-dependent RoPE scaling, as divisors of the base frequencies.
fn llama3_freq_factors(
    s: &serde_json::Value,
    head_dim: usize,
    theta: f64,
) -> anyhow::Result<Vec<f32>> {
    let num = |k: &str| {
        s.get(k)
            .and_then(|v| v.as_f64())
            .with_context(|| format!("rope_scaling has no `{k}`"))
    };
    let (factor, low, high) = (
        num("factor")?,
        num("low_freq_factor")?,
        num("high_freq_factor")?,
    );
    let original = num("original_max_position_embeddings")?;
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    Ok((0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let scaled = if wavelen < high_wavelen {
                freq
            } else if wavelen > low_wavelen {
                freq / factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 - smooth) * freq / factor + smooth * freq
            };
            (freq / scaled) as f32
        })
        .collect())
}
