//! Scores of the embedding tasks, as MTEB computes them:
//!
//! - `similarity`: the Spearman (headline) and Pearson correlations between
//!   the cosine similarity of each pair's embeddings and the human score;
//!   ranks of ties are averaged (`scipy.stats.spearmanr`);
//! - `embedding_classification`: the accuracy of a k-nearest-neighbour
//!   classifier (k = [`KNN_K`], cosine similarity, majority vote, a tie
//!   going to the label whose neighbours are most similar in sum) trained
//!   on the frozen embeddings of the `train` items and tested on the
//!   `test` items, or over [`FOLDS`] folds (item `i` in fold `i mod
//!   FOLDS`) when the items carry no split.

/// Neighbours that vote.
pub const KNN_K: usize = 5;
/// Folds of a classification task without a train/test split.
pub const FOLDS: usize = 5;

/// Cosine similarity of `a` and `b` (0 when either is all zeros).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// Pearson correlation of `x` and `y` (NaN when either is constant).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    sxy / (sxx.sqrt() * syy.sqrt())
}

/// Ranks from 1, ties given the mean of the ranks they span.
pub fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut out = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = rank;
        }
        i = j + 1;
    }
    out
}

/// Spearman correlation: Pearson of the ranks.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// The label k-NN predicts for `query` among `train` (embedding, label).
fn knn_predict<'a>(query: &[f32], train: &[(&[f32], &'a str)]) -> &'a str {
    let mut sims: Vec<(f64, &str)> = train.iter().map(|(v, l)| (cosine(query, v), *l)).collect();
    sims.sort_by(|a, b| b.0.total_cmp(&a.0));
    sims.truncate(KNN_K);
    let mut votes: Vec<(&str, usize, f64)> = Vec::new();
    for (s, l) in sims {
        match votes.iter_mut().find(|v| v.0 == l) {
            Some(v) => {
                v.1 += 1;
                v.2 += s;
            }
            None => votes.push((l, 1, s)),
        }
    }
    votes
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(a.2.total_cmp(&b.2)))
        .map(|v| v.0)
        .expect("at least one neighbour")
}

/// Accuracy of k-NN over `items` (embedding, label, split): `Some(true)`
/// trains, `Some(false)` tests; all `None` runs [`FOLDS`] folds. Returns
/// the accuracy and the number of items tested.
pub fn knn_accuracy(items: &[(&[f32], &str, Option<bool>)]) -> (f64, usize) {
    let split = items.iter().any(|i| i.2.is_some());
    let folds: Vec<(Vec<usize>, Vec<usize>)> = if split {
        let (train, test): (Vec<usize>, Vec<usize>) =
            (0..items.len()).partition(|&i| items[i].2 == Some(true));
        vec![(train, test)]
    } else {
        (0..FOLDS.min(items.len()))
            .map(|f| (0..items.len()).partition(|&i| i % FOLDS != f))
            .collect()
    };
    let (mut correct, mut tested) = (0usize, 0usize);
    for (train, test) in folds {
        let train: Vec<(&[f32], &str)> = train.iter().map(|&i| (items[i].0, items[i].1)).collect();
        if train.is_empty() {
            continue;
        }
        for &i in &test {
            tested += 1;
            correct += usize::from(knn_predict(items[i].0, &train) == items[i].1);
        }
    }
    (correct as f64 / tested.max(1) as f64, tested)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlations_match_scipy() {
        // scipy.stats.spearmanr([1, 2, 2, 4], [10, 30, 20, 40]).statistic
        // = 0.9486832980505139; pearsonr(...) = 0.9233805168766387.
        let x = [1.0, 2.0, 2.0, 4.0];
        let y = [10.0, 30.0, 20.0, 40.0];
        assert_eq!(ranks(&x), [1.0, 2.5, 2.5, 4.0]);
        assert!((spearman(&x, &y) - 0.948_683_298_050_513_8).abs() < 1e-12);
        assert!((pearson(&x, &y) - 0.923_380_516_876_638_7).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert!(pearson(&[1.0, 1.0], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn cosine_by_hand() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-7);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
        assert!((cosine(&[1.0, 2.0], &[-1.0, -2.0]) + 1.0).abs() < 1e-7);
    }

    #[test]
    fn knn_splits_folds_and_ties() {
        let a: &[f32] = &[1.0, 0.0];
        let a2: &[f32] = &[0.9, 0.1];
        let b: &[f32] = &[0.0, 1.0];
        let b2: &[f32] = &[0.1, 0.9];
        // Train/test: the test points sit next to their own class.
        let items = [
            (a, "x", Some(true)),
            (b, "y", Some(true)),
            (a2, "x", Some(false)),
            (b2, "y", Some(false)),
        ];
        assert_eq!(knn_accuracy(&items), (1.0, 2));
        // A test point labelled against its neighbours is wrong.
        let items = [
            (a, "x", Some(true)),
            (b, "y", Some(true)),
            (a2, "y", Some(false)),
        ];
        assert_eq!(knn_accuracy(&items), (0.0, 1));
        // Folds: every item tested once.
        let items: Vec<(&[f32], &str, Option<bool>)> = (0..10)
            .map(|i| {
                if i % 2 == 0 {
                    (a, "x", None)
                } else {
                    (b, "y", None)
                }
            })
            .collect();
        assert_eq!(knn_accuracy(&items), (1.0, 10));
        // One vote each: the more similar neighbour's label wins.
        assert_eq!(knn_predict(a2, &[(a, "x"), (b, "y")]), "x");
    }
}
