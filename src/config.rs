//! Settings. `config/default.toml` (compiled in) is the one source of defaults; a `--config`
//! file, then `TILLER_<SECTION>_<KEY>` environment variables, then CLI flags override it. The
//! merged table is checked against these structs, so an unknown key is an error, not a silent
//! no-op.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The defaults, as shipped.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub model: ModelConfig,
    pub engine: EngineSettings,
    pub limits: Limits,
    pub vectors: VectorsConfig,
    pub store: StoreConfig,
    pub saes: SaesConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub max_body_bytes: usize,
    pub request_timeout_secs: u64,
    pub sse_keep_alive_secs: u64,
    pub shutdown_grace_secs: u64,
    pub max_connections: usize,
    pub header_read_timeout_secs: u64,
    pub keep_alive_idle_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub path: String,
    pub chat_template: String,
    pub id: String,
    pub cache_dir: PathBuf,
    pub python: String,
    pub device: String,
    pub weights: String,
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub prefill_chunk: usize,
    pub prefill_while_decoding: usize,
    pub max_queue: usize,
    pub max_chunked_passes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_tokens: usize,
    pub default_max_tokens: usize,
    pub max_prompt_tokens: usize,
    pub max_interventions: usize,
    pub max_stop_sequences: usize,
    pub max_logprobs: usize,
    pub max_tokenize_tokens: usize,
    pub max_inspect_values: usize,
    pub max_prompts_per_request: usize,
    pub max_lens_cells: usize,
    /// Patched runs (layers × positions × heads) in one `/inspect/patch` request.
    pub max_patch_cells: usize,
    /// Tokens of each prompt of an `/inspect/patch` request.
    pub max_patch_prompt_tokens: usize,
    /// `/inspect/patch` sweeps running at once (more get a 429).
    pub max_concurrent_patches: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorsConfig {
    pub builtin_dir: PathBuf,
    pub dir: PathBuf,
    pub max_extract_examples: usize,
    pub extract_batch_tokens: usize,
}

/// Where stored vectors are kept when replicas share them.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://user:password@host:port/db`; empty keeps vectors in `vectors.dir`.
    pub url: String,
    /// Bound on each database operation a request waits on, and on connecting.
    pub timeout_secs: u64,
    /// How long start waits for the first sync with the database before serving without it.
    pub start_wait_secs: u64,
    /// The rows this server shares (replicas of one model must agree); empty: the model id.
    pub namespace: String,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL, or a key=value string, may carry a password.
        let url = match self.url.split_once("://") {
            Some((scheme, rest)) => match rest.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://[redacted]@{host}"),
                None => self.url.clone(),
            },
            None => self
                .url
                .split_whitespace()
                .map(|kv| match kv.split_once('=') {
                    Some(("password", _)) => "password=[redacted]",
                    _ => kv,
                })
                .collect::<Vec<_>>()
                .join(" "),
        };
        f.debug_struct("StoreConfig")
            .field("url", &url)
            .field("timeout_secs", &self.timeout_secs)
            .field("start_wait_secs", &self.start_wait_secs)
            .field("namespace", &self.namespace)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaesConfig {
    pub dir: PathBuf,
    /// Texts searched by `POST /saes/{name}/features/{index}/top` when a request gives none
    /// (one per line of every `*.txt` file), and the prompts `tiller sae train` answers.
    pub corpus_dir: PathBuf,
}

/// API keys. `Debug` never shows them.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub api_keys: Vec<String>,
    pub admin_keys: Vec<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "api_keys",
                &format_args!("[{} redacted]", self.api_keys.len()),
            )
            .field(
                "admin_keys",
                &format_args!("[{} redacted]", self.admin_keys.len()),
            )
            .finish()
    }
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        !self.api_keys.is_empty() || !self.admin_keys.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: String,
}

impl Default for Config {
    fn default() -> Self {
        // The embedded file is part of the binary and covered by a test.
        toml::from_str(DEFAULT_TOML)
            .unwrap_or_else(|e| panic!("config/default.toml is invalid: {e}"))
    }
}

/// Overlays `over` onto `base`, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Parses an override value: a TOML scalar if it reads as one, else a string.
fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// Sets `section.key` in a table.
fn set(table: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = entry {
        t.insert(key.to_string(), value);
    }
}

impl Config {
    /// Builds the configuration: defaults < `file` < environment < `overrides`
    /// (`("server.port", "9000")`).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(DEFAULT_TOML).context("config/default.toml")?;
        let sections: Vec<String> = table.keys().cloned().collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            let over: toml::Table = toml::from_str(&text)
                .with_context(|| format!("parsing config {}", path.display()))?;
            merge(&mut table, over);
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("TILLER_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            let Some(section) = sections.iter().find(|s| rest.starts_with(&format!("{s}_"))) else {
                continue;
            };
            let key = &rest[section.len() + 1..];
            // Keys are strings even when they look like numbers.
            let value = if section == "auth" {
                toml::Value::String(value)
            } else {
                parse_value(&value)
            };
            set(&mut table, section, key, value);
        }
        // Lists given as one string (an environment variable) are comma-separated.
        if let Some(toml::Value::Table(auth)) = table.get_mut("auth") {
            for key in ["api_keys", "admin_keys"] {
                if let Some(toml::Value::String(s)) = auth.get(key) {
                    let items = s
                        .split(',')
                        .map(str::trim)
                        .filter(|k| !k.is_empty())
                        .map(|k| toml::Value::String(k.to_string()))
                        .collect();
                    auth.insert(key.to_string(), toml::Value::Array(items));
                }
            }
        }
        for (path, value) in overrides {
            let Some((section, key)) = path.split_once('.') else {
                bail!("override `{path}` is not of the form section.key");
            };
            set(&mut table, section, key, parse_value(value));
        }
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        let l = &self.limits;
        if l.default_max_tokens > l.max_tokens {
            bail!(
                "limits.default_max_tokens ({}) exceeds limits.max_tokens ({})",
                l.default_max_tokens,
                l.max_tokens
            );
        }
        if self.engine.max_batch_size == 0
            || self.engine.max_batch_tokens == 0
            || self.engine.prefill_chunk == 0
        {
            bail!("engine.max_batch_size, max_batch_tokens and prefill_chunk must be at least 1");
        }
        let sv = &self.server;
        if sv.max_connections == 0
            || sv.header_read_timeout_secs == 0
            || sv.keep_alive_idle_secs == 0
        {
            bail!(
                "server.max_connections, header_read_timeout_secs and keep_alive_idle_secs must be at least 1"
            );
        }
        if sv.max_connections > u32::MAX as usize {
            bail!("server.max_connections must be at most {}", u32::MAX);
        }
        if !matches!(self.model.weights.as_str(), "native" | "q8_0" | "f32") {
            bail!(
                "model.weights must be \"native\", \"q8_0\" or \"f32\", not {:?}",
                self.model.weights
            );
        }
        if self
            .auth
            .api_keys
            .iter()
            .chain(&self.auth.admin_keys)
            .any(|k| k.len() < 8)
        {
            bail!("auth keys must be at least 8 characters long");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bail!("log.format must be \"text\" or \"json\"");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_url_passwords_stay_out_of_debug_output() {
        let c = Config::load(
            None,
            vec![(
                "TILLER_STORE_URL".to_string(),
                "postgres://tiller:s3cret@db:5432/tiller".to_string(),
            )],
            &[],
        )
        .unwrap();
        assert_eq!(c.store.url, "postgres://tiller:s3cret@db:5432/tiller");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("db:5432/tiller"), "{shown}");
        let mut kv = c.store.clone();
        kv.url = "host=db user=tiller password=s3cret dbname=tiller".into();
        let shown = format!("{kv:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("host=db"),
            "{shown}"
        );
    }

    #[test]
    fn defaults_parse_and_layers_override_in_order() {
        let d = Config::default();
        assert_eq!(d.server.port, 8080);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[server]\nport = 9000\nhost = \"0.0.0.0\"\n").unwrap();
        let env = vec![
            ("TILLER_SERVER_PORT".to_string(), "9100".to_string()),
            ("TILLER_LIMITS_MAX_TOKENS".to_string(), "64".to_string()),
            (
                "TILLER_LIMITS_DEFAULT_MAX_TOKENS".to_string(),
                "32".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = Config::load(
            Some(&file),
            env.clone(),
            &[("server.port".into(), "9200".into())],
        )
        .unwrap();
        assert_eq!(c.server.host, "0.0.0.0");
        assert_eq!(c.server.port, 9200);
        assert_eq!(c.limits.max_tokens, 64);
        let c = Config::load(Some(&file), env, &[]).unwrap();
        assert_eq!(c.server.port, 9100);
    }

    #[test]
    fn api_keys_come_from_a_comma_list_and_are_never_printed() {
        let env = vec![(
            "TILLER_AUTH_API_KEYS".to_string(),
            "key-one-1, key-two-2".to_string(),
        )];
        let c = Config::load(None, env, &[]).unwrap();
        assert_eq!(c.auth.api_keys, ["key-one-1", "key-two-2"]);
        assert!(c.auth.enabled());
        let shown = format!("{c:?}");
        assert!(!shown.contains("key-one-1"), "{shown}");
        let err = Config::load(
            None,
            vec![("TILLER_AUTH_ADMIN_KEYS".into(), "short".into())],
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("at least 8"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let err =
            Config::load(None, vec![("TILLER_SERVER_PROT".into(), "1".into())], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("prot"), "{err:#}");
        let err = Config::load(None, vec![], &[("model.weights".into(), "q2".into())]).unwrap_err();
        assert!(format!("{err:#}").contains("model.weights"), "{err:#}");
    }
}
