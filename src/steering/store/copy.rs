//! A [`VectorStore`] as the local copy of a shared database: writes and deletes go through
//! the database when one is attached ([`VectorStore::write`], [`VectorStore::remove`]), a name
//! the copy lacks is looked up there before it is called unknown ([`VectorStore::lookup`]),
//! and the rows the database announces are applied newest-wins.

use super::postgres::Shared;
use super::{
    valid_name, Precondition, StoreEntry, StoreError, StoreHealth, VectorOrigin, VectorStore,
};
use crate::steering::vector::{SteeringVector, VectorDefaults};
use std::sync::Arc;

impl VectorStore {
    /// Makes this store a copy of `shared` (once; later calls are ignored). Vectors stored in
    /// the folder are not read: the database holds them (`tiller vectors migrate`).
    pub fn attach(&self, shared: Arc<Shared>) {
        let _ = self.shared.set(shared);
    }

    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.get()
    }

    /// Writes a new version of `v.name`: in the database when one is attached (one
    /// transaction, compare-and-set on the database's row), else in the folder.
    pub async fn write(
        &self,
        v: SteeringVector,
        pre: &Precondition,
    ) -> Result<(StoreEntry, bool), StoreError> {
        let Some(shared) = self.shared.get() else {
            return self.put(v, pre);
        };
        let v = self.prepare(v)?;
        let (entry, created) = shared.put(v, pre).await?;
        let name = entry.vector.name.clone();
        let version = entry.vector.meta.version;
        self.apply_version(&name, version, Some(entry.clone()), false);
        Ok((entry, created))
    }

    /// Deletes a stored vector, in the database when one is attached.
    pub async fn remove(&self, name: &str, pre: &Precondition) -> Result<(), StoreError> {
        let Some(shared) = self.shared.get() else {
            return self.delete(name, pre);
        };
        self.refuse_builtin(name)?;
        let version = shared.delete(name, pre).await?;
        self.apply_version(name, version, None, false);
        Ok(())
    }

    /// The vector named `name`; when the local copy lacks it and a database is attached, the
    /// database is asked first (a vector just written through another replica). Fails only
    /// when the database had to be asked and could not be.
    pub async fn lookup(&self, name: &str) -> Result<Option<StoreEntry>, StoreError> {
        self.lookup_many(&[name]).await?;
        Ok(self.get(name))
    }

    /// Makes sure the copy holds every vector of `names` the database has: the ones it lacks
    /// are asked for in one query (nothing when all are known, or no database is attached).
    pub async fn lookup_many(&self, names: &[&str]) -> Result<(), StoreError> {
        let Some(shared) = self.shared.get() else {
            return Ok(());
        };
        let mut missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| valid_name(n) && self.get(n).is_none())
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        shared.fetch(self, &missing).await
    }

    /// The database versions applied so far, by name (what a resync compares against).
    pub fn versions_snapshot(&self) -> super::postgres::VersionSnapshot {
        self.remote_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The database version last applied for `name` (0: none).
    pub fn known_version(&self, name: &str) -> u64 {
        let versions = self
            .remote_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        versions.get(name).copied().unwrap_or(0)
    }

    /// Applies a row of the database (`None`: deleted) unless the copy already holds this
    /// version or a newer one.
    pub fn apply_remote(&self, name: &str, version: u64, row: Option<(Vec<u8>, String)>) {
        let entry = row.and_then(|(bytes, etag)| self.decode_row(name, &bytes, etag));
        self.apply_version(name, version, entry, false);
    }

    /// Applies a row of the database whatever the copy holds (a full resync: the database is
    /// the truth, and any newer change is announced after it).
    pub fn force_remote(&self, name: &str, version: u64, row: Option<(Vec<u8>, String)>) {
        let entry = row.and_then(|(bytes, etag)| self.decode_row(name, &bytes, etag));
        self.apply_version(name, version, entry, true);
    }

    /// Drops the stored (not built-in) vectors for which `keep(name, known version)` is
    /// false, and what the copy knew of their versions.
    pub fn retain_stored(&self, keep: impl Fn(&str, u64) -> bool) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let mut versions = self
            .remote_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        entries.retain(|name, e| {
            let known = versions.get(name).copied().unwrap_or(0);
            let kept = e.origin == VectorOrigin::Builtin || keep(name, known);
            if !kept {
                versions.remove(name);
            }
            kept
        });
    }

    fn apply_version(&self, name: &str, version: u64, entry: Option<StoreEntry>, force: bool) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let mut versions = self
            .remote_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let known = versions.get(name).copied().unwrap_or(0);
        if !force && version <= known {
            return;
        }
        if entries
            .get(name)
            .is_some_and(|e| e.origin == VectorOrigin::Builtin)
        {
            return;
        }
        versions.insert(name.to_string(), version);
        match entry {
            Some(e) => entries.insert(name.to_string(), e),
            None => entries.remove(name),
        };
    }

    /// A database row as an entry, or `None` (logged) when it does not fit this model.
    fn decode_row(&self, name: &str, bytes: &[u8], etag: String) -> Option<StoreEntry> {
        let defaults = VectorDefaults {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let v = match SteeringVector::from_safetensors(bytes, &defaults) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(name, error = %format!("{e:#}"), "unreadable vector in the database");
                return None;
            }
        };
        if let Some(why) = self.shape.mismatch(&v) {
            tracing::warn!(name, "vector in the database skipped: {why}");
            return None;
        }
        Some(StoreEntry {
            vector: Arc::new(v),
            origin: VectorOrigin::Stored,
            etag,
        })
    }

    /// The backend and, for a database, whether it is reachable.
    pub fn health(&self) -> StoreHealth {
        let Some(shared) = self.shared.get() else {
            return StoreHealth {
                backend: if self.dir.is_some() {
                    "folder"
                } else {
                    "memory"
                }
                .into(),
                status: "ok".into(),
                message: None,
                synced_secs_ago: None,
            };
        };
        let link = shared.link_state();
        StoreHealth {
            backend: "postgres".into(),
            status: if link.connected { "ok" } else { "degraded" }.into(),
            message: (!link.connected).then(|| {
                link.last_error
                    .unwrap_or_else(|| "not connected to the vector database yet".into())
            }),
            synced_secs_ago: link.synced_at.map(|t| t.elapsed().as_secs()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ModelShape;
    use super::*;
    use crate::steering::vector::{VectorKind, VectorMeta};

    fn store() -> VectorStore {
        VectorStore::in_memory(ModelShape {
            model_id: "m".into(),
            d_model: 3,
            n_neurons: 5,
            head_width: 4,
        })
    }

    /// A row as the database holds it: the safetensors bytes of a direction of width `width`.
    fn row(value: f32, version: u64, width: usize) -> (Vec<u8>, String) {
        let v = SteeringVector {
            name: "x".into(),
            meta: VectorMeta {
                model: "m".into(),
                d_model: width,
                kind: VectorKind::Direction,
                method: "manual".into(),
                description: String::new(),
                created: "2026-01-01T00:00:00Z".into(),
                version,
            },
            layers: [(1, Arc::from(vec![value; width]))].into_iter().collect(),
        };
        (v.to_safetensors().unwrap(), format!("\"v{version}\""))
    }

    fn value_of(s: &VectorStore, name: &str) -> Option<f32> {
        s.get(name).map(|e| e.vector.layers[&1][0])
    }

    #[test]
    fn changes_apply_newest_wins_and_tombstones_delete() {
        let s = store();
        s.apply_remote("x", 2, Some(row(2.0, 2, 3)));
        assert_eq!(value_of(&s, "x"), Some(2.0));
        assert_eq!(s.get("x").unwrap().etag, "\"v2\"");
        // A late notice of an older version, or the same one again, changes nothing.
        s.apply_remote("x", 1, Some(row(1.0, 1, 3)));
        s.apply_remote("x", 2, Some(row(9.0, 2, 3)));
        assert_eq!(value_of(&s, "x"), Some(2.0));
        assert_eq!(s.known_version("x"), 2);
        // A tombstone deletes, and an older row cannot bring the name back.
        s.apply_remote("x", 3, None);
        assert!(s.get("x").is_none());
        s.apply_remote("x", 2, Some(row(2.0, 2, 3)));
        assert!(s.get("x").is_none());
        s.apply_remote("x", 4, Some(row(4.0, 4, 3)));
        assert_eq!(value_of(&s, "x"), Some(4.0));
        // A full resync is the truth even when it is older (a database restored from backup).
        s.force_remote("x", 1, Some(row(1.0, 1, 3)));
        assert_eq!(value_of(&s, "x"), Some(1.0));
        assert_eq!(s.known_version("x"), 1);
    }

    #[test]
    fn rows_that_do_not_fit_and_builtin_names_are_left_alone() {
        let s = store();
        s.apply_remote("wide", 1, Some(row(1.0, 1, 4)));
        assert!(s.get("wide").is_none(), "a row of another width is skipped");
        s.apply_remote(
            "junk",
            1,
            Some((b"not safetensors".to_vec(), "\"e\"".into())),
        );
        assert!(s.get("junk").is_none());
        let (bytes, _) = row(5.0, 1, 3);
        let defaults = VectorDefaults {
            name: Some("b".into()),
            ..Default::default()
        };
        let builtin = SteeringVector::from_safetensors(&bytes, &defaults).unwrap();
        s.insert(builtin, VectorOrigin::Builtin);
        s.apply_remote("b", 7, Some(row(7.0, 7, 3)));
        s.apply_remote("b", 8, None);
        assert_eq!(value_of(&s, "b"), Some(5.0));
        assert_eq!(s.get("b").unwrap().origin, VectorOrigin::Builtin);
    }

    #[test]
    fn a_resync_drops_what_the_database_no_longer_holds() {
        let s = store();
        s.apply_remote("keep", 1, Some(row(1.0, 1, 3)));
        s.apply_remote("gone", 5, Some(row(1.0, 5, 3)));
        s.retain_stored(|name, _| name == "keep");
        assert!(s.get("keep").is_some());
        assert!(s.get("gone").is_none());
        // Forgotten, so a later row of any version is taken.
        assert_eq!(s.known_version("gone"), 0);
        s.apply_remote("gone", 1, Some(row(3.0, 1, 3)));
        assert_eq!(value_of(&s, "gone"), Some(3.0));
    }

    #[test]
    fn health_names_the_backend() {
        assert_eq!(store().health().backend, "memory");
        let shared = Arc::new(Shared::new(
            "postgres://u@127.0.0.1:1/db".parse().unwrap(),
            "m".into(),
            std::time::Duration::from_secs(1),
        ));
        let s = store();
        s.attach(shared);
        let h = s.health();
        assert_eq!(
            (h.backend.as_str(), h.status.as_str()),
            ("postgres", "degraded")
        );
        assert!(h.message.is_some());
    }
}
