//! The compact text form of a steering plan, for the `X-Steering` header of clients that
//! cannot change the request body, and for echoing a validated plan (`X-Steering-Applied`):
//! the echo parses back to the same plan.
//!
//! ```text
//! plan    := item ("," item)*
//! item    := target (";" option)*
//! target  := NAME ":" LAYERS ":" NUMBER [":" OP]              a stored vector (add, clamp, ablate)
//!          | SAE "#" INDEX ":" LAYERS ":" NUMBER [":" OP]     an SAE feature (add, clamp)
//!          | "neuron" ":" LAYER ":" INDEX ":" OP [":" NUMBER]  a neuron (zero, mean, scale, set)
//!          | "head" ":" LAYERS ":" HEAD ":" OP [":" NUMBER]   an attention head (zero, mean, scale)
//! LAYERS  := "*" | SPAN ("+" SPAN)*                           SPAN := LAYER | LAYER "-" LAYER
//! option  := "site=" SITE | "positions=" ("all" | "prompt" | "generated" | "last:" K)
//!          | "normalize" | "means=" NAME | "from=" N | "until=" N | "decay=linear"
//!          | "head=" HEAD | "when=" COND | "scope=" ("prompt" | "token")
//!          | "measure=" ("cosine" | "projection")
//! COND    := (NAME | SAE "#" INDEX) ":" LAYER (">" | "<") NUMBER   conditional steering
//! ```
//!
//! `*` means the vector's own layers (for `ablate`: every attention and MLP write and the
//! embeddings). `refusal:14:-4,golden_gate:10-12+14:2.5` adds two vectors;
//! `refusal:*:0:ablate` projects a direction out everywhere; `neuron:10:1234:zero` zeroes one
//! neuron; `head:20:3:zero` zeroes head 3 of block 20 and `honest:20:4;head=3` adds head 3's
//! part of a `head_direction` vector to it; `golden_gate:12:8;site=mlp_out;positions=last:3;normalize` adds a unit vector to
//! the MLP output of block 12 on the last 3 prompt tokens and every generated one. Inline
//! `values` have no compact form: a plan holding them is echoed as the JSON list, which the
//! header also accepts.

use super::spec::{
    AppliedIntervention, ConditionMeasure, ConditionScope, ConditionSpec, Decay, FeatureRef,
    InterventionSpec, NeuronRef, OpName, Positions,
};
use crate::model::hooks::HookSite;

/// A parse failure, naming the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactError(pub String);

impl std::fmt::Display for CompactError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One item being parsed: its text and 1-based number, for errors.
struct Item<'a> {
    text: &'a str,
    n: usize,
}

impl Item<'_> {
    fn err(&self, what: impl std::fmt::Display) -> CompactError {
        CompactError(format!("item {} (`{}`): {what}", self.n, self.text))
    }

    fn number(&self, part: &str, what: &str) -> Result<f64, CompactError> {
        part.trim()
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| self.err(format!("`{part}` is not a number ({what})")))
    }

    fn integer(&self, part: &str, what: &str) -> Result<i64, CompactError> {
        part.trim()
            .parse::<i64>()
            .map_err(|_| self.err(format!("`{part}` is not an integer ({what})")))
    }

    fn op(&self, part: &str) -> Result<OpName, CompactError> {
        OpName::parse(part.trim()).ok_or_else(|| {
            self.err(format!(
                "unknown op `{}` ({})",
                part.trim(),
                OpName::list(&OpName::ALL)
            ))
        })
    }

    /// `(layer, layers)` of a LAYERS part.
    fn layers(&self, part: &str) -> Result<(Option<i64>, Option<Vec<i64>>), CompactError> {
        let part = part.trim();
        if part == "*" {
            return Ok((None, None));
        }
        if !part.contains(['-', '+']) || part.starts_with('-') && !part[1..].contains(['-', '+']) {
            return Ok((Some(self.integer(part, "layer")?), None));
        }
        let mut out = Vec::new();
        for span in part.split('+') {
            match span.split_once('-').filter(|(a, _)| !a.is_empty()) {
                Some((a, b)) => {
                    let (a, b) = (
                        self.integer(a, "first layer")?,
                        self.integer(b, "last layer")?,
                    );
                    if b < a || b - a > 1024 {
                        return Err(self.err(format!("layer range `{span}` is empty or too long")));
                    }
                    out.extend(a..=b);
                }
                None => out.push(self.integer(span, "layer")?),
            }
            if out.len() > 1024 {
                return Err(self.err("too many layers"));
            }
        }
        Ok((None, Some(out)))
    }

    /// Applies one `key=value` option to a parsed target.
    fn option(&self, spec: &mut InterventionSpec, option: &str) -> Result<(), CompactError> {
        let (key, value) = match option.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (option.trim(), None),
        };
        let twice = || self.err(format!("option `{key}` is given twice"));
        match (key, value) {
            ("site", Some(v)) => {
                let site = HookSite::parse(v).ok_or_else(|| {
                    let known: Vec<&str> = HookSite::ALL.iter().map(|s| s.as_str()).collect();
                    self.err(format!("unknown site `{v}` ({})", known.join(", ")))
                })?;
                if spec.site.replace(site).is_some() {
                    return Err(twice());
                }
            }
            ("positions", Some(v)) => {
                let positions = match v.strip_prefix("last:") {
                    Some(k) => match k.trim().parse::<u64>() {
                        Ok(k) if k >= 1 => {
                            Positions::Last(usize::try_from(k).unwrap_or(usize::MAX))
                        }
                        _ => {
                            return Err(
                                self.err(format!("`{k}` is not a count >= 1 (positions=last:K)"))
                            )
                        }
                    },
                    None => Positions::from_name(v).ok_or_else(|| {
                        self.err(format!(
                            "unknown positions `{v}` (all, prompt, generated or last:K)"
                        ))
                    })?,
                };
                if spec.positions.replace(positions).is_some() {
                    return Err(twice());
                }
            }
            ("normalize", None) => {
                if spec.normalize.replace(true).is_some() {
                    return Err(twice());
                }
            }
            ("means", Some(v)) if !v.is_empty() => {
                if spec.means.replace(v.to_string()).is_some() {
                    return Err(twice());
                }
            }
            ("from" | "until", Some(v)) => {
                let n = v
                    .parse::<u64>()
                    .map_err(|_| self.err(format!("`{v}` is not a token count ({key})")))?;
                let slot = if key == "from" {
                    &mut spec.from
                } else {
                    &mut spec.until
                };
                if slot.replace(n).is_some() {
                    return Err(twice());
                }
            }
            ("when", Some(v)) => {
                let cond = self.condition(v)?;
                let when = spec.when.get_or_insert_with(Default::default);
                if when.vector.is_some() || when.feature.is_some() {
                    return Err(twice());
                }
                // `scope=` and `measure=` may come before `when=`.
                *when = ConditionSpec {
                    scope: when.scope,
                    measure: when.measure,
                    ..cond
                };
            }
            ("scope" | "measure", Some(v)) => {
                let when = spec.when.get_or_insert_with(Default::default);
                let ok = if key == "scope" {
                    let s = match v {
                        "prompt" => ConditionScope::Prompt,
                        "token" => ConditionScope::Token,
                        _ => return Err(self.err(format!("unknown scope `{v}` (prompt, token)"))),
                    };
                    when.scope.replace(s).is_none()
                } else {
                    let m = match v {
                        "cosine" => ConditionMeasure::Cosine,
                        "projection" => ConditionMeasure::Projection,
                        _ => {
                            return Err(
                                self.err(format!("unknown measure `{v}` (cosine, projection)"))
                            )
                        }
                    };
                    when.measure.replace(m).is_none()
                };
                if !ok {
                    return Err(twice());
                }
            }
            ("head", Some(v)) => {
                let h = self.integer(v, "head")?;
                if spec.head.replace(h).is_some() {
                    return Err(twice());
                }
            }
            ("decay", Some("linear")) => {
                if spec.decay.replace(Decay::Linear).is_some() {
                    return Err(twice());
                }
            }
            _ => {
                return Err(self.err(format!(
                    "unknown option `{option}` (site=SITE, positions=P, normalize, means=NAME, \
                     from=N, until=N, decay=linear, head=H, when=V:L>T, scope=S, measure=M)"
                )))
            }
        }
        Ok(())
    }

    /// A `when=` condition: `NAME:LAYER>T`, `NAME:LAYER<T` or `SAE#INDEX:LAYER>T`.
    fn condition(&self, v: &str) -> Result<ConditionSpec, CompactError> {
        let (lhs, above, t) = match (v.split_once('>'), v.split_once('<')) {
            (Some((l, t)), None) => (l, true, t),
            (None, Some((l, t))) => (l, false, t),
            _ => return Err(self.err(format!("`{v}` is not a condition (NAME:LAYER>T or <T)"))),
        };
        let t = self.number(t, "threshold")?;
        let (target, layer) = lhs
            .rsplit_once(':')
            .ok_or_else(|| self.err(format!("condition `{v}` needs NAME:LAYER")))?;
        let (vector, feature) = self.vector_or_feature(target)?;
        Ok(ConditionSpec {
            vector,
            feature,
            layer: Some(self.integer(layer, "condition layer")?),
            above: above.then_some(t),
            below: (!above).then_some(t),
            ..Default::default()
        })
    }

    /// `NAME` (a stored vector) or `SAE#INDEX` (a feature).
    fn vector_or_feature(
        &self,
        target: &str,
    ) -> Result<(Option<String>, Option<FeatureRef>), CompactError> {
        Ok(match target.split_once('#') {
            Some((sae, index)) => (
                None,
                Some(FeatureRef {
                    sae: sae.to_string(),
                    index: self.integer(index, "feature index")?,
                }),
            ),
            None => (Some(target.to_string()), None),
        })
    }

    /// The target part: a neuron, a feature or a stored vector.
    fn target(&self, head: &str) -> Result<InterventionSpec, CompactError> {
        let parts: Vec<&str> = head.split(':').collect();
        let is_neuron_op = |p: &str| OpName::parse(p.trim()).is_some_and(OpName::is_neuron_op);
        if parts[0].trim() == "neuron" && parts.len() >= 4 && is_neuron_op(parts[3]) {
            if parts.len() > 5 {
                return Err(self.err("expected neuron:layer:index:op[:coefficient]"));
            }
            return Ok(InterventionSpec {
                neuron: Some(NeuronRef {
                    layer: self.integer(parts[1], "layer")?,
                    index: self.integer(parts[2], "neuron index")?,
                }),
                op: Some(self.op(parts[3])?),
                coefficient: parts
                    .get(4)
                    .map(|c| self.number(c, "coefficient"))
                    .transpose()?,
                ..Default::default()
            });
        }
        let is_head_op = |p: &str| OpName::parse(p.trim()).is_some_and(OpName::is_head_op);
        if parts[0].trim() == "head" && parts.len() >= 4 && is_head_op(parts[3]) {
            if parts.len() > 5 {
                return Err(self.err("expected head:layers:head:op[:coefficient]"));
            }
            let (layer, layers) = self.layers(parts[1])?;
            return Ok(InterventionSpec {
                layer,
                layers,
                head: Some(self.integer(parts[2], "head")?),
                op: Some(self.op(parts[3])?),
                coefficient: parts
                    .get(4)
                    .map(|c| self.number(c, "coefficient"))
                    .transpose()?,
                ..Default::default()
            });
        }
        if !(3..=4).contains(&parts.len()) {
            return Err(self.err("expected name:layer:coefficient[:op]"));
        }
        let (layer, layers) = self.layers(parts[1])?;
        let coefficient = self.number(parts[2], "coefficient")?;
        let op = parts.get(3).map(|o| self.op(o)).transpose()?;
        let target = parts[0].trim();
        if target.is_empty() {
            return Err(self.err("missing vector name"));
        }
        let (vector, feature) = self.vector_or_feature(target)?;
        Ok(InterventionSpec {
            layer,
            layers,
            coefficient: (op != Some(OpName::Ablate)).then_some(coefficient),
            op,
            vector,
            feature,
            ..Default::default()
        })
    }
}

/// Parses the compact form (1-based item numbers in errors).
pub fn parse(text: &str) -> Result<Vec<InterventionSpec>, CompactError> {
    let mut out = Vec::new();
    for (i, text) in text.split(',').enumerate() {
        let item = Item {
            text: text.trim(),
            n: i + 1,
        };
        if item.text.is_empty() {
            return Err(CompactError(format!("item {} is empty", item.n)));
        }
        let mut pieces = item.text.split(';');
        let mut spec = item.target(pieces.next().unwrap_or_default())?;
        for option in pieces {
            item.option(&mut spec, option)?;
        }
        out.push(spec);
    }
    Ok(out)
}

/// Sorted-run form of layers, in the order given: `[10, 11, 12, 14]` is `10-12+14`.
pub fn runs(layers: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            layers[i].to_string()
        } else {
            format!("{}-{}", layers[i], layers[j])
        });
        i = j + 1;
    }
    out.join("+")
}

fn fmt_number(x: f64) -> String {
    let s = format!("{x}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// An f32 as the f64 that JSON writes with the f32's shortest digits (`0.1`, not
/// `0.10000000149011612`); read back as f32 it is the same number.
pub fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse::<f64>().unwrap_or(x as f64)
}

/// The request that validates to this intervention again.
pub fn to_spec(a: &AppliedIntervention) -> InterventionSpec {
    let mut spec = InterventionSpec {
        op: Some(a.op),
        coefficient: a.coefficient,
        site: a.site,
        positions: Some(a.positions),
        normalize: a.normalize.then_some(true),
        from: a.schedule.map(|s| s.from as u64),
        until: a.schedule.and_then(|s| s.until).map(|u| u as u64),
        decay: a.schedule.and_then(|s| s.decay),
        when: a.when.clone(),
        ..Default::default()
    };
    if let Some(n) = a.neuron {
        spec.neuron = Some(n);
        spec.means = a.vector.clone().filter(|_| a.op == OpName::Mean);
        spec.site = None;
        return spec;
    }
    spec.head = a.head.map(|h| h as i64);
    if a.op.is_head_op() && a.head.is_some() {
        spec.layers = Some(a.layers.iter().map(|&l| l as i64).collect());
        spec.means = a.vector.clone().filter(|_| a.op == OpName::Mean);
        spec.site = None;
        return spec;
    }
    if !a.all_writes {
        spec.layers = Some(a.layers.iter().map(|&l| l as i64).collect());
    }
    match (&a.feature, &a.values) {
        (Some(f), _) => spec.feature = Some(f.clone()),
        (None, Some(v)) => spec.values = Some(v.iter().map(|&x| shortest_f64(x)).collect()),
        (None, None) => spec.vector = a.vector.clone(),
    }
    spec
}

/// The echo of a validated plan: the compact form, or the JSON list when an intervention has
/// inline values. Either, sent as `X-Steering`, gives the same plan.
pub fn format(plan: &[AppliedIntervention]) -> String {
    if plan.iter().any(|a| a.values.is_some()) {
        let specs: Vec<InterventionSpec> = plan.iter().map(to_spec).collect();
        return serde_json::to_string(&specs).unwrap_or_default();
    }
    plan.iter().map(format_one).collect::<Vec<_>>().join(",")
}

fn format_one(a: &AppliedIntervention) -> String {
    let c = fmt_number(a.coefficient.unwrap_or(0.0));
    let mut out = if let Some(n) = a.neuron {
        let tail = match a.op {
            OpName::Scale | OpName::Set => format!(":{c}"),
            _ => String::new(),
        };
        format!("neuron:{}:{}:{}{tail}", n.layer, n.index, a.op)
    } else if let (Some(h), true) = (a.head, a.op.is_head_op()) {
        let tail = match a.op {
            OpName::Scale => format!(":{c}"),
            _ => String::new(),
        };
        format!("head:{}:{h}:{}{tail}", runs(&a.layers), a.op)
    } else {
        let target = target_text(a.feature.as_ref(), a.vector.as_deref());
        let op = match a.op {
            OpName::Add => String::new(),
            op => format!(":{op}"),
        };
        let layers = if a.all_writes {
            "*".to_string()
        } else {
            runs(&a.layers)
        };
        format!("{target}:{layers}:{c}{op}")
    };
    let is_unit = a.neuron.is_some() || a.op.is_head_op();
    match a.site {
        Some(site) if !is_unit && site != HookSite::ResidPost => out += &format!(";site={site}"),
        _ => {}
    }
    if let (Some(h), false) = (a.head, is_unit) {
        out += &format!(";head={h}");
    }
    match a.positions {
        Positions::All => {}
        Positions::Last(k) => out += &format!(";positions=last:{k}"),
        p => out += &format!(";positions={}", p.name().unwrap_or_default()),
    }
    if a.normalize {
        out += ";normalize";
    }
    if let (OpName::Mean, Some(means)) = (a.op, &a.vector) {
        out += &format!(";means={means}");
    }
    if let Some(s) = a.schedule {
        out += &format!(";from={}", s.from);
        if let Some(u) = s.until {
            out += &format!(";until={u}");
        }
        if s.decay == Some(Decay::Linear) {
            out += ";decay=linear";
        }
    }
    if let Some(w) = &a.when {
        out += &format_condition(w);
    }
    out
}

/// `SAE#INDEX` for a feature, else the vector's name.
fn target_text(feature: Option<&FeatureRef>, vector: Option<&str>) -> String {
    match feature {
        Some(f) => format!("{}#{}", f.sae, f.index),
        None => vector.unwrap_or_default().to_string(),
    }
}

/// `;when=…` and, where not the default, `;scope=token` and `;measure=projection`.
fn format_condition(w: &ConditionSpec) -> String {
    let target = target_text(w.feature.as_ref(), w.vector.as_deref());
    let (cmp, t) = match (w.above, w.below) {
        (Some(t), _) => ('>', t),
        (None, t) => ('<', t.unwrap_or(0.0)),
    };
    let mut out = format!(
        ";when={target}:{}{cmp}{}",
        w.layer.unwrap_or(0),
        fmt_number(t)
    );
    if w.scope == Some(ConditionScope::Token) {
        out += ";scope=token";
    }
    if w.measure == Some(ConditionMeasure::Projection) {
        out += ";measure=projection";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steering::sae::{Sae, SaeArchitecture, SaeParts, SaeStore};
    use crate::steering::spec::{validate, ModelLimits};
    use crate::steering::store::{VectorOrigin, VectorStore};
    use crate::steering::vector::{SteeringVector, VectorKind, VectorMeta};
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::sync::Arc;

    #[test]
    fn parses_every_item_form() {
        let specs = parse("refusal:14:-4, golden_gate:10-12+14:2.5,refusal:*:0:ablate,neuron:10:1234:zero,neuron:3:7:scale:2,res12#3124:12:8:clamp,x:*:1").unwrap();
        assert_eq!(specs.len(), 7);
        assert_eq!(specs[0].vector.as_deref(), Some("refusal"));
        assert_eq!(
            (specs[0].layer, specs[0].coefficient),
            (Some(14), Some(-4.0))
        );
        assert_eq!(specs[1].layers, Some(vec![10, 11, 12, 14]));
        assert_eq!(specs[2].op, Some(OpName::Ablate));
        assert_eq!(
            (
                specs[2].layer,
                specs[2].layers.clone(),
                specs[2].coefficient
            ),
            (None, None, None)
        );
        assert_eq!(
            specs[3].neuron,
            Some(NeuronRef {
                layer: 10,
                index: 1234
            })
        );
        assert_eq!(specs[4].coefficient, Some(2.0));
        assert_eq!(
            specs[5].feature.as_ref().map(|f| (f.sae.as_str(), f.index)),
            Some(("res12", 3124))
        );
        assert_eq!(specs[5].op, Some(OpName::Clamp));
        assert_eq!((specs[6].layer, specs[6].layers.clone()), (None, None));
    }

    #[test]
    fn parses_options() {
        let specs = parse(
            "v:3:2;site=mlp_out;positions=last:4;normalize,neuron:1:2:mean;means=m;positions=prompt",
        )
        .unwrap();
        assert_eq!(specs[0].site, Some(HookSite::MlpOut));
        assert_eq!(specs[0].positions, Some(Positions::Last(4)));
        assert_eq!(specs[0].normalize, Some(true));
        assert_eq!(specs[1].means.as_deref(), Some("m"));
        assert_eq!(specs[1].positions, Some(Positions::Prompt));
        let huge = parse(&format!("v:3:2;positions=last:{}", u64::MAX)).unwrap();
        assert_eq!(huge[0].positions, Some(Positions::Last(usize::MAX)));
        // Condition options in either order.
        for text in [
            "v:3:2;scope=token;when=c:1<-0.5",
            "v:3:2;when=c:1<-0.5;scope=token",
        ] {
            let w = parse(text).unwrap()[0].when.clone().unwrap();
            assert_eq!(
                (w.vector.as_deref(), w.layer, w.below),
                (Some("c"), Some(1), Some(-0.5))
            );
            assert_eq!(w.scope, Some(ConditionScope::Token), "{text}");
        }
        assert!(parse("v:3:2;when=c:1>0;when=c:1>0").is_err());
    }

    #[test]
    fn errors_name_the_item() {
        for (text, needle) in [
            ("golden_gate:12", "item 1"),
            ("a:1:2,b:x:3", "item 2 (`b:x:3`): `x` is not an integer"),
            ("a:1:lots", "`lots` is not a number"),
            ("a:1:2:explode", "unknown op `explode`"),
            ("a:1:2,,b:1:2", "item 2 is empty"),
            ("a:5-2:1", "empty or too long"),
            ("a:1+x:1", "`x` is not an integer"),
            (":1:1", "missing vector name"),
            ("a:1:NaN", "not a number"),
            ("neuron:1:2:zero:1:9", "expected neuron"),
            ("a:1:2;site=nowhere", "unknown site `nowhere`"),
            ("a:1:2;positions=middle", "unknown positions `middle`"),
            ("a:1:2;positions=last:0", "not a count"),
            ("a:1:2;normalize;normalize", "given twice"),
            ("a:1:2;colour=red", "unknown option"),
        ] {
            let err = parse(text).unwrap_err().0;
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    const N_LAYERS: usize = 4;
    const D_MODEL: usize = 4;
    const N_NEURONS: usize = 6;
    const N_HEADS: usize = 2;
    const HEAD_DIM: usize = 2;

    fn stored(name: &str, kind: VectorKind, width: usize, layers: &[usize]) -> SteeringVector {
        SteeringVector {
            name: name.into(),
            meta: VectorMeta {
                model: String::new(),
                d_model: width,
                kind,
                method: "manual".into(),
                description: String::new(),
                created: "2026-01-01T00:00:00Z".into(),
                version: 0,
            },
            layers: layers
                .iter()
                .map(|&l| {
                    let v: Vec<f32> = (0..width).map(|i| 0.5 + (i + l) as f32 * 0.25).collect();
                    (l, Arc::from(v))
                })
                .collect(),
        }
    }

    fn fixtures() -> (VectorStore, SaeStore) {
        let store = VectorStore::in_memory(crate::steering::store::ModelShape {
            model_id: String::new(),
            d_model: D_MODEL,
            n_neurons: N_NEURONS,
            head_width: N_HEADS * HEAD_DIM,
        });
        let all: Vec<usize> = (0..N_LAYERS).collect();
        store.insert(
            stored("v", VectorKind::Direction, D_MODEL, &all),
            VectorOrigin::Stored,
        );
        store.insert(
            stored("w", VectorKind::Direction, D_MODEL, &[2]),
            VectorOrigin::Stored,
        );
        store.insert(
            stored("m", VectorKind::NeuronMeans, N_NEURONS, &all),
            VectorOrigin::Stored,
        );
        store.insert(
            stored(
                crate::steering::spec::DEFAULT_NEURON_MEANS,
                VectorKind::NeuronMeans,
                N_NEURONS,
                &all,
            ),
            VectorOrigin::Builtin,
        );
        store.insert(
            stored("hd", VectorKind::HeadDirection, N_HEADS * HEAD_DIM, &all),
            VectorOrigin::Stored,
        );
        store.insert(
            stored(
                crate::steering::spec::DEFAULT_HEAD_MEANS,
                VectorKind::HeadMeans,
                N_HEADS * HEAD_DIM,
                &all,
            ),
            VectorOrigin::Builtin,
        );
        let saes = SaeStore::default();
        let d_sae = 8;
        let parts = SaeParts {
            w_enc: (0..D_MODEL * d_sae).map(|i| (i % 5) as f32 - 2.0).collect(),
            w_dec: (0..D_MODEL * d_sae)
                .map(|i| (i % 7) as f32 * 0.1 + 0.1)
                .collect(),
            b_enc: vec![0.0; d_sae],
            b_dec: vec![0.0; D_MODEL],
            threshold: None,
            d_in: D_MODEL,
            d_sae,
        };
        let sae = Sae::new(
            "s",
            parts,
            SaeArchitecture::Standard,
            false,
            "blocks.2.hook_mlp_out",
        );
        saes.insert(sae.expect("a valid SAE"));
        (store, saes)
    }

    fn random_spec(rng: &mut StdRng) -> InterventionSpec {
        let pick = |rng: &mut StdRng, n: usize| rng.random_range(0..n);
        let mut spec = InterventionSpec {
            positions: [
                None,
                Some(Positions::All),
                Some(Positions::Prompt),
                Some(Positions::Generated),
                Some(Positions::Last(1 + pick(rng, 9))),
                Some(Positions::Last(usize::MAX)),
            ][pick(rng, 6)],
            coefficient: [
                None,
                Some(1.0),
                Some(-4.0),
                Some(0.1),
                Some(2.5e-7),
                Some(12345.678),
            ][pick(rng, 6)],
            ..Default::default()
        };
        let mut layers: Vec<i64> = (0..N_LAYERS as i64)
            .filter(|_| rng.random_bool(0.5))
            .collect();
        if layers.len() > 1 && rng.random_bool(0.5) {
            layers.reverse();
        }
        match pick(rng, 6) {
            4 => {
                spec.head = Some(pick(rng, N_HEADS) as i64);
                spec.op = [
                    None,
                    Some(OpName::Zero),
                    Some(OpName::Mean),
                    Some(OpName::Scale),
                ][pick(rng, 4)];
                if spec.op != Some(OpName::Scale) {
                    spec.coefficient = None;
                }
                if layers.is_empty() {
                    layers.push(pick(rng, N_LAYERS) as i64);
                }
                spec.layers = Some(layers);
                spec.site = rng.random_bool(0.5).then_some(HookSite::AttnHead);
            }
            5 => {
                spec.head = rng.random_bool(0.7).then(|| pick(rng, N_HEADS) as i64);
                let width = if spec.head.is_some() {
                    HEAD_DIM
                } else {
                    N_HEADS * HEAD_DIM
                };
                if rng.random_bool(0.5) {
                    spec.vector = Some("hd".into());
                } else {
                    spec.values = Some((0..width).map(|i| i as f64 - 0.5).collect());
                    spec.site = Some(HookSite::AttnHead);
                    layers.push(pick(rng, N_LAYERS) as i64);
                    layers.dedup();
                    layers.sort();
                    layers.dedup();
                }
                spec.op = [
                    None,
                    Some(OpName::Add),
                    Some(OpName::Clamp),
                    Some(OpName::Ablate),
                ][pick(rng, 4)];
                if !layers.is_empty() {
                    spec.layers = Some(layers);
                }
            }
            0 => {
                spec.neuron = Some(NeuronRef {
                    layer: pick(rng, N_LAYERS) as i64,
                    index: pick(rng, N_NEURONS) as i64,
                });
                spec.op = Some(OpName::ALL[3 + pick(rng, 4)]);
                if spec.op == Some(OpName::Mean) && rng.random_bool(0.5) {
                    spec.means = Some("m".into());
                }
                if matches!(spec.op, Some(OpName::Zero | OpName::Mean)) {
                    spec.coefficient = None;
                }
            }
            1 => {
                spec.feature = Some(FeatureRef {
                    sae: "s".into(),
                    index: pick(rng, 8) as i64,
                });
                spec.op = [None, Some(OpName::Add), Some(OpName::Clamp)][pick(rng, 3)];
                spec.normalize = rng.random_bool(0.3).then_some(true);
            }
            kind => {
                if kind == 2 {
                    spec.vector = Some(["v", "w"][pick(rng, 2)].into());
                } else {
                    spec.values = Some(
                        (0..D_MODEL)
                            .map(|i| i as f64 * 0.3 - 0.4 + rng.random::<f64>())
                            .collect(),
                    );
                }
                spec.op = [
                    None,
                    Some(OpName::Add),
                    Some(OpName::Clamp),
                    Some(OpName::Ablate),
                ][pick(rng, 4)];
                spec.normalize = rng.random_bool(0.3).then_some(true);
                if !layers.is_empty() || kind == 3 {
                    if layers.is_empty() {
                        layers.push(1);
                    }
                    if layers.len() == 1 && rng.random_bool(0.5) {
                        spec.layer = Some(layers[0]);
                    } else {
                        spec.layers = Some(layers);
                    }
                    spec.site = [
                        None,
                        Some(HookSite::ResidPre),
                        Some(HookSite::AttnOut),
                        Some(HookSite::MlpOut),
                        Some(HookSite::ResidPost),
                    ][pick(rng, 5)];
                }
            }
        }
        if rng.random_bool(0.25) {
            let t = [0.1, -0.25, 3.0, 0.0][pick(rng, 4)];
            let above = rng.random_bool(0.5);
            spec.when = Some(crate::steering::spec::ConditionSpec {
                vector: Some("v".into()),
                layer: Some(pick(rng, N_LAYERS) as i64),
                above: above.then_some(t),
                below: (!above).then_some(t),
                scope: [
                    None,
                    Some(ConditionScope::Prompt),
                    Some(ConditionScope::Token),
                ][pick(rng, 3)],
                measure: [
                    None,
                    Some(ConditionMeasure::Cosine),
                    Some(ConditionMeasure::Projection),
                ][pick(rng, 3)],
                ..Default::default()
            });
            if rng.random_bool(0.3) {
                let w = spec.when.as_mut().expect("just set");
                (w.vector, w.measure, w.layer) = (None, None, Some(2));
                w.feature = Some(FeatureRef {
                    sae: "s".into(),
                    index: pick(rng, 8) as i64,
                });
            }
        }
        if spec.positions.is_none() && rng.random_bool(0.3) {
            spec.from = rng.random_bool(0.5).then(|| rng.random_range(0..4));
            spec.until = Some(spec.from.unwrap_or(0) + 1 + rng.random_range(0..6));
            let adds = matches!(spec.op, None | Some(OpName::Add)) && spec.neuron.is_none();
            spec.decay = (adds && rng.random_bool(0.5)).then_some(Decay::Linear);
        }
        spec
    }

    /// A validated plan, echoed and sent back as `X-Steering`, is the same plan.
    #[test]
    fn the_echo_of_any_plan_parses_back_to_the_same_plan() {
        let (store, saes) = fixtures();
        let limits = ModelLimits {
            n_layers: N_LAYERS,
            d_model: D_MODEL,
            n_neurons: N_NEURONS,
            n_heads: N_HEADS,
            head_dim: HEAD_DIM,
            max_interventions: 16,
            store: &store,
            saes: &saes,
        };
        let mut rng = StdRng::seed_from_u64(7);
        let (mut checked, mut compact, mut forms) = (0, 0, std::collections::BTreeSet::new());
        let (mut heads, mut conditional) = (0, 0);
        for _ in 0..600 {
            let specs: Vec<InterventionSpec> = (0..1 + rng.random_range(0..4))
                .map(|_| random_spec(&mut rng))
                .collect();
            let Ok(plan) = validate(&specs, &limits) else {
                continue;
            };
            let applied = plan.applied();
            let echo = format(&applied);
            let resent = if echo.starts_with('[') {
                serde_json::from_str::<Vec<InterventionSpec>>(&echo).expect("the JSON echo parses")
            } else {
                compact += 1;
                parse(&echo).unwrap_or_else(|e| panic!("`{echo}` does not parse: {e}"))
            };
            let again = validate(&resent, &limits)
                .unwrap_or_else(|e| panic!("`{echo}` does not validate: {e}"));
            assert_eq!(again.applied(), applied, "echo `{echo}` of {specs:?}");
            for (a, b) in again.interventions.iter().zip(&plan.interventions) {
                assert_eq!(a.op, b.op, "{echo}");
                assert_eq!(a.positions, b.positions, "{echo}");
                assert_eq!(a.schedule, b.schedule, "{echo}");
                let points = |iv: &crate::steering::spec::Intervention| {
                    iv.points
                        .iter()
                        .map(|p| (p.site, p.layer, p.vector.clone(), p.span))
                        .collect::<Vec<_>>()
                };
                assert_eq!(points(a), points(b), "{echo}");
            }
            for a in &applied {
                let scheduled = a.schedule.map(|s| s.decay.is_some());
                forms.insert((
                    a.op,
                    a.site,
                    a.positions.name().is_none(),
                    a.normalize,
                    scheduled,
                ));
            }
            checked += 1;
            heads += applied.iter().filter(|a| a.head.is_some()).count();
            conditional += applied.iter().filter(|a| a.when.is_some()).count();
        }
        assert!(heads > 50, "only {heads} head interventions validated");
        assert!(
            conditional > 50,
            "only {conditional} conditional interventions validated"
        );
        assert!(
            checked > 300 && compact > 100,
            "{checked} plans, {compact} compact"
        );
        assert!(
            forms.len() > 30,
            "only {} kinds of intervention were generated",
            forms.len()
        );
    }

    #[test]
    fn formats_plans_compactly() {
        let applied =
            |op: OpName, layers: Vec<usize>, coefficient: Option<f64>| AppliedIntervention {
                op,
                vector: Some("v".into()),
                vector_version: Some(1),
                neuron: None,
                head: None,
                feature: None,
                coefficient,
                layers,
                site: Some(HookSite::ResidPost),
                positions: Positions::All,
                normalize: false,
                vector_norm: None,
                all_writes: false,
                values: None,
                schedule: None,
                when: None,
            };
        let mut ablate = applied(OpName::Ablate, (0..30).collect(), None);
        ablate.all_writes = true;
        ablate.site = None;
        let mut neuron = applied(OpName::Scale, vec![10], Some(3.0));
        neuron.neuron = Some(NeuronRef {
            layer: 10,
            index: 5,
        });
        neuron.site = Some(HookSite::MlpAct);
        let mut at_mlp = applied(OpName::Add, vec![3], Some(2.0));
        at_mlp.site = Some(HookSite::MlpOut);
        at_mlp.positions = Positions::Last(4);
        at_mlp.normalize = true;
        let mut head = applied(OpName::Scale, vec![4, 5], Some(0.5));
        (head.head, head.vector, head.site) = (Some(3), None, Some(HookSite::AttnHead));
        let mut in_head = applied(OpName::Add, vec![7], Some(2.0));
        (in_head.head, in_head.site) = (Some(1), Some(HookSite::AttnHead));
        let plan = vec![
            applied(OpName::Add, vec![10, 11, 12, 14], Some(2.5)),
            ablate,
            neuron,
            at_mlp,
            head,
            in_head,
        ];
        assert_eq!(
            format(&plan),
            "v:10-12+14:2.5,v:*:0:ablate,neuron:10:5:scale:3,v:3:2;site=mlp_out;positions=last:4;normalize,\
             head:4-5:3:scale:0.5,v:7:2;site=attn_head;head=1"
        );
    }
}
