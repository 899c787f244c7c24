//! The stable tree (content → store pages, with chains once
//! `max_page_sharing` is reached) and the unstable tree (candidate pages,
//! rebuilt every full scan). Both are keyed by a 64-bit content hash: a key
//! only proposes a match; bytes are compared under write-protect before any
//! merge.

use std::collections::HashMap;

use nohash_hasher::BuildNoHashHasher;

type NoHash<K, V> = HashMap<K, V, BuildNoHashHasher<u64>>;

const NIL: u32 = u32::MAX;

/// A store page and its sharers (the kernel's stable_node, or a dup of a chain).
#[derive(Debug, Clone, Copy)]
pub struct StableNode {
    pub key: u64,
    /// Guest pages mapping it.
    pub sharers: u32,
    /// Merges decided in the current batch, not yet done.
    pub pending: u32,
    /// Next store page under the same key (a chain of dups, or a collision).
    next: u32,
    /// The store page holds its content (written once, under write-protect of
    /// the page it was copied from).
    pub filled: bool,
    live: bool,
}

const VACANT: StableNode = StableNode { key: 0, sharers: 0, pending: 0, next: NIL, filled: false, live: false };

/// Content key → store pages. Nodes live in a dense table indexed by store
/// page (24 bytes each); the key table holds only the first node of each
/// key, the rest are linked through `next`.
#[derive(Debug, Default)]
pub struct StableTree {
    by_key: NoHash<u64, u32>,
    nodes: Vec<StableNode>,
    total_sharers: u64,
    live_nodes: u64,
    chains: u64,
    dups: u64,
}

impl StableTree {
    fn chain(&self, key: u64) -> impl Iterator<Item = u32> + '_ {
        let mut at = self.by_key.get(&key).copied().unwrap_or(NIL);
        std::iter::from_fn(move || {
            let idx = at;
            let n = self.nodes.get(idx as usize)?;
            at = n.next;
            Some(idx)
        })
    }

    /// A store page for `key` with room for one more sharer; reserves it.
    pub fn reserve(&mut self, key: u64, max_sharing: u32) -> Option<u32> {
        self.reserve_where(key, max_sharing, false)
    }

    /// As [`StableTree::reserve`], among store pages already filled (the
    /// daemon's broker: a join is only ordered once the content is there).
    pub fn reserve_filled(&mut self, key: u64, max_sharing: u32) -> Option<u32> {
        self.reserve_where(key, max_sharing, true)
    }

    fn reserve_where(&mut self, key: u64, max_sharing: u32, filled_only: bool) -> Option<u32> {
        let idx = self.chain(key).find(|&i| {
            let n = &self.nodes[i as usize];
            n.sharers + n.pending < max_sharing && (n.filled || !filled_only)
        })?;
        self.nodes[idx as usize].pending += 1;
        Some(idx)
    }

    /// Whether a store page for `key` waits for its content.
    pub fn has_unfilled(&self, key: u64) -> bool {
        self.chain(key).any(|i| !self.nodes[i as usize].filled)
    }

    /// Guest pages mapping store pages (`pages_shared + pages_sharing`).
    pub fn sharers(&self) -> u64 {
        self.total_sharers
    }

    /// Adds a new, unfilled store page under `key` with `pending` reservations.
    pub fn insert(&mut self, key: u64, idx: u32, pending: u32) {
        let i = idx as usize;
        if self.nodes.len() <= i {
            self.nodes.resize(i + 1, VACANT);
        }
        self.nodes[i] = StableNode { key, sharers: 0, pending, next: NIL, filled: false, live: true };
        self.link(key, idx);
    }

    fn link(&mut self, key: u64, idx: u32) {
        let head = self.by_key.insert(key, idx).unwrap_or(NIL);
        self.nodes[idx as usize].next = head;
        if head != NIL {
            let len = self.chain(key).count();
            if len == 2 {
                self.chains += 1;
                self.dups += 2;
            } else {
                self.dups += 1;
            }
        }
    }

    fn unlink(&mut self, key: u64, idx: u32) {
        let len = self.chain(key).count();
        let Some(&head) = self.by_key.get(&key) else { return };
        let next = self.nodes[idx as usize].next;
        if head == idx {
            if next == NIL {
                self.by_key.remove(&key);
            } else {
                self.by_key.insert(key, next);
            }
        } else {
            let Some(prev) = self.chain(key).find(|&i| self.nodes[i as usize].next == idx) else { return };
            self.nodes[prev as usize].next = next;
        }
        self.nodes[idx as usize].next = NIL;
        match len {
            2 => {
                self.chains -= 1;
                self.dups -= 2;
            }
            n if n > 2 => self.dups -= 1,
            _ => {}
        }
    }

    pub fn node(&self, idx: u32) -> Option<&StableNode> {
        self.nodes.get(idx as usize).filter(|n| n.live)
    }

    pub fn node_mut(&mut self, idx: u32) -> Option<&mut StableNode> {
        self.nodes.get_mut(idx as usize).filter(|n| n.live)
    }

    /// A reserved merge into `idx` happened.
    pub fn commit(&mut self, idx: u32) {
        if let Some(n) = self.node_mut(idx) {
            n.pending = n.pending.saturating_sub(1);
            n.sharers += 1;
            let first = n.sharers == 1;
            self.total_sharers += 1;
            if first {
                self.live_nodes += 1;
            }
        }
    }

    /// A reserved merge into `idx` did not happen. True when the node is now
    /// unused and its store page must be freed (the node is gone).
    pub fn cancel(&mut self, idx: u32) -> bool {
        let Some(n) = self.node_mut(idx) else { return false };
        n.pending = n.pending.saturating_sub(1);
        self.reap(idx)
    }

    /// A sharer left (copy-on-write, unmap, unmerge). True when the store page
    /// must be freed.
    pub fn release(&mut self, idx: u32) -> bool {
        let Some(n) = self.node_mut(idx) else { return false };
        debug_assert!(n.sharers > 0);
        n.sharers = n.sharers.saturating_sub(1);
        let last = n.sharers == 0;
        self.total_sharers = self.total_sharers.saturating_sub(1);
        if last {
            self.live_nodes -= 1;
        }
        self.reap(idx)
    }

    fn reap(&mut self, idx: u32) -> bool {
        match self.node(idx).copied() {
            Some(n) if n.sharers == 0 && n.pending == 0 => {
                self.unlink(n.key, idx);
                self.nodes[idx as usize] = VACANT;
                while self.nodes.last().is_some_and(|n| !n.live) {
                    self.nodes.pop();
                }
                true
            }
            _ => false,
        }
    }

    /// Moves a node to the key of the content it was filled with.
    pub fn rekey(&mut self, idx: u32, key: u64) {
        let Some(old) = self.node(idx).map(|n| n.key) else { return };
        if old == key {
            return;
        }
        self.unlink(old, idx);
        self.nodes[idx as usize].key = key;
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
        self.by_key.is_empty()
    }

    /// Heap bytes: the node table and the key table's slots.
    pub fn metadata_bytes(&self) -> u64 {
        let key_slot = (8 + 4 + 1) as u64;
        self.by_key.capacity() as u64 * key_slot
            + self.nodes.capacity() as u64 * std::mem::size_of::<StableNode>() as u64
    }
}

const _: () = assert!(std::mem::size_of::<StableNode>() == 24);

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

    #[test]
    fn chains_of_three_unlink_from_the_middle_and_rekey() {
        let mut t = StableTree::default();
        for idx in [5, 9, 2] {
            t.insert(1, idx, 1);
            t.commit(idx);
        }
        assert_eq!((t.chains(), t.dups(), t.pages_shared()), (1, 3, 3));
        assert!(t.release(9));
        assert_eq!((t.chains(), t.dups()), (1, 2));
        assert_eq!(t.reserve(1, 2), Some(2).or(t.node(2).map(|_| 2)));
        assert!(!t.cancel(2));
        t.rekey(5, 7);
        assert_eq!((t.chains(), t.dups()), (0, 0));
        assert_eq!(t.node(5).map(|n| n.key), Some(7));
        assert_eq!(t.reserve(7, 2), Some(5));
        assert!(!t.cancel(5));
        assert!(t.release(5) && t.release(2));
        assert!(t.is_empty() && t.node(2).is_none());
        assert_eq!(t.metadata_bytes() > 0, t.nodes.capacity() > 0);
    }
}
