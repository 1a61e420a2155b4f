//! Everything about the language model itself: checkpoints, the Llama-family forward pass with
//! its hook sites, CPU kernels, tokenizer and chat template. Knows nothing of steering plans,
//! scheduling or HTTP (DESIGN §1).

pub mod chat;
pub mod checkpoint;
pub mod cpu;
pub mod fetch;
pub mod hooks;
pub mod llama;
pub mod tokenizer;

use anyhow::Result;
use chat::{ChatMessage, ChatTemplate};
use checkpoint::Checkpoint;
use llama::{Llama, LoadOptions};
use std::path::Path;
use tokenizer::TextTokenizer;

/// A resident model with everything needed to turn text into logits and back.
pub struct Model {
    /// The id clients use to name this model.
    pub id: String,
    pub llama: Llama,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("id", &self.id).finish()
    }
}

impl Model {
    /// Loads a GGUF file or Hugging Face folder.
    pub fn load(path: &Path, id: Option<&str>, opts: &LoadOptions) -> Result<Self> {
        let mut ckpt = Checkpoint::open(path)?;
        let tokenizer = ckpt.tokenizer()?;
        let chat_template = ckpt.chat_template(&tokenizer)?;
        let llama = Llama::load(&mut ckpt, opts)?;
        if tokenizer.vocab_size > llama.config().vocab_size {
            anyhow::bail!(
                "the tokenizer has {} tokens but the embeddings only {}",
                tokenizer.vocab_size,
                llama.config().vocab_size
            );
        }
        Ok(Self {
            id: id.map(str::to_string).unwrap_or_else(|| ckpt.default_id()),
            llama,
            tokenizer,
            chat_template,
        })
    }

    /// Token ids of a chat conversation rendered with the model's template, ending where the
    /// assistant's reply begins.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            anyhow::anyhow!("this model has no chat template; send `prompt` instead")
        })?;
        let text = template.render(messages, true)?;
        self.tokenizer.encode(&text, true)
    }

    /// Token ids of a raw prompt.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(prompt, true)
    }
}
