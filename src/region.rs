//! The region registry: ranges registered for merging, with one record per
//! page (the kernel's rmap_item, in 6 bytes).
//!
//! Protocol with unmap ([`take_range`], run by `tests/loom.rs`): the scanner holds a
//! region's lock for the whole of a batch on it, including merges; whoever
//! unregisters takes the same lock, marks the region dead and removes it from
//! the registry before the memory goes away. A scanner that finds a region
//! dead, or cannot find it, never touches its memory again.

use std::collections::BTreeMap;

use crate::maps::MappingKind;
use crate::primitive::{Arc, AtomicBool, AtomicU64, Mutex, Ordering, RwLock};
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

/// The per-page record: `key` is the checksum while `Hashed`, the store page
/// index while `Merged`. Six bytes (the kernel's rmap_item is 64): the key as
/// two halves so the record is 2-aligned, the state with the flags in one
/// byte, smart_scan's age and skips in the other (both small: the age only
/// matters up to 9 and saturates at 15, skips are at most 8).
#[derive(Debug, Clone, Copy, Default)]
pub struct PageRecord {
    key: [u16; 2],
    /// State in the low 2 bits, flags above.
    bits: u8,
    /// Age in the low 4 bits, skips in the high 4.
    smart: u8,
}

const _: () = assert!(std::mem::size_of::<PageRecord>() == 6);

const STATE_MASK: u8 = 0b11;
const AGE_MAX: u8 = 0x0f;

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
    /// `UFFDIO_MOVE` refused the page (`EBUSY`) even after the merge tried
    /// to make it exclusive (`merge::pin`): pinned, or a fork's share the
    /// merge could not undo. The next scan tries once more, unprotected
    /// (`MADV_POPULATE_WRITE`), which hides no pin: a page pinned for a
    /// device's write is exclusive already, and is reused, not copied.
    pub const UNSHARE: u8 = 1 << 5;
    const ALL_FLAGS: u8 = (1 << 6) - 1;

    pub fn key(&self) -> u32 {
        u32::from(self.key[0]) | u32::from(self.key[1]) << 16
    }
    pub fn set_key(&mut self, key: u32) {
        self.key = [key as u16, (key >> 16) as u16];
    }
    pub fn state(&self) -> PageState {
        match self.bits & STATE_MASK {
            0 => PageState::None,
            1 => PageState::Hashed,
            2 => PageState::Merged,
            _ => PageState::Zero,
        }
    }
    pub fn set_state(&mut self, state: PageState) {
        self.bits = (self.bits & !STATE_MASK) | state as u8;
    }
    pub fn flags(&self) -> u8 {
        self.bits >> 2
    }
    pub fn set_flags(&mut self, flags: u8) {
        debug_assert_eq!(flags & !Self::ALL_FLAGS, 0);
        self.bits = (self.bits & STATE_MASK) | (flags & Self::ALL_FLAGS) << 2;
    }
    pub fn add_flags(&mut self, flags: u8) {
        self.set_flags(self.flags() | flags);
    }
    pub fn clear_flags(&mut self, flags: u8) {
        self.set_flags(self.flags() & !flags);
    }
    /// A fresh mapping of the region's own kind now holds the page: no
    /// overlay any more, and not registered with userfaultfd yet.
    pub fn set_own_mapping(&mut self) {
        self.set_flags((self.flags() | Self::NEEDS_REGISTER) & !Self::OVERLAY);
    }
    /// smart_scan: how many scans this page went without merging (saturates
    /// at 15; the skip schedule is the same for every age from 9 on).
    pub fn age(&self) -> u8 {
        self.smart & AGE_MAX
    }
    pub fn set_age(&mut self, age: u8) {
        self.smart = (self.smart & !AGE_MAX) | age.min(AGE_MAX);
    }
    /// smart_scan: scans to skip before looking again (at most 15).
    pub fn skips(&self) -> u8 {
        self.smart >> 4
    }
    pub fn set_skips(&mut self, skips: u8) {
        debug_assert!(skips <= AGE_MAX);
        self.smart = (self.smart & AGE_MAX) | skips.min(AGE_MAX) << 4;
    }
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
    /// Merged pages given an anonymous copy for a first write whose writer
    /// may not have stored yet (`merge::cow`); see [`WriteInFlight`].
    pub(crate) writes_in_flight: Vec<WriteInFlight>,
}

/// A first write served by a copy (`merge::cow`): the writer was woken and
/// makes its store when it runs again. Until then the page holds what it
/// held merged, a state the kernel never shows (its copy-on-write fault
/// completes the write), and merging it again would put that store in the
/// window between the new store mapping and its protection, copied inside
/// the store mapping (merge.rs `written_before_guarded`): out of merging
/// for good. So the scanner leaves the page alone while its content is
/// unchanged and its writer has not run since it was woken (its CPU time
/// has not moved: a woken thread's first instructions in user mode are the
/// store it faulted on), for at most [`WriteInFlight::SETTLE`] (when the
/// fault did not name its thread). A store of the same bytes then merges
/// again in the next scan, as on the kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteInFlight {
    pub(crate) page: usize,
    /// The hash of the page's content when it was copied.
    pub(crate) hash: u64,
    pub(crate) since: std::time::Instant,
    /// The writer's thread id and its CPU time (ns) before it was woken.
    pub(crate) writer: Option<(i32, u64)>,
}

impl WriteInFlight {
    /// Longer than a writer stays off the CPU on a loaded machine.
    pub(crate) const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);
    /// Entries kept per region; the oldest go first.
    const MAX: usize = 64;

    /// Notes a first write at `page` served from content hashing to `hash`,
    /// by thread `writer` (read its CPU time before it is woken).
    pub(crate) fn note(list: &mut Vec<WriteInFlight>, page: usize, hash: u64, writer: Option<i32>) {
        list.retain(|w| w.page != page && w.since.elapsed() < Self::SETTLE);
        if list.len() >= Self::MAX {
            list.remove(0);
        }
        let writer = writer.and_then(|tid| Some((tid, crate::sys::thread::cpu_time_ns(tid)?)));
        list.push(WriteInFlight { page, hash, since: std::time::Instant::now(), writer });
    }

    /// Whether `page`, whose content hashes to `hash` now, still waits for
    /// its writer's store; forgets it once it does not.
    pub(crate) fn pending(list: &mut Vec<WriteInFlight>, page: usize, hash: u64) -> bool {
        let Some(k) = list.iter().position(|w| w.page == page) else { return false };
        let w = list[k];
        // A thread that is gone stores nothing any more.
        let ran = w.writer.is_some_and(|(tid, before)| crate::sys::thread::cpu_time_ns(tid).is_none_or(|now| now > before));
        if w.hash == hash && !ran && w.since.elapsed() < Self::SETTLE {
            return true;
        }
        list.swap_remove(k);
        false
    }
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
    /// Its number in the order of registration (`Registry::seq`), set as it
    /// enters the registry.
    seq: AtomicU64,
    /// The scanner's pass (`Core`'s count of passes) that last visited
    /// every page of it.
    scanned_in: AtomicU64,
    /// The program locked it (mlock, mlockall), as last seen: the pin
    /// check's scratch mapping must be locked alike for `UFFDIO_MOVE`.
    locked: AtomicBool,
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
            state: RwLock::new(RegionState { dead: false, records, failed: false, writes_in_flight: Vec::new() }),
            seq: AtomicU64::new(0),
            scanned_in: AtomicU64::new(0),
            locked: AtomicBool::new(false),
        }
    }

    /// Whether the program locked it, as last seen.
    pub fn locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }

    /// The program's lock on it, as seen now.
    pub fn set_locked(&self, locked: bool) {
        self.locked.store(locked, Ordering::Relaxed);
    }

    /// Its number in the order of registration.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// The last scanner pass that visited every page of it (0: none).
    pub fn scanned_in(&self) -> u64 {
        self.scanned_in.load(Ordering::Relaxed)
    }

    /// The scanner visited its last page in pass `pass`.
    pub fn set_scanned_in(&self, pass: u64) {
        self.scanned_in.store(pass, Ordering::Relaxed);
    }

    pub fn end(&self) -> usize {
        self.start + self.pages * PAGE_SIZE
    }

    /// Pages `[lo, hi)` of this region as a region of their own, with id
    /// `id` and the given records (what stays registered when the rest of a
    /// region goes).
    fn part(&self, id: u32, lo: usize, hi: usize, records: Vec<PageRecord>, failed: bool) -> Region {
        let mut n = Region::new(id, self.addr(lo), hi - lo, self.kind, self.mergeability, self.prot, records);
        n.dontfork = self.dontfork;
        n.dontdump = self.dontdump;
        n.backing = self.backing.clone();
        n.file_offset = self.file_offset + (lo * PAGE_SIZE) as u64;
        // What the scanner saw whole in this pass it need not see again.
        n.set_scanned_in(self.scanned_in());
        n.set_locked(self.locked());
        n.state.write().failed = failed;
        n
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

/// Runs `f` on region `id` under its write lock, if that lock is free and
/// the region alive: the scanner's way to a second region while it holds a
/// batch's. Never waiting is what keeps two batches that reach for each
/// other's region from deadlocking; the `dead` check is what keeps a region
/// that [`take_range`] took out (its memory about to be unmapped) from being
/// read. `tests/loom.rs` runs this very function.
pub fn with_region_if_free<R>(registry: &RwLock<Registry>, id: u32, f: impl FnOnce(&Region, &mut RegionState) -> R) -> Option<R> {
    let r = registry.read().get(id).cloned()?;
    let mut st = r.state.try_write()?;
    if st.dead {
        return None;
    }
    Some(f(&r, &mut st))
}

/// Takes `[addr, end)` out of `registry` before the memory goes away (or
/// stops being merged): each overlapping region, in address order and one
/// at a time, under its own lock and then `core` (the engine's lock order),
/// is given to `each` with the page range `[from, to)` that goes (to unmerge
/// it, count it), then marked dead and removed, and its parts outside the
/// range go back in as regions of their own with their records. Returns the
/// records of the pages taken out, by region. A thread here holds one region
/// lock at a time, so there is no lock-order cycle with the scanner, which
/// takes a second region only with `try_write`; and a scanner that finds a
/// region dead, or cannot find it, never touches its memory again
/// (`tests/loom.rs` runs this very function against a model of the scanner).
pub fn take_range<C>(
    registry: &RwLock<Registry>,
    core: &Mutex<C>,
    addr: usize,
    end: usize,
    mut each: impl FnMut(&Region, &mut RegionState, &mut C, usize, usize),
) -> Vec<Vec<PageRecord>> {
    let regions = registry.read().overlapping(addr, end);
    let mut taken = Vec::new();
    for r in &regions {
        let mut st = r.state.write();
        if st.dead {
            continue;
        }
        let from = (addr.max(r.start) - r.start) / PAGE_SIZE;
        let to = (end.min(r.end()) - r.start) / PAGE_SIZE;
        let mut c = core.lock();
        each(r, &mut st, &mut c, from, to);
        st.dead = true;
        let records = std::mem::take(&mut st.records);
        let mut reg = registry.write();
        reg.remove(r);
        for (lo, hi) in [(0, from), (to, r.pages)] {
            if lo < hi {
                let id = reg.next_id();
                reg.insert(Arc::new(r.part(id, lo, hi, records[lo..hi].to_vec(), st.failed)));
            }
        }
        taken.push(records[from..to].to_vec());
    }
    taken
}

/// All registered regions, by start address and by id.
#[derive(Debug, Default)]
pub struct Registry {
    by_start: BTreeMap<usize, Arc<Region>>,
    by_id: BTreeMap<u32, Arc<Region>>,
    next_id: u32,
    /// Regions inserted so far.
    seq: u64,
}

impl Registry {
    /// An id no live region has. Ids wrap after 2^32 registrations (a
    /// merge-any program that maps and unmaps all day gets there); one
    /// taken by a region still registered (guest RAM, registered at
    /// start) is passed over, or the two would share an entry in `by_id`.
    pub fn next_id(&mut self) -> u32 {
        loop {
            self.next_id = self.next_id.wrapping_add(1);
            if self.next_id != 0 && !self.by_id.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }

    pub fn insert(&mut self, r: Arc<Region>) {
        self.seq += 1;
        r.seq.store(self.seq, Ordering::Relaxed);
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

    /// The region `addr` is in, if any.
    pub fn containing(&self, addr: usize) -> Option<&Arc<Region>> {
        self.by_start.range(..=addr).next_back().map(|(_, r)| r).filter(|r| r.end() > addr)
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

    /// Regions inserted so far: a region with a `seq` up to this one was
    /// registered when it was read.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Where the scanner's pass `pass` goes on from `from` (None: the pass
    /// has not begun): the first region at or after it not yet visited
    /// whole in this pass; past the last, the lowest such region registered
    /// up to `mark` (memory marked mergeable behind the cursor, which a
    /// program that read `full_scans` since expects the pass to cover);
    /// None when the pass is over.
    pub fn next_to_scan(&self, from: Option<usize>, pass: u64, mark: u64) -> Option<&Arc<Region>> {
        let unvisited = |r: &&Arc<Region>| r.scanned_in() != pass;
        self.by_start
            .range(from.unwrap_or(0)..)
            .map(|(_, r)| r)
            .find(unvisited)
            .or_else(|| self.by_start.values().find(|r| unvisited(r) && r.seq() <= mark))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_fields_keep_their_values_and_leave_each_other_alone() {
        let all = PageRecord::NEEDS_REGISTER | PageRecord::OVERLAY | PageRecord::REMOTE | PageRecord::ORPHAN | PageRecord::LAST_LINK;
        for state in [PageState::None, PageState::Hashed, PageState::Merged, PageState::Zero] {
            for key in [0, 1, 0xffff, 0x1_0000, 0xdead_beef, u32::MAX] {
                let mut r = PageRecord::default();
                r.set_key(key);
                r.set_state(state);
                r.set_flags(all);
                r.set_age(200);
                r.set_skips(8);
                assert_eq!((r.key(), r.state(), r.flags(), r.age(), r.skips()), (key, state, all, 15, 8));
                r.clear_flags(PageRecord::OVERLAY);
                r.set_age(0);
                assert_eq!((r.key(), r.state(), r.flags(), r.age(), r.skips()), (key, state, all & !PageRecord::OVERLAY, 0, 8));
                r.set_skips(0);
                r.set_flags(0);
                r.add_flags(PageRecord::LAST_LINK);
                assert_eq!((r.key(), r.state(), r.flags(), r.age(), r.skips()), (key, state, PageRecord::LAST_LINK, 0, 0));
            }
        }
    }

    /// A pass walks up from its cursor over regions it has not visited
    /// whole; past the last, it goes back for those registered up to the
    /// read mark, and leaves later ones to the next pass.
    #[test]
    fn a_pass_goes_back_for_regions_registered_behind_it_before_the_mark() {
        let mut reg = Registry::default();
        let mk = |reg: &mut Registry, start: usize| {
            let id = reg.next_id();
            let r = Arc::new(Region::new(id, start, 1, MappingKind::Anon, Mergeability::Mergeable, 0, vec![PageRecord::default()]));
            reg.insert(r.clone());
            r
        };
        let (a, c) = (mk(&mut reg, 0x10_000), mk(&mut reg, 0x30_000));
        let pass = 1;
        let next = |reg: &Registry, from, mark| reg.next_to_scan(from, pass, mark).map(|r| r.start);
        assert_eq!(next(&reg, None, 0), Some(a.start));
        a.set_scanned_in(pass);
        assert_eq!(next(&reg, Some(a.start), 0), Some(c.start));
        // Registered behind the cursor, now in `c`.
        let b = mk(&mut reg, 0x20_000);
        assert_eq!(next(&reg, Some(c.start), reg.seq()), Some(c.start));
        c.set_scanned_in(pass);
        assert_eq!(next(&reg, Some(c.start), b.seq() - 1), None, "registered after the mark: the next pass's");
        assert_eq!(next(&reg, Some(c.start), b.seq()), Some(b.start));
        b.set_scanned_in(pass);
        assert_eq!(next(&reg, Some(b.start), reg.seq()), None);
        // A part of a region visited whole in this pass is visited too.
        let part = b.part(reg.next_id(), 0, 1, vec![PageRecord::default()], false);
        assert_eq!(part.scanned_in(), pass);
    }

    #[test]
    fn a_write_in_flight_holds_its_page_while_the_content_is_unchanged_only() {
        let mut list = Vec::new();
        WriteInFlight::note(&mut list, 3, 0xaa, None);
        WriteInFlight::note(&mut list, 5, 0xbb, None);
        assert!(WriteInFlight::pending(&mut list, 3, 0xaa), "unchanged: the writer has not stored");
        assert!(!WriteInFlight::pending(&mut list, 7, 0xaa), "never copied");
        assert!(!WriteInFlight::pending(&mut list, 3, 0xcc), "changed: the store landed");
        assert!(!WriteInFlight::pending(&mut list, 3, 0xaa), "forgotten once it landed");
        list[0].since -= WriteInFlight::SETTLE;
        assert!(!WriteInFlight::pending(&mut list, 5, 0xbb), "held at most SETTLE");
        assert!(list.is_empty());
        for page in 0..2 * WriteInFlight::MAX {
            WriteInFlight::note(&mut list, page, 1, None);
        }
        assert_eq!(list.len(), WriteInFlight::MAX, "bounded");
        assert!(WriteInFlight::pending(&mut list, 2 * WriteInFlight::MAX - 1, 1), "the newest kept");
    }

    /// With the writer named, its page is held only until the writer has
    /// run: then its store has been made (same bytes, here), or the
    /// writer is gone and makes none.
    #[test]
    fn a_write_in_flight_holds_its_page_until_its_writer_ran() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            // SAFETY: gettid(2) takes no arguments and cannot fail.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = wait.recv();
            let end = std::time::Instant::now() + std::time::Duration::from_millis(5);
            while std::time::Instant::now() < end {
                std::hint::spin_loop();
            }
            let _ = wait.recv();
        });
        let tid = rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut list = Vec::new();
        WriteInFlight::note(&mut list, 3, 0xaa, Some(tid));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(WriteInFlight::pending(&mut list, 3, 0xaa), "the writer has not run");
        go.send(()).unwrap();
        let released = (0..5000).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            !WriteInFlight::pending(&mut list, 3, 0xaa)
        });
        assert!(released, "held after its writer ran");
        assert!(list.is_empty());
        WriteInFlight::note(&mut list, 4, 0xbb, Some(tid));
        drop(go);
        writer.join().unwrap();
        let released = (0..5000).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            !WriteInFlight::pending(&mut list, 4, 0xbb)
        });
        assert!(released, "held after its writer exited");
    }

    /// Ids wrap around the ones still in use.
    #[test]
    fn ids_wrap_around_live_regions() {
        let mut reg = Registry::default();
        let add = |reg: &mut Registry, start: usize| {
            let id = reg.next_id();
            reg.insert(Arc::new(Region::new(id, start, 1, MappingKind::Anon, Mergeability::Mergeable, 0, vec![PageRecord::default()])));
            id
        };
        assert_eq!((add(&mut reg, 0x1000), add(&mut reg, 0x2000)), (1, 2));
        reg.next_id = u32::MAX - 1;
        assert_eq!(add(&mut reg, 0x3000), u32::MAX);
        assert_eq!(add(&mut reg, 0x4000), 3, "0 is never an id; 1 and 2 are live");
        assert_eq!(reg.get(1).map(|r| r.start), Some(0x1000));
    }
}
