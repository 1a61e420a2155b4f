//! Sparse autoencoders (dictionary learning on one hook site, Bricken et al. 2023; Templeton et
//! al. 2024 "Scaling Monosemanticity"): `f = act(W_encᵀ (x - b_dec) + b_enc)`,
//! `x̂ = W_decᵀ f + b_dec`, with `act` ReLU (standard), JumpReLU (Gemma Scope, Lieberum et al.
//! 2024: `z · H(z - θ)`) or TopK (Gao et al. 2024: the k largest pre-activations, ReLU'd).
//!
//! Loaded from the SAELens layout (`cfg.json` + `sae_weights.safetensors`) or Gemma Scope's
//! `params.npz`. A decoder row is a steerable feature: `add` adds `c · W_dec[i]`; `clamp` sets
//! the feature's activation to `c` inside the SAE's reconstruction while keeping its error
//! term, `h' = x̂(f with f_i = c) + (h - x̂(f)) = h + (c - f_i(h)) W_dec[i]`, so clamping a
//! feature to its own value changes nothing.

use crate::model::hooks::HookSite;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

/// The activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "architecture")]
pub enum SaeArchitecture {
    /// ReLU.
    Standard,
    /// `z · H(z - θ)` with a per-feature threshold θ.
    Jumprelu,
    /// The `k` largest pre-activations (ReLU'd); the rest zero.
    Topk { k: usize },
}

/// The file tiller writes into an SAE folder it created (an upload, `tiller sae train`):
/// only such folders go with their SAE on delete; a folder copied in by hand never does.
pub const OWNED_MARKER: &str = ".tiller-owned";

/// Whether tiller created `dir`: a real folder (not a link) holding [`OWNED_MARKER`].
pub fn owned_folder(dir: &Path) -> bool {
    dir.symlink_metadata().is_ok_and(|m| m.is_dir()) && dir.join(OWNED_MARKER).is_file()
}

/// A loaded sparse autoencoder.
#[derive(Debug)]
pub struct Sae {
    pub name: String,
    pub d_in: usize,
    pub d_sae: usize,
    pub architecture: SaeArchitecture,
    pub apply_b_dec_to_input: bool,
    /// Where it reads: the hook site and block.
    pub site: HookSite,
    pub layer: usize,
    /// The `hook_name` as given (e.g. `blocks.12.hook_resid_post`).
    pub hook_name: String,
    /// The folder in `saes.dir` that holds this SAE's files and goes with it on delete: set
    /// when it was loaded at start or uploaded, not when loaded from a folder by path (those
    /// files are the user's).
    pub files: Option<std::path::PathBuf>,
    /// Compiled into the binary (see [`BUILTIN_SAES`]).
    pub builtin: bool,
    /// `[d_in, d_sae]`.
    w_enc: Tensor,
    /// `[d_sae, d_in]`, rows are features.
    w_dec: Vec<f32>,
    w_dec_t: Tensor,
    /// `W_enc` columns as rows, `[d_sae][d_in]` (one feature's encoder at a time).
    w_enc_rows: Vec<f32>,
    b_enc: Vec<f32>,
    b_dec: Vec<f32>,
    threshold: Option<Vec<f32>>,
}

/// Parses a TransformerLens hook name into a site and block.
pub fn parse_hook_name(name: &str) -> Result<(HookSite, usize)> {
    let rest = name
        .strip_prefix("blocks.")
        .with_context(|| format!("hook `{name}` does not start with `blocks.`"))?;
    let (layer, hook) = rest
        .split_once('.')
        .with_context(|| format!("hook `{name}` has no site"))?;
    let layer: usize = layer
        .parse()
        .with_context(|| format!("hook `{name}`: `{layer}` is not a layer"))?;
    let site = match hook {
        "hook_resid_post" => HookSite::ResidPost,
        "hook_resid_pre" => HookSite::ResidPre,
        "hook_attn_out" | "attn.hook_z_out" => HookSite::AttnOut,
        "hook_mlp_out" => HookSite::MlpOut,
        "mlp.hook_post" => HookSite::MlpAct,
        "attn.hook_z" => HookSite::AttnHead,
        other => bail!("hook site `{other}` is not supported (hook_resid_post, hook_resid_pre, hook_attn_out, hook_mlp_out, mlp.hook_post, attn.hook_z)"),
    };
    Ok((site, layer))
}

/// The parts an SAE is built from, as read from a file.
#[derive(Debug, Clone)]
pub struct SaeParts {
    pub w_enc: Vec<f32>,
    pub w_dec: Vec<f32>,
    pub b_enc: Vec<f32>,
    pub b_dec: Vec<f32>,
    pub threshold: Option<Vec<f32>>,
    pub d_in: usize,
    pub d_sae: usize,
}

/// SAELens' `cfg.json` (the fields tiller uses).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SaeConfig {
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub d_in: Option<usize>,
    #[serde(default)]
    pub d_sae: Option<usize>,
    #[serde(default)]
    pub k: Option<usize>,
    #[serde(default)]
    pub apply_b_dec_to_input: Option<bool>,
    #[serde(default)]
    pub hook_name: Option<String>,
    /// Newer SAELens versions nest the hook under `metadata`.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

impl SaeConfig {
    pub fn hook_name(&self) -> Option<String> {
        self.hook_name.clone().or_else(|| {
            self.metadata
                .as_ref()
                .and_then(|m| m.get("hook_name"))
                .and_then(|h| h.as_str())
                .map(str::to_string)
        })
    }

    pub fn architecture(&self) -> Result<SaeArchitecture> {
        Ok(match self.architecture.as_deref().unwrap_or("standard") {
            "standard" | "relu" => SaeArchitecture::Standard,
            "jumprelu" => SaeArchitecture::Jumprelu,
            "topk" => SaeArchitecture::Topk {
                k: self.k.context("a topk SAE needs `k`")?,
            },
            other => bail!("architecture `{other}` is not supported (standard, jumprelu, topk)"),
        })
    }
}

fn floats(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

impl SaeParts {
    fn from_tensors(mut get: impl FnMut(&str) -> Result<Option<Tensor>>) -> Result<Self> {
        let mut req = |n: &str| get(n)?.ok_or_else(|| anyhow!("missing tensor `{n}`"));
        let w_enc = req("W_enc")?;
        let (d_in, d_sae) = w_enc.dims2().context("`W_enc` must be [d_in, d_sae]")?;
        let w_dec = req("W_dec")?;
        if w_dec.dims2()? != (d_sae, d_in) {
            bail!("`W_dec` is {:?}; expected [{d_sae}, {d_in}]", w_dec.dims());
        }
        let b_enc = floats(&req("b_enc")?)?;
        let b_dec = floats(&req("b_dec")?)?;
        let threshold = get("threshold")?.map(|t| floats(&t)).transpose()?;
        if b_enc.len() != d_sae
            || b_dec.len() != d_in
            || threshold.as_ref().is_some_and(|t| t.len() != d_sae)
        {
            bail!("bias or threshold sizes do not match W_enc [{d_in}, {d_sae}]");
        }
        Ok(Self {
            w_enc: floats(&w_enc)?,
            w_dec: floats(&w_dec)?,
            b_enc,
            b_dec,
            threshold,
            d_in,
            d_sae,
        })
    }

    /// `sae_weights.safetensors` (SAELens).
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let map = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| anyhow!("not a safetensors file: {e}"))?;
        Self::from_tensors(|n| Ok(map.get(n).cloned()))
    }

    /// `params.npz` (Gemma Scope).
    pub fn from_npz(path: &Path) -> Result<Self> {
        check_npz(path)?;
        let map: HashMap<String, Tensor> = Tensor::read_npz(path)
            .map_err(|e| anyhow!("not a readable .npz file: {e}"))?
            .into_iter()
            .collect();
        Self::from_tensors(|n| Ok(map.get(n).cloned()))
    }
}

/// How much larger than the file an `.npz`'s arrays may claim to be. Float arrays barely
/// compress (and `np.savez` stores them as they are), so only a forged header gets near this.
const NPZ_MAX_EXPANSION: u64 = 64;

/// Checks every array of an `.npz` before it is read: candle allocates what an array's header
/// declares, so a few hundred forged bytes could otherwise ask for terabytes and abort the
/// process. Each array must fit in its zip entry, and all entries together in
/// [`NPZ_MAX_EXPANSION`] times the file.
fn check_npz(path: &Path) -> Result<()> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let budget = file.metadata()?.len().saturating_mul(NPZ_MAX_EXPANSION);
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| anyhow!("not a readable .npz file: {e}"))?;
    let mut total = 0u64;
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| anyhow!("not a readable .npz file: {e}"))?;
        let name = entry
            .name()
            .map(|n| n.into_owned())
            .unwrap_or_else(|_| format!("entry {i}"));
        total = total.saturating_add(entry.size());
        if total > budget {
            bail!("`{name}`: the arrays claim {total} bytes, far more than the file holds");
        }
        let mut head = [0u8; 10];
        entry
            .read_exact(&mut head)
            .with_context(|| format!("`{name}` is not an .npy array"))?;
        if &head[..6] != b"\x93NUMPY" {
            bail!("`{name}` is not an .npy array");
        }
        let header_len = if head[6] == 1 {
            u16::from_le_bytes([head[8], head[9]]) as usize
        } else {
            let mut more = [0u8; 2];
            entry.read_exact(&mut more)?;
            u32::from_le_bytes([head[8], head[9], more[0], more[1]]) as usize
        };
        if header_len > 1 << 16 {
            bail!("`{name}`: an .npy header of {header_len} bytes");
        }
        let mut header = vec![0u8; header_len];
        entry.read_exact(&mut header)?;
        let header = String::from_utf8_lossy(&header);
        let bytes = npy_data_bytes(&header)
            .with_context(|| format!("`{name}`: unreadable .npy header {header:?}"))?;
        let room = entry.size().saturating_sub((10 + header_len) as u64);
        if bytes > room {
            bail!("`{name}` declares {bytes} bytes of data but holds {room}");
        }
    }
    Ok(())
}

/// The data size an .npy header (`{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`)
/// declares, or `None` when it cannot be read or overflows.
fn npy_data_bytes(header: &str) -> Option<u64> {
    let descr = header.split("'descr':").nth(1)?.trim_start();
    let descr = descr.strip_prefix('\'')?.split('\'').next()?;
    let item: u64 = descr
        .trim_start_matches(['<', '>', '|', '='])
        .get(1..)?
        .parse()
        .ok()?;
    let shape = header.split("'shape':").nth(1)?;
    let shape = shape.split('(').nth(1)?.split(')').next()?;
    shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .try_fold(item, |acc, d| acc.checked_mul(d.parse().ok()?))
}

impl Sae {
    pub fn new(
        name: &str,
        parts: SaeParts,
        architecture: SaeArchitecture,
        apply_b_dec_to_input: bool,
        hook_name: &str,
    ) -> Result<Self> {
        let (site, layer) = parse_hook_name(hook_name)?;
        if parts.d_in == 0 || parts.d_sae == 0 {
            bail!(
                "an SAE of {} inputs and {} features has nothing to encode",
                parts.d_in,
                parts.d_sae
            );
        }
        if architecture == SaeArchitecture::Jumprelu && parts.threshold.is_none() {
            bail!("a jumprelu SAE needs a `threshold` tensor");
        }
        if let SaeArchitecture::Topk { k } = architecture {
            if k == 0 || k > parts.d_sae {
                bail!("k = {k} must be between 1 and d_sae = {}", parts.d_sae);
            }
        }
        let all = parts
            .w_enc
            .iter()
            .chain(&parts.w_dec)
            .chain(&parts.b_enc)
            .chain(&parts.b_dec);
        if all
            .chain(parts.threshold.iter().flatten())
            .any(|x| !x.is_finite())
        {
            bail!("the SAE holds non-finite numbers");
        }
        let (d_in, d_sae) = (parts.d_in, parts.d_sae);
        let w_enc = Tensor::from_vec(parts.w_enc, (d_in, d_sae), &Device::Cpu)?;
        let w_enc_rows: Vec<f32> = w_enc.t()?.contiguous()?.flatten_all()?.to_vec1()?;
        let w_dec_t = Tensor::from_slice(&parts.w_dec, (d_sae, d_in), &Device::Cpu)?;
        Ok(Self {
            name: name.to_string(),
            d_in,
            d_sae,
            architecture,
            apply_b_dec_to_input,
            site,
            layer,
            hook_name: hook_name.to_string(),
            files: None,
            builtin: false,
            w_enc,
            w_dec: parts.w_dec,
            w_dec_t,
            w_enc_rows,
            b_enc: parts.b_enc,
            b_dec: parts.b_dec,
            threshold: parts.threshold,
        })
    }

    /// Loads a folder: SAELens (`cfg.json` + `sae_weights.safetensors`) or Gemma Scope
    /// (`params.npz`, with a `cfg.json` naming at least `hook_name`).
    pub fn load_dir(name: &str, dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("cfg.json");
        let cfg: SaeConfig = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?,
        )
        .with_context(|| format!("parsing {}", cfg_path.display()))?;
        let npz = !dir.join("sae_weights.safetensors").exists();
        if !npz {
            let weights = std::fs::read(dir.join("sae_weights.safetensors"))?;
            return Self::from_saelens(name, &cfg, &weights);
        }
        let parts = if dir.join("params.npz").exists() {
            SaeParts::from_npz(&dir.join("params.npz"))?
        } else {
            bail!(
                "{} has neither sae_weights.safetensors nor params.npz",
                dir.display()
            );
        };
        let mut arch = cfg.architecture()?;
        // Gemma Scope's params.npz carries a threshold: JumpReLU.
        if cfg.architecture.is_none() && parts.threshold.is_some() {
            arch = SaeArchitecture::Jumprelu;
        }
        let hook = cfg
            .hook_name()
            .context("cfg.json has no `hook_name` (e.g. blocks.12.hook_resid_post)")?;
        Self::new(
            name,
            parts,
            arch,
            // Gemma Scope encodes `x · W_enc + b_enc`.
            cfg.apply_b_dec_to_input.unwrap_or(false),
            &hook,
        )
    }

    /// The SAELens layout from its two files' contents.
    pub fn from_saelens(name: &str, cfg: &SaeConfig, weights: &[u8]) -> Result<Self> {
        let parts = SaeParts::from_safetensors(weights)?;
        let hook = cfg
            .hook_name()
            .context("cfg.json has no `hook_name` (e.g. blocks.12.hook_resid_post)")?;
        // SAELens' default.
        let apply_b_dec = cfg.apply_b_dec_to_input.unwrap_or(true);
        Self::new(name, parts, cfg.architecture()?, apply_b_dec, &hook)
    }

    /// Writes the SAELens layout, with the tensors in `dtype` (F32, or F16 for half the size).
    pub fn save_dir(&self, dir: &Path, dtype: candle_core::DType) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let (arch, k) = match self.architecture {
            SaeArchitecture::Standard => ("standard", None),
            SaeArchitecture::Jumprelu => ("jumprelu", None),
            SaeArchitecture::Topk { k } => ("topk", Some(k)),
        };
        let cfg = serde_json::json!({
            "architecture": arch, "k": k, "d_in": self.d_in, "d_sae": self.d_sae,
            "apply_b_dec_to_input": self.apply_b_dec_to_input, "hook_name": self.hook_name,
            "metadata": {"hook_name": self.hook_name},
        });
        crate::steering::store::write_atomic(
            &dir.join("cfg.json"),
            serde_json::to_string_pretty(&cfg)?.as_bytes(),
        )?;
        let mut tensors: Vec<(&str, Tensor)> = vec![
            ("W_enc", self.w_enc.clone()),
            ("W_dec", self.w_dec_t.clone()),
            (
                "b_enc",
                Tensor::from_slice(&self.b_enc, self.d_sae, &Device::Cpu)?,
            ),
            (
                "b_dec",
                Tensor::from_slice(&self.b_dec, self.d_in, &Device::Cpu)?,
            ),
        ];
        if let Some(t) = &self.threshold {
            tensors.push((
                "threshold",
                Tensor::from_slice(t, self.d_sae, &Device::Cpu)?,
            ));
        }
        let tensors = tensors
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let tmp = dir.join(".sae_weights.safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, dir.join("sae_weights.safetensors"))?;
        std::fs::write(
            dir.join(OWNED_MARKER),
            b"written by tiller; deleted with the SAE\n",
        )?;
        Ok(())
    }

    /// Pre-activations `[n, d_sae]` of rows `x` (`[n, d_in]`).
    pub fn pre_activations(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut xs = x.to_vec();
        if self.apply_b_dec_to_input {
            for row in xs.chunks_mut(self.d_in) {
                for (v, b) in row.iter_mut().zip(&self.b_dec) {
                    *v -= b;
                }
            }
        }
        let t = Tensor::from_vec(xs, (n, self.d_in), &Device::Cpu)?;
        let b = Tensor::from_slice(&self.b_enc, self.d_sae, &Device::Cpu)?;
        Ok(t.matmul(&self.w_enc)?
            .broadcast_add(&b)?
            .flatten_all()?
            .to_vec1()?)
    }

    /// Applies the activation function to one row of pre-activations, in place.
    fn activate(&self, pre: &mut [f32]) {
        match self.architecture {
            SaeArchitecture::Standard => pre.iter_mut().for_each(|z| *z = z.max(0.0)),
            SaeArchitecture::Jumprelu => {
                let th = self.threshold.as_deref().unwrap_or(&[]);
                for (z, t) in pre.iter_mut().zip(th) {
                    if *z <= *t || *z <= 0.0 {
                        *z = 0.0;
                    }
                }
            }
            SaeArchitecture::Topk { k } => {
                let keep: std::collections::HashSet<u32> = crate::engine::sampling::top_n(pre, k)
                    .into_iter()
                    .map(|(i, _)| i)
                    .collect();
                for (i, z) in pre.iter_mut().enumerate() {
                    if !keep.contains(&(i as u32)) || *z < 0.0 {
                        *z = 0.0;
                    }
                }
            }
        }
    }

    /// Feature activations `[n, d_sae]`.
    pub fn encode(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut f = self.pre_activations(x, n)?;
        for row in f.chunks_mut(self.d_sae) {
            self.activate(row);
        }
        Ok(f)
    }

    /// Reconstructions `[n, d_in]` from feature activations.
    pub fn decode(&self, f: &[f32], n: usize) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(f, (n, self.d_sae), &Device::Cpu)?;
        let b = Tensor::from_slice(&self.b_dec, self.d_in, &Device::Cpu)?;
        Ok(t.matmul(&self.w_dec_t)?
            .broadcast_add(&b)?
            .flatten_all()?
            .to_vec1()?)
    }

    /// Feature `i`'s activation on one row `h`.
    pub fn feature_activation(&self, h: &[f32], i: usize) -> f32 {
        if matches!(self.architecture, SaeArchitecture::Topk { .. }) {
            // Whether feature i is among the top k depends on all features.
            return self.encode(h, 1).map(|f| f[i]).unwrap_or(0.0);
        }
        let row = &self.w_enc_rows[i * self.d_in..(i + 1) * self.d_in];
        let mut z = self.b_enc[i] as f64;
        for ((x, w), b) in h.iter().zip(row).zip(&self.b_dec) {
            let x = if self.apply_b_dec_to_input { x - b } else { *x };
            z += x as f64 * *w as f64;
        }
        let z = z as f32;
        match self.architecture {
            SaeArchitecture::Standard => z.max(0.0),
            _ => {
                let t = self.threshold.as_ref().map_or(0.0, |t| t[i]);
                if z > t && z > 0.0 {
                    z
                } else {
                    0.0
                }
            }
        }
    }

    /// Decoder row `i` (the feature's direction).
    pub fn decoder_row(&self, i: usize) -> &[f32] {
        &self.w_dec[i * self.d_in..(i + 1) * self.d_in]
    }
}

/// SAEs compiled into the binary: `(name, cfg.json, sae_weights.safetensors)`, built from
/// `config/saes/NAME/` (`tiller sae train --half --out config/saes/NAME` remakes one).
pub const BUILTIN_SAES: [(&str, &[u8], &[u8]); 1] = [(
    "res12_4k",
    include_bytes!("../../config/saes/res12_4k/cfg.json"),
    include_bytes!("../../config/saes/res12_4k/sae_weights.safetensors"),
)];

/// Loaded SAEs by name.
#[derive(Debug, Default)]
pub struct SaeStore {
    saes: RwLock<BTreeMap<String, Arc<Sae>>>,
}

impl SaeStore {
    pub fn get(&self, name: &str) -> Option<Arc<Sae>> {
        self.saes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn insert(&self, sae: Sae) -> Arc<Sae> {
        let sae = Arc::new(sae);
        self.saes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sae.name.clone(), sae.clone());
        sae
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Sae>> {
        self.saes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    pub fn list(&self) -> Vec<Arc<Sae>> {
        self.saes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.saes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Loads the SAEs compiled into the binary whose width and layer fit the model (they are
    /// made for the default model; a model of another width or depth skips them, one of the
    /// same shape loads them though they mean nothing there). Folders in `saes.dir` load after them,
    /// so one there of the same name (`tiller sae train` writes `res12_4k`) replaces it.
    pub fn load_builtins(&self, width_of: impl Fn(HookSite, usize) -> Option<usize>) {
        for (name, cfg, weights) in BUILTIN_SAES {
            let sae = serde_json::from_slice::<SaeConfig>(cfg)
                .map_err(anyhow::Error::from)
                .and_then(|cfg| Sae::from_saelens(name, &cfg, weights));
            match sae {
                Ok(mut sae) if width_of(sae.site, sae.layer) == Some(sae.d_in) => {
                    sae.builtin = true;
                    self.insert(sae);
                }
                Ok(_) => tracing::debug!(sae = name, "built-in SAE does not fit this model"),
                Err(e) => tracing::error!(sae = name, error = %format!("{e:#}"), "built-in SAE"),
            }
        }
    }

    /// Loads every subfolder of `dir` as an SAE named after it; returns a line per failure.
    /// `width_of(site)` is the model's width there (an SAE must match it).
    pub fn load_dir(
        &self,
        dir: &Path,
        width_of: impl Fn(HookSite, usize) -> Option<usize>,
    ) -> Vec<String> {
        let mut skipped = Vec::new();
        let Ok(read) = std::fs::read_dir(dir) else {
            return skipped;
        };
        let mut dirs: Vec<_> = read
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for d in dirs {
            let name = d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !crate::steering::store::valid_name(&name) {
                skipped.push(format!(
                    "{}: an SAE's name must be [a-z0-9_.-]{{1,64}}, not starting with a dot",
                    d.display()
                ));
                continue;
            }
            match Sae::load_dir(&name, &d) {
                Ok(mut sae) => match width_of(sae.site, sae.layer) {
                    Some(w) if w == sae.d_in => {
                        sae.files = owned_folder(&d).then(|| d.clone());
                        self.insert(sae);
                    }
                    Some(w) => skipped.push(format!(
                        "{}: d_in {} does not match the model's width {w} at {}",
                        d.display(),
                        sae.d_in,
                        sae.hook_name
                    )),
                    None => skipped.push(format!(
                        "{}: the model has no layer {}",
                        d.display(),
                        sae.layer
                    )),
                },
                Err(e) => skipped.push(format!("{}: {e:#}", d.display())),
            }
        }
        skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-in, 3-feature SAE with hand-picked weights.
    fn tiny(arch: SaeArchitecture, threshold: Option<Vec<f32>>) -> Sae {
        let parts = SaeParts {
            // W_enc [2, 3]
            w_enc: vec![1.0, 0.0, 1.0, 0.0, 1.0, -1.0],
            // W_dec [3, 2]
            w_dec: vec![1.0, 0.0, 0.0, 1.0, 0.5, 0.5],
            b_enc: vec![0.0, -0.5, 0.1],
            b_dec: vec![0.1, -0.1],
            threshold,
            d_in: 2,
            d_sae: 3,
        };
        Sae::new("t", parts, arch, true, "blocks.1.hook_resid_post").unwrap()
    }

    #[test]
    fn encode_and_decode_by_hand() {
        let sae = tiny(SaeArchitecture::Standard, None);
        // x - b_dec = (1.9, 0.6); pre = (1.9, 0.6 - 0.5, 1.9 - 0.6 + 0.1) = (1.9, 0.1, 1.4).
        let f = sae.encode(&[2.0, 0.5], 1).unwrap();
        for (a, b) in f.iter().zip([1.9f32, 0.1, 1.4]) {
            assert!((a - b).abs() < 1e-6, "{f:?}");
        }
        // x̂ = f W_dec + b_dec = (1.9 + 0.7 + 0.1, 0.1 + 0.7 - 0.1) = (2.7, 0.7).
        let x = sae.decode(&f, 1).unwrap();
        assert!(
            (x[0] - 2.7).abs() < 1e-6 && (x[1] - 0.7).abs() < 1e-6,
            "{x:?}"
        );
        // Negative pre-activations are cut by ReLU.
        let f = sae.encode(&[0.1, 2.0], 1).unwrap();
        assert_eq!(f[0], 0.0);
        assert!((sae.feature_activation(&[2.0, 0.5], 2) - 1.4).abs() < 1e-6);
    }

    #[test]
    fn jumprelu_cuts_at_the_threshold_and_topk_keeps_k() {
        let sae = tiny(SaeArchitecture::Jumprelu, Some(vec![2.0, 0.05, 1.0]));
        let f = sae.encode(&[2.0, 0.5], 1).unwrap();
        // pre = (1.9, 0.1, 1.4): feature 0 is below its threshold 2.0, the others above.
        assert_eq!(f[0], 0.0);
        assert!((f[1] - 0.1).abs() < 1e-6 && (f[2] - 1.4).abs() < 1e-6);
        assert_eq!(sae.feature_activation(&[2.0, 0.5], 0), 0.0);
        // JumpReLU is ReLU(z)·H(z - θ): a negative threshold never lets a negative z through.
        // x - b_dec = (-0.1, 0.1); pre = (-0.1, -0.4, -0.1), all above θ = -1.
        let sae = tiny(SaeArchitecture::Jumprelu, Some(vec![-1.0; 3]));
        assert_eq!(sae.encode(&[0.0, 0.0], 1).unwrap(), [0.0; 3]);
        assert_eq!(sae.feature_activation(&[0.0, 0.0], 1), 0.0);
        let sae = tiny(SaeArchitecture::Topk { k: 1 }, None);
        let f = sae.encode(&[2.0, 0.5], 1).unwrap();
        assert_eq!(f.iter().filter(|v| **v != 0.0).count(), 1);
        assert!((f[0] - 1.9).abs() < 1e-6);
    }

    #[test]
    fn an_sae_without_features_or_inputs_is_refused() {
        for (d_in, d_sae) in [(2, 0), (0, 3)] {
            let parts = SaeParts {
                w_enc: vec![],
                w_dec: vec![],
                b_enc: vec![0.0; d_sae],
                b_dec: vec![0.0; d_in],
                threshold: None,
                d_in,
                d_sae,
            };
            let e = Sae::new(
                "z",
                parts,
                SaeArchitecture::Standard,
                true,
                "blocks.1.hook_resid_post",
            );
            assert!(e.is_err());
        }
    }

    /// An .npz whose array header claims far more data than the file holds is refused before
    /// anything is allocated (candle would allocate the claimed size and abort the process).
    #[test]
    fn forged_npz_headers_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("params.npz");
        let forged = |shape: &str, data: usize| {
            use std::io::Write;
            let file = std::fs::File::create(&path).unwrap();
            let mut z = zip::ZipWriter::new(file);
            let stored = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            z.start_file("W_enc.npy", stored).unwrap();
            let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
            let mut npy = b"\x93NUMPY\x01\x00".to_vec();
            npy.extend((header.len() as u16).to_le_bytes());
            npy.extend(header.as_bytes());
            npy.extend(vec![0u8; data]);
            z.write_all(&npy).unwrap();
            z.finish().unwrap();
        };
        forged("(1000000, 1000000)", 16);
        let e = format!("{:#}", SaeParts::from_npz(&path).unwrap_err());
        assert!(e.contains("declares 4000000000000 bytes"), "{e}");
        forged("(18446744073709551615, 2)", 16);
        assert!(SaeParts::from_npz(&path).is_err());
        // An honest header passes the check (and then fails only for the missing arrays).
        forged("(2, 2)", 16);
        let e = format!("{:#}", SaeParts::from_npz(&path).unwrap_err());
        assert!(!e.contains("declares"), "{e}");
        assert_eq!(
            npy_data_bytes("{'descr': '<f2', 'fortran_order': False, 'shape': (3,), }"),
            Some(6)
        );
        assert_eq!(
            npy_data_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (), }"),
            Some(8)
        );
    }

    #[test]
    fn hook_names() {
        assert_eq!(
            parse_hook_name("blocks.12.hook_resid_post").unwrap(),
            (HookSite::ResidPost, 12)
        );
        assert_eq!(
            parse_hook_name("blocks.3.mlp.hook_post").unwrap(),
            (HookSite::MlpAct, 3)
        );
        assert!(parse_hook_name("blocks.x.hook_resid_post").is_err());
        assert!(parse_hook_name("blocks.1.hook_q").is_err());
    }
}
