//! Byte-level BPE (Radford et al. 2019) from a GGUF file whose `tokenizer.ggml.model` is
//! `gpt2`: the vocabulary and merges of the file, the pre-tokenizer that
//! `tokenizer.ggml.pre` names (the same regular expressions llama.cpp uses for it, applied
//! one after another), then GPT-2's byte-to-character map. Token types 3 (control) and 4
//! (user-defined) are split out of the text before anything else, as llama.cpp does.
//!
//! candle's GGUF builder is not used: it does not know `smollm` (falling back to GPT-2 rules
//! gets most ids wrong) and normalises `qwen2` input to NFC, which llama.cpp does not.

use super::meta_strings;
use anyhow::{anyhow, Context, Result};
use candle_core::quantized::gguf_file;
use std::collections::HashMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

/// llama.cpp's rules for `default` (and for a file that names no pre-tokenizer).
const DEFAULT: [&str; 4] = [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"];
/// GPT-2's split (also StarCoder's and SmolLM's after their digit split).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's split: numbers in groups of up to three.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regular expressions of a `tokenizer.ggml.pre` value, applied in order; `None` for a
/// value tiller does not know (llama.cpp's `default` rules are used, with a warning).
fn pre_tokenizer_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "default" => DEFAULT.to_vec(),
        "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" | "trillion" => vec![GPT2],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            vec![r"\p{N}", GPT2]
        }
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3" | "pixtral" => {
            vec![LLAMA3]
        }
        "qwen2" | "stablelm2" | "hunyuan" | "deepseek-r1-qwen" | "megrez" => vec![QWEN2],
        _ => return None,
    })
}

/// Builds the tokenizer of a `gpt2` GGUF vocabulary.
pub fn from_gguf(ct: &gguf_file::Content, tokens: &[String], types: &[i32]) -> Result<Tokenizer> {
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
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "default".into());
    let regexes = pre_tokenizer_regexes(&pre).unwrap_or_else(|| {
        tracing::warn!(pre = %pre, "unknown GGUF pre-tokenizer; using llama.cpp's default rules");
        DEFAULT.to_vec()
    });
    let mut steps = regexes
        .into_iter()
        .map(|r| -> Result<PreTokenizerWrapper> {
            Ok(Split::new(
                SplitPattern::Regex(r.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("pre-tokenizer regex: {e}"))?
            .into())
        })
        .collect::<Result<Vec<_>>>()?;
    steps.push(ByteLevel::new(false, true, false).into());
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(steps))));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    // Control tokens are special (left out of decoded text); user-defined ones are split out
    // of the text the same way but decode as their text, as in llama.cpp.
    let added = |ty: i32, special: bool| -> Vec<AddedToken> {
        types
            .iter()
            .zip(tokens)
            .filter(|(t, _)| **t == ty)
            .map(|(_, text)| AddedToken::from(text.clone(), special).normalized(false))
            .collect()
    };
    tok.add_special_tokens(added(3, true))
        .map_err(|e| anyhow!("adding special tokens: {e}"))?;
    tok.add_tokens(added(4, false))
        .map_err(|e| anyhow!("adding user-defined tokens: {e}"))?;
    Ok(tok)
}

/// The token types of a GGUF vocabulary (`tokenizer.ggml.token_type`), all normal if absent.
pub fn token_types(ct: &gguf_file::Content, n: usize) -> Result<Vec<i32>> {
    let Some(v) = ct.metadata.get("tokenizer.ggml.token_type") else {
        return Ok(vec![1; n]);
    };
    v.to_vec()
        .context("`tokenizer.ggml.token_type` is not an array")?
        .iter()
        .map(|t| {
            t.to_i32()
                .or_else(|_| t.to_u32().map(|x| x as i32))
                .map_err(|e| anyhow!("`tokenizer.ggml.token_type`: {e}"))
        })
        .collect()
}
