//! The stable tree (content → store pages, with chains once
//! `max_page_sharing` is reached) and the unstable tree (candidate pages,
//! rebuilt every full scan). Both are keyed by a 64-bit content hash: a key
//! only proposes a match; bytes are compared under write-protect before any
//! merge.

mod table;

use hashbrown::HashTable;

use table::SlimTable;

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

/// Spreads a node index over 64 bits (the side maps' hash: a SwissTable takes
/// its control byte from the top bits).
fn spread(idx: u32) -> u64 {
    u64::from(idx).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Entries an empty side map keeps room for.
const SIDE_MAP_KEPT: usize = 32;

/// A few node indices with a number each, for what only some nodes have at a
/// time (reservations of the batch being decided, chain links).
#[derive(Debug, Default)]
struct SideMap(HashTable<(u32, u32)>);

impl SideMap {
    fn get(&self, idx: u32) -> Option<u32> {
        if self.0.is_empty() {
            return None;
        }
        self.0.find(spread(idx), |e| e.0 == idx).map(|e| e.1)
    }

    /// Sets `idx`'s number; `None` removes it. An emptied map gives its room
    /// back past a few entries: the reservations of a big batch leave
    /// nothing behind once settled, and a page-at-a-time caller does not
    /// allocate per page.
    fn set(&mut self, idx: u32, v: Option<u32>) {
        match (self.0.find_entry(spread(idx), |e| e.0 == idx), v) {
            (Ok(e), Some(v)) => e.into_mut().1 = v,
            (Ok(e), None) => {
                e.remove();
                if self.0.is_empty() && self.0.capacity() > SIDE_MAP_KEPT {
                    self.0 = HashTable::new();
                }
            }
            (Err(_), Some(v)) => {
                self.0.insert_unique(spread(idx), (idx, v), |e| spread(e.0));
            }
            (Err(_), None) => {}
        }
    }

    fn heap_bytes(&self) -> u64 {
        table_bytes(self.0.capacity(), 8)
    }
}

/// Sharers at most (a node keeps two flags above the count).
const MAX_SHARERS: u32 = (1 << 30) - 1;
const FILLED: u32 = 1 << 30;
const LIVE: u32 = 1 << 31;

/// A store page and its sharers (the kernel's stable_node, or a dup of a
/// chain), in 12 bytes. What only some nodes have lives in side maps: the
/// reservations of the batch being decided, and the link to the next node of
/// a chain (more sharers than `max_page_sharing`, or a key collision).
#[derive(Debug, Clone, Copy)]
pub struct StableNode {
    /// The content key, in halves: a `u64` would align the node to 8 bytes
    /// and pad it to 16.
    key: U64Halves,
    /// Guest pages mapping it (low 30 bits), FILLED and LIVE.
    bits: u32,
}

const _: () = assert!(std::mem::size_of::<StableNode>() == 12);

/// A `u64` stored as two `u32` halves, so that a struct holding it stays
/// 4-aligned (no padding to 8) in tables of millions of entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct U64Halves([u32; 2]);

impl U64Halves {
    pub const fn new(v: u64) -> Self {
        Self([v as u32, (v >> 32) as u32])
    }
    pub const fn get(self) -> u64 {
        self.0[0] as u64 | (self.0[1] as u64) << 32
    }
}

impl StableNode {
    pub fn key(&self) -> u64 {
        self.key.get()
    }
    /// Guest pages mapping it.
    pub fn sharers(&self) -> u32 {
        self.bits & MAX_SHARERS
    }
    /// The store page holds its content (written once, under write-protect
    /// of the page it was copied from).
    pub fn filled(&self) -> bool {
        self.bits & FILLED != 0
    }
    pub fn set_filled(&mut self) {
        self.bits |= FILLED;
    }
    fn live(&self) -> bool {
        self.bits & LIVE != 0
    }
}

const VACANT: StableNode = StableNode { key: U64Halves::new(0), bits: 0 };

/// Content key → store pages. Nodes live in a dense table indexed by store
/// page (12 bytes each); the key table holds only the index of the first
/// node of each key (4 bytes and a tag byte a bucket: the key itself is read
/// from the node, and, being a content digest already, is its own hash), the
/// rest are linked through `next`.
#[derive(Debug, Default)]
pub struct StableTree {
    by_key: SlimTable<u32>,
    nodes: Vec<StableNode>,
    /// Merges decided in the current batch and not done yet, by node.
    pending: SideMap,
    /// The next node under the same key, for nodes that have one.
    next: SideMap,
    total_sharers: u64,
    live_nodes: u64,
    chains: u64,
    dups: u64,
}

impl StableTree {
    fn head(&self, key: u64) -> Option<u32> {
        self.by_key.find(key, |&i| self.nodes[i as usize].key() == key).copied()
    }

    fn next_of(&self, idx: u32) -> u32 {
        self.next.get(idx).unwrap_or(NIL)
    }

    fn chain(&self, key: u64) -> impl Iterator<Item = u32> + '_ {
        let mut at = self.head(key).unwrap_or(NIL);
        std::iter::from_fn(move || {
            let idx = at;
            self.nodes.get(idx as usize)?;
            at = self.next_of(idx);
            Some(idx)
        })
    }

    /// Merges reserved on `idx` in the current batch.
    pub fn pending(&self, idx: u32) -> u32 {
        self.pending.get(idx).unwrap_or(0)
    }

    fn set_pending(&mut self, idx: u32, n: u32) {
        self.pending.set(idx, (n > 0).then_some(n));
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
        let idx = self.chain(key).find(|&i| self.has_room(i, max_sharing) && (self.nodes[i as usize].filled() || !filled_only))?;
        self.set_pending(idx, self.pending(idx) + 1);
        Some(idx)
    }

    /// Reserves one more sharer on store page `idx`, if it has room.
    pub fn reserve_at(&mut self, idx: u32, max_sharing: u32) -> bool {
        if self.nodes.get(idx as usize).is_none() || !self.has_room(idx, max_sharing) {
            return false;
        }
        self.set_pending(idx, self.pending(idx) + 1);
        true
    }

    /// Whether store page `idx` can take one more sharer, counting the
    /// reserved ones.
    fn has_room(&self, idx: u32, max_sharing: u32) -> bool {
        let max = u64::from(max_sharing.min(MAX_SHARERS));
        u64::from(self.nodes[idx as usize].sharers()) + u64::from(self.pending(idx)) < max
    }

    /// Whether a store page for `key` waits for its content.
    pub fn has_unfilled(&self, key: u64) -> bool {
        self.chain(key).any(|i| !self.nodes[i as usize].filled())
    }

    /// Guest pages mapping store pages (`pages_shared + pages_sharing`).
    pub fn sharers(&self) -> u64 {
        self.total_sharers
    }

    /// Adds a new, unfilled store page under `key` with `pending` reservations.
    pub fn insert(&mut self, key: u64, idx: u32, pending: u32) {
        let i = idx as usize;
        if self.nodes.len() <= i {
            // Grow by a 32nd, not double: the table is indexed by store page
            // and its spare room counts as metadata (a big table grows in
            // place: the allocator remaps it).
            let want = i + 1 - self.nodes.len();
            if self.nodes.capacity() < i + 1 {
                self.nodes.reserve_exact(want.max(self.nodes.len() / 32).max(64));
            }
            self.nodes.resize(i + 1, VACANT);
        }
        self.nodes[i] = StableNode { key: U64Halves::new(key), bits: LIVE };
        self.set_pending(idx, pending);
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
        self.next.set(idx, (head != NIL).then_some(head));
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
        let next = self.next_of(idx);
        if head == idx {
            let nodes = &self.nodes;
            if next == NIL {
                self.by_key.remove(key, |&i| i == idx, |&i| nodes[i as usize].key());
            } else if let Some(slot) = self.by_key.find_mut(key, |&i| i == idx) {
                *slot = next;
            }
        } else {
            let Some(prev) = self.chain(key).find(|&i| self.next_of(i) == idx) else { return };
            self.next.set(prev, (next != NIL).then_some(next));
        }
        self.next.set(idx, None);
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
        self.nodes.get(idx as usize).filter(|n| n.live())
    }

    pub fn node_mut(&mut self, idx: u32) -> Option<&mut StableNode> {
        self.nodes.get_mut(idx as usize).filter(|n| n.live())
    }

    /// A reserved merge into `idx` happened.
    pub fn commit(&mut self, idx: u32) {
        let Some(n) = self.node_mut(idx) else { return };
        debug_assert!(n.sharers() < MAX_SHARERS);
        n.bits += 1;
        let first = n.sharers() == 1;
        self.total_sharers += 1;
        if first {
            self.live_nodes += 1;
        }
        self.set_pending(idx, self.pending(idx).saturating_sub(1));
    }

    /// A reserved merge into `idx` did not happen. True when the node is now
    /// unused and its store page must be freed (the node is gone).
    pub fn cancel(&mut self, idx: u32) -> bool {
        if self.node(idx).is_none() {
            return false;
        }
        self.set_pending(idx, self.pending(idx).saturating_sub(1));
        self.reap(idx)
    }

    /// A sharer left (copy-on-write, unmap, unmerge). True when the store page
    /// must be freed.
    pub fn release(&mut self, idx: u32) -> bool {
        let Some(n) = self.node_mut(idx) else { return false };
        debug_assert!(n.sharers() > 0);
        if n.sharers() == 0 {
            return false;
        }
        n.bits -= 1;
        let last = n.sharers() == 0;
        self.total_sharers = self.total_sharers.saturating_sub(1);
        if last {
            self.live_nodes -= 1;
        }
        self.reap(idx)
    }

    fn reap(&mut self, idx: u32) -> bool {
        match self.node(idx).copied() {
            Some(n) if n.sharers() == 0 && self.pending(idx) == 0 => {
                self.unlink(n.key(), idx);
                self.nodes[idx as usize] = VACANT;
                while self.nodes.last().is_some_and(|n| !n.live()) {
                    self.nodes.pop();
                }
                // Give back the spare room of a table that shrank to a
                // quarter (a wave of unmerges).
                if self.nodes.len() * 4 < self.nodes.capacity() && self.nodes.capacity() > 1024 {
                    self.nodes.shrink_to(self.nodes.len() + self.nodes.len() / 32);
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
        self.nodes[idx as usize].key = U64Halves::new(key);
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

    /// Heap bytes: the node table, the key table and the side maps.
    pub fn metadata_bytes(&self) -> u64 {
        self.by_key.heap_bytes()
            + self.nodes.capacity() as u64 * std::mem::size_of::<StableNode>() as u64
            + self.pending.heap_bytes()
            + self.next.heap_bytes()
    }
}

/// Where an unstable-tree page lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageRef {
    pub region: u32,
    pub page: u32,
}

/// An unstable-tree slot: where the page is and 32 bits of its key. The
/// other 32 bits are not kept: a match of the tag only proposes a candidate,
/// whose bytes are compared before anything merges, so a rare tag collision
/// costs one comparison (or hides one candidate until the next scan), and a
/// slot is 12 bytes instead of 16.
#[derive(Debug, Clone, Copy, Default)]
struct UnstableSlot {
    tag: u32,
    at: PageRef,
}

const _: () = assert!(std::mem::size_of::<UnstableSlot>() == 12);

/// Pages seen unchanged for a full scan and not matched yet.
#[derive(Debug, Default)]
pub struct UnstableTree {
    map: SlimTable<UnstableSlot>,
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
            None => self.map.insert_unique(Self::hash(tag), slot, |s| Self::hash(s.tag)),
        }
    }
    pub fn remove(&mut self, key: u64) {
        let tag = Self::tag(key);
        self.map.remove(Self::hash(tag), |s| s.tag == tag, |s| Self::hash(s.tag));
    }
    /// Starts a new full scan. The table keeps room for as many pages as the
    /// last scan left in it, no more: once everything has merged, a table
    /// sized for the first scan's candidates would be dead weight.
    pub fn clear(&mut self) {
        let held = self.map.len();
        self.map.clear_keeping(held);
    }
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn metadata_bytes(&self) -> u64 {
        self.map.heap_bytes()
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

    #[test]
    fn node_packing_keeps_key_count_and_flags_apart() {
        let mut t = StableTree::default();
        let key = u64::MAX - 1;
        t.insert(key, 3, 1);
        t.commit(3);
        t.node_mut(3).unwrap().set_filled();
        // The most sharers a node counts.
        t.nodes[3].bits += MAX_SHARERS - 1;
        let n = *t.node(3).unwrap();
        assert_eq!((n.key(), n.sharers(), n.filled(), n.live()), (key, MAX_SHARERS, true, true));
        assert_eq!(t.reserve(key, u32::MAX), None, "no room past MAX_SHARERS, whatever max_page_sharing says");
        assert!(!t.release(3));
        assert_eq!(t.reserve(key, u32::MAX), Some(3));
        t.commit(3);
        let n = *t.node(3).unwrap();
        assert_eq!((n.key(), n.sharers(), n.filled(), n.live()), (key, MAX_SHARERS, true, true));
        t.nodes[3].bits -= MAX_SHARERS - 1;
        t.total_sharers = 1;
        assert!(t.release(3));
        assert!(t.is_empty() && t.node(3).is_none() && t.nodes.is_empty());
    }

    #[test]
    fn a_chain_longer_than_max_page_sharing_and_pending_past_u16() {
        let mut t = StableTree::default();
        let key = 0xfeed_f00d_dead_beef;
        // 300 store pages under one key, one sharer each (max_page_sharing 1).
        for idx in 0..300 {
            assert_eq!(t.reserve(key, 1), None);
            t.insert(key, idx, 1);
            t.commit(idx);
        }
        assert_eq!((t.chains(), t.dups(), t.pages_shared(), t.pages_sharing()), (1, 300, 300, 0));
        assert_eq!(t.chain(key).count(), 300);
        // With room for many sharers, one node takes 100_000 reservations in
        // a batch (past what a u16 held), and the batch settles.
        let mut got = Vec::new();
        for _ in 0..100_000 {
            got.push(t.reserve(key, 1 << 20).unwrap());
        }
        let first = got[0];
        assert!(got.iter().all(|&i| i == first));
        assert_eq!(t.pending(first), 100_000);
        for _ in 0..50_000 {
            t.commit(first);
        }
        for _ in 0..50_000 {
            assert!(!t.cancel(first));
        }
        assert_eq!(t.pending(first), 0);
        assert!(t.pending.0.capacity() <= SIDE_MAP_KEPT, "a settled batch leaves no big side map behind");
        assert_eq!(t.node(first).unwrap().sharers(), 50_001);
        assert_eq!((t.pages_shared(), t.pages_sharing()), (300, 50_000));
        // Unlinking from the middle and the ends keeps the rest of the chain.
        for idx in [150, 0, 299, 1] {
            if idx == first {
                continue;
            }
            assert!(t.release(idx));
        }
        let left = if [150, 0, 299, 1].contains(&first) { 297 } else { 296 };
        assert_eq!((t.chains(), t.dups(), t.chain(key).count() as u64), (1, left, left));
        for _ in 0..50_000 {
            assert!(!t.release(first));
        }
        for idx in 0..300 {
            t.release(idx);
        }
        assert!(t.is_empty() && t.chains() == 0 && t.dups() == 0 && t.sharers() == 0);
        assert!(t.next.0.capacity() <= SIDE_MAP_KEPT);
    }

    #[test]
    fn stable_metadata_stays_near_twelve_bytes_a_node_and_seven_a_key() {
        let mut t = StableTree::default();
        for n in 1..=40_000u32 {
            t.insert(u64::from(n).wrapping_mul(0x2545_f491_4f6c_dd1d), n - 1, 1);
            t.commit(n - 1);
            if n % 997 == 0 || n == 32_768 {
                let per = t.metadata_bytes() as f64 / f64::from(n);
                assert!(per <= 12.0 * 1.04 + 5.0 / 0.74 + 0.5, "{per} bytes a node at {n}");
            }
        }
    }
}
