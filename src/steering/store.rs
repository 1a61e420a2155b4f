//! The vectors a server knows by name. Built-in vectors (`config/vectors/`) are loaded
//! read-only at start; a file that cannot be read, or was made for another model, is reported
//! and skipped, never fatal.

use super::vector::{SteeringVector, VectorDefaults, VectorKind};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// Where a stored vector came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VectorOrigin {
    /// Shipped in `config/vectors/`; read-only.
    Builtin,
    /// Written through the API or CLI.
    Stored,
}

#[derive(Debug, Clone)]
pub struct StoreEntry {
    pub vector: Arc<SteeringVector>,
    pub origin: VectorOrigin,
}

/// The model a store serves: vectors must match it.
#[derive(Debug, Clone)]
pub struct ModelShape {
    pub model_id: String,
    pub d_model: usize,
    pub n_neurons: usize,
}

impl ModelShape {
    /// Why `v` cannot be used with this model, if it cannot.
    pub fn mismatch(&self, v: &SteeringVector) -> Option<String> {
        let width = match v.meta.kind {
            VectorKind::Direction => self.d_model,
            VectorKind::NeuronMeans => self.n_neurons,
        };
        if v.meta.d_model != width {
            return Some(format!(
                "vector `{}` has width {} but this model's {} width is {width}",
                v.name,
                v.meta.d_model,
                v.meta.kind.as_str()
            ));
        }
        if !v.meta.model.is_empty() && v.meta.model != self.model_id {
            return Some(format!(
                "vector `{}` was made for model `{}`, this server runs `{}`",
                v.name, v.meta.model, self.model_id
            ));
        }
        None
    }
}

/// Named vectors, shared by all requests.
#[derive(Debug)]
pub struct VectorStore {
    shape: ModelShape,
    entries: RwLock<BTreeMap<String, StoreEntry>>,
}

impl VectorStore {
    pub fn new(shape: ModelShape) -> Self {
        Self {
            shape,
            entries: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// Loads every `*.safetensors` in `dir` as a read-only vector named after its file.
    /// Returns one line per file skipped.
    pub fn load_builtin_dir(&self, dir: &Path) -> Vec<String> {
        let mut skipped = Vec::new();
        let Ok(read) = std::fs::read_dir(dir) else {
            return skipped;
        };
        let mut paths: Vec<_> = read
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        for path in paths {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let loaded = std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|bytes| {
                    SteeringVector::from_safetensors(
                        &bytes,
                        &VectorDefaults {
                            name: Some(name.clone()),
                            ..Default::default()
                        },
                    )
                });
            match loaded {
                Ok(v) => match self.shape.mismatch(&v) {
                    Some(why) => skipped.push(format!("{}: {why}", path.display())),
                    None => self.insert(v, VectorOrigin::Builtin),
                },
                Err(e) => skipped.push(format!("{}: {e:#}", path.display())),
            }
        }
        skipped
    }

    pub fn insert(&self, v: SteeringVector, origin: VectorOrigin) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.insert(
            v.name.clone(),
            StoreEntry {
                vector: Arc::new(v),
                origin,
            },
        );
    }

    pub fn get(&self, name: &str) -> Option<StoreEntry> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries.get(name).cloned()
    }

    pub fn list(&self) -> Vec<StoreEntry> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries.values().cloned().collect()
    }

    /// Names of all vectors, for error messages.
    pub fn names(&self) -> Vec<String> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries.keys().cloned().collect()
    }
}
