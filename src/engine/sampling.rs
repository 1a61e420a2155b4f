//! Choosing the next token from logits: greedy, or temperature / top-k / top-p (nucleus,
//! Holtzman et al. 2019) sampling with a per-sequence seeded generator, so a given seed always
//! gives the same text. Also the log-probabilities reported with `logprobs`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    pub seed: u64,
    /// Subtracted once from the logit of every token already generated (OpenAI semantics).
    pub presence_penalty: f64,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f64,
}

impl SamplingParams {
    pub fn greedy(seed: u64) -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 1e-6 || self.params.top_k == Some(1)
    }

    /// Picks the next token after `generated` (for the repetition penalties).
    pub fn sample(&mut self, logits: &[f32], generated: &[u32]) -> u32 {
        let (p, f) = (self.params.presence_penalty, self.params.frequency_penalty);
        if (p != 0.0 || f != 0.0) && !generated.is_empty() {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            let mut penalized = logits.to_vec();
            for (t, c) in counts {
                if let Some(l) = penalized.get_mut(t as usize) {
                    *l -= (p + f * c as f64) as f32;
                }
            }
            return self.sample_raw(&penalized);
        }
        self.sample_raw(logits)
    }

    fn sample_raw(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        let t = self.params.temperature;
        // Candidates sorted by logit, cut to top-k.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = self.params.top_k.unwrap_or(idx.len()).clamp(1, idx.len());
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_logit);
            idx.truncate(k);
        }
        idx.sort_unstable_by(by_logit);
        let max = logits[idx[0] as usize] as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - max) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (i, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return idx[i];
            }
        }
        idx[idx.len() - 1]
    }
}

/// Index of the largest logit (the lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log softmax(logits)`, in f64 for accuracy then rounded.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// The `n` largest entries as `(index, value)`, largest first.
pub fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(values.len());
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| {
        values[*b as usize]
            .total_cmp(&values[*a as usize])
            .then(a.cmp(b))
    };
    idx.select_nth_unstable_by(n - 1, cmp);
    idx.truncate(n);
    idx.sort_unstable_by(cmp);
    idx.into_iter().map(|i| (i, values[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_p: f64, top_k: Option<usize>, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(params(0.0, 1.0, None, 1));
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_draws_and_cuts_are_respected() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 1.0, None, seed));
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // top_k = 3 only ever yields the three largest logits.
        let top3: Vec<u32> = top_n(&logits, 3).into_iter().map(|(i, _)| i).collect();
        let mut s = Sampler::new(params(5.0, 1.0, Some(3), 3));
        for _ in 0..200 {
            assert!(top3.contains(&s.sample(&logits, &[])));
        }
        // A tiny top_p keeps only the most likely token.
        let mut s = Sampler::new(params(1.0, 1e-9, None, 3));
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[]), top3[0]);
        }
    }

    #[test]
    fn penalties_push_away_from_repeated_tokens() {
        let logits = [1.0f32, 0.9, 0.0];
        let mut p = params(0.0, 1.0, None, 1);
        p.frequency_penalty = 0.2;
        let mut s = Sampler::new(p.clone());
        assert_eq!(s.sample(&logits, &[]), 0);
        assert_eq!(s.sample(&logits, &[0]), 1, "0.8 < 0.9 after one use");
        p.frequency_penalty = 0.0;
        p.presence_penalty = 0.05;
        let mut s = Sampler::new(p);
        assert_eq!(
            s.sample(&logits, &[0, 0, 0]),
            0,
            "presence counts once: 0.95 > 0.9"
        );
    }

    #[test]
    fn log_softmax_normalizes() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((lp[2] - lp[1] - 1.0).abs() < 1e-6);
    }
}
