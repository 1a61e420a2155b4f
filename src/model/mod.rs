//! Everything about the language model itself: checkpoints, the architectures behind one seam
//! ([`arch`]), their shared layers and hook sites, CPU kernels, tokenizers and chat templates.
//! Knows nothing of steering plans, scheduling or HTTP.
//!
//! [`Model`] is what the rest of tiller holds: its [`ModelDims`], its tokenizer, and
//! [`Model::run`], the one way to put tokens through the model with hooks.

pub mod arch;
pub mod attention;
pub mod batch;
pub mod catalogue;
pub mod chat;
pub mod checkpoint;
pub mod cpu;
pub mod gguf_header;
pub mod hooks;
pub mod layers;
pub mod pass;
pub mod tokenizer;
pub mod weights;

use anyhow::{bail, Result};
pub use arch::ModelDims;
use arch::{Architecture, Loaded};
pub use batch::{KvCache, PackedBatch};
use candle_core::Device;
use chat::{ChatMessage, ChatTemplate};
use checkpoint::Checkpoint;
use cpu::quant::WeightFormat;
use hooks::Hooks;
use pass::Pass;
use std::path::Path;
use tokenizer::TextTokenizer;

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

/// Where and how the model runs, for `/info` and logs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuntimeInfo {
    pub backend: Backend,
    /// `cpu`, `cuda:0`, ...
    pub device: String,
    /// Storage of the weights: the formats by share of bytes (`q5_0 62%, q8_0 25%, ...`,
    /// or one name).
    pub weights: String,
    /// Bytes of weight data held.
    pub weight_bytes: usize,
    /// Size of the checkpoint on disk (the GGUF file, or the folder's safetensors).
    pub checkpoint_bytes: u64,
    /// Threads of the CPU kernels.
    pub threads: usize,
}

/// Bytes of the model file, or of a folder's `*.safetensors`.
fn checkpoint_size(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    if !path.is_dir() {
        return size(path);
    }
    std::fs::read_dir(path)
        .map(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .map(|p| size(&p))
                .sum()
        })
        .unwrap_or(0)
}

/// Which logits a pass returns for one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    /// After the last new token.
    Last,
    /// After every new token (scoring a continuation).
    Every,
}

/// One sequence's part of a pass: new tokens continuing `cache`.
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: Logits,
}

/// A resident model with everything needed to turn text into logits and back.
pub struct Model {
    /// The id clients use to name this model.
    pub id: String,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
    dims: ModelDims,
    net: Box<dyn Architecture>,
    backend: Backend,
    device: Device,
    /// Threads for the CPU kernels. The whole forward pass runs inside this pool, so the many
    /// small parallel sections of a decode step cost a work-stealing hand-off rather than a
    /// cross-thread wake-up each.
    pool: rayon::ThreadPool,
    checkpoint_bytes: u64,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("id", &self.id).finish()
    }
}

impl Model {
    /// Loads a GGUF file or Hugging Face folder, with the architecture it declares.
    pub fn load(path: &Path, id: Option<&str>, opts: &LoadOptions) -> Result<Self> {
        if opts.backend == Backend::CpuKernels && !opts.device.is_cpu() {
            bail!(
                "the CPU kernels backend runs on the CPU only; use the candle backend on {:?}",
                opts.device
            );
        }
        let mut ckpt = Checkpoint::open(path)?;
        let tokenizer = ckpt.tokenizer()?;
        let chat_template = ckpt.chat_template(&tokenizer)?;
        let Loaded { dims, net } = arch::load(&mut weights::Loader {
            ckpt: &mut ckpt,
            opts,
        })?;
        if tokenizer.vocab_size > dims.vocab_size {
            bail!(
                "the tokenizer has {} tokens but the embeddings only {}",
                tokenizer.vocab_size,
                dims.vocab_size
            );
        }
        Ok(Self {
            id: id.map(str::to_string).unwrap_or_else(|| ckpt.default_id()),
            tokenizer,
            chat_template,
            dims,
            net,
            backend: opts.backend,
            device: opts.device.clone(),
            pool: rayon::ThreadPoolBuilder::new()
                .num_threads(opts.threads)
                .thread_name(|i| format!("tiller-kernel-{i}"))
                .build()?,
            checkpoint_bytes: checkpoint_size(path),
        })
    }

    /// The model's sizes.
    pub fn dims(&self) -> &ModelDims {
        &self.dims
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Backend, device, weight storage and threads.
    pub fn runtime(&self) -> RuntimeInfo {
        let mut by_format = std::collections::BTreeMap::new();
        self.net
            .visit_weights(&mut |name, bytes| *by_format.entry(name).or_insert(0) += bytes);
        RuntimeInfo {
            backend: self.backend,
            device: device_name(&self.device),
            weights: weights_summary(&by_format),
            weight_bytes: by_format.values().sum(),
            checkpoint_bytes: self.checkpoint_bytes,
            threads: self.pool.current_num_threads(),
        }
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        let kv_dim = self.dims.n_kv_heads * self.dims.head_dim;
        KvCache::new(
            self.dims.n_layers,
            self.backend == Backend::CpuKernels,
            kv_dim,
        )
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
    ) -> Result<Option<candle_core::Tensor>> {
        self.forward_from(batch, caches, None, hooks)
    }

    /// [`Model::forward`] from block `first` on, with `x` (the rows' input of that block,
    /// `[rows, d_model]` flattened) instead of the embeddings, when `start` is given. The
    /// blocks before `first` are not run, so their caches do not grow: for runs whose caches
    /// are thrown away after (activation patching).
    pub fn forward_from(
        &self,
        batch: &PackedBatch,
        caches: &mut [&mut KvCache],
        start: Option<(usize, Vec<f32>)>,
        hooks: &mut dyn Hooks,
    ) -> Result<Option<candle_core::Tensor>> {
        self.check_batch(batch, caches)?;
        if let Some((first, x)) = &start {
            if *first >= self.dims.n_layers || x.len() != batch.tokens.len() * self.dims.d_model {
                bail!(
                    "a start at block {first} with {} values for {} rows",
                    x.len(),
                    batch.tokens.len()
                );
            }
        }
        let pass = || {
            let mut p = Pass::new(batch, caches, hooks, self.backend, &self.device);
            let x = match start {
                None => self.net.forward(&mut p)?,
                Some((first, x)) => {
                    let rows = batch.tokens.len();
                    let x =
                        candle_core::Tensor::from_vec(x, (rows, self.dims.d_model), &self.device)?;
                    self.net.forward_from(&mut p, first, x)?
                }
            };
            for (c, cache) in batch.chunks.iter().zip(p.caches.iter_mut()) {
                cache.len = c.start_pos + c.len;
            }
            let rows = batch.logit_rows();
            if rows.is_empty() {
                return Ok(None);
            }
            let idx = candle_core::Tensor::new(rows.as_slice(), &self.device)?;
            Ok(Some(self.net.logits(&x.index_select(&idx, 0)?)?))
        };
        // The CPU kernels' threads work as one team for the pass; a device backend's pass
        // leaves them to rayon.
        self.pool.install(|| match self.backend {
            Backend::CpuKernels => cpu::team::with_team(pass),
            Backend::Candle => pass(),
        })
    }

    /// The final norm and unembedding of residual rows (`d_model` each): the logits the model
    /// would give if its residual stream were these rows after the last block (logit lens).
    pub fn unembed(&self, rows: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let d = self.dims.d_model;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(bad) = rows.iter().find(|r| r.len() != d) {
            bail!(
                "a residual row of {} values; the model's width is {d}",
                bad.len()
            );
        }
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        self.pool.install(|| {
            let x = candle_core::Tensor::from_vec(flat, (rows.len(), d), &self.device)?;
            Ok(self.net.logits(&x)?.to_vec2::<f32>()?)
        })
    }

    fn check_batch(&self, batch: &PackedBatch, caches: &[&mut KvCache]) -> Result<()> {
        if caches.len() != batch.chunks.len() {
            bail!(
                "{} caches for {} sequences",
                caches.len(),
                batch.chunks.len()
            );
        }
        for (c, cache) in batch.chunks.iter().zip(caches.iter()) {
            if cache.len != c.start_pos || cache.layers.len() != self.dims.n_layers {
                bail!(
                    "chunk starts at {} but its cache holds {}",
                    c.start_pos,
                    cache.len
                );
            }
            if c.start_pos + c.len > self.dims.context_length {
                bail!(
                    "sequence of {} tokens exceeds the context length {}",
                    c.start_pos + c.len,
                    self.dims.context_length
                );
            }
        }
        if let Some(&bad) = batch
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.dims.vocab_size)
        {
            bail!(
                "token id {bad} is outside the vocabulary of {}",
                self.dims.vocab_size
            );
        }
        Ok(())
    }

    /// Runs each segment's tokens (continuing its cache) through the model in one packed pass
    /// with `hooks`, which see segment `i`'s rows as sequence `i`. Returns, per segment, the
    /// logit rows it asked for.
    pub fn run(
        &self,
        segments: &mut [Segment<'_>],
        hooks: &mut dyn Hooks,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        self.run_from(segments, None, hooks)
    }

    /// [`Model::run`] from block `first` on `x` (see [`Model::forward_from`]).
    pub fn run_from(
        &self,
        segments: &mut [Segment<'_>],
        start: Option<(usize, Vec<f32>)>,
        hooks: &mut dyn Hooks,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let mut batch = PackedBatch::default();
        for s in segments.iter() {
            match s.logits {
                Logits::Every => batch.push_scored(s.tokens, s.cache.len()),
                l => batch.push(s.tokens, s.cache.len(), l == Logits::Last),
            }
        }
        let mut caches: Vec<&mut KvCache> = segments.iter_mut().map(|s| &mut *s.cache).collect();
        let logits = self.forward_from(&batch, &mut caches, start, hooks)?;
        let mut rows = match logits {
            Some(l) => l.to_vec2::<f32>()?.into_iter(),
            None => Vec::new().into_iter(),
        };
        Ok(batch
            .chunks
            .iter()
            .map(|c| {
                let n = match (c.logits && c.len > 0, c.all_logits) {
                    (false, _) => 0,
                    (true, true) => c.len,
                    (true, false) => 1,
                };
                rows.by_ref().take(n).collect()
            })
            .collect())
    }

    /// Runs whole sequences from empty caches with `hooks`, packed into passes of about
    /// `budget` tokens (a longer sequence runs alone). Hooks see sequence `i` of `sequences`
    /// as sequence `i` in every pass. Returns each sequence's logit rows.
    pub fn run_fresh(
        &self,
        sequences: &[&[u32]],
        logits: Logits,
        budget: usize,
        hooks: &mut dyn Hooks,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let mut out = Vec::with_capacity(sequences.len());
        let mut start = 0;
        while start < sequences.len() {
            let mut end = start + 1;
            let mut tokens = sequences[start].len();
            while end < sequences.len() && tokens + sequences[end].len() <= budget {
                tokens += sequences[end].len();
                end += 1;
            }
            let mut batch = PackedBatch::default();
            for (i, s) in sequences[start..end].iter().enumerate() {
                match logits {
                    Logits::Every => batch.push_scored(s, 0),
                    l => batch.push(s, 0, l == Logits::Last),
                }
                if let Some(c) = batch.chunks.last_mut() {
                    c.sequence = start + i;
                }
            }
            let mut caches: Vec<KvCache> = (start..end).map(|_| self.new_cache()).collect();
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let result = self.forward(&batch, &mut refs, hooks)?;
            let mut rows = match result {
                Some(l) => l.to_vec2::<f32>()?.into_iter(),
                None => Vec::new().into_iter(),
            };
            for c in &batch.chunks {
                let n = match logits {
                    Logits::None => 0,
                    Logits::Last => usize::from(c.len > 0),
                    Logits::Every => c.len,
                };
                out.push(rows.by_ref().take(n).collect());
            }
            start = end;
        }
        Ok(out)
    }

    /// Replaces the model's chat template (or gives one to a model that has none).
    pub fn set_chat_template(&mut self, source: &str) -> Result<()> {
        let text = |t: &Option<tokenizer::SpecialToken>| {
            t.as_ref().map(|t| t.text.clone()).unwrap_or_default()
        };
        self.chat_template = Some(ChatTemplate::new(
            source,
            &text(&self.tokenizer.bos),
            &text(&self.tokenizer.eos),
        )?);
        Ok(())
    }

    /// Token ids of a chat conversation rendered with the model's template, ending where the
    /// assistant's reply begins.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| anyhow::Error::new(chat::NoChatTemplate))?;
        let text = template.render(messages, true)?;
        self.tokenizer.encode(&text, true)
    }

    /// Token ids of a raw prompt.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(prompt, true)
    }
}

/// The formats by share of bytes, largest first (`q5_0 62%, q8_0 25%, ...`), or the one
/// format's name.
fn weights_summary(by_format: &std::collections::BTreeMap<&'static str, usize>) -> String {
    let total: usize = by_format.values().sum();
    let mut v: Vec<_> = by_format.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    match v.as_slice() {
        [(name, _)] => name.to_string(),
        _ => v
            .iter()
            .map(|(name, bytes)| format!("{name} {}%", (**bytes * 100 + total / 2) / total.max(1)))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// `cpu`, `cuda:N` or `metal:N`.
fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
