//! The region registry: ranges registered for merging, with one record per
//! page (the kernel's rmap_item, in 8 bytes).
//!
//! Protocol with unmap (modelled in `tests/loom.rs`): the scanner holds a
//! region's lock for the whole of a batch on it, including merges; whoever
//! unregisters takes the same lock, marks the region dead and removes it from
//! the registry before the memory goes away. A scanner that finds a region
//! dead, or cannot find it, never touches its memory again.

use std::collections::BTreeMap;

use crate::maps::MappingKind;
use crate::primitive::{Arc, RwLock};
use crate::sys::PAGE_SIZE;

/// Per-page state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum PageState {
    /// Not looked at yet, or not a present anonymous page.
    #[default]
    None = 0,
    /// Checksum recorded (in `key`); waits for it to stay the same for a scan.
    Hashed,
    /// Maps store page `key`.
    Merged,
    /// Dropped to the kernel's zero page.
    Zero,
}

/// The per-page record. `key` is the checksum while `Hashed`, the store page
/// index while `Merged`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PageRecord {
    pub key: u32,
    pub state: PageState,
    /// smart_scan: how many scans this page went without merging.
    pub age: u8,
    /// smart_scan: scans to skip before looking again.
    pub skips: u8,
    pub flags: u8,
}

const _: () = assert!(std::mem::size_of::<PageRecord>() == 8);

impl PageRecord {
    /// The page sits in a mapping twinpage made (a store or zero overlay), which
    /// is not registered with userfaultfd until it is merged again.
    pub const NEEDS_REGISTER: u8 = 1 << 0;
    /// The page sits in a mapping twinpage put there (store or zero overlay),
    /// not the owner's: before the owner may see the range as its own again
    /// (unregister, discard), the original kind of mapping is restored.
    pub const OVERLAY: u8 = 1 << 1;
    /// A `Merged` page's store page is the daemon's (`key` indexes its store),
    /// merged over the current connection.
    pub const REMOTE: u8 = 1 << 2;
    /// A `Merged` page maps a store page of a daemon this process is no longer
    /// connected to: the page stays merged (the memfd lives while mapped) but
    /// no broker counts it any more.
    pub const ORPHAN: u8 = 1 << 3;
    /// With ORPHAN: merged over the link that broke last. When the same
    /// daemon takes the link's references over on reconnect (`Resume`), the
    /// page is REMOTE again and its release reaches the broker.
    pub const LAST_LINK: u8 = 1 << 4;
}

/// What the scanner may do in a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mergeability {
    /// Write-protect works: pages merge.
    Mergeable,
    /// Scanned and reported, never merged (e.g. a private mapping of a disk file).
    ScanOnly,
}

/// Mutable part of a region, under its lock.
#[derive(Debug, Default)]
pub struct RegionState {
    /// Set under the lock by whoever unregisters; the memory may be gone after.
    pub dead: bool,
    pub records: Vec<PageRecord>,
    /// An internal error stopped merging here (logged once).
    pub failed: bool,
}

/// A registered range: one mapping kind, page-aligned.
#[derive(Debug)]
pub struct Region {
    pub id: u32,
    pub start: usize,
    pub pages: usize,
    pub kind: MappingKind,
    pub mergeability: Mergeability,
    pub prot: libc::c_int,
    pub dontfork: bool,
    pub dontdump: bool,
    /// For a private file mapping: the file and the offset of `start` in it,
    /// to map back what a discarded page shows without twinpage.
    pub backing: Option<Arc<std::fs::File>>,
    pub file_offset: u64,
    pub state: RwLock<RegionState>,
}

impl Region {
    pub fn new(
        id: u32,
        start: usize,
        pages: usize,
        kind: MappingKind,
        mergeability: Mergeability,
        prot: libc::c_int,
        records: Vec<PageRecord>,
    ) -> Self {
        debug_assert_eq!(records.len(), pages);
        Self {
            id,
            start,
            pages,
            kind,
            mergeability,
            prot,
            dontfork: false,
            dontdump: false,
            backing: None,
            file_offset: 0,
            state: RwLock::new(RegionState { dead: false, records, failed: false }),
        }
    }

    pub fn end(&self) -> usize {
        self.start + self.pages * PAGE_SIZE
    }

    pub fn addr(&self, idx: usize) -> usize {
        self.start + idx * PAGE_SIZE
    }

    /// How `addr` in this region was mapped before twinpage touched it, as
    /// mmap flags, fd and offset: the backing file for a private file
    /// mapping, anonymous memory otherwise.
    pub fn original_mapping(&self, addr: usize) -> (libc::c_int, libc::c_int, libc::off_t) {
        use std::os::fd::AsRawFd;
        match (&self.backing, self.kind) {
            (Some(f), MappingKind::PrivateFile) => {
                (libc::MAP_PRIVATE, f.as_raw_fd(), (self.file_offset + (addr - self.start) as u64) as libc::off_t)
            }
            _ => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0),
        }
    }
}

/// All registered regions, by start address and by id.
#[derive(Debug, Default)]
pub struct Registry {
    by_start: BTreeMap<usize, Arc<Region>>,
    by_id: BTreeMap<u32, Arc<Region>>,
    next_id: u32,
}

impl Registry {
    pub fn next_id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    pub fn insert(&mut self, r: Arc<Region>) {
        self.by_id.insert(r.id, r.clone());
        self.by_start.insert(r.start, r);
    }

    pub fn remove(&mut self, r: &Region) {
        self.by_id.remove(&r.id);
        self.by_start.remove(&r.start);
    }

    pub fn get(&self, id: u32) -> Option<&Arc<Region>> {
        self.by_id.get(&id)
    }

    /// Regions overlapping `[start, end)`.
    pub fn overlapping(&self, start: usize, end: usize) -> Vec<Arc<Region>> {
        let mut out = Vec::new();
        if let Some((_, r)) = self.by_start.range(..=start).next_back() {
            if r.end() > start {
                out.push(r.clone());
            }
        }
        for (_, r) in self.by_start.range(start..end) {
            if r.start != start || out.last().is_none_or(|l| l.start != r.start) {
                out.push(r.clone());
            }
        }
        out.dedup_by_key(|r| r.id);
        out
    }

    /// Whether any region overlaps `[start, end)`, without allocating (the
    /// interposers ask on every mmap, munmap and mprotect). Regions never
    /// overlap each other, so only the last one starting before `end` can.
    pub fn overlaps(&self, start: usize, end: usize) -> bool {
        self.by_start.range(..end).next_back().is_some_and(|(_, r)| r.end() > start)
    }

    /// The first region whose start is at or after `addr`, wrapping to the
    /// lowest region; the scanner's cursor walks with it.
    pub fn at_or_after(&self, addr: usize) -> Option<&Arc<Region>> {
        self.by_start.range(addr..).next().map(|(_, r)| r)
    }

    pub fn first(&self) -> Option<&Arc<Region>> {
        self.by_start.values().next()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Region>> {
        self.by_start.values()
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }
}
