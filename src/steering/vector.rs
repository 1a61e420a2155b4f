//! A named feature vector: one direction per layer (or, for `neuron_means`, one mean activation
//! per MLP neuron per layer), with the metadata that says what it was made for. Stored as a
//! safetensors file: tensors `layer.L` of shape `[width]`, metadata in the header.

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What the per-layer tensors of a vector are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VectorKind {
    /// A direction in the residual stream (width `d_model`).
    Direction,
    /// The mean `mlp_act` of every neuron (width `intermediate_size`), for mean-ablation.
    NeuronMeans,
    /// A direction at the `attn_head` site (width `n_heads * head_dim`, the heads side by
    /// side): one head's part is added to that head alone.
    HeadDirection,
    /// The mean `attn_head` activation (width `n_heads * head_dim`), for mean-ablating heads.
    HeadMeans,
}

impl VectorKind {
    pub const ALL: [VectorKind; 4] = [
        VectorKind::Direction,
        VectorKind::NeuronMeans,
        VectorKind::HeadDirection,
        VectorKind::HeadMeans,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VectorKind::Direction => "direction",
            VectorKind::NeuronMeans => "neuron_means",
            VectorKind::HeadDirection => "head_direction",
            VectorKind::HeadMeans => "head_means",
        }
    }

    pub fn parse(s: &str) -> Option<VectorKind> {
        VectorKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether the vector holds means (for `mean`), not directions.
    pub fn is_means(self) -> bool {
        matches!(self, VectorKind::NeuronMeans | VectorKind::HeadMeans)
    }
}

/// Facts about a vector, kept in its file's header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VectorMeta {
    /// The model id the vector was made for.
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// Width of each layer's tensor.
    #[schema(example = 576)]
    pub d_model: usize,
    /// `direction` or `neuron_means`.
    pub kind: VectorKind,
    /// How it was made (`mean_diff`, `pca`, `caa`, `import`, `manual`, ...).
    #[schema(example = "mean_diff")]
    pub method: String,
    /// What the vector is and how to use it.
    #[schema(example = "Golden Gate Bridge sentences minus neutral sentences")]
    pub description: String,
    /// RFC 3339 creation time.
    #[schema(example = "2026-11-28T12:00:00Z")]
    pub created: String,
    /// Increases by one on every write of the same name; the ETag is derived from it.
    #[schema(example = 1)]
    pub version: u64,
}

/// A vector with its data. Immutable once built: updates replace the whole `Arc`, so a request
/// keeps the version it was admitted with.
#[derive(Debug, Clone)]
pub struct SteeringVector {
    pub name: String,
    pub meta: VectorMeta,
    pub layers: BTreeMap<usize, Arc<[f32]>>,
}

impl SteeringVector {
    /// Checks that every layer has the declared width and only finite values.
    pub fn validate(&self) -> Result<()> {
        if self.layers.is_empty() {
            bail!("vector `{}` has no layers", self.name);
        }
        for (l, v) in &self.layers {
            if v.len() != self.meta.d_model {
                bail!(
                    "layer {l} has {} values, expected {}",
                    v.len(),
                    self.meta.d_model
                );
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                bail!("layer {l} value {i} is not a finite number");
            }
        }
        Ok(())
    }

    /// The direction to use at `layer`: that layer's, or the only one when it holds one.
    pub fn direction_for(&self, layer: usize) -> Option<&Arc<[f32]>> {
        self.layers.get(&layer).or_else(|| {
            if self.layers.len() == 1 {
                self.layers.values().next()
            } else {
                None
            }
        })
    }

    /// Euclidean norm of each layer's tensor.
    pub fn norms(&self) -> BTreeMap<usize, f32> {
        self.layers.iter().map(|(&l, v)| (l, l2_norm(v))).collect()
    }

    /// The HTTP entity tag of this version.
    pub fn etag(&self) -> String {
        format!("\"{}-v{}\"", self.name, self.meta.version)
    }

    /// Encodes as safetensors bytes.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let bytes: Vec<(String, Vec<u8>)> = self
            .layers
            .iter()
            .map(|(l, v)| {
                (
                    format!("layer.{l}"),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, b)| {
                Ok((
                    name.clone(),
                    TensorView::new(Dtype::F32, vec![b.len() / 4], b)?,
                ))
            })
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let meta = &self.meta;
        let header: HashMap<String, String> = [
            ("format", "tiller.vector.v1".to_string()),
            ("name", self.name.clone()),
            ("model", meta.model.clone()),
            ("d_model", meta.d_model.to_string()),
            ("kind", meta.kind.as_str().to_string()),
            ("method", meta.method.clone()),
            ("description", meta.description.clone()),
            ("created", meta.created.clone()),
            ("version", meta.version.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Ok(safetensors::serialize(views, Some(header))?)
    }

    /// Decodes safetensors bytes with tensors `layer.L` (f32, f16 or bf16, 1-D). Header fields
    /// that are missing are filled from `defaults`.
    pub fn from_safetensors(bytes: &[u8], defaults: &VectorDefaults) -> Result<Self> {
        let (_, metadata) = SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow!("not a safetensors file: {e}"))?;
        let st =
            SafeTensors::deserialize(bytes).map_err(|e| anyhow!("not a safetensors file: {e}"))?;
        let header = metadata.metadata().clone().unwrap_or_default();
        let mut layers = BTreeMap::new();
        for (name, view) in st.tensors() {
            let layer: usize = name
                .strip_prefix("layer.")
                .and_then(|l| l.parse().ok())
                .with_context(|| format!("tensor `{name}` is not named `layer.<N>`"))?;
            if view.shape().len() != 1 {
                bail!(
                    "tensor `{name}` has shape {:?}; expected one dimension",
                    view.shape()
                );
            }
            layers.insert(
                layer,
                decode_floats(view.dtype(), view.data())
                    .with_context(|| format!("tensor `{name}`"))?
                    .into(),
            );
        }
        let width = layers.values().next().map_or(0, |v: &Arc<[f32]>| v.len());
        let get = |k: &str| header.get(k).cloned();
        let kind = match get("kind").as_deref() {
            None => VectorKind::Direction,
            Some(k) => VectorKind::parse(k).ok_or_else(|| anyhow!("unknown vector kind `{k}`"))?,
        };
        let v = Self {
            name: defaults
                .name
                .clone()
                .or_else(|| get("name"))
                .unwrap_or_default(),
            meta: VectorMeta {
                model: get("model").unwrap_or_else(|| defaults.model.clone()),
                d_model: get("d_model").and_then(|s| s.parse().ok()).unwrap_or(width),
                kind,
                method: get("method").unwrap_or_else(|| defaults.method.clone()),
                description: get("description").unwrap_or_default(),
                created: get("created").unwrap_or_else(|| defaults.created.clone()),
                version: get("version").and_then(|s| s.parse().ok()).unwrap_or(1),
            },
            layers,
        };
        v.validate()?;
        Ok(v)
    }
}

/// Values used for metadata a file does not carry.
#[derive(Debug, Clone, Default)]
pub struct VectorDefaults {
    /// Overrides the name in the file (the store names vectors by file or URL).
    pub name: Option<String>,
    pub model: String,
    pub method: String,
    pub created: String,
}

/// Decodes little-endian f32, f16 or bf16 values.
pub fn decode_floats(dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("dtype {other:?} is not supported (use f32, f16 or bf16)"),
    })
}

pub fn l2_norm(v: &[f32]) -> f32 {
    v.iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt() as f32
}

/// Now as RFC 3339 UTC, to the second.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_keeps_values_and_metadata() {
        let v = SteeringVector {
            name: "golden_gate".into(),
            meta: VectorMeta {
                model: "m".into(),
                d_model: 3,
                kind: VectorKind::Direction,
                method: "mean_diff".into(),
                description: "a test".into(),
                created: "2026-01-01T00:00:00Z".into(),
                version: 4,
            },
            layers: [
                (2, Arc::from(vec![1.0, -2.5, 3.25])),
                (7, Arc::from(vec![0.0, 1e-8, -7.0])),
            ]
            .into_iter()
            .collect(),
        };
        let bytes = v.to_safetensors().unwrap();
        let back = SteeringVector::from_safetensors(&bytes, &VectorDefaults::default()).unwrap();
        assert_eq!(back.name, v.name);
        assert_eq!(back.meta, v.meta);
        assert_eq!(back.layers, v.layers);
    }

    #[test]
    fn rejects_bad_tensors() {
        let data = [0u8; 8];
        let t = TensorView::new(Dtype::F32, vec![2], &data).unwrap();
        let bytes = safetensors::serialize([("weights", t)], None).unwrap();
        let err = SteeringVector::from_safetensors(&bytes, &VectorDefaults::default()).unwrap_err();
        assert!(err.to_string().contains("layer.<N>"), "{err}");
        let nan = f32::NAN.to_le_bytes();
        let t = TensorView::new(Dtype::F32, vec![1], &nan).unwrap();
        let bytes = safetensors::serialize([("layer.0", t)], None).unwrap();
        let err = SteeringVector::from_safetensors(&bytes, &VectorDefaults::default()).unwrap_err();
        assert!(err.to_string().contains("finite"), "{err}");
    }

    #[test]
    fn formats_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
