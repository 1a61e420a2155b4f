//! The OpenAI wire format (requests, responses, chunks) as served by tiller: field names and
//! shapes follow OpenAI's API reference, plus the `steering` extension field.

use super::super::generate::StopSpec;
use crate::steering::spec::{AppliedIntervention, InterventionSpec};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A message's content: a string, or a list of parts of which only text is supported.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ContentPart {
    /// Only `text` is supported.
    #[serde(rename = "type")]
    #[schema(example = "text")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    #[schema(example = "Hello!")]
    pub text: Option<String>,
}

/// A chat message as OpenAI clients send it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiMessage {
    /// `system` (or `developer`), `user` or `assistant`.
    #[schema(example = "user")]
    pub role: String,
    /// A string, or a list of `{"type": "text", "text": ...}` parts.
    #[schema(value_type = Object, example = "What is the capital of France?")]
    pub content: Option<MessageContent>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[schema(example = true)]
    /// Send a last chunk with the token usage.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "model": "SmolLM2-135M-Instruct.Q4_1",
    "messages": [{"role": "user", "content": "Tell me about yourself."}],
    "max_tokens": 48,
    "steering": [{"vector": "golden_gate", "coefficient": 2.5}]
}))]
pub struct ChatCompletionRequest {
    /// The served model's id (see `GET /v1/models`).
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: Option<String>,
    /// The conversation (text content only).
    pub messages: Vec<OpenAiMessage>,
    /// Most tokens to generate.
    #[serde(default)]
    #[schema(example = 64)]
    pub max_tokens: Option<u64>,
    /// The same as `max_tokens` (newer clients send this); wins when both are given.
    #[serde(default)]
    #[schema(example = 64)]
    pub max_completion_tokens: Option<u64>,
    /// 0 to 2; default 1 (OpenAI's default).
    #[serde(default)]
    #[schema(example = 0.7)]
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold (0, 1].
    #[serde(default)]
    #[schema(example = 1.0)]
    pub top_p: Option<f64>,
    /// The same seed gives the same text.
    #[serde(default)]
    #[schema(example = 42)]
    pub seed: Option<u64>,
    /// A string or a list of strings that end generation.
    #[serde(default)]
    #[schema(value_type = Object, example = json!(["\n\n"]))]
    pub stop: Option<StopSpec>,
    /// Only 1 is supported.
    #[serde(default)]
    #[schema(example = 1)]
    pub n: Option<u64>,
    #[schema(example = false)]
    /// Return log-probabilities of the generated tokens.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per token (0 to 20) with `logprobs`.
    #[serde(default)]
    #[schema(example = 3)]
    pub top_logprobs: Option<u64>,
    /// Stream `chat.completion.chunk` events.
    #[schema(example = false)]
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// -2 to 2: lowers the logit of every token already generated.
    #[serde(default)]
    #[schema(example = 0.0)]
    pub presence_penalty: Option<f64>,
    /// -2 to 2: lowers a token's logit per time it was generated.
    #[serde(default)]
    #[schema(example = 0.0)]
    pub frequency_penalty: Option<f64>,
    /// tiller's steering list (send it with `extra_body`); wins over `X-Steering`.
    #[serde(default)]
    pub steering: Option<Vec<InterventionSpec>>,
    #[schema(example = json!([]))]
    /// Not supported: a non-empty list is refused.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub tools: Option<serde_json::Value>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "The Golden Gate Bridge is", "max_tokens": 24}))]
pub struct CompletionRequest {
    /// The served model's id (see `GET /v1/models`).
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: Option<String>,
    /// A string, a list of strings, a list of token ids, or a list of token-id lists: one
    /// choice per prompt (at most `limits.max_prompts_per_request`).
    #[schema(value_type = Object, example = "Once upon a time")]
    pub prompt: Option<serde_json::Value>,
    /// Default 16, as OpenAI's; 0 with `echo` scores the prompt only.
    #[serde(default)]
    #[schema(example = 32)]
    pub max_tokens: Option<u64>,
    /// 0 to 2; default 1 (OpenAI's default).
    #[serde(default)]
    #[schema(example = 0.7)]
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold (0, 1].
    #[serde(default)]
    #[schema(example = 1.0)]
    pub top_p: Option<f64>,
    /// The same seed gives the same text.
    #[serde(default)]
    #[schema(example = 42)]
    pub seed: Option<u64>,
    /// A string or a list of strings that end generation.
    #[serde(default)]
    #[schema(value_type = Object, example = json!(["\n"]))]
    pub stop: Option<StopSpec>,
    /// Only 1 is supported.
    #[serde(default)]
    #[schema(example = 1)]
    pub n: Option<u64>,
    /// Alternatives per token to return (0 to 20).
    #[serde(default)]
    #[schema(example = 2)]
    pub logprobs: Option<u64>,
    #[schema(example = false)]
    /// Return the prompt before the completion; with `logprobs`, its tokens'
    /// log-probabilities too (the first `null`). Not with `stream`.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Stream `text_completion` chunks.
    #[schema(example = false)]
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// -2 to 2: lowers the logit of every token already generated.
    #[serde(default)]
    #[schema(example = 0.0)]
    pub presence_penalty: Option<f64>,
    /// -2 to 2: lowers a token's logit per time it was generated.
    #[serde(default)]
    #[schema(example = 0.0)]
    pub frequency_penalty: Option<f64>,
    /// tiller's steering list (send it with `extra_body`); wins over `X-Steering`.
    #[serde(default)]
    pub steering: Option<Vec<InterventionSpec>>,
}

/// A model in `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    /// The model id to send as `model`.
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub id: String,
    /// Always `model`.
    #[schema(example = "model")]
    pub object: String,
    /// Unix time the server started.
    #[schema(example = 1764331200)]
    pub created: u64,
    /// Always `tiller`.
    #[schema(example = "tiller")]
    pub owned_by: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    #[schema(example = "list")]
    pub object: String,
    /// The served model.
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiUsage {
    /// Tokens in the prompt.
    #[schema(example = 37)]
    pub prompt_tokens: usize,
    /// Tokens generated.
    #[schema(example = 7)]
    pub completion_tokens: usize,
    /// Their sum.
    #[schema(example = 44)]
    pub total_tokens: usize,
}

/// One alternative token with its log-probability.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopTokenLogprob {
    /// An alternative token.
    #[schema(example = " Paris")]
    pub token: String,
    /// Its log-probability.
    #[schema(example = -0.01)]
    pub logprob: f32,
    #[schema(example = json!([32, 80, 97, 114, 105, 115]))]
    /// UTF-8 bytes of the token.
    pub bytes: Vec<u8>,
}

/// A generated token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenLogprobEntry {
    /// The generated token.
    #[schema(example = " Paris")]
    pub token: String,
    /// Its log-probability.
    #[schema(example = -0.01)]
    pub logprob: f32,
    /// UTF-8 bytes of the token.
    #[schema(example = json!([32, 80, 97, 114, 105, 115]))]
    pub bytes: Vec<u8>,
    /// The most likely alternatives at this step.
    pub top_logprobs: Vec<TopTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChoiceLogprobs {
    /// One entry per generated token.
    pub content: Vec<TokenLogprobEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    #[schema(example = "assistant")]
    pub role: String,
    /// The generated text.
    #[schema(example = "The capital of France is Paris.")]
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    /// Always 0 (n = 1).
    #[schema(example = 0)]
    pub index: usize,
    /// The reply.
    pub message: AssistantMessage,
    /// With `logprobs: true`: each generated token's log-probability.
    pub logprobs: Option<ChoiceLogprobs>,
    /// `stop` or `length`.
    #[schema(example = "stop")]
    pub finish_reason: String,
}

/// The answer of `POST /v1/chat/completions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletion {
    /// Unique id of this completion.
    #[schema(example = "chatcmpl-3f2a9c1d0b7e4a55")]
    pub id: String,
    /// Always `chat.completion`.
    #[schema(example = "chat.completion")]
    pub object: String,
    /// Unix time of the request.
    #[schema(example = 1764331200)]
    pub created: u64,
    /// The served model.
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// Identifies the server version and weights.
    #[schema(example = "fp_tiller_0.1.0_1a2b3c4d")]
    pub system_fingerprint: String,
    /// One choice (n = 1).
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: OpenAiUsage,
    /// The validated steering plan (also in the `X-Steering-Applied` header).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steering: Vec<AppliedIntervention>,
}

/// Legacy completions log-probabilities.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionLogprobs {
    /// The tokens: the echoed prompt's (with `echo`), then the generated ones.
    #[schema(example = json!([" a", " bridge"]))]
    pub tokens: Vec<String>,
    /// Their log-probabilities (`null` for the first token of an echoed prompt).
    #[schema(example = json!([-0.5, -1.2]))]
    pub token_logprobs: Vec<Option<f32>>,
    #[schema(example = json!([{" a": -0.5, " the": -1.1}]))]
    /// For each token, the likeliest tokens there as `{token: logprob}` (with the token itself
    /// for an echoed prompt; `null` for its first token).
    #[schema(value_type = Vec<Object>)]
    pub top_logprobs: Vec<Option<serde_json::Map<String, serde_json::Value>>>,
    #[schema(example = json!([0, 2]))]
    /// Character offset of each token in the text.
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    /// The generated text (after the prompt, with `echo`).
    #[schema(example = " a suspension bridge in San Francisco.")]
    pub text: String,
    /// The prompt's place in `prompt`.
    #[schema(example = 0)]
    pub index: usize,
    /// With `logprobs`: tokens and their log-probabilities.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`.
    #[schema(example = "length")]
    pub finish_reason: String,
}

/// The answer of `POST /v1/completions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = TextCompletion)]
pub struct Completion {
    /// Unique id of this completion.
    #[schema(example = "cmpl-3f2a9c1d0b7e4a55")]
    pub id: String,
    /// Always `text_completion`.
    #[schema(example = "text_completion")]
    pub object: String,
    /// Unix time of the request.
    #[schema(example = 1764331200)]
    pub created: u64,
    /// The served model.
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// Identifies the server version and weights.
    #[schema(example = "fp_tiller_0.1.0_1a2b3c4d")]
    pub system_fingerprint: String,
    /// One choice per prompt, in order.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: OpenAiUsage,
    /// The validated steering plan (also in `X-Steering-Applied`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steering: Vec<AppliedIntervention>,
}
