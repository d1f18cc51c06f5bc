//! What one forward step computes: the new tokens of several sequences, concatenated, and where
//! each one's keys and values live in the paged cache.

use crate::{check, Result};
use std::ops::Range;

/// Shape of one layer's paged KV pool: `num_blocks` blocks of `block_size` token slots, each slot
/// holding `kv_heads * head_dim` keys and as many values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    pub fn slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
    pub fn slot_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSpan {
    /// Index of its first new token in `StepBatch::tokens`.
    pub start: usize,
    /// Number of new tokens (the prompt chunk in prefill, 1 in decode).
    pub len: usize,
    /// Tokens in its cache after this step, new ones included.
    pub context_len: usize,
    /// Leading tokens of the sequence that were given (its prompt); those at later positions
    /// were generated. A backend may compute the two kinds differently (`MatmulRows`).
    pub prompt_len: usize,
    /// Physical block of each logical block of the sequence.
    pub block_table: Vec<u32>,
}

/// The rows of a matmul's input: `count` rows, of which the `prompt` runs are prompt tokens.
///
/// A backend may compute prompt rows with other arithmetic than generated ones (the CPU runs
/// them on bf16 tiles: a prompt is many rows at once, while generated rows come one per
/// sequence and step). The choice follows each row's own kind, never the rows beside it, so a
/// sequence computes the same alone or batched, and again when it is recomputed.
#[derive(Debug, Clone, Copy)]
pub struct MatmulRows<'a> {
    pub count: usize,
    pub prompt: &'a [Range<usize>],
}

impl MatmulRows<'_> {
    /// `count` rows computed alike (none of them a prompt token).
    pub fn plain(count: usize) -> MatmulRows<'static> {
        MatmulRows { count, prompt: &[] }
    }
}

/// A batch in the style of paged-attention engines; prefill and decode are the same call with
/// different token counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepBatch {
    pub tokens: Vec<u32>,
    /// Position of each token within its sequence.
    pub positions: Vec<u32>,
    /// KV slot each token writes: block index * block size + offset in block.
    pub slots: Vec<u32>,
    pub seqs: Vec<SeqSpan>,
    /// Rows (token indices) whose logits the caller wants, in the order it wants them.
    pub logit_rows: Vec<u32>,
    /// The tokens are the ids of the backend's latest `Backend::queue_argmax_rows`, token i
    /// its row i, and `tokens` holds as many placeholders: a greedy decode loop queues a step
    /// before the ids it feeds on reach the host.
    pub tokens_from_argmax: bool,
}

impl StepBatch {
    /// A step of one sequence: `tokens` at positions `from..`, in the slots that `block_table`
    /// (the physical block of each logical block of `block_size` slots) gives them, its first
    /// `prompt_len` positions given; no logit rows.
    pub fn one_sequence(
        tokens: Vec<u32>,
        from: usize,
        block_table: &[u32],
        block_size: usize,
        prompt_len: usize,
    ) -> StepBatch {
        let to = from + tokens.len();
        StepBatch {
            positions: (from as u32..to as u32).collect(),
            slots: (from..to)
                .map(|p| block_table[p / block_size] * block_size as u32 + (p % block_size) as u32)
                .collect(),
            seqs: vec![SeqSpan {
                start: 0,
                len: tokens.len(),
                context_len: to,
                prompt_len,
                block_table: block_table[..to.div_ceil(block_size)].to_vec(),
            }],
            tokens,
            ..StepBatch::default()
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// The runs of tokens that are prompt tokens (`SeqSpan::prompt_len`), in order.
    pub fn prompt_rows(&self) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for seq in &self.seqs {
            let first_pos = seq.context_len.saturating_sub(seq.len);
            let given = seq.prompt_len.saturating_sub(first_pos).min(seq.len);
            if given == 0 {
                continue;
            }
            let run = seq.start..seq.start + given;
            match runs.last_mut() {
                Some(last) if last.end == run.start => last.end = run.end,
                _ => runs.push(run),
            }
        }
        runs
    }

    /// `validate`, plus that `heads` query heads share the layout's kv heads evenly (GQA).
    pub fn validate_attention(&self, layout: &KvLayout, heads: usize) -> Result<()> {
        self.validate(layout)?;
        check(
            layout.kv_heads > 0 && heads.is_multiple_of(layout.kv_heads),
            "attention",
            || format!("{heads} query heads over {} kv heads", layout.kv_heads),
        )
    }

    /// Checks internal consistency against a cache layout, so kernels can index without checks.
    pub fn validate(&self, layout: &KvLayout) -> Result<()> {
        let n = self.tokens.len();
        check(
            self.positions.len() == n && self.slots.len() == n,
            "step",
            || {
                format!(
                    "{n} tokens but {} positions and {} slots",
                    self.positions.len(),
                    self.slots.len()
                )
            },
        )?;
        let mut covered = 0;
        for (i, seq) in self.seqs.iter().enumerate() {
            check(seq.start == covered, "step", || {
                format!(
                    "sequence {i} starts at {} but {covered} tokens precede it",
                    seq.start
                )
            })?;
            covered += seq.len;
            // Before the per-token checks below index positions and slots by it.
            check(covered <= n, "step", || {
                format!("sequence {i} ends at token {covered} of {n}")
            })?;
            check(seq.len <= seq.context_len, "step", || {
                format!(
                    "sequence {i} has {} new tokens but context {}",
                    seq.len, seq.context_len
                )
            })?;
            check(
                seq.block_table.len() * layout.block_size >= seq.context_len,
                "step",
                || {
                    format!(
                        "sequence {i}: {} blocks of {} cannot hold {} tokens",
                        seq.block_table.len(),
                        layout.block_size,
                        seq.context_len
                    )
                },
            )?;
            for &b in &seq.block_table {
                check((b as usize) < layout.num_blocks, "step", || {
                    format!("sequence {i} names block {b} of {}", layout.num_blocks)
                })?;
            }
            for t in 0..seq.len {
                let pos = seq.context_len - seq.len + t;
                check(
                    self.positions[seq.start + t] as usize == pos,
                    "step",
                    || {
                        format!(
                            "sequence {i} token {t} has position {} not {pos}",
                            self.positions[seq.start + t]
                        )
                    },
                )?;
                let block = seq.block_table[pos / layout.block_size] as usize;
                let slot = block * layout.block_size + pos % layout.block_size;
                check(self.slots[seq.start + t] as usize == slot, "step", || {
                    format!(
                        "sequence {i} token {t} writes slot {} not {slot}",
                        self.slots[seq.start + t]
                    )
                })?;
            }
        }
        check(covered == n, "step", || {
            format!("sequences cover {covered} of {n} tokens")
        })?;
        for &r in &self.logit_rows {
            check((r as usize) < n, "step", || {
                format!("logit row {r} of {n} tokens")
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: usize, len: usize, context_len: usize, prompt_len: usize) -> SeqSpan {
        SeqSpan {
            start,
            len,
            context_len,
            prompt_len,
            block_table: vec![],
        }
    }

    /// A one-sequence step maps each position through its block table and passes `validate`.
    #[test]
    fn one_sequence_fills_slots_from_the_block_table() {
        let layout = KvLayout {
            num_blocks: 4,
            block_size: 4,
            kv_heads: 1,
            head_dim: 8,
        };
        let batch = StepBatch::one_sequence(vec![7, 8, 9], 3, &[2, 0, 3, 1], 4, 4);
        assert_eq!(batch.positions, vec![3, 4, 5]);
        assert_eq!(batch.slots, vec![11, 0, 1]);
        assert_eq!(batch.seqs[0].block_table, vec![2, 0]);
        assert_eq!(batch.prompt_rows(), vec![0..1]);
        batch.validate(&layout).unwrap();
    }

    /// Runs of prompt tokens across sequences: a prefill chunk, a decode token, a recomputed
    /// sequence whose generated tail follows its prompt, and adjacent runs merged.
    #[test]
    fn prompt_rows_are_the_given_tokens() {
        let batch = StepBatch {
            seqs: vec![
                span(0, 4, 8, 20),  // chunk of a long prompt: all 4 given
                span(4, 3, 3, 3),   // whole prompt, adjacent: merged
                span(7, 1, 30, 12), // decode
                span(8, 6, 6, 4),   // recomputed: 4 given, 2 generated
                span(14, 2, 10, 9), // positions 8, 9: only 8 given
            ],
            ..Default::default()
        };
        assert_eq!(batch.prompt_rows(), vec![0..7, 8..12, 14..15]);
    }
}
