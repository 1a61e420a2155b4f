//! Reading an architecture's weights from a checkpoint into the shared layers: linear layers in
//! the CPU kernels' formats (or f32 tensors for the candle backend), norms, embeddings. Tensor
//! names are the checkpoint's own (`blk.3.attn_q.weight` in GGUF,
//! `model.layers.3.self_attn.q_proj.weight` in Hugging Face folders); [`TensorName`] gives
//! an architecture both spellings of each.

use super::arch::HyperParams;
use super::checkpoint::{Checkpoint, CheckpointFormat};
use super::cpu::matmul::{isa, Isa};
use super::cpu::quant::{BlockFormat, WeightData, WeightFormat, WeightMatrix};
use super::cpu::tiles::TiledWeights;
use super::layers::{Embedding, EmbeddingTable, Linear, RmsNorm};
use super::{Backend, LoadOptions};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// A tensor's name in both checkpoint formats.
#[derive(Debug, Clone, Copy)]
pub struct TensorName {
    pub gguf: &'static str,
    pub hf: &'static str,
}

/// Both spellings of a tensor name.
pub const fn name(gguf: &'static str, hf: &'static str) -> TensorName {
    TensorName { gguf, hf }
}

impl TensorName {
    /// The name of a tensor outside the blocks.
    pub fn global(self, fmt: CheckpointFormat) -> String {
        match fmt {
            CheckpointFormat::Gguf => self.gguf.to_string(),
            CheckpointFormat::HfFolder => self.hf.to_string(),
        }
    }

    /// The name of block `l`'s tensor.
    pub fn layer(self, fmt: CheckpointFormat, l: usize) -> String {
        match fmt {
            CheckpointFormat::Gguf => format!("blk.{l}.{}", self.gguf),
            CheckpointFormat::HfFolder => format!("model.layers.{l}.{}", self.hf),
        }
    }
}

/// The tensor names most architectures share (llama.cpp's names in GGUF, Llama's in Hugging
/// Face folders); each architecture adds its own.
pub mod names {
    use super::{name, TensorName};

    pub const EMBED: TensorName = name("token_embd.weight", "model.embed_tokens.weight");
    pub const FINAL_NORM: TensorName = name("output_norm.weight", "model.norm.weight");
    pub const LM_HEAD: TensorName = name("output.weight", "lm_head.weight");
    pub const ATTN_NORM: TensorName = name("attn_norm.weight", "input_layernorm.weight");
    pub const Q: TensorName = name("attn_q.weight", "self_attn.q_proj.weight");
    pub const K: TensorName = name("attn_k.weight", "self_attn.k_proj.weight");
    pub const V: TensorName = name("attn_v.weight", "self_attn.v_proj.weight");
    pub const O: TensorName = name("attn_output.weight", "self_attn.o_proj.weight");
    pub const GATE: TensorName = name("ffn_gate.weight", "mlp.gate_proj.weight");
    pub const UP: TensorName = name("ffn_up.weight", "mlp.up_proj.weight");
    pub const DOWN: TensorName = name("ffn_down.weight", "mlp.down_proj.weight");
}

/// Where a tensor sits: outside the blocks, or in block `l`.
#[derive(Debug, Clone, Copy)]
pub enum At {
    Global,
    Layer(usize),
}

/// Reads tensors for the layers of one model.
pub struct Loader<'a> {
    pub ckpt: &'a mut Checkpoint,
    pub opts: &'a LoadOptions,
}

impl Loader<'_> {
    pub fn format(&self) -> CheckpointFormat {
        self.ckpt.format()
    }

    fn full_name(&self, n: TensorName, at: At) -> String {
        match at {
            At::Global => n.global(self.format()),
            At::Layer(l) => n.layer(self.format(), l),
        }
    }

    /// The checkpoint's architecture name.
    pub fn architecture_name(&self) -> Result<String> {
        self.ckpt.architecture_name()
    }

    /// The hyper-parameters of architecture `arch`.
    pub fn hyper_params(&self, arch: &str) -> Result<HyperParams<'_>> {
        if let Some(md) = self.ckpt.gguf_metadata() {
            return Ok(HyperParams::Gguf {
                arch: arch.to_string(),
                md,
            });
        }
        let cfg = self.ckpt.hf_config().context("config.json")?;
        if cfg.get("text_config").is_some() {
            bail!(
                "config.json describes a multimodal checkpoint (`text_config`), which tiller does \
                 not load; use the text-only model (e.g. Gemma3ForCausalLM)"
            );
        }
        Ok(HyperParams::Hf(cfg))
    }

    pub fn has(&self, n: TensorName, at: At) -> bool {
        self.ckpt.has_tensor(&self.full_name(n, at))
    }

    /// A tensor as f32, on the model's device.
    pub fn dense(&mut self, n: TensorName, at: At) -> Result<Tensor> {
        let name = self.full_name(n, at);
        let q = self.ckpt.tensor(&name, &Device::Cpu)?;
        Ok(q.dequantize(&Device::Cpu)?.to_device(&self.opts.device)?)
    }

    /// A 1-D tensor as floats on the host.
    pub fn floats(&mut self, n: TensorName, at: At) -> Result<Vec<f32>> {
        let name = self.full_name(n, at);
        let q = self.ckpt.tensor(&name, &Device::Cpu)?;
        Ok(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
    }

    /// An RMSNorm of width `width`; `plus_one` adds 1 to a Hugging Face weight (Gemma's
    /// `(1 + w)` norms: llama.cpp's converter already adds it to GGUF weights).
    pub fn norm(
        &mut self,
        n: TensorName,
        at: At,
        width: usize,
        eps: f64,
        plus_one: bool,
    ) -> Result<RmsNorm> {
        let mut weight = self.dense(n, at)?;
        if weight.dims() != [width] {
            bail!(
                "`{}` has shape {:?}, expected [{width}]",
                self.full_name(n, at),
                weight.dims()
            );
        }
        if plus_one && self.format() == CheckpointFormat::HfFolder {
            weight = (weight + 1.0)?;
        }
        Ok(RmsNorm {
            weight,
            eps: eps as f32,
        })
    }

    /// Several weights with the same input (q, k, v; gate, up), stacked into one linear layer
    /// of `[Σ rows, cols]`, with their biases if `biases` is given.
    pub fn linear(
        &mut self,
        parts: &[TensorName],
        biases: Option<&[TensorName]>,
        at: At,
        cols: usize,
    ) -> Result<Linear> {
        let bias = match biases {
            Some(bs) => {
                let vs = bs
                    .iter()
                    .map(|&b| self.dense(b, at))
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&vs, 0)?)
            }
            None => None,
        };
        let linear = match self.opts.backend {
            Backend::CpuKernels => {
                let w = self.kernel_stack(parts, at)?;
                if w.cols != cols {
                    bail!(
                        "`{}` takes {} inputs, expected {cols}",
                        self.full_name(parts[0], at),
                        w.cols
                    );
                }
                Linear::Kernel {
                    w: Arc::new(w),
                    bias,
                }
            }
            Backend::Candle => {
                let ts = parts
                    .iter()
                    .map(|&p| self.dense(p, at))
                    .collect::<Result<Vec<_>>>()?;
                let w = Tensor::cat(&ts, 0)?;
                if w.dim(1)? != cols {
                    bail!(
                        "`{}` takes {} inputs, expected {cols}",
                        self.full_name(parts[0], at),
                        w.dim(1)?
                    );
                }
                Linear::Dense {
                    wt: w.t()?.contiguous()?,
                    bias,
                }
            }
        };
        Ok(linear)
    }

    /// The token embeddings `[vocab, d_model]`; returns them with the vocabulary size.
    pub fn embedding(
        &mut self,
        n: TensorName,
        d_model: usize,
        scale: Option<f32>,
    ) -> Result<(Embedding, usize)> {
        let name = self.full_name(n, At::Global);
        let (table, (vocab, d)) = match self.opts.backend {
            Backend::CpuKernels => {
                let w = self.kernel_matrix(&name)?.for_kernels();
                let shape = (w.rows, w.cols);
                (EmbeddingTable::Kernel(Arc::new(w)), shape)
            }
            Backend::Candle => {
                let t = self
                    .ckpt
                    .tensor(&name, &Device::Cpu)?
                    .dequantize(&Device::Cpu)?
                    .to_device(&self.opts.device)?;
                let shape = t.dims2()?;
                (EmbeddingTable::Dense(t), shape)
            }
        };
        if d != d_model {
            bail!("token embeddings are {d} wide, the config says {d_model}");
        }
        Ok((Embedding { table, scale }, vocab))
    }

    /// A 2-D tensor as a matrix for the CPU kernels. A GGUF tensor in a block format they run
    /// is read straight into its blocks (with `model.weights = "native"`); anything else goes
    /// through a dequantized copy into the configured format. A format the kernels cannot run
    /// is refused with what to do about it.
    /// Several weights with the same input, stacked for the CPU kernels as [`Self::linear`]
    /// stacks them (no bias).
    pub fn kernel_stack(&mut self, parts: &[TensorName], at: At) -> Result<WeightMatrix> {
        let ms = parts
            .iter()
            .map(|&p| self.kernel_matrix(&self.full_name(p, at)))
            .collect::<Result<Vec<_>>>()?;
        Ok(WeightMatrix::stack(ms)?.for_kernels())
    }

    fn kernel_matrix(&mut self, name: &str) -> Result<WeightMatrix> {
        let format = self.opts.weight_format;
        if let Some((dtype, dims, mut reader)) = self.ckpt.gguf_tensor(name)? {
            let [rows, cols] = dims[..] else {
                bail!("`{name}` has shape {dims:?}, expected a matrix");
            };
            let Some(block) = BlockFormat::of(dtype).or(match dtype {
                GgmlDType::F16 | GgmlDType::BF16 => Some(BlockFormat::F32),
                _ => None,
            }) else {
                // llama.cpp's spelling of candle's names (`Q2K` is `Q2_K`).
                let format = format!("{dtype:?}").replace('K', "_K");
                bail!("{}", super::gguf_header::unsupported_format(name, &format));
            };
            if format == WeightFormat::Native && block != BlockFormat::F32 {
                if isa() == Isa::Amx && cols.is_multiple_of(block.block_elems()) {
                    // Straight into the tile layout, with no copy of the blocks.
                    let t = TiledWeights::read(block, rows, cols, &mut reader)
                        .map_err(|e| anyhow!("reading `{name}`: {e}"))?;
                    return Ok(WeightMatrix::new(
                        rows,
                        cols,
                        WeightData::Tiled(Box::new(t)),
                    )?);
                }
                let n = rows * cols / block.block_elems();
                let data = WeightData::read(block, n, &mut reader)
                    .map_err(|e| anyhow!("reading `{name}`: {e}"))?;
                return Ok(WeightMatrix::new(rows, cols, data)?);
            }
        }
        let q = self.ckpt.tensor(name, &Device::Cpu)?;
        WeightMatrix::from_qtensor(&q, format).map_err(|e| anyhow!("`{name}`: {e}"))
    }
}
