//! Training the vision demo pool's tiny CLIP towers on candle: the base
//! pre-trained on plain digits with a trainable cosine head (dropped
//! afterwards), each expert fine-tuned from the base under its task's
//! frozen head, FusionBench's protocol. Both minimise the cross-entropy of
//!
//! ```text
//! logits_c = s · ⟨e/‖e‖, w_c/‖w_c‖⟩,   e = P · LN_post(tower(x)[cls])
//! ```
//!
//! with AdamW over every weight of the tower (and, pre-training, the head).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use evaluator::head::ClassHead;
use indicatif::ProgressBar;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use runtime::model::ModelOptions;
use runtime::vision::preprocess::{CLIP_MEAN, CLIP_STD};
use runtime::vision::{ClipVision, ImageProcessor, VisionActivation, VisionConfig};

use crate::error::{Result, ZooError};
use crate::vision_data::Digit;

/// Side of the towers' input (MNIST's 28 pixels), in 7×7 patches.
pub const IMAGE_SIZE: usize = 28;
/// Patch side.
pub const PATCH_SIZE: usize = 7;
/// The logit scale of every head (pre-training and the tasks').
pub const LOGIT_SCALE: f32 = 20.0;

/// The size of the towers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisionShape {
    /// Hidden width.
    pub hidden: usize,
    /// Encoder blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Width of the projected embedding.
    pub projection: usize,
}

impl VisionShape {
    /// The default pool's towers.
    pub fn full() -> Self {
        VisionShape {
            hidden: 64,
            layers: 4,
            heads: 4,
            intermediate: 128,
            projection: 64,
        }
    }

    /// The `--quick` towers.
    pub fn quick() -> Self {
        VisionShape {
            hidden: 48,
            layers: 2,
            heads: 4,
            intermediate: 96,
            projection: 48,
        }
    }

    /// The tower's config (28×28 RGB in, 7×7 patches, quick_gelu).
    pub fn config(&self) -> VisionConfig {
        VisionConfig {
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_channels: 3,
            image_size: IMAGE_SIZE,
            patch_size: PATCH_SIZE,
            hidden_act: VisionActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: self.projection,
        }
    }
}

/// The pool's image processor: CLIP's steps at 28 pixels (the 8×8 digits
/// are upsampled by its bicubic resize).
pub fn processor() -> ImageProcessor {
    ImageProcessor {
        shortest_edge: Some(IMAGE_SIZE),
        crop: Some((IMAGE_SIZE, IMAGE_SIZE)),
        rescale_factor: Some(1.0 / 255.0),
        normalize: Some((CLIP_MEAN, CLIP_STD)),
    }
}

/// Initial weights: matrices ~ N(0, 0.02²), biases 0, norm scales 1.
pub fn init_weights(config: &VisionConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0f32, 0.02).expect("valid σ");
    let mut out = HashMap::new();
    for (name, shape) in config.tensor_shapes() {
        let n: usize = shape.iter().product();
        let norm = name.contains("norm") || name.contains("layrnorm");
        let data: Vec<f32> = if norm && name.ends_with(".weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        out.insert(
            name,
            Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?,
        );
    }
    Ok(out)
}

/// Images preprocessed once, with their labels.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `n · 3 · 28 · 28` pixel values.
    pub pixels: Vec<f32>,
    /// One label per image.
    pub labels: Vec<usize>,
}

impl Prepared {
    /// Runs the processor over `digits`.
    pub fn new(processor: &ImageProcessor, digits: &[Digit]) -> Self {
        let mut pixels = Vec::with_capacity(digits.len() * 3 * IMAGE_SIZE * IMAGE_SIZE);
        for d in digits {
            pixels.extend(processor.process(&d.to_rgb()));
        }
        Prepared {
            pixels,
            labels: digits.iter().map(|d| d.label).collect(),
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn batch(&self, idx: &[usize]) -> Result<Tensor> {
        let per = 3 * IMAGE_SIZE * IMAGE_SIZE;
        let mut v = Vec::with_capacity(idx.len() * per);
        for &i in idx {
            v.extend_from_slice(&self.pixels[i * per..(i + 1) * per]);
        }
        Ok(Tensor::from_vec(
            v,
            (idx.len(), 3, IMAGE_SIZE, IMAGE_SIZE),
            &Device::Cpu,
        )?)
    }
}

/// The head a training run optimises under.
pub enum TrainHead<'a> {
    /// A cosine head of `classes` rows trained with the tower (pre-training).
    Trainable(usize),
    /// A task's frozen head (fine-tuning an expert).
    Frozen(&'a ClassHead),
}

/// How long and how hard to train.
#[derive(Debug, Clone, Copy)]
pub struct TrainOptions {
    /// AdamW steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Learning rate.
    pub lr: f64,
    /// Seed of the batch order (and a trainable head's initial rows).
    pub seed: u64,
}

fn unit_rows(t: &Tensor) -> candle_core::Result<Tensor> {
    let n = t
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .affine(1.0, 1e-12)?
        .sqrt()?;
    t.broadcast_div(&n)
}

/// Trains every weight of the tower from `weights` on `data`; returns the
/// new weights and each step's loss. `bar` advances one per step.
pub fn train(
    config: &VisionConfig,
    weights: &HashMap<String, Tensor>,
    data: &Prepared,
    head: TrainHead<'_>,
    opts: &TrainOptions,
    bar: &ProgressBar,
) -> Result<(HashMap<String, Tensor>, Vec<f32>)> {
    if data.len() < opts.batch || opts.batch == 0 {
        return Err(ZooError::Training(format!(
            "{} images for batches of {}",
            data.len(),
            opts.batch
        )));
    }
    let device = Device::Cpu;
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut vars = Vec::new();
    let mut tensors = HashMap::new();
    for n in names {
        let v = Var::from_tensor(&weights[n].to_dtype(DType::F32)?.copy()?)?;
        tensors.insert(n.clone(), v.as_tensor().clone());
        vars.push((n.clone(), v));
    }
    let tower = ClipVision::from_tensors(
        config.clone(),
        tensors,
        &ModelOptions {
            differentiable: true,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let (classes, head_var, frozen) = match head {
        TrainHead::Trainable(c) => {
            // Drawn from the seeded generator (candle's randn is not seeded).
            let normal = Normal::new(0f32, 0.1).expect("valid σ");
            let values: Vec<f32> = (0..c * tower.dimension())
                .map(|_| normal.sample(&mut rng))
                .collect();
            let init = Tensor::from_vec(values, (c, tower.dimension()), &device)?;
            (c, Some(Var::from_tensor(&init)?), None)
        }
        TrainHead::Frozen(h) => {
            let flat: Vec<f32> = h.rows().iter().flatten().copied().collect();
            let t = Tensor::from_vec(flat, (h.classes(), h.dim()), &device)?;
            (h.classes(), None, Some(t))
        }
    };
    let mut params: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    params.extend(head_var.clone());
    let mut opt = AdamW::new(
        params,
        ParamsAdamW {
            lr: opts.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut cursor = data.len();
    let mut losses = Vec::with_capacity(opts.steps);
    for _ in 0..opts.steps {
        if cursor + opts.batch > order.len() {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        let idx = &order[cursor..cursor + opts.batch];
        cursor += opts.batch;
        let pixels = data.batch(idx)?;
        let mut onehot = vec![0f32; idx.len() * classes];
        for (r, &i) in idx.iter().enumerate() {
            onehot[r * classes + data.labels[i]] = 1.0;
        }
        let target = Tensor::from_vec(onehot, (idx.len(), classes), &device)?;
        let e = tower.embed(&pixels)?;
        let w = match (&head_var, &frozen) {
            (Some(v), _) => unit_rows(v.as_tensor())?,
            (None, Some(t)) => t.clone(),
            (None, None) => unreachable!("one head"),
        };
        let logits = (unit_rows(&e)?.matmul(&w.t()?)? * LOGIT_SCALE as f64)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let loss = ((logp * target)?.sum_all()?.neg()? / idx.len() as f64)?;
        opt.backward_step(&loss)?;
        let l = loss.to_scalar::<f32>()?;
        if !l.is_finite() {
            return Err(ZooError::Training(format!("the loss diverged ({l})")));
        }
        losses.push(l);
        bar.inc(1);
    }
    let out = vars
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().copy()?.detach())))
        .collect::<Result<_>>()?;
    Ok((out, losses))
}

/// The embeddings of `data` under `weights` (no gradient).
pub fn embed_all(
    config: &VisionConfig,
    weights: &HashMap<String, Tensor>,
    data: &Prepared,
) -> Result<Vec<Vec<f32>>> {
    let tower = ClipVision::from_tensors(config.clone(), weights.clone(), &Default::default())?;
    let idx: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::with_capacity(data.len());
    for chunk in idx.chunks(256) {
        out.extend(tower.embed(&data.batch(chunk)?)?.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// A task's head from the base: the normalised mean of the base's
/// normalised embeddings of each class (a prototype head, the image-side
/// analogue of CLIP's class-name text embeddings).
pub fn prototype_head(
    embeddings: &[Vec<f32>],
    labels: &[usize],
    classes: usize,
) -> Result<ClassHead> {
    let dim = embeddings.first().map_or(0, Vec::len);
    let mut rows = vec![vec![0f32; dim]; classes];
    for (e, &l) in embeddings.iter().zip(labels) {
        let n = e.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        for (r, x) in rows[l].iter_mut().zip(e) {
            *r += x / n;
        }
    }
    Ok(ClassHead::new(rows, LOGIT_SCALE, "a prototype head")?)
}

/// Writes a tower as an HF folder: config.json, model.safetensors,
/// preprocessor_config.json.
pub fn write_tower(
    dir: &Path,
    config: &VisionConfig,
    weights: &HashMap<String, Tensor>,
    processor: &ImageProcessor,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ZooError::io(dir, e))?;
    candle_core::safetensors::save(weights, dir.join("model.safetensors"))?;
    let json = |v: serde_json::Value| serde_json::to_vec_pretty(&v).expect("json");
    for (file, v) in [
        ("config.json", config.to_hf_json()),
        ("preprocessor_config.json", processor.to_json()),
    ] {
        let p = dir.join(file);
        std::fs::write(&p, json(v)).map_err(|e| ZooError::io(&p, e))?;
    }
    Ok(())
}
