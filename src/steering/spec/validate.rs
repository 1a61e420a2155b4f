//! Validation of a request's `steering` list into a [`SteeringPlan`]: every name looked up
//! (vector, neuron means, SAE), every layer, index, coefficient and position range checked
//! against the model, and each failure reported with the field that caused it.

use super::*;

/// The stored means of `kind` a `mean` op names (or the default).
pub(super) fn name_of_means(s: &InterventionSpec, kind: VectorKind) -> String {
    s.means
        .clone()
        .unwrap_or_else(|| default_means(kind).to_string())
}

fn default_means(kind: VectorKind) -> &'static str {
    match kind {
        VectorKind::HeadMeans => DEFAULT_HEAD_MEANS,
        _ => DEFAULT_NEURON_MEANS,
    }
}

/// Validates a request's `steering` list.
pub fn validate(specs: &[InterventionSpec], ctx: &ModelLimits) -> Result<SteeringPlan, SpecError> {
    if specs.len() > ctx.max_interventions {
        return Err(SpecError {
            field: "steering".into(),
            code: "too_many_interventions",
            message: format!(
                "{} interventions given; at most {} are allowed per request",
                specs.len(),
                ctx.max_interventions
            ),
        });
    }
    let interventions = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Validator {
                ctx,
                base: format!("steering[{i}]"),
            }
            .intervention(s)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SteeringPlan::new(interventions))
}

/// The ops each kind of target takes.
const DIRECTION_OPS: [OpName; 3] = [OpName::Add, OpName::Ablate, OpName::Clamp];
const FEATURE_OPS: [OpName; 2] = [OpName::Add, OpName::Clamp];
const NEURON_OPS: [OpName; 4] = [OpName::Zero, OpName::Mean, OpName::Scale, OpName::Set];
pub(super) const HEAD_OPS: [OpName; 3] = [OpName::Zero, OpName::Mean, OpName::Scale];

pub(super) struct Validator<'a> {
    pub(super) ctx: &'a ModelLimits<'a>,
    pub(super) base: String,
}

/// A direction source after lookup.
struct Direction {
    name: Option<String>,
    version: Option<u64>,
    stored: Option<Arc<SteeringVector>>,
    inline: Option<Arc<[f32]>>,
}

impl Validator<'_> {
    pub(super) fn err(
        &self,
        field: &str,
        code: &'static str,
        message: impl Into<String>,
    ) -> SpecError {
        SpecError {
            field: if field.is_empty() {
                self.base.clone()
            } else {
                format!("{}.{field}", self.base)
            },
            code,
            message: message.into(),
        }
    }

    fn intervention(&self, s: &InterventionSpec) -> Result<Intervention, SpecError> {
        let head_alone = s.head.is_some() && s.vector.is_none() && s.values.is_none();
        let targets = [
            s.vector.is_some(),
            s.values.is_some(),
            s.neuron.is_some(),
            s.feature.is_some(),
            head_alone,
        ];
        match targets.iter().filter(|t| **t).count() {
            1 => {}
            0 => {
                return Err(self.err(
                    "",
                    "missing_target",
                    "give one of `vector`, `values`, `neuron`, `feature` or `head`",
                ))
            }
            _ => {
                return Err(self.err(
                    "",
                    "conflicting_targets",
                    "give only one of `vector`, `values`, `neuron`, `feature` or `head` \
                     (`head` may go with `vector` or `values`)",
                ))
            }
        }
        let head = self.head(s)?;

        if s.layer.is_some() && s.layers.is_some() {
            return Err(self.err(
                "layers",
                "conflicting_layers",
                "give `layer` or `layers`, not both",
            ));
        }
        let coefficient = match s.coefficient {
            Some(c) if !c.is_finite() || c.abs() > MAX_COEFFICIENT => {
                return Err(self.err(
                    "coefficient",
                    "invalid_coefficient",
                    format!("must be a finite number with magnitude at most {MAX_COEFFICIENT:e}"),
                ))
            }
            c => c,
        };
        let positions = s.positions.unwrap_or(Positions::All);
        let schedule = self.schedule(s)?;
        let mut iv = if let Some(f) = &s.feature {
            self.feature(s, f, coefficient, positions)?
        } else if let Some(n) = s.neuron {
            self.neuron(s, n, coefficient, positions)?
        } else if let (true, Some(h)) = (head_alone, head) {
            self.head_op(s, h, coefficient, positions)?
        } else {
            self.direction_op(s, head, coefficient, positions)?
        };
        if let Some(sc) = schedule {
            if sc.decay.is_some() && iv.applied.op != OpName::Add {
                return Err(self.err("decay", "invalid_schedule", "`decay` applies to `add` only"));
            }
        }
        iv.schedule = schedule;
        iv.applied.schedule = schedule;
        if let Some(w) = &s.when {
            let c = self.condition(w, &iv.points, iv.applied.all_writes)?;
            iv.applied.when = Some(c.applied.clone());
            iv.when = Some(c);
        }
        Ok(iv)
    }

    /// `from`, `until` and `decay`, checked.
    fn schedule(&self, s: &InterventionSpec) -> Result<Option<Schedule>, SpecError> {
        if s.from.is_none() && s.until.is_none() && s.decay.is_none() {
            return Ok(None);
        }
        let to_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let sc = Schedule {
            from: s.from.map_or(0, to_usize),
            until: s.until.map(to_usize),
            decay: s.decay,
        };
        if sc.until.is_some_and(|u| u <= sc.from) {
            return Err(self.err(
                "until",
                "invalid_schedule",
                "`until` must be greater than `from`",
            ));
        }
        if sc.decay.is_some() && sc.until.is_none() {
            return Err(self.err("decay", "invalid_schedule", "`decay` needs `until`"));
        }
        if s.positions.is_some_and(|p| p != Positions::All) {
            return Err(self.err(
                "positions",
                "invalid_schedule",
                "a schedule (`from`, `until`) replaces `positions`; give one or the other",
            ));
        }
        Ok(Some(sc))
    }

    pub(super) fn layer(&self, field: &str, l: i64) -> Result<usize, SpecError> {
        let n = self.ctx.n_layers;
        if l < 0 || l as usize >= n {
            return Err(self.err(
                field,
                "invalid_layer",
                format!(
                    "layer {l} is out of range: the model has {n} layers (0-{})",
                    n - 1
                ),
            ));
        }
        Ok(l as usize)
    }

    /// The explicitly requested layers, if any.
    pub(super) fn layers(&self, s: &InterventionSpec) -> Result<Option<Vec<usize>>, SpecError> {
        if let Some(l) = s.layer {
            return Ok(Some(vec![self.layer("layer", l)?]));
        }
        let Some(ls) = &s.layers else { return Ok(None) };
        if ls.is_empty() {
            return Err(self.err("layers", "invalid_layer", "must list at least one layer"));
        }
        let mut out = Vec::with_capacity(ls.len());
        for (i, &l) in ls.iter().enumerate() {
            let l = self.layer(&format!("layers[{i}]"), l)?;
            if out.contains(&l) {
                return Err(self.err(
                    &format!("layers[{i}]"),
                    "invalid_layer",
                    format!("layer {l} is listed twice"),
                ));
            }
            out.push(l);
        }
        Ok(Some(out))
    }

    fn neuron(
        &self,
        s: &InterventionSpec,
        n: NeuronRef,
        coefficient: Option<f64>,
        positions: Positions,
    ) -> Result<Intervention, SpecError> {
        let layer = self.layer("neuron.layer", n.layer)?;
        if n.index < 0 || n.index as usize >= self.ctx.n_neurons {
            return Err(self.err(
                "neuron.index",
                "invalid_neuron",
                format!(
                    "neuron {} is out of range: block MLPs have {} neurons (0-{})",
                    n.index,
                    self.ctx.n_neurons,
                    self.ctx.n_neurons - 1
                ),
            ));
        }
        let index = n.index as usize;
        if s.layer.is_some() || s.layers.is_some() {
            return Err(self.err(
                "layer",
                "conflicting_layers",
                "a neuron names its layer in `neuron.layer`",
            ));
        }
        if s.site.is_some_and(|site| site != HookSite::MlpAct) {
            return Err(self.err("site", "invalid_site", "neuron ops act on `mlp_act`"));
        }
        let op = s.op.unwrap_or(OpName::Zero);
        let need = |what: &str| {
            coefficient.ok_or_else(|| {
                self.err(
                    "coefficient",
                    "missing_coefficient",
                    format!("`{op}` needs a coefficient ({what})"),
                )
            })
        };
        let (action, coef) = match op {
            OpName::Zero => (NeuronAction::Zero, None),
            OpName::Scale => {
                let c = need("the factor")?;
                (NeuronAction::Scale(c as f32), Some(c))
            }
            OpName::Set => {
                let c = need("the value")?;
                (NeuronAction::Set(c as f32), Some(c))
            }
            OpName::Mean => {
                let means = self.stored_means(s, VectorKind::NeuronMeans, layer)?;
                (NeuronAction::Set(means[index]), None)
            }
            other => {
                return Err(self.err(
                    "op",
                    "invalid_op",
                    format!(
                        "`{other}` does not act on a neuron; use {}",
                        OpName::list(&NEURON_OPS)
                    ),
                ))
            }
        };
        Ok(Intervention {
            op: Op::Neuron { index, action },
            positions,
            schedule: None,
            when: None,
            points: vec![HookPoint::whole(HookSite::MlpAct, layer, None)],
            applied: AppliedIntervention {
                op,
                vector: (op == OpName::Mean).then(|| name_of_means(s, VectorKind::NeuronMeans)),
                vector_version: None,
                neuron: Some(n),
                head: None,
                feature: None,
                coefficient: coef,
                layers: vec![layer],
                site: Some(HookSite::MlpAct),
                positions,
                normalize: false,
                vector_norm: None,
                all_writes: false,
                values: None,
                schedule: None,
                when: None,
            },
        })
    }

    fn feature(
        &self,
        s: &InterventionSpec,
        f: &FeatureRef,
        coefficient: Option<f64>,
        positions: Positions,
    ) -> Result<Intervention, SpecError> {
        let sae = self.ctx.saes.get(&f.sae).ok_or_else(|| {
            let known = self.ctx.saes.names();
            let hint = if known.is_empty() {
                "none are loaded".to_string()
            } else {
                format!("loaded: {}", known.join(", "))
            };
            self.err(
                "feature.sae",
                "unknown_sae",
                format!("no sparse autoencoder named `{}` ({hint})", f.sae),
            )
        })?;
        if f.index < 0 || f.index as usize >= sae.d_sae {
            return Err(self.err(
                "feature.index",
                "invalid_feature",
                format!(
                    "feature {} is out of range: `{}` has {} features (0-{})",
                    f.index,
                    sae.name,
                    sae.d_sae,
                    sae.d_sae - 1
                ),
            ));
        }
        let index = f.index as usize;
        let explicit = self.layers(s)?;
        if explicit.as_ref().is_some_and(|ls| ls != &[sae.layer]) {
            return Err(self.err(
                "layer",
                "invalid_layer",
                format!(
                    "`{}` reads layer {} ({}); a feature acts only there",
                    sae.name, sae.layer, sae.hook_name
                ),
            ));
        }
        if s.site.is_some_and(|site| site != sae.site) {
            return Err(self.err(
                "site",
                "invalid_site",
                format!("`{}` reads `{}`", sae.name, sae.site),
            ));
        }
        let op_name = s.op.unwrap_or(OpName::Add);
        let normalize = s.normalize.unwrap_or(false);
        let row = sae.decoder_row(index);
        let norm = l2_norm(row);
        let (op, vector, coef) = match op_name {
            OpName::Add => {
                let c = coefficient.unwrap_or(1.0);
                if normalize && norm == 0.0 {
                    return Err(self.err(
                        "normalize",
                        "zero_vector",
                        format!("feature {index} of `{}` has a zero decoder row", sae.name),
                    ));
                }
                let scale = if normalize { c as f32 / norm } else { c as f32 };
                let v: Arc<[f32]> = row.iter().map(|x| scale * x).collect();
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(self.err(
                        "coefficient",
                        "non_finite",
                        "coefficient times the decoder row overflows",
                    ));
                }
                (Op::Add, Some(v), c)
            }
            OpName::Clamp => {
                let c = coefficient.ok_or_else(|| {
                    self.err(
                        "coefficient",
                        "missing_coefficient",
                        "`clamp` needs a coefficient: the feature's activation",
                    )
                })?;
                (
                    Op::FeatureClamp {
                        sae: sae.clone(),
                        index,
                        value: c as f32,
                    },
                    None,
                    c,
                )
            }
            other => {
                return Err(self.err(
                    "op",
                    "invalid_op",
                    format!(
                        "`{other}` does not act on a feature; use {}",
                        OpName::list(&FEATURE_OPS)
                    ),
                ))
            }
        };
        Ok(Intervention {
            op,
            positions,
            schedule: None,
            when: None,
            points: vec![HookPoint::whole(sae.site, sae.layer, vector)],
            applied: AppliedIntervention {
                op: op_name,
                vector: None,
                vector_version: None,
                neuron: None,
                head: None,
                feature: Some(f.clone()),
                coefficient: Some(coef),
                layers: vec![sae.layer],
                site: Some(sae.site),
                positions,
                normalize,
                vector_norm: Some(norm),
                all_writes: false,
                values: None,
                schedule: None,
                when: None,
            },
        })
    }

    /// One layer of the stored means of `kind` a `mean` op names (or the default), checked to
    /// be as wide as the site they stand in for.
    pub(super) fn stored_means(
        &self,
        s: &InterventionSpec,
        kind: VectorKind,
        layer: usize,
    ) -> Result<Arc<[f32]>, SpecError> {
        let default = default_means(kind);
        let missing = match kind {
            VectorKind::HeadMeans => "head_means_missing",
            _ => "neuron_means_missing",
        };
        let name = match &s.means {
            Some(n) => n.as_str(),
            None if self.ctx.store.get(default).is_some() => default,
            None => {
                return Err(self.err(
                    "means",
                    missing,
                    format!(
                        "the `mean` op needs {kind}: name them in `means`, or store `{default}` \
                         (POST /vectors/extract with method `{kind}`)",
                        kind = kind.as_str()
                    ),
                ))
            }
        };
        let entry = self.ctx.store.get(name).ok_or_else(|| {
            self.err(
                "means",
                "unknown_vector",
                format!("no stored {} named `{name}`", kind.as_str()),
            )
        })?;
        let v = entry.vector;
        if v.meta.kind != kind {
            return Err(self.err(
                "means",
                "wrong_vector_kind",
                format!(
                    "`{name}` holds {}, not {}",
                    v.meta.kind.as_str(),
                    kind.as_str()
                ),
            ));
        }
        let site = match kind {
            VectorKind::HeadMeans => HookSite::AttnHead,
            _ => HookSite::MlpAct,
        };
        let means = v.layers.get(&layer).ok_or_else(|| {
            self.err(
                "means",
                missing,
                format!("`{name}` has no means for layer {layer}; extract them for that layer"),
            )
        })?;
        if means.len() != self.ctx.site_width(site) {
            return Err(self.err(
                "means",
                "dimension_mismatch",
                format!("`{name}` layer {layer} is not as wide as `{site}`"),
            ));
        }
        Ok(means.clone())
    }

    /// The direction named or given; inline values are as wide as `site` (one head's part of
    /// it with `head`).
    fn lookup(
        &self,
        s: &InterventionSpec,
        site: HookSite,
        head: Option<usize>,
    ) -> Result<Direction, SpecError> {
        if let Some(values) = &s.values {
            let (width, what) = match head {
                Some(h) => (self.ctx.head_dim, format!("head {h} of `{site}`")),
                None => (self.ctx.site_width(site), format!("the `{site}` site")),
            };
            if values.len() != width {
                return Err(self.err(
                    "values",
                    "dimension_mismatch",
                    format!(
                        "{} values given; {what} has {width} dimensions",
                        values.len()
                    ),
                ));
            }
            if let Some(i) = values
                .iter()
                .position(|x| !x.is_finite() || x.abs() > f32::MAX as f64)
            {
                return Err(self.err(
                    &format!("values[{i}]"),
                    "non_finite",
                    "must be a finite number within f32's range",
                ));
            }
            let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
            return Ok(Direction {
                name: None,
                version: None,
                stored: None,
                inline: Some(v.into()),
            });
        }
        let name = s.vector.as_deref().unwrap_or_default();
        let entry = self.ctx.store.get(name).ok_or_else(|| {
            let known = self.ctx.store.names();
            let hint = if known.is_empty() {
                "no vectors are stored".to_string()
            } else {
                format!("known vectors: {}", known.join(", "))
            };
            self.err(
                "vector",
                "unknown_vector",
                format!("no vector named `{name}` ({hint})"),
            )
        })?;
        let kind = entry.vector.meta.kind;
        let wanted = match site {
            HookSite::AttnHead => VectorKind::HeadDirection,
            _ => VectorKind::Direction,
        };
        if kind != wanted {
            return Err(self.err(
                "vector",
                "wrong_vector_kind",
                format!(
                    "`{name}` holds a {}; the `{site}` site takes a {}",
                    kind.as_str(),
                    wanted.as_str()
                ),
            ));
        }
        Ok(Direction {
            name: Some(name.to_string()),
            version: Some(entry.vector.meta.version),
            stored: Some(entry.vector),
            inline: None,
        })
    }

    fn direction_op(
        &self,
        s: &InterventionSpec,
        head: Option<usize>,
        coefficient: Option<f64>,
        positions: Positions,
    ) -> Result<Intervention, SpecError> {
        let op_name = s.op.unwrap_or(OpName::Add);
        if !DIRECTION_OPS.contains(&op_name) {
            return Err(self.err(
                "op",
                "invalid_op",
                format!(
                    "`{op_name}` does not act on a direction; use {} (neuron ops need `neuron`)",
                    OpName::list(&DIRECTION_OPS)
                ),
            ));
        }
        let stored_kind = s
            .vector
            .as_deref()
            .and_then(|n| self.ctx.store.get(n))
            .map(|e| e.vector.meta.kind);
        let site = s.site.unwrap_or(
            if head.is_some() || stored_kind == Some(VectorKind::HeadDirection) {
                HookSite::AttnHead
            } else {
                HookSite::ResidPost
            },
        );
        let dir = self.lookup(s, site, head)?;
        let explicit = self.layers(s)?;
        if s.site.is_some() && explicit.is_none() {
            return Err(self.err("site", "missing_layer", "`site` needs `layer` or `layers`"));
        }
        if let Some(stored) = &dir.stored {
            let width = self.ctx.site_width(site);
            if stored.meta.d_model != width {
                return Err(self.err(
                    "vector",
                    "dimension_mismatch",
                    format!(
                        "`{}` has {} dimensions; the `{site}` site has {width}",
                        stored.name, stored.meta.d_model
                    ),
                ));
            }
        }
        let all_writes =
            op_name == OpName::Ablate && explicit.is_none() && site != HookSite::AttnHead;
        // (site, layer) pairs and the layer whose direction each uses.
        let sites: Vec<(HookSite, usize)> = match (&explicit, &dir.stored) {
            (Some(ls), _) => ls.iter().map(|&l| (site, l)).collect(),
            (None, _) if all_writes => std::iter::once((HookSite::ResidPre, 0))
                .chain(
                    (0..self.ctx.n_layers)
                        .flat_map(|l| [(HookSite::AttnOut, l), (HookSite::MlpOut, l)]),
                )
                .collect(),
            (None, Some(v)) => v
                .layers
                .keys()
                .filter(|&&l| l < self.ctx.n_layers)
                .map(|&l| (site, l))
                .collect(),
            (None, None) => {
                return Err(self.err(
                    "layer",
                    "missing_layer",
                    "inline `values` need `layer` or `layers`",
                ))
            }
        };
        if sites.is_empty() {
            return Err(self.err(
                "vector",
                "invalid_layer",
                "the vector holds no layer of this model",
            ));
        }
        let normalize = s.normalize.unwrap_or(false);
        let coef = match op_name {
            OpName::Add => Some(coefficient.unwrap_or(1.0)),
            OpName::Clamp => Some(coefficient.ok_or_else(|| {
                self.err(
                    "coefficient",
                    "missing_coefficient",
                    "`clamp` needs a coefficient: the target projection",
                )
            })?),
            _ => None,
        };
        let mut points = Vec::with_capacity(sites.len());
        let mut norm = None;
        for (site, layer) in sites {
            let raw: Arc<[f32]> = match (&dir.inline, &dir.stored) {
                (Some(v), _) => v.clone(),
                (None, Some(stored)) => stored.direction_for(layer).cloned().ok_or_else(|| {
                    let held: Vec<String> = stored.layers.keys().map(|l| l.to_string()).collect();
                    let what = if all_writes {
                        "ablate without `layer` needs a vector with a single direction".to_string()
                    } else {
                        format!("`{}` has no direction for layer {layer}", stored.name)
                    };
                    self.err(
                        "layer",
                        "invalid_layer",
                        format!("{what} (it holds layers {})", held.join(", ")),
                    )
                })?,
                (None, None) => unreachable!("lookup returns a direction"),
            };
            let raw: Arc<[f32]> = match (head, &dir.stored) {
                (Some(h), Some(_)) => {
                    let (a, n) = self.head_span(h);
                    raw[a..a + n].into()
                }
                _ => raw,
            };
            let n = l2_norm(&raw);
            let added = match (op_name, normalize) {
                (OpName::Add, false) => n as f64 * coef.unwrap_or(1.0).abs(),
                (OpName::Add, true) => coef.unwrap_or(1.0).abs(),
                _ => 0.0,
            };
            if !n.is_finite() || n as f64 > MAX_STEERING_NORM || added > MAX_STEERING_NORM {
                return Err(self.err(
                    if dir.inline.is_some() {
                        "values"
                    } else {
                        "vector"
                    },
                    "steering_too_large",
                    format!(
                        "the direction at layer {layer} has norm {n:e} and would add a vector of \
                         norm {added:e}; both must be at most {MAX_STEERING_NORM:e} \
                         (limit MAX_STEERING_NORM)"
                    ),
                ));
            }
            norm.get_or_insert(n);
            let vector: Arc<[f32]> = match op_name {
                OpName::Add => {
                    let c = coef.unwrap_or(1.0) as f32;
                    let scale = if normalize {
                        c / n.max(f32::MIN_POSITIVE)
                    } else {
                        c
                    };
                    if normalize && n == 0.0 {
                        return Err(self.err(
                            "normalize",
                            "zero_vector",
                            "cannot normalize a zero vector",
                        ));
                    }
                    raw.iter().map(|x| scale * x).collect()
                }
                _ => {
                    if n == 0.0 {
                        return Err(self.err(
                            "vector",
                            "zero_vector",
                            format!("`{op_name}` needs a non-zero direction"),
                        ));
                    }
                    raw.iter().map(|x| x / n).collect()
                }
            };
            if vector.iter().any(|x| !x.is_finite()) {
                return Err(self.err(
                    "coefficient",
                    "non_finite",
                    "coefficient times vector overflows",
                ));
            }
            points.push(HookPoint {
                site,
                layer,
                vector: Some(vector),
                span: head.map(|h| self.head_span(h)),
            });
        }
        let mut layers: Vec<usize> = points.iter().map(|p| p.layer).collect();
        layers.dedup();
        let op = match op_name {
            OpName::Add => Op::Add,
            OpName::Ablate => Op::Ablate,
            _ => Op::Clamp {
                value: coef.unwrap_or(0.0) as f32,
            },
        };
        Ok(Intervention {
            op,
            positions,
            schedule: None,
            when: None,
            applied: AppliedIntervention {
                op: op_name,
                values: dir.inline.clone(),
                vector: dir.name,
                vector_version: dir.version,
                neuron: None,
                head,
                feature: None,
                coefficient: coef,
                layers,
                site: (!all_writes).then_some(site),
                positions,
                normalize,
                vector_norm: norm,
                all_writes,
                schedule: None,
                when: None,
            },
            points,
        })
    }
}
