//! The Gemma family: Gemma 2 (Gemma Team 2024, <https://arxiv.org/abs/2408.00118>) and Gemma 3
//! (Gemma Team 2025, <https://arxiv.org/abs/2503.19786>). References: Hugging Face
//! `modeling_gemma2.py` / `modeling_gemma3.py`, llama.cpp `src/models/gemma2.cpp` /
//! `gemma3.cpp`.
//!
//! Both differ from Llama in the same ways: RMSNorm weights are `(1 + w)` (llama.cpp's GGUF
//! converter stores the sum), every sub-layer has a norm before *and* after it (the
//! post-norm's output is what enters the residual stream, so that is what `attn_out` and
//! `mlp_out` hooks see), the MLP is GeGLU with tanh-approximated GELU, embeddings are scaled
//! by `sqrt(d_model)`, the head is tied to the embeddings, and local (sliding-window) layers
//! alternate with global ones. Gemma 2 soft-caps attention scores and final logits; Gemma 3
//! normalises each query and key head instead, has five local layers per global one, and
//! gives local layers their own RoPE base.
//!
//! Read top-down: configuration, tensor names, block, model.

use super::{Architecture, HyperParams, Loaded, ModelDims};
use crate::model::attention::Attention;
use crate::model::cpu::attention::{AttentionSpec, HeadShape, Rope, RopeLayout};
use crate::model::hooks::HookSite;
use crate::model::layers::{Activation, Embedding, Linear, Mlp, RmsNorm};
use crate::model::pass::Pass;
use crate::model::weights::names::*;
use crate::model::weights::{name, At, Loader, TensorName};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::sync::Arc;

/// Which Gemma.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Gemma2,
    Gemma3,
}

/// Hyper-parameters of a Gemma checkpoint.
#[derive(Debug, Clone)]
struct Config {
    version: Version,
    n_layers: usize,
    d_model: usize,
    intermediate_size: usize,
    heads: HeadShape,
    context_length: usize,
    rms_eps: f64,
    /// Multiplies `q · k`: `query_pre_attn_scalar^-1/2`.
    attn_scale: f32,
    /// Whether each layer is local (sliding-window).
    local: Vec<bool>,
    window: usize,
    global_rope_base: f64,
    /// Linear position scaling of the global layers' RoPE (Gemma 3 4B and larger).
    global_rope_scale: f64,
    local_rope_base: f64,
    attn_softcap: Option<f32>,
    final_softcap: Option<f32>,
}

impl Config {
    fn read(hp: &HyperParams, version: Version) -> Result<Self> {
        let d_model = hp.usize("embedding_length", "hidden_size")?;
        let n_heads = hp.usize("attention.head_count", "num_attention_heads")?;
        if n_heads == 0 {
            bail!("the checkpoint declares no attention heads");
        }
        let head_dim = hp
            .opt_usize("attention.key_length", "head_dim")?
            .unwrap_or(d_model / n_heads);
        let n_layers = hp.usize("block_count", "num_hidden_layers")?;
        let pattern = hp
            .opt_usize("attention.sliding_window_pattern", "sliding_window_pattern")?
            .unwrap_or(match version {
                Version::Gemma2 => 2,
                Version::Gemma3 => 6,
            });
        // Hugging Face's defaults; a Gemma 3 GGUF without a window has none (llama.cpp).
        let window = hp
            .opt_usize("attention.sliding_window", "sliding_window")?
            .unwrap_or(match (version, hp.is_gguf()) {
                (Version::Gemma3, true) => 0,
                _ => 4096,
            });
        let local = match hp.hf_raw("layer_types").and_then(|v| v.as_array()) {
            Some(types) => types
                .iter()
                .map(|t| window > 0 && t.as_str() == Some("sliding_attention"))
                .collect(),
            // Every `pattern`-th layer is global, the others local (llama.cpp's
            // `set_swa_pattern`; Hugging Face's `sliding_window_pattern`).
            None => (0..n_layers)
                .map(|l| window > 0 && (pattern == 0 || l % pattern < pattern - 1))
                .collect::<Vec<_>>(),
        };
        if local.len() != n_layers {
            bail!(
                "config.json `layer_types` lists {} layers, the model has {n_layers}",
                local.len()
            );
        }
        // Gemma 3 27B scales by d_model / n_heads, every other size by head_dim; both ship
        // the value as `query_pre_attn_scalar`. llama.cpp recognises 27B by its depth.
        let default_scalar = match (version, n_layers) {
            (Version::Gemma3, 62) | (Version::Gemma2, 46) => d_model / n_heads,
            _ => head_dim,
        };
        let scalar = hp.f64_or("", "query_pre_attn_scalar", default_scalar as f64);
        let ropes = Ropes::read(hp, version)?;
        // Soft-caps: a value, or an explicit `null` in config.json for none; when absent,
        // Gemma 2's defaults.
        let softcap = |gguf: &str, hf: &str, default: Option<f64>| -> Option<f32> {
            let value = if hp.hf_is_null(hf) {
                None
            } else {
                hp.opt_f64(gguf, hf).or(default)
            };
            value.filter(|c| *c > 0.0).map(|c| c as f32)
        };
        let is_v2 = version == Version::Gemma2;
        Ok(Self {
            version,
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
                .unwrap_or(8192),
            rms_eps: hp.f64_or("attention.layer_norm_rms_epsilon", "rms_norm_eps", 1e-6),
            attn_scale: (1.0 / scalar.sqrt()) as f32,
            global_rope_base: ropes.global_base,
            global_rope_scale: ropes.global_scale,
            local_rope_base: ropes.local_base,
            attn_softcap: softcap(
                "attn_logit_softcapping",
                "attn_logit_softcapping",
                is_v2.then_some(50.0),
            ),
            final_softcap: softcap(
                "final_logit_softcapping",
                "final_logit_softcapping",
                is_v2.then_some(30.0),
            ),
            window,
            local,
            n_layers,
            d_model,
        })
    }
}

/// The rotary embeddings of global and local layers.
struct Ropes {
    global_base: f64,
    /// Linear position scaling of the global layers (Gemma 3 4B and larger).
    global_scale: f64,
    local_base: f64,
}

impl Ropes {
    /// From GGUF metadata, Hugging Face's `rope_theta` / `rope_local_base_freq` /
    /// `rope_scaling`, or the newer `rope_parameters` per layer type.
    fn read(hp: &HyperParams, version: Version) -> Result<Self> {
        let hf_default = match version {
            Version::Gemma2 => 10_000.0,
            Version::Gemma3 => 1_000_000.0,
        };
        let default_base = if hp.is_gguf() { 10_000.0 } else { hf_default };
        let global_base = hp.f64_or("rope.freq_base", "rope_theta", default_base);
        let scaling = |s: &serde_json::Value| -> Result<f64> {
            let kind = s.get("rope_type").or_else(|| s.get("type"));
            match kind.and_then(|t| t.as_str()) {
                None | Some("default") => Ok(1.0),
                Some("linear") => Ok(s.get("factor").and_then(|f| f.as_f64()).unwrap_or(1.0)),
                Some(other) => bail!("RoPE scaling `{other}` is not supported for Gemma"),
            }
        };
        if let Some(per_type) = hp.hf_raw("rope_parameters").filter(|p| p.is_object()) {
            let theta = |kind: &str, default: f64| {
                per_type
                    .get(kind)
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|t| t.as_f64())
                    .unwrap_or(default)
            };
            let full = per_type.get("full_attention");
            return Ok(Self {
                global_base: theta("full_attention", global_base),
                global_scale: full.map(scaling).transpose()?.unwrap_or(1.0),
                local_base: theta("sliding_attention", 10_000.0),
            });
        }
        let gguf_scale = hp.opt_f64("rope.scaling.factor", "");
        let hf_scale = hp.hf_raw("rope_scaling").map(scaling).transpose()?;
        Ok(Self {
            global_base,
            global_scale: gguf_scale.or(hf_scale).filter(|f| *f > 0.0).unwrap_or(1.0),
            local_base: match version {
                Version::Gemma2 => global_base,
                Version::Gemma3 => {
                    hp.f64_or("rope.freq_base_swa", "rope_local_base_freq", 10_000.0)
                }
            },
        })
    }
}

const Q_NORM: TensorName = name("attn_q_norm.weight", "self_attn.q_norm.weight");
const K_NORM: TensorName = name("attn_k_norm.weight", "self_attn.k_norm.weight");
const POST_ATTN_NORM: TensorName = name(
    "post_attention_norm.weight",
    "post_attention_layernorm.weight",
);
const FFN_NORM: TensorName = name("ffn_norm.weight", "pre_feedforward_layernorm.weight");
const POST_FFW_NORM: TensorName = name("post_ffw_norm.weight", "post_feedforward_layernorm.weight");

/// One block: `x += post_norm(attn(norm(x)))`, then `x += post_norm(mlp(norm(x)))`.
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    mlp: Mlp,
    post_ffw_norm: RmsNorm,
}

impl Block {
    fn load(ld: &mut Loader, cfg: &Config, rope: &Arc<Rope>, l: usize) -> Result<Self> {
        let at = At::Layer(l);
        let (d, eps, hd) = (cfg.d_model, cfg.rms_eps, cfg.heads.head_dim);
        let head_norm = |n: TensorName, ld: &mut Loader| -> Result<Option<RmsNorm>> {
            match cfg.version {
                Version::Gemma3 => Ok(Some(ld.norm(n, at, hd, eps, true)?)),
                Version::Gemma2 => Ok(None),
            }
        };
        Ok(Self {
            attn_norm: ld.norm(ATTN_NORM, at, d, eps, true)?,
            attn: Attention {
                qkv: ld.linear(&[Q, K, V], None, at, d)?,
                o: ld.linear(&[O], None, at, cfg.heads.q_dim())?,
                q_norm: head_norm(Q_NORM, ld)?,
                k_norm: head_norm(K_NORM, ld)?,
                spec: AttentionSpec {
                    shape: cfg.heads,
                    rope: rope.clone(),
                    scale: cfg.attn_scale,
                    window: cfg.local[l].then_some(cfg.window),
                    softcap: cfg.attn_softcap,
                },
            },
            post_attn_norm: ld.norm(POST_ATTN_NORM, at, d, eps, true)?,
            ffn_norm: ld.norm(FFN_NORM, at, d, eps, true)?,
            mlp: Mlp {
                gate_up: ld.linear(&[GATE, UP], None, at, d)?,
                down: ld.linear(&[DOWN], None, at, cfg.intermediate_size)?,
                act: Activation::GeluTanh,
                width: cfg.intermediate_size,
            },
            post_ffw_norm: ld.norm(POST_FFW_NORM, at, d, eps, true)?,
        })
    }

    fn forward(&self, p: &mut Pass, l: usize, x: Tensor) -> Result<Tensor> {
        let x = p.hook(HookSite::ResidPre, l, x)?;
        let a = self.attn.forward(p, l, &self.attn_norm.forward(&x)?)?;
        let x = p.add_to_residual(HookSite::AttnOut, l, &x, self.post_attn_norm.forward(&a)?)?;
        let m = self.mlp.forward(p, l, &self.ffn_norm.forward(&x)?)?;
        let x = p.add_to_residual(HookSite::MlpOut, l, &x, self.post_ffw_norm.forward(&m)?)?;
        p.hook(HookSite::ResidPost, l, x)
    }
}

/// A loaded Gemma model.
struct Gemma {
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    final_softcap: Option<f32>,
}

/// Loads a Gemma checkpoint (`arch`: `gemma2`, `gemma3` or Hugging Face's `gemma3_text`).
pub fn load(ld: &mut Loader, arch: &str) -> Result<Loaded> {
    let version = if arch == "gemma2" {
        Version::Gemma2
    } else {
        Version::Gemma3
    };
    let cfg = Config::read(&ld.hyper_params(arch)?, version)?;
    let hd = cfg.heads.head_dim;
    // Gemma's rotary embedding rotates the two halves of each head (NeoX style) in both
    // checkpoint formats.
    let global = Arc::new(Rope::new(
        RopeLayout::HalfSplit,
        hd,
        cfg.global_rope_base,
        None,
        cfg.global_rope_scale,
    ));
    let local = Arc::new(Rope::new(
        RopeLayout::HalfSplit,
        hd,
        cfg.local_rope_base,
        None,
        1.0,
    ));
    let scale = (cfg.d_model as f32).sqrt();
    let (embed, vocab_size) = ld.embedding(EMBED, cfg.d_model, Some(scale))?;
    let blocks = (0..cfg.n_layers)
        .map(|l| Block::load(ld, &cfg, if cfg.local[l] { &local } else { &global }, l))
        .collect::<Result<Vec<_>>>()?;
    let net = Gemma {
        lm_head: embed.as_head()?,
        norm: ld.norm(FINAL_NORM, At::Global, cfg.d_model, cfg.rms_eps, true)?,
        final_softcap: cfg.final_softcap,
        embed,
        blocks,
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

impl Architecture for Gemma {
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
        let logits = self.lm_head.forward(&self.norm.forward(x)?)?;
        Ok(match self.final_softcap {
            Some(cap) => ((logits / cap as f64)?.tanh()? * cap as f64)?,
            None => logits,
        })
    }

    fn visit_weights(&self, f: &mut dyn FnMut(&'static str, usize)) {
        let blocks = self.blocks.iter().map(|b| (&b.attn, &b.mlp));
        super::visit_model_weights(&self.embed, &self.lm_head, true, blocks, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(cfg: serde_json::Value, version: Version) -> Config {
        let mut base = serde_json::json!({
            "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
            "num_hidden_layers": 12, "intermediate_size": 96,
        });
        base.as_object_mut()
            .unwrap()
            .extend(cfg.as_object().unwrap().clone());
        Config::read(&HyperParams::Hf(&base), version).unwrap()
    }

    #[test]
    fn hugging_face_defaults_are_gemmas() {
        let c = read(serde_json::json!({}), Version::Gemma3);
        // Five local layers per global one, a window of 4096, RoPE bases 1e6 and 1e4.
        let globals: Vec<usize> = (0..12).filter(|&l| !c.local[l]).collect();
        assert_eq!(globals, vec![5, 11]);
        assert_eq!(c.window, 4096);
        assert_eq!((c.global_rope_base, c.local_rope_base), (1e6, 1e4));
        assert_eq!((c.attn_softcap, c.final_softcap), (None, None));
        let c = read(serde_json::json!({}), Version::Gemma2);
        assert_eq!((0..12).filter(|&l| c.local[l]).count(), 6);
        assert!(c.local[0] && !c.local[1]);
        assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), Some(30.0)));
        // An explicit null turns a soft-cap off.
        let c = read(
            serde_json::json!({"attn_logit_softcapping": null, "final_logit_softcapping": 20.0}),
            Version::Gemma2,
        );
        assert_eq!((c.attn_softcap, c.final_softcap), (None, Some(20.0)));
    }

    #[test]
    fn layer_types_rope_parameters_and_scaling_are_read() {
        let mut types = vec!["sliding_attention"; 12];
        types[3] = "full_attention";
        let c = read(
            serde_json::json!({"layer_types": types, "sliding_window": 512,
                "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
            Version::Gemma3,
        );
        assert!(!c.local[3] && c.local[0] && c.local[11]);
        assert_eq!(
            (c.global_rope_base, c.global_rope_scale, c.local_rope_base),
            (1e6, 8.0, 1e4)
        );
        // No window: no local layers, whatever the types say.
        let c = read(
            serde_json::json!({"layer_types": types, "sliding_window": 0}),
            Version::Gemma3,
        );
        assert!(c.local.iter().all(|l| !l));
        let c = read(
            serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
            Version::Gemma3,
        );
        assert_eq!(c.global_rope_scale, 4.0);
        let bad = serde_json::json!({"hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 8, "rope_scaling": {"rope_type": "yarn"}});
        assert!(Config::read(&HyperParams::Hf(&bad), Version::Gemma3).is_err());
    }
}
