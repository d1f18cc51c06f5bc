//! Sequences, sampling, paged KV blocks and the generation stream.

pub mod blocks;
pub mod calibrate;
pub mod detok;
pub mod eval;
mod generate;
mod runner;
pub mod sampler;
pub mod scheduler;

pub use generate::{Engine, Event, Finish, FinishReason, Generation, Request, Sequence};
pub use runner::{Runner, StepRunner};
pub use sampler::SamplingParams;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt_len} tokens but the context holds {context}; shorten it")]
    PromptTooLong { prompt_len: usize, context: usize },
    #[error("out of KV cache blocks: a sequence of {needed} tokens needs more than the {free_blocks} free blocks of {block_size}")]
    OutOfKvBlocks {
        needed: usize,
        free_blocks: usize,
        block_size: usize,
    },
    #[error("invalid sampling parameters: {0}")]
    Sampling(#[from] sampler::SamplingError),
    #[error("evaluation: {0}")]
    Eval(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Model(#[from] marlin_model::ModelError),
}

pub type Result<T> = std::result::Result<T, EngineError>;
