//! The compact text form of a steering plan, for the `X-Steering` header of clients that
//! cannot change the request body, and for echoing a validated plan (`X-Steering-Applied`).
//!
//! ```text
//! plan   := item ("," item)*
//! item   := NAME ":" LAYERS ":" NUMBER [":" ("add" | "clamp" | "ablate")]
//!         | "neuron" ":" LAYER ":" INDEX ":" ("zero" | "mean" | "scale" | "set") [":" NUMBER]
//!         | SAE "#" INDEX ":" LAYERS ":" NUMBER [":" ("add" | "clamp")]
//! LAYERS := LAYER | LAYER "-" LAYER | "*"      ("*": the vector's own layers; for ablate,
//!                                               every attention and MLP write)
//! ```
//!
//! `refusal:14:-4,golden_gate:10-12:2.5` adds two vectors; `refusal:*:0:ablate` projects a
//! direction out everywhere; `neuron:10:1234:zero` zeroes one neuron.

use super::spec::{AppliedIntervention, FeatureRef, InterventionSpec, NeuronRef};

/// A parse failure, naming the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactError(pub String);

impl std::fmt::Display for CompactError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn number(part: &str, what: &str, item: &str, n: usize) -> Result<f64, CompactError> {
    part.trim()
        .parse::<f64>()
        .ok()
        .filter(|x| x.is_finite())
        .ok_or_else(|| {
            CompactError(format!(
                "item {n} (`{item}`): `{part}` is not a number ({what})"
            ))
        })
}

fn integer(part: &str, what: &str, item: &str, n: usize) -> Result<i64, CompactError> {
    part.trim().parse::<i64>().map_err(|_| {
        CompactError(format!(
            "item {n} (`{item}`): `{part}` is not an integer ({what})"
        ))
    })
}

/// `(layer, layers)` of a LAYERS part.
fn layers(
    part: &str,
    item: &str,
    n: usize,
) -> Result<(Option<i64>, Option<Vec<i64>>), CompactError> {
    let part = part.trim();
    if part == "*" {
        return Ok((None, None));
    }
    if let Some((a, b)) = part.split_once('-').filter(|(a, _)| !a.is_empty()) {
        let (a, b) = (
            integer(a, "first layer", item, n)?,
            integer(b, "last layer", item, n)?,
        );
        if b < a || b - a > 1024 {
            return Err(CompactError(format!(
                "item {n} (`{item}`): layer range `{part}` is empty or too long"
            )));
        }
        return Ok((None, Some((a..=b).collect())));
    }
    Ok((Some(integer(part, "layer", item, n)?), None))
}

/// Parses the compact form (1-based item numbers in errors).
pub fn parse(text: &str) -> Result<Vec<InterventionSpec>, CompactError> {
    let mut out = Vec::new();
    for (i, item) in text.split(',').enumerate() {
        let n = i + 1;
        let item = item.trim();
        if item.is_empty() {
            return Err(CompactError(format!("item {n} is empty")));
        }
        let parts: Vec<&str> = item.split(':').collect();
        let is_neuron_op = |p: &str| matches!(p.trim(), "zero" | "mean" | "scale" | "set");
        if parts[0].trim() == "neuron" && parts.len() >= 4 && is_neuron_op(parts[3]) {
            if parts.len() > 5 {
                return Err(CompactError(format!(
                    "item {n} (`{item}`): expected neuron:layer:index:op[:coefficient]"
                )));
            }
            out.push(InterventionSpec {
                neuron: Some(NeuronRef {
                    layer: integer(parts[1], "layer", item, n)?,
                    index: integer(parts[2], "neuron index", item, n)?,
                }),
                op: Some(parts[3].trim().to_string()),
                coefficient: parts
                    .get(4)
                    .map(|c| number(c, "coefficient", item, n))
                    .transpose()?,
                ..Default::default()
            });
            continue;
        }
        if !(3..=4).contains(&parts.len()) {
            return Err(CompactError(format!(
                "item {n} (`{item}`): expected name:layer:coefficient[:op]"
            )));
        }
        let (layer, layers) = layers(parts[1], item, n)?;
        let coefficient = Some(number(parts[2], "coefficient", item, n)?);
        let op = parts.get(3).map(|o| o.trim().to_string());
        if let Some(o) = &op {
            if !matches!(o.as_str(), "add" | "clamp" | "ablate") {
                return Err(CompactError(format!(
                    "item {n} (`{item}`): unknown op `{o}` (add, clamp or ablate)"
                )));
            }
        }
        let target = parts[0].trim();
        if target.is_empty() {
            return Err(CompactError(format!(
                "item {n} (`{item}`): missing vector name"
            )));
        }
        let mut spec = InterventionSpec {
            layer,
            layers,
            coefficient: if op.as_deref() == Some("ablate") {
                None
            } else {
                coefficient
            },
            op,
            ..Default::default()
        };
        match target.split_once('#') {
            Some((sae, index)) => {
                spec.feature = Some(FeatureRef {
                    sae: sae.to_string(),
                    index: integer(index, "feature index", item, n)?,
                })
            }
            None => spec.vector = Some(target.to_string()),
        }
        out.push(spec);
    }
    Ok(out)
}

/// Compresses sorted layers into `a-b` runs.
fn runs(layers: &[usize]) -> Vec<String> {
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
    out
}

fn fmt_number(x: f64) -> String {
    let s = format!("{x}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// The compact form of a validated plan (inline values appear as `@values`).
pub fn format(plan: &[AppliedIntervention]) -> String {
    let mut items = Vec::new();
    for a in plan {
        let c = fmt_number(a.coefficient.unwrap_or(0.0));
        if let Some(n) = a.neuron {
            let tail = match a.op.as_str() {
                "scale" | "set" => format!(":{c}"),
                _ => String::new(),
            };
            items.push(format!("neuron:{}:{}:{}{tail}", n.layer, n.index, a.op));
            continue;
        }
        let target = match (&a.feature, &a.vector) {
            (Some(f), _) => format!("{}#{}", f.sae, f.index),
            (None, Some(v)) => v.clone(),
            (None, None) => "@values".to_string(),
        };
        let op = if a.op == "add" {
            String::new()
        } else {
            format!(":{}", a.op)
        };
        if a.all_writes {
            items.push(format!("{target}:*:{c}{op}"));
            continue;
        }
        for r in runs(&a.layers) {
            items.push(format!("{target}:{r}:{c}{op}"));
        }
    }
    items.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_item_form() {
        let specs = parse("refusal:14:-4, golden_gate:10-12:2.5,refusal:*:0:ablate,neuron:10:1234:zero,neuron:3:7:scale:2,res12#3124:12:8:clamp,x:*:1").unwrap();
        assert_eq!(specs.len(), 7);
        assert_eq!(specs[0].vector.as_deref(), Some("refusal"));
        assert_eq!(
            (specs[0].layer, specs[0].coefficient),
            (Some(14), Some(-4.0))
        );
        assert_eq!(specs[1].layers, Some(vec![10, 11, 12]));
        assert_eq!(specs[2].op.as_deref(), Some("ablate"));
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
        assert_eq!(specs[5].op.as_deref(), Some("clamp"));
        assert_eq!((specs[6].layer, specs[6].layers.clone()), (None, None));
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
            (":1:1", "missing vector name"),
            ("a:1:NaN", "not a number"),
            ("neuron:1:2:zero:1:9", "expected neuron"),
        ] {
            let err = parse(text).unwrap_err().0;
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn formats_plans_compactly() {
        let applied =
            |op: &str, layers: Vec<usize>, coefficient: Option<f64>| AppliedIntervention {
                op: op.into(),
                vector: Some("v".into()),
                vector_version: Some(1),
                neuron: None,
                feature: None,
                coefficient,
                layers,
                site: "resid_post".into(),
                positions: serde_json::json!("all"),
                normalize: false,
                vector_norm: None,
                all_writes: false,
            };
        let mut ablate = applied("ablate", (0..30).collect(), None);
        ablate.all_writes = true;
        let mut neuron = applied("scale", vec![10], Some(3.0));
        neuron.neuron = Some(NeuronRef {
            layer: 10,
            index: 5,
        });
        let plan = vec![
            applied("add", vec![10, 11, 12, 14], Some(2.5)),
            ablate,
            neuron,
        ];
        assert_eq!(
            format(&plan),
            "v:10-12:2.5,v:14:2.5,v:*:0:ablate,neuron:10:5:scale:3"
        );
    }
}
