//! What a request may ask: the steering spec on the wire, and its validation into a
//! [`SteeringPlan`] that names every hook point, direction and operation. Errors name the field
//! that failed (`steering[1].layer`).
//!
//! Operations: `add` (activation addition, Turner et al. 2023; CAA, Rimsky et al. 2023),
//! `ablate` (directional ablation, Arditi et al. 2024: with no layer it projects the direction
//! out of the embeddings and of every attention and MLP write, so no residual stream ever holds
//! it), `clamp` (set the projection to a value), and neuron `zero` / `mean` / `scale` / `set`
//! on `mlp_act`. The user's reference to all of it is `docs/steering.md`.

use super::sae::{Sae, SaeStore};
use super::store::VectorStore;
use super::vector::{l2_norm, SteeringVector, VectorKind};
use crate::model::hooks::HookSite;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

mod condition;
mod head;
mod validate;
pub use condition::{Condition, ConditionMeasure, ConditionScope, ConditionSpec, Probe};
pub use validate::validate;
use validate::Validator;

/// The neuron means the `mean` op uses when a request names none.
pub const DEFAULT_NEURON_MEANS: &str = "neuron_means_default";

/// The per-head means the `mean` op on a head uses when a request names none.
pub const DEFAULT_HEAD_MEANS: &str = "head_means_default";

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
    /// `add` (default for directions and features), `ablate`, `clamp`; for neurons `zero`
    /// (default), `mean`, `scale`, `set`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<OpName>,
    #[schema(example = false)]
    /// Use the unit vector, so `coefficient` is in residual-stream units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
    /// Which tokens: `"all"` (default), `"prompt"`, `"generated"`, or `{"last": k}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<Positions>,
    /// Hook site (default `resid_post`; `mlp_act` for neurons; a feature's own SAE site;
    /// `attn_head` with `head`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<HookSite>,
    /// One attention head (0-based) at the `attn_head` site: alone, a target for `zero`,
    /// `mean` or `scale`; with a vector or `values`, the head whose part of the direction is
    /// added, ablated or clamped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 3)]
    pub head: Option<i64>,
    #[schema(example = "neuron_means_default")]
    /// For the neuron `mean` op: the stored neuron means to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub means: Option<String>,
    /// Act only from generated token `from` on (0: the first, chosen by the pass over the last
    /// prompt token). A schedule replaces `positions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 0)]
    pub from: Option<u64>,
    /// Act only before generated token `until` (so `until: 5` shapes the first five).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 5)]
    pub until: Option<u64>,
    /// `linear`: an `add` fades from full strength at `from` to zero at `until`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay: Option<Decay>,
    /// Act only where a condition direction is present (or absent): conditional steering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<ConditionSpec>,
}

impl InterventionSpec {
    /// The stored vectors this intervention names: its direction, its means and its
    /// condition's direction.
    pub fn vector_names(&self) -> impl Iterator<Item = &str> {
        let when = self.when.as_ref().and_then(|w| w.vector.as_deref());
        [self.vector.as_deref(), self.means.as_deref(), when]
            .into_iter()
            .flatten()
    }
}

/// How a scheduled `add` changes strength over its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Full strength at `from`, falling linearly to zero at `until`.
    Linear,
}

/// When an intervention acts during generation: on the passes that choose generated tokens
/// `from..until` (the pass over position `prompt_len - 1 + i` chooses token `i`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Schedule {
    /// The first generated token it shapes.
    #[schema(example = 0)]
    pub from: usize,
    /// The first it no longer shapes (none: to the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 5)]
    pub until: Option<usize>,
    /// How an `add` fades (none: full strength throughout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay: Option<Decay>,
}

impl Schedule {
    /// The strength at the row at `position` (1 for full), or `None` where it does not act.
    pub fn factor(&self, position: usize, prompt_len: usize) -> Option<f32> {
        let i = (position + 1).checked_sub(prompt_len)?;
        if i < self.from || self.until.is_some_and(|u| i >= u) {
            return None;
        }
        match (self.decay, self.until) {
            (Some(Decay::Linear), Some(u)) => {
                Some(1.0 - (i - self.from) as f32 / (u - self.from) as f32)
            }
            _ => Some(1.0),
        }
    }
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

/// Every steering operation, by its wire name: the one table of op names (the compact
/// grammar, validation, the echo, metrics and the OpenAPI enum all read it).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OpName {
    /// Add `c·v` (activation addition).
    Add,
    /// Project the direction out (directional ablation).
    Ablate,
    /// Set the projection on the direction (or an SAE feature's activation) to `c`.
    Clamp,
    /// Set a neuron (or every value of an attention head) to 0.
    Zero,
    /// Set a neuron (or a head) to its stored mean (mean ablation).
    Mean,
    /// Multiply a neuron (or a head) by `c`.
    Scale,
    /// Set a neuron to `c`.
    Set,
}

impl OpName {
    pub const ALL: [OpName; 7] = [
        OpName::Add,
        OpName::Ablate,
        OpName::Clamp,
        OpName::Zero,
        OpName::Mean,
        OpName::Scale,
        OpName::Set,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OpName::Add => "add",
            OpName::Ablate => "ablate",
            OpName::Clamp => "clamp",
            OpName::Zero => "zero",
            OpName::Mean => "mean",
            OpName::Scale => "scale",
            OpName::Set => "set",
        }
    }

    pub fn parse(s: &str) -> Option<OpName> {
        OpName::ALL.into_iter().find(|op| op.as_str() == s)
    }

    /// Whether the op acts on one MLP neuron (the others act on a direction or a feature).
    pub fn is_neuron_op(self) -> bool {
        matches!(
            self,
            OpName::Zero | OpName::Mean | OpName::Scale | OpName::Set
        )
    }

    /// Whether the op acts on one attention head alone (`zero`, `mean`, `scale`).
    pub fn is_head_op(self) -> bool {
        matches!(self, OpName::Zero | OpName::Mean | OpName::Scale)
    }

    /// The names of a group of ops, for error messages: `add, ablate or clamp`.
    pub fn list(ops: &[OpName]) -> String {
        let names: Vec<&str> = ops.iter().map(|o| o.as_str()).collect();
        match names.split_last() {
            Some((last, [])) => last.to_string(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        }
    }
}

impl std::fmt::Display for OpName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which token positions an intervention touches. On the wire: `"all"`, `"prompt"`,
/// `"generated"` or `{"last": k}` (the last k prompt tokens and every generated token, k >= 1).
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

    /// The named forms (all but `{"last": k}`), with their wire names.
    pub const NAMED: [(Positions, &'static str); 3] = [
        (Positions::All, "all"),
        (Positions::Prompt, "prompt"),
        (Positions::Generated, "generated"),
    ];

    pub fn name(self) -> Option<&'static str> {
        Self::NAMED
            .iter()
            .find(|(p, _)| *p == self)
            .map(|(_, n)| *n)
    }

    pub fn from_name(s: &str) -> Option<Positions> {
        Self::NAMED.iter().find(|(_, n)| *n == s).map(|(p, _)| *p)
    }

    const EXPECTED: &'static str =
        "\"all\", \"prompt\", \"generated\" or {\"last\": k} with k >= 1";
}

impl Serialize for Positions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match (self, self.name()) {
            (_, Some(name)) => s.serialize_str(name),
            (Positions::Last(k), None) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("last", k)?;
                m.end()
            }
            (_, None) => unreachable!("every other form is named"),
        }
    }
}

impl<'de> Deserialize<'de> for Positions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Positions;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(Positions::EXPECTED)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Positions, E> {
                Positions::from_name(v).ok_or_else(|| {
                    E::custom(format!(
                        "unknown positions `{v}`; expected {}",
                        Positions::EXPECTED
                    ))
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Positions, A::Error> {
                use serde::de::Error;
                let bad = || A::Error::custom(format!("expected {}", Positions::EXPECTED));
                if m.next_key::<String>()?.as_deref() != Some("last") {
                    return Err(bad());
                }
                let k: u64 = m.next_value().map_err(|_| bad())?;
                if k == 0 || m.next_key::<String>()?.is_some() {
                    return Err(bad());
                }
                Ok(Positions::Last(usize::try_from(k).unwrap_or(usize::MAX)))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl utoipa::PartialSchema for Positions {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        let named = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(Positions::NAMED.map(|(_, n)| n)));
        let last = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "last",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1))
                    .description(Some("The last k prompt tokens, and every generated token.")),
            )
            .required("last")
            .additional_properties(Some(
                utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
            ));
        OneOfBuilder::new()
            .item(named)
            .item(last)
            .description(Some(
                "Which tokens an intervention touches: `all`, `prompt`, `generated`, or `{\"last\": k}`.",
            ))
            .examples([serde_json::json!("all")])
            .into()
    }
}

impl utoipa::ToSchema for Positions {}

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
    /// Acts on every value of one attention head (the point's span of `attn_head`).
    Head(HeadAction),
}

/// What a head op does to the head's values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HeadAction {
    Zero,
    Scale(f32),
    /// Replace them by the point's vector: the head's stored mean.
    Mean,
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
            (Op::Head(a), Op::Head(b)) => a == b,
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
/// for `ablate` and `clamp`, the mean for a head's `mean`, none for neuron ops).
#[derive(Debug, Clone)]
pub struct HookPoint {
    pub site: HookSite,
    pub layer: usize,
    pub vector: Option<Arc<[f32]>>,
    /// `(start, len)`: the part of the activation the op sees (one attention head); none for
    /// the whole row.
    pub span: Option<(usize, usize)>,
}

impl HookPoint {
    /// A point acting on the whole activation row.
    pub fn whole(site: HookSite, layer: usize, vector: Option<Arc<[f32]>>) -> Self {
        Self {
            site,
            layer,
            vector,
            span: None,
        }
    }
}

/// A validated intervention.
#[derive(Debug, Clone)]
pub struct Intervention {
    pub op: Op,
    pub positions: Positions,
    /// When set, it decides which rows are touched (and how strongly) instead of `positions`.
    pub schedule: Option<Schedule>,
    /// When set, it acts only where the condition holds.
    pub when: Option<Condition>,
    pub points: Vec<HookPoint>,
    /// The normalized form, echoed to the client.
    pub applied: AppliedIntervention,
}

/// The validated form of one intervention, as echoed in responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppliedIntervention {
    /// The operation.
    pub op: OpName,
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
    /// The attention head, at the `attn_head` site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 3)]
    pub head: Option<usize>,
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
    /// The hook site; absent for `ablate` everywhere (`all_writes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<HookSite>,
    /// Which tokens it touches.
    pub positions: Positions,
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
    /// An inline direction as sent (`values`), kept so the echo can be sent back.
    #[serde(skip)]
    pub values: Option<Arc<[f32]>>,
    /// When it acts during generation, if scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// The condition it acts under, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<ConditionSpec>,
}

/// A request's validated interventions, indexed by hook point.
#[derive(Debug, Clone, Default)]
pub struct SteeringPlan {
    pub interventions: Vec<Intervention>,
    /// `(site, layer)` -> `(intervention, point)` pairs, in request order.
    index: HashMap<(HookSite, usize), Vec<(usize, usize)>>,
    /// `(site, layer)` -> the interventions whose condition is read there.
    conditions: HashMap<(HookSite, usize), Vec<usize>>,
}

impl SteeringPlan {
    pub fn new(interventions: Vec<Intervention>) -> Self {
        let mut index: HashMap<(HookSite, usize), Vec<(usize, usize)>> = HashMap::new();
        let mut conditions: HashMap<(HookSite, usize), Vec<usize>> = HashMap::new();
        for (i, iv) in interventions.iter().enumerate() {
            for (p, pt) in iv.points.iter().enumerate() {
                index.entry((pt.site, pt.layer)).or_default().push((i, p));
            }
            if let Some(c) = &iv.when {
                conditions.entry((c.site, c.layer)).or_default().push(i);
            }
        }
        Self {
            interventions,
            index,
            conditions,
        }
    }

    /// The interventions (by index) whose condition is read at one hook point.
    pub fn conditions_at(&self, site: HookSite, layer: usize) -> &[usize] {
        self.conditions
            .get(&(site, layer))
            .map_or(&[], Vec::as_slice)
    }

    /// Whether any intervention is conditional.
    pub fn has_conditions(&self) -> bool {
        !self.conditions.is_empty()
    }

    /// Whether any condition is decided on the whole prompt.
    pub fn has_prompt_conditions(&self) -> bool {
        self.interventions.iter().any(|iv| {
            iv.when
                .as_ref()
                .is_some_and(|c| c.scope == ConditionScope::Prompt)
        })
    }

    pub fn is_empty(&self) -> bool {
        self.interventions.is_empty()
    }

    /// The interventions acting at one hook point, in request order, with their indices.
    pub fn at(
        &self,
        site: HookSite,
        layer: usize,
    ) -> impl Iterator<Item = (usize, &Intervention, &HookPoint)> {
        self.index
            .get(&(site, layer))
            .into_iter()
            .flatten()
            .map(|&(i, p)| (i, &self.interventions[i], &self.interventions[i].points[p]))
    }

    /// Every `(site, layer)` the plan touches or reads a condition at.
    pub fn hook_points(&self) -> impl Iterator<Item = (HookSite, usize)> + '_ {
        self.index.keys().chain(self.conditions.keys()).copied()
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
    pub n_heads: usize,
    pub head_dim: usize,
    pub max_interventions: usize,
    pub store: &'a VectorStore,
    pub saes: &'a SaeStore,
}

impl<'a> ModelLimits<'a> {
    /// The limits of a model with `dims`.
    pub fn new(
        dims: &crate::model::ModelDims,
        max_interventions: usize,
        store: &'a VectorStore,
        saes: &'a SaeStore,
    ) -> Self {
        Self {
            n_layers: dims.n_layers,
            d_model: dims.d_model,
            n_neurons: dims.intermediate_size,
            n_heads: dims.n_heads,
            head_dim: dims.head_dim,
            max_interventions,
            store,
            saes,
        }
    }

    /// The width of the activation at `site`.
    pub fn site_width(&self, site: HookSite) -> usize {
        site.width(self.d_model, self.n_neurons, self.n_heads, self.head_dim)
    }
}
