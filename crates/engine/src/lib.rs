//! Sequences, sampling, paged KV blocks and the generation stream.

pub mod blocks;
pub mod detok;
pub mod sampler;
