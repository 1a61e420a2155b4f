//! Text ⇄ token ids, built from a GGUF file's `tokenizer.ggml.*` metadata or a Hugging Face
//! `tokenizer.json`, plus streaming detokenization.
//!
//! GGUF vocabularies come in two kinds, each built to give the ids llama.cpp gives:
//! byte-level BPE (`tokenizer.ggml.model = gpt2`: SmolLM2, Qwen2, Llama 3; see [`bpe`]) and
//! SentencePiece (`llama`: Gemma, Llama 2; see [`spm`]). Hugging Face folders use their own
//! `tokenizer.json` through the `tokenizers` crate.

pub mod bpe;
pub mod spm;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use spm::{SpmTokenizer, TokenType};
use std::path::Path;
use tokenizers::Tokenizer;

/// The tokenizer proper.
#[derive(Clone)]
enum Engine {
    /// The `tokenizers` crate: GGUF byte-level BPE, or a Hugging Face `tokenizer.json`.
    Hf(Box<Tokenizer>),
    /// GGUF SentencePiece.
    Spm(Box<SpmTokenizer>),
}

/// A tokenizer with the facts about special tokens that generation needs.
#[derive(Clone)]
pub struct TextTokenizer {
    engine: Engine,
    /// Prepended to raw prompts when `add_bos` (Llama, Gemma); SmolLM2 adds none.
    pub bos: Option<SpecialToken>,
    pub add_bos: bool,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
    pub eos: Option<SpecialToken>,
    /// The padding token, if the model names one.
    pub pad: Option<SpecialToken>,
    /// Size of the model's vocabulary (including special tokens).
    pub vocab_size: usize,
    /// `gpt2` (byte-level BPE), `llama` (SentencePiece) or `huggingface` (a tokenizer.json).
    pub kind: &'static str,
}

#[derive(Debug, Clone)]
pub struct SpecialToken {
    pub id: u32,
    pub text: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Option<&'a gguf_file::Value> {
    ct.metadata.get(key)
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    meta(ct, key).and_then(|v| {
        v.to_u32()
            .ok()
            .or_else(|| v.to_i32().ok().map(|x| x as u32))
    })
}

fn meta_bool(ct: &gguf_file::Content, key: &str) -> Option<bool> {
    meta(ct, key).and_then(|v| v.to_bool().ok())
}

pub(crate) fn meta_strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    let arr = meta(ct, key)
        .with_context(|| format!("GGUF metadata has no `{key}`"))?
        .to_vec()
        .map_err(|e| anyhow!("`{key}`: {e}"))?;
    arr.iter()
        .map(|v| v.to_string().cloned().map_err(|e| anyhow!("`{key}`: {e}")))
        .collect()
}

fn meta_floats(ct: &gguf_file::Content, key: &str) -> Result<Vec<f32>> {
    let arr = meta(ct, key)
        .with_context(|| format!("GGUF metadata has no `{key}`"))?
        .to_vec()
        .map_err(|e| anyhow!("`{key}`: {e}"))?;
    arr.iter()
        .map(|v| v.to_f32().map_err(|e| anyhow!("`{key}`: {e}")))
        .collect()
}

/// End-of-turn markers of chat templates: generation stops at them even when the file names
/// another EOS (Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`).
const END_OF_TURN_MARKERS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
];

impl TextTokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let kind = meta(ct, "tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let tokens = meta_strings(ct, "tokenizer.ggml.tokens")?;
        let types = bpe::token_types(ct, tokens.len())?;
        if types.len() != tokens.len() {
            bail!(
                "GGUF vocabulary has {} tokens but {} token types",
                tokens.len(),
                types.len()
            );
        }
        let (engine, kind) = match kind.as_str() {
            "gpt2" => {
                let mut t = bpe::from_gguf(ct, &tokens, &types)?;
                t.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
                (Engine::Hf(Box::new(t)), "gpt2")
            }
            "llama" => {
                let scores = match meta(ct, "tokenizer.ggml.scores") {
                    Some(_) => meta_floats(ct, "tokenizer.ggml.scores")?,
                    None => vec![0.0; tokens.len()],
                };
                let spm = SpmTokenizer::new(
                    tokens.clone(),
                    scores,
                    types.iter().map(|&t| TokenType::from_gguf(t)).collect(),
                    meta_u32(ct, "tokenizer.ggml.unknown_token_id"),
                    meta_bool(ct, "tokenizer.ggml.add_space_prefix").unwrap_or(true),
                )
                .map_err(|e| anyhow!("GGUF SentencePiece vocabulary: {e}"))?;
                (Engine::Spm(Box::new(spm)), "llama")
            }
            other => bail!(
                "GGUF tokenizer model `{other}` is not supported (supported: `gpt2`, byte-level \
                 BPE; `llama`, SentencePiece); load the model from a Hugging Face folder with \
                 tokenizer.json instead"
            ),
        };
        let special = |key: &str| {
            meta_u32(ct, key).and_then(|id| {
                tokens.get(id as usize).map(|t| SpecialToken {
                    id,
                    text: t.clone(),
                })
            })
        };
        let bos = special("tokenizer.ggml.bos_token_id");
        let eos = special("tokenizer.ggml.eos_token_id");
        let pad = special("tokenizer.ggml.padding_token_id");
        // llama.cpp's default: SentencePiece vocabularies add BOS unless told otherwise.
        let add_bos = meta_bool(ct, "tokenizer.ggml.add_bos_token").unwrap_or(kind == "llama");
        let mut eos_ids: Vec<u32> = eos.iter().map(|t| t.id).collect();
        if let Some(eot) = meta_u32(ct, "tokenizer.ggml.eot_token_id") {
            eos_ids.push(eot);
        }
        for marker in END_OF_TURN_MARKERS {
            if let Some(id) = tokens.iter().position(|t| t == marker) {
                if matches!(types.get(id), Some(3 | 4)) {
                    eos_ids.push(id as u32);
                }
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Self {
            vocab_size: tokens.len(),
            engine,
            bos,
            add_bos,
            eos_ids,
            eos,
            pad,
            kind,
        })
    }

    /// Loads `tokenizer.json` (and `tokenizer_config.json`, if present, for BOS/EOS) from a
    /// Hugging Face model folder.
    pub fn from_hf_folder(
        dir: &Path,
        tokenizer_config: Option<&serde_json::Value>,
    ) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut inner =
            Tokenizer::from_file(&path).map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        let token_text = |key: &str| -> Option<String> {
            let v = tokenizer_config?.get(key)?;
            v.as_str().map(str::to_string).or_else(|| {
                v.get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string)
            })
        };
        let special = |key: &str| {
            token_text(key)
                .and_then(|text| inner.token_to_id(&text).map(|id| SpecialToken { id, text }))
        };
        let bos = special("bos_token");
        let eos = special("eos_token");
        let pad = special("pad_token");
        let add_bos = tokenizer_config
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut eos_ids: Vec<u32> = eos.iter().map(|t| t.id).collect();
        for marker in END_OF_TURN_MARKERS.iter().chain(&["</s>"]) {
            if let Some(id) = inner.token_to_id(marker) {
                eos_ids.push(id);
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Self {
            vocab_size: inner.get_vocab_size(true),
            engine: Engine::Hf(Box::new(inner)),
            bos,
            add_bos,
            eos_ids,
            eos,
            pad,
            kind: "huggingface",
        })
    }

    /// Encodes text; special-token text (`<|im_start|>`) becomes its special id. `add_bos`
    /// prepends the BOS token when the model wants one and the text does not start with it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = match &self.engine {
            Engine::Hf(t) => t
                .encode_fast(text, false)
                .map_err(|e| anyhow!("tokenizing: {e}"))?
                .get_ids()
                .to_vec(),
            Engine::Spm(t) => t.encode(text),
        };
        if add_bos && self.add_bos {
            if let Some(bos) = &self.bos {
                if ids.first() != Some(&bos.id) {
                    ids.insert(0, bos.id);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.engine {
            Engine::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| anyhow!("detokenizing: {e}")),
            Engine::Spm(t) => Ok(t.decode(ids, false)),
        }
    }

    /// The text of one token as the model sees it, special tokens included (`<|im_end|>`).
    pub fn token_text(&self, id: u32) -> String {
        match &self.engine {
            Engine::Hf(t) => match t.decode(&[id], false) {
                Ok(s) if !s.is_empty() => s,
                _ => t.id_to_token(id).unwrap_or_default(),
            },
            Engine::Spm(t) => t.token_text(id),
        }
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json` (byte-level BPE only).
    pub fn save_json(&self, path: &Path) -> Result<()> {
        match &self.engine {
            Engine::Hf(t) => t
                .save(path, false)
                .map_err(|e| anyhow!("writing {}: {e}", path.display())),
            Engine::Spm(_) => {
                bail!("a SentencePiece vocabulary cannot be written as tokenizer.json")
            }
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.engine {
            Engine::Hf(t) => t.token_to_id(token),
            Engine::Spm(t) => t.token_to_id(token),
        }
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}

/// Turns a growing list of token ids into text deltas, holding back bytes that do not yet form
/// whole UTF-8 characters (a byte-level BPE token may end mid-character). Decodes only a short
/// window of recent ids per step (text-generation-inference's prefix/read offsets).
#[derive(Debug, Default, Clone)]
pub struct DetokenizeStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl DetokenizeStream {
    /// Adds a token and returns the new text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if text.len() <= prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let delta = match text.get(prefix.len()..) {
            Some(d) if text.starts_with(&prefix) => d.to_string(),
            _ => text.chars().skip(prefix.chars().count()).collect(),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// Text not yet handed out at the end of generation (an incomplete character, if any).
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(text.chars().skip(prefix.chars().count()).collect())
    }
}
