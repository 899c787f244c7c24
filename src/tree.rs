//! The stable tree (content → store pages, with chains once
//! `max_page_sharing` is reached) and the unstable tree (candidate pages,
//! rebuilt every full scan). Both are keyed by a 64-bit content hash: a key
//! only proposes a match; bytes are compared under write-protect before any
//! merge.

use std::collections::HashMap;

use nohash_hasher::BuildNoHashHasher;

type NoHash<K, V> = HashMap<K, V, BuildNoHashHasher<u64>>;

/// A store page and its sharers (the kernel's stable_node, or a dup of a chain).
#[derive(Debug, Clone, Copy)]
pub struct StableNode {
    pub key: u64,
    /// Guest pages mapping it.
    pub sharers: u32,
    /// Merges decided in the current batch, not yet done.
    pub pending: u32,
    /// The store page holds its content (written once, under write-protect of
    /// the page it was copied from).
    pub filled: bool,
}

/// Content key → store pages (more than one: a chain of dups, or a collision).
#[derive(Debug, Default)]
pub struct StableTree {
    by_key: NoHash<u64, Vec<u32>>,
    nodes: HashMap<u32, StableNode, BuildNoHashHasher<u32>>,
    total_sharers: u64,
    live_nodes: u64,
    chains: u64,
    dups: u64,
}

impl StableTree {
    /// A store page for `key` with room for one more sharer; reserves it.
    pub fn reserve(&mut self, key: u64, max_sharing: u32) -> Option<u32> {
        let list = self.by_key.get(&key)?;
        for &idx in list {
            let n = self.nodes.get_mut(&idx)?;
            if n.sharers + n.pending < max_sharing {
                n.pending += 1;
                return Some(idx);
            }
        }
        None
    }

    /// Adds a new, unfilled store page under `key` with `pending` reservations.
    pub fn insert(&mut self, key: u64, idx: u32, pending: u32) {
        self.nodes.insert(idx, StableNode { key, sharers: 0, pending, filled: false });
        self.link(key, idx);
    }

    fn link(&mut self, key: u64, idx: u32) {
        let list = self.by_key.entry(key).or_default();
        list.push(idx);
        match list.len() {
            1 => {}
            2 => {
                self.chains += 1;
                self.dups += 2;
            }
            _ => self.dups += 1,
        }
    }

    fn unlink(&mut self, key: u64, idx: u32) {
        let Some(list) = self.by_key.get_mut(&key) else { return };
        let Some(pos) = list.iter().position(|&i| i == idx) else { return };
        list.swap_remove(pos);
        match list.len() {
            0 => {
                self.by_key.remove(&key);
            }
            1 => {
                self.chains -= 1;
                self.dups -= 2;
            }
            _ => self.dups -= 1,
        }
    }

    pub fn node(&self, idx: u32) -> Option<&StableNode> {
        self.nodes.get(&idx)
    }

    pub fn node_mut(&mut self, idx: u32) -> Option<&mut StableNode> {
        self.nodes.get_mut(&idx)
    }

    /// A reserved merge into `idx` happened.
    pub fn commit(&mut self, idx: u32) {
        if let Some(n) = self.nodes.get_mut(&idx) {
            n.pending = n.pending.saturating_sub(1);
            n.sharers += 1;
            self.total_sharers += 1;
            if n.sharers == 1 {
                self.live_nodes += 1;
            }
        }
    }

    /// A reserved merge into `idx` did not happen. True when the node is now
    /// unused and its store page must be freed (the node is gone).
    pub fn cancel(&mut self, idx: u32) -> bool {
        let Some(n) = self.nodes.get_mut(&idx) else { return false };
        n.pending = n.pending.saturating_sub(1);
        self.reap(idx)
    }

    /// A sharer left (copy-on-write, unmap, unmerge). True when the store page
    /// must be freed.
    pub fn release(&mut self, idx: u32) -> bool {
        let Some(n) = self.nodes.get_mut(&idx) else { return false };
        debug_assert!(n.sharers > 0);
        n.sharers = n.sharers.saturating_sub(1);
        self.total_sharers = self.total_sharers.saturating_sub(1);
        if n.sharers == 0 {
            self.live_nodes -= 1;
        }
        self.reap(idx)
    }

    fn reap(&mut self, idx: u32) -> bool {
        match self.nodes.get(&idx) {
            Some(n) if n.sharers == 0 && n.pending == 0 => {
                let key = n.key;
                self.nodes.remove(&idx);
                self.unlink(key, idx);
                true
            }
            _ => false,
        }
    }

    /// Moves a node to the key of the content it was filled with.
    pub fn rekey(&mut self, idx: u32, key: u64) {
        let Some(old) = self.nodes.get(&idx).map(|n| n.key) else { return };
        if old == key {
            return;
        }
        self.unlink(old, idx);
        if let Some(n) = self.nodes.get_mut(&idx) {
            n.key = key;
        }
        self.link(key, idx);
    }

    /// `pages_shared`: store pages with at least one sharer.
    pub fn pages_shared(&self) -> u64 {
        self.live_nodes
    }
    /// `pages_sharing`: sharers beyond the first of each store page.
    pub fn pages_sharing(&self) -> u64 {
        self.total_sharers - self.live_nodes
    }
    pub fn chains(&self) -> u64 {
        self.chains
    }
    pub fn dups(&self) -> u64 {
        self.dups
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Heap bytes (approximate: table slots and chain vectors).
    pub fn metadata_bytes(&self) -> u64 {
        let key_slot = 8 + std::mem::size_of::<Vec<u32>>() as u64 + 1;
        let node_slot = 4 + std::mem::size_of::<StableNode>() as u64 + 1;
        self.by_key.capacity() as u64 * key_slot
            + self.nodes.capacity() as u64 * node_slot
            + self.by_key.values().map(|v| v.capacity() as u64 * 4).sum::<u64>()
    }
}

/// Where an unstable-tree page lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    pub region: u32,
    pub page: u32,
}

/// Pages seen unchanged for a full scan and not matched yet.
#[derive(Debug, Default)]
pub struct UnstableTree {
    map: NoHash<u64, PageRef>,
}

impl UnstableTree {
    pub fn get(&self, key: u64) -> Option<PageRef> {
        self.map.get(&key).copied()
    }
    pub fn insert(&mut self, key: u64, r: PageRef) {
        self.map.insert(key, r);
    }
    pub fn remove(&mut self, key: u64) {
        self.map.remove(&key);
    }
    /// Starts a new full scan. The table keeps its allocation.
    pub fn clear(&mut self) {
        self.map.clear();
    }
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn metadata_bytes(&self) -> u64 {
        self.map.capacity() as u64 * (8 + 8 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_and_counts() {
        let mut t = StableTree::default();
        t.insert(7, 0, 2);
        t.commit(0);
        t.commit(0);
        assert_eq!((t.pages_shared(), t.pages_sharing()), (1, 1));
        assert_eq!(t.reserve(7, 2), None);
        t.insert(7, 1, 1);
        t.commit(1);
        assert_eq!((t.chains(), t.dups()), (1, 2));
        assert_eq!((t.pages_shared(), t.pages_sharing()), (2, 1));
        assert!(!t.release(0));
        assert!(t.release(0));
        assert_eq!((t.chains(), t.dups()), (0, 0));
        assert!(t.release(1));
        assert!(t.is_empty());
    }
}
