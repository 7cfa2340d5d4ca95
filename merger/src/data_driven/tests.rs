//! End-to-end tests of the data-driven methods on tiny random pools of both
//! families; the formulas' kernels are tested by hand in each method's file.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::adamerging::Coefficients;
use super::network::Family;
use super::testutil::{decoder_pool, encoder_pool, max_diff, tensors_of, Pool};
use super::*;
use crate::moe::calibration::CalibrationInput;
use crate::spec::{MergeSpec, ParamValue};

fn run(
    pool: &Pool,
    spec: &MergeSpec,
    items: &[CalibrationItem],
    sources: &[String],
    stats: Option<&StatsCache>,
) -> Result<(HashMap<String, Tensor>, DataReport)> {
    let params = DataParams::from_spec(spec)?;
    let open = |n: &str| pool.open(n);
    let cancel = Cancel::new();
    let ctx = DataContext {
        params: &params,
        open: &open,
        calibration: items,
        sources,
        device: &Device::Cpu,
        progress: false,
        cancel: &cancel,
        stats,
    };
    merge(&ctx)
}

fn spec(method: &str, pool: &Pool, base: bool) -> MergeSpec {
    let names: Vec<&str> = pool.experts.iter().map(String::as_str).collect();
    MergeSpec::new(method, base.then_some("base"), &names)
}

fn diff_all(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    a.iter()
        .filter(|(_, t)| t.dtype().is_float())
        .map(|(k, t)| max_diff(t, &b[k]))
        .fold(0.0, f32::max)
}

#[test]
fn every_method_merges_both_families_to_finite_weights() {
    for pool in [decoder_pool(2, 2, false), encoder_pool(2, 2)] {
        let (items, sources) = pool.calibration(6, 1);
        for (method, base, extra) in [
            ("fisher_merging", false, vec![("batch_size", 4.0)]),
            ("regmean", false, vec![]),
            ("regmean_plusplus", false, vec![]),
            (
                "adamerging",
                true,
                vec![("steps", 3.0), ("batch_size", 3.0)],
            ),
            ("ada_svd", true, vec![("gate_k", 2.0)]),
        ] {
            let mut s = spec(method, &pool, base);
            for (k, v) in extra {
                s = s.with(k, v);
            }
            let (merged, report) =
                run(&pool, &s, &items, &sources, None).unwrap_or_else(|e| panic!("{method}: {e}"));
            assert!(report.forward_batches > 0, "{method}");
            let e1 = tensors_of(&pool.open("e1").unwrap());
            for (name, t) in &e1 {
                assert_eq!(merged[name].dims(), t.dims(), "{method} {name}");
            }
            // It is a merge: away from each expert.
            assert!(diff_all(&e1, &merged) > 1e-4, "{method}");
        }
    }
}

#[test]
fn fisher_of_one_expert_twice_is_that_expert_and_grams_drop_padding() {
    let pool = decoder_pool(2, 2, false);
    let (items, mut sources) = pool.calibration(5, 2);
    // Source 1 named e1 too: expert e1 reads both sources.
    sources[1] = "e1".into();
    let s = MergeSpec::new("fisher_merging", None, &["e1"]).with("batch_size", 2.0);
    let (merged, _) = run(&pool, &s, &items, &sources, None).unwrap();
    let e1 = tensors_of(&pool.open("e1").unwrap());
    assert!(diff_all(&e1, &merged) < 1e-6);

    // Grams from batches of mixed lengths equal those of one input at a
    // time: padding never reaches them.
    let ck = pool.open("e1").unwrap();
    let family = Family::of(&ck).unwrap();
    let net = family
        .build(e1.clone(), &Device::Cpu, DType::F32, false)
        .unwrap();
    let params = DataParams::from_spec(&MergeSpec::new("regmean", None, &["e1"])).unwrap();
    let open = |n: &str| pool.open(n);
    let cancel = Cancel::new();
    let ctx = DataContext {
        params: &params,
        open: &open,
        calibration: &items,
        sources: &sources,
        device: &Device::Cpu,
        progress: false,
        cancel: &cancel,
        stats: None,
    };
    let hidden = indicatif::ProgressBar::hidden();
    let mut n = 0;
    let together =
        regmean::collect_grams(&net, &items[..5], &|_| true, &ctx, &hidden, &mut n).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    let mut sum: Option<Tensor> = None;
    let mut rows = 0;
    for item in &items[..5] {
        let g = regmean::collect_grams(
            &net,
            std::slice::from_ref(item),
            &|_| true,
            &ctx,
            &hidden,
            &mut n,
        )
        .unwrap();
        let CalibrationInput::Text(ids) = &item.input else {
            unreachable!()
        };
        let part = (&g.by_weight[name] * ids.len() as f64).unwrap();
        rows += ids.len();
        sum = Some(match sum {
            None => part,
            Some(s) => (s + part).unwrap(),
        });
    }
    let want = (sum.unwrap() / rows as f64).unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap() as f32;
    let d = max_diff(&together.by_weight[name], &want);
    assert!(d < 1e-5 * scale, "{d} vs {scale}");
    // q, k and v read one input: one Gram.
    let q = &together.by_weight["model.layers.0.self_attn.q_proj.weight"];
    let v = &together.by_weight["model.layers.0.self_attn.v_proj.weight"];
    assert_eq!(q.id(), v.id());
}

#[test]
fn regmean_plusplus_on_one_block_is_regmean() {
    let check = |pool: Pool| {
        let (items, sources) = pool.calibration(6, 3);
        let (a, _) = run(
            &pool,
            &spec("regmean", &pool, false),
            &items,
            &sources,
            None,
        )
        .unwrap();
        let (b, _) = run(
            &pool,
            &spec("regmean_plusplus", &pool, false),
            &items,
            &sources,
            None,
        )
        .unwrap();
        assert!(diff_all(&a, &b) < 1e-5, "{}", diff_all(&a, &b));
        a
    };
    check(decoder_pool(2, 1, true));
    check(encoder_pool(2, 1));
    // With two blocks the second block's Grams see the merged first block.
    let pool = decoder_pool(2, 2, true);
    let (items, sources) = pool.calibration(6, 3);
    let (a, _) = run(
        &pool,
        &spec("regmean", &pool, false),
        &items,
        &sources,
        None,
    )
    .unwrap();
    let (b, _) = run(
        &pool,
        &spec("regmean_plusplus", &pool, false),
        &items,
        &sources,
        None,
    )
    .unwrap();
    let l0 = "model.layers.0.mlp.down_proj.weight";
    let l1 = "model.layers.1.mlp.down_proj.weight";
    assert!(max_diff(&a[l0], &b[l0]) < 1e-5);
    assert!(max_diff(&a[l1], &b[l1]) > 1e-6);
}

#[test]
fn adamerging_at_zero_steps_is_task_arithmetic_and_training_lowers_the_entropy() {
    let pool = decoder_pool(2, 2, false);
    let (items, sources) = pool.calibration(8, 4);
    let s0 = spec("adamerging", &pool, true)
        .with("steps", 0.0)
        .with("init", 0.4);
    let (ada, report) = run(&pool, &s0, &[], &[], None).unwrap();
    assert_eq!(report.forward_batches, 0);
    let ta = MergeSpec::new("task_arithmetic", Some("base"), &["e1", "e2"])
        .with("scaling_coefficient", 0.4);
    let open = |n: &str| pool.open(n);
    let crate::plan::Plan::Tensorwise(t) = crate::plan::Plan::new(ta).unwrap() else {
        unreachable!()
    };
    let mut mp = t.open(&open).unwrap();
    let (ta, _) = crate::merge::merge_in_memory(
        &mut mp,
        &Device::Cpu,
        &crate::merge::Progress::new(0, "", false),
    )
    .unwrap();
    assert!(diff_all(&ta, &ada) < 1e-5, "{}", diff_all(&ta, &ada));

    for granularity in ["layer", "task"] {
        let s = spec("adamerging", &pool, true)
            .with("steps", 25.0)
            .with("lr", 0.05)
            .with("batch_size", 4.0)
            .with_value("granularity", ParamValue::Text(granularity.into()));
        let (_, report) = run(&pool, &s, &items, &sources, None).unwrap();
        let t = report.training.unwrap();
        assert!(t.entropy_after < t.entropy_before, "{granularity}: {t:?}");
        let groups = tensors_of(&pool.open("base").unwrap()).len();
        assert_eq!(t.coefficients.len(), 2);
        let want = if granularity == "layer" { groups } else { 1 };
        assert!(
            t.coefficients.iter().all(|c| c.len() == want),
            "{granularity}"
        );
        assert_eq!(
            t.groups.len(),
            if granularity == "layer" { groups } else { 0 }
        );
    }
    // clamp keeps every λ in [0, 1].
    let s = spec("adamerging", &pool, true)
        .with("steps", 10.0)
        .with("lr", 0.5)
        .with_value("clamp", ParamValue::Bool(true));
    let (_, report) = run(&pool, &s, &items, &sources, None).unwrap();
    let c = report.training.unwrap().coefficients;
    assert!(
        c.iter().flatten().all(|&l| (0.0..=1.0).contains(&l)),
        "{c:?}"
    );
}

/// dL/dλ by autograd against central finite differences, in f64.
#[test]
fn adamerging_gradients_match_finite_differences() {
    for pool in [decoder_pool(2, 1, false), encoder_pool(2, 1)] {
        let (items, _) = pool.calibration(3, 5);
        let to64 = |m: HashMap<String, Tensor>| -> HashMap<String, Tensor> {
            m.into_iter()
                .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
                .collect()
        };
        let base = to64(tensors_of(&pool.open("base").unwrap()));
        let experts: Vec<_> = pool
            .experts
            .iter()
            .map(|e| to64(tensors_of(&pool.open(e).unwrap())))
            .collect();
        let family = Family::of(&pool.open("base").unwrap()).unwrap();
        let batches: Vec<Vec<&CalibrationItem>> =
            vec![items[..3].iter().collect(), items[3..].iter().collect()];
        for granularity in [Granularity::Layer, Granularity::Task] {
            let mut coeffs = Coefficients::new(&base, &experts, granularity, 0.3).unwrap();
            let (loss, grad) = coeffs.gradient(&family, &batches).unwrap();
            let plain = coeffs.loss(&family, &batches).unwrap();
            assert!((loss - plain).abs() < 1e-10, "{loss} vs {plain}");
            let lam0 = coeffs.values();
            let h = 1e-5;
            // A few entries: an embedding's, a block's, a norm's coefficient
            // (layer-wise); the one coefficient per expert (task-wise).
            let groups = lam0[0].len();
            let pick: Vec<usize> = if groups == 1 {
                vec![0]
            } else {
                vec![0, groups / 2, groups - 1]
            };
            for i in 0..2 {
                for &g in &pick {
                    let mut at = |delta: f64| {
                        let mut l = lam0.clone();
                        l[i][g] += delta;
                        coeffs.set(l).unwrap();
                        coeffs.loss(&family, &batches).unwrap()
                    };
                    let fd = (at(h) - at(-h)) / (2.0 * h);
                    at(0.0);
                    let tol = 1e-6 + 1e-4 * fd.abs().max(grad[i][g].abs());
                    assert!(
                        (fd - grad[i][g]).abs() < tol,
                        "{granularity:?} λ[{i}][{g}]: chain rule {} vs finite differences {fd}",
                        grad[i][g]
                    );
                }
            }
        }
    }
}

#[test]
fn the_statistics_cache_saves_every_forward_pass_and_misses_on_change() {
    let pool = decoder_pool(3, 2, false);
    let (items, sources) = pool.calibration(6, 6);
    let dir = tempfile::tempdir().unwrap();
    let cache = StatsCache::new(dir.path(), 1 << 30);
    for method in ["regmean", "fisher_merging"] {
        let s = spec(method, &pool, false);
        let (first, r1) = run(&pool, &s, &items, &sources, Some(&cache)).unwrap();
        assert!(r1.forward_batches > 0 && r1.stats_misses == 3 && r1.stats_hits == 0);
        let (again, r2) = run(&pool, &s, &items, &sources, Some(&cache)).unwrap();
        assert_eq!(
            (r2.forward_batches, r2.stats_hits, r2.stats_misses),
            (0, 3, 0),
            "{method}"
        );
        assert!(diff_all(&first, &again) < 1e-6, "{method}");
        // A subset of the same experts: still no forward pass.
        let sub = MergeSpec::new(method, None, &["e3", "e1"]);
        let (_, r3) = run(&pool, &sub, &items, &sources, Some(&cache)).unwrap();
        assert_eq!(r3.forward_batches, 0, "{method}");
        // Changed calibration inputs of e1: e1 misses, e3 hits.
        let mut changed = items.clone();
        if let CalibrationInput::Text(ids) = &mut changed[0].input {
            ids.push(7);
        }
        let (_, r4) = run(&pool, &sub, &changed, &sources, Some(&cache)).unwrap();
        assert_eq!((r4.stats_hits, r4.stats_misses), (1, 1), "{method}");
    }
    // A changed checkpoint (e2 rewritten): a new fingerprint, a miss.
    let e2 = pool.path("e2").join("model.safetensors");
    let w = candle_core::safetensors::load(&e2, &Device::Cpu).unwrap();
    let w: HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, v)| (k, (v * 1.01).unwrap()))
        .collect();
    candle_core::safetensors::save(&w, &e2).unwrap();
    let (_, r) = run(
        &pool,
        &spec("regmean", &pool, false),
        &items,
        &sources,
        Some(&cache),
    )
    .unwrap();
    assert_eq!((r.stats_hits, r.stats_misses), (2, 1));
    assert!(
        cache
            .counters()
            .bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[test]
fn missing_calibration_is_a_422_naming_the_tasks() {
    let pool = decoder_pool(2, 1, false);
    let (items, _) = pool.calibration(2, 7);
    let e = run(&pool, &spec("regmean", &pool, false), &[], &[], None).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Unprocessable);
    assert!(e.to_string().contains("calibration"), "{e}");
    let sources = vec!["math".to_string(), "e2".to_string()];
    let e = run(
        &pool,
        &spec("fisher_merging", &pool, false),
        &items,
        &sources,
        None,
    )
    .unwrap_err();
    let m = e.to_string();
    assert!(m.contains("`e1`") && m.contains("math, e2"), "{m}");
    assert_eq!(e.kind(), crate::error::ErrorKind::Unprocessable);
}
