//! The attention of a batched step over the sequences' paged caches,
//! computed in one pass over host memory (CPU, f32).
//!
//! For row `i` of a sequence whose step starts at position `start`, and
//! query head `h` (key/value head `g = h / (heads / kv_heads)`):
//!
//! ```text
//! s_j = q_h · k_{g,j} / √d        j = 0 ..= start + i   (causal)
//! p   = softmax(s)
//! y_h = Σ_j p_j v_{g,j}
//! ```
//!
//! The keys and values are read in place from the sequence's blocks, and
//! `y` is written straight into the `(rows, heads · d)` layout the output
//! projection takes. The tensor path does the same per sequence with a
//! gather of its blocks, a repeat of the shared heads, two products, a mask
//! and a softmax, each a dispatch and an allocation: for the short rows of
//! decoding that overhead, not the arithmetic, was most of a batched
//! step's attention (38 of 86 ms for 8 sequences on the 92M pool). Each
//! row's result depends on its own sequence only, never on the batch.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::host_terms::Host;
use super::paged::PagedCache;

/// What one layer's host attention reads.
pub(crate) struct Shape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `y` `(1, n, heads · head_dim)` for rotated queries `q`
/// `(1, heads, n, head_dim)` of the batch's rows (sequence `s` owns
/// `spans[s].1` consecutive rows starting at its position `spans[s].0`),
/// whose keys and values `caches[s]` already holds for layer `layer`; or
/// `None` when this path does not take the tensors (another device or
/// dtype).
pub(crate) fn attend(
    q: &Tensor,
    caches: &[&PagedCache],
    spans: &[(usize, usize)],
    layer: usize,
    shape: &Shape,
) -> Option<Result<Tensor>> {
    let &Shape {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    if q.dtype() != DType::F32 || !q.device().is_cpu() || q.track_op() || kv_heads == 0 {
        return None;
    }
    let n: usize = spans.iter().map(|s| s.1).sum();
    if q.dims() != [1, heads, n, d] {
        return None;
    }
    let q = match q.contiguous() {
        Ok(q) => q,
        Err(e) => return Some(Err(e)),
    };
    let qh = Host::of(&q)?;
    let qs = qh.f32()?;
    // Every sequence's blocks of this layer, held while the pass reads them.
    let mut held: Vec<Vec<(Host, Host)>> = Vec::with_capacity(caches.len());
    for (cache, &(start, t)) in caches.iter().zip(spans) {
        let blocks = cache.pool().blocks_for(start + t);
        let mut mine = Vec::with_capacity(blocks);
        for b in 0..blocks {
            let (k, v) = cache.block(layer, b)?;
            if k.dtype() != DType::F32 {
                return None;
            }
            mine.push((Host::of(k)?, Host::of(v)?));
        }
        held.push(mine);
    }
    let mut blocks: Vec<Vec<(&[f32], &[f32])>> = Vec::with_capacity(held.len());
    for mine in &held {
        let mut v = Vec::with_capacity(mine.len());
        for (k, val) in mine {
            v.push((k.f32()?, val.f32()?));
        }
        blocks.push(v);
    }
    let bt = caches.first()?.pool().block_tokens();
    // Row r of the batch: its sequence and its position.
    let rows: Vec<(usize, usize)> = spans
        .iter()
        .enumerate()
        .flat_map(|(s, &(start, t))| (0..t).map(move |i| (s, start + i)))
        .collect();
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut y = vec![0f32; n * heads * d];
    y.par_chunks_mut(d).enumerate().for_each(|(idx, out)| {
        let (row, h) = (idx / heads, idx % heads);
        let (s, pos) = rows[row];
        let g = h / group;
        let qv = &qs[(h * n + row) * d..(h * n + row + 1) * d];
        let at = |j: usize| {
            let (k, v) = blocks[s][j / bt];
            let o = (g * bt + j % bt) * d;
            (&k[o..o + d], &v[o..o + d])
        };
        let mut p: Vec<f32> = (0..=pos).map(|j| dot(qv, at(j).0) * scale).collect();
        let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for e in p.iter_mut() {
            *e = (*e - max).exp();
            sum += *e;
        }
        for (j, &e) in p.iter().enumerate() {
            let w = e / sum;
            for (o, &vv) in out.iter_mut().zip(at(j).1) {
                *o += w * vv;
            }
        }
    });
    Some(Tensor::from_vec(y, (1, n, heads * d), q.device()))
}

/// `a · b`, eight partial sums.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}
