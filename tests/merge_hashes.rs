//! Merge outputs stay bit-identical across refactorings: every method's
//! output on a synthetic pool and on the quick demo pool, hashed (BLAKE3 of
//! each output file), against hashes recorded by an earlier build of the
//! program (`tests/reference/merge_hashes.json`).
//!
//! Floating-point results depend on the CPU's vector instructions (FMA, the
//! width of a SIMD lane) and the quick pool's training on the thread count,
//! so the recorded hashes carry the machine they came from; on a machine of
//! another kind the test says so and checks only that two runs agree.
//!
//! Recording (with the binary of the version the hashes should come from):
//! `FUSION_HASH_BIN=/path/to/old/fusion FUSION_RECORD_HASHES=tests/reference/merge_hashes.json
//! cargo test --release --test merge_hashes -- --test-threads 1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

const REFERENCE: &str = "tests/reference/merge_hashes.json";

/// The synthetic pool: `fusion zoo synth` (random, base + small deltas).
const SYNTH: &[&str] = &[
    "zoo",
    "synth",
    "--params",
    "3M",
    "--experts",
    "3",
    "--dtype",
    "bf16",
    "--seed",
    "11",
    "--out",
    ".",
];

/// One merge per tensor-wise method (non-default parameters where a method
/// has them), on the synthetic pool's `base` and `expert_1..3`.
const SYNTH_MERGES: &[(&str, &str)] = &[
    (
        "simple_average",
        "simple_average(expert_1,expert_2,expert_3)",
    ),
    (
        "weighted_average",
        "weighted_average(expert_1:0.5,expert_2:0.3,expert_3:0.2)",
    ),
    (
        "task_arithmetic",
        "task_arithmetic(expert_1,expert_2,expert_3;base=base,scaling_coefficient=0.4)",
    ),
    ("slerp", "slerp(expert_1,expert_2;t=0.3)"),
    (
        "ties_merging",
        "ties_merging(expert_1,expert_2,expert_3;base=base,density=0.3,scaling_coefficient=0.7)",
    ),
    (
        "dare",
        "dare(expert_1,expert_2,expert_3;base=base,sparsity_ratio=0.4,seed=5)",
    ),
    (
        "magnitude_pruning",
        "magnitude_pruning(expert_1;base=base,prune_ratio=0.4)",
    ),
    ("expo", "expo(expert_1,expert_2;base=base)"),
    (
        "model_stock",
        "model_stock(expert_1,expert_2,expert_3;base=base)",
    ),
    (
        "breadcrumbs",
        "breadcrumbs(expert_1,expert_2,expert_3;base=base,density=0.8,gamma=0.05)",
    ),
    ("iso_c", "iso_c(expert_1,expert_2,expert_3;base=base)"),
    ("iso_cts", "iso_cts(expert_1,expert_2,expert_3;base=base)"),
    ("tsv_m", "tsv_m(expert_1,expert_2,expert_3;base=base)"),
    (
        "wudi",
        "wudi(expert_1,expert_2,expert_3;base=base,iterations=5)",
    ),
    ("linear", "linear(expert_1,expert_2,expert_3)"),
    (
        "ties",
        "ties(expert_1,expert_2,expert_3;base=base,density=0.4)",
    ),
    (
        "dare_linear",
        "dare_linear(expert_1,expert_2,expert_3;base=base,density=0.6,seed=2)",
    ),
    (
        "dare_ties",
        "dare_ties(expert_1,expert_2,expert_3;base=base,density=0.6,seed=2)",
    ),
];

/// Merges on the quick demo pool (seed 7): tensor-wise and routed, routers
/// untrained and trained on the pool's tasks.
const DEMO_MERGES: &[(&str, &str, bool)] = &[
    (
        "ties_merging",
        "ties_merging(add,sort,upper;base=base,density=0.2)",
        false,
    ),
    (
        "task_arithmetic",
        "task_arithmetic(add,sort,upper;base=base,scaling_coefficient=0.3)",
        false,
    ),
    ("we_moe", "we_moe(add,sort,upper;base=base,steps=0)", false),
    (
        "we_moe_trained",
        "we_moe(add,sort;base=base,steps=3,batch_size=4)",
        true,
    ),
    (
        "sparse_we_moe",
        "sparse_we_moe(add,sort;base=base,steps=0)",
        false,
    ),
    (
        "rankone_moe",
        "rankone_moe(add,sort;base=base,steps=0,rank_k=4)",
        false,
    ),
];

fn bin() -> PathBuf {
    std::env::var_os("FUSION_HASH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fusion")))
}

fn run(cwd: &Path, args: &[&str]) {
    let out = Command::new(bin())
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run fusion");
    assert!(
        out.status.success(),
        "fusion {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The kind of machine floating-point results depend on.
fn machine() -> Value {
    let isa = if cfg!(target_arch = "x86_64") {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                "x86_64+avx512f"
            } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            {
                "x86_64+avx2+fma"
            } else {
                "x86_64"
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!()
    } else {
        std::env::consts::ARCH
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    json!({"isa": isa, "threads": threads})
}

/// BLAKE3 of every weight file of a merge's output folder.
fn hash_folder(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            out.insert(name, blake3::hash(&bytes).to_hex().to_string());
        }
    }
    assert!(!out.is_empty(), "{} has no weights", dir.display());
    out
}

fn merge_all(cwd: &Path, merges: &[(&str, &str, bool)]) -> Value {
    let mut hashes = serde_json::Map::new();
    for (name, spec, calibrate) in merges {
        let out = format!("out-{name}");
        let mut args = vec!["merge", "--spec", spec, "--out", &out, "--quiet", "--force"];
        if *calibrate {
            args.extend(["--calibration", "../tasks"]);
        }
        run(cwd, &args);
        hashes.insert(name.to_string(), json!(hash_folder(&cwd.join(&out))));
    }
    Value::Object(hashes)
}

/// Compares (or records, with `FUSION_RECORD_HASHES`) the hashes of `part`.
fn check(part: &str, got: Value) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(path) = std::env::var_os("FUSION_RECORD_HASHES") {
        let path = root.join(path);
        let mut doc: Value = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| json!({}));
        doc["machine"] = machine();
        doc[part] = got;
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
        eprintln!("recorded {part} hashes in {}", path.display());
        return;
    }
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(REFERENCE)).unwrap()).unwrap();
    let want = &doc[part];
    assert!(want.is_object(), "{REFERENCE} has no `{part}`");
    // The same merges on any machine.
    let names = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&got), names(want));
    if doc["machine"] != machine() {
        eprintln!(
            "skipping the bit-identity check of {part}: the hashes were recorded on {} and this machine is {}",
            doc["machine"],
            machine()
        );
        return;
    }
    for (name, h) in got.as_object().unwrap() {
        assert_eq!(h, &want[name], "{part}: `{name}` is not bit-identical");
    }
}

#[test]
fn synthetic_pool_merges_are_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), SYNTH);
    let merges: Vec<(&str, &str, bool)> =
        SYNTH_MERGES.iter().map(|(n, s)| (*n, *s, false)).collect();
    let got = merge_all(dir.path(), &merges);
    // A second run of one random and one iterative method agrees with the first.
    let again = merge_all(dir.path(), &[merges[5], merges[13]]);
    for (name, h) in again.as_object().unwrap() {
        assert_eq!(h, &got[name], "`{name}` differs between two runs");
    }
    check("synth", got);
}

#[test]
fn demo_pool_merges_are_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        &["zoo", "build", "--quick", "--seed", "7", "--out", "pool"],
    );
    let pool = dir.path().join("pool");
    let mut got = serde_json::Map::new();
    for m in ["base", "add", "sort", "upper"] {
        got.insert(
            format!("pool/{m}"),
            json!(hash_folder(&pool.join("models").join(m))),
        );
    }
    // Run in the models folder (checkpoint names are folders); calibration
    // reads the pool's test tasks.
    let merges = merge_all(&pool.join("models"), DEMO_MERGES);
    got.extend(merges.as_object().unwrap().clone());
    check("demo", Value::Object(got));
}
