//! Helpers for the methods' unit tests: hand-built tensors as inputs.

use std::sync::Mutex;

use candle_core::{DType, Device};

use super::{MergeMethod, ModelScan, TensorInputs};
use crate::error::Result;
use crate::spec::{MergeSpec, TensorCtx};
use runtime::checkpoint::TensorRef;

/// A token never cancelled, for test inputs.
pub static NO_CANCEL: std::sync::LazyLock<crate::bounds::Cancel> =
    std::sync::LazyLock::new(crate::bounds::Cancel::new);

/// One tensor's inputs, owned.
pub struct Fixture {
    pub name: String,
    pub shape: Vec<usize>,
    pub base: Option<Vec<u8>>,
    pub experts: Vec<Vec<u8>>,
    pub num_layers: usize,
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Fixture {
    /// A tensor `name` of `shape` with f32 values for the base and experts.
    pub fn new(name: &str, shape: &[usize], base: Option<&[f32]>, experts: &[&[f32]]) -> Self {
        let n: usize = shape.iter().product();
        for e in experts {
            assert_eq!(e.len(), n, "fixture expert length");
        }
        Fixture {
            name: name.to_string(),
            shape: shape.to_vec(),
            base: base.map(bytes),
            experts: experts.iter().map(|e| bytes(e)).collect(),
            num_layers: 1,
        }
    }

    /// A tensor whose experts are θi = θ0 + τi for a base θ0 and task vectors τi.
    pub fn from_task_vectors(name: &str, shape: &[usize], base: &[f32], taus: &[&[f32]]) -> Self {
        let experts: Vec<Vec<f32>> = taus
            .iter()
            .map(|t| base.iter().zip(t.iter()).map(|(b, x)| b + x).collect())
            .collect();
        let refs: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
        Fixture::new(name, shape, Some(base), &refs)
    }

    /// Borrowed inputs on the CPU.
    pub fn inputs(&self) -> TensorInputs<'_> {
        let r = |b| TensorRef {
            dtype: DType::F32,
            shape: &self.shape,
            bytes: Vec::as_slice(b),
        };
        static CPU: Device = Device::Cpu;
        TensorInputs {
            ctx: TensorCtx::new(&self.name, self.num_layers),
            base: self.base.as_ref().map(r),
            experts: self.experts.iter().map(r).collect(),
            device: &CPU,
            out_dtype: DType::F32,
            cancel: &crate::methods::testutil::NO_CANCEL,
        }
    }
}

/// `model.embed_tokens.weight`, 4×3, a base and two task vectors of no
/// special structure: the inputs on which the matrix methods' tests compare
/// with `tests/reference/matrix_methods_4x3.py`, numpy transcriptions of
/// FusionBench's code.
pub fn generic_embedding() -> Fixture {
    let base = [
        0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 1.0, 1.0, -2.0, 0.25, 0.75, 3.0,
    ];
    let t1 = [
        0.3, -1.2, 0.5, 2.0, 1.1, 0.4, -0.7, 0.2, -0.6, 0.9, 1.5, -0.1,
    ];
    let t2 = [
        1.0, 0.2, -0.4, 0.3, -0.8, 1.6, 0.1, 0.5, 0.7, -0.3, 0.2, 1.2,
    ];
    Fixture::from_task_vectors("model.embed_tokens.weight", &[4, 3], &base, &[&t1, &t2])
}

/// θ0 + (τ1 + τ2)/2 of [`generic_embedding`]: what it merges to when excluded.
pub const GENERIC_EMBEDDING_MEAN: [f32; 12] = [
    1.15, -1.5, 2.05, 1.15, 1.65, 0.5, 0.7, 1.35, -1.95, 0.55, 1.6, 3.55,
];

/// One linear weight (`model.layers.0.mlp.up_proj.weight`, n/100 × 100)
/// with θ0 = 0 and one expert θ1 = 1: τ = 1 everywhere, so a merged entry
/// shows what dropout or trimming did to it.
pub fn ones(n: usize) -> Fixture {
    Fixture::new(
        "model.layers.0.mlp.up_proj.weight",
        &[n / 100, 100],
        Some(&vec![0.0; n]),
        &[&vec![1.0; n]],
    )
}

/// τ = ±1..±10 in scrambled order, so ranks by |τ| are easy to read.
pub const TAU: [f32; 10] = [3., -9., 1., 10., -5., 2., -7., 4., 8., -6.];

/// A spec for `method` with base `base` and `n` experts `m0..m{n-1}`.
pub fn spec_n(method: &str, n: usize) -> MergeSpec {
    let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    MergeSpec::new(method, Some("base"), &refs)
}

/// A model made of several fixtures, for methods with a model-wide pass.
pub struct FixtureScan<'a>(pub &'a [Fixture]);

impl ModelScan for FixtureScan<'_> {
    fn for_each(&self, f: &(dyn Fn(&TensorInputs) -> Result<()> + Sync)) -> Result<()> {
        let errors = Mutex::new(Vec::new());
        for fx in self.0 {
            if let Err(e) = f(&fx.inputs()) {
                errors.lock().unwrap().push(e);
            }
        }
        match errors.into_inner().unwrap().pop() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Builds a method from a spec, panicking on validation errors.
pub fn build(spec: &MergeSpec) -> Box<dyn MergeMethod> {
    super::build(spec).expect("spec should validate").1
}

/// Builds, prepares over `model` and merges every fixture.
pub fn merge_all(spec: &MergeSpec, model: &[Fixture]) -> Vec<Vec<f32>> {
    let mut m = build(spec);
    m.prepare(&FixtureScan(model)).expect("prepare");
    model.iter().map(|fx| merge_one(m.as_ref(), fx)).collect()
}

/// Merges one fixture with a built method.
pub fn merge_one(m: &dyn MergeMethod, fx: &Fixture) -> Vec<f32> {
    let t = m.merge(&fx.inputs()).expect("merge");
    assert_eq!(t.dims(), fx.shape.as_slice(), "merged shape");
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Merges a single tensor with a spec (no model-wide pass beyond it).
pub fn merge1(spec: &MergeSpec, fx: &Fixture) -> Vec<f32> {
    merge_all(spec, std::slice::from_ref(fx)).pop().unwrap()
}

/// Asserts elementwise closeness.
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "index {i}: got {g}, want {w} (got {got:?}, want {want:?})"
        );
    }
}

/// `values` stored as little-endian `dtype` bytes (F32, F16 or BF16), for
/// inputs whose stored dtype is not f32.
pub fn typed_bytes(dtype: DType, values: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => bytes(values),
        DType::F16 => values
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        other => panic!("typed_bytes: unsupported dtype {other:?}"),
    }
}

/// Builds, prepares and merges one tensor `name` of `shape` whose base and
/// experts are stored in the given dtypes (mixed-precision checkpoints).
pub fn merge_typed(
    spec: &MergeSpec,
    name: &str,
    shape: &[usize],
    base: Option<(DType, &[f32])>,
    experts: &[(DType, &[f32])],
) -> Vec<f32> {
    struct One<'a>(&'a TensorInputs<'a>);
    impl ModelScan for One<'_> {
        fn for_each(&self, f: &(dyn Fn(&TensorInputs) -> Result<()> + Sync)) -> Result<()> {
            f(self.0)
        }
    }
    static CPU: Device = Device::Cpu;
    let base = base.map(|(d, v)| (d, typed_bytes(d, v)));
    let experts: Vec<(DType, Vec<u8>)> = experts
        .iter()
        .map(|(d, v)| (*d, typed_bytes(*d, v)))
        .collect();
    fn r<'a>((dtype, b): &'a (DType, Vec<u8>), shape: &'a [usize]) -> TensorRef<'a> {
        TensorRef {
            dtype: *dtype,
            shape,
            bytes: b.as_slice(),
        }
    }
    let inputs = TensorInputs {
        ctx: TensorCtx::new(name, 1),
        base: base.as_ref().map(|b| r(b, shape)),
        experts: experts.iter().map(|e| r(e, shape)).collect(),
        device: &CPU,
        out_dtype: DType::F32,
        cancel: &crate::methods::testutil::NO_CANCEL,
    };
    let mut m = build(spec);
    m.prepare(&One(&inputs)).expect("prepare");
    let t = m.merge(&inputs).expect("merge");
    assert_eq!(t.dims(), shape, "merged shape");
    assert_eq!(t.dtype(), DType::F32, "merged dtype");
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}
