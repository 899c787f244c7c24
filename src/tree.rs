//! The stable tree (content → store pages, with chains once
//! `max_page_sharing` is reached) and the unstable tree (candidate pages,
//! rebuilt every full scan). Both are keyed by a 64-bit content hash: a key
//! only proposes a match; bytes are compared under write-protect before any
//! merge.

use hashbrown::HashTable;

/// Heap bytes of a SwissTable holding `capacity` entries of `slot` bytes: its
/// buckets (a power of two, at most 7/8 full) each cost a slot and a control
/// byte, plus one group of trailing control bytes.
fn table_bytes(capacity: usize, slot: usize) -> u64 {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 { capacity + 1 } else { (capacity * 8 / 7).next_power_of_two() };
    (buckets * (slot + 1) + 16) as u64
}

const NIL: u32 = u32::MAX;

/// A store page and its sharers (the kernel's stable_node, or a dup of a chain).
#[derive(Debug, Clone, Copy)]
pub struct StableNode {
    /// The content key, as two halves: a `u64` would align the node to 8
    /// bytes and pad it to 24.
    key: [u32; 2],
    /// Guest pages mapping it.
    pub sharers: u32,
    /// Merges decided in the current batch, not yet done.
    pub pending: u16,
    /// Next store page under the same key (a chain of dups, or a collision).
    next: u32,
    /// The store page holds its content (written once, under write-protect of
    /// the page it was copied from).
    pub filled: bool,
    live: bool,
}

fn split(key: u64) -> [u32; 2] {
    [key as u32, (key >> 32) as u32]
}

impl StableNode {
    pub fn key(&self) -> u64 {
        u64::from(self.key[0]) | u64::from(self.key[1]) << 32
    }
}

const VACANT: StableNode = StableNode { key: [0, 0], sharers: 0, pending: 0, next: NIL, filled: false, live: false };

/// Content key → store pages. Nodes live in a dense table indexed by store
/// page (20 bytes each); the key table holds only the index of the first
/// node of each key (4 bytes a slot: the key itself is read from the node,
/// and, being a content digest already, is its own hash), the rest are
/// linked through `next`.
#[derive(Debug, Default)]
pub struct StableTree {
    by_key: HashTable<u32>,
    nodes: Vec<StableNode>,
    total_sharers: u64,
    live_nodes: u64,
    chains: u64,
    dups: u64,
}

impl StableTree {
    fn head(&self, key: u64) -> Option<u32> {
        self.by_key.find(key, |&i| self.nodes[i as usize].key() == key).copied()
    }

    fn chain(&self, key: u64) -> impl Iterator<Item = u32> + '_ {
        let mut at = self.head(key).unwrap_or(NIL);
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
            // A node's reservations per batch are capped at u16::MAX; past
            // that (only with max_page_sharing beyond it) the next dup is used.
            n.sharers + u32::from(n.pending) < max_sharing && n.pending < u16::MAX && (n.filled || !filled_only)
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
        let pending = u16::try_from(pending).unwrap_or(u16::MAX);
        self.nodes[i] = StableNode { key: split(key), sharers: 0, pending, next: NIL, filled: false, live: true };
        self.link(key, idx);
    }

    fn link(&mut self, key: u64, idx: u32) {
        let nodes = &self.nodes;
        let head = match self.by_key.find_mut(key, |&i| nodes[i as usize].key() == key) {
            Some(slot) => std::mem::replace(slot, idx),
            None => {
                self.by_key.insert_unique(key, idx, |&i| nodes[i as usize].key());
                NIL
            }
        };
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
        let Some(head) = self.head(key) else { return };
        let next = self.nodes[idx as usize].next;
        if head == idx {
            let nodes = &self.nodes;
            if let Ok(slot) = self.by_key.find_entry(key, |&i| nodes[i as usize].key() == key) {
                if next == NIL {
                    slot.remove();
                } else {
                    *slot.into_mut() = next;
                }
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
                self.unlink(n.key(), idx);
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
        let Some(old) = self.node(idx).map(StableNode::key) else { return };
        if old == key {
            return;
        }
        self.unlink(old, idx);
        self.nodes[idx as usize].key = split(key);
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

    /// Heap bytes: the node table and the key table.
    pub fn metadata_bytes(&self) -> u64 {
        table_bytes(self.by_key.capacity(), 4)
            + self.nodes.capacity() as u64 * std::mem::size_of::<StableNode>() as u64
    }
}

const _: () = assert!(std::mem::size_of::<StableNode>() == 20);

/// Where an unstable-tree page lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    pub region: u32,
    pub page: u32,
}

/// An unstable-tree slot: where the page is and 32 bits of its key. The
/// other 32 bits are not kept: a match of the tag only proposes a candidate,
/// whose bytes are compared before anything merges, so a rare tag collision
/// costs one comparison (or hides one candidate until the next scan), and a
/// slot is 12 bytes instead of 16.
#[derive(Debug, Clone, Copy)]
struct UnstableSlot {
    tag: u32,
    at: PageRef,
}

const _: () = assert!(std::mem::size_of::<UnstableSlot>() == 12);

/// Pages seen unchanged for a full scan and not matched yet.
#[derive(Debug, Default)]
pub struct UnstableTree {
    map: HashTable<UnstableSlot>,
}

impl UnstableTree {
    fn tag(key: u64) -> u32 {
        (key >> 32) as u32
    }
    /// The table's hash of a tag: spread over all 64 bits, because the
    /// table takes its control byte from the top bits.
    fn hash(tag: u32) -> u64 {
        u64::from(tag).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
    pub fn get(&self, key: u64) -> Option<PageRef> {
        let tag = Self::tag(key);
        self.map.find(Self::hash(tag), |s| s.tag == tag).map(|s| s.at)
    }
    pub fn insert(&mut self, key: u64, r: PageRef) {
        let tag = Self::tag(key);
        let slot = UnstableSlot { tag, at: r };
        match self.map.find_mut(Self::hash(tag), |s| s.tag == tag) {
            Some(s) => *s = slot,
            None => {
                self.map.insert_unique(Self::hash(tag), slot, |s| Self::hash(s.tag));
            }
        }
    }
    pub fn remove(&mut self, key: u64) {
        let tag = Self::tag(key);
        if let Ok(e) = self.map.find_entry(Self::hash(tag), |s| s.tag == tag) {
            e.remove();
        }
    }
    /// Starts a new full scan. The table keeps room for as many pages as the
    /// last scan left in it, no more: once everything has merged, a table
    /// sized for the first scan's candidates would be dead weight.
    pub fn clear(&mut self) {
        let held = self.map.len();
        self.map.clear();
        self.map.shrink_to(held, |s| Self::hash(s.tag));
    }
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn metadata_bytes(&self) -> u64 {
        table_bytes(self.map.capacity(), std::mem::size_of::<UnstableSlot>())
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
        assert_eq!(t.node(5).map(|n| n.key()), Some(7));
        assert_eq!(t.reserve(7, 2), Some(5));
        assert!(!t.cancel(5));
        assert!(t.release(5) && t.release(2));
        assert!(t.is_empty() && t.node(2).is_none());
        assert_eq!(t.metadata_bytes() > 0, t.nodes.capacity() > 0);
    }

    #[test]
    fn unstable_tree_keeps_room_only_for_what_the_last_scan_held() {
        let mut u = UnstableTree::default();
        for i in 0..10_000u64 {
            u.insert(i << 32 | 5, PageRef { region: 1, page: i as u32 });
        }
        assert_eq!(u.get(77 << 32 | 9), Some(PageRef { region: 1, page: 77 }));
        u.remove(77 << 32);
        assert_eq!(u.get(77 << 32), None);
        let full = u.metadata_bytes();
        for i in 0..10_000u64 {
            u.remove(i << 32);
        }
        u.insert(3 << 32, PageRef { region: 2, page: 3 });
        // The scan that filled the table ends with one page left in it.
        u.clear();
        assert!(u.is_empty());
        assert!(u.metadata_bytes() * 100 < full, "{} vs {full}", u.metadata_bytes());
    }
}
