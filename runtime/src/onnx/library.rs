//! Finding and loading the ONNX Runtime library, once per process.
//!
//! `ort` is built with `load-dynamic`: nothing is downloaded or linked at
//! build time, and the shared library (`libonnxruntime.so`, as the
//! `onnxruntime` wheel on PyPI ships it under `onnxruntime/capi/`) is
//! loaded on first use from `$ORT_DYLIB_PATH` when it is set, else from
//! the first that exists of: the cache folder's
//! `onnxruntime/libonnxruntime.so` (where `scripts/install-tools.sh` puts
//! it); `libonnxruntime.so` next to the `fusion` executable. Without one,
//! every ONNX model is refused with [`RuntimeError::OnnxUnavailable`]
//! naming the places looked at; no `ort` call is made before a library is
//! found (`ort` panics when it cannot load one).

use std::path::PathBuf;
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::error::{Result, RuntimeError};

/// The ONNX Runtime version the build's `api-31` feature needs at least.
pub const MIN_VERSION: &str = "1.31";

/// The library file name on this platform.
fn file_name() -> String {
    format!(
        "{}onnxruntime{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// Where the library is looked for, in order (only `$ORT_DYLIB_PATH` when
/// it is set).
pub fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
        return out;
    }
    out.push(
        crate::cache::cache_dir()
            .join("onnxruntime")
            .join(file_name()),
    );
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_path_buf()))
    {
        out.push(dir.join(file_name()));
    }
    out
}

/// The library file that would be loaded, if any exists.
pub fn find() -> Option<PathBuf> {
    candidates().into_iter().find(|p| p.is_file())
}

static ENVIRONMENT: OnceLock<std::result::Result<(PathBuf, Environment), String>> = OnceLock::new();

/// The process's ONNX Runtime environment, loading the library on the first
/// call; the error (no library, or one `ort` cannot use) is kept and
/// returned again to later callers.
pub fn environment() -> Result<&'static Environment> {
    let loaded = ENVIRONMENT.get_or_init(load);
    match loaded {
        Ok((_, env)) => Ok(env),
        Err(e) => Err(RuntimeError::OnnxUnavailable(e.clone())),
    }
}

/// The library loaded, once [`environment`] succeeded.
pub fn loaded_path() -> Option<&'static PathBuf> {
    match ENVIRONMENT.get() {
        Some(Ok((p, _))) => Some(p),
        _ => None,
    }
}

/// Whether ONNX models can run here (loads the library if needed).
pub fn available() -> bool {
    environment().is_ok()
}

fn load() -> std::result::Result<(PathBuf, Environment), String> {
    let Some(path) = find() else {
        let looked: Vec<String> = candidates()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        return Err(format!(
            "no {} found (looked at {}); set ORT_DYLIB_PATH to the library of the \
             `onnxruntime` wheel (>= {MIN_VERSION}, onnxruntime/capi/), or run \
             scripts/install-tools.sh",
            file_name(),
            looked.join(", ")
        ));
    };
    // `ort` panics when the library lacks the API version it was built
    // for; turn that into an error.
    let built = std::panic::catch_unwind(|| -> std::result::Result<Environment, String> {
        let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
        builder
            .with_name("fusion")
            .build()
            .map_err(|e| e.to_string())
    });
    match built {
        Ok(Ok(env)) => Ok((path, env)),
        Ok(Err(e)) => Err(format!("{}: {e}", path.display())),
        Err(_) => Err(format!(
            "{} could not be loaded (ONNX Runtime >= {MIN_VERSION} is needed)",
            path.display()
        )),
    }
}
