//! Extracting feature vectors from contrasting examples: run the model over prompts that show
//! a behaviour and prompts that don't, read the residual stream at every requested layer, and
//! take a direction that separates them.
//!
//! - `mean_diff`: difference of the class means (Marks & Tegmark 2023; Arditi et al. 2024).
//! - `caa`: Contrastive Activation Addition (Rimsky et al. 2023): the same question answered
//!   both ways; the mean of the paired differences at the answer.
//! - `pca`: the top eigenvector of the second moment of the paired differences (RepE, Zou et
//!   al. 2023, whose random pair order makes this the first principal component), sign fixed
//!   so that most positives project above their negatives, scaled by the mean projected
//!   difference so its norm compares with `mean_diff`. Power iteration from a fixed start: the
//!   result is deterministic.
//! - `neuron_means`: the mean `mlp_act` of every neuron over a prompt set, for mean-ablation.
//!
//! Each layer is reported with the vector's norm, the mean residual norm there, and how well
//! the direction separates held-out examples (every fifth example, or pair, is held out and
//! the direction recomputed without it).

use crate::model::hooks::{BatchRows, HookSite, Hooks};
use crate::model::Logits;
use crate::model::Model;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

/// How to turn activations into a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    MeanDiff,
    Pca,
    Caa,
    NeuronMeans,
    /// The mean `attn_head` activation over a prompt set, for mean-ablating heads.
    HeadMeans,
}

impl Method {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "mean_diff" => Some(Self::MeanDiff),
            "pca" => Some(Self::Pca),
            "caa" => Some(Self::Caa),
            "neuron_means" => Some(Self::NeuronMeans),
            "head_means" => Some(Self::HeadMeans),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MeanDiff => "mean_diff",
            Self::Pca => "pca",
            Self::Caa => "caa",
            Self::NeuronMeans => "neuron_means",
            Self::HeadMeans => "head_means",
        }
    }

    /// Methods that average one prompt set (`prompts`) rather than contrast two.
    pub fn is_means(self) -> bool {
        matches!(self, Self::NeuronMeans | Self::HeadMeans)
    }

    /// Methods that pair `positive[i]` with `negative[i]`.
    pub fn is_paired(self) -> bool {
        matches!(self, Self::Pca | Self::Caa)
    }
}

/// Which token positions of an example are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    /// The last token.
    Last,
    /// The mean over all tokens but the first (which attention sinks make an outlier).
    Mean,
    /// The mean over the completion's tokens (needs a `completion`).
    Response,
}

impl Position {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "last" => Some(Self::Last),
            "mean" => Some(Self::Mean),
            "response" => Some(Self::Response),
            _ => None,
        }
    }
}

/// One example: a text, or a prompt with a completion (an assistant reply prefilled when the
/// example is a chat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ExampleSpec {
    Text(String),
    Completion {
        prompt: String,
        #[serde(default)]
        completion: Option<String>,
    },
}

impl ExampleSpec {
    fn parts(&self) -> (&str, Option<&str>) {
        match self {
            Self::Text(t) => (t, None),
            Self::Completion { prompt, completion } => (prompt, completion.as_deref()),
        }
    }
}

/// An example as tokens, and the positions to read.
#[derive(Debug, Clone)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub read: Range<usize>,
}

/// Encodes an example. With `chat` the prompt is a user turn in the model's chat template and
/// the completion the start of the assistant's reply.
pub fn encode_example(
    model: &Model,
    ex: &ExampleSpec,
    chat: bool,
    position: Position,
) -> Result<Example, String> {
    let (prompt, completion) = ex.parts();
    let mut tokens = if chat {
        model
            .encode_chat(&[crate::model::chat::ChatMessage::new("user", prompt)])
            .map_err(|e| format!("{e:#}"))?
    } else {
        model.encode_prompt(prompt).map_err(|e| format!("{e:#}"))?
    };
    let prompt_len = tokens.len();
    if let Some(c) = completion {
        tokens.extend(
            model
                .tokenizer
                .encode(c, false)
                .map_err(|e| format!("{e:#}"))?,
        );
    }
    let n = tokens.len();
    if n == 0 {
        return Err("encodes to no tokens".into());
    }
    let read = match position {
        Position::Last => n - 1..n,
        Position::Mean if n == 1 => 0..1,
        Position::Mean => 1..n,
        Position::Response => {
            if completion.is_none() || n == prompt_len {
                return Err("position `response` needs a non-empty `completion`".into());
            }
            prompt_len..n
        }
    };
    Ok(Example { tokens, read })
}

/// Per-layer activations of one example, each reduced over its read positions.
pub type Activations = Vec<Vec<f32>>;

/// Records the mean activation over each sequence's read positions at a set of layers
/// (carried between the chunks of a long example's pass).
pub struct Recorder {
    site: HookSite,
    layers: Arc<Vec<usize>>,
    reads: Vec<Range<usize>>,
    /// `[sequence][layer index]` running sums.
    sums: Vec<Vec<Vec<f64>>>,
}

impl Recorder {
    pub fn new(examples: &[Example], layers: Arc<Vec<usize>>, site: HookSite) -> Self {
        Self {
            site,
            sums: vec![vec![Vec::new(); layers.len()]; examples.len()],
            layers,
            reads: examples.iter().map(|e| e.read.clone()).collect(),
        }
    }

    /// Each example's activations, averaged over its read positions.
    pub fn finish(self, examples: &[Example]) -> Vec<Activations> {
        self.sums
            .into_iter()
            .zip(examples)
            .map(|(per_layer, ex)| {
                let n = ex.read.len().max(1) as f64;
                per_layer
                    .into_iter()
                    .map(|s| s.into_iter().map(|v| (v / n) as f32).collect())
                    .collect()
            })
            .collect()
    }
}

impl Hooks for Recorder {
    fn is_active(&self, site: HookSite, layer: usize) -> bool {
        site == self.site && self.layers.contains(&layer)
    }

    fn apply(
        &mut self,
        _site: HookSite,
        layer: usize,
        x: &Tensor,
        rows: &BatchRows,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(li) = self.layers.iter().position(|&l| l == layer) else {
            return Ok(None);
        };
        let wanted: Vec<usize> = (0..rows.len())
            .filter(|&r| self.reads[rows.sequence[r]].contains(&rows.position[r]))
            .collect();
        if wanted.is_empty() {
            return Ok(None);
        }
        let idx = Tensor::new(
            wanted
                .iter()
                .map(|&r| r as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            x.device(),
        )?;
        let picked: Vec<Vec<f32>> = x.index_select(&idx, 0)?.to_vec2()?;
        for (&r, h) in wanted.iter().zip(picked) {
            let sum = &mut self.sums[rows.sequence[r]][li];
            if sum.is_empty() {
                *sum = vec![0.0; h.len()];
            }
            for (s, v) in sum.iter_mut().zip(h) {
                *s += v as f64;
            }
        }
        Ok(None)
    }
}

/// Runs `examples` through the model (packed together) and returns each one's activations at
/// `layers` of `site`, averaged over its read positions.
pub fn collect(
    model: &Model,
    examples: &[Example],
    layers: Arc<Vec<usize>>,
    site: HookSite,
) -> anyhow::Result<Vec<Activations>> {
    let mut rec = Recorder::new(examples, layers, site);
    let seqs: Vec<&[u32]> = examples.iter().map(|e| e.tokens.as_slice()).collect();
    model.run_fresh(&seqs, Logits::None, usize::MAX, &mut rec)?;
    Ok(rec.finish(examples))
}

/// What extraction found at one layer.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LayerReport {
    /// The block.
    #[schema(example = 12)]
    pub layer: usize,
    #[schema(example = 28.3)]
    /// Norm of the extracted vector.
    pub norm: f32,
    #[schema(example = 113.1)]
    /// Mean norm of the activations read at this layer (the scale a coefficient acts on).
    pub mean_residual_norm: f32,
    #[schema(example = 1.0)]
    /// Fraction of held-out examples on the right side of the midpoint between the class
    /// means, projecting on a direction computed without them (`null` with too few examples).
    pub heldout_accuracy: Option<f64>,
    #[schema(example = 5.4)]
    /// Difference of the class means' projections over their pooled standard deviation.
    pub separation: f64,
}

/// The vectors and the per-layer report.
#[derive(Debug, Clone)]
pub struct Extraction {
    pub vectors: BTreeMap<usize, Vec<f32>>,
    pub reports: Vec<LayerReport>,
    pub recommended_layer: Option<usize>,
    pub heldout: usize,
}

fn mean_of(rows: &[&[f32]]) -> Vec<f64> {
    let d = rows.first().map_or(0, |r| r.len());
    let mut m = vec![0f64; d];
    for r in rows {
        for (a, &b) in m.iter_mut().zip(r.iter()) {
            *a += b as f64;
        }
    }
    let n = rows.len().max(1) as f64;
    m.iter_mut().for_each(|a| *a /= n);
    m
}

fn dot(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, &y)| x * y as f64).sum()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// The direction for one layer from positive and negative activations.
fn direction(method: Method, pos: &[&[f32]], neg: &[&[f32]]) -> Vec<f64> {
    match method {
        Method::MeanDiff | Method::NeuronMeans | Method::HeadMeans => {
            let (mp, mn) = (mean_of(pos), mean_of(neg));
            mp.iter().zip(&mn).map(|(a, b)| a - b).collect()
        }
        Method::Caa => {
            let diffs: Vec<Vec<f32>> = pos
                .iter()
                .zip(neg)
                .map(|(p, n)| p.iter().zip(n.iter()).map(|(a, b)| a - b).collect())
                .collect();
            let refs: Vec<&[f32]> = diffs.iter().map(|d| d.as_slice()).collect();
            mean_of(&refs)
        }
        Method::Pca => pca_direction(pos, neg),
    }
}

fn pca_direction(pos: &[&[f32]], neg: &[&[f32]]) -> Vec<f64> {
    let diffs: Vec<Vec<f64>> = pos
        .iter()
        .zip(neg)
        .map(|(p, n)| {
            p.iter()
                .zip(n.iter())
                .map(|(a, b)| *a as f64 - *b as f64)
                .collect()
        })
        .collect();
    let n = diffs.len();
    let d = diffs.first().map_or(0, |x| x.len());
    if n == 0 || d == 0 {
        return vec![0.0; d];
    }
    // Gram matrix G = D Dᵀ (n × n); its top eigenvector a gives u ∝ Dᵀ a.
    let gram: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| diffs[i].iter().zip(&diffs[j]).map(|(x, y)| x * y).sum())
                .collect()
        })
        .collect();
    let mut a: Vec<f64> = (0..n)
        .map(|i| 1.0 + 0.01 * ((i * 7919) % 13) as f64)
        .collect();
    for _ in 0..500 {
        let next: Vec<f64> = gram
            .iter()
            .map(|row| row.iter().zip(&a).map(|(g, x)| g * x).sum())
            .collect();
        let nn = norm(&next);
        if nn == 0.0 {
            break;
        }
        let next: Vec<f64> = next.into_iter().map(|x| x / nn).collect();
        let delta: f64 = next.iter().zip(&a).map(|(x, y)| (x - y).abs()).sum();
        a = next;
        if delta < 1e-12 {
            break;
        }
    }
    let mut u = vec![0f64; d];
    for (ai, di) in a.iter().zip(&diffs) {
        for (uk, dk) in u.iter_mut().zip(di) {
            *uk += ai * dk;
        }
    }
    let un = norm(&u);
    if un == 0.0 {
        return u;
    }
    u.iter_mut().for_each(|x| *x /= un);
    // Sign by majority of pairs, then scale by the mean projected difference.
    let projections: Vec<f64> = diffs
        .iter()
        .map(|di| di.iter().zip(&u).map(|(x, y)| x * y).sum())
        .collect();
    let above = projections.iter().filter(|&&p| p > 0.0).count();
    let mean_proj = projections.iter().sum::<f64>() / n as f64;
    let flip = above * 2 < n || (above * 2 == n && mean_proj < 0.0);
    let scale = if flip { -mean_proj } else { mean_proj };
    let sign = if flip { -1.0 } else { 1.0 };
    u.iter().map(|x| sign * x * scale.abs()).collect()
}

/// The rows not held out.
fn training<'a>(rows: &[&'a [f32]]) -> Vec<&'a [f32]> {
    rows.iter()
        .enumerate()
        .filter(|(i, _)| !is_heldout(*i))
        .map(|(_, r)| *r)
        .collect()
}

/// Indices held out: every fifth example (or pair).
fn is_heldout(i: usize) -> bool {
    i % 5 == 4
}

/// Computes the vectors and their report. `pos[i][l]` / `neg[i][l]` are activations at
/// `layers[l]`.
pub fn compute(
    method: Method,
    pos: &[Activations],
    neg: &[Activations],
    layers: &[usize],
) -> Extraction {
    let mut vectors = BTreeMap::new();
    let mut reports = Vec::new();
    let held_pos: Vec<usize> = (0..pos.len()).filter(|&i| is_heldout(i)).collect();
    let held_neg: Vec<usize> = (0..neg.len()).filter(|&i| is_heldout(i)).collect();
    let can_hold_out = !held_pos.is_empty()
        && !held_neg.is_empty()
        && pos.len() > held_pos.len()
        && neg.len() > held_neg.len();
    for (li, &layer) in layers.iter().enumerate() {
        let p: Vec<&[f32]> = pos.iter().map(|a| a[li].as_slice()).collect();
        let n: Vec<&[f32]> = neg.iter().map(|a| a[li].as_slice()).collect();
        let v = direction(method, &p, &n);
        let vn = norm(&v);
        let unit: Vec<f64> = if vn > 0.0 {
            v.iter().map(|x| x / vn).collect()
        } else {
            v.clone()
        };
        let proj = |rows: &[&[f32]]| rows.iter().map(|r| dot(&unit, r)).collect::<Vec<f64>>();
        let (pp, np) = (proj(&p), proj(&n));
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        let var = |xs: &[f64]| {
            let m = mean(xs);
            xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len().max(1) as f64
        };
        let pooled = ((var(&pp) + var(&np)) / 2.0).sqrt();
        let separation = if pooled > 0.0 {
            (mean(&pp) - mean(&np)) / pooled
        } else {
            0.0
        };
        let all_norms: Vec<f64> = p
            .iter()
            .chain(&n)
            .map(|r| r.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt())
            .collect();
        let heldout_accuracy = can_hold_out.then(|| {
            let (tp, tn) = (training(&p), training(&n));
            let vt = direction(method, &tp, &tn);
            let vtn = norm(&vt).max(f64::MIN_POSITIVE);
            let ut: Vec<f64> = vt.iter().map(|x| x / vtn).collect();
            let mp = mean(&tp.iter().map(|r| dot(&ut, r)).collect::<Vec<_>>());
            let mn = mean(&tn.iter().map(|r| dot(&ut, r)).collect::<Vec<_>>());
            let threshold = (mp + mn) / 2.0;
            let up = mp >= mn;
            let right = held_pos
                .iter()
                .filter(|&&i| (dot(&ut, p[i]) > threshold) == up)
                .count()
                + held_neg
                    .iter()
                    .filter(|&&i| (dot(&ut, n[i]) < threshold) == up)
                    .count();
            right as f64 / (held_pos.len() + held_neg.len()) as f64
        });
        reports.push(LayerReport {
            layer,
            norm: vn as f32,
            mean_residual_norm: mean(&all_norms) as f32,
            heldout_accuracy,
            separation,
        });
        vectors.insert(layer, v.iter().map(|&x| x as f32).collect());
    }
    let recommended_layer = reports
        .iter()
        .max_by(|a, b| {
            let acc = |r: &LayerReport| r.heldout_accuracy.unwrap_or(-1.0);
            acc(a)
                .total_cmp(&acc(b))
                .then(a.separation.total_cmp(&b.separation))
        })
        .map(|r| r.layer);
    Extraction {
        vectors,
        reports,
        recommended_layer,
        heldout: if can_hold_out {
            held_pos.len() + held_neg.len()
        } else {
            0
        },
    }
}

/// Mean activations over a prompt set (for `neuron_means`).
pub fn means(acts: &[Activations], layers: &[usize]) -> BTreeMap<usize, Vec<f32>> {
    layers
        .iter()
        .enumerate()
        .map(|(li, &l)| {
            let rows: Vec<&[f32]> = acts.iter().map(|a| a[li].as_slice()).collect();
            (l, mean_of(&rows).into_iter().map(|x| x as f32).collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acts(rows: &[[f32; 3]]) -> Vec<Activations> {
        rows.iter().map(|r| vec![r.to_vec()]).collect()
    }

    #[test]
    fn mean_diff_and_caa_are_differences_of_means() {
        let pos = acts(&[[1.0, 2.0, 0.0], [3.0, 2.0, 0.0]]);
        let neg = acts(&[[0.0, 0.0, 1.0], [0.0, 2.0, 1.0]]);
        for m in [Method::MeanDiff, Method::Caa] {
            let e = compute(m, &pos, &neg, &[4]);
            let v = &e.vectors[&4];
            let want = [2.0, 1.0, -1.0];
            for k in 0..3 {
                assert!((v[k] - want[k]).abs() < 1e-6, "{m:?}: {v:?}");
            }
            assert_eq!(e.reports[0].layer, 4);
            assert!((e.reports[0].norm - 6f32.sqrt()).abs() < 1e-5);
        }
    }

    #[test]
    fn pca_finds_the_consistent_direction_with_the_right_sign() {
        // Differences are (2, 0, 0) plus small noise along the other axes.
        let mut pos = Vec::new();
        let mut neg = Vec::new();
        for i in 0..10 {
            let e = (i as f32 - 4.5) * 0.05;
            pos.push(vec![vec![2.0 + 1.0, e, -e]]);
            neg.push(vec![vec![1.0, 0.0, 0.0]]);
        }
        let e = compute(Method::Pca, &pos, &neg, &[0]);
        let v = &e.vectors[&0];
        assert!(v[0] > 1.9 && v[0] < 2.1, "{v:?}");
        assert!(v[1].abs() < 0.1 && v[2].abs() < 0.1, "{v:?}");
        // Deterministic.
        assert_eq!(compute(Method::Pca, &pos, &neg, &[0]).vectors, e.vectors);
        // Swapping the classes flips the sign.
        let flipped = compute(Method::Pca, &neg, &pos, &[0]);
        assert!(flipped.vectors[&0][0] < -1.9);
    }

    #[test]
    fn heldout_accuracy_and_recommendation() {
        // Layer 0 separates perfectly; layer 1 is noise.
        let mut pos = Vec::new();
        let mut neg = Vec::new();
        for i in 0..10 {
            let noise = ((i * 37 % 11) as f32 - 5.0) * 0.1;
            pos.push(vec![vec![1.0 + noise, 0.0, 0.0], vec![noise, 1.0, 0.0]]);
            neg.push(vec![vec![-1.0 + noise, 0.0, 0.0], vec![-noise, 1.0, 0.0]]);
        }
        let e = compute(Method::MeanDiff, &pos, &neg, &[3, 7]);
        assert_eq!(e.heldout, 4);
        assert_eq!(e.reports[0].heldout_accuracy, Some(1.0));
        assert_eq!(e.recommended_layer, Some(3));
        assert!(e.reports[0].separation > e.reports[1].separation);
        // Too few examples to hold any out.
        let e = compute(Method::MeanDiff, &pos[..3], &neg[..3], &[3]);
        assert_eq!(e.reports[0].heldout_accuracy, None);
    }
}
