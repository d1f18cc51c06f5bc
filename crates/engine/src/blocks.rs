//! Paged KV-cache bookkeeping: the cache is split into fixed-size blocks of
//! token slots, and each sequence owns a table of blocks that grows on demand.

/// Not enough free blocks to satisfy a request; nothing was allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("out of KV cache blocks: need {needed}, only {free} free")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

/// The blocks owned by one sequence, in token order.
#[derive(Debug, Default, Clone)]
pub struct BlockTable {
    blocks: Vec<u32>,
}

impl BlockTable {
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Flat cache slot holding the token at `position`.
    ///
    /// # Panics
    /// If `position` is beyond the table's capacity.
    pub fn slot(&self, block_size: usize, position: usize) -> u32 {
        let block = self.blocks[position / block_size];
        block * block_size as u32 + (position % block_size) as u32
    }

    /// Number of tokens the table can hold without growing.
    pub fn capacity(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }
}

/// Hands out cache blocks to block tables and takes them back.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    /// Popped from the end; starts in descending order so fresh caches hand
    /// out low ids first, and freed blocks are reused before untouched ones.
    free: Vec<u32>,
    /// Catches a block returned twice (e.g. from a cloned table), which would
    /// otherwise let two sequences share cache slots silently.
    allocated: Vec<bool>,
}

impl BlockManager {
    /// # Panics
    /// If `block_size` is 0, or if the slot count overflows `u32` (slots are
    /// addressed with `u32`).
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        assert!(
            num_blocks
                .checked_mul(block_size)
                .is_some_and(|slots| slots <= u32::MAX as usize + 1),
            "{num_blocks} blocks of {block_size} slots exceed u32 slot ids"
        );
        Self {
            block_size,
            free: (0..num_blocks as u32).rev().collect(),
            allocated: vec![false; num_blocks],
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.allocated.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Fraction of blocks in use, 0 for an empty cache.
    pub fn usage(&self) -> f64 {
        let total = self.num_blocks();
        if total == 0 {
            return 0.0;
        }
        (total - self.free.len()) as f64 / total as f64
    }

    /// Extra blocks `table` needs to hold `total_tokens` tokens.
    pub fn blocks_needed(&self, table: &BlockTable, total_tokens: usize) -> usize {
        total_tokens
            .div_ceil(self.block_size)
            .saturating_sub(table.blocks.len())
    }

    pub fn can_grow(&self, table: &BlockTable, total_tokens: usize) -> bool {
        self.blocks_needed(table, total_tokens) <= self.free.len()
    }

    /// Extends `table` to hold `total_tokens` tokens. All or nothing, so a
    /// scheduler can try a request and back off without cleanup. Never
    /// shrinks a table.
    pub fn grow(&mut self, table: &mut BlockTable, total_tokens: usize) -> Result<(), OutOfBlocks> {
        let needed = self.blocks_needed(table, total_tokens);
        if needed > self.free.len() {
            return Err(OutOfBlocks {
                needed,
                free: self.free.len(),
            });
        }
        let start = self.free.len() - needed;
        for &block in self.free[start..].iter().rev() {
            self.allocated[block as usize] = true;
            table.blocks.push(block);
        }
        self.free.truncate(start);
        Ok(())
    }

    /// Returns every block of `table` to the free list and empties it.
    ///
    /// # Panics
    /// If a block is not currently allocated by this manager (double free).
    pub fn free(&mut self, table: &mut BlockTable) {
        for block in table.blocks.drain(..).rev() {
            let slot = self
                .allocated
                .get_mut(block as usize)
                .filter(|allocated| **allocated)
                .unwrap_or_else(|| panic!("block {block} freed but not allocated"));
            *slot = false;
            self.free.push(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_and_free_accounting() {
        let mut m = BlockManager::new(10, 4);
        assert_eq!((m.num_blocks(), m.block_size(), m.num_free()), (10, 4, 10));
        let mut t = BlockTable::default();
        assert_eq!(m.blocks_needed(&t, 0), 0);
        assert_eq!(m.blocks_needed(&t, 1), 1);
        assert_eq!(m.blocks_needed(&t, 9), 3);
        m.grow(&mut t, 9).unwrap();
        assert_eq!(t.blocks().len(), 3);
        assert_eq!(t.capacity(4), 12);
        assert_eq!(m.num_free(), 7);
        // Within capacity: nothing new.
        assert_eq!(m.blocks_needed(&t, 12), 0);
        m.grow(&mut t, 12).unwrap();
        m.grow(&mut t, 5).unwrap();
        assert_eq!(t.blocks().len(), 3);
        m.grow(&mut t, 13).unwrap();
        assert_eq!((t.blocks().len(), m.num_free()), (4, 6));
        m.free(&mut t);
        assert!(t.blocks().is_empty());
        assert_eq!(m.num_free(), 10);
    }

    #[test]
    fn exhaustion_is_all_or_nothing() {
        let mut m = BlockManager::new(4, 2);
        let mut a = BlockTable::default();
        m.grow(&mut a, 5).unwrap();
        let mut b = BlockTable::default();
        assert!(m.can_grow(&b, 2));
        assert!(!m.can_grow(&b, 3));
        assert_eq!(m.grow(&mut b, 3), Err(OutOfBlocks { needed: 2, free: 1 }));
        assert!(b.blocks().is_empty());
        assert_eq!(m.num_free(), 1);
        m.grow(&mut b, 2).unwrap();
        assert_eq!(m.num_free(), 0);
        assert!(m.grow(&mut a, 7).is_err());
        assert_eq!(a.blocks().len(), 3);
    }

    #[test]
    fn slots_map_positions_into_blocks() {
        let mut m = BlockManager::new(8, 16);
        let mut filler = BlockTable::default();
        m.grow(&mut filler, 16).unwrap();
        let mut t = BlockTable::default();
        m.grow(&mut t, 40).unwrap();
        let b = t.blocks().to_vec();
        assert_eq!(b.len(), 3);
        assert_eq!(t.slot(16, 0), b[0] * 16);
        assert_eq!(t.slot(16, 15), b[0] * 16 + 15);
        assert_eq!(t.slot(16, 16), b[1] * 16);
        assert_eq!(t.slot(16, 39), b[2] * 16 + 7);
        let mut all: Vec<u32> = (0..40).map(|p| t.slot(16, p)).collect();
        all.extend((0..16).map(|p| filler.slot(16, p)));
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 56, "slots of distinct positions never collide");
        assert!(all.iter().all(|&s| s < 8 * 16));
    }

    #[test]
    fn freed_blocks_are_reused() {
        let mut m = BlockManager::new(10, 1);
        let mut a = BlockTable::default();
        let mut b = BlockTable::default();
        m.grow(&mut a, 2).unwrap();
        m.grow(&mut b, 1).unwrap();
        let released = a.blocks().to_vec();
        m.free(&mut a);
        let mut c = BlockTable::default();
        m.grow(&mut c, 2).unwrap();
        let mut reused = c.blocks().to_vec();
        reused.sort_unstable();
        let mut expected = released;
        expected.sort_unstable();
        assert_eq!(reused, expected);
    }

    #[test]
    fn usage_fraction() {
        let mut m = BlockManager::new(4, 8);
        assert_eq!(m.usage(), 0.0);
        let mut t = BlockTable::default();
        m.grow(&mut t, 9).unwrap();
        assert_eq!(m.usage(), 0.5);
        m.grow(&mut t, 32).unwrap();
        assert_eq!(m.usage(), 1.0);
        m.free(&mut t);
        assert_eq!(m.usage(), 0.0);
        assert_eq!(BlockManager::new(0, 8).usage(), 0.0);
    }

    #[test]
    #[should_panic(expected = "freed but not allocated")]
    fn double_free_panics() {
        let mut m = BlockManager::new(2, 4);
        let mut t = BlockTable::default();
        m.grow(&mut t, 4).unwrap();
        let mut copy = t.clone();
        m.free(&mut t);
        m.free(&mut copy);
    }
}
