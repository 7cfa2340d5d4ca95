//! A binary mask over a tensor's entries, packed 64 entries per word: what
//! a task's view of a per-task retrieval merge holds of its own (one bit
//! per parameter, [`super::TensorDelta::Masked`]).
//!
//! Entry `i` (in the tensor's storage order) is bit `i % 64` of word
//! `i / 64`; the bits past `len` in the last word are zero.

use std::sync::Arc;

/// A packed binary mask of `len` entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitMask {
    words: Arc<[u64]>,
    len: usize,
}

impl BitMask {
    /// The mask whose entry `i` is `f(i)`.
    pub fn from_fn(len: usize, f: impl Fn(usize) -> bool) -> Self {
        let words: Vec<u64> = (0..len.div_ceil(64))
            .map(|w| {
                let start = w * 64;
                (start..(start + 64).min(len))
                    .filter(|&i| f(i))
                    .fold(0u64, |word, i| word | 1 << (i - start))
            })
            .collect();
        BitMask {
            words: words.into(),
            len,
        }
    }

    /// The mask of `bits`, entry by entry.
    pub fn from_bools(bits: &[bool]) -> Self {
        Self::from_fn(bits.len(), |i| bits[i])
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entry `i`.
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] >> (i % 64) & 1 == 1
    }

    /// The packed words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of set entries.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Bytes held: one bit per entry, in whole words.
    pub fn bytes(&self) -> u64 {
        8 * self.words.len() as u64
    }

    /// Entries `start..start + n` as 0.0 and 1.0.
    pub fn to_f32(&self, start: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        let mut i = 0;
        while i < n {
            let at = start + i;
            if at >= self.len {
                break;
            }
            let (w, b) = (at / 64, at % 64);
            let span = (64 - b).min(n - i).min(self.len - at);
            let word = self.words[w] >> b;
            for (k, o) in out[i..i + span].iter_mut().enumerate() {
                *o = ((word >> k) & 1) as f32;
            }
            i += span;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_bits_in_storage_order() {
        // 70 entries: set 0, 3, 63, 64 and 69 → word 0 = 1 + 8 + 2⁶³, word 1 = 1 + 2⁵.
        let set = [0, 3, 63, 64, 69];
        let m = BitMask::from_fn(70, |i| set.contains(&i));
        assert_eq!(m.words(), &[1 | 8 | 1 << 63, 1 | 1 << 5]);
        assert_eq!(m.count_ones(), 5);
        assert_eq!(m.bytes(), 16);
        assert!(m.get(69) && !m.get(68) && !m.get(70));
        assert_eq!(m.to_f32(62, 4), vec![0.0, 1.0, 1.0, 0.0]);
        let b: Vec<bool> = (0..70).map(|i| set.contains(&i)).collect();
        assert_eq!(BitMask::from_bools(&b), m);
    }
}
