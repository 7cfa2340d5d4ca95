//! End-to-end tests of `fusion merge` through the real binary, on real
//! safetensors files. Expected values are worked out by hand from the toy
//! pool of `util.rs`: for every element x of the base, a = x + 1, b = x − 2.

mod util;

use safetensors::Dtype;
use util::*;

fn values_of(dir: &std::path::Path) -> Vec<Vec<f32>> {
    let ck = read_checkpoint(dir);
    NAMES.iter().map(|n| ck[*n].2.clone()).collect()
}

fn base_plus(d: f32) -> Vec<Vec<f32>> {
    toy_values("base")
        .into_iter()
        .map(|t| t.into_iter().map(|x| x + d).collect())
        .collect()
}

#[track_caller]
fn assert_model(dir: &std::path::Path, want: &[Vec<f32>], tol: f32) {
    let got = values_of(dir);
    for (g, w) in got.iter().zip(want) {
        close(g, w, tol);
    }
}

#[test]
fn linear_yaml_writes_a_loadable_checkpoint() {
    let pool = Pool::new(Dtype::F32);
    pool.write(
        "linear.yaml",
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1.0\n  - model: b\n    parameters:\n      weight: 3.0\ndtype: float32\n",
    );
    ok(&fusion(
        pool.path(),
        &["merge", "linear.yaml", "--out", "out"],
    ));
    // (1·(x+1) + 3·(x−2)) / (1+3) = x − 5/4
    let out = pool.path().join("out");
    assert_model(&out, &base_plus(-1.25), 1e-6);
    assert!(out.join("config.json").exists() && out.join("tokenizer.json").exists());
    assert!(out.join("fusion_merge.json").exists());
    let meta = file_metadata(&out.join("model.safetensors")).unwrap();
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    assert!(!out.join("model.safetensors.index.json").exists());
}

#[test]
fn task_arithmetic_and_ties_yaml_follow_mergekit() {
    let pool = Pool::new(Dtype::F32);
    // mergekit lists the base among the models; λ defaults to 1.0 in a YAML.
    pool.write(
        "ta.yaml",
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: base\n  - model: a\n    parameters: {weight: 0.5}\n  - model: b\n    parameters: {weight: 0.5}\n",
    );
    ok(&fusion(pool.path(), &["merge", "ta.yaml", "--out", "ta"]));
    // x + 1.0·(0.5·1 + 0.5·(−2)) = x − 0.5
    assert_model(&pool.path().join("ta"), &base_plus(-0.5), 1e-6);

    pool.write(
        "ties.yaml",
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: base\n  - model: a\n    parameters: {weight: 1.0, density: 1.0}\n  - model: b\n    parameters: {weight: 1.0, density: 1.0}\n",
    );
    ok(&fusion(
        pool.path(),
        &["merge", "ties.yaml", "--out", "ties"],
    ));
    // Σ wτ = 1 − 2 = −1 → sign −; only b agrees; normalised by its weight 1 → x − 2
    assert_model(&pool.path().join("ties"), &base_plus(-2.0), 1e-6);
}

#[test]
fn compact_spec_on_the_command_line() {
    let pool = Pool::new(Dtype::F32);
    ok(&fusion(
        pool.path(),
        &[
            "merge",
            "--spec",
            "task_arithmetic(a,b;base=base,scaling_coefficient=0.3)",
            "--out",
            "o",
        ],
    ));
    // x + 0.3·(1 − 2) = x − 0.3
    assert_model(&pool.path().join("o"), &base_plus(-0.3), 1e-5);
}

#[test]
fn slerp_with_filtered_t() {
    let pool = Pool::new(Dtype::F32);
    pool.write(
        "slerp.yaml",
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t:\n    - filter: embed\n      value: 0\n    - value: 1\ndtype: float32\n",
    );
    ok(&fusion(pool.path(), &["merge", "slerp.yaml", "--out", "s"]));
    // t = 0 on the embedding gives a (= x + 1); t = 1 elsewhere gives b (= x − 2).
    let got = values_of(&pool.path().join("s"));
    let a = base_plus(1.0);
    let b = base_plus(-2.0);
    close(&got[0], &a[0], 1e-5);
    for t in 1..4 {
        close(&got[t], &b[t], 1e-5);
    }
}

#[test]
fn magnitude_pruning_yaml_prunes_the_difference_from_base_model() {
    // base and ft: τ = ft − base on the linear weight, rows
    // [0.5, −0.3, 0.2] and [−1, 0.1, 2]; the embedding and norm change too,
    // but diff mode adds back only the linear weights' pruned τ.
    let dir = tempfile::tempdir().unwrap();
    let up = "model.layers.0.mlp.up_proj.weight";
    for (name, embed, w, norm) in [
        ("base", [1., 2., 3., 4.], [1.; 6], [1., 1.]),
        (
            "ft",
            [5., 6., 7., 8.],
            [1.5, 0.7, 1.2, 0., 1.1, 3.],
            [2., 2.],
        ),
    ] {
        write_checkpoint(
            &dir.path().join(name),
            Dtype::F32,
            &[
                T("model.embed_tokens.weight", &[2, 2], &embed),
                T(up, &[2, 3], &w),
                T("model.norm.weight", &[2], &norm),
            ],
        );
    }
    let merge = |yaml: &str, out: &str| {
        std::fs::write(dir.path().join("mp.yaml"), yaml).unwrap();
        ok(&fusion(dir.path(), &["merge", "mp.yaml", "--out", out]));
        read_checkpoint(&dir.path().join(out))
    };
    // The base listed among the models, as mergekit configs do; major: per
    // row zero the ⌊0.34·3⌋ = 1 largest |τ| (0.5, then 2) → θ0 + the rest.
    let major = merge(
        "merge_method: magnitude_pruning\nbase_model: base\nmodels:\n  - model: base\n  - model: ft\nparameters:\n  prune_ratio: 0.34\n  prune_type: major\n",
        "major",
    );
    close(&major[up].2, &[1., 0.7, 1.2, 0., 1.1, 1.], 1e-6);
    close(
        &major["model.embed_tokens.weight"].2,
        &[1., 2., 3., 4.],
        0.0,
    );
    close(&major["model.norm.weight"].2, &[1., 1.], 0.0);
    // Only the pruned model listed; minor (default): zero the smallest |τ|
    // per row (0.2, then 0.1).
    let minor = merge(
        "merge_method: magnitude_pruning\nbase_model: base\nmodels:\n  - model: ft\nparameters:\n  prune_ratio: 0.5\n",
        "minor",
    );
    close(&minor[up].2, &[1.5, 0.7, 1., 0., 1., 3.], 1e-6);
    close(
        &minor["model.embed_tokens.weight"].2,
        &[1., 2., 3., 4.],
        0.0,
    );
}

#[test]
fn bf16_round_trip_and_mixed_dtypes() {
    let pool = Pool::new(Dtype::BF16);
    pool.write(
        "linear.yaml",
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1.0}\n  - model: b\n    parameters: {weight: 3.0}\n",
    );
    ok(&fusion(
        pool.path(),
        &["merge", "linear.yaml", "--out", "out"],
    ));
    let ck = read_checkpoint(&pool.path().join("out"));
    assert!(
        ck.values().all(|(d, _, _)| *d == Dtype::BF16),
        "bf16 in, bf16 out"
    );
    // x − 1.25 for x ≤ 31 needs at most 7 significant bits: exact in bf16.
    assert_model(&pool.path().join("out"), &base_plus(-1.25), 0.0);

    // A pool mixing f32 (base), bf16 (a) and f16 (b).
    let mixed = tempfile::tempdir().unwrap();
    for (m, dt) in [("base", Dtype::F32), ("a", Dtype::BF16), ("b", Dtype::F16)] {
        let v = toy_values(m);
        write_checkpoint(
            &mixed.path().join(m),
            dt,
            &[
                T(NAMES[0], &[2, 2], &v[0]),
                T(NAMES[1], &[2, 3], &v[1]),
                T(NAMES[2], &[2, 3], &v[2]),
                T(NAMES[3], &[2], &v[3]),
            ],
        );
    }
    std::fs::write(
        mixed.path().join("ta.yaml"),
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 0.5}\n  - model: b\n    parameters: {weight: 0.5}\n",
    )
    .unwrap();
    ok(&fusion(mixed.path(), &["merge", "ta.yaml", "--out", "o"]));
    let ck = read_checkpoint(&mixed.path().join("o"));
    assert!(
        ck.values().all(|(d, _, _)| *d == Dtype::F32),
        "output takes the base's dtype"
    );
    assert_model(&mixed.path().join("o"), &base_plus(-0.5), 1e-6);
}

#[test]
fn sharded_output_and_sharded_input_round_trip() {
    let pool = Pool::new(Dtype::F32);
    pool.write(
        "linear.yaml",
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1.0}\n  - model: b\n    parameters: {weight: 3.0}\n",
    );
    // Tensors of 16, 24, 24 and 8 bytes with a 30-byte limit: four shards.
    ok(&fusion(
        pool.path(),
        &[
            "merge",
            "linear.yaml",
            "--out",
            "sharded",
            "--shard-size",
            "30",
        ],
    ));
    let out = pool.path().join("sharded");
    assert!(out.join("model.safetensors.index.json").exists());
    assert!(out.join("model-00004-of-00004.safetensors").exists());
    assert!(!out.join("model.safetensors").exists());
    assert_model(&out, &base_plus(-1.25), 1e-6);

    // `a` rewritten as two shards with an index merges to the same result.
    let v = toy_values("a");
    std::fs::remove_dir_all(pool.path().join("a")).unwrap();
    write_sharded(
        &pool.path().join("a"),
        Dtype::F32,
        &[
            &[T(NAMES[0], &[2, 2], &v[0]), T(NAMES[3], &[2], &v[3])],
            &[T(NAMES[1], &[2, 3], &v[1]), T(NAMES[2], &[2, 3], &v[2])],
        ],
    );
    ok(&fusion(
        pool.path(),
        &["merge", "linear.yaml", "--out", "from_sharded"],
    ));
    assert_eq!(
        read_checkpoint(&pool.path().join("from_sharded")),
        read_checkpoint(&out)
    );
}

#[test]
fn output_folder_is_protected_unless_forced() {
    let pool = Pool::new(Dtype::F32);
    pool.write(
        "l.yaml",
        "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n",
    );
    std::fs::create_dir(pool.path().join("busy")).unwrap();
    std::fs::write(pool.path().join("busy/keep.txt"), "precious").unwrap();
    fails_with(
        &fusion(pool.path(), &["merge", "l.yaml", "--out", "busy"]),
        &["busy", "not empty", "--force"],
    );
    assert!(pool.path().join("busy/keep.txt").exists());
    ok(&fusion(
        pool.path(),
        &["merge", "l.yaml", "--out", "busy", "--force"],
    ));
    assert!(!pool.path().join("busy/keep.txt").exists());
    // mergekit's linear with default weights 1, 1: (x+1 + x−2)/2 = x − 0.5
    assert_model(&pool.path().join("busy"), &base_plus(-0.5), 1e-6);
}

#[test]
fn a_failed_merge_leaves_nothing_behind() {
    let pool = Pool::new(Dtype::F32);
    // The filter list has no default entry: the norm tensor fails mid-merge.
    pool.write(
        "slerp.yaml",
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t:\n    - filter: layers\n      value: 0.5\n",
    );
    fails_with(
        &fusion(pool.path(), &["merge", "slerp.yaml", "--out", "half"]),
        &["`t`", "no filter entry matches"],
    );
    assert!(!pool.path().join("half").exists());
    let leftovers: Vec<_> = std::fs::read_dir(pool.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary folders left: {leftovers:?}"
    );
}

fn copy_model(pool: &Pool, from: &str, to: &str) -> std::path::PathBuf {
    let dst = pool.path().join(to);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(pool.path().join(from)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn ta_yaml(pool: &Pool, name: &str, expert: &str) {
    pool.write(
        name,
        &format!("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: a\n  - model: {expert}\n"),
    );
}

#[test]
fn input_errors_name_the_cause() {
    let pool = Pool::new(Dtype::F32);
    let run = |yaml: &str| fusion(pool.path(), &["merge", yaml, "--out", "never"]);

    ta_yaml(&pool, "missing.yaml", "nowhere");
    fails_with(&run("missing.yaml"), &["nowhere", "does not exist"]);

    // A tensor missing in one expert.
    let v = toy_values("b");
    write_checkpoint(
        &pool.path().join("short"),
        Dtype::F32,
        &[
            T(NAMES[0], &[2, 2], &v[0]),
            T(NAMES[1], &[2, 3], &v[1]),
            T(NAMES[2], &[2, 3], &v[2]),
        ],
    );
    ta_yaml(&pool, "short.yaml", "short");
    fails_with(
        &run("short.yaml"),
        &["model.norm.weight", "missing", "short"],
    );

    // A shape mismatch.
    write_checkpoint(
        &pool.path().join("wide"),
        Dtype::F32,
        &[
            T(NAMES[0], &[2, 2], &v[0]),
            T(NAMES[1], &[2, 3], &v[1]),
            T(NAMES[2], &[3, 2], &v[2]),
            T(NAMES[3], &[2], &v[3]),
        ],
    );
    ta_yaml(&pool, "wide.yaml", "wide");
    fails_with(
        &run("wide.yaml"),
        &[
            "model.layers.1.mlp.up_proj.weight",
            "[3, 2]",
            "[2, 3]",
            "wide",
        ],
    );

    // slerp takes exactly two models.
    pool.write("slerp3.yaml", "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n  - model: base\n");
    fails_with(
        &run("slerp3.yaml"),
        &["slerp3.yaml", "slerp", "exactly one other model", "found 2"],
    );

    pool.write(
        "unknown.yaml",
        "merge_method: frobnicate\nmodels:\n  - model: a\n",
    );
    fails_with(
        &run("unknown.yaml"),
        &["unknown merge method `frobnicate`", "ties"],
    );

    pool.write(
        "param.yaml",
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\nparameters:\n  densty: 0.5\n",
    );
    fails_with(
        &run("param.yaml"),
        &["unknown parameter", "densty", "density"],
    );

    pool.write("density.yaml", "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {density: 1.5}\n");
    fails_with(&run("density.yaml"), &["density", "1.5"]);

    pool.write("nan.yaml", "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: .nan}\n  - model: b\n");
    fails_with(&run("nan.yaml"), &["weight", "NaN"]);

    pool.write(
        "sparsity.yaml",
        "method: dare\nbase: base\nmodels:\n  - name: a\nparameters:\n  sparsity_ratio: -0.1\nseed: 1\n",
    );
    fails_with(&run("sparsity.yaml"), &["sparsity_ratio", "-0.1"]);

    pool.write(
        "both.yaml",
        "merge_method: linear\nmodels:\n  - model: a\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n",
    );
    fails_with(&run("both.yaml"), &["`models`", "`slices`", "not both"]);

    pool.write(
        "pass.yaml",
        "merge_method: passthrough\nmodels:\n  - model: a\n  - model: b\n",
    );
    fails_with(&run("pass.yaml"), &["passthrough", "1"]);

    pool.write("typo.yaml", "merge_method: linear\nmodel:\n  - model: a\n");
    fails_with(&run("typo.yaml"), &["typo.yaml", "model"]);

    assert!(!pool.path().join("never").exists());
}

#[test]
fn corrupt_safetensors_are_refused_with_the_file_named() {
    let pool = Pool::new(Dtype::F32);
    let run = |yaml: &str| fusion(pool.path(), &["merge", yaml, "--out", "never"]);

    // Truncated: the last bytes of the data are gone.
    let dir = copy_model(&pool, "b", "truncated");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 6]).unwrap();
    ta_yaml(&pool, "t.yaml", "truncated");
    fails_with(
        &run("t.yaml"),
        &[
            "corrupt safetensors",
            "truncated/model.safetensors",
            "do not cover",
        ],
    );

    // A header length pointing far past the end of the file.
    let dir = copy_model(&pool, "b", "badlen");
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let huge = bytes.len() as u64 * 4;
    bytes[..8].copy_from_slice(&huge.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    ta_yaml(&pool, "l.yaml", "badlen");
    fails_with(
        &run("l.yaml"),
        &[
            "corrupt safetensors",
            "badlen/model.safetensors",
            "header length",
        ],
    );

    // Offsets past the end of the file, with a consistent header length.
    let dir = pool.path().join("offsets");
    std::fs::create_dir_all(&dir).unwrap();
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"model.embed_tokens.weight":{"dtype":"F32","shape":[250],"data_offsets":[8,1008]}}"#;
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.extend_from_slice(&[0u8; 16]);
    std::fs::write(dir.join("model.safetensors"), f).unwrap();
    ta_yaml(&pool, "o.yaml", "offsets");
    fails_with(
        &run("o.yaml"),
        &["corrupt safetensors", "offsets/model.safetensors"],
    );

    // Not a safetensors file at all.
    let dir = pool.path().join("garbage");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"abc").unwrap();
    ta_yaml(&pool, "g.yaml", "garbage");
    fails_with(
        &run("g.yaml"),
        &["corrupt safetensors", "garbage/model.safetensors"],
    );

    // A folder without weights.
    std::fs::create_dir_all(pool.path().join("empty")).unwrap();
    ta_yaml(&pool, "e.yaml", "empty");
    fails_with(&run("e.yaml"), &["empty", "no model.safetensors"]);
}

#[test]
fn synth_pool_merges_with_every_fast_method() {
    let dir = tempfile::tempdir().unwrap();
    ok(&fusion(
        dir.path(),
        &[
            "zoo",
            "synth",
            "--params",
            "300k",
            "--experts",
            "2",
            "--dtype",
            "bf16",
            "--out",
            "pool",
        ],
    ));
    for (i, spec) in [
        "task_arithmetic(pool/expert_1,pool/expert_2;base=pool/base)",
        "ties_merging(pool/expert_1,pool/expert_2;base=pool/base,density=0.2)",
        "dare(pool/expert_1,pool/expert_2;base=pool/base,seed=3)",
    ]
    .iter()
    .enumerate()
    {
        let out = format!("m{i}");
        ok(&fusion(
            dir.path(),
            &["merge", "--spec", spec, "--out", &out],
        ));
        let merged = read_checkpoint(&dir.path().join(&out));
        let base = read_checkpoint(&dir.path().join("pool/base"));
        assert_eq!(
            merged.keys().collect::<Vec<_>>(),
            base.keys().collect::<Vec<_>>()
        );
        assert!(merged.values().all(|(d, _, _)| *d == Dtype::BF16));
    }
}

#[test]
fn check_reports_every_problem_without_merging() {
    let pool = Pool::new(Dtype::F32);
    // A clean pool: a report of the three models, no errors, exit 0, no output folder.
    ta_yaml(&pool, "clean.yaml", "b");
    let out = fusion(pool.path(), &["merge", "clean.yaml", "--check"]);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("no errors"), "{stdout}");
    assert!(
        stdout.contains("base") && stdout.contains(" b "),
        "{stdout}"
    );
    assert!(!pool.path().join("never").exists());

    // One expert lacks a tensor and has one the base lacks, another has a
    // wider matrix: every finding at once, exit 1.
    let v = toy_values("b");
    write_checkpoint(
        &pool.path().join("odd"),
        Dtype::F32,
        &[
            T(NAMES[0], &[2, 2], &v[0]),
            T(NAMES[1], &[2, 3], &v[1]),
            T(NAMES[2], &[3, 2], &v[2]),
            T("model.extra.weight", &[2], &v[3]),
        ],
    );
    ta_yaml(&pool, "odd.yaml", "odd");
    let out = fusion(pool.path(), &["merge", "odd.yaml", "--check"]);
    fails_with(&out, &["error(s)"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for needle in [
        "[missing tensors]",
        "`model.norm.weight`",
        "[dropped tensors]",
        "`model.extra.weight`",
        "[shapes]",
        "[3, 2] against [2, 3]",
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
    // Without --check and --out: a clear usage error.
    let out = fusion(pool.path(), &["merge", "clean.yaml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--out"));
}

/// The toy pool's values of one layer tensor (`layer` 0 or 1) of `model`.
fn layer_of(model: &str, layer: usize) -> Vec<f32> {
    toy_values(model)[1 + layer].clone()
}

fn scaled(v: &[f32], s: f32) -> Vec<f32> {
    v.iter().map(|x| x * s).collect()
}

fn layers_in_config(dir: &std::path::Path) -> u64 {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"].as_u64().unwrap()
}

#[test]
fn passthrough_slices_stack_layers_from_several_models() {
    let pool = Pool::new(Dtype::F32);
    // Four output layers: a's two, then b's second, then the base's first
    // scaled by 0.5. The embeddings come from the first slice's model (a),
    // the final norm from the last slice's (the base, scaled as well).
    pool.write(
        "stack.yaml",
        "slices:
  - sources:
      - model: a
        layer_range: [0, 2]
  - sources:
      - model: b
        layer_range: [1, 2]
  - sources:
      - model: base
        layer_range: [0, 1]
        parameters:
          scale: 0.5
merge_method: passthrough
dtype: float32
",
    );
    let run = fusion(pool.path(), &["merge", "stack.yaml", "--out", "stack"]);
    ok(&run);
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("3 slice(s), 4 output layers"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let out = pool.path().join("stack");
    let ck = read_checkpoint(&out);
    assert_eq!(ck.len(), 6, "{:?}", ck.keys().collect::<Vec<_>>());
    let at = |name: &str| ck[name].2.clone();
    close(&at("model.embed_tokens.weight"), &toy_values("a")[0], 0.0);
    close(
        &at("model.layers.0.mlp.up_proj.weight"),
        &layer_of("a", 0),
        0.0,
    );
    close(
        &at("model.layers.1.mlp.up_proj.weight"),
        &layer_of("a", 1),
        0.0,
    );
    close(
        &at("model.layers.2.mlp.up_proj.weight"),
        &layer_of("b", 1),
        0.0,
    );
    close(
        &at("model.layers.3.mlp.up_proj.weight"),
        &scaled(&layer_of("base", 0), 0.5),
        0.0,
    );
    close(&at("model.norm.weight"), &[15.0, 15.5], 0.0);
    assert_eq!(ck["model.layers.3.mlp.up_proj.weight"].1, vec![2, 3]);
    assert_eq!(layers_in_config(&out), 4);
    let provenance: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("fusion_merge.json")).unwrap())
            .unwrap();
    assert_eq!(provenance["num_layers"], 4);
    assert_eq!(
        provenance["sliced_spec"]["slices"][1]["sources"][0]["layer_range"][0],
        1
    );
}

#[test]
fn sliced_merges_read_gradients_along_each_slice() {
    let pool = Pool::new(Dtype::F32);
    // Slice 1 (a and b, layers 0-1): the weights run along the slice, so its
    // first layer (t = 0) is a's and its last (t = 1) b's. Slice 2 merges
    // a's layer 1 with b's layer 0 (the sources' ranges differ), weights 1
    // and 3: (1·(21 + i) + 3·(8 + i)) / 4 = 11.25 + i. The embeddings are
    // merged from slice 1's sources and the final norm from slice 2's, both
    // at t = 0 as mergekit plans them: a's embeddings; norm
    // ((31, 32) + 3·(28, 29)) / 4 = (28.75, 29.75).
    pool.write(
        "grad.yaml",
        "slices:
  - sources:
      - model: a
        layer_range: [0, 2]
        parameters: {weight: [1, 0]}
      - model: b
        layer_range: [0, 2]
        parameters: {weight: [0, 1]}
  - sources:
      - model: a
        layer_range: [1, 2]
      - model: b
        layer_range: [0, 1]
    parameters:
      weight: 3
merge_method: linear
dtype: float32
",
    );
    // A slice's parameters apply to its sources without their own:
    // a takes 3 as well in slice 2 unless it says otherwise.
    let text = std::fs::read_to_string(pool.path().join("grad.yaml"))
        .unwrap()
        .replace(
            "      - model: a\n        layer_range: [1, 2]\n",
            "      - model: a\n        layer_range: [1, 2]\n        parameters: {weight: 1}\n",
        );
    pool.write("grad.yaml", &text);
    ok(&fusion(
        pool.path(),
        &["merge", "grad.yaml", "--out", "grad"],
    ));
    let out = pool.path().join("grad");
    let ck = read_checkpoint(&out);
    let at = |name: &str| ck[name].2.clone();
    close(&at("model.embed_tokens.weight"), &toy_values("a")[0], 1e-6);
    close(
        &at("model.layers.0.mlp.up_proj.weight"),
        &layer_of("a", 0),
        1e-6,
    );
    close(
        &at("model.layers.1.mlp.up_proj.weight"),
        &layer_of("b", 1),
        1e-6,
    );
    let want: Vec<f32> = (0..6).map(|i| 11.25 + i as f32).collect();
    close(&at("model.layers.2.mlp.up_proj.weight"), &want, 1e-5);
    close(&at("model.norm.weight"), &[28.75, 29.75], 1e-5);
    assert_eq!(layers_in_config(&out), 3);
}

#[test]
fn bad_slices_fail_before_writing_and_check_reports_them() {
    let pool = Pool::new(Dtype::F32);
    let cases = [
        (
            "past.yaml",
            "slices:\n  - sources:\n      - model: a\n        layer_range: [1, 3]\nmerge_method: passthrough\n",
            "layer_range [1, 3] of `a` is past its 2 layers",
        ),
        (
            "lengths.yaml",
            "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 1]\nmerge_method: linear\n",
            "every source of a slice must span the same number of layers",
        ),
        (
            "two.yaml",
            "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 2]\nmerge_method: passthrough\n",
            "passthrough",
        ),
        (
            "nobase.yaml",
            "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\nmerge_method: ties\nbase_model: base\n",
            "the base model `base` is not one of this slice's sources",
        ),
        (
            "missing.yaml",
            "slices:\n  - sources:\n      - model: nowhere\n        layer_range: [0, 2]\nmerge_method: passthrough\n",
            "nowhere",
        ),
    ];
    for (file, yaml, want) in cases {
        pool.write(file, yaml);
        for args in [
            &["merge", file, "--out", "out"][..],
            &["merge", file, "--check"][..],
        ] {
            let run = fusion(pool.path(), args);
            fails_with(&run, &[want]);
        }
        assert!(!pool.path().join("out").exists(), "{file} wrote a folder");
    }
    pool.write(
        "fine.yaml",
        "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n  - sources:\n      - model: b\n        layer_range: [0, 1]\nmerge_method: passthrough\n",
    );
    let run = fusion(pool.path(), &["merge", "fine.yaml", "--check"]);
    ok(&run);
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(
        said.contains("no errors: 5 tensors in 2 slice(s), 3 output layers"),
        "{said}"
    );
    assert!(!pool.path().join("out").exists());
}
