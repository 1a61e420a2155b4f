//! What a request may ask: the steering spec on the wire, and its validation into a
//! [`SteeringPlan`] that names every hook point, direction and operation. Errors name the field
//! that failed (`steering[1].layer`).
//!
//! Operations: `add` (activation addition, Turner et al. 2023; CAA, Rimsky et al. 2023),
//! `ablate` (directional ablation, Arditi et al. 2024: with no layer it projects the direction
//! out of the embeddings and of every attention and MLP write, so no residual stream ever holds
//! it), `clamp` (set the projection to a value), and neuron `zero` / `mean` / `scale` / `set`
//! on `mlp_act`.

use super::sae::{Sae, SaeStore};
use super::store::VectorStore;
use super::vector::{l2_norm, SteeringVector, VectorKind};
use crate::model::hooks::HookSite;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

mod validate;
pub use validate::validate;

/// The neuron means the `mean` op uses when a request names none.
pub const DEFAULT_NEURON_MEANS: &str = "neuron_means_default";

/// Largest coefficient accepted: far beyond any useful steering strength, small enough that
/// `c·v` stays finite in f32.
pub const MAX_COEFFICIENT: f64 = 1e6;

/// Largest L2 norm of a direction, and of a direction times its coefficient: residual streams
/// are norms of at most thousands, and squares of values this size still sum finitely in f32
/// (RMSNorm), so the forward pass and the norms of `ablate`, `clamp` and `normalize` stay finite.
pub const MAX_STEERING_NORM: f64 = 1e9;

/// One intervention as sent by a client.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InterventionSpec {
    /// Name of a stored vector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "golden_gate")]
    pub vector: Option<String>,
    #[schema(example = json!([0.01, -0.02, 0.03]))]
    /// An inline direction (`d_model` numbers) instead of `vector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<f64>>,
    /// A single MLP neuron, for the neuron ops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neuron: Option<NeuronRef>,
    /// A sparse-autoencoder feature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<FeatureRef>,
    /// One block to act on (0-based; the block's output, `resid_post`, unless `site` says
    /// otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 12)]
    pub layer: Option<i64>,
    /// Several blocks: a list of layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = json!([10, 11, 12]))]
    pub layers: Option<Vec<i64>>,
    /// Strength (`add`), target projection (`clamp`), factor (`scale`) or value (`set`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 8.0)]
    pub coefficient: Option<f64>,
    /// `add` (default), `ablate`, `clamp`; for neurons `zero`, `mean`, `scale`, `set`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "add")]
    pub op: Option<String>,
    #[schema(example = false)]
    /// Use the unit vector, so `coefficient` is in residual-stream units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
    /// `"all"` (default), `"prompt"`, `"generated"`, or `{"last": k}`: the last k prompt tokens
    /// and every generated token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object, example = json!("all"))]
    pub positions: Option<serde_json::Value>,
    /// Hook site: `resid_post` (default), `resid_pre`, `attn_out`, `mlp_out`, `mlp_act`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "resid_post")]
    pub site: Option<String>,
    #[schema(example = "neuron_means_default")]
    /// For the neuron `mean` op: the stored neuron means to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub means: Option<String>,
}

/// An MLP neuron: `index` in `mlp_act` of block `layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NeuronRef {
    /// The block (0-based).
    #[schema(example = 10)]
    pub layer: i64,
    /// The neuron in its `mlp_act` (0-based).
    #[schema(example = 1234)]
    pub index: i64,
}

/// A feature of a loaded sparse autoencoder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeatureRef {
    /// A loaded sparse autoencoder's name.
    #[schema(example = "res12_4k")]
    pub sae: String,
    /// The feature (a row of its decoder).
    #[schema(example = 3124)]
    pub index: i64,
}

/// Which token positions an intervention touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    All,
    Prompt,
    Generated,
    /// The last `k` prompt tokens and every generated token.
    Last(usize),
}

impl Positions {
    pub fn contains(self, position: usize, prompt_len: usize) -> bool {
        match self {
            Positions::All => true,
            Positions::Prompt => position < prompt_len,
            Positions::Generated => position >= prompt_len,
            Positions::Last(k) => position.saturating_add(k) >= prompt_len,
        }
    }

    pub fn to_json(self) -> serde_json::Value {
        match self {
            Positions::All => "all".into(),
            Positions::Prompt => "prompt".into(),
            Positions::Generated => "generated".into(),
            Positions::Last(k) => serde_json::json!({ "last": k }),
        }
    }
}

/// What an intervention does at each of its hook points.
#[derive(Debug, Clone)]
pub enum Op {
    /// `h += delta` where `delta = c·v` was computed once.
    Add,
    /// `h -= (h·û) û`.
    Ablate,
    /// `h += (c - h·û) û`.
    Clamp { value: f32 },
    /// Acts on one neuron of `mlp_act`.
    Neuron { index: usize, action: NeuronAction },
    /// Sets an SAE feature's activation to `value` inside the SAE's reconstruction, keeping
    /// the error term: `h += (value - f_i(h)) W_dec[i]`.
    FeatureClamp {
        sae: Arc<Sae>,
        index: usize,
        value: f32,
    },
}

impl PartialEq for Op {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Op::Add, Op::Add) | (Op::Ablate, Op::Ablate) => true,
            (Op::Clamp { value: a }, Op::Clamp { value: b }) => a == b,
            (
                Op::Neuron {
                    index: a,
                    action: x,
                },
                Op::Neuron {
                    index: b,
                    action: y,
                },
            ) => a == b && x == y,
            (
                Op::FeatureClamp {
                    sae: s1,
                    index: a,
                    value: x,
                },
                Op::FeatureClamp {
                    sae: s2,
                    index: b,
                    value: y,
                },
            ) => Arc::ptr_eq(s1, s2) && a == b && x == y,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NeuronAction {
    Zero,
    Scale(f32),
    /// Also the `mean` op, with the stored mean as the value.
    Set(f32),
}

/// One place an intervention acts, with its vector there (`c·v` for `add`, the unit vector
/// for `ablate` and `clamp`, none for neuron ops).
#[derive(Debug, Clone)]
pub struct HookPoint {
    pub site: HookSite,
    pub layer: usize,
    pub vector: Option<Arc<[f32]>>,
}

/// A validated intervention.
#[derive(Debug, Clone)]
pub struct Intervention {
    pub op: Op,
    pub positions: Positions,
    pub points: Vec<HookPoint>,
    /// The normalized form, echoed to the client.
    pub applied: AppliedIntervention,
}

/// The validated form of one intervention, as echoed in responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppliedIntervention {
    /// `add`, `ablate`, `clamp`, `zero`, `mean`, `scale` or `set`.
    #[schema(example = "add")]
    pub op: String,
    /// The stored vector (or, for `mean`, the neuron means) used.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "golden_gate")]
    pub vector: Option<String>,
    #[schema(example = 1)]
    /// Version of the stored vector the request used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vector_version: Option<u64>,
    /// The neuron, for neuron ops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neuron: Option<NeuronRef>,
    /// The SAE feature, for feature ops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<FeatureRef>,
    /// Strength, target projection, factor or value, as validated.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = 8.0)]
    pub coefficient: Option<f64>,
    /// Blocks acted on.
    #[schema(example = json!([12]))]
    pub layers: Vec<usize>,
    /// The hook site (`all_writes` for ablation everywhere).
    #[schema(example = "resid_post")]
    pub site: String,
    /// `all`, `prompt`, `generated` or `{"last": k}`.
    #[schema(value_type = Object, example = json!("all"))]
    pub positions: serde_json::Value,
    /// Whether the unit vector was used.
    #[schema(example = false)]
    pub normalize: bool,
    #[schema(example = 28.3)]
    /// Norm of the direction before any normalization.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vector_norm: Option<f32>,
    #[schema(example = false)]
    /// Whether directional ablation also applies to the token embeddings and every attention
    /// and MLP write (`ablate` with no layer).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub all_writes: bool,
}

/// A request's validated interventions, indexed by hook point.
#[derive(Debug, Clone, Default)]
pub struct SteeringPlan {
    pub interventions: Vec<Intervention>,
    /// `(site, layer)` -> `(intervention, point)` pairs, in request order.
    index: HashMap<(HookSite, usize), Vec<(usize, usize)>>,
}

impl SteeringPlan {
    pub fn new(interventions: Vec<Intervention>) -> Self {
        let mut index: HashMap<(HookSite, usize), Vec<(usize, usize)>> = HashMap::new();
        for (i, iv) in interventions.iter().enumerate() {
            for (p, pt) in iv.points.iter().enumerate() {
                index.entry((pt.site, pt.layer)).or_default().push((i, p));
            }
        }
        Self {
            interventions,
            index,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.interventions.is_empty()
    }

    /// The interventions acting at one hook point, in request order.
    pub fn at(
        &self,
        site: HookSite,
        layer: usize,
    ) -> impl Iterator<Item = (&Intervention, &HookPoint)> {
        self.index
            .get(&(site, layer))
            .into_iter()
            .flatten()
            .map(|&(i, p)| (&self.interventions[i], &self.interventions[i].points[p]))
    }

    /// Every `(site, layer)` the plan touches.
    pub fn hook_points(&self) -> impl Iterator<Item = (HookSite, usize)> + '_ {
        self.index.keys().copied()
    }

    pub fn applied(&self) -> Vec<AppliedIntervention> {
        self.interventions
            .iter()
            .map(|i| i.applied.clone())
            .collect()
    }
}

/// A validation failure, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// e.g. `steering[1].layer`.
    pub field: String,
    /// Machine-readable code, e.g. `unknown_vector`.
    pub code: &'static str,
    pub message: String,
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.field, self.message)
    }
}

/// What validation checks a spec against.
pub struct ModelLimits<'a> {
    pub n_layers: usize,
    pub d_model: usize,
    pub n_neurons: usize,
    pub max_interventions: usize,
    pub store: &'a VectorStore,
    pub saes: &'a SaeStore,
}
