//! The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2): a decoder-only transformer with
//! RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU MLP
//! (Touvron et al. 2023, <https://arxiv.org/abs/2302.13971>; reference implementation:
//! Hugging Face `modeling_llama.py`, llama.cpp `llm_build_llama`).
//!
//! Read top-down: configuration, linear layers, attention, MLP, block, model. The model is
//! immutable and shared; a forward pass takes the KV caches and the hooks (DESIGN §2) as
//! arguments and runs over a *packed batch*: the new tokens of several sequences stacked as
//! rows, so every matrix product serves all sequences at once while attention stays per
//! sequence.
//!
//! Two backends share the model definition. `CpuKernels` (the default on CPU) runs our own
//! quantized kernels (`model::cpu`); `Candle` runs plain candle ops on f32 weights, on any
//! device. On CPU the second one is the straightforward reference the first is tested against.

use super::checkpoint::{Checkpoint, CheckpointFormat};
use super::cpu::attention::{attend, HostKv, RopeLayout, RopeTable};
use super::cpu::matmul::matmul;
use super::cpu::quant::{WeightFormat, WeightMatrix};
use super::hooks::{run_hook, BatchRows, HookSite, Hooks};
use anyhow::{anyhow, bail, Context};
use candle_core::{CpuStorage, DType, Device, Layout, Shape, Storage, Tensor, D};
use std::sync::Arc;

mod config;
pub use config::LlamaConfig;

/// Which implementation runs the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Our CPU kernels over quantized weights.
    CpuKernels,
    /// candle ops over f32 weights, on any device.
    Candle,
}

/// How to load a checkpoint.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub backend: Backend,
    pub weight_format: WeightFormat,
    /// Worker threads for the CPU kernels (0: one per core).
    pub threads: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            backend: Backend::CpuKernels,
            weight_format: WeightFormat::Native,
            threads: 0,
        }
    }
}

/// Checkpoint tensor names (GGUF and Hugging Face) of each weight.
#[derive(Debug, Clone, Copy)]
enum W {
    Embed,
    FinalNorm,
    LmHead,
    RopeFreqs,
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

impl W {
    fn name(self, fmt: CheckpointFormat, l: usize) -> String {
        let (gguf, hf) = match self {
            W::Embed => return pick(fmt, "token_embd.weight", "model.embed_tokens.weight"),
            W::FinalNorm => return pick(fmt, "output_norm.weight", "model.norm.weight"),
            W::LmHead => return pick(fmt, "output.weight", "lm_head.weight"),
            W::RopeFreqs => return pick(fmt, "rope_freqs.weight", "rope_freqs.weight"),
            W::AttnNorm => ("attn_norm.weight", "input_layernorm.weight"),
            W::Q => ("attn_q.weight", "self_attn.q_proj.weight"),
            W::K => ("attn_k.weight", "self_attn.k_proj.weight"),
            W::V => ("attn_v.weight", "self_attn.v_proj.weight"),
            W::QBias => ("attn_q.bias", "self_attn.q_proj.bias"),
            W::KBias => ("attn_k.bias", "self_attn.k_proj.bias"),
            W::VBias => ("attn_v.bias", "self_attn.v_proj.bias"),
            W::O => ("attn_output.weight", "self_attn.o_proj.weight"),
            W::FfnNorm => ("ffn_norm.weight", "post_attention_layernorm.weight"),
            W::Gate => ("ffn_gate.weight", "mlp.gate_proj.weight"),
            W::Up => ("ffn_up.weight", "mlp.up_proj.weight"),
            W::Down => ("ffn_down.weight", "mlp.down_proj.weight"),
        };
        match fmt {
            CheckpointFormat::Gguf => format!("blk.{l}.{gguf}"),
            CheckpointFormat::HfFolder => format!("model.layers.{l}.{hf}"),
        }
    }
}

fn pick(fmt: CheckpointFormat, gguf: &str, hf: &str) -> String {
    match fmt {
        CheckpointFormat::Gguf => gguf.into(),
        CheckpointFormat::HfFolder => hf.into(),
    }
}

struct Loader<'a> {
    ckpt: &'a mut Checkpoint,
    opts: &'a LoadOptions,
}

impl Loader<'_> {
    fn fmt(&self) -> CheckpointFormat {
        self.ckpt.format()
    }

    fn dense(&mut self, w: W, l: usize) -> anyhow::Result<Tensor> {
        let name = w.name(self.fmt(), l);
        let q = self.ckpt.tensor(&name, &Device::Cpu)?;
        Ok(q.dequantize(&Device::Cpu)?.to_device(&self.opts.device)?)
    }

    /// Several weights with the same input, stacked into one linear layer.
    fn linear(&mut self, parts: &[W], biases: Option<&[W]>, l: usize) -> anyhow::Result<Linear> {
        let bias = match biases {
            Some(bs) => {
                let vs = bs
                    .iter()
                    .map(|&b| self.dense(b, l))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Some(Tensor::cat(&vs, 0)?)
            }
            None => None,
        };
        match self.opts.backend {
            Backend::CpuKernels => {
                let ms = parts
                    .iter()
                    .map(|&p| {
                        let name = p.name(self.fmt(), l);
                        let q = self.ckpt.tensor(&name, &Device::Cpu)?;
                        WeightMatrix::from_qtensor(&q, self.opts.weight_format)
                            .map_err(|e| anyhow!("`{name}`: {e}"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let w = if ms.len() == 1 {
                    ms.into_iter().next().context("no weight")?
                } else {
                    WeightMatrix::concat_rows(&ms)?
                };
                Ok(Linear::Kernel {
                    w: Arc::new(w),
                    bias,
                })
            }
            Backend::Candle => {
                let ts = parts
                    .iter()
                    .map(|&p| self.dense(p, l))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let w = Tensor::cat(&ts, 0)?;
                Ok(Linear::Dense {
                    wt: w.t()?.contiguous()?,
                    bias,
                })
            }
        }
    }
}

/// `y = x Wᵀ (+ b)` for a weight held in one of the backends' forms.
enum Linear {
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

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
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
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
}

/// Runs `f` on the f32 data of a contiguous CPU tensor.
fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
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

/// The cached keys and values of one sequence, every layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    len: usize,
    layers: Vec<LayerKv>,
}

#[derive(Debug, Clone)]
enum LayerKv {
    Host(HostKv),
    /// `[n_kv_heads, len, head_dim]` each.
    Device(Option<(Tensor, Tensor)>),
}

impl KvCache {
    /// Number of tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held (host backend; device caches report their f32 size).
    pub fn size_in_bytes(&self, cfg: &LlamaConfig) -> usize {
        self.len * cfg.n_kv_heads * cfg.head_dim * 2 * 4 * cfg.n_layers
    }
}

struct Attention {
    qkv: Linear,
    o: Linear,
}

struct Mlp {
    gate_up: Linear,
    down: Linear,
}

struct Block {
    attn_norm: Tensor,
    attn: Attention,
    ffn_norm: Tensor,
    mlp: Mlp,
}

enum Embedding {
    Kernel(Arc<WeightMatrix>),
    Dense(Tensor),
}

/// One sequence's share of a packed batch.
#[derive(Debug, Clone)]
pub struct SeqChunk {
    /// First row of this chunk in the batch.
    pub row: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Position of the first new token (= tokens already in the sequence's cache).
    pub start_pos: usize,
    /// Whether to return next-token logits after the chunk's last token.
    pub logits: bool,
    /// Return logits after every token of the chunk instead (scoring a continuation).
    pub all_logits: bool,
}

/// The new tokens of several sequences, stacked.
#[derive(Debug, Clone, Default)]
pub struct PackedBatch {
    pub tokens: Vec<u32>,
    pub chunks: Vec<SeqChunk>,
}

impl PackedBatch {
    /// Appends `tokens` of a sequence whose cache holds `start_pos` tokens.
    pub fn push(&mut self, tokens: &[u32], start_pos: usize, logits: bool) {
        self.chunks.push(SeqChunk {
            row: self.tokens.len(),
            len: tokens.len(),
            start_pos,
            logits,
            all_logits: false,
        });
        self.tokens.extend_from_slice(tokens);
    }

    /// Appends `tokens` and asks for the logits after each of them.
    pub fn push_scored(&mut self, tokens: &[u32], start_pos: usize) {
        self.push(tokens, start_pos, true);
        if let Some(c) = self.chunks.last_mut() {
            c.all_logits = true;
        }
    }

    pub fn rows(&self) -> BatchRows {
        let mut rows = BatchRows::default();
        for (i, c) in self.chunks.iter().enumerate() {
            for j in 0..c.len {
                rows.sequence.push(i);
                rows.position.push(c.start_pos + j);
            }
        }
        rows
    }
}

/// A loaded Llama-family model.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    rope: RopeTable,
    /// The rope table as tensors, for the candle backend.
    rope_cos_sin: Option<(Tensor, Tensor)>,
    backend: Backend,
    device: Device,
    weight_bytes: usize,
    /// Threads for the CPU kernels. The whole forward pass runs inside this pool, so the many
    /// small parallel sections of a decode step cost a work-stealing hand-off rather than a
    /// cross-thread wake-up each.
    pool: rayon::ThreadPool,
}

impl Llama {
    pub fn load(ckpt: &mut Checkpoint, opts: &LoadOptions) -> anyhow::Result<Self> {
        if opts.backend == Backend::CpuKernels && !opts.device.is_cpu() {
            bail!(
                "the CPU kernels backend runs on the CPU only; use the candle backend on {:?}",
                opts.device
            );
        }
        let fmt = ckpt.format();
        let mut cfg = match fmt {
            CheckpointFormat::Gguf => {
                LlamaConfig::from_gguf(ckpt.gguf_metadata().context("GGUF metadata")?)?
            }
            CheckpointFormat::HfFolder => {
                LlamaConfig::from_hf(ckpt.hf_config().context("config.json")?)?
            }
        };
        cfg.check()?;
        cfg.tied_embeddings = !ckpt.has_tensor(&W::LmHead.name(fmt, 0));
        cfg.qkv_bias = ckpt.has_tensor(&W::QBias.name(fmt, 0));
        if fmt == CheckpointFormat::Gguf && ckpt.has_tensor(&W::RopeFreqs.name(fmt, 0)) {
            let t = ckpt.tensor(&W::RopeFreqs.name(fmt, 0), &Device::Cpu)?;
            cfg.rope_freq_factors = Some(t.dequantize(&Device::Cpu)?.to_vec1()?);
        }
        let mut ld = Loader { ckpt, opts };
        let embed_q = ld.ckpt.tensor(&W::Embed.name(fmt, 0), &Device::Cpu)?;
        let (vocab, d) = embed_q.shape().dims2()?;
        if d != cfg.d_model {
            bail!(
                "token embeddings are {d} wide, the config says {}",
                cfg.d_model
            );
        }
        cfg.vocab_size = vocab;
        let (embed, tied_head) = match opts.backend {
            Backend::CpuKernels => {
                let w = Arc::new(WeightMatrix::from_qtensor(&embed_q, opts.weight_format)?);
                let head = cfg.tied_embeddings.then(|| Linear::Kernel {
                    w: w.clone(),
                    bias: None,
                });
                (Embedding::Kernel(w), head)
            }
            Backend::Candle => {
                let t = embed_q.dequantize(&Device::Cpu)?.to_device(&opts.device)?;
                let head = if cfg.tied_embeddings {
                    Some(Linear::Dense {
                        wt: t.t()?.contiguous()?,
                        bias: None,
                    })
                } else {
                    None
                };
                (Embedding::Dense(t), head)
            }
        };
        drop(embed_q);
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let biases = [W::QBias, W::KBias, W::VBias];
            blocks.push(Block {
                attn_norm: ld.dense(W::AttnNorm, l)?,
                attn: Attention {
                    qkv: ld.linear(&[W::Q, W::K, W::V], cfg.qkv_bias.then_some(&biases[..]), l)?,
                    o: ld.linear(&[W::O], None, l)?,
                },
                ffn_norm: ld.dense(W::FfnNorm, l)?,
                mlp: Mlp {
                    gate_up: ld.linear(&[W::Gate, W::Up], None, l)?,
                    down: ld.linear(&[W::Down], None, l)?,
                },
            });
        }
        let norm = ld.dense(W::FinalNorm, 0)?;
        let lm_head = match tied_head {
            Some(h) => h,
            None => ld.linear(&[W::LmHead], None, 0)?,
        };
        let rope = RopeTable::new(
            cfg.rope_layout,
            cfg.head_dim,
            cfg.rope_theta,
            cfg.context_length,
            cfg.rope_freq_factors.as_deref(),
        );
        let rope_cos_sin = match opts.backend {
            Backend::CpuKernels => None,
            Backend::Candle => {
                let shape = (rope.positions(), rope.half);
                Some((
                    Tensor::from_slice(&rope.cos, shape, &opts.device)?,
                    Tensor::from_slice(&rope.sin, shape, &opts.device)?,
                ))
            }
        };
        let mut model = Self {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            rope_cos_sin,
            backend: opts.backend,
            device: opts.device.clone(),
            weight_bytes: 0,
            pool: rayon::ThreadPoolBuilder::new()
                .num_threads(opts.threads)
                .thread_name(|i| format!("tiller-kernel-{i}"))
                .build()?,
        };
        model.weight_bytes = model.count_weight_bytes();
        Ok(model)
    }

    fn count_weight_bytes(&self) -> usize {
        let lin = |l: &Linear| match l {
            Linear::Kernel { w, .. } => w.size_in_bytes(),
            Linear::Dense { wt, .. } => wt.elem_count() * 4,
        };
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| lin(&b.attn.qkv) + lin(&b.attn.o) + lin(&b.mlp.gate_up) + lin(&b.mlp.down))
            .sum();
        let embed = match &self.embed {
            Embedding::Kernel(w) => w.size_in_bytes(),
            Embedding::Dense(t) => t.elem_count() * 4,
        };
        let head = if self.cfg.tied_embeddings && matches!(self.embed, Embedding::Kernel(_)) {
            0
        } else {
            lin(&self.lm_head)
        };
        blocks + embed + head
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of weight data held for the linear layers and embeddings.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The storage format of the linear weights (`q4_1`, `q8_0`, `f32`).
    pub fn weight_format_name(&self) -> &'static str {
        match self.blocks.first().map(|b| &b.mlp.down) {
            Some(Linear::Kernel { w, .. }) => w.format_name(),
            _ => "f32",
        }
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        let layer = match self.backend {
            Backend::CpuKernels => LayerKv::Host(HostKv::default()),
            Backend::Candle => LayerKv::Device(None),
        };
        KvCache {
            len: 0,
            layers: vec![layer; self.cfg.n_layers],
        }
    }

    /// Runs the new tokens of `batch` (chunk `i` continuing the sequence of `caches[i]`),
    /// appends them to the caches, and returns the next-token logits `[k, vocab]` of the `k`
    /// chunks that ask for them, in chunk order (`None` if none do); a chunk pushed with
    /// `push_scored` contributes one row per token.
    pub fn forward(
        &self,
        batch: &PackedBatch,
        caches: &mut [&mut KvCache],
        hooks: &mut dyn Hooks,
    ) -> anyhow::Result<Option<Tensor>> {
        self.pool
            .install(|| self.forward_in_pool(batch, caches, hooks))
    }

    /// Threads the CPU kernels use.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn forward_in_pool(
        &self,
        batch: &PackedBatch,
        caches: &mut [&mut KvCache],
        hooks: &mut dyn Hooks,
    ) -> anyhow::Result<Option<Tensor>> {
        if caches.len() != batch.chunks.len() {
            bail!(
                "{} caches for {} sequences",
                caches.len(),
                batch.chunks.len()
            );
        }
        for (c, cache) in batch.chunks.iter().zip(caches.iter()) {
            if cache.len != c.start_pos {
                bail!(
                    "chunk starts at {} but its cache holds {}",
                    c.start_pos,
                    cache.len
                );
            }
            if c.start_pos + c.len > self.cfg.context_length {
                bail!(
                    "sequence of {} tokens exceeds the context length {}",
                    c.start_pos + c.len,
                    self.cfg.context_length
                );
            }
        }
        if let Some(&bad) = batch
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.cfg.vocab_size)
        {
            bail!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        let rows = batch.rows();
        let eps = self.cfg.rms_eps as f32;
        let mut x = self.embed(&batch.tokens)?;
        for (l, block) in self.blocks.iter().enumerate() {
            x = run_hook(hooks, HookSite::ResidPre, l, x, &rows)?;
            let h = candle_nn::ops::rms_norm(&x, &block.attn_norm, eps)?;
            let qkv = block.attn.qkv.forward(&h)?;
            let attn = self.attention(l, &qkv, batch, caches)?;
            let a = block.attn.o.forward(&attn)?;
            let a = run_hook(hooks, HookSite::AttnOut, l, a, &rows)?;
            x = (x + a)?;
            let h = candle_nn::ops::rms_norm(&x, &block.ffn_norm, eps)?;
            let gu = block.mlp.gate_up.forward(&h)?;
            let ffn = self.cfg.intermediate_size;
            let act = (gu.narrow(D::Minus1, 0, ffn)?.silu()? * gu.narrow(D::Minus1, ffn, ffn)?)?;
            let act = run_hook(hooks, HookSite::MlpAct, l, act, &rows)?;
            let m = block.mlp.down.forward(&act)?;
            let m = run_hook(hooks, HookSite::MlpOut, l, m, &rows)?;
            x = (x + m)?;
            x = run_hook(hooks, HookSite::ResidPost, l, x, &rows)?;
        }
        for (c, cache) in batch.chunks.iter().zip(caches.iter_mut()) {
            cache.len = c.start_pos + c.len;
        }
        let last_rows: Vec<u32> = batch
            .chunks
            .iter()
            .filter(|c| c.logits && c.len > 0)
            .flat_map(|c| {
                let first = if c.all_logits {
                    c.row
                } else {
                    c.row + c.len - 1
                };
                (first..c.row + c.len).map(|r| r as u32)
            })
            .collect();
        if last_rows.is_empty() {
            return Ok(None);
        }
        let idx = Tensor::new(last_rows.as_slice(), &self.device)?;
        let x = x.index_select(&idx, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        Ok(Some(self.lm_head.forward(&x)?))
    }

    fn embed(&self, tokens: &[u32]) -> anyhow::Result<Tensor> {
        let d = self.cfg.d_model;
        Ok(match &self.embed {
            Embedding::Kernel(w) => {
                let mut v = vec![0f32; tokens.len() * d];
                for (row, &t) in v.chunks_mut(d).zip(tokens) {
                    w.dequantize_row(t as usize, row);
                }
                Tensor::from_vec(v, (tokens.len(), d), &self.device)?
            }
            Embedding::Dense(t) => {
                let ids = Tensor::new(tokens, &self.device)?;
                t.index_select(&ids, 0)?
            }
        })
    }

    fn attention(
        &self,
        l: usize,
        qkv: &Tensor,
        batch: &PackedBatch,
        caches: &mut [&mut KvCache],
    ) -> anyhow::Result<Tensor> {
        let heads = self.cfg.heads();
        let (q_dim, kv_dim) = (heads.q_dim(), heads.kv_dim());
        let width = q_dim + 2 * kv_dim;
        let n = batch.tokens.len();
        if self.backend == Backend::CpuKernels {
            let mut out = vec![0f32; n * q_dim];
            with_host_f32(qkv, |data| -> anyhow::Result<()> {
                for (c, cache) in batch.chunks.iter().zip(caches.iter_mut()) {
                    let LayerKv::Host(kv) = &mut cache.layers[l] else {
                        bail!("a device cache was passed to the CPU backend");
                    };
                    attend(
                        &data[c.row * width..(c.row + c.len) * width],
                        c.len,
                        c.start_pos,
                        kv,
                        heads,
                        &self.rope,
                        &mut out[c.row * q_dim..(c.row + c.len) * q_dim],
                    );
                }
                Ok(())
            })??;
            return Ok(Tensor::from_vec(out, (n, q_dim), &self.device)?);
        }
        let (cos, sin) = self.rope_cos_sin.as_ref().context("rope tables")?;
        let hd = heads.head_dim;
        let group = heads.n_heads / heads.n_kv_heads;
        let mut outs = Vec::with_capacity(batch.chunks.len());
        for (c, cache) in batch.chunks.iter().zip(caches.iter_mut()) {
            let rows = qkv.narrow(0, c.row, c.len)?;
            let split = |off: usize, nh: usize| -> candle_core::Result<Tensor> {
                rows.narrow(1, off, nh * hd)?
                    .reshape((c.len, nh, hd))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)
            };
            let (cos, sin) = (
                cos.narrow(0, c.start_pos, c.len)?,
                sin.narrow(0, c.start_pos, c.len)?,
            );
            let rope = |t: Tensor| match self.cfg.rope_layout {
                RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&t, &cos, &sin),
                RopeLayout::HalfSplit => candle_nn::rotary_emb::rope(&t, &cos, &sin),
            };
            let q = rope(split(0, heads.n_heads)?)?.squeeze(0)?;
            let k = rope(split(q_dim, heads.n_kv_heads)?)?.squeeze(0)?;
            let v = split(q_dim + kv_dim, heads.n_kv_heads)?.squeeze(0)?;
            let LayerKv::Device(slot) = &mut cache.layers[l] else {
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
                    .expand((heads.n_kv_heads, group, total, hd))?
                    .reshape((heads.n_heads, total, hd))
            };
            let (k, v) = (expand(&k)?, expand(&v)?);
            let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            let mask: Vec<f32> = (0..c.len)
                .flat_map(|i| {
                    (0..total).map(move |j| {
                        if j > c.start_pos + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (c.len, total), &self.device)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
            let o = probs.matmul(&v)?.transpose(0, 1)?.reshape((c.len, q_dim))?;
            outs.push(o);
        }
        Ok(Tensor::cat(&outs, 0)?.to_dtype(DType::F32)?)
    }
}
