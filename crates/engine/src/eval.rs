//! Perplexity and KL divergence, scored as llama-perplexity scores them so the numbers compare:
//! the text is cut into non-overlapping windows of `ctx` tokens, and in each window the logits at
//! positions ctx/2 .. ctx-2 are scored against the token that follows (the first half only gives
//! context).

use crate::{Engine, EngineError, Result};

/// Running sums over scored tokens.
#[derive(Debug, Default, Clone)]
pub struct EvalStats {
    pub tokens: usize,
    nll: f64,
    nll_sq: f64,
    kld: f64,
    kld_sq: f64,
    same_top1: usize,
    with_reference: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub scored_tokens: usize,
    pub perplexity: f64,
    pub perplexity_se: f64,
    pub mean_kld: Option<f64>,
    pub mean_kld_se: Option<f64>,
    pub same_top1: Option<f64>,
    pub same_top1_se: Option<f64>,
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
    let sum: f64 = row.iter().map(|v| (*v as f64 - max).exp()).sum();
    let log_sum = max + sum.ln();
    row.iter().map(|v| *v as f64 - log_sum).collect()
}

impl EvalStats {
    /// Adds one scored position: `logits` of the model under test, `reference` logits of the
    /// reference model at the same position, `next` the token that follows.
    pub fn add(&mut self, logits: &[f32], reference: Option<&[f32]>, next: u32) {
        let lp = log_softmax(logits);
        let nll = -lp[next as usize];
        self.tokens += 1;
        self.nll += nll;
        self.nll_sq += nll * nll;
        if let Some(reference) = reference {
            self.with_reference = true;
            let lq = log_softmax(reference);
            let kld: f64 = lq.iter().zip(&lp).map(|(q, p)| q.exp() * (q - p)).sum();
            self.kld += kld;
            self.kld_sq += kld * kld;
            self.same_top1 +=
                usize::from(marlin_kernels::argmax(logits) == marlin_kernels::argmax(reference));
        }
    }

    pub fn report(&self) -> EvalReport {
        let n = self.tokens.max(1) as f64;
        let mean_nll = self.nll / n;
        let var_nll = (self.nll_sq / n - mean_nll * mean_nll).max(0.0);
        let perplexity = mean_nll.exp();
        // The standard error of the mean NLL, carried through exp() to first order.
        let perplexity_se = perplexity * (var_nll / (n - 1.0).max(1.0)).sqrt();
        let (mean_kld, mean_kld_se, same_top1, same_top1_se) = if self.with_reference {
            let mean = self.kld / n;
            let var = (self.kld_sq / n - mean * mean).max(0.0);
            let p = self.same_top1 as f64 / n;
            (
                Some(mean),
                Some((var / (n - 1.0).max(1.0)).sqrt()),
                Some(p),
                Some((p * (1.0 - p) / (n - 1.0).max(1.0)).sqrt()),
            )
        } else {
            (None, None, None, None)
        };
        EvalReport {
            scored_tokens: self.tokens,
            perplexity,
            perplexity_se,
            mean_kld,
            mean_kld_se,
            same_top1,
            same_top1_se,
        }
    }
}

/// Scores `tokens` in windows of `ctx` (at most `max_chunks` windows), against `reference` when
/// given. `progress` is called after each window with (done, total).
pub fn evaluate(
    model: &mut Engine,
    mut reference: Option<&mut Engine>,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalStats> {
    if ctx < 4 {
        return Err(EngineError::Eval(format!(
            "--ctx {ctx} is too small (at least 4)"
        )));
    }
    let available = tokens.len() / ctx;
    let chunks = max_chunks.map_or(available, |m| m.min(available));
    if chunks == 0 {
        return Err(EngineError::Eval(format!(
            "the text has {} tokens, fewer than one window of {ctx}",
            tokens.len()
        )));
    }
    let vocab = model.runner().config().vocab_size;
    if let Some(r) = reference.as_deref() {
        let rv = r.runner().config().vocab_size;
        if rv != vocab {
            return Err(EngineError::Eval(format!(
                "the reference model's vocabulary has {rv} tokens, the model's {vocab}"
            )));
        }
    }
    let mut stats = EvalStats::default();
    for chunk in 0..chunks {
        let window = &tokens[chunk * ctx..(chunk + 1) * ctx];
        let logits = model.score(window)?;
        let reference_logits = match reference.as_deref_mut() {
            Some(r) => Some(r.score(window)?),
            None => None,
        };
        for pos in ctx / 2..ctx - 1 {
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            let reference_row = reference_logits
                .as_ref()
                .map(|l| &l[pos * vocab..(pos + 1) * vocab]);
            stats.add(row, reference_row, window[pos + 1]);
        }
        progress(chunk + 1, chunks);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_vocab_perplexity_and_zero_kld() {
        let mut stats = EvalStats::default();
        let row = vec![0.5f32; 10];
        for next in 0..10 {
            stats.add(&row, Some(&row), next);
        }
        let report = stats.report();
        assert!((report.perplexity - 10.0).abs() < 1e-9);
        assert!(report.mean_kld.unwrap().abs() < 1e-12);
        assert_eq!(report.same_top1, Some(1.0));
    }

    #[test]
    fn kld_of_known_distributions() {
        // p = (0.5, 0.5) under test, q = (0.9, 0.1) reference: KL(q||p) = 0.9 ln 1.8 + 0.1 ln 0.2.
        let p = [0.0f32, 0.0];
        let q = [(0.9f32).ln(), (0.1f32).ln()];
        let mut stats = EvalStats::default();
        stats.add(&p, Some(&q), 0);
        let expected = 0.9 * (1.8f64).ln() + 0.1 * (0.2f64).ln();
        assert!((stats.report().mean_kld.unwrap() - expected).abs() < 1e-6);
    }
}
