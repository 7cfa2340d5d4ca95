//! Lines of a tensor along one axis, for the methods that work vector by
//! vector inside a tensor (DELLA ranks each line, NuSLERP interpolates
//! each row or column).
//!
//! A row-major tensor viewed as [outer, len, inner] around `axis`: line
//! l = o·inner + k holds the `len` entries (o·len + r)·inner + k.

use rayon::prelude::*;

/// The lines of a tensor along one axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lines {
    /// Product of the dimensions before the axis.
    pub outer: usize,
    /// The axis' length: entries per line.
    pub len: usize,
    /// Product of the dimensions after the axis (the stride in a line).
    pub inner: usize,
}

impl Lines {
    /// The whole tensor of `n` entries as one line.
    pub(crate) fn whole(n: usize) -> Lines {
        Lines {
            outer: 1,
            len: n,
            inner: 1,
        }
    }

    /// The lines along `axis` of `shape` (`axis < shape.len()`).
    pub(crate) fn along(shape: &[usize], axis: usize) -> Lines {
        Lines {
            outer: shape[..axis].iter().product(),
            len: shape[axis],
            inner: shape[axis + 1..].iter().product(),
        }
    }

    /// The flat index of entry `r` of line `line`.
    #[inline]
    pub(crate) fn index(&self, line: usize, r: usize) -> usize {
        let (o, k) = (line / self.inner, line % self.inner);
        (o * self.len + r) * self.inner + k
    }

    /// The entries of line `line` of `data`.
    pub(crate) fn gather(&self, data: &[f32], line: usize) -> Vec<f32> {
        (0..self.len).map(|r| data[self.index(line, r)]).collect()
    }

    /// Calls `f(line, entries)` on every line of `data` with the line's
    /// entries gathered in order, and writes them back; lines of one outer
    /// block run in order, the blocks in parallel.
    pub(crate) fn for_each_mut(&self, data: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
        let block = self.len * self.inner;
        if block == 0 {
            return;
        }
        data.par_chunks_mut(block)
            .enumerate()
            .for_each(|(o, chunk)| {
                let mut buf = vec![0f32; self.len];
                for k in 0..self.inner {
                    for (r, b) in buf.iter_mut().enumerate() {
                        *b = chunk[r * self.inner + k];
                    }
                    f(o * self.inner + k, &mut buf);
                    for (r, b) in buf.iter().enumerate() {
                        chunk[r * self.inner + k] = *b;
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_along_each_axis() {
        // [2, 3, 2]: along axis 1, line (o=1, k=0) is entries 6, 8, 10.
        let l = Lines::along(&[2, 3, 2], 1);
        assert_eq!((l.outer, l.len, l.inner), (2, 3, 2));
        assert_eq!(
            (0..3).map(|r| l.index(2, r)).collect::<Vec<_>>(),
            [6, 8, 10]
        );
        let data: Vec<f32> = (0..12).map(|x| x as f32).collect();
        assert_eq!(l.gather(&data, 3), [7., 9., 11.]);
        // Reversing every line along axis 0 of a 2×3 matrix swaps its rows.
        let mut m = vec![1., 2., 3., 4., 5., 6.];
        Lines::along(&[2, 3], 0).for_each_mut(&mut m, |_, v| v.reverse());
        assert_eq!(m, [4., 5., 6., 1., 2., 3.]);
        let mut m = vec![1., 2., 3., 4., 5., 6.];
        Lines::along(&[2, 3], 1).for_each_mut(&mut m, |line, v| v[0] = line as f32 * 10.);
        assert_eq!(m, [0., 2., 3., 10., 5., 6.]);
        assert_eq!(Lines::whole(5), Lines::along(&[5], 0));
    }
}
