//! Data-driven merges on the real MiniLM pool: `fusion merge --calibration
//! calibration` runs RegMean on each fine-tune's own inputs (its model
//! card's widget examples), a second RegMean of the same experts takes every
//! Gram from the statistics cache, and the merged checkpoint and a Fisher
//! merge of the pool embed like the models they come from.

use super::*;

#[track_caller]
fn merge(pool: &Path, cache: &Path, spec: &str, out: &Path) -> String {
    let res = Command::new(env!("CARGO_BIN_EXE_fusion"))
        .current_dir(pool)
        .env("FUSION_CACHE_DIR", cache)
        .args([
            "merge", "--quiet", "--device", "cpu", "--force", "--spec", spec,
        ])
        .args(["--calibration", "calibration", "--out"])
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success(), "fusion merge {spec}: {err}");
    err
}

#[test]
fn regmean_reuses_its_grams_and_the_merges_embed_near_their_parents() {
    let pool = pool_or_skip!();
    let _t = Timer::start("regmean_reuses_its_grams_and_the_merges_embed_near_their_parents");
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let first = merge(
        pool,
        cache.path(),
        "regmean(models/sre,models/jobs)",
        &out.path().join("a"),
    );
    assert!(
        first.contains("statistics 0 from the cache and 2 computed"),
        "{first}"
    );
    let second = merge(
        pool,
        cache.path(),
        "regmean(models/jobs,models/sre;reduce_non_diagonal_ratio=0.5)",
        &out.path().join("b"),
    );
    assert!(
        second.contains("0 calibration batches") && second.contains("statistics 2 from the cache"),
        "{second}"
    );
    let merged = out.path().join("a");
    let provenance: Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("fusion_merge.json")).unwrap())
            .unwrap();
    assert_eq!(provenance["spec"]["method"], "regmean", "{provenance}");
    let texts = [
        "self-healing",
        "pod keeps crashing",
        "Frontend developer with React",
    ];
    let ours = vectors(&fusion_embed(pool, merged.to_str().unwrap(), false, &texts));
    assert_unit(&ours, "regmean");
    let fisher = vectors(&fusion_embed(
        pool,
        "fisher_merging(sre,jobs)",
        true,
        &texts,
    ));
    assert_unit(&fisher, "fisher_merging");
    // The two fine-tunes disagree (their cosines are 0.13 to 0.35 on these
    // texts), so "near both" cannot mean a fixed cosine: a merge lies between
    // them when it is no farther from either parent than the parents are from
    // each other, and it is neither of them.
    let parents: Vec<Vec<Vec<f32>>> = ["sre", "jobs"]
        .iter()
        .map(|p| {
            let dir = pool.join("models").join(p);
            vectors(&fusion_embed(pool, dir.to_str().unwrap(), false, &texts))
        })
        .collect();
    for (what, v) in [("regmean", &ours), ("fisher_merging", &fisher)] {
        for (t, text) in texts.iter().enumerate() {
            let apart = cosine(&parents[0][t], &parents[1][t]);
            let to: Vec<f64> = parents.iter().map(|p| cosine(&v[t], &p[t])).collect();
            assert!(
                to.iter().all(|&c| c >= apart),
                "{what} on {text:?}: cosines to sre, jobs {to:?}, the parents' own {apart:.3}"
            );
            assert!(
                to.iter().all(|&c| c < 0.99999),
                "{what} on {text:?} is a parent: {to:?}"
            );
        }
    }
}

/// A data-driven merge of the ONNX fine-tunes, on their own training texts
/// (`calibration-onnx/`), served through ONNX Runtime like any ONNX merge.
#[test]
fn an_onnx_regmean_is_served_through_onnx_runtime() {
    let pool = pool_or_skip!();
    if !super::onnx::ort_available() {
        return;
    }
    let _t = Timer::start("an_onnx_regmean_is_served_through_onnx_runtime");
    let texts = ["a fine film", "the hockey game went to overtime"];
    let args = [
        "embed",
        "--format",
        "json",
        "--merge",
        "regmean(polarity,news)",
        "--pool",
        "onnx-pool.yaml",
        "--input",
        texts[0],
        texts[1],
    ];
    let v = ok_json(&fusion(pool, &args), "fusion embed regmean(polarity,news)");
    let merged = vectors(&v);
    assert_eq!(merged.len(), 2);
    let polarity = pool.join("models/onnx-polarity");
    let theirs = vectors(&fusion_embed(
        pool,
        polarity.to_str().unwrap(),
        false,
        &texts,
    ));
    let cos: Vec<f64> = merged
        .iter()
        .zip(&theirs)
        .map(|(m, p)| cosine(m, p))
        .collect();
    assert!(cos.iter().all(|&c| c > 0.5 && c < 0.999999), "{cos:?}");
}
