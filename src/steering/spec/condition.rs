//! Conditional steering (CAST, Lee et al. 2024, "Programming refusal with conditional
//! activation steering"; Goodfire's `set_when`): an intervention with `when` acts only where a
//! condition direction (a stored vector or an SAE feature) is present, or absent, at a chosen
//! layer: on the prompt's mean (`scope: prompt`) or token by token (`scope: token`). The
//! condition is read inside the same forward pass, per sequence.

use super::*;

/// A condition as sent by a client.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConditionSpec {
    /// A stored direction to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "topic_cooking")]
    pub vector: Option<String>,
    /// Or an SAE feature to read (its activation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<FeatureRef>,
    /// The block whose output (`resid_post`) is read; a feature reads its SAE's layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 10)]
    pub layer: Option<i64>,
    /// Acts where the reading is above this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 0.1)]
    pub above: Option<f64>,
    /// Acts where the reading is below this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = -0.2)]
    pub below: Option<f64>,
    /// `prompt` (default): decided once on the mean over the prompt's tokens (all but the
    /// first) when the last one is read, acting from then on: at the later layers of that
    /// pass (on the whole prompt when it fits one prefill chunk) and on every generated token;
    /// `token`: decided for each token, acting on that token at the intervention's later
    /// layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<ConditionScope>,
    /// For a vector: `cosine` (default) or `projection` (`h · v/|v|`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measure: Option<ConditionMeasure>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConditionScope {
    Prompt,
    Token,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConditionMeasure {
    /// `cos(h, v)`.
    Cosine,
    /// `h · v / |v|`.
    Projection,
}

/// What a condition reads.
#[derive(Debug, Clone)]
pub enum Probe {
    /// A unit direction, read as a cosine or a projection.
    Direction {
        unit: Arc<[f32]>,
        measure: ConditionMeasure,
    },
    /// An SAE feature's activation.
    Feature { sae: Arc<Sae>, index: usize },
}

/// A validated condition.
#[derive(Debug, Clone)]
pub struct Condition {
    pub probe: Probe,
    pub site: HookSite,
    pub layer: usize,
    /// Acts when the reading is above (`true`) or below `threshold`.
    pub above: bool,
    pub threshold: f32,
    pub scope: ConditionScope,
    /// The normalized form, echoed.
    pub applied: ConditionSpec,
}

impl Condition {
    /// The reading of one activation row.
    pub fn read(&self, h: &[f32]) -> f32 {
        match &self.probe {
            Probe::Direction { unit, measure } => {
                let dot: f64 = h
                    .iter()
                    .zip(unit.iter())
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                match measure {
                    ConditionMeasure::Projection => dot as f32,
                    ConditionMeasure::Cosine => {
                        let n = h.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
                        if n > 0.0 {
                            (dot / n) as f32
                        } else {
                            0.0
                        }
                    }
                }
            }
            Probe::Feature { sae, index } => sae.feature_activation(h, *index),
        }
    }

    /// Whether a reading meets the condition.
    pub fn holds(&self, reading: f32) -> bool {
        if self.above {
            reading > self.threshold
        } else {
            reading < self.threshold
        }
    }
}

impl Validator<'_> {
    /// Validates `when` for an intervention acting at `points`.
    pub(super) fn condition(
        &self,
        w: &ConditionSpec,
        points: &[HookPoint],
        all_writes: bool,
    ) -> Result<Condition, SpecError> {
        let (above, threshold) = match (w.above, w.below) {
            (Some(t), None) => (true, t),
            (None, Some(t)) => (false, t),
            _ => {
                return Err(self.err(
                    "when",
                    "invalid_condition",
                    "give one of `above` or `below`",
                ))
            }
        };
        let field = if above { "when.above" } else { "when.below" };
        if !threshold.is_finite() || threshold.abs() > f32::MAX as f64 {
            return Err(self.err(field, "invalid_threshold", "must be a finite number"));
        }
        let scope = w.scope.unwrap_or(ConditionScope::Prompt);
        let (probe, site, layer, applied) = match (&w.vector, &w.feature) {
            (Some(name), None) => self.condition_vector(w, name)?,
            (None, Some(f)) => self.condition_feature(w, f)?,
            _ => {
                return Err(self.err(
                    "when",
                    "invalid_condition",
                    "give one of `vector` or `feature`",
                ))
            }
        };
        if scope == ConditionScope::Token && (all_writes || points.iter().any(|p| p.layer <= layer))
        {
            return Err(self.err(
                "when.layer",
                "invalid_condition",
                format!(
                    "a `token` condition read at layer {layer} can act only on later layers; \
                     the intervention acts at or before it"
                ),
            ));
        }
        Ok(Condition {
            probe,
            site,
            layer,
            above,
            threshold: threshold as f32,
            scope,
            applied: ConditionSpec {
                above: above.then_some(threshold),
                below: (!above).then_some(threshold),
                scope: Some(scope),
                ..applied
            },
        })
    }

    fn condition_vector(
        &self,
        w: &ConditionSpec,
        name: &str,
    ) -> Result<(Probe, HookSite, usize, ConditionSpec), SpecError> {
        let entry = self.ctx.store.get(name).ok_or_else(|| {
            self.err(
                "when.vector",
                "unknown_vector",
                format!("no vector named `{name}`"),
            )
        })?;
        let v = entry.vector;
        if v.meta.kind != VectorKind::Direction {
            return Err(self.err(
                "when.vector",
                "wrong_vector_kind",
                format!("`{name}` is a {}, not a direction", v.meta.kind.as_str()),
            ));
        }
        if v.meta.d_model != self.ctx.d_model {
            return Err(self.err(
                "when.vector",
                "dimension_mismatch",
                format!(
                    "`{name}` has {} dimensions; the residual stream has {}",
                    v.meta.d_model, self.ctx.d_model
                ),
            ));
        }
        let layer = match w.layer {
            Some(l) => self.layer("when.layer", l)?,
            None => match v.layers.keys().collect::<Vec<_>>().as_slice() {
                [l] => self.layer("when.layer", **l as i64)?,
                _ => {
                    return Err(self.err(
                        "when.layer",
                        "missing_layer",
                        "the condition vector holds several layers; name one",
                    ))
                }
            },
        };
        let dir = v.direction_for(layer).ok_or_else(|| {
            self.err(
                "when.layer",
                "invalid_layer",
                format!("`{name}` has no direction for layer {layer}"),
            )
        })?;
        let n = l2_norm(dir);
        if n == 0.0 || !n.is_finite() {
            return Err(self.err(
                "when.vector",
                "zero_vector",
                "the condition direction is zero",
            ));
        }
        let measure = w.measure.unwrap_or(ConditionMeasure::Cosine);
        let probe = Probe::Direction {
            unit: dir.iter().map(|x| x / n).collect(),
            measure,
        };
        let applied = ConditionSpec {
            vector: Some(name.to_string()),
            layer: Some(layer as i64),
            measure: Some(measure),
            ..Default::default()
        };
        Ok((probe, HookSite::ResidPost, layer, applied))
    }

    fn condition_feature(
        &self,
        w: &ConditionSpec,
        f: &FeatureRef,
    ) -> Result<(Probe, HookSite, usize, ConditionSpec), SpecError> {
        let sae = self.ctx.saes.get(&f.sae).ok_or_else(|| {
            self.err(
                "when.feature.sae",
                "unknown_sae",
                format!("no sparse autoencoder named `{}`", f.sae),
            )
        })?;
        if f.index < 0 || f.index as usize >= sae.d_sae {
            return Err(self.err(
                "when.feature.index",
                "invalid_feature",
                format!(
                    "`{}` has {} features (0-{})",
                    sae.name,
                    sae.d_sae,
                    sae.d_sae - 1
                ),
            ));
        }
        if w.layer.is_some_and(|l| l != sae.layer as i64) {
            return Err(self.err(
                "when.layer",
                "invalid_layer",
                format!("`{}` reads layer {}", sae.name, sae.layer),
            ));
        }
        if w.measure.is_some() {
            return Err(self.err(
                "when.measure",
                "invalid_condition",
                "a feature is read as its activation; `measure` is for vectors",
            ));
        }
        let applied = ConditionSpec {
            feature: Some(f.clone()),
            layer: Some(sae.layer as i64),
            ..Default::default()
        };
        let probe = Probe::Feature {
            sae: sae.clone(),
            index: f.index as usize,
        };
        Ok((probe, sae.site, sae.layer, applied))
    }
}
