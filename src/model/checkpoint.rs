//! Opening a model checkpoint: a GGUF file (quantized weights stay quantized) or a Hugging Face
//! folder (`config.json`, `*.safetensors`, `tokenizer.json`, optional `tokenizer_config.json`).
//! Gives the model its hyper-parameters and tensors by checkpoint name, and the tokenizer and
//! chat template that come with it.

use super::chat::ChatTemplate;
use super::tokenizer::TextTokenizer;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// Where the weights come from; decides tensor names and the rotary layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    Gguf,
    HfFolder,
}

enum Source {
    Gguf {
        content: gguf_file::Content,
        file: std::fs::File,
    },
    Hf {
        config: serde_json::Value,
        tensors: MmapedSafetensors,
        tokenizer_config: Option<serde_json::Value>,
    },
}

/// A GGUF tensor as stored: its type, its shape, and a reader over exactly its bytes.
pub type StoredTensor<'a> = (GgmlDType, Vec<usize>, std::io::Take<&'a mut std::fs::File>);

/// An opened checkpoint.
pub struct Checkpoint {
    pub path: PathBuf,
    source: Source,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .finish()
    }
}

impl Checkpoint {
    /// Opens a `.gguf` file or a Hugging Face model folder.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::open_hf(path)
        } else if path.is_file() {
            let mut file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            super::gguf_header::check(&mut std::io::BufReader::new(&mut file))
                .map_err(|e| anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
            let content = match gguf_file::Content::read(&mut file) {
                Ok(c) => c,
                Err(e) => {
                    match super::gguf_header::refusal(&mut std::io::BufReader::new(&mut file)) {
                        Some(refusal) => bail!("{}: {refusal}", path.display()),
                        None => bail!("{} is not a readable GGUF file: {e}", path.display()),
                    }
                }
            };
            Ok(Self {
                path: path.to_path_buf(),
                source: Source::Gguf { content, file },
            })
        } else {
            bail!("model path {} does not exist", path.display())
        }
    }

    fn open_hf(dir: &Path) -> Result<Self> {
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            Ok(Some(
                serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?,
            ))
        };
        let config = read_json("config.json")?
            .with_context(|| format!("{} has no config.json", dir.display()))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{} has no *.safetensors files", dir.display());
        }
        // SAFETY: the files are memory-mapped read-only; like every mmap user we rely on nobody
        // truncating them while the server runs.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| anyhow!("reading safetensors in {}: {e}", dir.display()))?;
        Ok(Self {
            path: dir.to_path_buf(),
            source: Source::Hf {
                config,
                tensors,
                tokenizer_config: read_json("tokenizer_config.json")?,
            },
        })
    }

    pub fn format(&self) -> CheckpointFormat {
        match self.source {
            Source::Gguf { .. } => CheckpointFormat::Gguf,
            Source::Hf { .. } => CheckpointFormat::HfFolder,
        }
    }

    /// A short name for the model: the file stem, or the folder name.
    pub fn default_id(&self) -> String {
        let name = match self.format() {
            CheckpointFormat::Gguf => self.path.file_stem(),
            CheckpointFormat::HfFolder => self.path.file_name(),
        };
        name.map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }

    /// GGUF `general.architecture`, or Hugging Face `model_type` (`llama` when a config.json
    /// names none, as the oldest Llama checkpoints do).
    pub fn architecture_name(&self) -> Result<String> {
        match &self.source {
            Source::Gguf { content, .. } => content
                .metadata
                .get("general.architecture")
                .and_then(|v| v.to_string().ok())
                .cloned()
                .context("GGUF metadata has no `general.architecture`"),
            Source::Hf { config, .. } => Ok(config
                .get("model_type")
                .and_then(|v| v.as_str())
                .unwrap_or("llama")
                .to_string()),
        }
    }

    pub fn gguf_metadata(&self) -> Option<&std::collections::HashMap<String, gguf_file::Value>> {
        match &self.source {
            Source::Gguf { content, .. } => Some(&content.metadata),
            Source::Hf { .. } => None,
        }
    }

    pub fn hf_config(&self) -> Option<&serde_json::Value> {
        match &self.source {
            Source::Hf { config, .. } => Some(config),
            Source::Gguf { .. } => None,
        }
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        match &self.source {
            Source::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            Source::Hf { tensors, .. } => tensors.get(name).is_ok(),
        }
    }

    /// A GGUF tensor as it is stored: its type, its shape and a reader over exactly its bytes
    /// (`None` for a Hugging Face folder).
    pub fn gguf_tensor(&mut self, name: &str) -> Result<Option<StoredTensor<'_>>> {
        use std::io::{Read, Seek, SeekFrom};
        let Source::Gguf { content, file } = &mut self.source else {
            return Ok(None);
        };
        let info = content
            .tensor_infos
            .get(name)
            .with_context(|| format!("the GGUF file has no tensor `{name}`"))?;
        let dtype = info.ggml_dtype;
        let dims = info.shape.dims().to_vec();
        let elems: usize = dims.iter().product();
        let bytes = (elems / dtype.block_size()) as u64 * dtype.type_size() as u64;
        let start = content.tensor_data_offset + info.offset;
        let len = file.metadata()?.len();
        if start.checked_add(bytes).is_none_or(|end| end > len) {
            bail!("tensor `{name}` lies past the end of the file");
        }
        file.seek(SeekFrom::Start(start))?;
        Ok(Some((dtype, dims, file.take(bytes))))
    }

    /// Reads a tensor by its checkpoint name. Safetensors weights come back as f32.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        match &mut self.source {
            Source::Gguf { content, file } => content
                .tensor(file, name, device)
                .map_err(|e| anyhow!("tensor `{name}`: {e}")),
            Source::Hf { tensors, .. } => {
                let t = tensors
                    .load(name, device)
                    .map_err(|e| anyhow!("tensor `{name}`: {e}"))?
                    .to_dtype(DType::F32)?;
                Ok(QTensor::quantize(&t, GgmlDType::F32)?)
            }
        }
    }

    /// The tokenizer that belongs to the weights.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        match &self.source {
            Source::Gguf { content, .. } => TextTokenizer::from_gguf(content),
            Source::Hf {
                tokenizer_config, ..
            } => TextTokenizer::from_hf_folder(&self.path, tokenizer_config.as_ref()),
        }
    }

    /// The model's chat template, if it ships one.
    pub fn chat_template(&self, tokenizer: &TextTokenizer) -> Result<Option<ChatTemplate>> {
        let source = match &self.source {
            Source::Gguf { content, .. } => content
                .metadata
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
            Source::Hf {
                tokenizer_config, ..
            } => tokenizer_config
                .as_ref()
                .and_then(|c| c.get("chat_template"))
                .and_then(|t| match t {
                    serde_json::Value::String(s) => Some(s.clone()),
                    // A list of named templates: take "default".
                    serde_json::Value::Array(items) => items
                        .iter()
                        .find(|i| i.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|i| i.get("template"))
                        .and_then(|t| t.as_str())
                        .map(str::to_string),
                    _ => None,
                }),
        };
        let text = |t: &Option<super::tokenizer::SpecialToken>| {
            t.as_ref().map(|t| t.text.clone()).unwrap_or_default()
        };
        source
            .map(|s| ChatTemplate::new(&s, &text(&tokenizer.bos), &text(&tokenizer.eos)))
            .transpose()
    }
}
