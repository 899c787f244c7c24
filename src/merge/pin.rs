//! The pin check: a page pinned by in-flight I/O (`O_DIRECT`, io_uring) must
//! not be merged, because the device writes into that physical page after
//! our comparison, and a page nobody maps any more loses the write.
//!
//! The kernel's KSM compares refcount with mapcount under the page table
//! lock. Userspace has one equivalent: `UFFDIO_MOVE` (Linux 6.8+) refuses,
//! with `EBUSY`, to move a page that `folio_maybe_dma_pinned` says is pinned
//! (checked again after the PTE is cleared and flushed, so a concurrent
//! GUP-fast pin is seen or backs off), or that is not exclusive to this
//! process. So, after the byte comparison under write-protect, each equal
//! page is moved out to a scratch mapping. Once it is there, nothing can pin
//! or write it: it is compared again, and only then does the store page go
//! over the hole. Pages that were moved and are not merged go back.
//!
//! While a page is out its address is a hole; a vCPU touching it would get
//! a fresh zero page. So the run is registered in missing mode for the
//! duration: such an access blocks like a write to a protected page, and the
//! merge's final wake lets it retry on the store page (or the page put back).
//!
//! `UFFDIO_MOVE` moves only anonymous pages of anonymous mappings, so a
//! writable page merges only where it is one ([`may_merge`]): the holes of a
//! private file mapping become anonymous memory when it is registered
//! (QEMU's `memory-backend-file` with `share=off`), and the first write to a
//! merged page lands in an anonymous page of its own (`cow`). What is left
//! (a private file mapping's data, a copy made inside a store mapping when
//! the fault thread could not step in, every writable page on a kernel
//! without `UFFDIO_MOVE`) is never merged (see docs/pinned-pages.md).

use crate::region::{PageRecord, Region, RegionState};
use crate::state::{Core, Shared, Tally};
use crate::sys::{mman, PAGE_SIZE};
use crate::warn_once;

use super::{Run, RunKind};
use crate::digest::is_zero;
use crate::guest::scratch_page;
use crate::scratch::Scratch;

/// The environment switch of the pin check: `TWINPAGE_PIN_GUARD` = a
/// kernel boolean, or `strict` (the same as on; the preload refuses
/// anything else).
pub const PIN_GUARD_ENV: &str = "TWINPAGE_PIN_GUARD";

/// How merges treat pages that may be pinned by in-flight I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinGuard {
    /// No check (`0`): for the test that shows what the check prevents;
    /// such merges are counted in `twinpage_merges_unchecked`.
    Off,
    /// The default (`1`, or `strict`): every writable page is checked
    /// before it merges; a page that cannot be checked never merges.
    On,
}

impl PinGuard {
    /// Parses a `TWINPAGE_PIN_GUARD` value.
    pub fn parse(v: &str) -> Option<Self> {
        if v.trim_end_matches('\n') == "strict" {
            return Some(Self::On);
        }
        kernel_compat::parse::kstrtobool(v).ok().map(|on| if on { Self::On } else { Self::Off })
    }
}

/// The pin check's mode, from the environment once (default `On`).
pub fn pin_guard() -> PinGuard {
    static MODE: std::sync::OnceLock<PinGuard> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| {
        let mode = std::env::var(PIN_GUARD_ENV).ok().and_then(|v| PinGuard::parse(&v)).unwrap_or(PinGuard::On);
        if mode == PinGuard::Off {
            log::warn!("twinpage: {PIN_GUARD_ENV}=0: pages under O_DIRECT may be merged mid-I/O (for tests only)");
        }
        mode
    })
}

/// Whether the pin check is on (unless `TWINPAGE_PIN_GUARD=0`).
pub fn pin_guard_enabled() -> bool {
    pin_guard() != PinGuard::Off
}

/// Whether merges in `region` get the pin check.
pub(super) fn applies(sh: &Shared, region: &Region) -> bool {
    pin_guard_enabled() && sh.uffd().can_move() && region.kind == crate::maps::MappingKind::Anon && writable(region)
}

fn writable(region: &Region) -> bool {
    region.prot & libc::PROT_WRITE != 0
}

/// Whether the page of `rec` in `region` may merge: with the check on, a
/// writable page must be one the check can cover, an anonymous page of an
/// anonymous mapping (the region's own, or one `cow` put there), on a kernel
/// with `UFFDIO_MOVE`. A page of a read-only mapping cannot be the target
/// of a device write (that needs write access), so it needs no check.
pub(crate) fn may_merge(sh: &Shared, region: &Region, rec: &PageRecord) -> bool {
    if !pin_guard_enabled() || !writable(region) {
        return true;
    }
    // In an anonymous region, an overlay page that is neither merged nor a
    // zero page is a copy made inside a store mapping: a file mapping.
    sh.uffd().can_move() && region.kind == crate::maps::MappingKind::Anon && rec.flags() & PageRecord::OVERLAY == 0
}

/// Says once per kind of memory that it is not merged because no pin check
/// can cover it there.
pub(crate) fn note_uncheckable(sh: &Shared, region: &Region) {
    if !sh.uffd().can_move() {
        warn_once!(
            "pin-nomove",
            "twinpage: this kernel lacks UFFDIO_MOVE (Linux 6.8+), the only pin check userspace has: writable memory is not \
             merged (a page under O_DIRECT could lose the device's write)"
        );
    } else if region.kind != crate::maps::MappingKind::Anon {
        warn_once!(
            "pin-file",
            "twinpage: data of a private file mapping ({} bytes at {:#x} and maybe more) is not merged: its written pages sit in a \
             file mapping, where UFFDIO_MOVE cannot check them for pins (the file's holes are merged as anonymous memory)",
            region.pages * PAGE_SIZE,
            region.start
        );
    } else {
        warn_once!(
            "pin-overlay",
            "twinpage: a page written after merging was copied inside a store mapping (the fault thread could not step in), \
             where UFFDIO_MOVE cannot check it for pins: it is not merged again"
        );
    }
}

/// Whether the program locked or unlocked `region` (the mapping at `addr`)
/// since it was last seen; if so, the region says so from now on.
fn lock_changed(region: &Region, addr: usize) -> bool {
    match crate::maps::locked_at(addr) {
        Ok(Some(now)) if now != region.locked() => {
            region.set_locked(now);
            true
        }
        _ => false,
    }
}

/// A run whose equal pages were moved to the scratch mapping.
pub(super) struct Moved<'a> {
    scratch: parking_lot::MappedMutexGuard<'a, Scratch>,
    /// The guest address of page `i` of the run (a sparse zero run has gaps).
    addrs: Vec<usize>,
    kind: RunKind,
    /// Page `i` of the run sits at scratch page `i`.
    pub(super) out: Vec<bool>,
    /// Page `i` was registered in missing mode for the move.
    missing: Vec<bool>,
}

/// Moves each page of the run with `ok` set to the scratch mapping and
/// compares it again there; clears `ok` for pages that are pinned (counted
/// in `pinned_skipped`), that changed, or that could not be moved. `None`
/// when the check could not run at all: the caller merges nothing then.
pub(super) fn check<'a>(sh: &'a Shared, region: &Region, st: &mut RegionState, core: &mut Core, run: &mut Run<'_>) -> Option<Moved<'a>> {
    let (items, kind) = (run.items, run.kind);
    let ok = &mut run.ok[..];
    let n = items.len();
    // UFFDIO_MOVE wants both mappings to have the same protection, both
    // locked or both not.
    let (region_prot, locked) = (region.prot, region.locked());
    let mut slot = sh.scratch().lock();
    if slot.as_ref().is_none_or(|s| !s.fits(n, region_prot, locked)) {
        *slot = None;
        match Scratch::new(sh.uffd(), n.max(64), region_prot, locked) {
            Ok(s) => *slot = Some(s),
            Err(e) => {
                warn_once!("pin-scratch", "twinpage: cannot set up the pin check's scratch mapping: {e}; not merging");
                return None;
            }
        }
    }
    let scratch = parking_lot::MutexGuard::map(slot, |s| s.as_mut().expect("set above"));
    let addrs: Vec<usize> = items.iter().map(|it| region.addr(it.page)).collect();
    let mut moved = Moved { scratch, addrs, kind, out: vec![false; n], missing: vec![false; n] };

    // A page twinpage's own store mapping holds after copy-on-write sits in
    // a file mapping, which UFFDIO_MOVE refuses: it cannot be checked, and
    // does not merge (it may be the very page a direct read is filling).
    // The scan passes such pages over (`may_merge`); this is the backstop.
    for (o, it) in ok.iter_mut().zip(items) {
        *o &= st.records[it.page].flags() & PageRecord::OVERLAY == 0;
    }
    let mut i = 0;
    while i < n {
        if !ok[i] {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < n && ok[j] && items[j].page == items[j - 1].page + 1 {
            j += 1;
        }
        let (s, len) = (moved.addrs[i], (j - i) * PAGE_SIZE);
        // A zero page moved out leaves a hole that already is its merged
        // state (it reads as the zero page; a write gets a fresh page, as a
        // write to a merged zero page would), so accesses need not wait
        // there. Anything else waits in missing mode until its store page
        // is mapped or the page comes back.
        let needs_missing = kind != RunKind::Zero;
        moved.missing[i..j].iter_mut().for_each(|m| *m = needs_missing);
        if let Err(e) = if needs_missing { sh.uffd().register_wp_missing(s, len) } else { Ok(()) } {
            warn_once!("pin-missing", "twinpage: cannot register missing mode for the pin check: {e}; not merging");
            ok[i..j].iter_mut().for_each(|o| *o = false);
            i = j;
            continue;
        }
        let to = moved.scratch.page(i);
        // SAFETY: [i, j) is a write-protected stretch of consecutive pages of a
        // region we hold, registered in missing mode so the holes it leaves
        // block accesses (zero pages: the hole is their merged state); the
        // scratch pages are ours and empty.
        let failed = unsafe { move_stretch(sh, to, s, i, j, &mut moved.out) };
        for (k, e) in failed {
            // SAFETY: page k of the stretch above, still in place.
            let e = if e.raw_os_error() == Some(libc::EBUSY) && unsafe { unshared(sh, moved.addrs[k]) } {
                // SAFETY: as above, for page k alone.
                let again = unsafe { move_stretch(sh, moved.scratch.page(k), moved.addrs[k], k, k + 1, &mut moved.out) };
                let Some((_, e)) = again.into_iter().next() else { continue };
                e
            } else {
                e
            };
            ok[k] = false;
            if e.raw_os_error() == Some(libc::EBUSY) {
                core.tally(Tally::Pinned, 1);
                st.records[items[k].page].add_flags(PageRecord::UNSHARE);
            } else if e.raw_os_error() == Some(libc::EINVAL) && lock_changed(region, moved.addrs[k]) {
                // The program locked or unlocked the memory since: the
                // next scan takes a scratch mapping locked alike.
            } else {
                warn_once!("pin-move", "twinpage: UFFDIO_MOVE at {:#x} failed: {e}; page not merged", moved.addrs[k]);
            }
        }
        i = j;
    }

    // Moved out, a page can no longer be pinned or written: what it holds
    // now is what a merge keeps.
    for (i, it) in items.iter().enumerate() {
        if !moved.out[i] {
            continue;
        }
        // SAFETY: scratch page `i` holds the page just moved there; only this
        // merge touches the scratch mapping (under its lock).
        let page = unsafe { scratch_page(&*moved.scratch, moved.scratch.page(i)) };
        let same = match kind {
            RunKind::Zero => is_zero(page),
            _ => store_bytes(sh, core, kind, it.store).is_some_and(|s| s == page),
        };
        if !same {
            ok[i] = false;
            if kind != RunKind::Zero {
                core.tally(Tally::Mismatch, 1);
            }
        }
    }
    Some(moved)
}

/// After `UFFDIO_MOVE` refused the page at `at` (`EBUSY`): makes it
/// exclusive to this process if a fork left it "maybe shared" (the child
/// may still map it), so that it can be moved. A write fault that changes
/// no byte does it (`MADV_POPULATE_WRITE`): the kernel reuses the page if
/// nobody else maps it, or gives this process a copy. It hides no pin: a
/// page pinned by a device is exclusive already (the kernel unshares an
/// anonymous page before it pins it), so that fault finds it writable and
/// changes nothing, and the move refuses it again. The page is unprotected
/// meanwhile without waking its waiters; a write that lands then is seen
/// when the moved page is compared. Whether the page is protected again.
///
/// # Safety
/// `at` is a page of a run the caller merges, write-protected by it and
/// still in place.
unsafe fn unshared(sh: &Shared, at: usize) -> bool {
    if sh.uffd().unprotect_quietly(at, PAGE_SIZE).is_err() {
        return false;
    }
    // SAFETY: a page of a run we hold; its write-protection (the only
    // userfaultfd fault it could take) is off, so the fault cannot wait on
    // our own fault thread.
    let _ = unsafe { mman::madvise(at, PAGE_SIZE, mman::MADV_POPULATE_WRITE) };
    sh.uffd().protect(at, PAGE_SIZE).is_ok()
}

/// Moves pages `[i, j)` of a run, page `k` from `from + (k-i)*PAGE_SIZE` to
/// `to + (k-i)*PAGE_SIZE` (`from` and `to` are page `i`'s addresses),
/// setting `done[k]` for each page moved; returns the pages that did not
/// move, with why. A stretch may span two mappings, which one call refuses
/// (`EINVAL`): then the page is tried alone.
///
/// # Safety
/// As for [`crate::sys::uffd::Userfaultfd::move_pages`], for every page.
unsafe fn move_stretch(sh: &Shared, to: usize, from: usize, mut i: usize, j: usize, done: &mut [bool]) -> Vec<(usize, std::io::Error)> {
    let first = i;
    let mut failed = Vec::new();
    let mut single = false;
    while i < j {
        let end = if single { i + 1 } else { j };
        let off = (i - first) * PAGE_SIZE;
        // SAFETY: the caller's guarantee covers [i, j).
        match unsafe { sh.uffd().move_pages(to + off, from + off, (end - i) * PAGE_SIZE) } {
            Ok(_) => {
                done[i..end].iter_mut().for_each(|d| *d = true);
                i = end;
                single = false;
            }
            Err((bytes, e)) => {
                let k = (i + bytes / PAGE_SIZE).min(end - 1);
                done[i..k].iter_mut().for_each(|d| *d = true);
                if e.raw_os_error() == Some(libc::EINVAL) && !single && k + 1 < end {
                    i = k;
                    single = true;
                    continue;
                }
                failed.push((k, e));
                i = k + 1;
                single = false;
            }
        }
    }
    failed
}

/// The bytes of store page `store` for a run of `kind`.
fn store_bytes<'c>(sh: &'c Shared, core: &'c Core, kind: RunKind, store: u32) -> Option<&'c [u8]> {
    match kind {
        // SAFETY: a join the daemon ordered.
        RunKind::Remote => unsafe { core.daemon_page(store) },
        _ => core.own_page(sh, store),
    }
}

/// After the remap: puts back every moved page that was not merged (`ok`
/// clear), registers what is left of the run in write-protect mode only
/// again, and frees the old pages of the merged ones.
pub(super) fn finish(sh: &Shared, region: &Region, st: &mut RegionState, run: &Run<'_>, m: &mut Moved<'_>) {
    let (items, ok) = (run.items, &run.ok[..]);
    let n = items.len();
    let next_page = |j: usize| items[j].page == items[j - 1].page + 1;
    let mut i = 0;
    while i < n {
        if !m.out[i] || ok[i] {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < n && m.out[j] && !ok[j] && next_page(j) {
            j += 1;
        }
        let mut back = vec![false; n];
        // SAFETY: the stretch is a hole of our run (its pages are in the
        // scratch mapping), kept blocked by missing mode.
        let failed = unsafe { move_stretch(sh, m.addrs[i], m.scratch.page(i), i, j, &mut back) };
        for (k, e) in failed {
            if m.kind == RunKind::Zero && e.raw_os_error() == Some(libc::EEXIST) {
                // A zero page's hole is not held in missing mode: a write
                // landed there after the move, and that write is the page's
                // content now. (Unreachable while a moved-out page cannot
                // change: a zero page moved out stays merged.)
                continue;
            }
            let at = m.addrs[k];
            warn_once!("pin-back", "twinpage: moving a page back failed at {at:#x}: {e}; copying it back");
            if let Err(e) = put_back_by_copy(region, at, m.scratch.page(k)) {
                // Nothing else can give the page back: the region stops
                // merging, and the hole reads as zeros once released.
                log::error!("twinpage: cannot put back the page at {at:#x}: {e}");
                st.failed = true;
            } else {
                st.records[items[k].page].add_flags(PageRecord::NEEDS_REGISTER);
            }
        }
        i = j;
    }

    // Store stretches are new mappings of their own; the rest of what was
    // registered in missing mode goes back to write-protect only.
    let replaced = |i: usize| !m.missing[i] || ok[i];
    let mut i = 0;
    while i < n {
        if replaced(i) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < n && !replaced(j) && next_page(j) {
            j += 1;
        }
        // Registering write-protect mode alone over a range registered with
        // both is a no-op for the kernel (it keeps a registration that
        // already covers the mode asked for), so missing mode only goes with
        // an unregister first. That also drops the write-protection of these
        // pages, which nothing needs any more: they are pages put back
        // unmerged or never moved (unprotected next anyway), and the
        // unregister wakes whoever waited on them. It also lets the split
        // mappings merge again.
        let (s, len) = (m.addrs[i], (j - i) * PAGE_SIZE);
        if let Err(e) = sh.uffd().unregister(s, len).and_then(|()| sh.uffd().register_wp(s, len)) {
            // The stray-fault thread resolves missing faults there (zero page
            // into a hole), so this costs speed, not data; pages left without
            // registration are registered again before their next merge.
            warn_once!("pin-unmissing", "twinpage: cannot drop missing mode after the pin check: {e}");
            for it in &items[i..j] {
                st.records[it.page].add_flags(PageRecord::NEEDS_REGISTER);
            }
        }
        i = j;
    }

    if m.out.iter().any(|&o| o) {
        // SAFETY: the scratch mapping is ours; what is left in it are the old
        // pages of merged guest pages, which nobody maps or pins any more.
        if let Err(e) = unsafe { mman::madvise(m.scratch.page(0), n * PAGE_SIZE, m.scratch.discard_advice()) } {
            warn_once!("pin-free", "twinpage: cannot free the pin check's scratch pages: {e}");
        }
    }
}

/// Copies scratch page `from` into a fresh anonymous page moved over the
/// hole at `addr`.
fn put_back_by_copy(region: &Region, addr: usize, from: usize) -> std::io::Result<()> {
    let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
    // SAFETY: `from` is a scratch page holding the guest's page, which only
    // this merge touches (under the scratch lock); `addr` is the hole the
    // merge made in a run it holds.
    unsafe { super::copy_over(from, addr, PAGE_SIZE, region.prot, anon) }?;
    super::reapply_advice(region, addr, PAGE_SIZE);
    Ok(())
}
