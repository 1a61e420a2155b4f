//! Text ⇄ token ids, built from a GGUF file's `tokenizer.ggml.*` metadata or a Hugging Face
//! `tokenizer.json`, plus streaming detokenization.
//!
//! SmolLM2's GGUF declares `tokenizer.ggml.pre = smollm`, which candle's GGUF builder does not
//! know (it falls back to plain GPT-2 rules and gets most ids wrong). We build that one
//! ourselves, as its Hugging Face `tokenizer.json` does: digits split one by one, then GPT-2
//! byte-level BPE with no prefix space; token types 3 (control) and 4 (user-defined) are
//! special. Other `gpt2`-family pre-tokenizers go through candle's builder.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer};

/// A tokenizer with the facts about special tokens that generation needs.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Prepended to raw prompts (Llama 2/3); SmolLM2 adds none.
    pub bos: Option<SpecialToken>,
    pub add_bos: bool,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
    pub eos: Option<SpecialToken>,
    /// Size of the model's vocabulary (including special tokens).
    pub vocab_size: usize,
}

#[derive(Debug, Clone)]
pub struct SpecialToken {
    pub id: u32,
    pub text: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
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

fn meta_strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    let arr = meta(ct, key)
        .with_context(|| format!("GGUF metadata has no `{key}`"))?
        .to_vec()
        .map_err(|e| anyhow!("`{key}`: {e}"))?;
    arr.iter()
        .map(|v| v.to_string().cloned().map_err(|e| anyhow!("`{key}`: {e}")))
        .collect()
}

impl TextTokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let kind = meta(ct, "tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if kind != "gpt2" {
            bail!(
                "GGUF tokenizer model `{kind}` is not supported (only byte-level BPE, `gpt2`); \
                 load the model from a Hugging Face folder with tokenizer.json instead"
            );
        }
        let tokens = meta_strings(ct, "tokenizer.ggml.tokens")?;
        let pre = meta(ct, "tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "default".into());
        let mut inner = if pre == "smollm" {
            smollm_tokenizer(ct, &tokens)?
        } else {
            Tokenizer::from_gguf(ct).map_err(|e| anyhow!("building the GGUF tokenizer: {e}"))?
        };
        // candle's builder may attach a post-processor that adds BOS; we add it ourselves.
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
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
        let add_bos = meta(ct, "tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let mut eos_ids: Vec<u32> = eos.iter().map(|t| t.id).collect();
        if let Some(eot) = meta_u32(ct, "tokenizer.ggml.eot_token_id") {
            eos_ids.push(eot);
        }
        // Chat models end a turn with their template's end marker even when the file names
        // another EOS (e.g. Llama 3's <|eot_id|>).
        for marker in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(id) = tokens.iter().position(|t| t == marker) {
                eos_ids.push(id as u32);
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Self {
            vocab_size: tokens.len(),
            inner,
            bos,
            add_bos,
            eos_ids,
            eos,
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
        let add_bos = tokenizer_config
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut eos_ids: Vec<u32> = eos.iter().map(|t| t.id).collect();
        for marker in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end|>",
            "<end_of_turn>",
            "</s>",
        ] {
            if let Some(id) = inner.token_to_id(marker) {
                eos_ids.push(id);
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Self {
            vocab_size: inner.get_vocab_size(true),
            inner,
            bos,
            add_bos,
            eos_ids,
            eos,
        })
    }

    /// Encodes text; special-token text (`<|im_start|>`) becomes its special id. `add_bos`
    /// prepends the BOS token when the model wants one and the text does not start with it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
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
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("detokenizing: {e}"))
    }

    /// The text of one token as the model sees it, special tokens included (`<|im_end|>`).
    pub fn token_text(&self, id: u32) -> String {
        match self.inner.decode(&[id], false) {
            Ok(s) if !s.is_empty() => s,
            _ => self.inner.id_to_token(id).unwrap_or_default(),
        }
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}

fn smollm_tokenizer(ct: &gguf_file::Content, tokens: &[String]) -> Result<Tokenizer> {
    let merges: Vec<(String, String)> = meta_strings(ct, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("invalid merge `{m}`"))
        })
        .collect::<Result<_>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect::<HashMap<_, _>>()
        .into_iter()
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("building BPE: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]))));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    let types = meta(ct, "tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .context("GGUF metadata has no `tokenizer.ggml.token_type`")?;
    let specials: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| {
            matches!(
                t.to_i32()
                    .ok()
                    .or_else(|| t.to_u32().ok().map(|x| x as i32)),
                Some(3 | 4)
            )
        })
        .filter_map(|(i, _)| tokens.get(i))
        .map(|t| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| anyhow!("adding special tokens: {e}"))?;
    Ok(tok)
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
