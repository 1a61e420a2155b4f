//! The attention sub-layer shared by every architecture: q/k/v projection (optionally with
//! biases, Qwen2), optional per-head RMSNorm of queries and keys (Gemma 3), rotary embeddings,
//! causal attention over each sequence's cache (full, or a sliding window on local layers;
//! scores optionally soft-capped, Gemma 2), then the output projection.
//!
//! The CPU backend attends with `cpu::attention::attend` over host caches; the candle backend
//! runs the same maths as tensor ops on any device.

use super::batch::{LayerKv, SeqChunk};
use super::cpu::attention::{attend, AttentionSpec, HostKv, RopeLayout};
use super::cpu::team;
use super::hooks::HookSite;
use super::layers::{with_host_f32, Linear, RmsNorm};
use super::pass::Pass;
use super::Backend;
use anyhow::bail;
use candle_core::{DType, Tensor};

/// One layer's attention.
pub struct Attention {
    /// q, k and v stacked into one product: `[q_dim + 2 kv_dim, d_model]`.
    pub qkv: Linear,
    pub o: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub spec: AttentionSpec,
}

impl Attention {
    /// Attends the normalised input `h` (`[rows, d_model]`) and returns the output
    /// projection's result, before any post-norm.
    pub fn forward(&self, p: &mut Pass, layer: usize, h: &Tensor) -> anyhow::Result<Tensor> {
        let qkv = self.norm_queries_and_keys(self.qkv.forward(h)?)?;
        let heads = match p.backend {
            Backend::CpuKernels => self.attend_host(p, layer, &qkv)?,
            Backend::Candle => self.attend_tensors(p, layer, &qkv)?,
        };
        let heads = p.hook(HookSite::AttnHead, layer, heads)?;
        Ok(self.o.forward(&heads)?)
    }

    pub fn visit_weights(&self, f: &mut dyn FnMut(&'static str, usize)) {
        self.qkv.visit_weights(f);
        self.o.visit_weights(f);
    }

    /// RMSNorm over each query and key head, before the rotary embedding.
    fn norm_queries_and_keys(&self, qkv: Tensor) -> anyhow::Result<Tensor> {
        if self.q_norm.is_none() && self.k_norm.is_none() {
            return Ok(qkv);
        }
        let s = self.spec.shape;
        let (q_dim, kv_dim) = (s.q_dim(), s.kv_dim());
        let n = qkv.dim(0)?;
        let per_head =
            |norm: &Option<RmsNorm>, t: Tensor, heads: usize| -> anyhow::Result<Tensor> {
                Ok(match norm {
                    Some(norm) => norm
                        .forward(&t.reshape((n, heads, s.head_dim))?)?
                        .reshape((n, heads * s.head_dim))?,
                    None => t,
                })
            };
        let q = per_head(
            &self.q_norm,
            qkv.narrow(1, 0, q_dim)?.contiguous()?,
            s.n_heads,
        )?;
        let k = per_head(
            &self.k_norm,
            qkv.narrow(1, q_dim, kv_dim)?.contiguous()?,
            s.n_kv_heads,
        )?;
        let v = qkv.narrow(1, q_dim + kv_dim, kv_dim)?;
        Ok(Tensor::cat(&[&q, &k, &v], 1)?.contiguous()?)
    }

    fn attend_host(&self, p: &mut Pass, layer: usize, qkv: &Tensor) -> anyhow::Result<Tensor> {
        let s = self.spec.shape;
        let (q_dim, width) = (s.q_dim(), s.q_dim() + 2 * s.kv_dim());
        let n = p.batch.tokens.len();
        let mut out = vec![0f32; n * q_dim];
        // Each sequence's rows, cache and output apart, so that the decoding sequences of a
        // batch attend in parallel (one row is too little work to split); a batch with prompt
        // chunks runs its sequences in turn, each split across the threads by rows and heads.
        let mut jobs = Vec::with_capacity(p.batch.chunks.len());
        let (mut rest, mut next_row) = (&mut out[..], 0);
        for (c, cache) in p.batch.chunks.iter().zip(p.caches.iter_mut()) {
            let LayerKv::Host(kv) = &mut cache.layers[layer] else {
                bail!("a device cache was passed to the CPU backend");
            };
            if c.row != next_row || c.len * q_dim > rest.len() {
                bail!("the batch's chunks are not its rows in order");
            }
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(c.len * q_dim);
            (rest, next_row) = (tail, next_row + c.len);
            jobs.push((c, kv, dst));
        }
        let decoding = p.batch.chunks.iter().all(|c| c.len == 1);
        with_host_f32(qkv, |data| {
            let one = |(c, kv, dst): &mut (&SeqChunk, &mut HostKv, &mut [f32])| {
                let rows = &data[c.row * width..(c.row + c.len) * width];
                attend(rows, c.len, c.start_pos, kv, &self.spec, dst);
            };
            if decoding {
                team::for_each_mut(&mut jobs, &|_, job| one(job));
            } else {
                jobs.iter_mut().for_each(one);
            }
        })?;
        Ok(Tensor::from_vec(out, (n, q_dim), p.device)?)
    }

    fn attend_tensors(&self, p: &mut Pass, layer: usize, qkv: &Tensor) -> anyhow::Result<Tensor> {
        let spec = &self.spec;
        let s = spec.shape;
        let (q_dim, kv_dim, hd) = (s.q_dim(), s.kv_dim(), s.head_dim);
        let group = s.n_heads / s.n_kv_heads;
        let mut outs = Vec::with_capacity(p.batch.chunks.len());
        for (c, cache) in p.batch.chunks.iter().zip(p.caches.iter_mut()) {
            let rows = qkv.narrow(0, c.row, c.len)?;
            let split = |off: usize, nh: usize| -> candle_core::Result<Tensor> {
                rows.narrow(1, off, nh * hd)?
                    .reshape((c.len, nh, hd))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)
            };
            let (cos, sin) = spec.rope.tables(c.start_pos, c.len);
            let half = spec.rope.half();
            let cos = Tensor::from_vec(cos, (c.len, half), p.device)?;
            let sin = Tensor::from_vec(sin, (c.len, half), p.device)?;
            let rope = |t: Tensor| match spec.rope.layout {
                RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&t, &cos, &sin),
                RopeLayout::HalfSplit => candle_nn::rotary_emb::rope(&t, &cos, &sin),
            };
            let q = rope(split(0, s.n_heads)?)?.squeeze(0)?;
            let k = rope(split(q_dim, s.n_kv_heads)?)?.squeeze(0)?;
            let v = split(q_dim + kv_dim, s.n_kv_heads)?.squeeze(0)?;
            let LayerKv::Device(slot) = &mut cache.layers[layer] else {
                bail!("a host cache was passed to the candle backend");
            };
            let (k, v) = match slot.take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
                None => (k, v),
            };
            *slot = Some((k.clone(), v.clone()));
            let total = c.start_pos + c.len;
            let expand = |t: &Tensor| -> candle_core::Result<Tensor> {
                t.unsqueeze(1)?
                    .expand((s.n_kv_heads, group, total, hd))?
                    .reshape((s.n_heads, total, hd))
            };
            let (k, v) = (expand(&k)?, expand(&v)?);
            let mut scores = (q.matmul(&k.t()?)? * spec.scale as f64)?;
            if let Some(cap) = spec.softcap {
                scores = ((scores / cap as f64)?.tanh()? * cap as f64)?;
            }
            let mask: Vec<f32> = (0..c.len)
                .flat_map(|i| {
                    let pos = c.start_pos + i;
                    let first = spec.first_key(pos);
                    (0..total).map(move |j| {
                        if j > pos || j < first {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (c.len, total), p.device)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
            let o = probs.matmul(&v)?.transpose(0, 1)?.reshape((c.len, q_dim))?;
            outs.push(o);
        }
        Ok(Tensor::cat(&outs, 0)?.to_dtype(DType::F32)?)
    }
}
