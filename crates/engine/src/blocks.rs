//! Paged KV-cache bookkeeping: the cache is split into fixed-size blocks of
//! token slots, and each sequence owns a table of blocks that grows on demand.
//!
//! Prefix caching: a full block whose keys and values are computed is registered under its
//! contents (its tokens and the key of the block before it, so a key names the whole prefix up
//! to the block's end). A new sequence whose prompt starts with registered blocks shares them
//! (counted references) and computes only the rest: requests with the same system prompt or
//! chat history skip recomputing it. A key also counts the block's tokens that were given (its
//! sequence's prompt) rather than generated, because the model may compute the two kinds with
//! different arithmetic (`MatmulRows`): a block is only shared where it holds what the sequence
//! would have computed itself. Shared blocks are full and never written again. A
//! registered block no sequence uses stays cached until a fresh block is needed and none is
//! free; then the least recently released is taken.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

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
    /// Prefix keys of the leading full blocks seen by `register` or `share_prefix`.
    keys: Vec<u64>,
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

/// What a registered block holds: the key of the prefix before it and its own tokens. A lookup
/// compares both, so a hash collision can never hand out the wrong keys and values.
#[derive(Debug, Clone)]
struct Contents {
    parent: u64,
    tokens: Vec<u32>,
    /// How many of `tokens`, from the first, were prompt tokens.
    given: usize,
}

/// Hands out cache blocks to block tables and takes them back.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    /// Blocks holding nothing reusable. Popped from the end; starts in descending order so
    /// fresh caches hand out low ids first, and freed blocks are reused before untouched ones.
    free: Vec<u32>,
    /// Tables using each block. Catches a block returned twice (e.g. from a cloned table),
    /// which would otherwise let two sequences share cache slots silently.
    refs: Vec<u32>,
    /// Registered blocks by prefix key, and each registered block's key and contents.
    cached: HashMap<u64, u32>,
    registered: Vec<Option<(u64, Contents)>>,
    /// Registered blocks no table uses, by release time (oldest first), and each one's time.
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<u64>,
    clock: u64,
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
            refs: vec![0; num_blocks],
            cached: HashMap::new(),
            registered: vec![None; num_blocks],
            idle: BTreeMap::new(),
            idle_since: vec![0; num_blocks],
            clock: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks a table can take: the free ones and the cached ones no table uses.
    pub fn num_free(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Fraction of blocks in use by tables, 0 for an empty cache.
    pub fn usage(&self) -> f64 {
        let total = self.num_blocks();
        if total == 0 {
            return 0.0;
        }
        (total - self.num_free()) as f64 / total as f64
    }

    /// Extra blocks `table` needs to hold `total_tokens` tokens.
    pub fn blocks_needed(&self, table: &BlockTable, total_tokens: usize) -> usize {
        total_tokens
            .div_ceil(self.block_size)
            .saturating_sub(table.blocks.len())
    }

    pub fn can_grow(&self, table: &BlockTable, total_tokens: usize) -> bool {
        self.blocks_needed(table, total_tokens) <= self.num_free()
    }

    /// Extends `table` to hold `total_tokens` tokens, with free blocks first, then the least
    /// recently released cached ones. All or nothing, so a scheduler can try a request and back
    /// off without cleanup. Never shrinks a table.
    pub fn grow(&mut self, table: &mut BlockTable, total_tokens: usize) -> Result<(), OutOfBlocks> {
        let needed = self.blocks_needed(table, total_tokens);
        if needed > self.num_free() {
            return Err(OutOfBlocks {
                needed,
                free: self.num_free(),
            });
        }
        for _ in 0..needed {
            let block = match self.free.pop() {
                Some(block) => block,
                None => {
                    let (_, block) = self.idle.pop_first().expect("counted above");
                    let (key, _) = self.registered[block as usize].take().expect("idle");
                    self.cached.remove(&key);
                    block
                }
            };
            self.refs[block as usize] = 1;
            table.blocks.push(block);
        }
        Ok(())
    }

    /// The key of the prefix ending with `tokens` (one block, the first `given` of them prompt
    /// tokens) after the prefix keyed `parent`.
    fn key(parent: u64, tokens: &[u32], given: usize) -> u64 {
        let mut h = DefaultHasher::new();
        (parent, tokens, given).hash(&mut h);
        h.finish()
    }

    /// Prompt tokens in block `i` of a sequence whose first `prompt_len` tokens are its prompt.
    fn given(&self, i: usize, prompt_len: usize) -> usize {
        prompt_len.clamp(i * self.block_size, (i + 1) * self.block_size) - i * self.block_size
    }

    /// Gives an empty `table` the registered blocks that hold the leading full blocks of
    /// `tokens` (the first `prompt_len` its prompt), leaving at least the last token to compute
    /// (its logits are needed). Returns the tokens covered.
    pub fn share_prefix(
        &mut self,
        table: &mut BlockTable,
        tokens: &[u32],
        prompt_len: usize,
    ) -> usize {
        debug_assert!(table.blocks.is_empty(), "sharing into a table in use");
        let mut parent = 0;
        let chunks = tokens[..tokens.len().saturating_sub(1)].chunks_exact(self.block_size);
        for (i, chunk) in chunks.enumerate() {
            let given = self.given(i, prompt_len);
            let key = Self::key(parent, chunk, given);
            let Some(&block) = self.cached.get(&key) else {
                break;
            };
            let (_, contents) = self.registered[block as usize].as_ref().expect("cached");
            if contents.parent != parent || contents.tokens != chunk || contents.given != given {
                break;
            }
            let refs = &mut self.refs[block as usize];
            if *refs == 0 {
                self.idle.remove(&self.idle_since[block as usize]);
            }
            *refs += 1;
            table.blocks.push(block);
            table.keys.push(key);
            parent = key;
        }
        table.blocks.len() * self.block_size
    }

    /// Registers the blocks of `table` that `computed` (the tokens whose keys and values are
    /// in the cache, the first `prompt_len` of the sequence its prompt) fills, past those
    /// already seen. A block whose contents another block already holds stays private.
    pub fn register(&mut self, table: &mut BlockTable, computed: &[u32], prompt_len: usize) {
        let full = (computed.len() / self.block_size).min(table.blocks.len());
        for i in table.keys.len()..full {
            let parent = i.checked_sub(1).map_or(0, |p| table.keys[p]);
            let tokens = &computed[i * self.block_size..(i + 1) * self.block_size];
            let given = self.given(i, prompt_len);
            let key = Self::key(parent, tokens, given);
            table.keys.push(key);
            let block = table.blocks[i];
            if self.registered[block as usize].is_none() && !self.cached.contains_key(&key) {
                self.cached.insert(key, block);
                let tokens = tokens.to_vec();
                let contents = Contents {
                    parent,
                    tokens,
                    given,
                };
                self.registered[block as usize] = Some((key, contents));
            }
        }
    }

    /// Returns every block of `table` (registered ones to the cache) and empties it.
    ///
    /// # Panics
    /// If a block is not currently allocated by this manager (double free).
    pub fn free(&mut self, table: &mut BlockTable) {
        table.keys.clear();
        for block in table.blocks.drain(..).rev() {
            let refs = self
                .refs
                .get_mut(block as usize)
                .filter(|refs| **refs > 0)
                .unwrap_or_else(|| panic!("block {block} freed but not allocated"));
            *refs -= 1;
            if *refs > 0 {
                continue;
            }
            if self.registered[block as usize].is_some() {
                self.clock += 1;
                self.idle.insert(self.clock, block);
                self.idle_since[block as usize] = self.clock;
            } else {
                self.free.push(block);
            }
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

    /// Blocks computed by one sequence are shared by the next with the same prefix, up to its
    /// first differing block and never its last token; the shared count survives the first
    /// sequence's release, and only whole matching contents are shared.
    #[test]
    fn prefix_blocks_are_shared_by_contents() {
        let mut m = BlockManager::new(8, 4);
        let prompt: Vec<u32> = (0..10).collect();
        let mut a = BlockTable::default();
        assert_eq!(m.share_prefix(&mut a, &prompt, 10), 0);
        m.grow(&mut a, 10).unwrap();
        m.register(&mut a, &prompt, 10);
        assert_eq!(a.keys.len(), 2, "two full blocks of 4 in 10 tokens");

        let mut b = BlockTable::default();
        let mut other = prompt.clone();
        other[6] = 99;
        assert_eq!(
            m.share_prefix(&mut b, &other, 10),
            4,
            "the second block differs"
        );
        assert_eq!(b.blocks()[0], a.blocks()[0]);
        m.free(&mut b);

        // A prompt of exactly the two blocks shares only the first: its last token is computed.
        assert_eq!(m.share_prefix(&mut b, &prompt[..8], 8), 4);
        m.free(&mut b);

        m.free(&mut a);
        assert_eq!(
            (m.num_free(), m.usage()),
            (8, 0.0),
            "cached blocks count as free"
        );
        let mut c = BlockTable::default();
        assert_eq!(m.share_prefix(&mut c, &prompt, 10), 8);
        assert_eq!(m.num_free(), 6);
        // The same tokens after a different first block are another prefix.
        let mut shifted: Vec<u32> = vec![7, 7, 7, 7];
        shifted.extend(&prompt[4..]);
        let mut d = BlockTable::default();
        assert_eq!(m.share_prefix(&mut d, &shifted, 10), 0);
    }

    /// A block holding generated tokens is shared only by a sequence that also generated them
    /// (its own recomputation after preemption), not by a prompt that happens to repeat them:
    /// the model may compute prompt tokens with other arithmetic.
    #[test]
    fn generated_blocks_are_not_shared_as_prompt() {
        let mut m = BlockManager::new(8, 4);
        let tokens: Vec<u32> = (0..10).collect();
        let mut a = BlockTable::default();
        m.grow(&mut a, 10).unwrap();
        // Prompt of 6: block 0 all given, block 1 two given and two generated.
        m.register(&mut a, &tokens, 6);
        let mut b = BlockTable::default();
        assert_eq!(
            m.share_prefix(&mut b, &tokens, 10),
            4,
            "block 1 was generated in part"
        );
        m.free(&mut b);
        assert_eq!(
            m.share_prefix(&mut b, &tokens, 6),
            8,
            "the same sequence recomputed"
        );
        m.free(&mut b);
        m.free(&mut a);
    }

    /// With no free block left, growing takes the least recently released cached block and
    /// forgets what it held; blocks in use are never taken.
    #[test]
    fn idle_cached_blocks_are_evicted_oldest_first() {
        let mut m = BlockManager::new(3, 2);
        let (p, q): (Vec<u32>, Vec<u32>) = (vec![1, 2, 3], vec![4, 5, 6]);
        let (mut a, mut b) = (BlockTable::default(), BlockTable::default());
        m.grow(&mut a, 3).unwrap();
        m.register(&mut a, &p[..2], 3);
        m.grow(&mut b, 1).unwrap();
        m.register(&mut b, &q[..2], 3);
        m.free(&mut a); // a's first block cached (older), its second free
        m.free(&mut b); // b's block cached (newer)
        let mut c = BlockTable::default();
        m.grow(&mut c, 4).unwrap(); // the free block, then the oldest cached one
        let mut d = BlockTable::default();
        assert_eq!(m.share_prefix(&mut d, &p, 3), 0, "evicted");
        assert_eq!(m.share_prefix(&mut d, &q, 3), 2, "still cached");
        assert!(m.grow(&mut c, 6).is_err(), "the shared block is in use");
        m.free(&mut d);
        m.free(&mut c);
        assert_eq!(m.num_free(), 3);
    }

    #[test]
    #[should_panic(expected = "freed but not allocated")]
    fn shared_block_freed_too_often_panics() {
        let mut m = BlockManager::new(2, 2);
        let mut a = BlockTable::default();
        m.grow(&mut a, 3).unwrap();
        m.register(&mut a, &[1, 2, 3], 3);
        let mut b = BlockTable::default();
        m.share_prefix(&mut b, &[1, 2, 3], 3);
        let mut copy = b.clone();
        m.free(&mut b);
        m.free(&mut a);
        m.free(&mut copy);
    }
}
