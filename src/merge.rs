//! The merge protocol, run by run. For a run of consecutive guest pages:
//!
//! 1. write-protect the run with userfaultfd: every writer (vCPU thread, KVM,
//!    a syscall copying into it) now blocks in the kernel;
//! 2. check in pagemap that each page is present, anonymous and protected,
//!    then compare it byte for byte with its store page (or, for the first
//!    sharer of a new store page, copy it there), and check pagemap again so a
//!    page discarded and refaulted meanwhile is caught;
//! 3. for anonymous memory, the pin check (`pin`): move each equal page out
//!    with `UFFDIO_MOVE`, which the kernel refuses for a page pinned by
//!    in-flight I/O, and compare it again where it can no longer change;
//! 4. map the store pages of each equal stretch over it with
//!    `MAP_FIXED|MAP_PRIVATE` (one call per stretch of consecutive store
//!    pages), put back what was moved and not merged, remove protection from
//!    the rest, and wake the whole run: a woken writer retries and takes
//!    copy-on-write on identical content.

use crate::digest::is_zero;
use crate::guest::PageCopy;
use crate::region::{PageRecord, PageState, Region, RegionState};
use crate::state::{Core, Shared, Tally};
use crate::sys::pagemap::PageEntry;
use crate::sys::{mman, PAGE_SIZE};
use crate::warn_once;

pub(crate) mod cow;
pub(crate) mod pin;

/// What a run does with its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// Copy into a new store page (the first sharer), then map it.
    Fill,
    /// Compare with a filled store page, then map it.
    Join,
    /// Check for zeros, then drop to the kernel's zero page.
    Zero,
    /// Compare with a page of the daemon's store (filled by its broker),
    /// then map it.
    Remote,
}

/// One page of a run: its index in the region and its store page.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    pub page: usize,
    pub store: u32,
}

/// One run under merge: its pages, where they are, and what is to become
/// of each (`ok`: equal to its store page, or zero, and still protected:
/// it merges). Every phase of [`merge_run`] narrows `ok`.
pub(super) struct Run<'i> {
    pub(super) items: &'i [Item],
    pub(super) kind: RunKind,
    /// Page index (in the region) of the first item.
    first: usize,
    /// Address and length of the span from the first item to the last.
    start: usize,
    len: usize,
    pub(super) ok: Vec<bool>,
}

impl<'i> Run<'i> {
    fn new(region: &Region, items: &'i [Item], kind: RunKind) -> Self {
        let first = items[0].page;
        let span = items[items.len() - 1].page + 1 - first;
        debug_assert!(items.windows(2).all(|w| w[1].page > w[0].page));
        debug_assert!(span == items.len() || (kind == RunKind::Zero && region.kind == crate::maps::MappingKind::Anon));
        Run { items, kind, first, start: region.addr(first), len: span * PAGE_SIZE, ok: vec![false; items.len()] }
    }

    fn span(&self) -> usize {
        self.len / PAGE_SIZE
    }

    /// Consecutive pages (else a sparse zero run).
    fn contiguous(&self) -> bool {
        self.span() == self.items.len()
    }

    fn addr_of(&self, i: usize) -> usize {
        self.start + (self.items[i].page - self.first) * PAGE_SIZE
    }

    /// Item `i`'s entry in a pagemap read of the span.
    fn entry(&self, entries: &[PageEntry], i: usize) -> PageEntry {
        entries[self.items[i].page - self.first]
    }
}

/// Merges one run of consecutive pages of `region`. Records, reservations
/// and counters are settled before it returns.
///
/// A zero run of anonymous memory may also be sparse: pages in order with
/// gaps, all inside mappings registered with the engine's userfaultfd (see
/// `scan::zero_runs`). The whole span is protected, checked and woken with
/// one call each, so scattered zero pages cost one TLB flush per batch for
/// the protection instead of one per page.
pub fn merge_run(sh: &Shared, region: &Region, st: &mut RegionState, core: &mut Core, items: &[Item], kind: RunKind) {
    if items.is_empty() {
        return;
    }
    let mut run = Run::new(region, items, kind);
    if !prepare(sh, region, st, core, &run) {
        settle(sh, region, st, core, &run);
        return;
    }
    let reserved = reserve_store(sh, core, &run);
    let (start, len) = (run.start, run.len);

    sh.inflight().begin(start, start + len);
    // Should anything below unwind, the run is unprotected and woken, so no
    // writer of the host program stays blocked.
    let mut guard = UnwindGuard { sh, start, len, armed: true };
    if let Err(e) = sh.uffd().protect(start, len) {
        guard.armed = false;
        sh.inflight().end(start, start + len);
        warn_once!("uffd-protect", "twinpage: write-protect failed at {start:#x}: {e}; region stops merging");
        st.failed = true;
        settle(sh, region, st, core, &run);
        return;
    }

    let mut entries = vec![PageEntry::default(); run.span()];
    let fresh_fills = compare(sh, region, core, &mut run, &reserved, &mut entries);
    let mut pinned = check_pins(sh, region, st, core, &mut run);
    let guarded = remap_stretches(sh, region, st, core, &mut run, pinned.as_ref());

    // One pagemap read of the run, into the buffer the checks above used.
    // Unreadable: nothing to go by; such a page then waits for its next
    // write, which `cow` serves from its current content.
    let early = if guarded.is_empty() || sh.pagemap().read(start, &mut entries).is_err() {
        Vec::new()
    } else {
        written_before_guarded(sh, &guarded, |k| run.entry(&entries, k), &|k| run.addr_of(k))
    };

    if !pin::pin_guard_enabled() {
        core.tally(Tally::Unchecked, run.ok.iter().filter(|&&o| o).count() as u64);
    }
    if let Some(out) = pinned.as_mut() {
        pin::finish(sh, region, st, &run, out);
    }
    release(sh, &run);
    guard.armed = false;
    sh.inflight().end(start, start + len);

    for s in fresh_fills {
        if let Some(hash) = core.own_page(sh, s).map(crate::digest::page_hash) {
            core.rekey(s, hash);
        }
    }
    settle(sh, region, st, core, &run);
    // Registered and protected for their first write already.
    for (i, j) in guarded {
        for it in &items[i..j] {
            st.records[it.page].clear_flags(PageRecord::NEEDS_REGISTER);
        }
    }
    for k in early {
        core.written_in_place(sh, &mut st.records[items[k].page]);
    }
}

/// Before anything is protected: whether the run may merge at all (the
/// mapping budget: a merge that cannot be remapped is not worth
/// write-protecting and comparing), with its span registered for
/// write-protect again where a remap took that away.
fn prepare(sh: &Shared, region: &Region, st: &mut RegionState, core: &mut Core, run: &Run<'_>) -> bool {
    let anon_zero = run.kind == RunKind::Zero && region.kind == crate::maps::MappingKind::Anon;
    if !anon_zero && !core.admit(run.items.len(), stretches(run.items, run.kind)) {
        return false;
    }
    let records = &mut st.records[run.first..run.first + run.span()];
    if records.iter().any(|r| r.flags() & PageRecord::NEEDS_REGISTER != 0) {
        if let Err(e) = sh.uffd().register_wp(run.start, run.len) {
            warn_once!("uffd-register", "twinpage: cannot re-register merged memory for write-protect: {e}");
            return false;
        }
        for r in records {
            r.clear_flags(PageRecord::NEEDS_REGISTER);
        }
    }
    true
}

/// Store pages the run will fill get their blocks before anything is
/// protected: a write through the mapping into a hole of a full tmpfs store
/// would be a SIGBUS. Without space, those merges wait. Per item: whether
/// its store page has its block.
fn reserve_store(sh: &Shared, core: &mut Core, run: &Run<'_>) -> Vec<bool> {
    if !matches!(run.kind, RunKind::Fill | RunKind::Join) {
        return vec![true; run.items.len()];
    }
    let want: Vec<Option<u32>> =
        run.items.iter().map(|it| core.stable().node(it.store).filter(|n| !n.filled()).map(|_| it.store)).collect();
    if !want.iter().any(Option::is_some) {
        return vec![true; run.items.len()];
    }
    let (ok, err) = sh.store().reserve(&want);
    if let Some(e) = err {
        core.tally(Tally::StoreFull, ok.iter().filter(|o| !**o).count() as u64);
        warn_once!("store-full", "twinpage: cannot allocate store pages ({e}); merges wait for space");
    }
    ok
}

/// Under write-protect: each page present, anonymous and protected is
/// compared with its store page (or checked for zeros), and the first
/// sharer of a store page fills it; then pagemap is read again, so a page
/// discarded and faulted in after its check (which lost the protection) is
/// caught before the remap. Sets `ok`; returns the store pages filled.
fn compare(sh: &Shared, region: &Region, core: &mut Core, run: &mut Run<'_>, reserved: &[bool], entries: &mut [PageEntry]) -> Vec<u32> {
    let mut fresh_fills = Vec::new();
    if sh.pagemap().read(run.start, entries).is_err() {
        return fresh_fills;
    }
    let protected = |e: PageEntry| e.present() && e.uffd_wp() && !e.file();
    let mut copy = PageCopy::new();
    let items = run.items;
    for (i, it) in items.iter().enumerate() {
        if !protected(run.entry(entries, i)) {
            continue;
        }
        // SAFETY: the page belongs to `region`, whose lock we hold, and it is
        // write-protected: no program thread writes it while we copy (a
        // device could: the pin check compares again where none can).
        let Ok(page) = (unsafe { copy.read(region, region.prot, run.addr_of(i)) }) else { continue };
        run.ok[i] = match run.kind {
            RunKind::Zero => is_zero(page),
            RunKind::Remote => {
                // SAFETY: the daemon ordered this join.
                let Some(store) = (unsafe { core.daemon_page(it.store) }) else { continue };
                let eq = store == page;
                if !eq {
                    core.tally(Tally::Mismatch, 1);
                }
                eq
            }
            RunKind::Fill | RunKind::Join => {
                let Some(node) = core.stable().node(it.store).copied() else { continue };
                if node.filled() {
                    let Some(store) = core.own_page(sh, it.store) else { continue };
                    let eq = store == page;
                    if !eq {
                        core.tally(Tally::Mismatch, 1);
                    }
                    eq
                } else if !reserved[i] {
                    false
                } else {
                    // SAFETY: an unfilled store page has no sharer and no reader
                    // but us (we hold the engine lock); `page` is write-protected.
                    if unsafe { sh.store().fill(it.store, page.as_ptr()) }.is_err() {
                        continue;
                    }
                    core.store_page_filled(it.store);
                    fresh_fills.push(it.store);
                    true
                }
            }
        };
    }
    if sh.pagemap().read(run.start, entries).is_ok() {
        for i in 0..run.items.len() {
            run.ok[i] &= protected(run.entry(entries, i));
        }
    } else {
        run.ok.iter_mut().for_each(|o| *o = false);
    }
    fresh_fills
}

/// A page pinned by in-flight I/O must keep its place: the device writes
/// into that physical page after our comparison. Where the pin check
/// applies, the equal pages are moved out and compared again (`None`: it
/// could not run, nothing merges); elsewhere only pages the scan may merge
/// unchecked (`pin::may_merge`) stay `ok`.
fn check_pins<'a>(sh: &'a Shared, region: &Region, st: &mut RegionState, core: &mut Core, run: &mut Run<'_>) -> Option<pin::Moved<'a>> {
    if !run.ok.iter().any(|&o| o) {
        return None;
    }
    if pin::applies(sh, region) {
        let moved = pin::check(sh, region, st, core, run);
        if moved.is_none() {
            run.ok.iter_mut().for_each(|o| *o = false);
        }
        return moved;
    }
    // Unchecked: the check is off (a test), or the region is read-only;
    // anything else the scan passed over (`may_merge`).
    for (o, it) in run.ok.iter_mut().zip(run.items) {
        *o &= pin::may_merge(sh, region, &st.records[it.page]);
    }
    None
}

/// Maps each stretch of `ok` pages with consecutive store pages over the
/// run (one call per stretch); a stretch that could not be mapped is no
/// longer `ok`. Returns the stretches (item ranges) mapped and guarded
/// for their first write.
fn remap_stretches(
    sh: &Shared,
    region: &Region,
    st: &RegionState,
    core: &mut Core,
    run: &mut Run<'_>,
    pinned: Option<&pin::Moved<'_>>,
) -> Vec<(usize, usize)> {
    let (items, kind, n) = (run.items, run.kind, run.items.len());
    let mut guarded = Vec::new();
    let mut i = 0;
    while i < n {
        if !run.ok[i] {
            i += 1;
            continue;
        }
        // A page written after merging sits in a private file mapping, where
        // a discard would show the file (a store page) again: it needs a
        // mapping of its own even when it becomes a zero page.
        let overlay = |k: usize| st.records[items[k].page].flags() & PageRecord::OVERLAY != 0;
        let mut j = i + 1;
        while j < n
            && run.ok[j]
            && items[j].page == items[j - 1].page + 1
            && overlay(j) == overlay(i)
            && (kind == RunKind::Zero || items[j].store == items[j - 1].store + 1)
        {
            j += 1;
        }
        // The pin check moved every checked page out: a zero page's hole is
        // then already its merged state, and a discard now could drop a
        // write that landed in the hole since.
        let zero = ZeroHow { overlay: overlay(i), moved_out: pinned.is_some_and(|m| (i..j).all(|k| m.out[k])) };
        let stretch = Stretch { addr: run.addr_of(i), bytes: (j - i) * PAGE_SIZE, store: items[i].store, zero };
        match remap(sh, region, core, kind, stretch) {
            None => run.ok[i..j].iter_mut().for_each(|o| *o = false),
            Some(true) => guarded.push((i, j)),
            Some(false) => {}
        }
        i = j;
    }
    guarded
}

/// Unprotects what stays (this wakes its waiters), then wakes the whole
/// span: a woken writer of a remapped page retries and takes copy-on-write
/// on identical content. A sparse zero span stays in its own mappings: all
/// of it is unprotected at once.
fn release(sh: &Shared, run: &Run<'_>) {
    let (start, len, n) = (run.start, run.len, run.items.len());
    if !run.contiguous() {
        if let Err(e) = sh.uffd().unprotect(start, len) {
            warn_once!("uffd-unprotect", "twinpage: unprotect failed at {start:#x}: {e}");
        }
    }
    let mut i = if run.contiguous() { 0 } else { n };
    while i < n {
        if run.ok[i] {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < n && !run.ok[j] {
            j += 1;
        }
        if let Err(e) = sh.uffd().unprotect(start + i * PAGE_SIZE, (j - i) * PAGE_SIZE) {
            warn_once!("uffd-unprotect", "twinpage: unprotect failed at {:#x}: {e}", start + i * PAGE_SIZE);
        }
        i = j;
    }
    if let Err(e) = sh.uffd().wake(start, len) {
        warn_once!("uffd-wake", "twinpage: wake failed at {start:#x}: {e}");
    }
}

/// The pages of the store stretches just mapped and guarded that a write
/// reached before their protection did. `mmap` over the run takes the old
/// mapping's protection with it, and until `guard_store_stretch` has
/// registered and protected the new one, nothing holds a writer that comes
/// along then: the kernel copies the store page into the store mapping for
/// it, and the protection lands on that written copy afterwards, where it
/// would pass for a merged page never written (`cow::still_store_content`)
/// and its write for one not made yet. Read after the protection, a page
/// that is anonymous already was written then (or is the kernel's copy for
/// a writer waiting on the protection now; the two cannot be told apart,
/// and either may be taken for written). Each is unprotected (a waiting
/// writer goes on) and is the program's page in place, as a copy the fault
/// thread could not make: no pin check reaches it there, so it never merges
/// again, and nothing copies it away from under a device that may have
/// pinned it meanwhile.
fn written_before_guarded(
    sh: &Shared,
    guarded: &[(usize, usize)],
    entry_of: impl Fn(usize) -> crate::sys::pagemap::PageEntry,
    addr_of: &dyn Fn(usize) -> usize,
) -> Vec<usize> {
    let early: Vec<usize> = guarded
        .iter()
        .flat_map(|&(i, j)| i..j)
        .filter(|&k| {
            let e = entry_of(k);
            e.present() && !e.file()
        })
        .collect();
    for &k in &early {
        if let Err(err) = sh.uffd().unprotect(addr_of(k), PAGE_SIZE) {
            warn_once!("uffd-unprotect", "twinpage: unprotect failed at {:#x}: {err}", addr_of(k));
        }
    }
    early
}

struct UnwindGuard<'a> {
    sh: &'a Shared,
    start: usize,
    len: usize,
    armed: bool,
}

impl Drop for UnwindGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.sh.uffd().unprotect(self.start, self.len);
            let _ = self.sh.uffd().wake(self.start, self.len);
            self.sh.inflight().end(self.start, self.start + self.len);
        }
    }
}

/// The stretches a run will be mapped as: one per stretch of consecutive
/// store pages (one for a zero run, which becomes fresh anonymous memory).
fn stretches(items: &[Item], kind: RunKind) -> usize {
    if kind == RunKind::Zero {
        return 1;
    }
    1 + items.windows(2).filter(|w| w[1].store != w[0].store.wrapping_add(1)).count()
}

/// How a stretch of a zero run becomes zero pages.
#[derive(Debug, Clone, Copy)]
struct ZeroHow {
    /// The pages sit in a store mapping (written after merging).
    overlay: bool,
    /// The pin check moved them all out already.
    moved_out: bool,
}

/// Whether a zero run's stretch drops to the zero page in place (anonymous
/// memory of the region's own mapping), costing no mapping.
fn zero_in_place(region: &Region, kind: RunKind, how: ZeroHow) -> bool {
    kind == RunKind::Zero && region.kind == crate::maps::MappingKind::Anon && !how.overlay
}

/// Replaces `[addr, addr+bytes)` with store pages from `store`, or with the
/// zero page. `None` when it could not (budget or error); nothing changed
/// then. Otherwise whether the new mapping is a store stretch registered and
/// write-protected for its first write.
/// A stretch of a run to map: `bytes` at `addr`, from store page `store`
/// on (or zero pages, as `zero` says).
#[derive(Debug, Clone, Copy)]
struct Stretch {
    addr: usize,
    bytes: usize,
    store: u32,
    zero: ZeroHow,
}

fn remap(sh: &Shared, region: &Region, core: &mut Core, kind: RunKind, stretch: Stretch) -> Option<bool> {
    let Stretch { addr, bytes, store, zero } = stretch;
    let pages = (bytes / PAGE_SIZE) as u64;
    let anon_zero = zero_in_place(region, kind, zero);
    if !anon_zero && !core.allow_mappings(2, pages) {
        return None;
    }
    let res = if anon_zero && zero.moved_out {
        Ok(false)
    } else if anon_zero {
        // A locked range refuses MADV_DONTNEED.
        let advice = if region.locked() { mman::MADV_DONTNEED_LOCKED } else { libc::MADV_DONTNEED };
        // SAFETY: the range is a write-protected run of a region we hold, checked
        // all-zero; after the discard it reads back as zeros, what it held.
        unsafe { mman::madvise(addr, bytes, advice) }.map(|()| false)
    } else if kind == RunKind::Zero {
        // SAFETY: as above; fresh anonymous memory reads back as zeros.
        unsafe { mman::map_anon_fixed(addr, bytes, region.prot) }.map(|()| false)
    } else {
        let off = crate::store::Store::offset(store);
        let fd = match (kind, core.link()) {
            (RunKind::Remote, Some(link)) => link.store.fd(),
            (RunKind::Remote, None) => return None,
            _ => sh.store().fd(),
        };
        // The range is a write-protected run of a region we hold, each page
        // byte-equal to its store page: the mapping changes, the content not.
        // Memory the program cannot write is left unguarded: only a writer
        // with the kernel's FOLL_FORCE (a debugger, /proc/self/mem) could
        // write it, and such a write fails with EIO on a write-protected page
        // (a remote fault cannot wait for us); unguarded, the kernel copies
        // the page in place and the scanner sees it (`cow_in_place`).
        let mapped = if region.locked() {
            // SAFETY: the range is ours to replace, as said above.
            unsafe { mman::map_private_fixed_locked(addr, bytes, region.prot, fd, off) }
        } else {
            // SAFETY: the range is ours to replace, as said above.
            unsafe { mman::map_private_fixed(addr, bytes, region.prot, fd, off) }
        };
        mapped.map(|()| {
            crate::testhook::stretch_mapped(addr, bytes);
            region.prot & libc::PROT_WRITE != 0 && guard_store_stretch(sh, addr, bytes)
        })
    };
    let guarded = match res {
        Ok(g) => g,
        Err(e) => {
            warn_once!("remap", "twinpage: remap at {addr:#x} failed: {e}; merging held back");
            return None;
        }
    };
    if !anon_zero {
        core.tally(Tally::MergeRun, 1);
        reapply_advice(region, addr, bytes);
    }
    Some(guarded)
}

/// A store stretch just mapped is write-protected, so that its first write
/// comes to the fault thread (`cow`) instead of becoming a copy inside the
/// store mapping. Registers and protects before the run is woken: nobody
/// can write there in between. Without it (an error, logged once), pages
/// are registered again before their next merge, and a page written
/// meanwhile is copied in place and never merges again.
fn guard_store_stretch(sh: &Shared, addr: usize, bytes: usize) -> bool {
    match sh.uffd().register_wp(addr, bytes).and_then(|()| sh.uffd().protect(addr, bytes)) {
        Ok(()) => true,
        Err(e) => {
            warn_once!("store-wp", "twinpage: cannot write-protect a merged stretch at {addr:#x}: {e}");
            false
        }
    }
}

/// A new mapping loses the old one's madvise flags; QEMU sets DONTFORK and
/// DONTDUMP on guest RAM, so carry them over.
pub(crate) fn reapply_advice(region: &Region, addr: usize, bytes: usize) {
    for (flag, advice) in [(region.dontfork, libc::MADV_DONTFORK), (region.dontdump, libc::MADV_DONTDUMP)] {
        if flag {
            // SAFETY: DONTFORK/DONTDUMP change no contents.
            if let Err(e) = unsafe { mman::madvise(addr, bytes, advice) } {
                warn_once!("advice", "twinpage: cannot reapply madvise({advice}) after remap: {e}");
            }
        }
    }
    // The program's lock, on what is mapped now (on fault: nothing is
    // faulted in, which for a private writable mapping would copy it).
    if region.locked() {
        // SAFETY: locking changes no contents.
        if let Err(e) = unsafe { mman::mlock_on_fault(addr, bytes) } {
            warn_once!("relock", "twinpage: cannot lock again the remapped pages of locked memory: {e}");
        }
    }
}

/// Brings records, stable-tree reservations and counters in line with what
/// happened to each page of the run.
fn settle(sh: &Shared, region: &Region, st: &mut RegionState, core: &mut Core, run: &Run<'_>) {
    let (items, kind, ok) = (run.items, run.kind, &run.ok[..]);
    core.tally(Tally::Activity, ok.iter().filter(|&&o| o).count() as u64);
    for (i, it) in items.iter().enumerate() {
        let rec = &mut st.records[it.page];
        match (kind, ok[i]) {
            (RunKind::Zero, true) => {
                core.forget_hashed(rec);
                core.zero_added(rec, !sh.tunables().use_zero_pages());
                rec.set_age(0);
                if region.kind != crate::maps::MappingKind::Anon {
                    rec.add_flags(PageRecord::NEEDS_REGISTER | PageRecord::OVERLAY);
                } else if rec.flags() & PageRecord::OVERLAY != 0 {
                    // A fresh anonymous mapping: the region's own kind again.
                    rec.set_own_mapping();
                }
            }
            (RunKind::Zero, false) => {}
            (_, true) => {
                core.forget_hashed(rec);
                rec.set_state(PageState::Merged);
                rec.set_key(it.store);
                rec.set_age(0);
                rec.add_flags(PageRecord::NEEDS_REGISTER | PageRecord::OVERLAY);
                if kind != RunKind::Remote {
                    core.commit(it.store);
                    continue;
                }
                core.tally(Tally::DaemonMerged, 1);
                let last_link = core.last_link().is_some();
                match core.link_mut() {
                    Some(link) => {
                        rec.add_flags(PageRecord::REMOTE);
                        link.committed.push(it.store);
                    }
                    // The link broke during the batch: an orphan of it.
                    None if last_link => rec.add_flags(PageRecord::ORPHAN | PageRecord::LAST_LINK),
                    None => rec.add_flags(PageRecord::ORPHAN),
                }
            }
            (RunKind::Remote, false) => {
                if let Some(link) = core.link_mut() {
                    link.cancelled.push(it.store);
                }
            }
            (_, false) => core.cancel(sh, it.store),
        }
    }
}

/// Puts pages `[from, to)` of `region` back into a mapping of the region's
/// own kind with the content they show now: break sharing
/// (`MADV_POPULATE_WRITE`), write-protect, copy into a fresh mapping (anonymous,
/// or the backing file mapped privately), move that over the run with
/// `mremap`, wake. Writers wait on the protection, so nothing is lost. The
/// records' flags are updated; their states are the caller's.
pub fn restore_with_content(sh: &Shared, region: &Region, st: &mut RegionState, from: usize, to: usize) -> bool {
    let start = region.addr(from);
    let n = to - from;
    let len = n * PAGE_SIZE;
    if st.records[from..to].iter().any(|r| r.flags() & PageRecord::NEEDS_REGISTER != 0) {
        if let Err(e) = sh.uffd().register_wp(start, len) {
            log::debug!("twinpage: restore at {start:#x}+{len:#x}: register: {e}");
            return false;
        }
        for r in &mut st.records[from..to] {
            r.clear_flags(PageRecord::NEEDS_REGISTER);
        }
    }
    sh.inflight().begin(start, start + len);
    let mut guard = UnwindGuard { sh, start, len, armed: true };
    let mut entries = vec![Default::default(); n];
    // Merged pages are write-protected for their first write, which the
    // fault thread leaves alone under a range in flight: the populate below
    // would wait for ever. Writers racing it are caught by the protection
    // that follows.
    let _ = sh.uffd().unprotect(start, len);
    let mut protected = false;
    for _ in 0..4 {
        if populate(region, start, len).is_err() {
            break;
        }
        if sh.uffd().protect(start, len).is_err() {
            break;
        }
        if sh.pagemap().read(start, &mut entries).is_ok()
            && entries.iter().all(|e: &crate::sys::pagemap::PageEntry| e.present() && e.uffd_wp())
        {
            protected = true;
            break;
        }
        let _ = sh.uffd().unprotect(start, len);
    }
    let mut done = false;
    if !protected {
        log::debug!("twinpage: restore at {start:#x}+{len:#x}: could not protect every page");
    }
    if protected {
        done = copy_and_move(region, start, len).map_err(|e| log::debug!("twinpage: restore: move: {e}")).is_ok();
        if !done {
            let _ = sh.uffd().unprotect(start, len);
        }
    }
    let _ = sh.uffd().wake(start, len);
    guard.armed = false;
    sh.inflight().end(start, start + len);
    if done {
        reapply_advice(region, start, len);
        for r in &mut st.records[from..to] {
            r.set_own_mapping();
        }
    }
    done
}

/// Faults every page of `[start, start+len)` in, so that the protection
/// covers each: a read fault where the program may read (a write fault
/// would copy every store page only for the copy that replaces the mapping
/// to copy it again), else a read through `/proc/self/mem` (a populate
/// would need the access the program lacks).
fn populate(region: &Region, start: usize, len: usize) -> std::io::Result<()> {
    if region.prot & libc::PROT_READ != 0 {
        // SAFETY: a run of a region the caller holds; populate-read changes
        // no content and no sharing.
        return unsafe { mman::madvise(start, len, mman::MADV_POPULATE_READ) };
    }
    let mut page = [0u8; PAGE_SIZE];
    (start..start + len).step_by(PAGE_SIZE).try_for_each(|a| crate::guest::read_unreadable(a, &mut page))
}

fn copy_and_move(region: &Region, start: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: a write-protected run of a region we hold: no write races the
    // copy, and the content the owner sees stays the same.
    unsafe { copy_over(start, start, len, region.prot, region.original_mapping(start)) }
}

/// Copies `[src, src+len)` into a fresh mapping made with `(flags, fd,
/// offset)`, gives it `prot`, and moves it over `[dst, dst+len)` with
/// `mremap`.
///
/// # Safety
/// The source must be readable and no write may race the copy; the
/// destination must be owned by the caller; neither may hold a Rust
/// reference.
pub(crate) unsafe fn copy_over(
    src: usize,
    dst: usize,
    len: usize,
    prot: libc::c_int,
    mapping: (libc::c_int, libc::c_int, libc::off_t),
) -> std::io::Result<()> {
    // SAFETY: the caller's guarantees are fill_and_move's; `tmp` is the
    // fresh writable mapping it hands over, apart from the source.
    unsafe {
        fill_and_move(dst, len, prot, mapping, |tmp| {
            // The copy writes every page: faulting them in with one call
            // costs less than a fault each (a third of an unmerge's time).
            // Without it the copy faults them in itself.
            // SAFETY: our own fresh writable mapping; no content to keep.
            let _ = mman::madvise(tmp, len, mman::MADV_POPULATE_WRITE);
            copy_into(src, tmp, len, prot)
        })
    }
}

/// Copies `[src, src+len)` into `tmp` (as [`copy_over`]), gives it `prot`,
/// and moves it over `[dst, dst+len)`; on an error `tmp` is unmapped and
/// `dst` is as it was.
///
/// # Safety
/// As [`copy_over`]; and `tmp` is a writable private mapping of `len` bytes
/// the caller owns, apart from both ranges, which it gives up: moved over
/// `dst` or unmapped.
pub(crate) unsafe fn copy_into_and_move(src: usize, tmp: usize, dst: usize, len: usize, prot: libc::c_int) -> std::io::Result<()> {
    // SAFETY: the caller's guarantees are fill_and_move_from's, and
    // copy_into's for the source and `tmp`.
    unsafe { fill_and_move_from(tmp, dst, len, prot, |tmp| copy_into(src, tmp, len, prot)) }
}

/// Copies `[src, src+len)` into the writable mapping at `tmp`, through
/// `/proc/self/mem` where `prot` does not let us read the source.
///
/// # Safety
/// The source is mapped and not written meanwhile; `tmp` is a writable
/// mapping of `len` bytes apart from it; no Rust reference points into
/// either.
unsafe fn copy_into(src: usize, tmp: usize, len: usize, prot: libc::c_int) -> std::io::Result<()> {
    if prot & libc::PROT_READ == 0 {
        // SAFETY: `tmp` is a writable mapping of `len` bytes, apart from the
        // source, with no other reference into it (the caller's guarantee).
        let buf = unsafe { std::slice::from_raw_parts_mut(tmp as *mut u8, len) };
        crate::guest::read_unreadable(src, buf)
    } else {
        // SAFETY: as above, and the source is readable.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, tmp as *mut u8, len) };
        Ok(())
    }
}

/// Makes a fresh writable mapping of `len` bytes with `(flags, fd, offset)`,
/// lets `fill` write it (given its address), gives it `prot`, and moves it
/// over `[dst, dst+len)` with `mremap` in one step. On an error the fresh
/// mapping goes and `dst` is as it was.
///
/// # Safety
/// The destination must be owned by the caller, with no Rust reference into
/// it; `fill` may write only the fresh mapping. An error from `fill` is
/// returned with nothing moved.
pub(crate) unsafe fn fill_and_move(
    dst: usize,
    len: usize,
    prot: libc::c_int,
    (flags, fd, off): (libc::c_int, libc::c_int, libc::off_t),
    fill: impl FnOnce(usize) -> std::io::Result<()>,
) -> std::io::Result<()> {
    // SAFETY: a fresh mapping at an address the kernel picks.
    let tmp = unsafe { mman::raw_mmap(0, len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, off)? };
    let _own = crate::own::OwnMemory::add(tmp, tmp + len);
    // SAFETY: `tmp` is ours and given up; the rest is the caller's guarantee.
    unsafe { fill_and_move_from(tmp, dst, len, prot, fill) }
}

/// [`fill_and_move`] in a writable mapping the caller gives up (`tmp`, `len`
/// bytes): filled, given `prot` and moved over `dst`, or unmapped on an error.
///
/// # Safety
/// As [`fill_and_move`]; and `tmp` is a writable private mapping of `len`
/// bytes the caller owns, apart from `dst`, with no Rust reference into it.
unsafe fn fill_and_move_from(
    tmp: usize,
    dst: usize,
    len: usize,
    prot: libc::c_int,
    fill: impl FnOnce(usize) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    if let Err(e) = fill(tmp) {
        // SAFETY: our own fresh mapping.
        let _ = unsafe { mman::raw_munmap(tmp, len) };
        return Err(e);
    }
    if prot != rw {
        // SAFETY: our own fresh mapping.
        if let Err(e) = unsafe { mman::mprotect(tmp, len, prot) } {
            // SAFETY: still our own fresh mapping.
            let _ = unsafe { mman::raw_munmap(tmp, len) };
            return Err(e);
        }
    }
    // SAFETY: moves our fresh mapping, holding what `fill` wrote, over the
    // range the caller owns.
    match unsafe { mman::raw_mremap(tmp, len, len, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, dst) } {
        Ok(_) => Ok(()),
        Err(e) => {
            // SAFETY: still our own fresh mapping.
            let _ = unsafe { mman::raw_munmap(tmp, len) };
            Err(e)
        }
    }
}

/// Replaces `[addr, addr+len)` with private anonymous memory holding the same
/// content, for a single-threaded caller (the child after fork) that cannot
/// use the engine: no write can race it.
///
/// # Safety
/// The range must be mapped readable, owned by the caller, with no other
/// thread running, and no Rust reference into it.
pub unsafe fn replace_with_anon_copy(addr: usize, len: usize, prot: libc::c_int) -> std::io::Result<()> {
    // SAFETY: the caller's guarantees are copy_over's.
    unsafe { copy_over(addr, addr, len, prot, (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)) }
}
