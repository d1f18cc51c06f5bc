//! Models: configuration, loaders (safetensors, GGUF), architectures, tokenizer, chat template.

pub mod chat;
pub mod checkpoint;
pub mod config;
mod error;
pub mod gguf;
pub mod llama;
pub mod loader;
pub mod quantized;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use llama::{KvCache, Model, Workspace};
pub use loader::{GenerationDefaults, ModelFiles};
pub use quantized::{LoadOptions, QuantizeSpec};
pub use tokenizer::Tokenizer;
