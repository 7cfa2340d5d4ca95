//! Harness of the end-to-end gateway tests: the gateway crate's own harness
//! (`gateway/tests/gateway_util`: a pool of small random Llama checkpoints, a
//! real server on an ephemeral port, a real HTTP client) plus the helpers
//! that run the `fusion` binary, which only the workspace root's tests can
//! name.

#![allow(dead_code)]

#[path = "../../gateway/tests/gateway_util/mod.rs"]
mod server;

use std::path::Path;

pub use server::*;

/// Text of `fusion generate --chat PROMPT --temperature 0` on a checkpoint folder.
pub fn fusion_generate_chat(model: &Path, prompt: &str, max_tokens: usize) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args(["generate", "--model"])
        .arg(model)
        .args(["--chat", prompt, "--temperature", "0", "--max-tokens"])
        .arg(max_tokens.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fusion generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap().to_string()
}

/// Same as [`fusion_generate_chat`] for a raw prompt.
pub fn fusion_generate_prompt(model: &Path, prompt: &str, max_tokens: usize) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args(["generate", "--model"])
        .arg(model)
        .args(["--prompt", prompt, "--temperature", "0", "--max-tokens"])
        .arg(max_tokens.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap().to_string()
}

/// Runs `fusion merge --spec SPEC --out OUT` (checkpoint names are folders).
pub fn fusion_merge(cwd: &Path, spec: &str, out: &Path) {
    let res = std::process::Command::new(env!("CARGO_BIN_EXE_fusion"))
        .current_dir(cwd)
        .args([
            "merge", "--quiet", "--device", "cpu", "--spec", spec, "--out",
        ])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "fusion merge failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
}
