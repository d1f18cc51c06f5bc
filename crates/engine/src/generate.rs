//! Sequences over the paged KV cache, the step that advances several at once, and the
//! per-request generation stream (token text, then a finish event with usage).

use crate::blocks::{BlockManager, BlockTable};
use crate::detok::{IncrementalDecoder, StopMatcher, TokenDecoder};
use crate::runner::StepRunner;
use crate::sampler::{Sampler, SamplingParams};
use crate::{EngineError, Result};
use marlin_kernels::{SeqSpan, StepBatch};
use marlin_model::Tokenizer;
use serde::Serialize;

/// A sequence's tokens and where its keys and values live.
#[derive(Debug, Default)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    table: BlockTable,
}

impl Sequence {
    pub fn new(prompt: Vec<u32>) -> Self {
        Self {
            prompt_len: prompt.len(),
            tokens: prompt,
            ..Default::default()
        }
    }
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub token_ids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Text(String),
    Finished(Finish),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Token ids that end generation (in addition to none: pass the model's eos ids here).
    pub stop_token_ids: Vec<u32>,
}

pub struct Engine {
    runner: Box<dyn StepRunner>,
    blocks: BlockManager,
    tokenizer: Tokenizer,
}

impl TokenDecoder for Tokenizer {
    fn decode(&self, ids: &[u32]) -> std::result::Result<String, String> {
        Tokenizer::decode(self, ids, true).map_err(|e| e.to_string())
    }
}

impl Engine {
    pub fn new(runner: Box<dyn StepRunner>, tokenizer: Tokenizer) -> Self {
        let layout = runner.kv_layout();
        Self {
            blocks: BlockManager::new(layout.num_blocks, layout.block_size),
            runner,
            tokenizer,
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn runner(&self) -> &dyn StepRunner {
        self.runner.as_ref()
    }

    pub fn max_context(&self) -> usize {
        self.runner.config().max_context
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// Advances every sequence by up to the step's token budget (prompt chunks or one decoded
    /// token each) in one forward pass. Returns, per sequence, the logits of its last token when
    /// this step computed it. With `all_logits`, every computed position's logits are returned
    /// instead (evaluation).
    pub fn step(
        &mut self,
        seqs: &mut [&mut Sequence],
        all_logits: bool,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let block_size = self.blocks.block_size();
        let mut budget = self.runner.max_step_tokens();
        let mut batch = StepBatch::default();
        let mut takes = Vec::with_capacity(seqs.len());
        for seq in seqs.iter_mut() {
            let take = seq.pending().min(budget);
            budget -= take;
            takes.push(take);
            if take == 0 {
                continue;
            }
            let context = seq.computed + take;
            self.blocks
                .grow(&mut seq.table, context)
                .map_err(|_| EngineError::OutOfKvBlocks {
                    needed: context,
                    free_blocks: self.blocks.num_free(),
                    block_size,
                })?;
            let start = batch.tokens.len();
            for pos in seq.computed..context {
                batch.tokens.push(seq.tokens[pos]);
                batch.positions.push(pos as u32);
                batch.slots.push(seq.table.slot(block_size, pos));
            }
            let last = start + take - 1;
            if all_logits {
                batch.logit_rows.extend(start as u32..=last as u32);
            } else if context == seq.tokens.len() {
                batch.logit_rows.push(last as u32);
            }
            batch.seqs.push(SeqSpan {
                start,
                len: take,
                context_len: context,
                block_table: seq.table.blocks().to_vec(),
            });
        }
        if batch.tokens.is_empty() {
            return Ok(vec![None; seqs.len()]);
        }
        let logits = self.runner.step(&batch)?;
        let vocab = self.runner.config().vocab_size;
        let mut rows = logits.chunks_exact(vocab);
        let mut out = Vec::with_capacity(seqs.len());
        for (seq, take) in seqs.iter_mut().zip(takes) {
            seq.computed += take;
            let wants = take > 0 && (all_logits || seq.computed == seq.tokens.len());
            out.push(if wants {
                let n = if all_logits { take } else { 1 };
                Some(
                    (0..n)
                        .flat_map(|_| rows.next().expect("one row per logit row").to_vec())
                        .collect(),
                )
            } else {
                None
            });
        }
        Ok(out)
    }

    /// Returns a sequence's blocks to the pool.
    pub fn release(&mut self, seq: &mut Sequence) {
        self.blocks.free(&mut seq.table);
        seq.computed = 0;
    }

    /// Teacher-forced logits at every position of `tokens` (vocab values per position).
    pub fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_prompt(tokens.len(), 0)?;
        let mut seq = Sequence::new(tokens.to_vec());
        let mut logits = Vec::with_capacity(tokens.len() * self.runner.config().vocab_size);
        let result = (|| {
            while seq.pending() > 0 {
                let rows = self.step(&mut [&mut seq], true)?;
                logits.extend(rows.into_iter().flatten().flatten());
            }
            Ok(())
        })();
        self.release(&mut seq);
        result.map(|()| logits)
    }

    fn check_prompt(&self, prompt_len: usize, max_tokens: usize) -> Result<()> {
        let context = self.max_context();
        if prompt_len == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt_len + max_tokens.min(1) > context {
            return Err(EngineError::PromptTooLong {
                prompt_len,
                context,
            });
        }
        let capacity = self.blocks.num_blocks() * self.blocks.block_size();
        if prompt_len + max_tokens.min(1) > capacity {
            return Err(EngineError::PromptTooLong {
                prompt_len,
                context: capacity,
            });
        }
        Ok(())
    }

    /// Starts generating; the returned stream yields text pieces, then one `Finished` event.
    pub fn generate(&mut self, request: Request) -> Result<Generation<'_>> {
        self.check_prompt(request.prompt.len(), request.max_tokens)?;
        let sampler = Sampler::new(request.sampling.clone())?;
        let tail_start = request.prompt.len().saturating_sub(4);
        Ok(Generation {
            decoder: IncrementalDecoder::new(&request.prompt[tail_start..]),
            stops: StopMatcher::new(request.stop.clone()),
            seq: Sequence::new(request.prompt.clone()),
            sampler,
            request,
            engine: self,
            finished: false,
        })
    }
}

/// One request's stream of events. Dropping it frees its KV blocks.
pub struct Generation<'e> {
    engine: &'e mut Engine,
    request: Request,
    seq: Sequence,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    finished: bool,
}

impl Generation<'_> {
    /// Releases whatever text the decoder and the stop matcher still hold; true if a stop string
    /// completed in it.
    fn drain(&mut self) -> Result<(String, bool)> {
        let rest = self
            .decoder
            .flush(&self.engine.tokenizer)
            .map_err(EngineError::Tokenizer)?;
        let mut outcome = self.stops.push(&rest);
        if !outcome.stopped {
            outcome.emit.push_str(&self.stops.finish());
        }
        Ok((outcome.emit, outcome.stopped))
    }

    fn finish(&mut self, reason: FinishReason, text: String) -> Result<Vec<Event>> {
        self.finished = true;
        self.engine.release(&mut self.seq);
        let mut events = Vec::new();
        if !text.is_empty() {
            events.push(Event::Text(text));
        }
        events.push(Event::Finished(Finish {
            reason,
            prompt_tokens: self.seq.prompt_len,
            completion_tokens: self.seq.generated().len(),
            token_ids: self.seq.generated().to_vec(),
        }));
        Ok(events)
    }

    /// Runs steps until there is something to report; None once finished.
    pub fn next_events(&mut self) -> Option<Result<Vec<Event>>> {
        if self.finished {
            return None;
        }
        Some(self.advance())
    }

    fn advance(&mut self) -> Result<Vec<Event>> {
        let context = self.engine.max_context();
        loop {
            if self.seq.generated().len() >= self.request.max_tokens
                || self.seq.tokens.len() >= context
            {
                let (text, stopped) = self.drain()?;
                let reason = if stopped {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                };
                return self.finish(reason, text);
            }
            let logits = match self.engine.step(&mut [&mut self.seq], false) {
                Ok(mut rows) => rows.pop().flatten(),
                Err(e) => {
                    self.finished = true;
                    self.engine.release(&mut self.seq);
                    return Err(e);
                }
            };
            let Some(mut logits) = logits else { continue };
            let token = self.sampler.sample(&mut logits, &self.seq.tokens);
            self.seq.tokens.push(token);
            if self.request.stop_token_ids.contains(&token) {
                let (text, _) = self.drain()?;
                return self.finish(FinishReason::Stop, text);
            }
            let piece = self
                .decoder
                .push(&self.engine.tokenizer, token)
                .map_err(EngineError::Tokenizer)?;
            let outcome = self.stops.push(&piece);
            if outcome.stopped {
                return self.finish(FinishReason::Stop, outcome.emit);
            }
            if !outcome.emit.is_empty() {
                return Ok(vec![Event::Text(outcome.emit)]);
            }
        }
    }
}

impl Iterator for Generation<'_> {
    type Item = Result<Vec<Event>>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_events()
    }
}

impl Drop for Generation<'_> {
    fn drop(&mut self) {
        self.engine.release(&mut self.seq);
    }
}
