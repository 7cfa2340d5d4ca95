//! Tensor kernels shared by several methods, each with one entry point that
//! runs candle operations on any device and, on the CPU, a fused loop that
//! reads the stored bytes directly (measured faster: one pass over the inputs
//! with the accumulator in L1, instead of one pass per operation with f32
//! copies of whole tensors). The loops are compiled for several instruction
//! sets and dispatched at run time (the `simd` submodule).

mod simd;

pub(crate) use simd::{multiversion, Isa};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use runtime::checkpoint::codec::bf16_bits;
use runtime::checkpoint::codec::decode_chunk;
use runtime::checkpoint::TensorRef;

/// A zeroed vector of `n` elements whose pages are backed by transparent
/// huge pages where the kernel allows it (`madvise` mode): a merged tensor
/// is written once, front to back, and 4 KiB page faults were a measured
/// share of a task-arithmetic merge. The memory comes zeroed from the
/// allocator (fresh pages for large vectors), so that no page is touched
/// before the advice: the merge's first write faults each huge page in.
pub fn output_vec<T: bytemuck::Zeroable + Clone>(n: usize) -> Vec<T> {
    let v = zeroed_vec::<T>(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = n * std::mem::size_of::<T>();
        if bytes >= 2 * HUGE {
            let start = v.as_ptr() as usize;
            let aligned = start.next_multiple_of(HUGE);
            let len = (start + bytes - aligned) / HUGE * HUGE;
            // SAFETY: advice only, on a range inside the allocation.
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
        }
    }
    v
}

/// `n` zeroed elements from `alloc_zeroed` (`vec![T::zeroed(); n]` writes
/// every element for types the standard library does not know to be
/// zero, such as `half::bf16`).
fn zeroed_vec<T: bytemuck::Zeroable>(n: usize) -> Vec<T> {
    let layout = std::alloc::Layout::array::<T>(n).expect("output tensor size");
    if layout.size() == 0 {
        let mut v = Vec::with_capacity(n);
        v.resize_with(n, T::zeroed);
        return v;
    }
    // SAFETY: the layout has a nonzero size; all-zero bytes are a valid `T`
    // (`Zeroable`); the vector owns the allocation with the layout that
    // `Vec` itself uses for `n` elements of `T`.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<T>();
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(ptr, n, n)
    }
}

/// Elements per work item: small enough that the f32 accumulator stays in L1.
const CHUNK: usize = 1 << 12;

/// Σk ck·xk over tensors of one shape, computed in f32, returned as f32.
pub fn linear_combination(
    inputs: &[TensorRef],
    coeffs: &[f32],
    device: &Device,
) -> candle_core::Result<Tensor> {
    linear_combination_as(inputs, coeffs, device, DType::F32)
}

/// Σk ck·xk computed in f32 and returned in `out` (F32, F16 or BF16): the
/// cast to the output dtype is fused into the same pass.
pub fn linear_combination_as(
    inputs: &[TensorRef],
    coeffs: &[f32],
    device: &Device,
    out: DType,
) -> candle_core::Result<Tensor> {
    assert_eq!(inputs.len(), coeffs.len(), "one coefficient per input");
    let shape = inputs[0].shape;
    if !device.is_cpu() {
        let mut acc: Option<Tensor> = None;
        for (x, &w) in inputs.iter().zip(coeffs) {
            let t = (x.to_f32_tensor(device)? * w as f64)?;
            acc = Some(match acc {
                None => t,
                Some(a) => (a + t)?,
            });
        }
        return acc.expect("at least one input").to_dtype(out);
    }
    let n = inputs[0].numel();
    match out {
        DType::BF16 => {
            Tensor::from_vec(combine_cpu::<half::bf16>(inputs, coeffs, n), shape, device)
        }
        DType::F16 => Tensor::from_vec(combine_cpu::<half::f16>(inputs, coeffs, n), shape, device),
        _ => Tensor::from_vec(combine_cpu::<f32>(inputs, coeffs, n), shape, device)?.to_dtype(out),
    }
}

/// An element type a fused kernel can write its f32 results as (bf16 with
/// round-to-nearest-even, f16 through `half`).
pub(crate) trait OutElem: Copy + Send + Sync + bytemuck::Zeroable {
    fn store(acc: &[f32], out: &mut [Self]);
}

impl OutElem for f32 {
    #[inline(always)]
    fn store(acc: &[f32], out: &mut [f32]) {
        out.copy_from_slice(acc);
    }
}

impl OutElem for half::bf16 {
    #[inline(always)]
    fn store(acc: &[f32], out: &mut [half::bf16]) {
        for (o, &v) in out.iter_mut().zip(acc) {
            *o = half::bf16::from_bits(bf16_bits(v));
        }
    }
}

impl OutElem for half::f16 {
    #[inline(always)]
    fn store(acc: &[f32], out: &mut [half::f16]) {
        use half::slice::HalfFloatSliceExt;
        out.convert_from_f32_slice(acc);
    }
}

fn combine_cpu<T: OutElem>(inputs: &[TensorRef], coeffs: &[f32], n: usize) -> Vec<T> {
    let mut data: Vec<T> = output_vec(n);
    #[cfg(target_arch = "x86_64")]
    let wide =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    data.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || (vec![0f32; CHUNK], vec![0f32; CHUNK]),
        |(acc, scratch), (c, out)| {
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: the CPU supports AVX2 and FMA (checked above).
                return unsafe { combine_chunk_avx2(inputs, coeffs, c * CHUNK, out, acc, scratch) };
            }
            combine_chunk(inputs, coeffs, c * CHUNK, out, acc, scratch)
        },
    );
    data
}

/// The same loop compiled for AVX2 and FMA, chosen at run time: the loops
/// are compute-bound at SSE2 width (measured: about 2x slower).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn combine_chunk_avx2<T: OutElem>(
    inputs: &[TensorRef],
    coeffs: &[f32],
    start: usize,
    out: &mut [T],
    acc: &mut [f32],
    scratch: &mut [f32],
) {
    combine_chunk(inputs, coeffs, start, out, acc, scratch)
}

/// out = Σk ck·xk[start..start + out.len()] through the L1-resident `acc`.
#[inline(always)]
fn combine_chunk<T: OutElem>(
    inputs: &[TensorRef],
    coeffs: &[f32],
    start: usize,
    out: &mut [T],
    acc: &mut [f32],
    scratch: &mut [f32],
) {
    let acc = &mut acc[..out.len()];
    for (k, (x, &w)) in inputs.iter().zip(coeffs).enumerate() {
        accumulate(x, start, w, k == 0, acc, scratch);
    }
    T::store(acc, out);
}

/// acc (=|+=) w · x[start..start + acc.len()], decoding x's stored dtype on
/// the fly; bf16 and f32 have direct loops, anything else goes through
/// `scratch`.
#[inline(always)]
fn accumulate(
    x: &TensorRef,
    start: usize,
    w: f32,
    first: bool,
    acc: &mut [f32],
    scratch: &mut [f32],
) {
    let len = acc.len();
    let width = x.dtype.size_in_bytes();
    let bytes = &x.bytes[start * width..(start + len) * width];
    match (x.dtype, first) {
        (DType::BF16, _) if bytemuck::try_cast_slice::<u8, u16>(bytes).is_ok() => {
            let h: &[u16] = bytemuck::cast_slice(bytes);
            if first {
                acc.iter_mut()
                    .zip(h)
                    .for_each(|(a, &h)| *a = w * f32::from_bits((h as u32) << 16));
            } else {
                acc.iter_mut()
                    .zip(h)
                    .for_each(|(a, &h)| *a += w * f32::from_bits((h as u32) << 16));
            }
        }
        (DType::F32, _) if bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok() => {
            let v: &[f32] = bytemuck::cast_slice(bytes);
            if first {
                acc.iter_mut().zip(v).for_each(|(a, &v)| *a = w * v);
            } else {
                acc.iter_mut().zip(v).for_each(|(a, &v)| *a += w * v);
            }
        }
        _ => {
            let s = &mut scratch[..len];
            decode_chunk(x.dtype, bytes, s);
            if first {
                acc.iter_mut().zip(s.iter()).for_each(|(a, &v)| *a = w * v);
            } else {
                acc.iter_mut().zip(s.iter()).for_each(|(a, &v)| *a += w * v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn mixed_dtypes_combine_in_f32() {
        // 0.5·[1, 2, 3] (f32) + 2·[0.5, -1, 4] (bf16) + 1·[1, 1, 1] (f16) = [2.5, 0, 10.5]
        let a = f32_bytes(&[1., 2., 3.]);
        let b: Vec<u8> = [0.5f32, -1., 4.]
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let c: Vec<u8> = [1f32; 3]
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        let shape = [3usize];
        let ra = TensorRef {
            dtype: DType::F32,
            shape: &shape,
            bytes: &a,
        };
        let rb = TensorRef {
            dtype: DType::BF16,
            shape: &shape,
            bytes: &b,
        };
        let rc = TensorRef {
            dtype: DType::F16,
            shape: &shape,
            bytes: &c,
        };
        for out in [DType::F32, DType::BF16, DType::F16] {
            let t =
                linear_combination_as(&[ra, rb, rc], &[0.5, 2.0, 1.0], &Device::Cpu, out).unwrap();
            assert_eq!(t.dtype(), out);
            let got = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got, vec![2.5, 0.0, 10.5], "{out:?}");
        }
    }

    #[test]
    fn unaligned_bytes_and_chunk_boundaries() {
        // 10 000 elements (three chunks) stored one byte off alignment:
        // 2·x − x = x.
        let n = 10_000;
        let v: Vec<f32> = (0..n).map(|i| i as f32 * 0.25).collect();
        let mut buf = vec![0u8];
        buf.extend(f32_bytes(&v));
        let shape = [n];
        let x = TensorRef {
            dtype: DType::F32,
            shape: &shape,
            bytes: &buf[1..],
        };
        let t = linear_combination(&[x, x], &[2.0, -1.0], &Device::Cpu).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), v);
    }
}
