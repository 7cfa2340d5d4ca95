//! The key/value cache of incremental decoding.

use candle_core::{Result, Tensor};

/// Keys and values of past positions, one entry per layer, for one batch of
/// sequences. Its length is the position of the next token.
///
/// Each layer holds contiguous `(batch, kv_heads, len, head_dim)` tensors;
/// a decoding step appends one position to each.
///
/// It also holds one MLP state slot per layer (see
/// [`crate::model::Mlp::forward_cached`]): a routed MLP stores the routing
/// weights it computed on the first forward call through the cache (the
/// prompt) and reuses them for every later call (the generated tokens).
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
    pub(crate) len: usize,
    pub(crate) mlp_state: Vec<Option<Tensor>>,
    /// Positions the MLP states were computed from (0: none computed yet).
    mlp_state_len: usize,
}

impl KvCache {
    /// An empty cache for a model of `layers` blocks.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
            len: 0,
            mlp_state: vec![None; layers],
            mlp_state_len: 0,
        }
    }

    /// An empty cache (no positions) that keeps this cache's MLP states: a
    /// forward pass through it reuses the routing computed on this cache's
    /// prompt instead of computing its own.
    pub fn fork_mlp_state(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
            mlp_state: self.mlp_state.clone(),
            mlp_state_len: 0,
        }
    }

    /// The MLP state of block `layer`, if one was stored.
    pub fn mlp_state(&self, layer: usize) -> Option<&Tensor> {
        self.mlp_state.get(layer).and_then(Option::as_ref)
    }

    /// Records, after a forward pass, how many positions the MLP states
    /// stored so far were computed from.
    pub(crate) fn note_mlp_state(&mut self) {
        if self.mlp_state_len == 0 && self.mlp_state.iter().any(Option::is_some) {
            self.mlp_state_len = self.len;
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
    /// a no-op when `len >= self.len()`. MLP states computed from positions
    /// past `len` are dropped too; the next forward call then computes them
    /// again from the tokens it is given.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        if len < self.mlp_state_len {
            self.clear_mlp_state();
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
        self.clear_mlp_state();
    }

    fn clear_mlp_state(&mut self) {
        self.mlp_state.iter_mut().for_each(|s| *s = None);
        self.mlp_state_len = 0;
    }
}
