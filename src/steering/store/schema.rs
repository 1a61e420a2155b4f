//! The PostgreSQL side of the shared vector store: connection settings, the versioned schema
//! (migrations), how database errors map to store errors, and the copy of a folder store in
//! (`tiller vectors migrate`).

use super::{StoreEntry, StoreError};
use crate::steering::vector::SteeringVector;
use std::time::Duration;
use tokio_postgres::{Client, GenericClient, NoTls};

/// The channel changes are announced on.
pub const CHANNEL: &str = "tiller_vectors";

/// Key of the advisory lock that serializes migrations of replicas starting together.
const MIGRATION_LOCK: i64 = 0x7469_6c6c_6572;

/// The schema, in order. Each runs once, in a transaction, recorded in `tiller_migrations`.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "vectors",
    "CREATE TABLE tiller_vectors (
        model TEXT NOT NULL,
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        etag TEXT NOT NULL,
        deleted BOOLEAN NOT NULL DEFAULT false,
        kind TEXT NOT NULL,
        method TEXT NOT NULL,
        description TEXT NOT NULL,
        width INTEGER NOT NULL,
        layers INTEGER NOT NULL,
        data BYTEA NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (model, name)
    )",
)];

/// The change a replica announces (`NOTIFY` payload).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Change {
    pub model: String,
    pub name: String,
    pub version: u64,
}

/// Parses a `postgres://` URL (or key=value string) and bounds what can hang: connecting,
/// TCP keep-alive probes on a silent peer, and on the server every statement, lock wait and
/// transaction left idle by a replica that vanished.
pub fn parse_url(url: &str, timeout: Duration) -> Result<tokio_postgres::Config, String> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("store.url is not a PostgreSQL connection string: {e}"))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout);
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3)
        .tcp_user_timeout(timeout * 2);
    if config.get_application_name().is_none() {
        config.application_name("tiller");
    }
    let ms = timeout.as_millis();
    let mut options = config.get_options().unwrap_or_default().to_string();
    options.push_str(&format!(
        " -c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={}",
        ms * 2
    ));
    config.options(options.trim());
    Ok(config)
}

/// What a database error means for a request: a refusal of the data (a constraint or value
/// PostgreSQL rejects) is the request's fault; anything else (connection, resources, a
/// timeout, the server shutting down) is the database being unavailable. The detail goes to
/// the log; the message says only what a client needs.
pub fn classify(e: &tokio_postgres::Error) -> StoreError {
    let detail = match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!("{}: {}", db.code().code(), db.message()),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    };
    let class = e.code().map(|c| &c.code()[..2]);
    if matches!(class, Some("22" | "23")) {
        tracing::warn!(error = %detail, "the vector database refused a vector");
        return StoreError::Invalid(format!("the vector database refused it ({detail})"));
    }
    tracing::warn!(error = %detail, "vector database error");
    unavailable()
}

/// The error of an unreachable database (the cause is logged where it happened).
pub fn unavailable() -> StoreError {
    StoreError::Unavailable("the vector database cannot be reached".into())
}

/// Takes the per-name lock for the rest of the transaction: every write of `model/name`, from
/// any replica or `tiller vectors migrate`, holds it.
pub async fn lock_name(
    tx: &impl GenericClient,
    model: &str,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    let key = format!("{model}/{name}");
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&key],
    )
    .await
    .map(|_| ())
}

/// Runs the migrations not yet applied, in order, under one advisory lock (replicas starting
/// at once wait for each other); idempotent. Returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let exists: bool = tx
        .query_one("SELECT to_regclass('tiller_migrations') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        tx.batch_execute(
            "CREATE TABLE tiller_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )
        .await?;
    }
    let mut done = Vec::new();
    for row in tx
        .query("SELECT version FROM tiller_migrations", &[])
        .await?
    {
        done.push(row.try_get::<_, i32>(0)?);
    }
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO tiller_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        applied.push(version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// Writes version `version` of `v` (bytes `bytes`, ETag `etag`) unless the row has moved on
/// to that version or a later one meanwhile; whether it was written.
pub async fn upsert(
    tx: &impl GenericClient,
    model: &str,
    v: &SteeringVector,
    bytes: &[u8],
    etag: &str,
) -> Result<bool, tokio_postgres::Error> {
    let (version, width) = (v.meta.version as i64, v.meta.d_model as i32);
    let layers = v.layers.len() as i32;
    let n = tx
        .execute(
            "INSERT INTO tiller_vectors
                 (model, name, version, etag, deleted, kind, method, description, width, layers,
                  data, updated_at)
             VALUES ($1, $2, $3, $4, false, $5, $6, $7, $8, $9, $10, now())
             ON CONFLICT (model, name) DO UPDATE SET
                 version = $3, etag = $4, deleted = false, kind = $5, method = $6,
                 description = $7, width = $8, layers = $9, data = $10, updated_at = now()
             WHERE tiller_vectors.version < $3",
            &[
                &model,
                &v.name,
                &version,
                &etag,
                &v.meta.kind.as_str(),
                &v.meta.method,
                &v.meta.description,
                &width,
                &layers,
                &bytes,
            ],
        )
        .await?;
    Ok(n == 1)
}

/// Announces a change to every replica (delivered when the transaction commits).
pub async fn announce(
    tx: &impl GenericClient,
    model: &str,
    name: &str,
    version: u64,
) -> Result<(), tokio_postgres::Error> {
    let change = Change {
        model: model.to_string(),
        name: name.to_string(),
        version,
    };
    let payload = serde_json::to_string(&change).unwrap_or_default();
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await
        .map(|_| ())
}

/// What `tiller vectors migrate` did.
#[derive(Debug, Default)]
pub struct CopyReport {
    pub copied: Vec<String>,
    /// Already in the database with the same content.
    pub unchanged: Vec<String>,
    /// Already in the database with other content (or deleted there): the database's kept.
    pub conflicts: Vec<String>,
}

/// Copies stored vectors into the database at `url` (schema migrated first) under namespace
/// `model`, each with its version and ETag, one transaction each under the name's lock; a
/// name the database already holds is left as it is.
pub async fn copy_in(
    url: &str,
    model: &str,
    entries: &[StoreEntry],
    timeout: Duration,
) -> anyhow::Result<CopyReport> {
    let config = parse_url(url, timeout).map_err(anyhow::Error::msg)?;
    let (mut client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    migrate(&mut client).await?;
    let mut report = CopyReport::default();
    for e in entries {
        let mut v = SteeringVector::clone(&e.vector);
        v.meta.version = v.meta.version.max(1);
        let bytes = v.to_safetensors()?;
        let tx = client.transaction().await?;
        lock_name(&tx, model, &v.name).await?;
        let row = tx
            .query_opt(
                "SELECT etag, deleted, data FROM tiller_vectors WHERE model = $1 AND name = $2",
                &[&model, &v.name],
            )
            .await?;
        let Some(row) = row else {
            // The folder's ETag (of the file's bytes) stays valid: clients' `If-Match` hold.
            upsert(&tx, model, &v, &bytes, &e.etag).await?;
            announce(&tx, model, &v.name, v.meta.version).await?;
            tx.commit().await?;
            report.copied.push(v.name.clone());
            continue;
        };
        let (theirs, deleted, data): (String, bool, Vec<u8>) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let same_content = || {
            SteeringVector::from_safetensors(&data, &Default::default())
                .is_ok_and(|t| t.meta == v.meta && t.layers == v.layers)
        };
        if !deleted && (theirs == e.etag || same_content()) {
            report.unchanged.push(v.name.clone());
        } else {
            report.conflicts.push(v.name.clone());
        }
    }
    Ok(report)
}
