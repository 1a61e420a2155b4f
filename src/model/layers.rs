//! The building blocks every architecture is assembled from: linear layers (our CPU kernels
//! over quantized weights, or candle over f32 on any device), RMSNorm, token embeddings and
//! the gated MLP. Architectures differ in how they wire these together, not in the blocks,
//! so a new architecture reuses them as they are, and hooks (see [`super::pass`]) reach every
//! architecture through the same calls.

use super::cpu::gated::gated;
use super::cpu::matmul::matmul;
use super::cpu::quant::WeightMatrix;
use super::hooks::HookSite;
use super::pass::Pass;
use candle_core::{CpuStorage, Layout, Storage, Tensor, D};
use std::sync::Arc;

/// `y = x Wᵀ (+ b)` for a weight held in one of the backends' forms.
pub enum Linear {
    Kernel {
        w: Arc<WeightMatrix>,
        bias: Option<Tensor>,
    },
    /// The transposed weight `[in, out]`, so the product is a plain matmul.
    Dense { wt: Tensor, bias: Option<Tensor> },
}

/// A candle op that runs our CPU matmul on a contiguous f32 input.
struct KernelMatmul<'a>(&'a WeightMatrix);

impl candle_core::CustomOp1 for KernelMatmul<'_> {
    fn name(&self) -> &'static str {
        "tiller-matmul"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("tiller-matmul needs f32 input")
        };
        let Some((o1, o2)) = l.contiguous_offsets() else {
            candle_core::bail!("tiller-matmul needs a contiguous input")
        };
        let x = &data[o1..o2];
        let w = self.0;
        let mut dims = l.dims().to_vec();
        if dims.last() != Some(&w.cols) {
            candle_core::bail!(
                "tiller-matmul: input {:?} against weight [{}, {}]",
                dims,
                w.rows,
                w.cols
            )
        }
        let m = x.len() / w.cols;
        let mut out = vec![0f32; m * w.rows];
        matmul(x, m, w, &mut out);
        if let Some(last) = dims.last_mut() {
            *last = w.rows;
        }
        Ok((CpuStorage::F32(out), candle_core::Shape::from(dims)))
    }
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (y, bias) = match self {
            Linear::Kernel { w, bias } => {
                (x.contiguous()?.apply_op1_no_bwd(&KernelMatmul(w))?, bias)
            }
            Linear::Dense { wt, bias } => (x.matmul(wt)?, bias),
        };
        match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Reports the bytes of weight data held in each format.
    pub fn visit_weights(&self, f: &mut dyn FnMut(&'static str, usize)) {
        match self {
            Linear::Kernel { w, .. } => w.formats().into_iter().for_each(|(b, n)| f(b.name(), n)),
            Linear::Dense { wt, .. } => f("f32", wt.elem_count() * 4),
        }
    }
}

/// Root-mean-square normalisation, `x / rms(x) * w` (Zhang & Sennrich 2019). Gemma's
/// `(1 + w)` form is the same op with 1 added to the weight when it is loaded.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
}

impl RmsNorm {
    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// Token embeddings, optionally scaled (Gemma multiplies them by `sqrt(d_model)`).
pub struct Embedding {
    pub table: EmbeddingTable,
    pub scale: Option<f32>,
}

pub enum EmbeddingTable {
    /// Rows dequantized when looked up.
    Kernel(Arc<WeightMatrix>),
    Dense(Tensor),
}

impl Embedding {
    /// `[tokens, d_model]` rows for `tokens`, on `device`.
    pub fn forward(
        &self,
        tokens: &[u32],
        device: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let x = match &self.table {
            EmbeddingTable::Kernel(w) => {
                let d = w.cols;
                let mut v = vec![0f32; tokens.len() * d];
                for (row, &t) in v.chunks_mut(d).zip(tokens) {
                    w.dequantize_row(t as usize, row);
                }
                Tensor::from_vec(v, (tokens.len(), d), device)?
            }
            EmbeddingTable::Dense(t) => {
                let ids = Tensor::new(tokens, device)?;
                t.index_select(&ids, 0)?
            }
        };
        match self.scale {
            Some(s) => x.affine(s as f64, 0.0),
            None => Ok(x),
        }
    }

    /// The table as the weight of a tied output head.
    pub fn as_head(&self) -> candle_core::Result<Linear> {
        Ok(match &self.table {
            EmbeddingTable::Kernel(w) => Linear::Kernel {
                w: w.clone(),
                bias: None,
            },
            EmbeddingTable::Dense(t) => Linear::Dense {
                wt: t.t()?.contiguous()?,
                bias: None,
            },
        })
    }

    /// Whether a head made by [`Embedding::as_head`] reads the same memory (the CPU kernels'
    /// packed table) rather than a transposed copy.
    pub fn head_is_shared(&self) -> bool {
        matches!(self.table, EmbeddingTable::Kernel(_))
    }

    /// Reports the bytes of the table in each format.
    pub fn visit_weights(&self, f: &mut dyn FnMut(&'static str, usize)) {
        match &self.table {
            EmbeddingTable::Kernel(w) => w.formats().into_iter().for_each(|(b, n)| f(b.name(), n)),
            EmbeddingTable::Dense(t) => f("f32", t.elem_count() * 4),
        }
    }
}

/// The activation of a gated MLP's gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama, Qwen2, Mistral).
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
}

/// `down(act(gate(x)) * up(x))`, with gate and up stacked into one product.
pub struct Mlp {
    pub gate_up: Linear,
    pub down: Linear,
    pub act: Activation,
    /// Neurons (`intermediate_size`).
    pub width: usize,
}

impl Mlp {
    /// Runs the MLP on normalised input `h`; the hidden activation passes the `mlp_act` hook.
    pub fn forward(&self, p: &mut Pass, layer: usize, h: &Tensor) -> anyhow::Result<Tensor> {
        let gu = self.gate_up.forward(h)?;
        let act = if gu.device().is_cpu() {
            let mut shape = gu.dims().to_vec();
            if let Some(last) = shape.last_mut() {
                *last = self.width;
            }
            let v = with_host_f32(&gu, |gu| gated(gu, self.width, self.act))?;
            Tensor::from_vec(v, shape, gu.device())?
        } else {
            let gate = gu.narrow(D::Minus1, 0, self.width)?;
            let up = gu.narrow(D::Minus1, self.width, self.width)?;
            let gate = match self.act {
                Activation::Silu => gate.silu()?,
                Activation::GeluTanh => gate.gelu()?,
            };
            (gate * up)?
        };
        let act = p.hook(HookSite::MlpAct, layer, act)?;
        Ok(self.down.forward(&act)?)
    }

    pub fn visit_weights(&self, f: &mut dyn FnMut(&'static str, usize)) {
        self.gate_up.visit_weights(f);
        self.down.visit_weights(f);
    }
}

/// Runs `f` on the f32 data of a contiguous CPU tensor.
pub fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        candle_core::bail!("expected an f32 tensor in host memory")
    };
    let Some((o1, o2)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor")
    };
    Ok(f(&data[o1..o2]))
}
