//! Metric definitions, on numbers a scorer produced.
//!
//! - **acc** (multiple choice, as lm-eval-harness): the prediction is the
//!   choice with the largest summed log-likelihood `log P(choice | context)`;
//!   acc is the fraction of items whose prediction is `gold`.
//! - **acc_norm** (multiple choice, as lm-eval-harness): the prediction is
//!   the argmax of `log P(choice | context) / len(choice)`, `len` the length
//!   of the choice text in UTF-8 bytes (lm-eval divides by the Python string
//!   length, which is the same for ASCII text).
//! - **exact_match** (generate): the greedy continuation, trimmed of
//!   surrounding whitespace, equals the trimmed answer.
//! - **perplexity**: `exp(−Σ log P / Σ tokens)` over all texts of the task,
//!   each scored from the start of sequence; **byte_perplexity** divides by
//!   the UTF-8 bytes instead, and **bits_per_byte** is
//!   `−Σ log P / Σ bytes / ln 2` (lm-eval's definitions).
//! - **acc** (classification): the prediction is the candidate label with the
//!   largest `log P(label | input)` among the labels seen in the task.
//!
//! Ties in an argmax go to the first candidate (numpy's `argmax`, which
//! lm-eval uses); a NaN log-likelihood never wins.

/// Index of the largest value, the first one on ties; NaN counts as −∞.
/// `None` for an empty slice.
pub fn argmax(values: &[f64]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, &v) in values.iter().enumerate() {
        let v = if v.is_nan() { f64::NEG_INFINITY } else { v };
        match best {
            Some((_, b)) if v <= b => {}
            _ => best = Some((i, v)),
        }
    }
    best.map(|(i, _)| i)
}

/// The `acc` and `acc_norm` predictions of one multiple-choice item from the
/// log-likelihood of each choice. `None` when there are no choices or their
/// counts differ.
pub fn multiple_choice_predictions(logprobs: &[f64], choices: &[String]) -> Option<(usize, usize)> {
    if logprobs.len() != choices.len() {
        return None;
    }
    let acc = argmax(logprobs)?;
    let normed: Vec<f64> = logprobs
        .iter()
        .zip(choices)
        .map(|(lp, c)| lp / c.len().max(1) as f64)
        .collect();
    Some((acc, argmax(&normed)?))
}

/// Whether a generated text matches the answer after trimming whitespace.
pub fn exact_match(generated: &str, answer: &str) -> bool {
    generated.trim() == answer.trim()
}

/// `correct / total` (0 for no items).
pub fn accuracy(correct: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        correct as f64 / total as f64
    }
}

/// Sums over the texts of a perplexity task.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerplexityTotals {
    /// Σ log P(text), natural log.
    pub logprob: f64,
    /// Σ tokens scored.
    pub tokens: usize,
    /// Σ UTF-8 bytes of the texts.
    pub bytes: usize,
}

impl PerplexityTotals {
    /// Adds one text's log-likelihood.
    pub fn add(&mut self, logprob: f64, tokens: usize, text: &str) {
        self.logprob += logprob;
        self.tokens += tokens;
        self.bytes += text.len();
    }

    /// `exp(−Σ log P / Σ tokens)`.
    pub fn perplexity(&self) -> f64 {
        (-self.logprob / self.tokens.max(1) as f64).exp()
    }

    /// `exp(−Σ log P / Σ bytes)`.
    pub fn byte_perplexity(&self) -> f64 {
        (-self.logprob / self.bytes.max(1) as f64).exp()
    }

    /// `−Σ log P / Σ bytes / ln 2`.
    pub fn bits_per_byte(&self) -> f64 {
        -self.logprob / self.bytes.max(1) as f64 / std::f64::consts::LN_2
    }
}

/// True for metrics where larger is better (accuracies, correlations); false
/// for perplexities and bits per byte.
pub fn higher_is_better(metric: &str) -> bool {
    matches!(
        metric,
        "acc" | "acc_norm" | "exact_match" | "spearman" | "pearson"
    )
}

/// True for metrics that a report shows ×100 and averages: accuracies and
/// exact match (fractions in [0, 1]) and, as MTEB reports them, the Spearman
/// and Pearson correlations of similarity tasks (in [−1, 1]); perplexities
/// are not averaged.
pub fn is_fraction(metric: &str) -> bool {
    higher_is_better(metric)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f64::NAN, -5.0]), Some(1));
        assert_eq!(argmax(&[f64::NEG_INFINITY, f64::NEG_INFINITY]), Some(0));
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn acc_and_acc_norm_can_disagree() {
        // ln 0.1 = −2.303 for "a" (1 byte); 2·ln 0.2 = −3.219 for "bb" (2 bytes).
        // Summed: "a" wins. Per byte: −2.303 vs −1.609: "bb" wins.
        let lps = [0.1f64.ln(), 2.0 * 0.2f64.ln()];
        assert_eq!(
            multiple_choice_predictions(&lps, &s(&["a", "bb"])),
            Some((0, 1))
        );
        // Bytes, not characters: "é" is 2 bytes, so −3/2 beats −2/1.
        assert_eq!(
            multiple_choice_predictions(&[-2.0, -3.0], &s(&["x", "é"])),
            Some((0, 1))
        );
        assert_eq!(multiple_choice_predictions(&[-1.0], &s(&["a", "b"])), None);
    }

    #[test]
    fn correlations_rank_and_average_like_accuracies() {
        for m in ["acc", "acc_norm", "exact_match", "spearman", "pearson"] {
            assert!(higher_is_better(m) && is_fraction(m), "{m}");
        }
        for m in ["perplexity", "byte_perplexity", "bits_per_byte"] {
            assert!(!higher_is_better(m) && !is_fraction(m), "{m}");
        }
    }

    #[test]
    fn exact_match_trims_whitespace_only() {
        assert!(exact_match(" 42\n", "42"));
        assert!(!exact_match("42.", "42"));
        assert!(!exact_match("4 2", "42"));
    }

    #[test]
    fn perplexity_from_totals() {
        let mut t = PerplexityTotals::default();
        // Two texts: 4 tokens at log P = −4 ln 2 in total (P = 1/2 each),
        // and 2 tokens at −2 ln 4 (P = 1/4 each).
        t.add(-4.0 * 2f64.ln(), 4, "abcd");
        t.add(-2.0 * 4f64.ln(), 2, "ef");
        // Σ log P = −8 ln 2 over 6 tokens: exp(8 ln 2 / 6) = 2^(4/3).
        assert!((t.perplexity() - 2f64.powf(4.0 / 3.0)).abs() < 1e-12);
        // Over 6 bytes too.
        assert!((t.byte_perplexity() - 2f64.powf(4.0 / 3.0)).abs() < 1e-12);
        assert!((t.bits_per_byte() - 8.0 / 6.0).abs() < 1e-12);
        assert_eq!(accuracy(3, 4), 0.75);
        assert_eq!(accuracy(0, 0), 0.0);
    }
}
