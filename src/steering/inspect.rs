//! Observing before intervening: what the activations are at each token (top neurons or
//! dimensions, norms, projections onto named directions, chosen neurons), how likely chosen
//! continuations are with and without steering, and which token contexts make a neuron or a
//! direction fire most. Interventions are measured as probabilities, not only as text:
//! erasing a neuron often shifts P(" this") against P(" these") without changing the greedy
//! output.
//!
//! Everything here runs on the engine thread with the model and optional steering hooks; the
//! recording hooks reduce each activation to the few numbers asked for as it passes, so an
//! inspection never holds a whole layer's activations for a long prompt.

use super::intervention::{BatchSteering, ConditionTrace};
use super::spec::SteeringPlan;
use crate::engine::sampling::{log_softmax, top_n};
use crate::model::hooks::{BatchRows, HookSite, Hooks, NoHooks};
use crate::model::Model;
use crate::model::{KvCache, Logits, Segment};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

/// One value of one dimension or neuron.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IndexValue {
    /// Neuron or dimension index.
    #[schema(example = 1234)]
    pub index: usize,
    /// Its activation.
    #[schema(example = 3.2)]
    pub value: f32,
}

/// The projection of an activation onto a named direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Projection {
    /// The vector's name.
    #[schema(example = "golden_gate")]
    pub vector: String,
    #[schema(example = 152.3)]
    /// `h · v` with the stored (unnormalized) direction.
    pub dot: f32,
    #[schema(example = 0.05)]
    /// `h · v / (|h| |v|)`.
    pub cosine: f32,
    #[schema(example = 5.4)]
    /// `h · v / |v|`: the coordinate along the unit direction (what `clamp` sets).
    pub scalar: f32,
}

/// What one layer's activation looks like at one token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LayerActivation {
    /// The block.
    #[schema(example = 12)]
    pub layer: usize,
    #[schema(example = 113.1)]
    /// L2 norm of the activation at the inspected site.
    pub norm: f32,
    /// The `top_k` neurons by value (`mlp_act`), or dimensions by magnitude (residual sites).
    pub top: Vec<IndexValue>,
    /// Projections onto the requested vectors (residual-width sites, and `attn_head` for
    /// `head_direction` vectors).
    pub projections: Vec<Projection>,
    /// At `attn_head`: the L2 norm of each head's output, by head.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(example = json!([3.1, 0.4, 7.9]))]
    pub head_norms: Vec<f32>,
}

/// A requested neuron's value at one token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NeuronValue {
    /// The neuron's block.
    #[schema(example = 10)]
    pub layer: usize,
    /// The neuron.
    #[schema(example = 1234)]
    pub index: usize,
    /// Its `mlp_act` value at this token.
    #[schema(example = 0.8)]
    pub value: f32,
}

/// One token of an inspected prompt.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenActivations {
    /// Token position (0-based).
    #[schema(example = 0)]
    pub position: usize,
    /// Token id.
    #[schema(example = 504)]
    pub id: u32,
    /// The token as text.
    #[schema(example = "The")]
    pub text: String,
    /// One entry per inspected layer.
    pub layers: Vec<LayerActivation>,
    /// The requested neurons' values.
    pub neurons: Vec<NeuronValue>,
}

/// What to read during an inspected pass.
#[derive(Debug, Clone)]
pub struct Probe {
    pub site: HookSite,
    pub layers: Vec<usize>,
    pub top_k: usize,
    /// Name and per-layer directions of each vector to project onto.
    pub project_onto: Vec<(String, Arc<super::vector::SteeringVector>)>,
    /// `(layer, index)` of neurons to report.
    pub neurons: Vec<(usize, usize)>,
    /// Values per attention head, for `head_norms` at `attn_head`.
    pub head_dim: usize,
}

/// Records what a [`Probe`] asks for as the activations pass (carried between the chunks of a
/// pass).
pub struct ProbeHooks {
    probe: Arc<Probe>,
    /// `[position][layer index]`.
    layers: Vec<Vec<Option<LayerActivation>>>,
    /// `[position]` values of the requested neurons, in request order.
    neurons: Vec<Vec<Option<f32>>>,
}

impl ProbeHooks {
    pub fn new(probe: Arc<Probe>, n_tokens: usize) -> Self {
        Self {
            layers: vec![vec![None; probe.layers.len()]; n_tokens],
            neurons: vec![vec![None; probe.neurons.len()]; n_tokens],
            probe,
        }
    }

    /// What was recorded at every token.
    pub fn report(mut self, model: &Model, tokens: &[u32]) -> Vec<TokenActivations> {
        tokens
            .iter()
            .enumerate()
            .map(|(p, &id)| TokenActivations {
                position: p,
                id,
                text: model.tokenizer.token_text(id),
                layers: self.layers[p].iter_mut().filter_map(Option::take).collect(),
                neurons: self
                    .probe
                    .neurons
                    .iter()
                    .zip(&self.neurons[p])
                    .filter_map(|(&(layer, index), v)| {
                        v.map(|value| NeuronValue {
                            layer,
                            index,
                            value,
                        })
                    })
                    .collect(),
            })
            .collect()
    }
}

impl Hooks for ProbeHooks {
    fn is_active(&self, site: HookSite, layer: usize) -> bool {
        (site == self.probe.site && self.probe.layers.contains(&layer))
            || (site == HookSite::MlpAct && self.probe.neurons.iter().any(|&(l, _)| l == layer))
    }

    fn apply(
        &mut self,
        site: HookSite,
        layer: usize,
        x: &Tensor,
        rows: &BatchRows,
    ) -> candle_core::Result<Option<Tensor>> {
        let h: Vec<Vec<f32>> = x.to_vec2()?;
        if site == HookSite::MlpAct {
            for (k, &(l, i)) in self.probe.neurons.iter().enumerate() {
                if l == layer {
                    for (r, row) in h.iter().enumerate() {
                        self.neurons[rows.position[r]][k] = row.get(i).copied();
                    }
                }
            }
        }
        if site != self.probe.site {
            return Ok(None);
        }
        let Some(li) = self.probe.layers.iter().position(|&l| l == layer) else {
            return Ok(None);
        };
        for (r, row) in h.iter().enumerate() {
            let norm = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            let top = if site == HookSite::MlpAct {
                top_n(row, self.probe.top_k)
            } else {
                let mags: Vec<f32> = row.iter().map(|v| v.abs()).collect();
                top_n(&mags, self.probe.top_k)
                    .into_iter()
                    .map(|(i, _)| (i, row[i as usize]))
                    .collect()
            };
            let projections = if site != HookSite::MlpAct {
                self.probe
                    .project_onto
                    .iter()
                    .filter_map(|(name, v)| {
                        let d = v.direction_for(layer)?;
                        let dot: f64 = row
                            .iter()
                            .zip(d.iter())
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        let vn = d.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
                        Some(Projection {
                            vector: name.clone(),
                            dot: dot as f32,
                            cosine: if vn > 0.0 && norm > 0.0 {
                                (dot / (vn * norm)) as f32
                            } else {
                                0.0
                            },
                            scalar: if vn > 0.0 { (dot / vn) as f32 } else { 0.0 },
                        })
                    })
                    .collect()
            } else {
                Vec::new()
            };
            self.layers[rows.position[r]][li] = Some(LayerActivation {
                layer,
                norm: norm as f32,
                top: top
                    .into_iter()
                    .map(|(index, value)| IndexValue {
                        index: index as usize,
                        value,
                    })
                    .collect(),
                projections,
                head_norms: match site {
                    HookSite::AttnHead => row
                        .chunks(self.probe.head_dim.max(1))
                        .map(|head| head.iter().map(|v| v * v).sum::<f32>().sqrt())
                        .collect(),
                    _ => Vec::new(),
                },
            });
        }
        Ok(None)
    }
}

/// Next-token distribution after a prompt, and the log-probability of each continuation.
#[derive(Debug, Clone)]
pub struct Scores {
    /// `(token, log-probability)` of the most likely next tokens.
    pub top: Vec<(u32, f32)>,
    /// For each target: the log-probability of each of its tokens in turn.
    pub targets: Vec<Vec<f32>>,
}

/// Scores continuations of a prompt already run into `cache` (`last` its last logits): each
/// target's tokens are teacher-forced on a copy of the cache (they count as generated
/// positions for steering; `conditions` is what the plan's conditions read over the prompt).
pub fn score_continuations(
    model: &Model,
    cache: &KvCache,
    last: &[f32],
    targets: &[Vec<u32>],
    (plan, conditions): (Option<&SteeringPlan>, &ConditionTrace),
    top_k: usize,
) -> anyhow::Result<Scores> {
    let n_layers = model.dims().n_layers;
    let prompt_len = cache.len();
    let last = log_softmax(last);
    let mut out = Vec::with_capacity(targets.len());
    for target in targets {
        let mut lps = Vec::with_capacity(target.len());
        let Some(&t0) = target.first() else {
            out.push(lps);
            continue;
        };
        lps.push(
            *last
                .get(t0 as usize)
                .ok_or_else(|| anyhow::anyhow!("no logits"))?,
        );
        if target.len() > 1 {
            let mut c = cache.clone();
            let mut segment = [Segment {
                tokens: &target[..target.len() - 1],
                cache: &mut c,
                logits: Logits::Every,
            }];
            let mut rows = match plan {
                Some(p) => {
                    let mut hooks = BatchSteering::new(n_layers, vec![(Some(p), prompt_len)])
                        .with_traces(vec![conditions.clone()]);
                    model.run(&mut segment, &mut hooks)?
                }
                None => model.run(&mut segment, &mut NoHooks)?,
            };
            for (row, &next) in rows.pop().unwrap_or_default().iter().zip(&target[1..]) {
                lps.push(log_softmax(row)[next as usize]);
            }
        }
        out.push(lps);
    }
    Ok(Scores {
        top: top_n(&last, top_k),
        targets: out,
    })
}

/// What `top contexts` ranks tokens by.
#[derive(Debug, Clone)]
pub enum Signal {
    /// A neuron's `mlp_act` value.
    Neuron { layer: usize, index: usize },
    /// The projection of `resid_post` at `layer` onto a unit direction.
    Direction { layer: usize, unit: Arc<[f32]> },
    /// An SAE feature's activation at the SAE's hook.
    Feature {
        sae: Arc<super::sae::Sae>,
        index: usize,
    },
}

/// Records a [`Signal`] at every token (carried between the chunks of a pass).
pub struct SignalHooks {
    signal: Signal,
    /// `[sequence][position]`.
    pub values: Vec<Vec<f32>>,
}

impl SignalHooks {
    pub fn new(signal: Signal, lengths: impl IntoIterator<Item = usize>) -> Self {
        Self {
            signal,
            values: lengths.into_iter().map(|n| vec![0.0; n]).collect(),
        }
    }
}

impl Hooks for SignalHooks {
    fn is_active(&self, site: HookSite, layer: usize) -> bool {
        match &self.signal {
            Signal::Neuron { layer: l, .. } => site == HookSite::MlpAct && layer == *l,
            Signal::Direction { layer: l, .. } => site == HookSite::ResidPost && layer == *l,
            Signal::Feature { sae, .. } => site == sae.site && layer == sae.layer,
        }
    }

    fn apply(
        &mut self,
        _: HookSite,
        _: usize,
        x: &Tensor,
        rows: &BatchRows,
    ) -> candle_core::Result<Option<Tensor>> {
        let h: Vec<Vec<f32>> = x.to_vec2()?;
        for (r, row) in h.iter().enumerate() {
            let v = match &self.signal {
                Signal::Neuron { index, .. } => row.get(*index).copied().unwrap_or(0.0),
                Signal::Direction { unit, .. } => {
                    row.iter().zip(unit.iter()).map(|(a, b)| a * b).sum()
                }
                Signal::Feature { sae, index } => sae.feature_activation(row, *index),
            };
            self.values[rows.sequence[r]][rows.position[r]] = v;
        }
        Ok(None)
    }
}

/// The signal at every token of each sequence (packed into one pass).
pub fn signal_values(
    model: &Model,
    sequences: &[Vec<u32>],
    signal: &Signal,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut hooks = SignalHooks::new(signal.clone(), sequences.iter().map(Vec::len));
    let seqs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
    model.run_fresh(&seqs, Logits::None, usize::MAX, &mut hooks)?;
    Ok(hooks.values)
}
