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
    pub(crate) computed: usize,
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
    pub(crate) fn pending(&self) -> usize {
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
        let mut logits = self.step_logits(seqs, all_logits)?;
        Ok(logits.rows_mut().map(|r| r.map(|r| r.to_vec())).collect())
    }

    /// `step`, with the logits left in the one buffer the model returned.
    pub(crate) fn step_logits(
        &mut self,
        seqs: &mut [&mut Sequence],
        all_logits: bool,
    ) -> Result<StepLogits> {
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
                prompt_len: seq.prompt_len,
                block_table: seq.table.blocks().to_vec(),
            });
        }
        let vocab = self.runner.config().vocab_size;
        if batch.tokens.is_empty() {
            return Ok(StepLogits {
                data: Vec::new(),
                vocab,
                rows: vec![0; seqs.len()],
            });
        }
        let data = self.runner.step(&batch)?;
        let mut rows = Vec::with_capacity(seqs.len());
        for (seq, take) in seqs.iter_mut().zip(takes) {
            seq.computed += take;
            self.blocks
                .register(&mut seq.table, &seq.tokens[..seq.computed], seq.prompt_len);
            let wants = take > 0 && (all_logits || seq.computed == seq.tokens.len());
            rows.push(match (wants, all_logits) {
                (false, _) => 0,
                (true, true) => take,
                (true, false) => 1,
            });
        }
        Ok(StepLogits { data, vocab, rows })
    }

    /// Returns a sequence's blocks to the pool.
    pub fn release(&mut self, seq: &mut Sequence) {
        self.blocks.free(&mut seq.table);
        seq.computed = 0;
    }

    /// Runs `tokens` (one window, at most the step budget) through the model up to
    /// `observer.last_layer()`, showing the observer every linear layer's input.
    pub fn observe(
        &mut self,
        tokens: &[u32],
        observer: &mut (dyn marlin_model::llama::MatmulObserver + Send),
    ) -> Result<()> {
        self.window(tokens, |runner, batch| runner.observe(batch, observer))
    }

    /// The hidden states entering the first decoder layer for one window of `tokens`.
    pub fn embed_window(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.window(tokens, |runner, batch| runner.embed(batch))
    }

    /// Runs decoder layer `layer` alone over one window of `tokens` whose hidden states at the
    /// layer's input are `input`, showing `observer` (if any) the layer's linear inputs; returns
    /// the hidden states at the layer's output. Attention covers the window, causally, as when
    /// the whole model runs it.
    pub fn forward_layer(
        &mut self,
        tokens: &[u32],
        layer: usize,
        input: &[f32],
        observer: Option<&mut (dyn marlin_model::llama::MatmulObserver + Send)>,
    ) -> Result<Vec<f32>> {
        self.window(tokens, |runner, batch| {
            runner.forward_layer(batch, layer, input, observer)
        })
    }

    /// Runs `f` on a step holding one sequence of `tokens` (a calibration window) from position
    /// 0, with KV blocks borrowed for the call.
    fn window<T>(
        &mut self,
        tokens: &[u32],
        f: impl FnOnce(&mut dyn StepRunner, &StepBatch) -> marlin_model::Result<T>,
    ) -> Result<T> {
        let budget = self.runner.max_step_tokens();
        if tokens.is_empty() || tokens.len() > budget {
            return Err(EngineError::Eval(format!(
                "a calibration window must hold 1 to {budget} tokens, not {}",
                tokens.len()
            )));
        }
        let mut table = BlockTable::default();
        let block_size = self.blocks.block_size();
        self.blocks
            .grow(&mut table, tokens.len())
            .map_err(|_| EngineError::OutOfKvBlocks {
                needed: tokens.len(),
                free_blocks: self.blocks.num_free(),
                block_size,
            })?;
        let batch =
            StepBatch::one_sequence(tokens.to_vec(), 0, table.blocks(), block_size, tokens.len());
        let result = f(self.runner.as_mut(), &batch);
        self.blocks.free(&mut table);
        Ok(result?)
    }

    /// Replaces a projection's weights (by Hugging Face name).
    pub fn set_weight(&mut self, name: &str, weight: &marlin_kernels::HostWeight) -> Result<()> {
        Ok(self.runner.set_weight(name, weight)?)
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
        let capacity = self.blocks.num_blocks() * self.blocks.block_size();
        check_prompt_len(prompt_len, max_tokens, self.max_context(), capacity)
    }

    /// Starts generating; the returned stream yields text pieces, then one `Finished` event.
    pub fn generate(&mut self, request: Request) -> Result<Generation<'_>> {
        self.check_prompt(request.prompt.len(), request.max_tokens)?;
        let decoding = Decoding::new(&request)?;
        Ok(Generation {
            seq: Sequence::new(request.prompt),
            decoding,
            engine: self,
            finished: false,
        })
    }

    /// Checks a request the way `generate` does, without starting it: an empty prompt, one that
    /// leaves no room in the context or the KV cache, or invalid sampling parameters.
    pub fn validate(&self, request: &Request) -> Result<()> {
        self.check_prompt(request.prompt.len(), request.max_tokens)?;
        request.sampling.validate()?;
        Ok(())
    }

    /// Gives a sequence with nothing computed the cached blocks that already hold the start
    /// of its tokens (prefix caching, `blocks.rs`); returns the tokens it no longer computes.
    pub fn share_prefix(&mut self, seq: &mut Sequence) -> usize {
        if seq.computed > 0 || !seq.table.blocks().is_empty() {
            return 0;
        }
        seq.computed = self
            .blocks
            .share_prefix(&mut seq.table, &seq.tokens, seq.prompt_len);
        seq.computed
    }

    /// Grows `seq`'s block table to hold `tokens` tokens; false (nothing allocated) when the
    /// free blocks do not suffice. A scheduler reserves before `step` so the step cannot fail.
    pub fn reserve(&mut self, seq: &mut Sequence, tokens: usize) -> bool {
        self.blocks.grow(&mut seq.table, tokens).is_ok()
    }
}

/// The prompt checks of `Engine::generate`, for a context of `context` tokens and a KV cache of
/// `capacity` token slots.
pub(crate) fn check_prompt_len(
    prompt_len: usize,
    max_tokens: usize,
    context: usize,
    capacity: usize,
) -> Result<()> {
    if prompt_len == 0 {
        return Err(EngineError::EmptyPrompt);
    }
    if prompt_len + max_tokens.min(1) > context {
        return Err(EngineError::PromptTooLong {
            prompt_len,
            context,
        });
    }
    if prompt_len + max_tokens.min(1) > capacity {
        return Err(EngineError::PromptTooLong {
            prompt_len,
            context: capacity,
        });
    }
    Ok(())
}

/// The logits of one step, as the model returned them: per sequence, its rows in step order.
pub(crate) struct StepLogits {
    data: Vec<f32>,
    vocab: usize,
    /// Logit rows of each sequence (0: none this step).
    rows: Vec<usize>,
}

impl StepLogits {
    /// Each sequence's rows (`vocab` values per row), or None where the step produced none.
    pub fn rows_mut(&mut self) -> impl Iterator<Item = Option<&mut [f32]>> {
        let vocab = self.vocab;
        let mut rest = self.data.as_mut_slice();
        self.rows.iter().map(move |&n| {
            (n > 0).then(|| {
                let (rows, tail) = std::mem::take(&mut rest).split_at_mut(n * vocab);
                rest = tail;
                rows
            })
        })
    }
}

/// What one generated token did to a request.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Accepted {
    /// Text that became safe to show (often empty while a character or stop string is pending).
    pub text: String,
    /// Set when the token ended the request.
    pub finish: Option<FinishReason>,
}

/// The per-request half of generation, shared by `Generation` and the scheduler so both produce
/// the same tokens and text: the seeded sampler, the incremental detokenizer, the stop-string
/// matcher, `max_tokens` and the stop token ids.
pub(crate) struct Decoding {
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
}

impl Decoding {
    pub fn new(request: &Request) -> Result<Self> {
        let sampler = Sampler::new(request.sampling.clone())?;
        let tail_start = request.prompt.len().saturating_sub(4);
        Ok(Self {
            max_tokens: request.max_tokens,
            stop_token_ids: request.stop_token_ids.clone(),
            sampler,
            decoder: IncrementalDecoder::new(&request.prompt[tail_start..]),
            stops: StopMatcher::new(request.stop.clone()),
        })
    }

    /// Releases whatever text the decoder and the stop matcher still hold; true if a stop string
    /// completed in it.
    fn drain(&mut self, tokenizer: &Tokenizer) -> Result<(String, bool)> {
        let rest = self
            .decoder
            .flush(tokenizer)
            .map_err(EngineError::Tokenizer)?;
        let mut outcome = self.stops.push(&rest);
        if !outcome.stopped {
            outcome.emit.push_str(&self.stops.finish());
        }
        Ok((outcome.emit, outcome.stopped))
    }

    /// If `seq` may not grow any further (`max_tokens` generated or `context` full), ends the
    /// request and returns the reason with the last text held back.
    pub fn check_limits(
        &mut self,
        seq: &Sequence,
        context: usize,
        tokenizer: &Tokenizer,
    ) -> Result<Option<(FinishReason, String)>> {
        if seq.generated().len() < self.max_tokens && seq.tokens.len() < context {
            return Ok(None);
        }
        let (text, stopped) = self.drain(tokenizer)?;
        let reason = if stopped {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        Ok(Some((reason, text)))
    }

    /// Samples the next token from the logits of `seq`'s last token and appends it.
    pub fn accept(
        &mut self,
        seq: &mut Sequence,
        logits: &mut [f32],
        tokenizer: &Tokenizer,
    ) -> Result<Accepted> {
        let token = self.sampler.sample(logits, &seq.tokens);
        seq.tokens.push(token);
        if self.stop_token_ids.contains(&token) {
            let (text, _) = self.drain(tokenizer)?;
            return Ok(Accepted {
                text,
                finish: Some(FinishReason::Stop),
            });
        }
        let piece = self
            .decoder
            .push(tokenizer, token)
            .map_err(EngineError::Tokenizer)?;
        let outcome = self.stops.push(&piece);
        Ok(Accepted {
            text: outcome.emit,
            finish: outcome.stopped.then_some(FinishReason::Stop),
        })
    }
}

impl Finish {
    pub(crate) fn of(seq: &Sequence, reason: FinishReason) -> Self {
        Finish {
            reason,
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated().len(),
            token_ids: seq.generated().to_vec(),
        }
    }
}

/// One request's stream of events. Dropping it frees its KV blocks.
pub struct Generation<'e> {
    engine: &'e mut Engine,
    seq: Sequence,
    decoding: Decoding,
    finished: bool,
}

impl Generation<'_> {
    fn finish(&mut self, reason: FinishReason, text: String) -> Result<Vec<Event>> {
        self.finished = true;
        self.engine.release(&mut self.seq);
        let mut events = Vec::new();
        if !text.is_empty() {
            events.push(Event::Text(text));
        }
        events.push(Event::Finished(Finish::of(&self.seq, reason)));
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
            if let Some((reason, text)) =
                self.decoding
                    .check_limits(&self.seq, context, &self.engine.tokenizer)?
            {
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
            let accepted =
                self.decoding
                    .accept(&mut self.seq, &mut logits, &self.engine.tokenizer)?;
            if let Some(reason) = accepted.finish {
                return self.finish(reason, accepted.text);
            }
            if !accepted.text.is_empty() {
                return Ok(vec![Event::Text(accepted.text)]);
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
