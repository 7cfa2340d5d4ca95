//! The cache folder shared by everything the project downloads once and
//! reuses (the real pool's wheels, the ONNX Runtime library).

use std::path::PathBuf;

/// The cache folder: `$FUSION_CACHE_DIR`, else `$XDG_CACHE_HOME/fusion`, else
/// `$HOME/.cache/fusion`.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("FUSION_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("fusion");
    }
    var("HOME")
        .map(|h| PathBuf::from(h).join(".cache").join("fusion"))
        .unwrap_or_else(|| std::env::temp_dir().join("fusion-cache"))
}
