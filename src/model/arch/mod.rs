//! The architecture seam. Each file here implements one family of decoder-only transformers
//! as an [`Architecture`]: read its hyper-parameters and weights from a checkpoint, run the
//! blocks of a forward pass, turn residuals into logits. Everything above `model/` sees only
//! [`ModelDims`] and the trait, never a concrete architecture.
//!
//! To add an architecture: write one file that builds its blocks from `model::layers` and
//! `model::attention` (so hook sites, and with them steering and inspection, come for free),
//! then add one line to [`FAMILIES`].

pub mod gemma;
pub mod llama;

use super::pass::Pass;
use super::weights::Loader;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::Tensor;
use std::collections::HashMap;

/// The sizes of a loaded model that steering, inspection and the API need.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelDims {
    /// The checkpoint's architecture name (`llama`, `qwen2`, `gemma3`, ...).
    pub architecture: String,
    pub n_layers: usize,
    pub d_model: usize,
    /// Neurons of each MLP (the width of `mlp_act`).
    pub intermediate_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
}

impl ModelDims {
    /// The width of the activation at `site`.
    pub fn site_width(&self, site: crate::model::hooks::HookSite) -> usize {
        site.width(
            self.d_model,
            self.intermediate_size,
            self.n_heads,
            self.head_dim,
        )
    }

    /// The dims of a model with `heads` in every layer.
    pub fn new(
        architecture: &str,
        (n_layers, d_model, intermediate_size): (usize, usize, usize),
        heads: crate::model::cpu::attention::HeadShape,
        vocab_size: usize,
        context_length: usize,
    ) -> Self {
        Self {
            architecture: architecture.to_string(),
            n_layers,
            d_model,
            intermediate_size,
            n_heads: heads.n_heads,
            n_kv_heads: heads.n_kv_heads,
            head_dim: heads.head_dim,
            vocab_size,
            context_length,
        }
    }
}

/// A loaded architecture: immutable, shared by every request.
pub trait Architecture: Send + Sync {
    /// Embeds the batch's tokens and runs every block, calling the pass's hooks at each site;
    /// returns the residual stream after the last block, `[rows, d_model]`.
    fn forward(&self, p: &mut Pass) -> Result<Tensor>;

    /// Runs blocks `first..` on `x`, the input of block `first` (`[rows, d_model]`), calling
    /// the hooks; returns the residual stream after the last block. `forward` is the
    /// embeddings followed by this from block 0.
    fn forward_from(&self, p: &mut Pass, first: usize, x: Tensor) -> Result<Tensor>;

    /// Final norm and unembedding of residual rows `[k, d_model]` -> `[k, vocab]`.
    fn logits(&self, x: &Tensor) -> Result<Tensor>;

    /// Reports the bytes of weight data held (linear layers and embeddings) in each storage
    /// format (`q4_k`, `q8_0`, `f32`, ...).
    fn visit_weights(&self, f: &mut dyn FnMut(&'static str, usize));
}

/// Reports a model's weights: the embedding table, each block's attention and MLP, and the
/// head unless it is the table itself (tied, on the CPU kernels' packed table).
pub fn visit_model_weights<'a>(
    embed: &crate::model::layers::Embedding,
    head: &crate::model::layers::Linear,
    tied: bool,
    blocks: impl Iterator<
        Item = (
            &'a crate::model::attention::Attention,
            &'a crate::model::layers::Mlp,
        ),
    >,
    f: &mut dyn FnMut(&'static str, usize),
) {
    embed.visit_weights(f);
    if !(tied && embed.head_is_shared()) {
        head.visit_weights(f);
    }
    for (attn, mlp) in blocks {
        attn.visit_weights(f);
        mlp.visit_weights(f);
    }
}

/// What a family's loader returns.
pub struct Loaded {
    pub dims: ModelDims,
    pub net: Box<dyn Architecture>,
}

/// A family of architectures that one file implements.
pub struct Family {
    /// GGUF `general.architecture` values and Hugging Face `model_type` values it loads.
    pub names: &'static [&'static str],
    /// Reads the hyper-parameters and weights; gets the matched name.
    pub load: fn(&mut Loader, &str) -> Result<Loaded>,
}

/// Every architecture tiller serves.
pub const FAMILIES: &[Family] = &[
    Family {
        names: &["llama", "mistral", "qwen2"],
        load: llama::load,
    },
    Family {
        names: &["gemma2", "gemma3", "gemma3_text"],
        load: gemma::load,
    },
];

/// Loads the checkpoint behind `ld` with the family that names its architecture.
pub fn load(ld: &mut Loader) -> Result<Loaded> {
    let name = ld.architecture_name()?;
    let family = FAMILIES
        .iter()
        .find(|f| f.names.contains(&name.as_str()))
        .ok_or_else(|| {
            let known: Vec<&str> = FAMILIES
                .iter()
                .flat_map(|f| f.names.iter().copied())
                .collect();
            anyhow!(
                "architecture `{name}` is not supported (supported: {})",
                known.join(", ")
            )
        })?;
    let loaded = (family.load)(ld, &name)?;
    check_dims(&loaded.dims)?;
    Ok(loaded)
}

fn check_dims(d: &ModelDims) -> Result<()> {
    if d.n_layers == 0 || d.d_model == 0 || d.intermediate_size == 0 || d.head_dim == 0 {
        bail!("the checkpoint declares an empty model ({d:?})");
    }
    if d.n_heads == 0 || d.n_kv_heads == 0 || !d.n_heads.is_multiple_of(d.n_kv_heads) {
        bail!(
            "{} query heads cannot share {} KV heads",
            d.n_heads,
            d.n_kv_heads
        );
    }
    if !d.head_dim.is_multiple_of(2) {
        bail!("head dimension {} is odd", d.head_dim);
    }
    Ok(())
}

/// A checkpoint's hyper-parameters: GGUF metadata keys under `{arch}.`, or the keys of a
/// Hugging Face `config.json` (its `text_config`, for multimodal checkpoints).
pub enum HyperParams<'a> {
    Gguf {
        arch: String,
        md: &'a HashMap<String, gguf_file::Value>,
    },
    Hf(&'a serde_json::Value),
}

impl HyperParams<'_> {
    fn gguf_value(&self, key: &str) -> Option<&gguf_file::Value> {
        match self {
            HyperParams::Gguf { arch, md } => md.get(&format!("{arch}.{key}")),
            HyperParams::Hf(_) => None,
        }
    }

    fn hf_value(&self, key: &str) -> Option<&serde_json::Value> {
        match self {
            HyperParams::Hf(c) => c.get(key).filter(|v| !v.is_null()),
            HyperParams::Gguf { .. } => None,
        }
    }

    fn key<'k>(&self, gguf: &'k str, hf: &'k str) -> String {
        match self {
            HyperParams::Gguf { arch, .. } => format!("GGUF metadata `{arch}.{gguf}`"),
            HyperParams::Hf(_) => format!("config.json `{hf}`"),
        }
    }

    /// An integer the checkpoint may leave out.
    pub fn opt_usize(&self, gguf: &str, hf: &str) -> Result<Option<usize>> {
        if let Some(v) = self.gguf_value(gguf) {
            let n = v
                .to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                .map_err(|e| anyhow!("{}: {e}", self.key(gguf, hf)))?;
            return Ok(Some(usize::try_from(n)?));
        }
        match self.hf_value(hf) {
            Some(v) => Ok(Some(
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .with_context(|| format!("{} is not an integer", self.key(gguf, hf)))?,
            )),
            None => Ok(None),
        }
    }

    /// An integer the checkpoint must have.
    pub fn usize(&self, gguf: &str, hf: &str) -> Result<usize> {
        self.opt_usize(gguf, hf)?
            .with_context(|| format!("{} is missing", self.key(gguf, hf)))
    }

    /// A number the checkpoint may leave out.
    pub fn opt_f64(&self, gguf: &str, hf: &str) -> Option<f64> {
        if let Some(v) = self.gguf_value(gguf) {
            return v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok();
        }
        self.hf_value(hf).and_then(|v| v.as_f64())
    }

    pub fn f64_or(&self, gguf: &str, hf: &str, default: f64) -> f64 {
        self.opt_f64(gguf, hf).unwrap_or(default)
    }

    /// A string in GGUF metadata.
    pub fn opt_string(&self, gguf: &str) -> Option<String> {
        self.gguf_value(gguf)
            .and_then(|v| v.to_string().ok())
            .cloned()
    }

    /// Whether a Hugging Face config sets `key` to `null` (as opposed to leaving it out).
    pub fn hf_is_null(&self, key: &str) -> bool {
        matches!(self, HyperParams::Hf(c) if c.get(key).is_some_and(|v| v.is_null()))
    }

    /// A flag of a Hugging Face config (GGUF files say these things through their tensors).
    pub fn hf_bool(&self, hf: &str) -> Option<bool> {
        self.hf_value(hf).and_then(|v| v.as_bool())
    }

    /// The raw Hugging Face value of `key`, for structured settings (`rope_scaling`).
    pub fn hf_raw(&self, key: &str) -> Option<&serde_json::Value> {
        self.hf_value(key)
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self, HyperParams::Gguf { .. })
    }
}
