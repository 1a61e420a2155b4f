//! The vectors a server knows by name, persisted in a directory as one safetensors file each,
//! or in PostgreSQL when replicas share them ([`postgres`], `store.url`).
//!
//! Built-in vectors (`config/vectors/`) are loaded read-only at start. Stored vectors live in
//! `vectors.dir` (the folder store); writes are atomic (temporary file, fsync, rename, fsync of the directory), so
//! a process killed mid-write leaves the old version or the new one, never a broken file. At
//! start a broken or foreign file is reported and skipped, never fatal. Every version has an
//! ETag; `If-Match` gives compare-and-set. Requests hold `Arc`s to the data, so one in flight
//! keeps the version it was admitted with whatever happens to the name afterwards.

mod copy;
pub mod postgres;
pub mod schema;

use super::vector::{SteeringVector, VectorDefaults, VectorKind};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// Where a stored vector came from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
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
    /// The HTTP entity tag of this version.
    pub etag: String,
}

/// The model a store serves: vectors must match it.
#[derive(Debug, Clone)]
pub struct ModelShape {
    pub model_id: String,
    pub d_model: usize,
    pub n_neurons: usize,
    /// Width of `attn_head` (`n_heads * head_dim`).
    pub head_width: usize,
}

impl ModelShape {
    /// Why `v` cannot be used with this model, if it cannot.
    pub fn mismatch(&self, v: &SteeringVector) -> Option<String> {
        if self.made_for_another_model(v) {
            return Some(format!(
                "vector `{}` was made for model `{}`, this server runs `{}`",
                v.name, v.meta.model, self.model_id
            ));
        }
        let width = match v.meta.kind {
            VectorKind::Direction => self.d_model,
            VectorKind::NeuronMeans => self.n_neurons,
            VectorKind::HeadDirection | VectorKind::HeadMeans => self.head_width,
        };
        if v.meta.d_model != width {
            return Some(format!(
                "vector `{}` has width {} but this model's {} width is {width}",
                v.name,
                v.meta.d_model,
                v.meta.kind.as_str()
            ));
        }
        None
    }

    /// Whether `v` names a model, and not this one.
    pub fn made_for_another_model(&self, v: &SteeringVector) -> bool {
        !v.meta.model.is_empty() && v.meta.model != self.model_id
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid vector name `{0}`: use 1-64 characters from a-z, 0-9, `_`, `.` and `-`")]
    InvalidName(String),
    #[error("`{0}` is a built-in vector and cannot be changed; store yours under another name")]
    ReadOnly(String),
    #[error("no vector named `{0}`")]
    NotFound(String),
    #[error("version mismatch: the current version of `{name}` is {current}")]
    VersionMismatch { name: String, current: String },
    #[error("{0}")]
    ModelMismatch(String),
    #[error("{0}")]
    Invalid(String),
    #[error("storage failure: {0}")]
    Io(#[from] std::io::Error),
    /// The shared store (PostgreSQL) cannot be reached; the local copy still serves.
    #[error("{0}")]
    Unavailable(String),
}

/// Checks a vector name: `[a-z0-9_.-]{1,64}`, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

/// What a compare-and-set write requires of the current version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Precondition {
    /// `If-Match`: one of these ETags (or `*`: any existing version).
    pub if_match: Option<Vec<String>>,
    /// `If-None-Match: *`: only if the name is free.
    pub if_none_match_any: bool,
}

impl Precondition {
    /// Checks the precondition against the current version's ETag (`None`: no such vector).
    fn check(&self, name: &str, current: Option<&str>) -> Result<(), StoreError> {
        let mismatch = || StoreError::VersionMismatch {
            name: name.to_string(),
            current: current.map_or_else(|| "none (it does not exist)".to_string(), str::to_string),
        };
        if self.if_none_match_any && current.is_some() {
            return Err(mismatch());
        }
        if let Some(tags) = &self.if_match {
            let ok = match current {
                None => false,
                Some(etag) => tags.iter().any(|t| t == "*" || t == etag),
            };
            if !ok {
                return Err(mismatch());
            }
        }
        Ok(())
    }
}

/// Named vectors, shared by all requests.
#[derive(Debug)]
pub struct VectorStore {
    shape: ModelShape,
    /// Where stored vectors are written; `None` keeps them in memory only.
    dir: Option<PathBuf>,
    entries: RwLock<BTreeMap<String, StoreEntry>>,
    /// Serializes writes so that compare-and-set is atomic with the file operations.
    writer: Mutex<()>,
    /// The database this store is a copy of, when replicas share one.
    shared: OnceLock<Arc<postgres::Shared>>,
    /// The database version last applied per name (tombstones included), so a late or repeated
    /// change notice never replaces a newer copy.
    remote_versions: Mutex<HashMap<String, u64>>,
}

/// The store's backend and the state of its link, for `/health`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct StoreHealth {
    /// `folder`, `memory` or `postgres`.
    #[schema(example = "postgres")]
    pub backend: String,
    /// `ok`, or `degraded` while the database cannot be reached (generation goes on with the
    /// local copy; writes answer 503).
    #[schema(example = "ok")]
    pub status: String,
    /// Why the store is degraded.
    #[schema(example = "the vector database cannot be reached (connection refused)")]
    pub message: Option<String>,
    /// Seconds since the local copy was last resynced in full with the database.
    #[schema(example = 12)]
    pub synced_secs_ago: Option<u64>,
}

fn etag_of(bytes: &[u8], version: u64) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(bytes);
    format!(
        "\"v{version}-{:02x}{:02x}{:02x}{:02x}\"",
        h[0], h[1], h[2], h[3]
    )
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// `config/vectors` compiled in (path below it, bytes): the built-ins of a server started from
/// another folder. The folder stays the source they are built from; a test checks the two
/// list the same files.
const EMBEDDED_BUILTINS: [(&str, &[u8]); 6] = [
    (
        "golden_gate.safetensors",
        include_bytes!("../../../config/vectors/golden_gate.safetensors"),
    ),
    (
        "head_means_default.safetensors",
        include_bytes!("../../../config/vectors/head_means_default.safetensors"),
    ),
    (
        "neuron_means_default.safetensors",
        include_bytes!("../../../config/vectors/neuron_means_default.safetensors"),
    ),
    (
        "refusal.safetensors",
        include_bytes!("../../../config/vectors/refusal.safetensors"),
    ),
    (
        "sycophancy.safetensors",
        include_bytes!("../../../config/vectors/sycophancy.safetensors"),
    ),
    (
        "gemma3-270m/golden_gate.safetensors",
        include_bytes!("../../../config/vectors/gemma3-270m/golden_gate.safetensors"),
    ),
];

/// Writes `bytes` to `path` so that `path` holds either its old content or all of the new one,
/// even if the process dies at any point: temporary file, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    let _ = dir;
    Ok(())
}

impl VectorStore {
    /// A store writing to `dir` (created if missing), with the vectors already there loaded.
    /// Returns the store and one line per file skipped.
    pub fn open(shape: ModelShape, dir: Option<&Path>) -> std::io::Result<(Self, Vec<String>)> {
        let store = Self {
            dir: dir.map(Path::to_path_buf),
            ..Self::in_memory(shape)
        };
        let mut skipped = Vec::new();
        if let Some(d) = dir {
            std::fs::create_dir_all(d)?;
            // Temporary files of writes that never finished.
            for e in std::fs::read_dir(d)?.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with('.') && n.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            skipped = store.load_dir(d, VectorOrigin::Stored);
        }
        Ok((store, skipped))
    }

    /// A store that keeps vectors in memory only.
    pub fn in_memory(shape: ModelShape) -> Self {
        Self {
            shape,
            dir: None,
            entries: RwLock::new(BTreeMap::new()),
            writer: Mutex::new(()),
            shared: OnceLock::new(),
            remote_versions: Mutex::new(HashMap::new()),
        }
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Loads the built-in vectors of `dir` and of its subfolders (one per model, e.g.
    /// `gemma3-270m/`), read-only; when `dir` does not exist (a server started from another
    /// folder), the copies of `config/vectors` compiled into the binary. A vector made for
    /// another model is passed over quietly: built-in folders ship vectors for several models.
    /// Returns one line per file skipped for any other reason.
    pub fn load_builtin_dir(&self, dir: &Path) -> Vec<String> {
        if !dir.is_dir() {
            return EMBEDDED_BUILTINS
                .iter()
                .filter_map(|(file, bytes)| {
                    let label = format!("(built in) {file}");
                    self.load_file(&label, file, bytes.to_vec(), VectorOrigin::Builtin)
                })
                .collect();
        }
        let mut folders = vec![dir.to_path_buf()];
        if let Ok(read) = std::fs::read_dir(dir) {
            let mut subs: Vec<_> = read
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            subs.sort();
            folders.extend(subs);
        }
        folders
            .iter()
            .flat_map(|f| self.load_dir(f, VectorOrigin::Builtin))
            .collect()
    }

    fn load_dir(&self, dir: &Path, origin: VectorOrigin) -> Vec<String> {
        let Ok(read) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut paths: Vec<_> = read
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        paths
            .iter()
            .filter_map(|path| {
                let label = path.display().to_string();
                match std::fs::read(path) {
                    Ok(bytes) => self.load_file(&label, &path.to_string_lossy(), bytes, origin),
                    Err(e) => Some(format!("{label}: {e}")),
                }
            })
            .collect()
    }

    /// Loads one `.safetensors` vector file (`file` names it, `label` is for messages); the
    /// reason it was skipped, if it was.
    fn load_file(
        &self,
        label: &str,
        file: &str,
        bytes: Vec<u8>,
        origin: VectorOrigin,
    ) -> Option<String> {
        let name = Path::new(file)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !valid_name(&name) {
            return Some(format!("{label}: `{name}` is not a valid vector name"));
        }
        let defaults = VectorDefaults {
            name: Some(name.clone()),
            ..Default::default()
        };
        let v = match SteeringVector::from_safetensors(&bytes, &defaults) {
            Ok(v) => v,
            Err(e) => return Some(format!("{label}: {e:#}")),
        };
        if origin == VectorOrigin::Builtin && self.shape.made_for_another_model(&v) {
            tracing::debug!(file = label, model = %v.meta.model, "built-in vector for another model");
            return None;
        }
        if let Some(why) = self.shape.mismatch(&v) {
            return Some(format!("{label}: {why}"));
        }
        let shadows_builtin = self
            .get(&name)
            .is_some_and(|e| e.origin == VectorOrigin::Builtin);
        if origin == VectorOrigin::Stored && shadows_builtin {
            return Some(format!(
                "{label}: `{name}` is the name of a built-in vector"
            ));
        }
        let etag = etag_of(&bytes, v.meta.version);
        self.insert_entry(StoreEntry {
            vector: Arc::new(v),
            origin,
            etag,
        });
        None
    }

    fn insert_entry(&self, e: StoreEntry) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.insert(e.vector.name.clone(), e);
    }

    /// Inserts a vector without persisting it (built-ins and tests).
    pub fn insert(&self, v: SteeringVector, origin: VectorOrigin) {
        let etag = etag_of(&v.to_safetensors().unwrap_or_default(), v.meta.version);
        self.insert_entry(StoreEntry {
            vector: Arc::new(v),
            origin,
            etag,
        });
    }

    /// Writes a new version of `v.name` (version = previous + 1), checking the name, the model
    /// and the precondition. Returns the stored entry and whether the name was new.
    pub fn put(
        &self,
        v: SteeringVector,
        pre: &Precondition,
    ) -> Result<(StoreEntry, bool), StoreError> {
        let mut v = self.prepare(v)?;
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.get(&v.name);
        pre.check(&v.name, current.as_ref().map(|e| e.etag.as_str()))?;
        v.meta.version = current.as_ref().map_or(1, |e| e.vector.meta.version + 1);
        let bytes = v
            .to_safetensors()
            .map_err(|e| StoreError::Invalid(format!("{e:#}")))?;
        if let Some(dir) = &self.dir {
            write_atomic(&dir.join(format!("{}.safetensors", v.name)), &bytes)?;
        }
        let entry = StoreEntry {
            etag: etag_of(&bytes, v.meta.version),
            vector: Arc::new(v),
            origin: VectorOrigin::Stored,
        };
        self.insert_entry(entry.clone());
        Ok((entry, current.is_none()))
    }

    /// Checks a vector to be written: its name, its values, the model (filled in when the
    /// vector names none) and that the name is not a built-in's.
    fn prepare(&self, mut v: SteeringVector) -> Result<SteeringVector, StoreError> {
        if !valid_name(&v.name) {
            return Err(StoreError::InvalidName(v.name));
        }
        if v.meta.model.is_empty() {
            v.meta.model = self.shape.model_id.clone();
        }
        v.validate()
            .map_err(|e| StoreError::Invalid(format!("{e:#}")))?;
        if let Some(why) = self.shape.mismatch(&v) {
            return Err(StoreError::ModelMismatch(why));
        }
        for (field, text) in [
            ("description", &v.meta.description),
            ("method", &v.meta.method),
        ] {
            if text.contains('\0') {
                return Err(StoreError::Invalid(format!(
                    "`{field}` contains a NUL character"
                )));
            }
        }
        self.refuse_builtin(&v.name)?;
        Ok(v)
    }

    fn refuse_builtin(&self, name: &str) -> Result<(), StoreError> {
        match self.get(name) {
            Some(e) if e.origin == VectorOrigin::Builtin => {
                Err(StoreError::ReadOnly(name.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Deletes a stored vector, checking the precondition.
    pub fn delete(&self, name: &str, pre: &Precondition) -> Result<(), StoreError> {
        self.refuse_builtin(name)?;
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self
            .get(name)
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        pre.check(name, Some(&current.etag))?;
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{name}.safetensors"));
            match std::fs::remove_file(&path) {
                Ok(()) => sync_dir(dir)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.remove(name);
        Ok(())
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

#[cfg(test)]
mod tests {

    /// The compiled-in built-ins are the files of `config/vectors`, and a store opened where
    /// that folder is absent gets each model its own.
    #[test]
    fn builtins_are_compiled_in_for_servers_started_elsewhere() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/vectors");
        let mut on_disk = Vec::new();
        for dir in [root.clone(), root.join("gemma3-270m")] {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "safetensors") {
                    on_disk.push(p.strip_prefix(&root).unwrap().display().to_string());
                }
            }
        }
        let mut embedded: Vec<String> = EMBEDDED_BUILTINS
            .iter()
            .map(|(f, _)| f.to_string())
            .collect();
        on_disk.sort();
        embedded.sort();
        assert_eq!(embedded, on_disk);
        let names = |model_id: &str, d_model: usize, n_neurons: usize| {
            let shape = ModelShape {
                model_id: model_id.into(),
                d_model,
                n_neurons,
                head_width: d_model,
            };
            let (store, _) = VectorStore::open(shape, None).unwrap();
            assert!(store
                .load_builtin_dir(Path::new("/nonexistent/vectors"))
                .is_empty());
            store.names()
        };
        let smollm = names("SmolLM2-135M-Instruct.Q4_1", 576, 1536);
        for v in [
            "golden_gate",
            "head_means_default",
            "neuron_means_default",
            "refusal",
            "sycophancy",
        ] {
            assert!(smollm.iter().any(|n| n == v), "{v} in {smollm:?}");
        }
        assert_eq!(names("gemma-3-270m-q4_k_m", 640, 2048), ["golden_gate"]);
    }

    use super::*;
    use crate::steering::vector::VectorMeta;

    fn shape() -> ModelShape {
        ModelShape {
            model_id: "m".into(),
            d_model: 3,
            n_neurons: 5,
            head_width: 4,
        }
    }

    fn vector(name: &str, value: f32) -> SteeringVector {
        SteeringVector {
            name: name.into(),
            meta: VectorMeta {
                model: String::new(),
                d_model: 3,
                kind: VectorKind::Direction,
                method: "manual".into(),
                description: String::new(),
                created: "2026-01-01T00:00:00Z".into(),
                version: 0,
            },
            layers: [(1, Arc::from(vec![value; 3]))].into_iter().collect(),
        }
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "golden_gate", "v1.2-x", &"a".repeat(64)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "A",
            "a b",
            "../x",
            ".hidden",
            "é",
            &"a".repeat(65),
            "a/b",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn put_versions_compare_and_set_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let (store, skipped) = VectorStore::open(shape(), Some(dir.path())).unwrap();
        assert!(skipped.is_empty());
        let (e1, created) = store
            .put(vector("x", 1.0), &Precondition::default())
            .unwrap();
        assert!(created);
        assert_eq!(e1.vector.meta.version, 1);
        assert_eq!(e1.vector.meta.model, "m");
        let stale = Precondition {
            if_match: Some(vec!["\"v0-00000000\"".into()]),
            ..Default::default()
        };
        assert!(matches!(
            store.put(vector("x", 2.0), &stale),
            Err(StoreError::VersionMismatch { .. })
        ));
        let fresh = Precondition {
            if_match: Some(vec![e1.etag.clone()]),
            ..Default::default()
        };
        let (e2, created) = store.put(vector("x", 2.0), &fresh).unwrap();
        assert!(!created);
        assert_eq!(e2.vector.meta.version, 2);
        assert_ne!(e1.etag, e2.etag);
        let create_only = Precondition {
            if_none_match_any: true,
            ..Default::default()
        };
        assert!(store.put(vector("x", 3.0), &create_only).is_err());
        // A new store on the same folder sees version 2.
        let (again, _) = VectorStore::open(shape(), Some(dir.path())).unwrap();
        let got = again.get("x").unwrap();
        assert_eq!(got.vector.meta.version, 2);
        assert_eq!(got.etag, e2.etag);
        assert_eq!(got.vector.layers[&1][0], 2.0);
        store.delete("x", &Precondition::default()).unwrap();
        assert!(store.get("x").is_none());
        assert!(VectorStore::open(shape(), Some(dir.path()))
            .unwrap()
            .0
            .get("x")
            .is_none());
    }

    #[test]
    fn refuses_foreign_vectors_and_skips_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = VectorStore::open(shape(), Some(dir.path())).unwrap();
        let mut other = vector("y", 1.0);
        other.meta.model = "another".into();
        assert!(matches!(
            store.put(other, &Precondition::default()),
            Err(StoreError::ModelMismatch(_))
        ));
        let mut wide = vector("z", 1.0);
        wide.meta.d_model = 4;
        wide.layers.insert(1, Arc::from(vec![1.0; 4]));
        assert!(store.put(wide, &Precondition::default()).is_err());
        std::fs::write(dir.path().join("broken.safetensors"), b"garbage").unwrap();
        std::fs::write(dir.path().join(".half.safetensors.1.2.tmp"), b"partial").unwrap();
        let (_, skipped) = VectorStore::open(shape(), Some(dir.path())).unwrap();
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("broken.safetensors"));
        assert!(!dir.path().join(".half.safetensors.1.2.tmp").exists());
    }

    #[test]
    fn builtins_are_read_only() {
        let store = VectorStore::in_memory(shape());
        store.insert(vector("b", 1.0), VectorOrigin::Builtin);
        assert!(matches!(
            store.put(vector("b", 2.0), &Precondition::default()),
            Err(StoreError::ReadOnly(_))
        ));
        assert!(matches!(
            store.delete("b", &Precondition::default()),
            Err(StoreError::ReadOnly(_))
        ));
    }
}
