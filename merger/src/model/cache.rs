//! The key/value cache of incremental decoding.

use candle_core::{Result, Tensor};

/// Keys and values of past positions, one entry per layer, for one batch of
/// sequences. Its length is the position of the next token.
///
/// Each layer holds contiguous `(batch, kv_heads, len, head_dim)` tensors;
/// a decoding step appends one position to each.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
    pub(crate) len: usize,
}

impl KvCache {
    /// An empty cache for a model of `layers` blocks.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No position cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of layers the cache is for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Drops every position from `len` on (to rewind to a shared prefix);
    /// a no-op when `len >= self.len()`.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        if len == 0 {
            self.layers.iter_mut().for_each(|l| *l = None);
        } else {
            for (k, v) in self.layers.iter_mut().flatten() {
                // Copies, so the next step appends to contiguous tensors.
                *k = k.narrow(2, 0, len)?.contiguous()?;
                *v = v.narrow(2, 0, len)?.contiguous()?;
            }
        }
        self.len = len;
        Ok(())
    }

    /// Empties the cache.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}
