//! Vector file formats in and out: JSON, safetensors (our store's own format), and the
//! llama.cpp / repeng control-vector GGUF.
//!
//! A control-vector GGUF has `general.architecture = controlvector`,
//! `controlvector.model_hint` (the model's architecture) and `controlvector.layer_count`, and
//! one F32 1-D tensor `direction.N` per layer. llama.cpp adds `direction.N` (times the scale
//! given at load) to the output of block N, our `resid_post` N; it refuses a file holding a
//! `direction.0` (block 0 cannot be steered there), or any tensor that is not F32 1-D, so an
//! export leaves layer 0 out.

use super::vector::{
    decode_floats, now_rfc3339, SteeringVector, VectorDefaults, VectorKind, VectorMeta,
};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::sync::Arc;

/// A file format for vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VectorFormat {
    Json,
    Safetensors,
    Gguf,
}

impl VectorFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(Self::Json),
            "safetensors" => Some(Self::Safetensors),
            "gguf" => Some(Self::Gguf),
            _ => None,
        }
    }

    /// Guesses the format of a body from its first bytes.
    pub fn sniff(bytes: &[u8]) -> Self {
        let start = bytes
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .map(|i| bytes[i]);
        if bytes.starts_with(b"GGUF") {
            Self::Gguf
        } else if start == Some(b'{') && !looks_like_safetensors(bytes) {
            Self::Json
        } else {
            Self::Safetensors
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Safetensors => "safetensors",
            Self::Gguf => "gguf",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            _ => "application/octet-stream",
        }
    }
}

/// A safetensors file starts with an 8-byte little-endian header length.
fn looks_like_safetensors(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
        n > 1 && n < bytes.len() as u64 && bytes.get(8) == Some(&b'{')
    }
}

/// The JSON form of a vector: per-layer values keyed by layer number, plus metadata.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"layers": {"12": [0.1, -0.2, 0.3]}, "description": "my direction"}))]
pub struct VectorJson {
    #[schema(example = json!({"12": [0.1, -0.2, 0.3]}))]
    /// `{"12": [d_model numbers], ...}`: one direction per layer.
    #[schema(value_type = Object)]
    pub layers: BTreeMap<String, Vec<f64>>,
    /// What the vector is.
    #[schema(example = "my direction")]
    #[serde(default)]
    pub description: Option<String>,
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    /// The model it was made for (default: this server's model).
    #[serde(default)]
    pub model: Option<String>,
    #[schema(example = "manual")]
    /// How it was made (default `manual`).
    #[serde(default)]
    pub method: Option<String>,
    /// `direction` (default) or `neuron_means`.
    #[serde(default)]
    pub kind: Option<VectorKind>,
    #[schema(example = 1)]
    /// Present in exports; ignored on import (the store assigns versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// When it was made (RFC 3339); in exports.
    #[schema(example = "2026-11-28T12:00:00Z")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Its name; in exports.
    #[schema(example = "golden_gate")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Parses a vector body in `format`; `defaults` fills what the file does not say.
pub fn decode(
    bytes: &[u8],
    format: VectorFormat,
    defaults: &VectorDefaults,
) -> Result<SteeringVector> {
    match format {
        VectorFormat::Json => {
            let j: VectorJson =
                serde_json::from_slice(bytes).map_err(|e| anyhow!("invalid vector JSON: {e}"))?;
            from_json(j, defaults)
        }
        VectorFormat::Safetensors => SteeringVector::from_safetensors(bytes, defaults),
        VectorFormat::Gguf => from_control_vector_gguf(bytes, defaults),
    }
}

pub fn from_json(j: VectorJson, defaults: &VectorDefaults) -> Result<SteeringVector> {
    let mut layers = BTreeMap::new();
    for (key, values) in &j.layers {
        let layer: usize = key
            .parse()
            .with_context(|| format!("layer key `{key}` is not a number"))?;
        if let Some(i) = values
            .iter()
            .position(|x| !x.is_finite() || x.abs() > f32::MAX as f64)
        {
            bail!("layer {layer} value {i} is not a finite number");
        }
        layers.insert(
            layer,
            Arc::from(values.iter().map(|&x| x as f32).collect::<Vec<_>>()),
        );
    }
    let width = layers.values().next().map_or(0, |v: &Arc<[f32]>| v.len());
    let v = SteeringVector {
        name: defaults.name.clone().or(j.name).unwrap_or_default(),
        meta: VectorMeta {
            model: j.model.unwrap_or_else(|| defaults.model.clone()),
            d_model: width,
            kind: j.kind.unwrap_or(VectorKind::Direction),
            method: j.method.unwrap_or_else(|| defaults.method.clone()),
            description: j.description.unwrap_or_default(),
            created: defaults.created.clone(),
            version: 1,
        },
        layers,
    };
    v.validate()?;
    Ok(v)
}

pub fn to_json(v: &SteeringVector) -> VectorJson {
    VectorJson {
        layers: v
            .layers
            .iter()
            .map(|(l, xs)| (l.to_string(), xs.iter().map(|&x| x as f64).collect()))
            .collect(),
        description: Some(v.meta.description.clone()),
        model: Some(v.meta.model.clone()),
        method: Some(v.meta.method.clone()),
        kind: Some(v.meta.kind),
        version: Some(v.meta.version),
        created: Some(v.meta.created.clone()),
        name: Some(v.name.clone()),
    }
}

/// Encodes a vector in `format`. `architecture` is the served model's (for the GGUF hint).
pub fn encode(v: &SteeringVector, format: VectorFormat, architecture: &str) -> Result<Vec<u8>> {
    match format {
        VectorFormat::Json => Ok(serde_json::to_vec(&to_json(v))?),
        VectorFormat::Safetensors => v.to_safetensors(),
        VectorFormat::Gguf => to_control_vector_gguf(v, architecture),
    }
}

fn string_value(md: &HashMap<String, Value>, key: &str) -> Option<String> {
    md.get(key).and_then(|v| v.to_string().ok()).cloned()
}

/// Reads a llama.cpp / repeng control vector.
pub fn from_control_vector_gguf(bytes: &[u8], defaults: &VectorDefaults) -> Result<SteeringVector> {
    let mut cursor = Cursor::new(bytes);
    crate::model::gguf_header::check(&mut cursor)
        .map_err(|e| anyhow!("not a readable GGUF file: {e}"))?;
    let content = gguf_file::Content::read(&mut cursor)
        .map_err(|e| anyhow!("not a readable GGUF file: {e}"))?;
    let arch = string_value(&content.metadata, "general.architecture").unwrap_or_default();
    if arch != "controlvector" {
        bail!("GGUF general.architecture is `{arch}`, expected `controlvector`");
    }
    let mut layers = BTreeMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(layer) = name
            .strip_prefix("direction.")
            .and_then(|l| l.parse::<usize>().ok())
        else {
            bail!("tensor `{name}` is not named `direction.<N>`");
        };
        let t = content
            .tensor(&mut cursor, name, &Device::Cpu)
            .map_err(|e| anyhow!("tensor `{name}`: {e}"))?;
        if t.shape().rank() != 1 {
            bail!(
                "tensor `{name}` has shape {:?}; expected one dimension",
                t.shape().dims()
            );
        }
        let values = match t.dtype() {
            GgmlDType::F32 => decode_floats(safetensors::Dtype::F32, &t.data()?)?,
            GgmlDType::F16 => decode_floats(safetensors::Dtype::F16, &t.data()?)?,
            other => bail!("tensor `{name}` is {other:?}; expected F32"),
        };
        layers.insert(layer, Arc::from(values));
    }
    let width = layers.values().next().map_or(0, |v: &Arc<[f32]>| v.len());
    let v = SteeringVector {
        name: defaults.name.clone().unwrap_or_default(),
        meta: VectorMeta {
            model: string_value(&content.metadata, "tiller.model")
                .unwrap_or_else(|| defaults.model.clone()),
            d_model: width,
            kind: VectorKind::Direction,
            method: string_value(&content.metadata, "tiller.method")
                .unwrap_or_else(|| "import".into()),
            description: string_value(&content.metadata, "tiller.description").unwrap_or_else(
                || {
                    format!(
                        "control vector for `{}`",
                        string_value(&content.metadata, "controlvector.model_hint")
                            .unwrap_or_default()
                    )
                },
            ),
            created: defaults.created.clone(),
            version: 1,
        },
        layers,
    };
    v.validate()?;
    Ok(v)
}

/// Writes a llama.cpp control vector: `direction.N` for every stored layer N >= 1.
pub fn to_control_vector_gguf(v: &SteeringVector, architecture: &str) -> Result<Vec<u8>> {
    if v.meta.kind != VectorKind::Direction {
        bail!(
            "`{}` holds neuron means; only directions export as control vectors",
            v.name
        );
    }
    let tensors: Vec<(String, QTensor)> = v
        .layers
        .iter()
        .filter(|(&l, _)| l >= 1)
        .map(|(l, xs)| {
            let t = Tensor::from_slice(xs, xs.len(), &Device::Cpu)?;
            Ok((
                format!("direction.{l}"),
                QTensor::quantize(&t, GgmlDType::F32)?,
            ))
        })
        .collect::<Result<_>>()?;
    if tensors.is_empty() {
        bail!(
            "`{}` holds only layer 0, which llama.cpp control vectors cannot carry",
            v.name
        );
    }
    let metadata = [
        (
            "general.architecture",
            Value::String("controlvector".into()),
        ),
        (
            "controlvector.model_hint",
            Value::String(architecture.into()),
        ),
        (
            "controlvector.layer_count",
            Value::U32(tensors.len() as u32),
        ),
        ("tiller.model", Value::String(v.meta.model.clone())),
        ("tiller.method", Value::String(v.meta.method.clone())),
        (
            "tiller.description",
            Value::String(v.meta.description.clone()),
        ),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts)?;
    Ok(out.into_inner())
}

/// Defaults for a vector arriving now for `model`.
pub fn defaults_for(name: &str, model: &str, method: &str) -> VectorDefaults {
    VectorDefaults {
        name: Some(name.to_string()),
        model: model.to_string(),
        method: method.to_string(),
        created: now_rfc3339(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SteeringVector {
        SteeringVector {
            name: "cv".into(),
            meta: VectorMeta {
                model: "m".into(),
                d_model: 4,
                kind: VectorKind::Direction,
                method: "mean_diff".into(),
                description: "test".into(),
                created: "2026-01-01T00:00:00Z".into(),
                version: 3,
            },
            layers: [
                (2, Arc::from(vec![0.5f32, -1.0, 2.25, 1e-3])),
                (5, Arc::from(vec![1.0f32, 2.0, 3.0, 4.0])),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn every_format_round_trips() {
        let v = sample();
        for format in [
            VectorFormat::Json,
            VectorFormat::Safetensors,
            VectorFormat::Gguf,
        ] {
            let bytes = encode(&v, format, "llama").unwrap();
            assert_eq!(VectorFormat::sniff(&bytes), format, "{format:?}");
            let back = decode(&bytes, format, &defaults_for("cv", "m", "import")).unwrap();
            assert_eq!(back.layers, v.layers, "{format:?}");
            assert_eq!(back.meta.model, "m");
            assert_eq!(back.meta.method, "mean_diff");
            assert_eq!(back.meta.description, "test");
        }
    }

    #[test]
    fn gguf_export_matches_llama_cpp_expectations() {
        let mut v = sample();
        v.layers.insert(0, Arc::from(vec![9.0f32; 4]));
        let bytes = to_control_vector_gguf(&v, "llama").unwrap();
        let content = gguf_file::Content::read(&mut Cursor::new(&bytes)).unwrap();
        assert_eq!(
            string_value(&content.metadata, "general.architecture").unwrap(),
            "controlvector"
        );
        assert_eq!(
            string_value(&content.metadata, "controlvector.model_hint").unwrap(),
            "llama"
        );
        assert_eq!(
            content.metadata["controlvector.layer_count"]
                .to_u32()
                .unwrap(),
            2
        );
        let mut names: Vec<_> = content.tensor_infos.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["direction.2", "direction.5"], "layer 0 is left out");
        for info in content.tensor_infos.values() {
            assert_eq!(info.ggml_dtype, GgmlDType::F32);
            assert_eq!(info.shape.dims(), [4]);
        }
    }

    #[test]
    fn rejects_bad_files() {
        let d = defaults_for("x", "m", "import");
        assert!(decode(b"{\"layers\": {\"a\": [1.0]}}", VectorFormat::Json, &d).is_err());
        assert!(decode(b"{\"layers\": {}}", VectorFormat::Json, &d).is_err());
        assert!(decode(
            b"{\"layers\": {\"1\": [1.0]}, \"extra\": 1}",
            VectorFormat::Json,
            &d
        )
        .is_err());
        assert!(decode(b"GGUF-not-really", VectorFormat::Gguf, &d).is_err());
        assert!(decode(
            b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
            VectorFormat::Safetensors,
            &d
        )
        .is_err());
    }
}
