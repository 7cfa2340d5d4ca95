//! `fusion merge` against independent numpy re-implementations of
//! FusionBench's ties_merging, mergekit's ties and slerp, FusionBench's
//! iso_c, iso_cts, tsv_m and wudi with and without `exclude_keys`,
//! magnitude pruning in diff mode from a mergekit YAML, and FusionBench's
//! magmax with the experts in two orders
//! (`tests/reference/check_methods.py`). Skipped, with the reason printed,
//! where python3 with numpy and safetensors is missing (`make test`
//! installs them).

use std::process::Command;

#[test]
fn merges_match_the_numpy_references() {
    let probe = Command::new("python3")
        .args(["-c", "import numpy, safetensors"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("SKIPPED merges_match_the_numpy_references: python3 with numpy and safetensors is not installed (run `make test`)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/check_methods.py"
    );
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
        17,
        "every reference ran: {stdout}"
    );
}
