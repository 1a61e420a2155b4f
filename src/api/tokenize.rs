//! The tokenizer over HTTP, so a client can check token ids against another implementation
//! and evaluation harnesses can tokenize without downloading the model: `POST /tokenize`,
//! `POST /detokenize` and `GET /tokenizer_info` in vLLM's shapes (which lm-evaluation-harness's
//! remote tokenizer calls), also accepting llama-server's field names (`content`,
//! `add_special`, `with_pieces`).

use super::json::ApiJson;
use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::model::chat::ChatMessage;
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Text (or a conversation) to turn into token ids.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "The Golden Gate Bridge", "add_special_tokens": false}))]
pub struct TokenizeRequest {
    /// The served model's id (optional; checked when given).
    #[serde(default)]
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: Option<String>,
    /// Text to tokenize (vLLM's field). Give this, `content` or `messages`.
    #[serde(default)]
    #[schema(example = "The Golden Gate Bridge")]
    pub prompt: Option<String>,
    /// Text to tokenize (llama-server's field).
    #[serde(default)]
    #[schema(example = "The Golden Gate Bridge")]
    pub content: Option<String>,
    /// A conversation, rendered with the chat template as generation renders it.
    #[serde(default)]
    #[schema(example = json!([{"role": "user", "content": "Hi!"}]))]
    pub messages: Option<Vec<ChatMessage>>,
    /// Prepend BOS when the model wants one (vLLM's field; default true with `prompt`).
    #[serde(default)]
    #[schema(example = false)]
    pub add_special_tokens: Option<bool>,
    /// llama-server's name for `add_special_tokens` (default false with `content`).
    #[serde(default)]
    #[schema(example = false)]
    pub add_special: Option<bool>,
    /// Return `{id, piece}` objects instead of bare ids (llama-server's field).
    #[serde(default)]
    #[schema(example = false)]
    pub with_pieces: Option<bool>,
    /// Also return each token's text in `token_strs` (vLLM's field).
    #[serde(default)]
    #[schema(example = false)]
    pub return_token_strs: Option<bool>,
}

/// A token id with its text.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenPiece {
    /// The token id.
    #[schema(example = 476)]
    pub id: u32,
    /// The token's text (special tokens as written).
    #[schema(example = " Golden")]
    pub piece: String,
}

/// A token id, or an id with its text when `with_pieces` was asked.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TokenOut {
    Id(u32),
    Piece(TokenPiece),
}

/// The token ids of the text.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenizeResponse {
    /// Number of tokens.
    #[schema(example = 4)]
    pub count: usize,
    /// The model's context length.
    #[schema(example = 8192)]
    pub max_model_len: usize,
    /// The ids (or `{id, piece}` with `with_pieces`).
    #[schema(example = json!([504, 12726, 14040, 9549]))]
    pub tokens: Vec<TokenOut>,
    /// Each token's text, with `return_token_strs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = json!(["The", " Golden", " Gate", " Bridge"]))]
    pub token_strs: Option<Vec<String>>,
}

/// Token ids to turn back into text.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"tokens": [504, 12726, 14040, 9549]}))]
pub struct DetokenizeRequest {
    /// The served model's id (optional; checked when given).
    #[serde(default)]
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: Option<String>,
    /// Token ids.
    #[schema(example = json!([504, 12726, 14040, 9549]))]
    pub tokens: Vec<u32>,
}

/// The text of the ids (special tokens left out).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DetokenizeResponse {
    /// The text (vLLM's field).
    #[schema(example = "The Golden Gate Bridge")]
    pub prompt: String,
    /// The same text (llama-server's field).
    #[schema(example = "The Golden Gate Bridge")]
    pub content: String,
}

/// What a client needs to use the tokenizer remotely.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenizerInfo {
    /// The served model's id.
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// `gpt2` (byte-level BPE), `llama` (SentencePiece) or `huggingface` (tokenizer.json).
    #[schema(example = "gpt2")]
    pub tokenizer_class: String,
    /// Tokens in the vocabulary.
    #[schema(example = 49152)]
    pub vocab_size: usize,
    /// The beginning-of-sequence token's text.
    #[schema(example = "<|im_start|>")]
    pub bos_token: Option<String>,
    /// The end-of-sequence token's text.
    #[schema(example = "<|im_end|>")]
    pub eos_token: Option<String>,
    /// The padding token's text.
    #[schema(example = "<|im_end|>")]
    pub pad_token: Option<String>,
    /// Whether `add_special_tokens` prepends BOS for this model.
    #[schema(example = false)]
    pub add_bos_token: bool,
    /// The chat template (Jinja), if the model has one.
    #[schema(example = "{% for message in messages %}...")]
    pub chat_template: Option<String>,
    /// The model's context length.
    #[schema(example = 8192)]
    pub model_max_length: usize,
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if !m.is_empty() && m != state.engine.model.id => Err(ApiError::not_found(
            "unknown_model",
            format!(
                "`{m}` is not served here; this server runs `{}`",
                state.engine.model.id
            ),
        )
        .with_param("model")),
        _ => Ok(()),
    }
}

/// Tokenizes text or a conversation with the served model's tokenizer.
#[utoipa::path(post, path = "/tokenize", tag = "tokenizer",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "The token ids", body = TokenizeResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "Another model was named", body = ErrorBody),
        (status = 422, description = "No text, two texts, a chat without a template, or too many tokens", body = ErrorBody)))]
pub async fn tokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    check_model(&state, req.model.as_deref())?;
    let texts = [&req.prompt, &req.content]
        .iter()
        .filter(|t| t.is_some())
        .count()
        + usize::from(req.messages.is_some());
    if texts != 1 {
        return Err(ApiError::invalid(
            "prompt",
            if texts == 0 {
                "missing_input"
            } else {
                "conflicting_input"
            },
            "give exactly one of `prompt`, `content` or `messages`",
        ));
    }
    let add_special = req
        .add_special_tokens
        .or(req.add_special)
        .unwrap_or(req.prompt.is_some());
    let limit = state.config.limits.max_tokenize_tokens;
    let bytes = [&req.prompt, &req.content]
        .iter()
        .map(|t| t.as_ref().map_or(0, String::len))
        .sum::<usize>()
        + req
            .messages
            .as_ref()
            .map_or(0, |ms| ms.iter().map(|m| m.content.len()).sum());
    super::generate::check_text_size("prompt", bytes, limit, "limits.max_tokenize_tokens")?;
    let model = state.engine.model.clone();
    let (prompt, content, messages) = (req.prompt, req.content, req.messages);
    let ids = tokio::task::spawn_blocking(move || match (prompt.or(content), messages) {
        (Some(text), _) => model
            .tokenizer
            .encode(&text, add_special)
            .map_err(|e| ApiError::invalid("prompt", "tokenize_failed", format!("{e:#}"))),
        (None, Some(ms)) => super::generate::encode_chat_messages(&model, &ms),
        (None, None) => Ok(Vec::new()),
    })
    .await
    .map_err(|e| ApiError::internal("tokenizing", e))??;
    if ids.len() > limit {
        return Err(ApiError::invalid(
            "prompt",
            "too_many_tokens",
            format!(
                "the text is {} tokens; limits.max_tokenize_tokens is {limit}",
                ids.len()
            ),
        ));
    }
    let tok = &state.engine.model.tokenizer;
    let pieces = req.with_pieces.unwrap_or(false);
    let tokens = ids
        .iter()
        .map(|&id| match pieces {
            true => TokenOut::Piece(TokenPiece {
                id,
                piece: tok.token_text(id),
            }),
            false => TokenOut::Id(id),
        })
        .collect();
    Ok(Json(TokenizeResponse {
        count: ids.len(),
        max_model_len: state.engine.model.dims().context_length,
        tokens,
        token_strs: req
            .return_token_strs
            .unwrap_or(false)
            .then(|| ids.iter().map(|&id| tok.token_text(id)).collect()),
    }))
}

/// Turns token ids back into text with the served model's tokenizer.
#[utoipa::path(post, path = "/detokenize", tag = "tokenizer",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, description = "The text", body = DetokenizeResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "Another model was named", body = ErrorBody),
        (status = 422, description = "An id outside the vocabulary, or too many ids", body = ErrorBody)))]
pub async fn detokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    check_model(&state, req.model.as_deref())?;
    let limit = state.config.limits.max_tokenize_tokens;
    if req.tokens.len() > limit {
        return Err(ApiError::invalid(
            "tokens",
            "too_many_tokens",
            format!(
                "{} ids; limits.max_tokenize_tokens is {limit}",
                req.tokens.len()
            ),
        ));
    }
    let vocab = state.engine.model.tokenizer.vocab_size;
    if let Some(i) = req.tokens.iter().position(|&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            &format!("tokens[{i}]"),
            "invalid_token",
            format!(
                "{} is outside the vocabulary of {vocab} tokens",
                req.tokens[i]
            ),
        ));
    }
    let model = state.engine.model.clone();
    let text = tokio::task::spawn_blocking(move || model.tokenizer.decode(&req.tokens))
        .await
        .map_err(|e| ApiError::internal("detokenizing", e))?
        .map_err(|e| ApiError::internal("detokenizing", format!("{e:#}")))?;
    Ok(Json(DetokenizeResponse {
        content: text.clone(),
        prompt: text,
    }))
}

/// The tokenizer's special tokens, chat template and sizes.
#[utoipa::path(get, path = "/tokenizer_info", tag = "tokenizer",
    responses((status = 200, description = "Tokenizer facts", body = TokenizerInfo)))]
pub async fn tokenizer_info(State(state): State<AppState>) -> Json<TokenizerInfo> {
    let m = &state.engine.model;
    let t = &m.tokenizer;
    let text =
        |s: &Option<crate::model::tokenizer::SpecialToken>| s.as_ref().map(|s| s.text.clone());
    Json(TokenizerInfo {
        model: m.id.clone(),
        tokenizer_class: t.kind.to_string(),
        vocab_size: t.vocab_size,
        bos_token: text(&t.bos),
        eos_token: text(&t.eos),
        pad_token: text(&t.pad),
        add_bos_token: t.add_bos,
        chat_template: m.chat_template.as_ref().map(|c| c.source().to_string()),
        model_max_length: m.dims().context_length,
    })
}
