//! The boundary between the engine and a model on some backend: one object-safe trait, so the
//! CLI and server pick the backend at run time while the model's hot path stays generic.

use marlin_kernels::HostWeight;
use marlin_kernels::{Backend, KvLayout, StepBatch};
use marlin_model::llama::MatmulObserver;
use marlin_model::{KvCache, Model, ModelConfig, Result, Workspace};

pub trait StepRunner: Send {
    fn config(&self) -> &ModelConfig;
    fn kv_layout(&self) -> KvLayout;
    /// Most tokens one step may carry.
    fn max_step_tokens(&self) -> usize;
    /// Runs a step and returns the logits of `batch.logit_rows`, row after row.
    fn step(&mut self, batch: &StepBatch) -> Result<Vec<f32>>;
    /// Queues a step and the greedy choice (`marlin_kernels::argmax`) of each of
    /// `batch.logit_rows`, and returns without waiting; `take_greedy` returns the ids (only they
    /// leave the device). A step whose batch is `tokens_from_argmax` takes the latest queued ids
    /// as its tokens, so a greedy decode loop keeps the device busy while it reads the ids of
    /// the step before (`marlin_kernels::ARGMAX_PENDING` may wait).
    fn queue_greedy(&mut self, batch: &StepBatch) -> Result<()>;
    /// The ids of the oldest `queue_greedy` not yet taken (waits for its step).
    fn take_greedy(&mut self) -> Result<Vec<u32>>;
    /// Runs a step only up to `observer.last_layer()`, showing it each linear layer's input.
    fn observe(
        &mut self,
        batch: &StepBatch,
        observer: &mut (dyn MatmulObserver + Send),
    ) -> Result<()>;
    /// The hidden states entering the first decoder layer for `batch`'s tokens.
    fn embed(&mut self, batch: &StepBatch) -> Result<Vec<f32>>;
    /// Runs decoder layer `layer` alone over `batch`'s hidden states `input` (tokens × hidden),
    /// showing `observer` its linear inputs; returns the hidden states at its output.
    fn forward_layer(
        &mut self,
        batch: &StepBatch,
        layer: usize,
        input: &[f32],
        observer: Option<&mut (dyn MatmulObserver + Send)>,
    ) -> Result<Vec<f32>>;
    /// Replaces a projection's weights (by Hugging Face name).
    fn set_weight(&mut self, name: &str, weight: &HostWeight) -> Result<()>;
    /// Runs `f` where the backend runs its steps, so rayon work inside `f` shares the step's
    /// threads (on the CPU, the backend's pool) instead of waking another pool.
    fn install(&self, f: &mut (dyn FnMut() + Send));
}

/// A model with its workspace and KV cache.
pub struct Runner<B: Backend> {
    model: Model<B>,
    workspace: Workspace<B>,
    kv: KvCache<B>,
    max_step_tokens: usize,
}

impl<B: Backend> Runner<B> {
    pub fn new(
        model: Model<B>,
        max_step_tokens: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self> {
        let workspace = model.workspace(max_step_tokens)?;
        let kv = model.kv_cache(num_blocks, block_size)?;
        Ok(Self {
            model,
            workspace,
            kv,
            max_step_tokens,
        })
    }
}

impl<B: Backend> StepRunner for Runner<B> {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }
    fn kv_layout(&self) -> KvLayout {
        self.kv.layout
    }
    fn max_step_tokens(&self) -> usize {
        self.max_step_tokens
    }
    fn step(&mut self, batch: &StepBatch) -> Result<Vec<f32>> {
        self.model.forward(&mut self.workspace, &mut self.kv, batch)
    }
    fn queue_greedy(&mut self, batch: &StepBatch) -> Result<()> {
        self.model
            .queue_greedy(&mut self.workspace, &mut self.kv, batch)
    }
    fn take_greedy(&mut self) -> Result<Vec<u32>> {
        Ok(self.model.backend().take_argmax()?)
    }
    fn observe(
        &mut self,
        batch: &StepBatch,
        observer: &mut (dyn MatmulObserver + Send),
    ) -> Result<()> {
        self.model
            .forward_observed(&mut self.workspace, &mut self.kv, batch, Some(observer))
            .map(drop)
    }
    fn embed(&mut self, batch: &StepBatch) -> Result<Vec<f32>> {
        self.model.embed(&mut self.workspace, &self.kv, batch)
    }
    fn forward_layer(
        &mut self,
        batch: &StepBatch,
        layer: usize,
        input: &[f32],
        observer: Option<&mut (dyn MatmulObserver + Send)>,
    ) -> Result<Vec<f32>> {
        self.model.forward_layer(
            &mut self.workspace,
            &mut self.kv,
            batch,
            layer,
            input,
            observer,
        )
    }
    fn set_weight(&mut self, name: &str, weight: &HostWeight) -> Result<()> {
        self.model.set_weight(name, weight)
    }
    fn install(&self, f: &mut (dyn FnMut() + Send)) {
        self.model.backend().run_step(f)
    }
}
