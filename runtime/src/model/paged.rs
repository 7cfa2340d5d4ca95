//! The paged key/value cache of batched decoding.
//!
//! Every sequence's keys and values live in fixed-size blocks of
//! `block_tokens` positions, allocated from a [`KvPool`] as the sequence
//! grows and returned to it when the sequence is dropped, as vLLM's
//! PagedAttention does. The pool is bounded in bytes
//! (`server.limits.kv_cache_bytes`): a block that would pass the bound is
//! refused, so the scheduler waits (or refuses a request that could never
//! fit) instead of running out of memory.
//!
//! A block of one layer holds `(kv_heads, block_tokens, head_dim)` keys and
//! the same values; a step writes its new positions in place
//! (`slice_set`) and attention reads the sequence's blocks concatenated.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use crate::error::{Result, RuntimeError};

/// Positions per block unless configured otherwise.
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// A byte bound shared by the pools of several models (the gateway's
/// `server.limits.kv_cache_bytes`): the blocks every pool holds, and the
/// bytes schedulers have reserved for the sequences they admitted, stay
/// within it.
#[derive(Debug)]
pub struct KvBudget {
    limit: u64,
    used: AtomicU64,
    reserved: AtomicU64,
}

impl KvBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(KvBudget {
            limit,
            used: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
        })
    }

    /// The bound.
    pub fn limit_bytes(&self) -> u64 {
        self.limit
    }

    /// Bytes of blocks held, every pool together.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes reserved by admitted sequences, every scheduler together.
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    /// Reserves `bytes` for a sequence's blocks to come; false (nothing
    /// reserved) when they do not fit beside the reservations made.
    pub fn try_reserve(&self, bytes: u64) -> bool {
        add_within(&self.reserved, bytes, self.limit)
    }

    /// Gives back a reservation.
    pub fn unreserve(&self, bytes: u64) {
        self.reserved.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Adds `bytes` to `counter` unless that passes `limit`.
fn add_within(counter: &AtomicU64, bytes: u64, limit: u64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
            u.checked_add(bytes).filter(|&n| n <= limit)
        })
        .is_ok()
}

/// One model's blocks, drawn from a [`KvBudget`].
#[derive(Debug)]
pub struct KvPool {
    budget: Arc<KvBudget>,
    used: AtomicU64,
    block_tokens: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl KvPool {
    /// A pool of at most `limit` bytes of blocks for `config`'s model in
    /// `dtype` on `device`, with a budget of its own.
    pub fn new(
        config: &ModelConfig,
        dtype: DType,
        device: &Device,
        limit: u64,
        block_tokens: usize,
    ) -> Result<Arc<Self>> {
        Self::with_budget(config, dtype, device, &KvBudget::new(limit), block_tokens)
    }

    /// A pool for `config`'s model in `dtype` on `device` whose blocks
    /// count against `budget`, shared with other pools.
    pub fn with_budget(
        config: &ModelConfig,
        dtype: DType,
        device: &Device,
        budget: &Arc<KvBudget>,
        block_tokens: usize,
    ) -> Result<Arc<Self>> {
        let limit = budget.limit;
        if block_tokens == 0 {
            return Err(RuntimeError::InvalidInput(
                "a KV cache block must hold at least one position".into(),
            ));
        }
        let pool = KvPool {
            budget: budget.clone(),
            used: AtomicU64::new(0),
            block_tokens,
            layers: config.num_hidden_layers,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            dtype,
            device: device.clone(),
        };
        if pool.block_bytes() > limit {
            return Err(RuntimeError::InvalidInput(format!(
                "the KV cache bound of {limit} bytes is smaller than one block of {} positions \
                 ({} bytes)",
                block_tokens,
                pool.block_bytes()
            )));
        }
        Ok(Arc::new(pool))
    }

    /// Bytes of one block across every layer, keys and values.
    pub fn block_bytes(&self) -> u64 {
        (2 * self.layers
            * self.kv_heads
            * self.block_tokens
            * self.head_dim
            * self.dtype.size_in_bytes()) as u64
    }

    /// Bytes of this pool's blocks held now.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The bound (of the budget, shared with other pools).
    pub fn limit_bytes(&self) -> u64 {
        self.budget.limit
    }

    /// The budget the blocks count against.
    pub fn budget(&self) -> &Arc<KvBudget> {
        &self.budget
    }

    /// Positions per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Blocks a sequence of `positions` positions needs.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_tokens)
    }

    /// Whether `blocks` more blocks fit under the bound now.
    pub fn can_take(&self, blocks: usize) -> bool {
        self.budget.used_bytes() + blocks as u64 * self.block_bytes() <= self.budget.limit
    }

    /// Whether a sequence of `positions` positions could ever fit (with
    /// the pool otherwise empty).
    pub fn could_hold(&self, positions: usize) -> bool {
        self.blocks_for(positions) as u64 * self.block_bytes() <= self.budget.limit
    }

    fn reserve(&self) -> bool {
        let bytes = self.block_bytes();
        if !add_within(&self.budget.used, bytes, self.budget.limit) {
            return false;
        }
        self.used.fetch_add(bytes, Ordering::AcqRel);
        true
    }

    fn release(&self, blocks: usize) {
        let bytes = blocks as u64 * self.block_bytes();
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.budget.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One block: every layer's keys and values for `block_tokens` positions.
struct Block {
    /// `layers[l] = (k, v)`, each `(kv_heads, block_tokens, head_dim)`.
    layers: Vec<(Tensor, Tensor)>,
}

/// One sequence's keys and values, in blocks of its pool.
pub struct PagedCache {
    pool: Arc<KvPool>,
    blocks: Vec<Block>,
    len: usize,
}

impl std::fmt::Debug for PagedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedCache")
            .field("len", &self.len)
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl PagedCache {
    /// An empty cache drawing from `pool`.
    pub fn new(pool: &Arc<KvPool>) -> Self {
        PagedCache {
            pool: pool.clone(),
            blocks: Vec::new(),
            len: 0,
        }
    }

    /// The pool the blocks come from.
    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// No position cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks still needed to append `t` positions.
    pub fn blocks_needed(&self, t: usize) -> usize {
        self.pool
            .blocks_for(self.len + t)
            .saturating_sub(self.blocks.len())
    }

    /// Takes the blocks `t` more positions need; false (holding nothing
    /// more) when the pool's bound refuses one.
    pub fn reserve(&mut self, t: usize) -> Result<bool> {
        let need = self.blocks_needed(t);
        for reserved in 0..need {
            if !self.pool.reserve() {
                self.pool.release(reserved);
                return Ok(false);
            }
        }
        for i in 0..need {
            match self.new_block() {
                Ok(block) => self.blocks.push(block),
                Err(e) => {
                    // Pushed blocks are released on drop; these never came.
                    self.pool.release(need - i);
                    return Err(e);
                }
            }
        }
        Ok(true)
    }

    fn new_block(&self) -> Result<Block> {
        let p = &self.pool;
        let shape = (p.kv_heads, p.block_tokens, p.head_dim);
        let layers = (0..p.layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, p.dtype, &p.device)?,
                    Tensor::zeros(shape, p.dtype, &p.device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Block { layers })
    }

    /// Writes `k` and `v` `(kv_heads, t, head_dim)` of layer `layer` at
    /// positions `len..len + t` (blocks already reserved).
    pub(crate) fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.dim(1)?;
        let bt = self.pool.block_tokens;
        let mut done = 0;
        while done < t {
            let pos = self.len + done;
            let (b, off) = (pos / bt, pos % bt);
            let n = (bt - off).min(t - done);
            let block = self.blocks.get(b).ok_or_else(|| {
                RuntimeError::Model(format!(
                    "KV cache position {pos} has no block (reserve before writing)"
                ))
            })?;
            let (bk, bv) = &block.layers[layer];
            bk.slice_set(&k.narrow(1, done, n)?.contiguous()?, 1, off)?;
            bv.slice_set(&v.narrow(1, done, n)?.contiguous()?, 1, off)?;
            done += n;
        }
        Ok(())
    }

    /// Layer `layer`'s keys and values of positions `0..len`, each
    /// `(1, kv_heads, len, head_dim)`.
    pub(crate) fn read(&self, layer: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let n = self.pool.blocks_for(len);
        let gather = |pick: fn(&(Tensor, Tensor)) -> &Tensor| -> Result<Tensor> {
            let parts: Vec<&Tensor> = self.blocks[..n]
                .iter()
                .map(|b| pick(&b.layers[layer]))
                .collect();
            let all = if parts.len() == 1 {
                parts[0].clone()
            } else {
                Tensor::cat(&parts, 1)?
            };
            Ok(all.narrow(1, 0, len)?.unsqueeze(0)?)
        };
        Ok((gather(|kv| &kv.0)?, gather(|kv| &kv.1)?))
    }

    /// Layer `layer`'s keys and values in block `b`, each
    /// `(kv_heads, block_tokens, head_dim)`.
    pub(crate) fn block(&self, layer: usize, b: usize) -> Option<(&Tensor, &Tensor)> {
        let (k, v) = self.blocks.get(b)?.layers.get(layer)?;
        Some((k, v))
    }

    /// Marks `t` positions as written (after every layer wrote them).
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

impl Drop for PagedCache {
    fn drop(&mut self) {
        self.pool.release(self.blocks.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::tiny as tiny_config;

    #[test]
    fn blocks_come_and_go_with_the_sequences_and_the_bound_holds() {
        let config = tiny_config();
        let probe = KvPool::new(&config, DType::F32, &Device::Cpu, u64::MAX, 4).unwrap();
        let block = probe.block_bytes();
        assert_eq!(
            block,
            (2 * config.num_hidden_layers * config.num_key_value_heads * 4 * config.head_dim * 4)
                as u64
        );
        let pool = KvPool::new(&config, DType::F32, &Device::Cpu, 3 * block, 4).unwrap();
        let mut a = PagedCache::new(&pool);
        assert!(a.reserve(5).unwrap()); // 2 blocks
        assert_eq!(pool.used_bytes(), 2 * block);
        let mut b = PagedCache::new(&pool);
        assert!(!b.reserve(5).unwrap(), "a fourth block passes the bound");
        assert_eq!(
            pool.used_bytes(),
            2 * block,
            "a refused reserve holds nothing"
        );
        assert!(b.reserve(4).unwrap());
        drop(a);
        assert_eq!(pool.used_bytes(), block);
        drop(b);
        assert_eq!(pool.used_bytes(), 0);
        assert!(!pool.could_hold(13) && pool.could_hold(12));
        assert!(KvPool::new(&config, DType::F32, &Device::Cpu, block - 1, 4).is_err());
    }

    #[test]
    fn positions_written_across_blocks_read_back_in_order() {
        let config = tiny_config();
        let pool = KvPool::new(&config, DType::F32, &Device::Cpu, u64::MAX, 3).unwrap();
        let (h, d) = (config.num_key_value_heads, config.head_dim);
        let mut c = PagedCache::new(&pool);
        let all = Tensor::arange(0f32, (h * 7 * d) as f32, &Device::Cpu)
            .unwrap()
            .reshape((h, 7, d))
            .unwrap();
        // 2 positions, then 5: the second write starts mid-block and spans two more.
        for (start, t) in [(0, 2), (2, 5)] {
            assert!(c.reserve(t).unwrap());
            let part = all.narrow(1, start, t).unwrap();
            for layer in 0..config.num_hidden_layers {
                c.write(layer, &part, &(&part * 2.0).unwrap()).unwrap();
            }
            c.advance(t);
        }
        assert_eq!((c.len(), c.num_blocks()), (7, 3));
        let (k, v) = c.read(1, 7).unwrap();
        assert_eq!(k.dims(), &[1, h, 7, d]);
        let want = all.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(k.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        let twice: Vec<f32> = want.iter().map(|x| x * 2.0).collect();
        assert_eq!(v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), twice);
    }
}
