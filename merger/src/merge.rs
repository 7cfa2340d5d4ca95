//! Executing a merge: validate the spec against the checkpoints, then merge
//! tensor by tensor, in parallel across tensors, streaming each result into a
//! [`Sink`] (a checkpoint folder being written, or memory).
//!
//! Validation is apart from execution: [`MergePlan::new`] checks the method,
//! its parameters, the model count, and that every input holds every tensor
//! with the same shape, before a single tensor is merged.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::bounds::{Bounds, Cancel};
use crate::error::{MergeError, Result};
use crate::inputs::TensorInputs;
use crate::methods::{self, MergeMethod, MethodInfo, ModelScan};
use crate::spec::{MergeSpec, TensorCtx};
use crate::tokenizer::{TokenizerPlan, TokenizerSpec};
use runtime::checkpoint::{parse_dtype, Checkpoint, CheckpointWriter, TensorBuf, WriteOptions};

/// One output tensor of a plan.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// Tensor name in the output.
    pub name: String,
    /// The tensor's name in each input, the base's first: `name`, except
    /// in a layer slice ([`crate::slices`]), whose output layers come from
    /// each source's own layer range.
    pub sources: Vec<String>,
    /// Shape shared by every input.
    pub shape: Vec<usize>,
    /// Output dtype.
    pub dtype: DType,
    /// Position along the depth for gradients when it is not the layer's
    /// place in the model (a slice's layers: their place in the slice).
    pub depth: Option<f64>,
    /// The rows are the vocabulary: each input's are rebuilt over the
    /// output tokenizer's before the merge ([`crate::tokenizer`]).
    pub vocabulary: bool,
}

/// One output tensor of a partial plan: its name, its name in each input
/// (the base's first), and the depth its gradients are read at.
#[derive(Debug, Clone)]
pub(crate) struct Selected {
    pub name: String,
    pub sources: Vec<String>,
    pub depth: Option<f64>,
}

impl PlannedTensor {
    /// Bytes of the output tensor.
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }
}

/// A validated merge, ready to run.
pub struct MergePlan {
    spec: MergeSpec,
    info: &'static MethodInfo,
    method: Box<dyn MergeMethod>,
    base: Option<Arc<Checkpoint>>,
    experts: Vec<Arc<Checkpoint>>,
    tensors: Vec<PlannedTensor>,
    num_layers: usize,
    id: String,
    cancel: Cancel,
    tokenizer: Option<Arc<TokenizerPlan>>,
}

/// Figures of a finished merge.
#[derive(Debug, Clone)]
pub struct MergeStats {
    /// Tensors merged.
    pub tensors: usize,
    /// Bytes of every input tensor read (base and experts).
    pub input_bytes: u64,
    /// Bytes of the merged tensors.
    pub output_bytes: u64,
    /// Wall time of the merge, in seconds.
    pub seconds: f64,
}

/// Receives merged tensors, from several threads.
pub trait Sink: Sync {
    /// Stores the f32 result for `tensor`.
    fn put(&self, tensor: &PlannedTensor, value: Tensor) -> Result<()>;

    /// Whether the sink keeps every merged tensor in memory (see
    /// [`ModelScan::keeps_outputs`]); false by default.
    fn keeps_outputs(&self) -> bool {
        false
    }
}

/// Calls `f` with the contiguous f32 data of a tensor (copied to the CPU first
/// when it lives elsewhere).
pub fn with_f32_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = if t.device().is_cpu() {
        t.clone()
    } else {
        t.to_device(&Device::Cpu)?
    };
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        t.to_dtype(DType::F32)?
    };
    let t = if t.is_contiguous() {
        t
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets().expect("contiguous");
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(f(&v[start..end])),
        _ => unreachable!("converted to an f32 CPU tensor above"),
    }
}

impl Sink for CheckpointWriter {
    fn put(&self, tensor: &PlannedTensor, value: Tensor) -> Result<()> {
        let err = |e| MergeError::in_tensor(&tensor.name, e);
        if value.dtype() == tensor.dtype && value.device().is_cpu() && value.is_contiguous() {
            // Already in the stored dtype: write its bytes as they are.
            let (storage, layout) = value.storage_and_layout();
            let (start, end) = layout.contiguous_offsets().expect("contiguous");
            let bytes: &[u8] = match &*storage {
                Storage::Cpu(CpuStorage::BF16(v)) => bytemuck::cast_slice(&v[start..end]),
                Storage::Cpu(CpuStorage::F16(v)) => bytemuck::cast_slice(&v[start..end]),
                Storage::Cpu(CpuStorage::F32(v)) => bytemuck::cast_slice(&v[start..end]),
                _ => unreachable!("output dtypes are F32, F16 or BF16"),
            };
            return Ok(self.write_raw(&tensor.name, bytes)?);
        }
        Ok(with_f32_data(&value, |data| self.write_f32(&tensor.name, data)).map_err(err)??)
    }
}

/// Keeps merged tensors in memory, cast to their output dtype, on the merge
/// device (what the gateway serves from).
#[derive(Default)]
pub struct MemorySink {
    tensors: Mutex<HashMap<String, Tensor>>,
}

impl MemorySink {
    /// The merged tensors by name.
    pub fn into_tensors(self) -> HashMap<String, Tensor> {
        self.tensors.into_inner().expect("poisoned")
    }
}

impl Sink for MemorySink {
    fn keeps_outputs(&self) -> bool {
        true
    }

    fn put(&self, tensor: &PlannedTensor, value: Tensor) -> Result<()> {
        let err = |e| MergeError::in_tensor(&tensor.name, e);
        let value = if value.dtype() == tensor.dtype
            || !value.device().is_cpu()
            || tensor.dtype == DType::F32
        {
            value.to_dtype(tensor.dtype).map_err(err)?
        } else {
            // Parallel f32 → bf16/f16 (candle's CPU cast is one thread).
            with_f32_data(&value, |data| cast_cpu(data, tensor))
                .map_err(err)?
                .map_err(err)?
        };
        self.tensors
            .lock()
            .expect("poisoned")
            .insert(tensor.name.clone(), value);
        Ok(())
    }
}

fn cast_cpu(data: &[f32], tensor: &PlannedTensor) -> candle_core::Result<Tensor> {
    const CHUNK: usize = 1 << 16;
    let mut bytes = vec![0u8; data.len() * tensor.dtype.size_in_bytes()];
    let width = tensor.dtype.size_in_bytes();
    bytes
        .par_chunks_mut(CHUNK * width)
        .zip(data.par_chunks(CHUNK))
        .for_each(|(b, v)| runtime::checkpoint::codec::encode_chunk(tensor.dtype, v, b));
    Tensor::from_raw_buffer(&bytes, tensor.dtype, &tensor.shape, &Device::Cpu)
}

/// Progress reporting on stderr: tensors done and throughput; hidden when
/// stderr is not a terminal or when disabled.
pub struct Progress {
    bar: ProgressBar,
    bytes: AtomicU64,
    start: Instant,
}

impl Progress {
    /// A progress bar over `tensors` tensors, visible only when `show` and
    /// stderr is a terminal.
    pub fn new(tensors: usize, label: &str, show: bool) -> Self {
        let target = if show && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(tensors as u64), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} tensors {msg} ({elapsed}, eta {eta})",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        Progress {
            bar,
            bytes: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    fn tick(&self, bytes: u64) {
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        self.bar
            .set_message(format!("{:.2} GB/s", total as f64 / secs / 1e9));
        self.bar.inc(1);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Resolves a checkpoint name of the spec to its folder.
pub type Resolver<'a> = &'a dyn Fn(&str) -> Result<PathBuf>;

/// Resolves a checkpoint name of the spec to an opened checkpoint (a
/// registry that keeps its checkpoints open, like the gateway's).
pub type Opener<'a> = &'a dyn Fn(&str) -> Result<Arc<Checkpoint>>;

impl MergePlan {
    /// Validates `spec` and opens its checkpoint folders through `resolve`.
    pub fn new(spec: MergeSpec, resolve: Resolver) -> Result<Self> {
        Self::with_checkpoints(spec, &|name: &str| {
            Ok(Checkpoint::open(name, &resolve(name)?)?)
        })
    }

    /// Validates `spec` against checkpoints obtained from `open`, with the
    /// default [`Bounds`].
    pub fn with_checkpoints(spec: MergeSpec, open: Opener) -> Result<Self> {
        Self::with_bounds(spec, open, &Bounds::default())
    }

    /// Validates `spec` against checkpoints obtained from `open`, its work
    /// parameters and lists against `bounds`.
    pub fn with_bounds(spec: MergeSpec, open: Opener, bounds: &Bounds) -> Result<Self> {
        let (info, method) = methods::build_bounded(&spec, bounds)?;
        Self::from_method(spec, info, method, open)
    }

    /// The plan of `spec`, whose method `info` is already built as
    /// `method`: opens the checkpoints through `open` and checks that every
    /// input holds every tensor with one shape.
    pub(crate) fn from_method(
        spec: MergeSpec,
        info: &'static MethodInfo,
        method: Box<dyn MergeMethod>,
        open: Opener,
    ) -> Result<Self> {
        Self::selected(spec, info, method, open, None, None)
    }

    /// The plan of `spec` over only the output tensors `selection` (every
    /// tensor of the reference, under its own name, when `None`); every
    /// input must hold each selected tensor's source with one shape.
    pub(crate) fn selected(
        spec: MergeSpec,
        info: &'static MethodInfo,
        method: Box<dyn MergeMethod>,
        open: Opener,
        selection: Option<Vec<Selected>>,
        tokenizer: Option<(&TokenizerSpec, Option<&[Arc<Checkpoint>]>)>,
    ) -> Result<Self> {
        let dtype = match &spec.dtype {
            None => None,
            Some(d) => Some(parse_dtype(d).ok_or_else(|| MergeError::BadParameter {
                param: "dtype".into(),
                reason: format!("`{d}` is not one of float32, float16, bfloat16"),
            })?),
        };
        let base = spec.base.as_deref().map(open).transpose()?;
        let experts = spec
            .models
            .iter()
            .map(|m| open(&m.name))
            .collect::<Result<Vec<_>>>()?;
        for ck in base.iter().chain(experts.iter()) {
            ck.check_mergeable()?;
        }
        let reference = base.as_ref().unwrap_or(&experts[0]).clone();
        let all: Vec<Arc<Checkpoint>> = base.iter().chain(experts.iter()).cloned().collect();
        let tokenizer = match tokenizer {
            Some((t, _)) if t.is_plain() => None,
            Some((t, models)) => Some(Arc::new(TokenizerPlan::new(
                t,
                models.unwrap_or(&all),
                &all,
                base.is_some(),
                open,
            )?)),
            None => None,
        };
        let inputs = all.len();
        let selection = selection.unwrap_or_else(|| {
            reference
                .tensors()
                .keys()
                .map(|name| Selected {
                    name: name.clone(),
                    sources: vec![name.clone(); inputs],
                    depth: None,
                })
                .collect()
        });
        let mut tensors = Vec::with_capacity(selection.len());
        let mut num_layers = 0;
        for sel in selection {
            debug_assert_eq!(sel.sources.len(), inputs);
            let first = &sel.sources[0];
            let entry = reference
                .entry(first)
                .ok_or_else(|| MergeError::MissingTensor {
                    tensor: first.clone(),
                    model: reference.name().to_string(),
                    path: reference.dir().to_path_buf(),
                })?;
            let vocabulary = tokenizer
                .as_ref()
                .is_some_and(|t| t.is_embedding(first, &entry.shape));
            for (ck, name) in base.iter().chain(experts.iter()).zip(&sel.sources) {
                let other = ck.entry(name).ok_or_else(|| MergeError::MissingTensor {
                    tensor: name.clone(),
                    model: ck.name().to_string(),
                    path: ck.dir().to_path_buf(),
                })?;
                // Vocabulary rows may differ in number (they are rebuilt
                // over the output vocabulary), not in width.
                let same = if vocabulary {
                    other.shape.len() == 2 && other.shape[1] == entry.shape[1]
                } else {
                    other.shape == entry.shape
                };
                if !same {
                    return Err(MergeError::ShapeMismatch {
                        tensor: name.clone(),
                        model: ck.name().to_string(),
                        found: other.shape.clone().into(),
                        reference: reference.name().to_string(),
                        expected: entry.shape.clone().into(),
                    });
                }
            }
            if let Some(l) = crate::spec::param::layer_index(&sel.name) {
                num_layers = num_layers.max(l + 1);
            }
            let shape = match &tokenizer {
                Some(t) if vocabulary => vec![t.rows(), entry.shape[1]],
                _ => entry.shape.clone(),
            };
            tensors.push(PlannedTensor {
                shape,
                dtype: dtype.unwrap_or(entry.dtype),
                name: sel.name,
                sources: sel.sources,
                depth: sel.depth,
                vocabulary,
            });
        }
        let fingerprints: Vec<(String, String)> = base
            .iter()
            .chain(experts.iter())
            .map(|c| Ok((c.name().to_string(), c.fingerprint()?.to_string())))
            .collect::<Result<_>>()?;
        let mut id = info.merge_id(&spec, &fingerprints);
        if let Some(t) = &tokenizer {
            // Another vocabulary is another merge.
            id = crate::spec::canonical::digest(&format!("{id}{}", t.describe()));
        }
        Ok(MergePlan {
            spec,
            info,
            method,
            base,
            experts,
            tensors,
            num_layers,
            id,
            cancel: Cancel::new(),
            tokenizer,
        })
    }

    /// The id every task view of a per-task retrieval merge shares (its
    /// unified vector's): the merge's id with `task` and the residency
    /// left out.
    pub fn unified_id(&self) -> Result<String> {
        let mut spec = self.spec.clone();
        spec.parameters.remove("task");
        spec.task = None;
        spec.residency = None;
        let fingerprints: Vec<(String, String)> = self
            .base
            .iter()
            .chain(self.experts.iter())
            .map(|c| Ok((c.name().to_string(), c.fingerprint()?.to_string())))
            .collect::<Result<_>>()?;
        Ok(self.info.merge_id(&spec, &fingerprints))
    }

    /// Whether the method is a per-task retrieval merge (its views can be
    /// held `masked`).
    pub fn is_retrieval(&self) -> bool {
        self.method.retrieval().is_some()
    }

    /// The token that cancels [`MergePlan::execute`] (checked between
    /// tensors, and by methods that loop long on one tensor); a clone
    /// cancels it from another thread.
    pub fn cancel_token(&self) -> &Cancel {
        &self.cancel
    }

    /// Makes `cancel` the plan's token (shared with whoever may cancel).
    pub fn set_cancel(&mut self, cancel: Cancel) {
        self.cancel = cancel;
    }

    /// The canonical merge id (without the `merge-` prefix).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The validated spec.
    pub fn spec(&self) -> &MergeSpec {
        &self.spec
    }

    /// The method's registry entry.
    pub fn info(&self) -> &'static MethodInfo {
        self.info
    }

    /// The output tensors, sorted by name.
    pub fn tensors(&self) -> &[PlannedTensor] {
        &self.tensors
    }

    /// The base (if any), then the experts in spec order.
    pub fn checkpoints(&self) -> impl Iterator<Item = &Arc<Checkpoint>> {
        self.base.iter().chain(self.experts.iter())
    }

    /// The merge as coefficients over its checkpoints, `Σ_k c_k θ_k` with
    /// `Σ_k c_k = 1` ([`crate::methods::MergeMethod::affine_coefficients`]),
    /// each checkpoint once (a model named twice has its coefficients
    /// summed); `None` when the method is no such combination.
    pub fn combination(&self) -> Option<Vec<(Arc<Checkpoint>, f64)>> {
        let (c0, c) = self.method.affine_coefficients(self.experts.len())?;
        if self.base.is_none() && c0 != 0.0 {
            return None;
        }
        let mut out: Vec<(Arc<Checkpoint>, f64)> = Vec::new();
        let base = self.base.iter().map(|b| (b, c0));
        for (ck, coeff) in base.chain(self.experts.iter().zip(c)) {
            match out.iter_mut().find(|(o, _)| o.dir() == ck.dir()) {
                Some((_, x)) => *x += coeff,
                None => out.push((ck.clone(), coeff)),
            }
        }
        Some(out)
    }

    /// The checkpoint whose config and tokenizer the output carries.
    pub fn reference(&self) -> &Checkpoint {
        self.base.as_ref().unwrap_or(&self.experts[0])
    }

    /// Bytes of every input tensor a merge reads.
    pub fn input_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| self.tensor_input_bytes(t))
            .sum()
    }

    /// Bytes of the inputs of one output tensor.
    fn tensor_input_bytes(&self, t: &PlannedTensor) -> u64 {
        self.checkpoints()
            .zip(&t.sources)
            .filter_map(|(c, name)| c.entry(name))
            .map(|e| (e.numel() * e.dtype.size_in_bytes()) as u64)
            .sum()
    }

    /// Bytes of the merged output.
    pub fn output_bytes(&self) -> u64 {
        self.tensors.iter().map(PlannedTensor::bytes).sum()
    }

    /// Reads one tensor of the base and of every expert into owned
    /// buffers (a file changed since it was opened fails the read).
    fn read(&self, t: &PlannedTensor) -> Result<ReadTensors> {
        let skip = self.base.iter().count();
        let mut read = ReadTensors {
            base: self
                .base
                .as_ref()
                .map(|b| b.tensor(&t.sources[0]))
                .transpose()?,
            experts: self
                .experts
                .iter()
                .zip(&t.sources[skip..])
                .map(|(e, name)| e.tensor(name))
                .collect::<runtime::Result<Vec<TensorBuf>>>()?,
        };
        if let Some(tok) = self.tokenizer.as_ref().filter(|_| t.vocabulary) {
            let all: Vec<TensorBuf> = read.base.take().into_iter().chain(read.experts).collect();
            let mut rows = tok.permute(&t.name, &all)?.into_iter();
            read.base = self.base.as_ref().and_then(|_| rows.next());
            read.experts = rows.collect();
        }
        Ok(read)
    }

    /// The output tokenizer, when the merge changes the reference's
    /// ([`crate::tokenizer`]).
    pub fn tokenizer(&self) -> Option<&TokenizerPlan> {
        self.tokenizer.as_deref()
    }

    /// The inputs of `t` over buffers `read` from the checkpoints.
    fn inputs<'a>(
        &'a self,
        t: &PlannedTensor,
        read: &'a ReadTensors,
        device: &'a Device,
    ) -> TensorInputs<'a> {
        TensorInputs {
            ctx: match t.depth {
                Some(at) => TensorCtx::at_depth(&t.name, self.num_layers, at),
                None => TensorCtx::new(&t.name, self.num_layers),
            },
            base: read.base.as_ref().map(TensorBuf::view),
            experts: read.experts.iter().map(TensorBuf::view).collect(),
            device,
            out_dtype: t.dtype,
            cancel: &self.cancel,
        }
    }

    /// Tensor indices, largest first, so the big ones do not end up last.
    fn schedule(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.tensors.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.tensors[i].bytes()));
        order
    }

    /// Runs the merge on `device`, handing each merged tensor to `sink`;
    /// [`MergeError::Cancelled`] once the plan's token is cancelled.
    pub fn execute(
        &mut self,
        device: &Device,
        sink: &dyn Sink,
        progress: &Progress,
    ) -> Result<MergeStats> {
        let start = Instant::now();
        self.cancel.check()?;
        // The method is taken out while it scans the plan it belongs to.
        progress.bar.set_message("model-wide statistics");
        let mut method = std::mem::replace(&mut self.method, Box::new(Unprepared));
        let prepared = method.prepare(&PlanScan {
            plan: self,
            device,
            keeps_outputs: sink.keeps_outputs(),
        });
        self.method = method;
        prepared?;
        let done = AtomicUsize::new(0);
        self.schedule()
            .into_par_iter()
            .try_for_each(|i| -> Result<()> {
                self.cancel.check()?;
                let t = &self.tensors[i];
                let read = self.read(t)?;
                let inputs = self.inputs(t, &read, device);
                let merged = self.method.merge(&inputs)?;
                if merged.dims() != t.shape.as_slice() {
                    return Err(MergeError::ShapeMismatch {
                        tensor: t.name.clone(),
                        model: format!("merged output of {}", self.info.name),
                        found: merged.dims().into(),
                        reference: self.reference().name().to_string(),
                        expected: t.shape.clone().into(),
                    });
                }
                check_finite(&t.name, &merged)?;
                sink.put(t, merged)?;
                done.fetch_add(1, Ordering::Relaxed);
                progress.tick(self.tensor_input_bytes(t));
                Ok(())
            })?;
        progress.finish();
        Ok(MergeStats {
            tensors: done.into_inner(),
            input_bytes: self.input_bytes(),
            output_bytes: self.output_bytes(),
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

impl MergePlan {
    /// Prepares the method (its model-wide pass), then calls `f` on every
    /// tensor's inputs with the prepared method (in parallel, largest
    /// first); what `f` returns, by tensor name. What a per-task retrieval
    /// merge is split into its unified vector and masks with
    /// ([`crate::retrieval`]).
    pub fn scan_prepared<R: Send>(
        &mut self,
        device: &Device,
        f: &(dyn Fn(&TensorInputs, &dyn MergeMethod) -> Result<R> + Sync),
    ) -> Result<Vec<(String, R)>> {
        self.cancel.check()?;
        let mut method = std::mem::replace(&mut self.method, Box::new(Unprepared));
        let prepared = method.prepare(&PlanScan {
            plan: self,
            device,
            keeps_outputs: false,
        });
        self.method = method;
        prepared?;
        self.schedule()
            .into_par_iter()
            .map(|i| -> Result<(String, R)> {
                self.cancel.check()?;
                let t = &self.tensors[i];
                let read = self.read(t)?;
                let inputs = self.inputs(t, &read, device);
                Ok((t.name.clone(), f(&inputs, self.method.as_ref())?))
            })
            .collect()
    }
}

/// Refuses a merged tensor with an infinite or NaN value (parameters that
/// overflow f32, such as `scaling_coefficient=1e308`): such a model would
/// only ever produce NaN, so the merge fails, naming the tensor, and nothing
/// is written or cached.
pub fn check_finite(name: &str, merged: &Tensor) -> Result<()> {
    let (bad, total) = with_f32_data(merged, |d| {
        (d.iter().filter(|x| !x.is_finite()).count(), d.len())
    })
    .map_err(|e| MergeError::in_tensor(name, e))?;
    if bad > 0 {
        return Err(MergeError::NonFinite {
            what: format!("merged tensor `{name}`"),
            reason: format!(
                "{bad} of {total} values are infinite or NaN (the merge's parameters overflow f32)"
            ),
        });
    }
    Ok(())
}

/// One tensor of the base and of every expert, read from their files.
struct ReadTensors {
    base: Option<TensorBuf>,
    experts: Vec<TensorBuf>,
}

/// Placeholder swapped in while the real method is borrowed mutably by
/// `prepare`; never merges.
struct Unprepared;

impl MergeMethod for Unprepared {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        Err(MergeError::Spec(format!(
            "tensor `{}` merged before the method was prepared",
            inputs.ctx.name
        )))
    }
}

struct PlanScan<'a> {
    plan: &'a MergePlan,
    device: &'a Device,
    keeps_outputs: bool,
}

impl ModelScan for PlanScan<'_> {
    fn for_each(&self, f: &(dyn Fn(&TensorInputs) -> Result<()> + Sync)) -> Result<()> {
        self.plan.schedule().into_par_iter().try_for_each(|i| {
            self.plan.cancel.check()?;
            let t = &self.plan.tensors[i];
            let read = self.plan.read(t)?;
            f(&self.plan.inputs(t, &read, self.device))
        })
    }

    fn keeps_outputs(&self) -> bool {
        self.keeps_outputs
    }
}

/// Merges into memory (what the gateway serves from): the merged tensors by
/// name, in their output dtypes, on `device`.
pub fn merge_in_memory(
    plan: &mut MergePlan,
    device: &Device,
    progress: &Progress,
) -> Result<(HashMap<String, Tensor>, MergeStats)> {
    let sink = MemorySink::default();
    let stats = plan.execute(device, &sink, progress)?;
    Ok((sink.into_tensors(), stats))
}

/// Options of [`merge_to_dir`].
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Output layout and overwrite policy.
    pub write: WriteOptions,
    /// Show a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

/// What [`merge_to_dir`] produced.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// The canonical merge id.
    pub id: String,
    /// The output folder.
    pub out: PathBuf,
    /// Throughput figures.
    pub stats: MergeStats,
}

/// Validates `spec`, merges it on `device` and writes a checkpoint folder at
/// `out` (config and tokenizer files copied from the base, or from the first
/// model when there is no base).
pub fn merge_to_dir(
    spec: MergeSpec,
    resolve: Resolver,
    out: &Path,
    device: &Device,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let mut plan = MergePlan::new(spec, resolve)?;
    write_to_dir(&mut plan, out, device, opts)
}

/// Runs the validated `plan` on `device` and writes a checkpoint folder at
/// `out`, as [`merge_to_dir`] does.
pub fn write_to_dir(
    plan: &mut MergePlan,
    out: &Path,
    device: &Device,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let layout: Vec<_> = plan
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let writer = CheckpointWriter::create(out, &layout, &opts.write)?;
    let progress = Progress::new(plan.tensors().len(), plan.info().name, opts.progress);
    let stats = plan.execute(device, &writer, &progress)?;
    writer.copy_side_files(plan.reference().dir())?;
    let mut provenance = serde_json::json!({
        "merge_id": format!("merge-{}", plan.id()),
        "spec": plan.spec(),
        "method_convention": plan.info().convention,
    });
    if let Some(tok) = plan.tokenizer() {
        tok.write_files(&writer, plan.reference())?;
        if let Some(mut config) = plan.reference().config()? {
            tok.apply_config(&mut config);
            writer.write_file(
                "config.json",
                &serde_json::to_vec_pretty(&config).expect("json"),
            )?;
        }
        provenance["tokenizer"] = tok.describe();
    }
    writer.write_file(
        "fusion_merge.json",
        &serde_json::to_vec_pretty(&provenance).expect("json"),
    )?;
    let out = writer.finish()?;
    Ok(MergeReport {
        id: plan.id().to_string(),
        out,
        stats,
    })
}
