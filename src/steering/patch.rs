//! Activation patching (causal tracing, Meng et al. 2022; practice as in Heimersheim & Nanda
//! 2024, "How to use and interpret activation patching"): run a *source* prompt and record its
//! activations at one hook site, then rerun a *base* prompt of the same length with the
//! source's activation put in at one (layer, position[, head]) at a time, and read a metric of
//! the next-token logits. Denoising patches the clean run into the corrupted one; noising the
//! reverse.
//!
//! A patched run is the base run up to the patched position: causal attention means every
//! earlier position is unchanged; and below the patched block nothing changes at any
//! position. So each patched run starts from a copy of the base run's KV cache for that
//! prefix ([`KvCache::prefix`]) and computes only the positions from the patch on, from the
//! patched block on (its input is the base run's `resid_pre` there), and the runs of many
//! cells go through the model together as the rows of one packed batch. All of it is exact:
//! a patched run equals a full forward pass with the patch, bit for bit.

use crate::model::hooks::{BatchRows, HookSite, Hooks};
use crate::model::{KvCache, Logits, Model, Segment};
use candle_core::Tensor;

/// What is measured on the next-token logits of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Metric {
    /// `logit[a] - logit[b]`.
    LogitDiff { a: u32, b: u32 },
    /// `log_softmax(logits)[target]`.
    Logprob { target: u32 },
}

impl Metric {
    pub fn of(&self, logits: &[f32]) -> f32 {
        let at = |t: u32| logits.get(t as usize).copied().unwrap_or(f32::NAN);
        match *self {
            Metric::LogitDiff { a, b } => at(a) - at(b),
            Metric::Logprob { target } => {
                let lp = crate::engine::sampling::log_softmax(logits);
                lp.get(target as usize).copied().unwrap_or(f32::NAN)
            }
        }
    }
}

/// `(patched - corrupted) / (clean - corrupted)`: 0 where the patch changes nothing, 1 where
/// it restores the clean metric; `None` when clean and corrupted agree.
pub fn recovery(patched: f32, clean: f32, corrupted: f32) -> Option<f32> {
    let span = clean - corrupted;
    (span != 0.0 && span.is_finite()).then(|| (patched - corrupted) / span)
}

/// One place an activation is replaced: block, token position and, at `attn_head`, the span
/// of one head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchPoint {
    pub layer: usize,
    pub position: usize,
    /// `(start, len)` in the activation row; none for all of it.
    pub span: Option<(usize, usize)>,
}

/// The source run's activations at one site: `rows[layer index][position]`.
#[derive(Debug, Clone, Default)]
pub struct SourceActs {
    pub layers: Vec<usize>,
    pub rows: Vec<Vec<Vec<f32>>>,
}

/// Records a run's activations at `site` for `layers`, at every position or the ones kept
/// (carried between the chunks of a pass); a position not kept has an empty row.
pub struct SourceRecorder {
    site: HookSite,
    acts: SourceActs,
    keep: Option<Vec<bool>>,
}

impl SourceRecorder {
    pub fn new(site: HookSite, layers: Vec<usize>, n_tokens: usize) -> Self {
        let rows = vec![vec![Vec::new(); n_tokens]; layers.len()];
        Self {
            site,
            acts: SourceActs { layers, rows },
            keep: None,
        }
    }

    /// Keeps only these positions.
    pub fn keeping(mut self, positions: Vec<usize>) -> Self {
        let n = self.acts.rows.first().map_or(0, Vec::len);
        let mut keep = vec![false; n];
        for p in positions.into_iter().filter(|&p| p < n) {
            keep[p] = true;
        }
        self.keep = Some(keep);
        self
    }

    pub fn finish(self) -> SourceActs {
        self.acts
    }
}

impl Hooks for SourceRecorder {
    fn is_active(&self, site: HookSite, layer: usize) -> bool {
        site == self.site && self.acts.layers.contains(&layer)
    }

    fn apply(
        &mut self,
        _: HookSite,
        layer: usize,
        x: &Tensor,
        rows: &BatchRows,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(li) = self.acts.layers.iter().position(|&l| l == layer) else {
            return Ok(None);
        };
        for (row, &pos) in x.to_vec2::<f32>()?.into_iter().zip(&rows.position) {
            let kept = self
                .keep
                .as_ref()
                .is_none_or(|k| k.get(pos).copied().unwrap_or(false));
            if let (true, Some(slot)) = (kept, self.acts.rows[li].get_mut(pos)) {
                *slot = row;
            }
        }
        Ok(None)
    }
}

/// Hooks for a batch of patched runs: the run of sequence `i` replaces the activation at each
/// of `patches[i]` by the source's.
pub struct PatchHooks<'a> {
    site: HookSite,
    source: &'a SourceActs,
    patches: &'a [Vec<PatchPoint>],
}

impl<'a> PatchHooks<'a> {
    pub fn new(site: HookSite, source: &'a SourceActs, patches: &'a [Vec<PatchPoint>]) -> Self {
        Self {
            site,
            source,
            patches,
        }
    }
}

impl Hooks for PatchHooks<'_> {
    fn is_active(&self, site: HookSite, layer: usize) -> bool {
        site == self.site && self.patches.iter().flatten().any(|p| p.layer == layer)
    }

    fn apply(
        &mut self,
        _: HookSite,
        layer: usize,
        x: &Tensor,
        rows: &BatchRows,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(li) = self.source.layers.iter().position(|&l| l == layer) else {
            return Ok(None);
        };
        let (n, width) = x.dims2()?;
        let mut data: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut touched = false;
        for (r, h) in data.chunks_mut(width).enumerate().take(n) {
            let (seq, pos) = (rows.sequence[r], rows.position[r]);
            let Some(points) = self.patches.get(seq) else {
                continue;
            };
            for p in points
                .iter()
                .filter(|p| p.layer == layer && p.position == pos)
            {
                let Some(src) = self.source.rows[li].get(pos) else {
                    continue;
                };
                let (start, len) = p.span.unwrap_or((0, width));
                if let (Some(dst), Some(src)) =
                    (h.get_mut(start..start + len), src.get(start..start + len))
                {
                    dst.copy_from_slice(src);
                    touched = true;
                }
            }
        }
        if !touched {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(data, (n, width), x.device())?))
    }
}

/// The base run: its tokens, its KV cache, and its `resid_pre` at the patched blocks (every
/// position), from which patched runs start.
pub struct BaseRun<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a KvCache,
    pub resid_pre: &'a SourceActs,
}

/// Runs the base prompt once for each entry of `patches`, all in one packed batch, each from
/// the base cache of the positions before its first patch and from the lowest patched block;
/// returns each run's metric.
pub fn patched_metrics(
    model: &Model,
    base: &BaseRun,
    site: HookSite,
    source: &SourceActs,
    patches: &[Vec<PatchPoint>],
    metric: Metric,
) -> anyhow::Result<Vec<f32>> {
    let (tokens, base_cache) = (base.tokens, base.cache);
    let last = tokens.len().saturating_sub(1);
    let starts: Vec<usize> = patches
        .iter()
        .map(|ps| {
            ps.iter()
                .map(|p| p.position)
                .min()
                .unwrap_or(last)
                .min(last)
        })
        .collect();
    let mut caches = starts
        .iter()
        .map(|&s| base_cache.prefix(s))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut segments: Vec<Segment> = caches
        .iter_mut()
        .zip(&starts)
        .map(|(cache, &s)| Segment {
            tokens: &tokens[s..],
            cache,
            logits: Logits::Last,
        })
        .collect();
    let first = patches.iter().flatten().map(|p| p.layer).min();
    let start = first.and_then(|first| {
        let li = base.resid_pre.layers.iter().position(|&l| l == first)?;
        let rows = &base.resid_pre.rows[li];
        let x: Option<Vec<f32>> = starts
            .iter()
            .flat_map(|&s| (s..tokens.len()).map(|p| rows.get(p).filter(|r| !r.is_empty())))
            .collect::<Option<Vec<_>>>()
            .map(|rs| rs.into_iter().flatten().copied().collect());
        Some((first, x?))
    });
    let mut hooks = PatchHooks::new(site, source, patches);
    let out = model.run_from(&mut segments, start, &mut hooks)?;
    Ok(out
        .iter()
        .map(|rows| rows.last().map_or(f32::NAN, |l| metric.of(l)))
        .collect())
}
