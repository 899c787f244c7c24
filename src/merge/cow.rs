//! The first write to a merged page.
//!
//! A merged page is a store page mapped privately. Left to the kernel, its
//! first write would be a copy-on-write inside that file mapping, and a page
//! there is out of the pin check's reach for good (`UFFDIO_MOVE` moves only
//! pages of anonymous mappings): it could never merge again safely. So store
//! stretches are write-protected with userfaultfd when they are mapped, and
//! on the write fault the fault thread moves a private anonymous copy of the
//! page over it (a fresh mapping filled while every writer waits, then
//! `mremap`ed into place in one step) before it wakes the writer. A reader
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
use crate::state::{Shared, Tally};
use crate::sys::PAGE_SIZE;
use crate::warn_once;

/// How long one attempt waits for the region's lock: short, so that other
/// faults are not held up behind it.
const LOCK_WAIT: Duration = Duration::from_millis(2);

/// How long a writer may wait in all for the region's lock before the
/// kernel's copy-on-write takes over: a scan batch holds it for a few
/// milliseconds, a batch talking to a stalled daemon up to its timeout.
pub(crate) const MAX_WAIT: Duration = Duration::from_millis(200);

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
/// by moving an anonymous copy of it into place, and wakes the writer.
pub(crate) fn first_write(sh: &Shared, page: usize) -> FirstWrite {
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
    let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
    // SAFETY: `page` is a merged page of a region we hold: mapped, readable,
    // and write-protected, so every writer waits while it is copied; no Rust
    // reference points into it.
    if let Err(e) = unsafe { super::copy_over(page, page, PAGE_SIZE, region.prot, anon) } {
        warn_once!("cow-copy", "twinpage: cannot give the written page at {page:#x} an anonymous copy: {e}; the kernel copies it");
        return NotMine;
    }
    super::reapply_advice(&region, page, PAGE_SIZE);
    let rec = &mut st.records[idx];
    core.release_record(sh, rec);
    rec.set_state(PageState::None);
    rec.set_age(0);
    rec.set_own_mapping();
    core.tally(Tally::CowBreak, 1);
    core.tally(Tally::Activity, 1);
    drop(core);
    drop(st);
    if let Err(e) = sh.uffd().wake(page, PAGE_SIZE) {
        warn_once!("cow-wake", "twinpage: wake after a first write failed at {page:#x}: {e}");
    }
    Done
}

/// Whether a merged page's page table entry still shows the store page's
/// content, unwritten: the store page itself, nothing yet (it reads the store
/// page), or the kernel's copy under the write-protection. The kernel makes
/// that copy when a page untouched since the remap is first written: its
/// entry is a write-protect marker, and a write there copies the file page
/// and keeps the protection before the write itself faults to us.
pub(crate) fn still_store_content(e: crate::sys::pagemap::PageEntry) -> bool {
    !e.present() || e.file() || e.uffd_wp()
}
