//! `fusion merge` against independent numpy re-implementations of
//! FusionBench's ties_merging, mergekit's ties and slerp, FusionBench's
//! iso_c, iso_cts, tsv_m and wudi with and without `exclude_keys`,
//! magnitude pruning in diff mode from a mergekit YAML, and FusionBench's
//! magmax with the experts in two orders
//! (`tests/reference/check_methods.py`), and mergekit's sce, breadcrumbs_ties,
//! della and della_linear (deterministic at density 1, keep rates and L1
//! rescaling checked statistically below it), nuslerp, multislerp,
//! karcher, arcee_fusion and nearswap from mergekit YAML configs
//! (`tests/reference/check_mergekit.py`). Skipped, with the reason printed,
//! where python3 with numpy and safetensors is missing (`make test`
//! installs them).

use std::process::Command;

/// Runs one reference script against the binary; asserts that it passes
/// and that it printed `checks` comparisons.
fn run_reference(test: &str, script: &str, checks: usize) {
    let probe = Command::new("python3")
        .args(["-c", "import numpy, safetensors"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!(
            "SKIPPED {test}: python3 with numpy and safetensors is not installed (run `make test`)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = format!("{}/tests/reference/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_fusion"))
        .current_dir(dir.path())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "reference check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches("max abs diff").count(),
        checks,
        "every reference ran: {stdout}"
    );
}

#[test]
fn merges_match_the_numpy_references() {
    run_reference("merges_match_the_numpy_references", "check_methods.py", 17);
}

#[test]
fn mergekit_methods_match_the_numpy_references() {
    run_reference(
        "mergekit_methods_match_the_numpy_references",
        "check_mergekit.py",
        24,
    );
}
