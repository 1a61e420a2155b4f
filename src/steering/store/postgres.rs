//! The vector store in PostgreSQL (`store.url`), shared by replicas of one model.
//!
//! The database is the source of truth; every replica keeps a local copy in its
//! [`VectorStore`], so a forward pass never waits on the database. One table holds one row per
//! (namespace, name): the safetensors bytes, the version (a column), the ETag and the metadata
//! ([`schema`](super::schema)). A delete leaves a tombstone row, so versions only grow and an
//! old ETag can never match a later vector of the same name.
//!
//! - **Writes** run in one transaction that takes a per-name advisory lock, compares the
//!   precondition with the row, writes the new version and `NOTIFY`s the change: two replicas
//!   writing with the same ETag give one success and one version mismatch.
//! - **Replicas in step**: a listener connection `LISTEN`s for changes and fetches each changed
//!   row; it pings the database every [`PING`] and resyncs in full after every (re)connect and
//!   every [`RESYNC`], so a change missed while it was away is not lost for long. Names a
//!   request needs and the copy lacks are looked up before the request is refused
//!   (read-your-writes through a load balancer).
//! - **Faults**: every call a request waits on is bounded by `store.timeout_secs` (and the
//!   server bounds its statements, lock waits and idle transactions the same); while the
//!   database is unreachable the copy keeps serving, writes fail with
//!   [`StoreError::Unavailable`], and the listener reconnects by itself.

use super::schema::{self, classify, unavailable, Change, CHANNEL};
use super::{etag_of, Precondition, StoreEntry, StoreError, VectorOrigin, VectorStore};
use crate::steering::vector::SteeringVector;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// How often the listener checks that the database still answers.
pub const PING: Duration = Duration::from_secs(2);

/// How often the listener resyncs in full although no reconnect happened (a backstop).
pub const RESYNC: Duration = Duration::from_secs(30);

/// Lookups of unknown names running at once per replica (more wait their turn).
const MAX_LOOKUPS: usize = 8;

/// What a replica knows of its database link, for `/health` and the metrics.
#[derive(Debug, Clone, Default)]
pub struct LinkState {
    pub connected: bool,
    /// Why the last connection or query failed (no detail: `/health` is public).
    pub last_error: Option<String>,
    /// When the copy was last resynced in full.
    pub synced_at: Option<Instant>,
}

/// The shared half of a [`VectorStore`]: the database link.
pub struct Shared {
    config: tokio_postgres::Config,
    /// The rows this replica reads and writes (`store.namespace`, else the model id).
    namespace: String,
    /// Bounds every database operation a request waits on.
    timeout: Duration,
    /// Transactions (writes), one at a time per replica.
    writer: tokio::sync::Mutex<Option<Client>>,
    /// The listener's connection, also used for lookups; `None` while disconnected.
    reader: tokio::sync::RwLock<Option<Arc<Client>>>,
    lookups: tokio::sync::Semaphore,
    /// Told when a lookup timed out, so the listener reconnects rather than trusting a
    /// connection that no longer answers.
    suspect: tokio::sync::Notify,
    link: Mutex<LinkState>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("namespace", &self.namespace)
            .field("link", &self.link_state())
            .finish()
    }
}

/// Runs `f` within `limit`; a timeout is the database being unavailable.
async fn bounded<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| {
        tracing::warn!(
            secs = limit.as_secs_f64(),
            "vector database did not answer in time"
        );
        Err(unavailable())
    })
}

impl Shared {
    pub fn new(config: tokio_postgres::Config, namespace: String, timeout: Duration) -> Self {
        Self {
            config,
            namespace,
            timeout,
            writer: tokio::sync::Mutex::new(None),
            reader: tokio::sync::RwLock::new(None),
            lookups: tokio::sync::Semaphore::new(MAX_LOOKUPS),
            suspect: tokio::sync::Notify::new(),
            link: Mutex::new(LinkState::default()),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn link_state(&self) -> LinkState {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_link(&self, f: impl FnOnce(&mut LinkState)) {
        f(&mut self.link.lock().unwrap_or_else(|p| p.into_inner()));
    }

    async fn connect(
        &self,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        StoreError,
    > {
        bounded(self.timeout, async {
            self.config.connect(NoTls).await.map_err(|e| classify(&e))
        })
        .await
    }

    /// Writes a new version of `v` (already checked against the model) if `pre` holds for the
    /// row as the database has it, and announces it.
    pub async fn put(
        &self,
        mut v: SteeringVector,
        pre: &Precondition,
    ) -> Result<(StoreEntry, bool), StoreError> {
        let name = v.name.clone();
        let (etag, created) = self
            .write_tx(&name, async |tx| {
                let head = self.row_head(tx, &v.name).await?;
                let current = head.as_ref().filter(|h| !h.deleted);
                if let Err(e) = pre.check(&v.name, current.map(|h| h.etag.as_str())) {
                    return Ok(Err(e));
                }
                v.meta.version = head.as_ref().map_or(1, |h| h.version as u64 + 1);
                let Ok(bytes) = v.to_safetensors() else {
                    return Ok(Err(StoreError::Invalid(
                        "the vector cannot be encoded".into(),
                    )));
                };
                let etag = etag_of(&bytes, v.meta.version);
                if !schema::upsert(tx, &self.namespace, &v, &bytes, &etag).await? {
                    return Ok(Err(StoreError::VersionMismatch {
                        name: v.name.clone(),
                        current: "a newer one (written meanwhile)".into(),
                    }));
                }
                schema::announce(tx, &self.namespace, &v.name, v.meta.version).await?;
                Ok(Ok((etag, current.is_none())))
            })
            .await?;
        let entry = StoreEntry {
            vector: Arc::new(v),
            origin: VectorOrigin::Stored,
            etag,
        };
        Ok((entry, created))
    }

    /// Deletes `name` (leaving a tombstone with the next version) if `pre` holds; returns the
    /// tombstone's version.
    pub async fn delete(&self, name: &str, pre: &Precondition) -> Result<u64, StoreError> {
        self.write_tx(name, async |tx| {
            let Some(current) = self.row_head(tx, name).await?.filter(|h| !h.deleted) else {
                return Ok(Err(StoreError::NotFound(name.to_string())));
            };
            if let Err(e) = pre.check(name, Some(&current.etag)) {
                return Ok(Err(e));
            }
            let version = current.version + 1;
            tx.execute(
                "UPDATE tiller_vectors SET version = $3, etag = '', deleted = true,
                     data = ''::bytea, updated_at = now()
                 WHERE model = $1 AND name = $2",
                &[&self.namespace, &name, &version],
            )
            .await?;
            schema::announce(tx, &self.namespace, name, version as u64).await?;
            Ok(Ok(version as u64))
        })
        .await
    }

    /// Runs `body` in one transaction on the writer connection holding the lock of `name`,
    /// and commits when it succeeds; everything (waiting for this replica's other writes
    /// included) within `store.timeout_secs`.
    async fn write_tx<T>(
        &self,
        name: &str,
        body: impl AsyncFnOnce(
            &tokio_postgres::Transaction<'_>,
        ) -> Result<Result<T, StoreError>, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut committing = false;
        let outcome = tokio::time::timeout(self.timeout, async {
            let mut guard = self.writer.lock().await;
            let client = self.writer_client(&mut guard).await?;
            let result = async {
                let tx = client.transaction().await?;
                schema::lock_name(&tx, &self.namespace, name).await?;
                let value = match body(&tx).await? {
                    Ok(value) => value,
                    Err(e) => return Ok(Err(e)),
                };
                committing = true;
                tx.commit().await?;
                Ok(Ok(value))
            }
            .await;
            Self::settle(&mut guard, result)
        })
        .await;
        self.finish_write(outcome, committing, name)
    }

    /// The writer connection, (re)connected if it is missing or closed.
    async fn writer_client<'a>(
        &self,
        slot: &'a mut Option<Client>,
    ) -> Result<&'a mut Client, StoreError> {
        if slot.as_ref().is_none_or(Client::is_closed) {
            let (client, connection) = self.connect().await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "vector database writer connection ended");
                }
            });
            *slot = Some(client);
        }
        slot.as_mut().ok_or_else(unavailable)
    }

    /// A database error of a write's transaction as a store error; the connection is
    /// dropped when it may be broken, so the next write reconnects.
    fn settle<T>(
        slot: &mut Option<Client>,
        result: Result<Result<T, StoreError>, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(r) => r,
            Err(e) => {
                let err = classify(&e);
                if matches!(err, StoreError::Unavailable(_)) {
                    *slot = None;
                }
                Err(err)
            }
        }
    }

    /// A write's outcome: a timeout is the database being unavailable, and a failure once the
    /// commit was sent leaves the outcome unknown, which the client is told.
    fn finish_write<T>(
        &self,
        outcome: Result<Result<T, StoreError>, tokio::time::error::Elapsed>,
        committing: bool,
        name: &str,
    ) -> Result<T, StoreError> {
        let result = outcome.unwrap_or_else(|_| {
            tracing::warn!(name, "vector database write timed out");
            Err(unavailable())
        });
        match result {
            Err(StoreError::Unavailable(why)) if committing => {
                Err(StoreError::Unavailable(format!(
                    "{why} while the write was being committed: it may or may not have been \
                     written; GET /vectors/{name} shows which"
                )))
            }
            other => other,
        }
    }

    /// The row's version, ETag and whether it is a tombstone.
    async fn row_head(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        name: &str,
    ) -> Result<Option<RowHead>, tokio_postgres::Error> {
        let row = tx
            .query_opt(
                "SELECT version, etag, deleted FROM tiller_vectors WHERE model = $1 AND name = $2",
                &[&self.namespace, &name],
            )
            .await?;
        row.map(|r| {
            Ok(RowHead {
                name: name.to_string(),
                version: r.try_get(0)?,
                etag: r.try_get(1)?,
                deleted: r.try_get(2)?,
            })
        })
        .transpose()
    }

    /// Fetches these rows into the local copy in one query (the read-your-writes lookup, and
    /// the listener's reaction to a change).
    pub async fn fetch(&self, store: &VectorStore, names: &[&str]) -> Result<(), StoreError> {
        let _turn = bounded(self.timeout, async {
            self.lookups.acquire().await.map_err(|_| unavailable())
        })
        .await?;
        let client = self.reader.read().await.clone().ok_or_else(unavailable)?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let rows = bounded(self.timeout, async {
            client
                .query(
                    "SELECT name, version, etag, deleted, data FROM tiller_vectors
                     WHERE model = $1 AND name = ANY($2)",
                    &[&self.namespace, &names],
                )
                .await
                .map_err(|e| classify(&e))
        })
        .await
        .inspect_err(|_| self.suspect.notify_one())?;
        for r in rows {
            let row = FullRow::read(&r).map_err(|e| classify(&e))?;
            let (name, version) = (row.head.name.clone(), row.head.version as u64);
            store.apply_remote(&name, version, row.live());
        }
        Ok(())
    }

    /// Brings the local copy to the database's state: rows whose ETag differs are fetched
    /// (version, ETag and data read together), stored vectors the database does not hold are
    /// dropped unless they changed while the resync ran.
    async fn resync(&self, store: &VectorStore, client: &Client) -> Result<usize, StoreError> {
        let before = store.versions_snapshot();
        let heads = client
            .query(
                "SELECT name, version, etag, deleted FROM tiller_vectors WHERE model = $1",
                &[&self.namespace],
            )
            .await
            .map_err(|e| classify(&e))?
            .iter()
            .map(|r| {
                Ok(RowHead {
                    name: r.try_get(0)?,
                    version: r.try_get(1)?,
                    etag: r.try_get(2)?,
                    deleted: r.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(|e| classify(&e))?;
        let mut fetched = 0;
        for h in &heads {
            if h.deleted {
                store.apply_remote(&h.name, h.version as u64, None);
                continue;
            }
            if store.get(&h.name).is_some_and(|e| e.etag == h.etag) {
                continue;
            }
            let row = client
                .query_opt(
                    "SELECT name, version, etag, deleted, data FROM tiller_vectors
                     WHERE model = $1 AND name = $2",
                    &[&self.namespace, &h.name],
                )
                .await
                .map_err(|e| classify(&e))?;
            if let Some(r) = row {
                let row = FullRow::read(&r).map_err(|e| classify(&e))?;
                let (name, version) = (row.head.name.clone(), row.head.version as u64);
                store.force_remote(&name, version, row.live());
                fetched += 1;
            }
        }
        let live: std::collections::HashSet<&str> = heads
            .iter()
            .filter(|h| !h.deleted)
            .map(|h| h.name.as_str())
            .collect();
        store.retain_stored(|name, version| {
            live.contains(name) || before.get(name).copied().unwrap_or(0) != version
        });
        Ok(fetched)
    }

    /// Keeps the local copy in step for as long as the process runs: connect, migrate,
    /// `LISTEN`, resync, then apply every announced change, pinging and resyncing
    /// periodically; on any failure (a panic included) wait a second and start over.
    /// `first_sync` is told once the copy has been synced the first time.
    pub async fn follow(
        self: Arc<Self>,
        store: Arc<VectorStore>,
        first_sync: tokio::sync::oneshot::Sender<()>,
    ) {
        let first_sync = Arc::new(Mutex::new(Some(first_sync)));
        loop {
            let attempt = tokio::spawn({
                let (this, store, first_sync) = (self.clone(), store.clone(), first_sync.clone());
                async move { this.follow_once(&store, &first_sync).await }
            });
            let why = match attempt.await {
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(())) => "the connection was closed".to_string(),
                Err(e) => {
                    tracing::error!(error = %e, "vector database follower failed");
                    "the follower failed".to_string()
                }
            };
            let was_connected = self.link_state().connected;
            self.set_link(|l| {
                l.connected = false;
                l.last_error = Some(why.clone());
            });
            *self.reader.write().await = None;
            if was_connected {
                tracing::warn!(error = %why, "vector database lost; serving the local copy, retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn follow_once(
        &self,
        store: &VectorStore,
        first_sync: &Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    ) -> Result<(), StoreError> {
        let (mut client, mut connection) = self.connect().await?;
        let (events, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        let _ = events.send(Some(n.payload().to_string()));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        classify(&e);
                        break;
                    }
                }
            }
            let _ = events.send(None);
        });
        let _abort_driver = AbortOnDrop(driver);
        bounded(self.timeout, async {
            let applied = schema::migrate(&mut client)
                .await
                .map_err(|e| classify(&e))?;
            if !applied.is_empty() {
                tracing::info!(versions = ?applied, "vector database migrated");
            }
            let listen = format!("LISTEN {CHANNEL}");
            client
                .batch_execute(&listen)
                .await
                .map_err(|e| classify(&e))
        })
        .await?;
        let client = Arc::new(client);
        *self.reader.write().await = Some(client.clone());
        let fetched = bounded(self.timeout * 4, self.resync(store, &client)).await?;
        self.set_link(|l| {
            l.connected = true;
            l.last_error = None;
            l.synced_at = Some(Instant::now());
        });
        tracing::info!(fetched, vectors = store.names().len(), namespace = %self.namespace, "vector database in sync");
        if let Some(tx) = first_sync.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
        let mut ping = tokio::time::interval(PING);
        let mut resync = tokio::time::interval(RESYNC);
        resync.reset();
        loop {
            tokio::select! {
                event = changes.recv() => {
                    let Some(Some(payload)) = event else {
                        return Err(unavailable());
                    };
                    self.apply_change(store, &payload).await?;
                }
                _ = ping.tick() => {
                    bounded(self.timeout, async {
                        client.simple_query("SELECT 1").await.map_err(|e| classify(&e))
                    })
                    .await?;
                }
                _ = resync.tick() => {
                    bounded(self.timeout * 4, self.resync(store, &client)).await?;
                    self.set_link(|l| l.synced_at = Some(Instant::now()));
                }
                _ = self.suspect.notified() => {
                    return Err(StoreError::Unavailable("a lookup timed out".into()));
                }
            }
        }
    }

    /// Fetches the row a change notice names, unless the copy already has that version.
    async fn apply_change(&self, store: &VectorStore, payload: &str) -> Result<(), StoreError> {
        let Ok(change) = serde_json::from_str::<Change>(payload) else {
            tracing::warn!(payload, "unreadable vector change notice");
            return Ok(());
        };
        if change.model == self.namespace && store.known_version(&change.name) < change.version {
            self.fetch(store, &[change.name.as_str()]).await?;
        }
        Ok(())
    }
}

/// One row's version, ETag and whether it is a tombstone.
struct RowHead {
    name: String,
    version: i64,
    etag: String,
    deleted: bool,
}

/// A row with its data (`name, version, etag, deleted, data`).
struct FullRow {
    head: RowHead,
    data: Vec<u8>,
}

impl FullRow {
    fn read(r: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            head: RowHead {
                name: r.try_get(0)?,
                version: r.try_get(1)?,
                etag: r.try_get(2)?,
                deleted: r.try_get(3)?,
            },
            data: r.try_get(4)?,
        })
    }

    /// The data and ETag, unless the row is a tombstone.
    fn live(self) -> Option<(Vec<u8>, String)> {
        (!self.head.deleted).then_some((self.data, self.head.etag))
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Versions the copy had applied when a resync started, by name.
pub type VersionSnapshot = HashMap<String, u64>;
