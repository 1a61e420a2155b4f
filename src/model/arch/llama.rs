//! The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2): RMSNorm before attention and before
//! the MLP, rotary embeddings, grouped-query attention and a SwiGLU MLP (Touvron et al. 2023,
//! <https://arxiv.org/abs/2302.13971>; reference: Hugging Face `modeling_llama.py`, llama.cpp
//! `src/models/llama.cpp`). Qwen2 (Bai et al. 2023) adds biases to q, k and v and keeps
//! Hugging Face's half-split rotary layout in GGUF.
//!
//! Read top-down: configuration, tensor names, block, model.

use super::{Architecture, HyperParams, Loaded, ModelDims};
use crate::model::attention::Attention;
use crate::model::checkpoint::CheckpointFormat;
use crate::model::cpu::attention::{AttentionSpec, HeadShape, Rope, RopeLayout};
use crate::model::hooks::HookSite;
use crate::model::layers::{Activation, Embedding, Linear, Mlp, RmsNorm};
use crate::model::pass::Pass;
use crate::model::weights::names::*;
use crate::model::weights::{name, At, Loader, TensorName};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::sync::Arc;

/// Hyper-parameters of a Llama-family checkpoint.
#[derive(Debug, Clone)]
struct Config {
    n_layers: usize,
    d_model: usize,
    intermediate_size: usize,
    heads: HeadShape,
    context_length: usize,
    rms_eps: f64,
    rope_theta: f64,
    rope_layout: RopeLayout,
    /// Llama 3.1-style per-frequency divisors (GGUF `rope_freqs.weight`, or computed from a
    /// Hugging Face `rope_scaling` of type `llama3`).
    rope_freq_factors: Option<Vec<f32>>,
    /// Linear position scaling (`rope_scaling` of type `linear`).
    rope_linear_scale: f64,
    /// Mistral's sliding window, on every layer.
    window: Option<usize>,
}

impl Config {
    fn read(hp: &HyperParams, arch: &str) -> Result<Self> {
        let d_model = hp.usize("embedding_length", "hidden_size")?;
        let n_heads = hp.usize("attention.head_count", "num_attention_heads")?;
        if n_heads == 0 {
            bail!("the checkpoint declares no attention heads");
        }
        let head_dim = hp
            .opt_usize("attention.key_length", "head_dim")?
            .unwrap_or(d_model / n_heads);
        if let Some(rope_dims) = hp.opt_usize("rope.dimension_count", "")? {
            if rope_dims != head_dim {
                bail!(
                    "partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported"
                );
            }
        }
        let rope_theta = hp.f64_or("rope.freq_base", "rope_theta", 10_000.0);
        let (rope_freq_factors, rope_linear_scale) = rope_scaling(hp, head_dim, rope_theta)?;
        if hp.hf_bool("use_sliding_window") == Some(true) && arch != "mistral" {
            bail!("sliding-window attention (`use_sliding_window`) is not supported for {arch}");
        }
        let window = match arch {
            "mistral" => hp.opt_usize("", "sliding_window")?,
            _ => None,
        };
        Ok(Self {
            n_layers: hp.usize("block_count", "num_hidden_layers")?,
            intermediate_size: hp.usize("feed_forward_length", "intermediate_size")?,
            heads: HeadShape {
                n_heads,
                n_kv_heads: hp
                    .opt_usize("attention.head_count_kv", "num_key_value_heads")?
                    .unwrap_or(n_heads),
                head_dim,
            },
            context_length: hp
                .opt_usize("context_length", "max_position_embeddings")?
                .unwrap_or(4096),
            rms_eps: hp.f64_or("attention.layer_norm_rms_epsilon", "rms_norm_eps", 1e-5),
            // llama.cpp permutes Llama's q/k rows to interleaved pairs when it converts to
            // GGUF; Qwen2 GGUF files and every Hugging Face checkpoint keep the half split.
            rope_layout: if hp.is_gguf() && arch != "qwen2" {
                RopeLayout::Interleaved
            } else {
                RopeLayout::HalfSplit
            },
            rope_theta,
            rope_freq_factors,
            rope_linear_scale,
            window,
            d_model,
        })
    }
}

/// The RoPE scaling a checkpoint asks for: Llama 3.1's per-frequency factors or a linear
/// factor; other kinds (YaRN, dynamic NTK, ...) are refused rather than ignored.
fn rope_scaling(hp: &HyperParams, head_dim: usize, theta: f64) -> Result<(Option<Vec<f32>>, f64)> {
    if hp.is_gguf() {
        return match hp.opt_string("rope.scaling.type").as_deref() {
            None | Some("none") => Ok((None, 1.0)),
            Some("linear") => Ok((None, hp.f64_or("rope.scaling.factor", "", 1.0).max(1e-6))),
            Some(other) => bail!("RoPE scaling `{other}` is not supported"),
        };
    }
    let Some(s) = hp.hf_raw("rope_scaling") else {
        return Ok((None, 1.0));
    };
    let kind = s.get("rope_type").or_else(|| s.get("type"));
    match kind.and_then(|t| t.as_str()) {
        None | Some("default") => Ok((None, 1.0)),
        Some("linear") => Ok((
            None,
            s.get("factor")
                .and_then(|f| f.as_f64())
                .unwrap_or(1.0)
                .max(1e-6),
        )),
        Some("llama3") => Ok((Some(llama3_freq_factors(s, head_dim, theta)?), 1.0)),
        Some(other) => bail!("RoPE scaling `{other}` is not supported"),
    }
}

/// Llama 3.1's frequency-dependent RoPE scaling, as divisors of the base frequencies.
fn llama3_freq_factors(s: &serde_json::Value, head_dim: usize, theta: f64) -> Result<Vec<f32>> {
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

const ROPE_FREQS: TensorName = name("rope_freqs.weight", "rope_freqs.weight");
const Q_BIAS: TensorName = name("attn_q.bias", "self_attn.q_proj.bias");
const K_BIAS: TensorName = name("attn_k.bias", "self_attn.k_proj.bias");
const V_BIAS: TensorName = name("attn_v.bias", "self_attn.v_proj.bias");
const O_BIAS: TensorName = name("attn_output.bias", "self_attn.o_proj.bias");
const FFN_NORM: TensorName = name("ffn_norm.weight", "post_attention_layernorm.weight");

/// One block: `x += attn(norm(x))`, then `x += mlp(norm(x))`.
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn load(ld: &mut Loader, cfg: &Config, rope: &Arc<Rope>, l: usize) -> Result<Self> {
        let at = At::Layer(l);
        let biases = ld.has(Q_BIAS, at).then_some(&[Q_BIAS, K_BIAS, V_BIAS][..]);
        let (d, eps) = (cfg.d_model, cfg.rms_eps);
        Ok(Self {
            attn_norm: ld.norm(ATTN_NORM, at, d, eps, false)?,
            attn: Attention {
                qkv: ld.linear(&[Q, K, V], biases, at, d)?,
                o: ld.linear(
                    &[O],
                    ld.has(O_BIAS, at).then_some(&[O_BIAS][..]),
                    at,
                    cfg.heads.q_dim(),
                )?,
                q_norm: None,
                k_norm: None,
                spec: AttentionSpec {
                    shape: cfg.heads,
                    rope: rope.clone(),
                    scale: 1.0 / (cfg.heads.head_dim as f32).sqrt(),
                    window: cfg.window,
                    softcap: None,
                },
            },
            ffn_norm: ld.norm(FFN_NORM, at, d, eps, false)?,
            mlp: Mlp {
                gate_up: ld.linear(&[GATE, UP], None, at, d)?,
                down: ld.linear(&[DOWN], None, at, cfg.intermediate_size)?,
                act: Activation::Silu,
                width: cfg.intermediate_size,
            },
        })
    }

    fn forward(&self, p: &mut Pass, l: usize, x: Tensor) -> Result<Tensor> {
        let x = p.hook(HookSite::ResidPre, l, x)?;
        let a = self.attn.forward(p, l, &self.attn_norm.forward(&x)?)?;
        let x = p.add_to_residual(HookSite::AttnOut, l, &x, a)?;
        let m = self.mlp.forward(p, l, &self.ffn_norm.forward(&x)?)?;
        let x = p.add_to_residual(HookSite::MlpOut, l, &x, m)?;
        p.hook(HookSite::ResidPost, l, x)
    }
}

/// A loaded Llama-family model.
struct Llama {
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    tied: bool,
}

/// Loads a Llama-family checkpoint (`arch`: `llama`, `mistral` or `qwen2`).
pub fn load(ld: &mut Loader, arch: &str) -> Result<Loaded> {
    let mut cfg = Config::read(&ld.hyper_params(arch)?, arch)?;
    if ld.format() == CheckpointFormat::Gguf && ld.has(ROPE_FREQS, At::Global) {
        cfg.rope_freq_factors = Some(ld.floats(ROPE_FREQS, At::Global)?);
    }
    let rope = Arc::new(Rope::new(
        cfg.rope_layout,
        cfg.heads.head_dim,
        cfg.rope_theta,
        cfg.rope_freq_factors.as_deref(),
        cfg.rope_linear_scale,
    ));
    let (embed, vocab_size) = ld.embedding(EMBED, cfg.d_model, None)?;
    let blocks = (0..cfg.n_layers)
        .map(|l| Block::load(ld, &cfg, &rope, l))
        .collect::<Result<Vec<_>>>()?;
    let tied = !ld.has(LM_HEAD, At::Global);
    let lm_head = if tied {
        embed.as_head()?
    } else {
        ld.linear(&[LM_HEAD], None, At::Global, cfg.d_model)?
    };
    let net = Llama {
        norm: ld.norm(FINAL_NORM, At::Global, cfg.d_model, cfg.rms_eps, false)?,
        embed,
        blocks,
        lm_head,
        tied,
    };
    Ok(Loaded {
        dims: ModelDims::new(
            arch,
            (cfg.n_layers, cfg.d_model, cfg.intermediate_size),
            cfg.heads,
            vocab_size,
            cfg.context_length,
        ),
        net: Box::new(net),
    })
}

impl Architecture for Llama {
    fn forward(&self, p: &mut Pass) -> Result<Tensor> {
        let x = self.embed.forward(&p.batch.tokens, p.device)?;
        self.forward_from(p, 0, x)
    }

    fn forward_from(&self, p: &mut Pass, first: usize, mut x: Tensor) -> Result<Tensor> {
        for (l, block) in self.blocks.iter().enumerate().skip(first) {
            x = block.forward(p, l, x)?;
        }
        Ok(x)
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.norm.forward(x)?)?)
    }

    fn visit_weights(&self, f: &mut dyn FnMut(&'static str, usize)) {
        let blocks = self.blocks.iter().map(|b| (&b.attn, &b.mlp));
        super::visit_model_weights(&self.embed, &self.lm_head, self.tied, blocks, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let s = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let f = llama3_freq_factors(&s, 128, 500_000.0).unwrap();
        assert_eq!(f.len(), 64);
        // Wavelengths under 8192/4 are kept, over 8192 divided by the factor, smooth between.
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "{f:?}");
        assert!(f.iter().any(|&x| x > 1.0 && x < 8.0));
    }

    #[test]
    fn rope_scaling_is_read_or_refused() {
        let cfg = |scaling: serde_json::Value| {
            serde_json::json!({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                "intermediate_size": 96, "rope_scaling": scaling})
        };
        let c = Config::read(
            &HyperParams::Hf(&cfg(serde_json::json!({"type": "linear", "factor": 2.0}))),
            "llama",
        )
        .unwrap();
        assert_eq!(c.rope_linear_scale, 2.0);
        for kind in ["yarn", "dynamic", "longrope"] {
            let err = Config::read(
                &HyperParams::Hf(&cfg(serde_json::json!({"rope_type": kind}))),
                "llama",
            )
            .unwrap_err();
            assert!(err.to_string().contains(kind), "{err}");
        }
        let mistral = serde_json::json!({"hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 96, "sliding_window": 4096});
        assert_eq!(
            Config::read(&HyperParams::Hf(&mistral), "mistral")
                .unwrap()
                .window,
            Some(4096)
        );
        assert_eq!(
            Config::read(&HyperParams::Hf(&mistral), "llama")
                .unwrap()
                .window,
            None
        );
    }
}
