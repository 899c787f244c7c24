//! Putting merged pages back: a range (`MADV_UNMERGEABLE`, `mprotect`,
//! unregistering), before the owner discards it, everything (`run=2`), and
//! what a stricter merge mode no longer allows.

use crate::digest::is_zero;
use crate::guest::PageCopy;
use crate::region::{PageRecord, PageState, Region, RegionState};
use crate::state::{each_live_region, Core, Shared};
use crate::sys::{mman, PAGE_SIZE};
use crate::tunables::MergeMode;
use crate::warn_once;

/// The program's own page inside a mapping twinpage put there.
fn written_overlay(rec: &PageRecord) -> bool {
    rec.flags() & PageRecord::OVERLAY != 0 && !matches!(rec.state(), PageState::Merged | PageState::Zero)
}

/// Unmerges pages `[from, to)` of a region: every page twinpage remapped
/// (merged, zero overlay) gets its content back in a mapping of the
/// region's own kind — anonymous memory, or the backing file mapped
/// privately — as if twinpage had never been there; merged pages leave the
/// trees. Returns whether all succeeded (a failed run falls back to private
/// copies inside the store mapping).
///
/// A page the program wrote inside such a mapping (a merged page the
/// kernel copied in place, `twinpage_cow_in_place`, or a zero overlay
/// written since) stays where it is, as the kernel's unmerge leaves a page
/// that is no longer a KSM page: it is the program's own page already, a
/// device may be writing into it (`O_DIRECT`), and no pin check reaches a
/// page of a file mapping, so a copy could lose that write. Nothing hands
/// out the store page under it again (`Core::written_in_place` retired
/// it): while the range is registered a discard restores the region's own
/// mapping first ([`restore_range`]), and once it is not, a discard reads
/// the page's own content from before the write, or zeros.
pub fn unmerge_range(sh: &Shared, region: &Region, st: &mut RegionState, core: &mut Core, from: usize, to: usize) -> bool {
    note_written_in_place(sh, region, st, core, from, to);
    let mut all_ok = true;
    let touched = |r: &PageRecord| (r.flags() & PageRecord::OVERLAY != 0 || r.state() == PageState::Merged) && !written_overlay(r);
    let mut i = from;
    while i < to {
        if !touched(&st.records[i]) {
            if st.records[i].state() == PageState::Zero {
                // Dropped to the zero page inside the owner's own mapping: it
                // already is what it would be without twinpage.
                core.drop_records(sh, &mut st.records[i..i + 1]);
            }
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < to && touched(&st.records[j]) {
            j += 1;
        }
        let ok = crate::merge::restore_with_content(sh, region, st, i, j);
        if !ok {
            all_ok = false;
            // Merged pages are write-protected for their first write: the
            // fault thread would wait for our lock.
            let _ = sh.uffd().unprotect(region.addr(i), (j - i) * PAGE_SIZE);
            // SAFETY: the run is in a live region we hold; populate-write gives
            // each page a private copy of the content it already shows.
            let res = unsafe { mman::madvise(region.addr(i), (j - i) * PAGE_SIZE, mman::MADV_POPULATE_WRITE) };
            if let Err(e) = res {
                warn_once!("unmerge", "twinpage: unmerge failed at {:#x}: {e}; pages stay merged", region.addr(i));
                i = j;
                continue;
            }
        }
        core.drop_records(sh, &mut st.records[i..j]);
        i = j;
    }
    all_ok
}

/// Merged pages of `[from, to)` that a write the scanner has not seen yet
/// copied in place are the program's pages from now on, as the scanner
/// would find them (`scan::walk`): the unmerge then leaves them too.
fn note_written_in_place(sh: &Shared, region: &Region, st: &mut RegionState, core: &mut Core, from: usize, to: usize) {
    let Some(first) = (from..to).find(|&i| st.records[i].state() == PageState::Merged) else { return };
    let mut entries = vec![crate::sys::pagemap::PageEntry::default(); to - first];
    if sh.pagemap().read(region.addr(first), &mut entries).is_err() {
        return;
    }
    for (rec, e) in st.records[first..to].iter_mut().zip(entries) {
        crate::merge::cow::note_written_in_place(sh, core, rec, e);
    }
}

/// Takes `[addr, end)` out of the registry (`region::take_range`): its
/// pages leave the counters, with `unmerge` their merged pages get their
/// content back in the region's own kind of mapping first and the range
/// leaves the userfaultfd, and their records' references are dropped
/// after `between` has run (the owner's unmap, for one).
pub(crate) fn remove_range(sh: &Shared, addr: usize, end: usize, unmerge: bool, between: impl FnOnce()) {
    let dropped = crate::region::take_range(sh.registry(), sh.core(), addr, end, |r, st, core, from, to| {
        if unmerge && !st.failed {
            unmerge_range(sh, r, st, core, from, to);
        }
        let removed = (to - from) as u64;
        core.records_gone(r.mergeability, removed);
        if unmerge {
            let _ = sh.uffd().unregister(r.addr(from), (to - from) * PAGE_SIZE);
        }
    });
    between();
    let mut core = sh.core().lock();
    for mut recs in dropped {
        core.drop_records(sh, &mut recs);
    }
    drop(core);
    crate::state::publish(sh);
}

/// Gives pages `[from, to)` back the mapping they had before twinpage touched
/// them (anonymous memory, or the backing file at its offset), dropping their
/// merges; used before the owner discards them. Content is not preserved:
/// the owner is about to discard it.
pub fn restore_range(sh: &Shared, region: &Region, st: &mut RegionState, core: &mut Core, from: usize, to: usize) {
    let overlaid = |r: &PageRecord| r.state() == PageState::Merged || r.flags() & PageRecord::OVERLAY != 0;
    let mut i = from;
    while i < to {
        if !overlaid(&st.records[i]) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < to && overlaid(&st.records[j]) {
            j += 1;
        }
        let (addr, bytes) = (region.addr(i), (j - i) * PAGE_SIZE);
        let (flags, fd, off) = region.original_mapping(addr);
        // SAFETY: pages of a live region we hold, about to be discarded by their
        // owner: mapping back the file (or fresh anonymous memory, which reads
        // as zeros) is what the discard shows.
        let res = unsafe { mman::raw_mmap(addr, bytes, region.prot, flags | libc::MAP_FIXED, fd, off) }.map(drop);
        match res {
            Ok(()) => {
                crate::merge::reapply_advice(region, addr, bytes);
                for rec in &mut st.records[i..j] {
                    rec.set_own_mapping();
                }
                core.drop_records(sh, &mut st.records[i..j]);
            }
            Err(e) => {
                // Without the remap the discard would expose store pages; break
                // sharing instead so they hold private copies.
                warn_once!("restore", "twinpage: cannot restore the mapping of discarded pages at {addr:#x}: {e}");
                unmerge_range(sh, region, st, core, i, j);
            }
        }
        i = j;
    }
}

/// `twinpage_merge_mode` became `mode`: unmerges every page the mode no
/// longer allows (under `off` all of them, as `run=2`; under `zero-only`
/// the merged pages whose content is not all zeros), because pages already
/// shared are exactly what the stricter mode is there to stop.
pub fn unmerge_disallowed(sh: &Shared, mode: MergeMode) {
    if mode == MergeMode::All {
        return;
    }
    if mode == MergeMode::Off {
        unmerge_all(sh);
        return;
    }
    let mut copy = PageCopy::new();
    each_live_region(sh, |r, st, core| {
        let mut disallowed = |st: &RegionState, i: usize| {
            st.records[i].state() == PageState::Merged && {
                // SAFETY: a page of a live region we hold locked; a merged page
                // is mapped (a remap keeps the region's protection).
                unsafe { copy.read(r, r.prot, r.addr(i)) }.is_ok_and(|page| !mode.allows(is_zero(page)))
            }
        };
        let mut i = 0;
        while i < r.pages {
            if !disallowed(st, i) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < r.pages && disallowed(st, j) {
                j += 1;
            }
            unmerge_range(sh, r, st, core, i, j);
            i = j;
        }
    });
}

/// `run=2`: unmerges every registered page and forgets what the scans
/// learnt (checksums, the unstable tree, smart_scan's back-off), as the
/// kernel's `run=2` removes every rmap_item. The next scan starts a pass at
/// the first region and `full_scans` counts from 0 again, as ksmd's
/// `seqnr` does, so that after `run=1` a program that waits for two full
/// scans has seen every page scanned twice (once to note its checksum, once
/// to merge it).
pub fn unmerge_all(sh: &Shared) {
    each_live_region(sh, |r, st, core| {
        unmerge_range(sh, r, st, core, 0, r.pages);
        for rec in st.records.iter_mut().filter(|rec| matches!(rec.state(), PageState::Hashed | PageState::None)) {
            core.forget_hashed(rec);
            rec.set_state(PageState::None);
            rec.set_age(0);
            rec.set_skips(0);
        }
    });
    sh.core().lock().restart_scanning();
}
