//! The scanner: walks registered pages `pages_to_scan` per wake, in the
//! kernel's order, a batch at a time under the region's lock. It keeps the
//! per-page rules every decider shares (a merged page written, a zero page
//! gone, pages that are not anonymous, the merge mode, the pin rules, smart
//! scan), offers the rest to the batch's decider (`decide`: in process by
//! the kernel's trees, `local`, or by twinpaged's broker, `remote`) and
//! merges its decisions run by run, so that consecutive pages cost one remap.

use crate::digest::{is_zero, page_hash, zero_hash};
use crate::guest::PageCopy;
use crate::merge::{self, Item, RunKind};
use crate::primitive::Arc;
use crate::region::{Mergeability, PageRecord, PageState, Region, RegionState};
use crate::state::{each_live_region, Core, Shared, Tally};
use crate::sys::pagemap::PageEntry;
use crate::sys::{mman, PAGE_SIZE};
use crate::tunables::MergeMode;
use crate::warn_once;
use decide::{Batch, Decide, Decisions, Offer};

pub(crate) mod decide;
pub(crate) mod local;
pub mod remote;

/// Pages handled under one region lock.
pub const BATCH_PAGES: usize = 512;

/// smart_scan, as the kernel's should_skip_rmap_item: a page that keeps not
/// merging is looked at less and less often (every 2nd, 3rd, 5th, 9th scan).
fn should_skip(rec: &mut PageRecord) -> bool {
    let age = rec.age();
    rec.set_age(age.saturating_add(1));
    if age < 3 {
        return false;
    }
    if rec.skips() == 0 {
        rec.set_skips(match age {
            0..=3 => 1,
            4..=5 => 2,
            6..=8 => 4,
            _ => 8,
        });
        return false;
    }
    rec.set_skips(rec.skips() - 1);
    true
}

/// Scans up to `budget` pages; returns how many it visited.
pub fn scan_pages(sh: &Shared, budget: usize) -> usize {
    let mut left = budget;
    let mut visited = 0;
    let mut empty_wraps = 0;
    while left > 0 {
        // A write of `run` (2: everything unmerged, full_scans back at 0, as
        // the write returns) ends the scan at the next batch; otherwise a
        // call that wraps a small region many times would merge again and
        // count full scans after the unmerge.
        if sh.tunables().run() != 1 {
            break;
        }
        let at = sh.core().lock().scan_point();
        let (next, empty) = {
            let reg = sh.registry().read();
            (at.ask(&reg), reg.is_empty())
        };
        let (region, cursor) = {
            let mut core = sh.core().lock();
            match core.go_on(at, next) {
                Err(_) => continue,
                Ok(Some(found)) => found,
                Ok(None) => {
                    if core.cursor().fresh {
                        core.rewind();
                    } else {
                        core.end_full_scan(sh);
                    }
                    empty_wraps += 1;
                    if empty || empty_wraps > 2 {
                        return visited;
                    }
                    continue;
                }
            }
        };
        if cursor.page >= region.pages {
            sh.core().lock().region_scanned(&region);
            continue;
        }
        empty_wraps = 0;
        let n = left.min(BATCH_PAGES).min(region.pages - cursor.page);
        {
            let mut st = region.state.write();
            let mut core = sh.core().lock();
            // Again under the region's lock: a `run=2` written after the check
            // above has unmerged this region while we waited for the lock,
            // and under twinpaged the daemon would order its pages joined
            // again at once (its store pages stay until the releases reach it).
            if sh.tunables().run() != 1 {
                break;
            }
            if !st.dead {
                scan_batch(sh, &region, &mut st, &mut core, cursor.page, n);
            }
            core.set_cursor_page(cursor.page + n);
            drop(core);
            // A first write may be waiting for this region (`merge::cow`).
            crate::primitive::unlock_fair(st);
        }
        visited += n;
        left -= n;
    }
    visited
}

fn scan_batch(sh: &Shared, region: &Arc<Region>, st: &mut RegionState, core: &mut Core, first: usize, n: usize) {
    // Zero pages of anonymous memory always drop to the kernel's zero page,
    // whatever `use_zero_pages`: it costs no mapping, where merging them into
    // one store page (the kernel's use_zero_pages=0 behaviour) costs a mapping
    // per scattered zero page against vm.max_map_count. Counted in
    // `ksm_zero_pages`, as the kernel counts its use_zero_pages=1 merges.
    let use_zero = sh.tunables().use_zero_pages() || region.kind == crate::maps::MappingKind::Anon;
    let b = Batch { sh, region, first, n, use_zero };
    let d = if core.link().is_some() {
        walk(&b, st, core, remote::Remote::default())
    } else {
        let local = local::Local::new(sh.tunables().max_page_sharing());
        walk(&b, st, core, local)
    };
    if let Some(d) = d {
        execute(sh, region, st, core, d);
    }
}

/// Walks the batch `b`, offering `decider` every page that passed the
/// scanner's checks; its decisions, or None if pagemap could not be read.
fn walk(b: &Batch<'_>, st: &mut RegionState, core: &mut Core, mut decider: impl Decide) -> Option<Decisions> {
    let (sh, region, first) = (b.sh, b.region, b.first);
    let mut entries = vec![PageEntry::default(); b.n];
    if let Err(e) = sh.pagemap().read(region.addr(first), &mut entries) {
        warn_once!("pagemap", "twinpage: cannot read pagemap: {e}");
        return None;
    }
    let mergeable = region.mergeability == Mergeability::Mergeable && !st.failed;
    let smart = sh.tunables().smart_scan();
    let zh = zero_hash();
    let mode = sh.tunables().merge_mode();
    core.merging_under(mode);
    let mut copy = PageCopy::new();

    for (i, &e) in entries.iter().enumerate() {
        let idx = first + i;
        core.tally(Tally::Scanned, 1);
        let rec = &mut st.records[idx];
        match rec.state() {
            // Skipped unless a write broke the sharing and the kernel made
            // the copy inside the store mapping (`merge::cow` could not).
            PageState::Merged if !crate::merge::cow::note_written_in_place(sh, core, rec, e) => continue,
            PageState::Merged => {}
            PageState::Zero => {
                if e.present() && (e.exclusive() || e.file()) {
                    core.zero_gone(rec);
                    rec.set_state(PageState::None);
                    core.tally(Tally::Activity, 1);
                } else {
                    continue;
                }
            }
            _ => {}
        }
        let rec = &mut st.records[idx];
        if !e.anon() || e.swapped() {
            core.forget_hashed(rec);
            rec.set_state(PageState::None);
            continue;
        }
        if !mergeable || mode == MergeMode::Off {
            continue;
        }
        // A device may be writing into a page no pin check can cover: it is
        // never proposed, so it neither joins a store page nor becomes one.
        if !crate::merge::pin::may_merge(sh, region, rec) {
            core.forget_hashed(rec);
            rec.set_state(PageState::None);
            core.tally(Tally::Uncheckable, 1);
            crate::merge::pin::note_uncheckable(sh, region);
            continue;
        }
        if rec.flags() & PageRecord::UNSHARE != 0 {
            rec.clear_flags(PageRecord::UNSHARE);
            // Not under write-protection (only a merge, which holds this
            // lock, protects an anonymous page): the populate cannot wait on
            // our own fault thread.
            if e.present() && !e.uffd_wp() {
                // SAFETY: a page of a region we hold; populate-write takes a
                // write fault that changes no byte: it reuses the page (now
                // exclusive) or copies it, a pinned one keeping its place.
                let _ = unsafe { mman::madvise(region.addr(idx), PAGE_SIZE, mman::MADV_POPULATE_WRITE) };
            }
        }
        if smart && should_skip(rec) {
            core.tally(Tally::Skipped, 1);
            continue;
        }
        // SAFETY: the page is in `region`, live under our lock. The copy may
        // be torn by a write meanwhile: it only feeds the hash and the
        // unstable tree, and a merge compares again under write-protect.
        let Ok(page) = (unsafe { copy.read(region, region.prot, region.addr(idx)) }) else {
            continue;
        };
        let h = page_hash(page);
        if crate::region::WriteInFlight::pending(&mut st.writes_in_flight, idx, h) {
            continue;
        }
        let zero = h == zh && is_zero(page);
        if zero && !e.exclusive() {
            // The shared zero page of a never-written page: nothing to merge.
            core.forget_hashed(rec);
            rec.set_state(PageState::None);
            continue;
        }
        // The merge mode decides here, before any decider hears of the
        // page: a page the mode excludes is never proposed, so it can
        // neither join a store page nor become one.
        if !mode.allows(zero) {
            core.forget_hashed(rec);
            rec.set_state(PageState::None);
            continue;
        }
        core.visiting(rec);
        decider.offer(b, st, core, Offer { page: idx, bytes: page, hash: h, zero });
    }
    Some(decider.decide(b, st, core))
}

/// Splits items (sorted by page) into runs of consecutive pages.
fn runs(items: &[Item]) -> impl Iterator<Item = &[Item]> {
    items.chunk_by(|a, b| b.page == a.page + 1)
}

/// Splits zero items (sorted by page) into the runs `merge_run` takes. In
/// anonymous memory, zero pages that stay in place may form one sparse run
/// across pages that are not merged, as long as every page from its first to
/// its last is in a mapping registered with the engine's userfaultfd (no
/// `NEEDS_REGISTER`) and no item sits in a store mapping (`OVERLAY`: it gets
/// a mapping of its own); otherwise runs are consecutive pages.
fn zero_runs<'a>(region: &Region, st: &RegionState, zeros: &'a [Item]) -> Vec<&'a [Item]> {
    let anon = region.kind == crate::maps::MappingKind::Anon;
    let registered = |p: usize| st.records[p].flags() & PageRecord::NEEDS_REGISTER == 0;
    let in_place = |p: usize| registered(p) && st.records[p].flags() & PageRecord::OVERLAY == 0;
    // The merge unprotects the whole span when it is done: a merged page in
    // between would lose the protection that brings its first write to the
    // fault thread (`merge::cow`), and the write would be copied in place.
    let between = |p: usize| registered(p) && st.records[p].state() != PageState::Merged;
    let mut out = Vec::new();
    let mut s = 0;
    let mut sparse_ok = anon && zeros.first().is_some_and(|it| in_place(it.page));
    for k in 1..zeros.len() {
        let (prev, next) = (zeros[k - 1].page, zeros[k].page);
        if sparse_ok && in_place(next) && (prev + 1..next).all(between) {
            continue;
        }
        let contiguous = prev - zeros[s].page == k - 1 - s;
        if contiguous && next == prev + 1 {
            sparse_ok = false;
            continue;
        }
        out.push(&zeros[s..k]);
        s = k;
        sparse_ok = anon && in_place(next);
    }
    if !zeros.is_empty() {
        out.push(&zeros[s..]);
    }
    out
}

fn execute(sh: &Shared, region: &Arc<Region>, st: &mut RegionState, core: &mut Core, d: Decisions) {
    // Fills first: they write the store pages that joins compare against.
    let mut fills = d.fills;
    fills.sort_unstable_by_key(|&(r, p, _)| (r, p));
    for group in fills.chunk_by(|a, b| a.0 == b.0) {
        let items: Vec<Item> = group.iter().map(|&(_, p, s)| Item { page: p, store: s }).collect();
        let rid = group[0].0;
        let fill_all = |r: &Region, st2: &mut RegionState, core: &mut Core| {
            for run in runs(&items) {
                let live: Vec<Item> = run.iter().copied().filter(|it| st2.records[it.page].state() == PageState::Hashed).collect();
                for it in run.iter().filter(|it| st2.records[it.page].state() != PageState::Hashed) {
                    core.cancel(sh, it.store);
                }
                for sub in runs(&live) {
                    merge::merge_run(sh, r, st2, core, sub, RunKind::Fill);
                }
            }
        };
        if rid == region.id {
            fill_all(region, st, core);
        } else {
            let done = sh.with_region_if_free(rid, |r2, st2| fill_all(r2, st2, core));
            if done.is_none() {
                for it in &items {
                    core.cancel(sh, it.store);
                }
            }
        }
    }
    for run in runs(&d.joins) {
        merge::merge_run(sh, region, st, core, run, RunKind::Join);
    }
    for run in zero_runs(region, st, &d.zeros) {
        merge::merge_run(sh, region, st, core, run, RunKind::Zero);
    }
    for run in runs(&d.remote) {
        merge::merge_run(sh, region, st, core, run, RunKind::Remote);
    }
    core.flush_link(sh);
}

/// Zero pages written since the scanner last looked stop counting now, as
/// the kernel's count drops at the write fault: every `Zero` record whose
/// page is no longer the zero page (pagemap) is let go. For reads that must
/// be exact (`Engine::stats_now`); the scan does the same as it passes.
pub fn recheck_zero_pages(sh: &Shared) {
    const CHUNK: usize = 4096;
    each_live_region(sh, |r, st, core| {
        if core.counters().zero_pages == 0 {
            return;
        }
        let mut entries = vec![PageEntry::default(); CHUNK.min(r.pages)];
        for first in (0..r.pages).step_by(CHUNK) {
            let n = CHUNK.min(r.pages - first);
            if !st.records[first..first + n].iter().any(|rec| rec.state() == PageState::Zero) {
                continue;
            }
            if sh.pagemap().read(r.addr(first), &mut entries[..n]).is_err() {
                return;
            }
            for (i, e) in entries[..n].iter().enumerate() {
                let rec = &mut st.records[first + i];
                if rec.state() == PageState::Zero && e.present() && (e.exclusive() || e.file()) {
                    core.zero_gone(rec);
                    rec.set_state(PageState::None);
                    core.tally(Tally::Activity, 1);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_scan_backs_off() {
        let mut rec = PageRecord::default();
        let pattern: Vec<bool> = (0..20).map(|_| should_skip(&mut rec)).collect();
        assert!(!pattern[0] && !pattern[1] && !pattern[2]);
        assert!(pattern.iter().filter(|&&s| s).count() >= 8);
    }
}
