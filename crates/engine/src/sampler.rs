//! Token sampling: penalties, temperature, top-k / top-p / min-p filtering and
//! the final seeded draw, with Hugging Face / vLLM semantics.

use marlin_kernels::argmax;
use std::cmp::Ordering;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Per-request sampling settings. Every filter has a neutral value that turns
/// it off, so requests that omit fields deserialize to plain greedy decoding.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 selects greedy (argmax) decoding.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables min-p.
    pub min_p: f32,
    /// 1 disables the multiplicative repetition penalty.
    pub repetition_penalty: f32,
    /// 0 disables the additive presence penalty.
    pub presence_penalty: f32,
    /// 0 disables the additive frequency penalty.
    pub frequency_penalty: f32,
    /// `None` seeds from OS entropy, so output is not reproducible.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("invalid sampling parameter {field} = {value}: must be {expected}")]
    InvalidParam {
        field: &'static str,
        value: f32,
        expected: &'static str,
    },
}

impl SamplingParams {
    /// Rejects values that would make sampling meaningless or produce NaN
    /// probabilities; the error names the first offending field.
    pub fn validate(&self) -> Result<(), SamplingError> {
        fn check(
            field: &'static str,
            value: f32,
            ok: bool,
            expected: &'static str,
        ) -> Result<(), SamplingError> {
            if ok {
                Ok(())
            } else {
                Err(SamplingError::InvalidParam {
                    field,
                    value,
                    expected,
                })
            }
        }
        let t = self.temperature;
        check(
            "temperature",
            t,
            t.is_finite() && t >= 0.0,
            "finite and >= 0",
        )?;
        let p = self.top_p;
        check("top_p", p, p > 0.0 && p <= 1.0, "in (0, 1]")?;
        let m = self.min_p;
        check("min_p", m, (0.0..=1.0).contains(&m), "in [0, 1]")?;
        let r = self.repetition_penalty;
        check(
            "repetition_penalty",
            r,
            r.is_finite() && r > 0.0,
            "finite and > 0",
        )?;
        let pp = self.presence_penalty;
        check(
            "presence_penalty",
            pp,
            (-2.0..=2.0).contains(&pp),
            "in [-2, 2]",
        )?;
        let fp = self.frequency_penalty;
        check(
            "frequency_penalty",
            fp,
            (-2.0..=2.0).contains(&fp),
            "in [-2, 2]",
        )?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    /// Scaled logit until the softmax step, unnormalised probability after.
    value: f32,
}

/// Highest value first; equal values fall back to the lower id so every
/// selection and sort below is a deterministic total order.
fn by_value_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.value.total_cmp(&a.value).then(a.id.cmp(&b.id))
}

/// How many of the most probable candidates are ordered per round of the
/// nucleus search; a typical nucleus fits in the first round, so the rest of
/// the vocabulary is only partitioned, never sorted.
const NUCLEUS_FIRST_CHUNK: usize = 256;

/// One request's sampler. Owns its RNG so a fixed seed reproduces the same
/// tokens, and scratch buffers so steady-state sampling does not allocate.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    sorted_history: Vec<u32>,
    candidates: Vec<Candidate>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self {
            params,
            rng,
            sorted_history: Vec::new(),
            candidates: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. Penalties are applied to `logits` in place, and
    /// `history` is exactly the set of tokens to penalise (the caller chooses
    /// whether that includes the prompt). Ids in `history` beyond the
    /// vocabulary are ignored. If every logit is NaN, token 0 is returned.
    ///
    /// # Panics
    /// If `logits` is empty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "cannot sample from an empty vocabulary");
        self.apply_penalties(logits, history);
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        self.sample_filtered(logits)
    }

    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32]) {
        let rep = self.params.repetition_penalty;
        let presence = self.params.presence_penalty;
        let frequency = self.params.frequency_penalty;
        if history.is_empty() || (rep == 1.0 && presence == 0.0 && frequency == 0.0) {
            return;
        }
        // Sorting a copy groups repeats so each distinct token is penalised
        // once with its count, without a per-call hash map.
        self.sorted_history.clear();
        self.sorted_history.extend_from_slice(history);
        self.sorted_history.sort_unstable();
        for run in self.sorted_history.chunk_by(|a, b| a == b) {
            let Some(logit) = logits.get_mut(run[0] as usize) else {
                continue;
            };
            if rep != 1.0 {
                // HF divides positive logits and multiplies negative ones so
                // the penalty always lowers the token's probability.
                *logit = if *logit < 0.0 {
                    *logit * rep
                } else {
                    *logit / rep
                };
            }
            *logit -= presence + frequency * run.len() as f32;
        }
    }

    fn sample_filtered(&mut self, logits: &[f32]) -> u32 {
        let temperature = self.params.temperature;
        let cands = &mut self.candidates;
        cands.clear();
        // NaN and -inf tokens have zero probability; dropping them up front
        // keeps them out of the softmax entirely.
        cands.extend(
            logits
                .iter()
                .enumerate()
                .filter(|&(_, &l)| !l.is_nan() && l != f32::NEG_INFINITY)
                .map(|(id, &l)| Candidate {
                    id: id as u32,
                    value: l / temperature,
                }),
        );
        if cands.is_empty() {
            return argmax(logits);
        }

        let k = self.params.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_value_desc);
            cands.truncate(k);
        }

        let max = cands
            .iter()
            .map(|c| c.value)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f64;
        for c in cands.iter_mut() {
            // The equality test keeps +inf logits (from overflow at tiny
            // temperatures) at weight 1 instead of inf - inf = NaN.
            c.value = if c.value == max {
                1.0
            } else {
                (c.value - max).exp()
            };
            total += f64::from(c.value);
        }

        if self.params.top_p < 1.0 {
            let keep = nucleus_len(cands, f64::from(self.params.top_p) * total);
            cands.truncate(keep);
        }

        // The most probable token has weight exactly 1 and survives top-k and
        // top-p, so the weights are already relative to the max probability.
        let min_p = self.params.min_p;
        if min_p > 0.0 {
            cands.retain(|c| c.value >= min_p);
        }

        let total: f64 = cands.iter().map(|c| f64::from(c.value)).sum();
        let r = self.rng.random::<f64>() * total;
        let mut cumulative = 0.0f64;
        for c in cands.iter() {
            cumulative += f64::from(c.value);
            if r < cumulative {
                return c.id;
            }
        }
        // The loop sums in the same order as `total` and `r < total`, so it
        // always returns; this only satisfies the type checker.
        cands[cands.len() - 1].id
    }
}

/// Reorders `cands` so the most probable come first and returns the length
/// of the smallest such prefix whose weight reaches `target` (at least 1).
/// Sorting proceeds in growing chunks: each chunk is partitioned off the
/// unsorted remainder, which only ever holds smaller values, so the prefix
/// order is exact without sorting the whole vocabulary.
fn nucleus_len(cands: &mut [Candidate], target: f64) -> usize {
    let n = cands.len();
    let mut sorted = 0;
    let mut chunk = NUCLEUS_FIRST_CHUNK;
    let mut cumulative = 0.0f64;
    loop {
        let end = (sorted + chunk).min(n);
        let rest = &mut cands[sorted..];
        if end < n {
            rest.select_nth_unstable_by(end - sorted - 1, by_value_desc);
        }
        rest[..end - sorted].sort_unstable_by(by_value_desc);
        for (i, c) in cands[sorted..end].iter().enumerate() {
            cumulative += f64::from(c.value);
            if cumulative >= target {
                return sorted + i + 1;
            }
        }
        if end == n {
            return n;
        }
        sorted = end;
        chunk *= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    /// Logits whose softmax is exactly `probs`.
    fn logits_for(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn counts(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            let mut l = logits.to_vec();
            counts[sampler.sample(&mut l, &[]) as usize] += 1;
        }
        counts
    }

    #[test]
    fn default_is_valid_greedy() {
        let p = SamplingParams::default();
        assert_eq!(p.temperature, 0.0);
        assert!(p.validate().is_ok());
    }

    #[test]
    fn missing_fields_deserialize_to_defaults() {
        use serde::de::value::{Error, MapDeserializer};
        use serde::Deserialize;
        let fields = [("temperature", 0.8f32), ("top_p", 0.9)];
        let de = MapDeserializer::<_, Error>::new(fields.into_iter());
        let parsed = SamplingParams::deserialize(de).unwrap();
        let expected = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            ..SamplingParams::default()
        };
        assert_eq!(parsed, expected);
    }

    #[test]
    fn greedy_takes_argmax_lowest_id_on_ties_and_skips_nan() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        let mut logits = [f32::NAN, 1.0, 3.0, 3.0, f32::NAN, -1.0];
        assert_eq!(s.sample(&mut logits, &[]), 2);
        let mut logits = [f32::NAN, f32::NEG_INFINITY, f32::NAN];
        assert_eq!(s.sample(&mut logits, &[]), 1);
        let mut logits = [f32::NAN, f32::NAN];
        assert_eq!(s.sample(&mut logits, &[]), 0);
    }

    #[test]
    fn nan_logits_are_never_sampled() {
        let mut s = Sampler::new(params(|_| {})).unwrap();
        let logits = [f32::NAN, 0.0, f32::NAN, 0.0, f32::NEG_INFINITY];
        let c = counts(&mut s, &logits, 1000);
        assert_eq!(c[0] + c[2] + c[4], 0);
        assert!(c[1] > 0 && c[3] > 0);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut s = Sampler::new(params(|p| p.top_k = 1)).unwrap();
        for _ in 0..200 {
            let logits: Vec<f32> = (0..500).map(|_| rng.random_range(-5.0..5.0)).collect();
            let expected = argmax(&logits);
            assert_eq!(s.sample(&mut logits.clone(), &[]), expected);
        }
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let mut s = Sampler::new(params(|p| p.top_k = 2)).unwrap();
        let c = counts(&mut s, &logits_for(&[0.1, 0.4, 0.2, 0.3]), 2000);
        assert_eq!(c[0] + c[2], 0);
        assert!(c[1] > 0 && c[3] > 0);
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut s = Sampler::new(params(|p| p.top_p = 1e-6)).unwrap();
        for _ in 0..200 {
            let logits: Vec<f32> = (0..2000).map(|_| rng.random_range(-5.0..5.0)).collect();
            let expected = argmax(&logits);
            assert_eq!(s.sample(&mut logits.clone(), &[]), expected);
        }
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p_and_renormalises() {
        // 0.5 alone is short of 0.75; 0.5 + 0.3 reaches it, so {0, 1} remain
        // and are drawn in proportion 0.5 : 0.3.
        let mut s = Sampler::new(params(|p| p.top_p = 0.75)).unwrap();
        let draws = 20_000;
        let c = counts(&mut s, &logits_for(&[0.3, 0.15, 0.5, 0.05]), draws);
        assert_eq!(c[1] + c[3], 0);
        let freq = c[2] as f64 / draws as f64;
        assert!((freq - 0.625).abs() < 0.02, "freq {freq}");
    }

    #[test]
    fn min_p_drops_tokens_below_fraction_of_max() {
        // Threshold 0.2 * 0.5 = 0.1: token 3 (0.05) goes, token 2 (0.15) stays.
        let mut s = Sampler::new(params(|p| p.min_p = 0.2)).unwrap();
        let c = counts(&mut s, &logits_for(&[0.5, 0.3, 0.15, 0.05]), 1000);
        assert_eq!(c[3], 0);
        assert!(c[2] > 0);
    }

    #[test]
    fn temperature_matches_softmax_frequencies() {
        let logits = [1.0f32, 2.0, 0.5, 3.0];
        let t = 0.7f32;
        let exp: Vec<f64> = logits.iter().map(|&l| f64::from(l / t).exp()).collect();
        let z: f64 = exp.iter().sum();
        let mut s = Sampler::new(params(|p| p.temperature = t)).unwrap();
        let draws = 20_000;
        let c = counts(&mut s, &logits, draws);
        for (i, e) in exp.iter().enumerate() {
            let freq = c[i] as f64 / draws as f64;
            assert!(
                (freq - e / z).abs() < 0.015,
                "token {i}: {freq} vs {}",
                e / z
            );
        }
    }

    #[test]
    fn repetition_penalty_lowers_both_signs_once_per_token() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        })
        .unwrap();
        let mut logits = [2.0, -2.0, 1.5, 0.5, 0.0];
        // Token 0 appears twice but is divided once; id 99 is out of range.
        let token = s.sample(&mut logits, &[0, 1, 0, 99]);
        assert_eq!(logits, [1.0, -4.0, 1.5, 0.5, 0.0]);
        assert_eq!(token, 2);
    }

    #[test]
    fn presence_and_frequency_penalties_subtract_by_count() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::default()
        })
        .unwrap();
        let mut logits = [1.0, 1.0, 1.0];
        let token = s.sample(&mut logits, &[0, 1, 0]);
        assert_eq!(logits, [0.0, 0.25, 1.0]);
        assert_eq!(token, 2);
    }

    #[test]
    fn same_seed_repeats_and_different_seeds_differ() {
        let logits = vec![0.0f32; 1000];
        let run = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = Some(seed))).unwrap();
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn unseeded_samplers_differ() {
        let logits = vec![0.0f32; 1000];
        let run = || {
            let mut s = Sampler::new(params(|p| p.seed = None)).unwrap();
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_ne!(run(), run());
    }

    #[test]
    fn nucleus_len_matches_full_sort() {
        let mut rng = StdRng::seed_from_u64(3);
        for &(n, p) in &[(10usize, 0.5f64), (5000, 0.3), (5000, 0.9), (20_000, 0.999)] {
            let cands: Vec<Candidate> = (0..n)
                .map(|id| Candidate {
                    id: id as u32,
                    value: rng.random_range(0.0f32..1.0).powi(8),
                })
                .collect();
            let total: f64 = cands.iter().map(|c| f64::from(c.value)).sum();
            let mut reference = cands.clone();
            reference.sort_by(by_value_desc);
            let mut cum = 0.0;
            let expected = reference
                .iter()
                .position(|c| {
                    cum += f64::from(c.value);
                    cum >= p * total
                })
                .map_or(n, |i| i + 1);
            let mut got = cands.clone();
            let len = nucleus_len(&mut got, p * total);
            assert_eq!(len, expected, "n={n} p={p}");
            let ids = |v: &[Candidate]| v.iter().map(|c| c.id).collect::<Vec<_>>();
            assert_eq!(ids(&got[..len]), ids(&reference[..len]));
        }
    }

    #[test]
    fn validate_names_the_bad_field() {
        let field_of = |p: SamplingParams| match p.validate() {
            Err(SamplingError::InvalidParam { field, .. }) => field,
            Ok(()) => "ok",
        };
        let base = SamplingParams::default;
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: -0.1,
                    ..base()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..base()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..base()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.01,
                    ..base()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: -0.01,
                    ..base()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..base()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..base()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..base()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: f32::NAN,
                    ..base()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: f32::INFINITY,
                    ..base()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -2.0,
                    top_p: 1.0,
                    min_p: 1.0,
                    ..base()
                },
                "ok",
            ),
        ];
        for (p, field) in cases {
            assert_eq!(field_of(p.clone()), field, "{p:?}");
        }
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..base()
        })
        .is_err());
    }
}
