//! The first write to a merged page.
//!
//! A merged page is a store page mapped privately. Left to the kernel, its
//! first write would be a copy-on-write inside that file mapping, and a page
//! there is out of the pin check's reach for good (`UFFDIO_MOVE` moves only
//! pages of anonymous mappings): it could never merge again safely. So store
//! stretches are write-protected with userfaultfd when they are mapped, and
//! on the write fault the fault thread moves a private anonymous copy of the
//! page over it (a page of a small pre-faulted pool, [`CowPool`], or else a
//! fresh mapping, filled while every writer waits, then `mremap`ed into
//! place in one step) before it wakes the writer. A reader
//! sees the page's content at every instant: the store page, then the copy.
//! The written page then lives in an anonymous mapping, where the next merge
//! checks it like any other.
//!
//! The fault thread needs the region's lock for this. While a batch holds
//! it, the fault waits its turn (the writer stays blocked) for at most
//! [`MAX_WAIT`]; past that the kernel makes the copy in place as before: the
//! writer goes on, and the scan passes that page over from then on
//! (`pin::may_merge`), so a page nobody can check never merges.

use std::time::Duration;

use crate::region::{PageRecord, PageState};
use crate::state::{Core, Shared};
use crate::sys::PAGE_SIZE;
use crate::warn_once;

/// How long one attempt waits for the region's lock: short, so that other
/// faults are not held up behind it.
const LOCK_WAIT: Duration = Duration::from_millis(2);

/// How long a writer may wait in all for the region's lock before the
/// kernel's copy-on-write takes over: a scan batch holds it for a few
/// milliseconds, a batch talking to a stalled daemon up to its timeout.
pub(crate) const MAX_WAIT: Duration = Duration::from_millis(200);

/// Pre-faulted private anonymous pages the fault thread builds first-write
/// copies in, so that the writer's wait holds no `mmap` and no page fault
/// of a fresh mapping. Pages go from the top: moving one away (`mremap`) or
/// unmapping it shrinks the pool's mapping instead of splitting it, so the
/// pool costs one mapping. Owned by the fault thread; refilled after a
/// writer was woken, never while one waits (but for the first). Eight
/// pages: a refill (faulting them in) delays the next fault of a burst by
/// a few µs; with 64 the p50 was the same and the p99 twice as high.
#[derive(Debug, Default)]
pub(crate) struct CowPool {
    base: usize,
    left: usize,
    /// The pool's whole range, listed as twinpage's own until the next
    /// refill: a page taken is in it until it has moved into place.
    own: Option<crate::own::OwnMemory>,
    /// Where a written page's content is read to hash it.
    copy: Option<crate::guest::PageCopy>,
}

impl CowPool {
    const PAGES: usize = 8;

    /// Maps and faults in a new pool when this one is used up.
    pub(crate) fn refill(&mut self) {
        if self.left > 0 {
            return;
        }
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        // SAFETY: a fresh mapping at an address the kernel picks.
        match unsafe { crate::sys::mman::raw_mmap(0, Self::PAGES * PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) } {
            Ok(base) => {
                self.own = Some(crate::own::OwnMemory::add(base, base + Self::PAGES * PAGE_SIZE));
                (self.base, self.left) = (base, Self::PAGES);
            }
            Err(e) => warn_once!("cow-pool", "twinpage: cannot map pages for first writes ({e}); each gets a fresh mapping"),
        }
    }

    /// The top page, given up by the pool: the caller moves it away or
    /// unmaps it. None when the pool is empty and cannot be refilled.
    fn take(&mut self) -> Option<usize> {
        self.refill();
        self.left = self.left.checked_sub(1)?;
        Some(self.base + self.left * PAGE_SIZE)
    }
}

impl Drop for CowPool {
    fn drop(&mut self) {
        if self.left > 0 {
            // SAFETY: the pool's own pages, never handed out.
            let _ = unsafe { crate::sys::mman::raw_munmap(self.base, self.left * PAGE_SIZE) };
        }
    }
}

/// What became of a write fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FirstWrite {
    /// The page has its anonymous copy and the writer was woken.
    Done,
    /// Not a merged page of an anonymous region, or the copy failed: the
    /// caller releases the fault as any other.
    NotMine,
    /// The region is locked: try again (until [`MAX_WAIT`]).
    Busy,
}

/// Resolves a write fault at `page` on a merged page of an anonymous region
/// by moving an anonymous copy of it into place, and wakes the writer
/// (thread `writer`, if the fault named it).
pub(crate) fn first_write(sh: &Shared, page: usize, writer: Option<i32>, pool: &mut CowPool) -> FirstWrite {
    use FirstWrite::{Busy, Done, NotMine};
    let Some(region) = sh.registry().read().containing(page).cloned() else { return NotMine };
    if region.kind != crate::maps::MappingKind::Anon {
        return NotMine;
    }
    let Some(mut st) = region.state.try_write_for(LOCK_WAIT) else { return Busy };
    if st.dead {
        return NotMine;
    }
    let idx = (page - region.start) / PAGE_SIZE;
    let rec = st.records[idx];
    if rec.state() != PageState::Merged || rec.flags() & PageRecord::OVERLAY == 0 {
        return NotMine;
    }
    // Still the store page, or not faulted in since it was mapped, or a
    // copy the kernel made in place under the protection (a write to a
    // page never touched since the remap copies before it asks us, and the
    // copy keeps the protection): nobody can have written or write-pinned
    // any of these. A copy without the protection was written already and
    // may be pinned: not ours to copy.
    let mut e = [crate::sys::pagemap::PageEntry::default()];
    if sh.pagemap().read(page, &mut e).is_err() || !still_store_content(e[0]) {
        return NotMine;
    }
    let mut core = sh.core().lock();
    // The copy splits the store stretch: up to two more mappings.
    if !core.allow_mappings(2, 0) {
        return NotMine;
    }
    // SAFETY: `page` is a merged page of a region we hold (`st`), mapped
    // and readable.
    let hash = unsafe { pool.copy.get_or_insert_with(crate::guest::PageCopy::new).read(&*st, region.prot, page) }
        .map(crate::digest::page_hash)
        .ok();
    let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
    // `page` is a merged page of a region we hold: mapped, readable, and
    // write-protected, so every writer waits while it is copied; no Rust
    // reference points into it.
    let copied = match pool.take() {
        // SAFETY: as above; `tmp` is a private anonymous page, as a fresh
        // mapping's would be, that the pool gave up.
        Some(tmp) => unsafe { super::copy_into_and_move(page, tmp, page, PAGE_SIZE, region.prot) },
        // SAFETY: as above.
        None => unsafe { super::copy_over(page, page, PAGE_SIZE, region.prot, anon) },
    };
    if let Err(e) = copied {
        warn_once!("cow-copy", "twinpage: cannot give the written page at {page:#x} an anonymous copy: {e}; the kernel copies it");
        return NotMine;
    }
    super::reapply_advice(&region, page, PAGE_SIZE);
    core.written_by_copy(sh, &mut st.records[idx]);
    if let Some(hash) = hash {
        crate::region::WriteInFlight::note(&mut st.writes_in_flight, idx, hash, writer);
    }
    drop(core);
    drop(st);
    crate::testhook::first_write_copied(page);
    if let Err(e) = sh.uffd().wake(page, PAGE_SIZE) {
        warn_once!("cow-wake", "twinpage: wake after a first write failed at {page:#x}: {e}");
    }
    pool.refill();
    Done
}

/// A merged page whose entry `e` shows a write the kernel copied inside the
/// store mapping (this module could not step in) is the program's page from
/// now on: counted and released ([`Core::written_in_place`]). Whether it was.
pub(crate) fn note_written_in_place(sh: &Shared, core: &mut Core, rec: &mut PageRecord, e: crate::sys::pagemap::PageEntry) -> bool {
    let written = rec.state() == PageState::Merged && !still_store_content(e);
    if written {
        core.written_in_place(sh, rec);
    }
    written
}

/// Whether a merged page's page table entry still shows the store page's
/// content, unwritten: the store page itself, nothing yet (it reads the store
/// page), or the kernel's copy under the write-protection. The kernel makes
/// that copy when a page untouched since the remap is first written: its
/// entry is a write-protect marker, and a write there copies the file page
/// and keeps the protection before the write itself faults to us.
fn still_store_content(e: crate::sys::pagemap::PageEntry) -> bool {
    !e.present() || e.file() || e.uffd_wp()
}
