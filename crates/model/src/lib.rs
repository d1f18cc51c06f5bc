//! Models: configuration, loaders (safetensors, GGUF), architectures, tokenizer, chat template.

mod error;
pub mod gguf;
pub mod tokenizer;

pub use error::{ModelError, Result};
