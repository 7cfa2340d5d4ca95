//! The checkpoint reader on arbitrary `model.safetensors` bytes: opening
//! the folder gives a checkpoint or an error naming the file (never a panic
//! or an out-of-bounds read); every tensor of an opened checkpoint reads and
//! decodes to as many f32 values as its shape says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::checkpoint::Checkpoint;

fuzz_target!(|data: &[u8]| {
    // A folder in memory-backed storage when there is one.
    let root = std::path::Path::new("/dev/shm");
    let dir = if root.is_dir() {
        tempfile::tempdir_in(root)
    } else {
        tempfile::tempdir()
    }
    .expect("a temporary folder");
    std::fs::write(dir.path().join("model.safetensors"), data).expect("write");
    if let Ok(ckpt) = Checkpoint::open("fuzz", dir.path()) {
        let names: Vec<String> = ckpt.tensors().keys().cloned().collect();
        for name in names {
            if let Ok(t) = ckpt.tensor(&name) {
                let n: usize = t.shape.iter().product();
                assert_eq!(t.to_f32_vec().len(), n, "{name}");
            }
        }
        let _ = ckpt.fingerprint();
    }
});
