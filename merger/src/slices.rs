//! Layer slices (mergekit's `slices`): an output model assembled from layer
//! ranges of the inputs, each output slice merged from its sources' ranges
//! with the config's method.
//!
//! A slice lists sources, each a model and a half-open `layer_range`
//! `[start, end)`; every source of a slice spans the same number of layers
//! n. The slices are laid end to end: output layer g = (layers of the
//! slices before) + i takes, for i in 0..n, layer `start + i` of each of its
//! slice's sources, merged as one tensor-wise merge of those sources, and is
//! renamed to layer g (`model.layers.{start+i}.` → `model.layers.{g}.`).
//! Gradients run along the slice: layer i of n is read at t = i/(n−1) (the
//! only layer of a one-layer slice at t = 1), as mergekit's planner does.
//!
//! The tensors outside the layers are merged as mergekit plans them, at
//! t = 0: those before the layers (embeddings) from the first slice's
//! sources, those after (final norm, lm_head, pooler) from the last slice's.
//!
//! With `merge_method: passthrough` each slice has one source and every
//! tensor is copied (times its `scale`): a deeper or shallower model built
//! from layers of its inputs (a "frankenmerge"). Any other method merges the
//! sources of each slice; the base model (the slice's `base_model`, else the
//! config's) must then be one of a slice's sources when the method uses a
//! base, and its range gives the base's layers.
//!
//! Parameters are looked up as mergekit does: a source's own `parameters`,
//! then its slice's, then the config's.
//!
//! The output's `config.json` is the base's (else the first source's) with
//! its layer count (`num_hidden_layers`, `n_layer` or `num_layers`, those
//! present, also inside `text_config` / `vision_config`; else a new
//! `num_hidden_layers`) set to the sum of the slices' lengths.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::Device;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::bounds::Bounds;
use crate::error::{MergeError, Result};
use crate::merge::{MergePlan, MergeReport, MergeStats, Opener, Progress, Selected};
use crate::methods::{self, BaseUse};
use crate::spec::param::{is_input_side, layer_index, with_layer_index};
use crate::spec::{Dialect, MergeSpec, ModelSpec, ParamValue};
use crate::tokenizer::TokenizerSpec;
use runtime::checkpoint::{Checkpoint, CheckpointWriter, WriteOptions};

/// The config keys that hold a model's layer count.
const LAYER_KEYS: &[&str] = &["num_hidden_layers", "n_layer", "num_layers"];

/// One source of a slice: a model and the layers it contributes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SliceSource {
    /// The model, with its own parameters (`weight`, `scale`, ...).
    pub model: ModelSpec,
    /// Half-open layer range `[start, end)` of the model.
    pub layer_range: [usize; 2],
}

impl SliceSource {
    fn len(&self) -> usize {
        self.layer_range[1].saturating_sub(self.layer_range[0])
    }
}

/// One output slice: its sources and the parameters that apply to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Slice {
    /// The sources merged into this slice.
    pub sources: Vec<SliceSource>,
    /// This slice's base model, instead of the config's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// Parameters of this slice, over the config's.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, ParamValue>,
}

/// A merge laid out in layer slices (a mergekit config with `slices`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlicedSpec {
    /// The method, merging each slice's sources.
    pub method: String,
    /// The config's base model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// The output slices, in order.
    pub slices: Vec<Slice>,
    /// The config's parameters.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, ParamValue>,
    /// Seed of random methods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Output dtype.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// The output tokenizer's settings.
    #[serde(skip_serializing_if = "TokenizerSpec::is_plain")]
    pub tokenizer: TokenizerSpec,
}

impl SlicedSpec {
    /// Layers of the output model: the sum of the slices' lengths.
    pub fn num_layers(&self) -> usize {
        self.slices
            .iter()
            .map(|s| s.sources.first().map_or(0, SliceSource::len))
            .sum()
    }

    /// Every model the config names, the base first, each once.
    pub fn models(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let names = self
            .base_model
            .iter()
            .map(String::as_str)
            .chain(self.slices.iter().flat_map(|s| {
                s.base_model
                    .iter()
                    .map(String::as_str)
                    .chain(s.sources.iter().map(|src| src.model.name.as_str()))
            }));
        for n in names {
            if !out.iter().any(|o| same_model(o, n)) {
                out.push(n);
            }
        }
        out
    }

    /// Checks what needs no checkpoint: slices present, sources present,
    /// ranges non-empty and of one length within a slice, at most
    /// `bounds.list_len` slices and sources per slice.
    pub fn validate(&self, bounds: &Bounds) -> Result<()> {
        if self.slices.is_empty() {
            return Err(MergeError::Spec("`slices` is empty".into()));
        }
        let max = bounds.list_len as usize;
        if self.slices.len() > max {
            return Err(MergeError::BadParameter {
                param: "slices".into(),
                reason: format!(
                    "{} slices is more than the configured bound of {max} entries per list",
                    self.slices.len()
                ),
            });
        }
        for (i, slice) in self.slices.iter().enumerate() {
            if slice.sources.is_empty() {
                return Err(MergeError::Spec(format!("slices[{i}]: no `sources`")));
            }
            if slice.sources.len() > max {
                return Err(MergeError::BadParameter {
                    param: format!("slices[{i}].sources"),
                    reason: format!("more than the configured bound of {max} entries per list"),
                });
            }
            let n = slice.sources[0].len();
            for (j, s) in slice.sources.iter().enumerate() {
                let [a, b] = s.layer_range;
                if a >= b {
                    return Err(MergeError::Spec(format!(
                        "slices[{i}].sources[{j}]: layer_range [{a}, {b}] is empty \
                         (it is half-open: [start, end) with start < end)"
                    )));
                }
                if s.len() != n {
                    return Err(MergeError::Spec(format!(
                        "slices[{i}]: every source of a slice must span the same number of layers; \
                         sources[0] spans {n}, sources[{j}] ([{a}, {b}]) spans {}",
                        s.len()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The tensor-wise merge of slice `i`'s sources, and each input's
    /// first layer (the base's first).
    fn part(&self, i: usize) -> Result<(MergeSpec, Vec<usize>)> {
        let slice = &self.slices[i];
        let info = methods::lookup(&self.method)?;
        let mut parameters = self.parameters.clone();
        parameters.extend(slice.parameters.clone());
        let base_name = slice.base_model.as_ref().or(self.base_model.as_ref());
        let (bases, others): (Vec<&SliceSource>, Vec<&SliceSource>) =
            slice.sources.iter().partition(|s| {
                base_name.is_some_and(|b| same_model(&s.model.name, b))
                    && (info.base != BaseUse::Unused || info.name == "slerp")
            });
        let model = |s: &SliceSource| s.model.clone();
        let starts = |s: &[&SliceSource]| s.iter().map(|s| s.layer_range[0]).collect::<Vec<_>>();
        let (base, models, starts) = if info.name == "slerp" {
            // mergekit's slerp: t = 0 is the base, t = 1 the other source.
            let (Some(b), [other]) = (bases.first(), others.as_slice()) else {
                return Err(MergeError::Spec(format!(
                    "slices[{i}]: slerp takes the base model and exactly one other source"
                )));
            };
            (None, vec![model(b), model(other)], starts(&[*b, *other]))
        } else if info.base == BaseUse::Unused || base_name.is_none() {
            if info.base == BaseUse::Required {
                return Err(MergeError::Spec(format!(
                    "slices[{i}]: merge_method `{}` needs a base model (`base_model`)",
                    self.method
                )));
            }
            (
                None,
                others.iter().map(|s| model(s)).collect(),
                starts(&others),
            )
        } else {
            let Some(b) = bases.first() else {
                return Err(MergeError::Spec(format!(
                    "slices[{i}]: the base model `{}` is not one of this slice's sources; \
                     list it with the layer_range its layers come from",
                    base_name.expect("checked")
                )));
            };
            let mut starts = vec![b.layer_range[0]];
            starts.extend(others.iter().map(|s| s.layer_range[0]));
            (
                Some(b.model.name.clone()),
                others.iter().map(|s| model(s)).collect(),
                starts,
            )
        };
        let spec = MergeSpec {
            method: self.method.clone(),
            pool: None,
            base,
            models,
            parameters,
            seed: self.seed,
            dtype: self.dtype.clone(),
            dialect: Dialect::Mergekit,
            residency: None,
            task: None,
        };
        Ok((spec, starts))
    }
}

/// A validated sliced merge, ready to write.
pub struct SlicedPlan {
    spec: SlicedSpec,
    parts: Vec<MergePlan>,
    reference: Arc<Checkpoint>,
    num_layers: usize,
    id: String,
}

impl SlicedPlan {
    /// Validates `spec` against the checkpoints from `open`: every slice's
    /// merge (method, parameters, model count), each layer range within its
    /// model's layers, and every input tensor present with one shape.
    pub fn new(spec: SlicedSpec, open: Opener, bounds: &Bounds) -> Result<Self> {
        spec.validate(bounds)?;
        // Each model is opened (its headers read, its files mapped) once,
        // however many slices take layers from it.
        let opened: Mutex<BTreeMap<String, Arc<Checkpoint>>> = Mutex::default();
        let cached = |name: &str| -> Result<Arc<Checkpoint>> {
            if let Some(ck) = opened.lock().expect("poisoned").get(name) {
                return Ok(ck.clone());
            }
            let ck = open(name)?;
            opened
                .lock()
                .expect("poisoned")
                .insert(name.to_string(), ck.clone());
            Ok(ck)
        };
        let open: Opener = &cached;
        let reference = open(spec.models()[0])?;
        let models: Vec<Arc<Checkpoint>> =
            spec.models().into_iter().map(open).collect::<Result<_>>()?;
        let last = spec.slices.len() - 1;
        let mut parts = Vec::with_capacity(spec.slices.len());
        let mut offset = 0;
        for i in 0..spec.slices.len() {
            let (part, starts) = spec.part(i)?;
            let (info, method) = methods::build_bounded(&part, bounds)?;
            if !matches!(info.kind, methods::MethodKind::Tensorwise(_)) {
                return Err(MergeError::Unsupported {
                    feature: format!("`slices` with merge_method `{}`", spec.method),
                    hint: "slices take tensor-wise methods; routed and data-driven merges \
                           work on whole models (list them under `models`)"
                        .into(),
                });
            }
            let inputs: Vec<Arc<Checkpoint>> = part
                .base
                .iter()
                .chain(part.models.iter().map(|m| &m.name))
                .map(|n| open(n))
                .collect::<Result<_>>()?;
            let n = spec.slices[i].sources[0].len();
            for (ck, &start) in inputs.iter().zip(&starts) {
                let layers = layer_count(ck);
                if start + n > layers {
                    return Err(MergeError::Spec(format!(
                        "slices[{i}]: layer_range [{start}, {}] of `{}` is past its {layers} layers",
                        start + n,
                        ck.name()
                    )));
                }
            }
            let mut selection = layer_tensors(&inputs, &starts, n, offset);
            if i == 0 {
                selection.extend(outer_tensors(&inputs, true));
            }
            if i == last {
                selection.extend(outer_tensors(&inputs, false));
            }
            let plan = MergePlan::selected(
                part,
                info,
                method,
                open,
                Some(selection),
                Some((&spec.tokenizer, Some(&models))),
            )?;
            parts.push(plan);
            offset += n;
        }
        let mut seen = BTreeSet::new();
        for t in parts.iter().flat_map(|p| p.tensors()) {
            if !seen.insert(t.name.as_str()) {
                return Err(MergeError::Spec(format!(
                    "output tensor `{}` comes from two slices",
                    t.name
                )));
            }
        }
        let mut hash = Sha256::new();
        hash.update(serde_json::to_string(&spec).expect("json").as_bytes());
        for p in &parts {
            hash.update(p.id().as_bytes());
        }
        let id = hash.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(SlicedPlan {
            num_layers: spec.num_layers(),
            spec,
            parts,
            reference,
            id,
        })
    }

    /// The merge id (a digest of the spec and every slice's merge).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Layers of the output model.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Every output tensor, slice by slice.
    pub fn tensors(&self) -> impl Iterator<Item = &crate::merge::PlannedTensor> {
        self.parts.iter().flat_map(|p| p.tensors())
    }

    /// Merges every slice on `device` into a checkpoint folder at `out`,
    /// with the reference's side files and its config's layer count set to
    /// the output's.
    pub fn write(
        &mut self,
        out: &Path,
        device: &Device,
        write: &WriteOptions,
        progress: bool,
    ) -> Result<MergeReport> {
        let layout: Vec<_> = self
            .tensors()
            .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
            .collect();
        let writer = CheckpointWriter::create(out, &layout, write)?;
        let mut stats = MergeStats {
            tensors: 0,
            input_bytes: 0,
            output_bytes: 0,
            seconds: 0.0,
        };
        let n = self.parts.len();
        for (i, part) in self.parts.iter_mut().enumerate() {
            let label = format!("{} slice {}/{n}", self.spec.method, i + 1);
            let bar = Progress::new(part.tensors().len(), &label, progress);
            let s = part.execute(device, &writer, &bar)?;
            stats.tensors += s.tensors;
            stats.input_bytes += s.input_bytes;
            stats.output_bytes += s.output_bytes;
            stats.seconds += s.seconds;
        }
        writer.copy_side_files(self.reference.dir())?;
        let tokenizer = self.parts[0].tokenizer();
        if let Some(tok) = tokenizer {
            tok.write_files(&writer, &self.reference)?;
        }
        if let Some(mut config) = self.out_config()? {
            if let Some(tok) = tokenizer {
                tok.apply_config(&mut config);
            }
            writer.write_file(
                "config.json",
                &serde_json::to_vec_pretty(&config).expect("json"),
            )?;
        }
        let mut provenance = serde_json::json!({
            "merge_id": format!("merge-{}", self.id),
            "sliced_spec": self.spec,
            "num_layers": self.num_layers,
        });
        if let Some(tok) = tokenizer {
            provenance["tokenizer"] = tok.describe();
        }
        writer.write_file(
            "fusion_merge.json",
            &serde_json::to_vec_pretty(&provenance).expect("json"),
        )?;
        let out = writer.finish()?;
        Ok(MergeReport {
            id: self.id.clone(),
            out,
            stats,
        })
    }

    /// The reference's config with its layer count rewritten (`None` when
    /// it has no config.json); one that names none gets
    /// `num_hidden_layers`.
    fn out_config(&self) -> Result<Option<serde_json::Value>> {
        let Some(mut config) = self.reference.config()? else {
            return Ok(None);
        };
        let layers = serde_json::Value::from(self.num_layers);
        let mut found = set_layers(&mut config, &layers);
        // Multimodal configs keep the layer count in their text config.
        for sub in ["text_config", "vision_config"] {
            if let Some(inner) = config.get_mut(sub) {
                found |= set_layers(inner, &layers);
            }
        }
        if !found {
            // No layer count to rewrite: give it the one transformers reads.
            if let Some(map) = config.as_object_mut() {
                map.insert(LAYER_KEYS[0].into(), layers);
            }
        }
        Ok(Some(config))
    }
}

fn set_layers(config: &mut serde_json::Value, layers: &serde_json::Value) -> bool {
    let Some(map) = config.as_object_mut() else {
        return false;
    };
    let mut found = false;
    for key in LAYER_KEYS {
        if let Some(v) = map.get_mut(*key) {
            *v = layers.clone();
            found = true;
        }
    }
    found
}

/// Layers of a checkpoint: its highest layer index + 1.
fn layer_count(ck: &Checkpoint) -> usize {
    ck.tensors()
        .keys()
        .filter_map(|n| layer_index(n))
        .map(|l| l + 1)
        .max()
        .unwrap_or(0)
}

/// The layer tensors of one slice: output layer `offset + i` from layer
/// `starts[k] + i` of input k, read at t = i/(n−1) (1 when n = 1).
fn layer_tensors(
    inputs: &[Arc<Checkpoint>],
    starts: &[usize],
    n: usize,
    offset: usize,
) -> Vec<Selected> {
    let reference = &inputs[0];
    let mut out = Vec::new();
    for i in 0..n {
        let t = if n > 1 {
            i as f64 / (n - 1) as f64
        } else {
            1.0
        };
        let layer = starts[0] + i;
        for name in reference.tensors().keys() {
            if layer_index(name) != Some(layer) {
                continue;
            }
            let rename = |l: usize| with_layer_index(name, l).expect("a layer tensor");
            out.push(Selected {
                name: rename(offset + i),
                sources: starts.iter().map(|s| rename(s + i)).collect(),
                depth: Some(t),
            });
        }
    }
    out
}

/// The tensors outside the layers: before them (`before`) or after.
fn outer_tensors(inputs: &[Arc<Checkpoint>], before: bool) -> Vec<Selected> {
    inputs[0]
        .tensors()
        .keys()
        .filter(|n| layer_index(n).is_none() && is_input_side(n) == before)
        .map(|name| Selected {
            name: name.clone(),
            sources: vec![name.clone(); inputs.len()],
            depth: Some(0.0),
        })
        .collect()
}

/// Whether two model references name the same model (`./a/` and `a`).
pub(crate) fn same_model(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> &str {
        let s = s.trim().trim_end_matches('/');
        s.strip_prefix("./").unwrap_or(s)
    }
    norm(a) == norm(b)
}
