//! The engine's state: what its threads share ([`Shared`]), and the trees,
//! store allocation, counters and cursor one batch decides on ([`Core`],
//! behind one lock). The scanner, the merge protocol, the fault thread and
//! unmerging all work on it; it knows none of them.

use crate::advisor;
use crate::inflight::InFlight;
use crate::map_budget::MapBudget;
use crate::primitive::{Arc, RwLock};
use crate::region::{Mergeability, PageRecord, PageState, Region, RegionState, Registry};
use crate::stats::{KsmStats, Stats};
use crate::store::{Store, StoreAlloc};
use crate::sys::pagemap::Pagemap;
use crate::sys::uffd::Userfaultfd;
use crate::sys::PAGE_SIZE;
use crate::tree::{PageRef, StableTree, UnstableTree};
use crate::tunables::Tunables;
use crate::warn_once;

/// What the engine's threads share.
#[derive(Debug)]
pub(crate) struct Shared {
    uffd: Userfaultfd,
    pagemap: Pagemap,
    store: Store,
    inflight: InFlight,
    tunables: Tunables,
    stats: Stats,
    registry: RwLock<Registry>,
    core: crate::primitive::Mutex<Core>,
    /// Where twinpaged is, if this engine should use it.
    daemon: parking_lot::Mutex<Option<crate::link::DaemonConfig>>,
    /// The daemon socket's fd while connected (-1 otherwise), for a forked
    /// child to close without touching the core lock.
    daemon_fd: std::sync::atomic::AtomicI32,
    /// Where the pin check moves pages while it looks at them (`merge::pin`).
    scratch: parking_lot::Mutex<Option<crate::scratch::Scratch>>,
    /// Every store this process may map: its own and each daemon's it was
    /// linked to (mappings of a store outlive the link that brought it).
    stores: parking_lot::Mutex<Vec<crate::sys::file::FileId>>,
    /// Tells this engine's core from another's ([`Core::own_page`]).
    id: u64,
}

/// Engines made in this process so far: each `Shared` and its `Core` share a number.
static ENGINES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Shared {
    /// The userfaultfd every registered range is on.
    pub(crate) fn uffd(&self) -> &Userfaultfd {
        &self.uffd
    }

    /// This process's `/proc/self/pagemap`.
    pub(crate) fn pagemap(&self) -> &Pagemap {
        &self.pagemap
    }

    /// The engine's own store.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Ranges a merge has write-protected, for the fault thread.
    pub(crate) fn inflight(&self) -> &InFlight {
        &self.inflight
    }

    /// The tunables, as the user wrote them.
    pub(crate) fn tunables(&self) -> &Tunables {
        &self.tunables
    }

    /// The published counts.
    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The registered regions.
    pub(crate) fn registry(&self) -> &RwLock<Registry> {
        &self.registry
    }

    /// Trees, store allocation and counts (the engine's lock order: a region's lock, then this).
    pub(crate) fn core(&self) -> &crate::primitive::Mutex<Core> {
        &self.core
    }

    /// Where twinpaged is, if this engine should use it.
    pub(crate) fn daemon(&self) -> &parking_lot::Mutex<Option<crate::link::DaemonConfig>> {
        &self.daemon
    }

    /// The daemon socket's fd while connected (-1 otherwise).
    pub(crate) fn daemon_fd(&self) -> &std::sync::atomic::AtomicI32 {
        &self.daemon_fd
    }

    /// Where the pin check moves pages while it looks at them.
    pub(crate) fn scratch(&self) -> &parking_lot::Mutex<Option<crate::scratch::Scratch>> {
        &self.scratch
    }

    /// Every store this process may map.
    pub(crate) fn stores(&self) -> &parking_lot::Mutex<Vec<crate::sys::file::FileId>> {
        &self.stores
    }

    /// Runs `f` on region `id` under its lock, if the lock is free and the
    /// region alive (`region::with_region_if_free`).
    pub(crate) fn with_region_if_free<R>(&self, id: u32, f: impl FnOnce(&Region, &mut RegionState) -> R) -> Option<R> {
        crate::region::with_region_if_free(&self.registry, id, f)
    }

    /// A fresh engine's state around its kernel handles and store.
    pub(crate) fn new(uffd: Userfaultfd, pagemap: Pagemap, store: Store) -> Self {
        let stores = store.file_id().into_iter().collect();
        let id = ENGINES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            id,
            stores: parking_lot::Mutex::new(stores),
            uffd,
            pagemap,
            store,
            inflight: InFlight::default(),
            tunables: Tunables::default(),
            stats: Stats::default(),
            registry: RwLock::new(Registry::default()),
            core: crate::primitive::Mutex::new(Core::new(crate::maps::max_map_count(), id)),
            daemon: parking_lot::Mutex::new(None),
            daemon_fd: std::sync::atomic::AtomicI32::new(-1),
            scratch: parking_lot::Mutex::new(None),
        }
    }

    /// Adds the region `build` makes with its id to the registry, and its
    /// pages to the counters: the one way memory becomes registered
    /// (`Engine::register`, the bench harness).
    pub(crate) fn add_region(&self, build: impl FnOnce(u32) -> Region) -> Arc<Region> {
        let mut reg = self.registry.write();
        let region = Arc::new(build(reg.next_id()));
        reg.insert(region.clone());
        drop(reg);
        let mut core = self.core.lock();
        core.records_added(region.mergeability, region.pages as u64);
        core.counters.activity += 1;
        region
    }
}

/// Exact counts, kept under the core lock.
#[derive(Debug, Default, Clone)]
pub(crate) struct Counters {
    pub(crate) pages_scanned: u64,
    pub(crate) pages_skipped: u64,
    pub(crate) full_scans: u64,
    /// Pages dropped to the kernel's zero page (records in `Zero` state).
    pub(crate) zero_pages: u64,
    /// Of `zero_pages`, those dropped while `use_zero_pages` was 0: the
    /// kernel would have merged them into a KSM page of zeros, and the
    /// published counts show them that way (`Core::snapshot`).
    pub(crate) zero_as_ksm: u64,
    /// Records in `Hashed` state.
    pub(crate) hashed: u64,
    /// Of `hashed`, those whose last visit entered an unstable tree (this
    /// engine's, or twinpaged's: proposed, and not matched in the batch)
    /// ([`IN_UNSTABLE`] in their key): `pages_unshared`. As the
    /// kernel's count, a page stays in it until its next visit, across the
    /// end of a full scan that empties the tree (else the count would fall
    /// to 0 at each full scan and climb through the next).
    pub(crate) unshared: u64,
    pub(crate) merge_runs: u64,
    pub(crate) cow_breaks: u64,
    /// Copy-on-write breaks the kernel made inside a store mapping.
    pub(crate) cow_in_place: u64,
    pub(crate) mismatches: u64,
    /// Merges refused because the page was pinned (in-flight I/O) or not
    /// exclusive to this process (`UFFDIO_MOVE` said `EBUSY`).
    pub(crate) pinned_skipped: u64,
    /// Pages merged without the pin check (TWINPAGE_PIN_GUARD=0).
    pub(crate) merges_unchecked: u64,
    /// Scans of pages no pin check can cover, passed over.
    pub(crate) uncheckable_skipped: u64,
    pub(crate) records_bytes: u64,
    pub(crate) registered_pages: u64,
    pub(crate) unmergeable_pages: u64,
    /// Records merged into a daemon's store (REMOTE or ORPHAN).
    pub(crate) daemon_merged: u64,
    /// Merges held back because the store's filesystem was full.
    pub(crate) store_full: u64,
    /// Changes the scanner saw: a page's checksum changed, a page merged or
    /// was written after merging, memory was registered. A full scan that
    /// saw none was idle.
    pub(crate) activity: u64,
}

/// In a `Hashed` record's key (its checksum's top bit, which checksums
/// leave out): the page entered the unstable tree at its last visit.
pub(crate) const IN_UNSTABLE: u32 = 1 << 31;

/// Where the scanner is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) region_start: usize,
    /// The region's id: a region put in its place (a split, new memory at
    /// the same address) is visited from its first page.
    pub(crate) region: u32,
    pub(crate) page: usize,
    /// The cursor has passed no region yet in this full scan.
    pub(crate) fresh: bool,
}

/// The scanner's place in its pass ([`Core::scan_point`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScanPoint {
    cursor: Cursor,
    pass: u64,
    mark: u64,
}

impl ScanPoint {
    /// Where [`Registry::next_to_scan`] looks from (None: the pass has not
    /// begun), in which pass, up to which read mark.
    pub(crate) fn ask(&self, reg: &Registry) -> Option<Arc<Region>> {
        let from = (!self.cursor.fresh).then_some(self.cursor.region_start);
        reg.next_to_scan(from, self.pass, self.mark).cloned()
    }
}

/// The scanner's place changed while it asked the registry.
#[derive(Debug)]
pub(crate) struct Stale;

/// Trees, store allocation and counts: everything one batch decides on.
#[derive(Debug)]
pub(crate) struct Core {
    stable: StableTree,
    unstable: UnstableTree,
    alloc: StoreAlloc,
    counters: Counters,
    map_budget: MapBudget,
    cursor: Cursor,
    /// The scanner's passes begun (unlike `full_scans`, never reset): a
    /// region visited whole in the current one carries its number.
    pass: u64,
    /// `Registry::seq` when the counts were last read: the current pass
    /// ends only once it visited every region registered up to it.
    read_mark: u64,
    /// While non-zero, freed store pages are neither punched nor reused (a
    /// forked child may still map them until it has made its own copies).
    free_holds: u32,
    deferred_frees: Vec<u32>,
    /// The link to twinpaged, while connected.
    remote: Option<crate::link::Link>,
    /// The link broke and REMOTE records have not all been made orphans yet:
    /// no new link until they have (their keys name the old daemon's pages).
    remote_lost: bool,
    /// The agent id of the link that broke last, while its orphans
    /// (LAST_LINK) may still be taken back by the same daemon.
    last_link: Option<u32>,
    /// That link's store pages retired and not told (queued when it broke,
    /// or written in place over an orphan since): claimed and retired over
    /// the next link when the daemon hands the old one's references over,
    /// so it never hands them out again (`scan::remote::claim_last_link`).
    retired_orphans: Vec<u32>,
    /// `counters.activity` when the last full scan ended.
    activity_mark: u64,
    /// Full scans in a row that saw no activity.
    quiet_scans: u32,
    /// The scan-time advisor (`advisor_mode=scan-time`).
    advisor: advisor::Advisor,
    /// The loosest `twinpage_merge_mode` a scan batch merged under since
    /// the last time a stricter mode took back what it disallows: the
    /// scanner compares the mode with this, not with what it saw at its
    /// last wake (a switch to `all` and back within one wake merged pages).
    merged_under: crate::tunables::MergeMode,
    /// The engine (`Shared::id`) this core belongs to.
    engine: u64,
}

/// Events the pipeline reports to the counts (the counts themselves are
/// kept here, so that no stage can set one to a value of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tally {
    /// A page the scanner visited.
    Scanned,
    /// A page smart scan passed over.
    Skipped,
    /// A page no pin check can cover, passed over.
    Uncheckable,
    /// A change the scanner saw (see [`Counters::activity`]).
    Activity,
    /// Pages merged without the pin check.
    Unchecked,
    /// Merges held back for want of store space.
    StoreFull,
    /// A page that differed from its store page under write-protect.
    Mismatch,
    /// A stretch remapped onto the store.
    MergeRun,
    /// A page merged into a daemon's store.
    DaemonMerged,
    /// A merge refused because the page was pinned or not exclusive.
    Pinned,
}

impl Core {
    pub(crate) fn new(max_map_count: usize, engine: u64) -> Self {
        Self {
            engine,
            merged_under: crate::tunables::MergeMode::Off,
            stable: StableTree::default(),
            unstable: UnstableTree::default(),
            alloc: StoreAlloc::default(),
            counters: Counters::default(),
            map_budget: MapBudget::new(max_map_count),
            cursor: Cursor { fresh: true, ..Default::default() },
            pass: 1,
            read_mark: 0,
            free_holds: 0,
            deferred_frees: Vec::new(),
            remote: None,
            remote_lost: false,
            last_link: None,
            retired_orphans: Vec::new(),
            activity_mark: 0,
            quiet_scans: 0,
            advisor: advisor::Advisor::default(),
        }
    }

    /// The counts, to read.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counts `n` events of kind `t`.
    pub(crate) fn tally(&mut self, t: Tally, n: u64) {
        let c = &mut self.counters;
        let field = match t {
            Tally::Scanned => &mut c.pages_scanned,
            Tally::Skipped => &mut c.pages_skipped,
            Tally::Uncheckable => &mut c.uncheckable_skipped,
            Tally::Activity => &mut c.activity,
            Tally::Unchecked => &mut c.merges_unchecked,
            Tally::StoreFull => &mut c.store_full,
            Tally::Mismatch => &mut c.mismatches,
            Tally::MergeRun => &mut c.merge_runs,
            Tally::DaemonMerged => &mut c.daemon_merged,
            Tally::Pinned => &mut c.pinned_skipped,
        };
        *field += n;
    }

    /// The stable tree, to read (its changes go through the methods below,
    /// which keep the store allocation in step).
    pub(crate) fn stable(&self) -> &StableTree {
        &self.stable
    }

    /// A page with digest `hash` joins a stable page with room for one more
    /// sharer, if there is one: that page, reserved for it.
    pub(crate) fn reserve(&mut self, hash: u64, max_sharing: u32) -> Option<u32> {
        self.stable.reserve(hash, max_sharing)
    }

    /// A new store page for content with digest `hash`, right after store
    /// page `after` where that one is free, with `pending` merges reserved.
    pub(crate) fn new_store_page(&mut self, hash: u64, after: Option<u32>, pending: u32) -> u32 {
        let s = self.alloc.alloc(after);
        self.stable.insert(hash, s, pending);
        s
    }

    /// A store page whose content was written: merges after it compare
    /// against it.
    pub(crate) fn store_page_filled(&mut self, store: u32) {
        if let Some(n) = self.stable.node_mut(store) {
            n.set_filled();
        }
    }

    /// The digest of a store page's content, taken again once it was written.
    pub(crate) fn rekey(&mut self, store: u32, hash: u64) {
        self.stable.rekey(store, hash);
    }

    /// A reserved merge into `store` was done.
    pub(crate) fn commit(&mut self, store: u32) {
        self.stable.commit(store);
    }

    /// A reserved merge into `store` was not done; a store page nobody
    /// holds then goes.
    pub(crate) fn cancel(&mut self, sh: &Shared, store: u32) {
        if self.stable.cancel(store) {
            self.free_store_page(sh, store);
        }
    }

    /// The bytes of this engine's filled store page `store`, for as long as
    /// the core is borrowed: a store page is freed only through `&mut Core`
    /// ([`Core::free_store_page`]), and a filled one is never written again.
    /// None if it is not filled, or `sh` is another engine's.
    pub(crate) fn own_page<'c>(&'c self, sh: &'c Shared, store: u32) -> Option<&'c [u8]> {
        if sh.id != self.engine {
            return None;
        }
        self.stable.node(store).filter(|n| n.filled())?;
        // SAFETY: filled (checked above), and in use until freed, which needs
        // `&mut self` while the bytes borrow `self`; `sh` is this core's engine.
        unsafe { sh.store.filled(store) }.ok()
    }

    /// The bytes of the daemon's store page `store`, for as long as the core
    /// (which holds the link) is borrowed.
    ///
    /// # Safety
    /// The daemon ordered this engine to join `store`, or it holds a
    /// reference to it: the daemon has filled the page and frees it only
    /// once no agent holds or was ordered it.
    pub(crate) unsafe fn daemon_page(&self, store: u32) -> Option<&[u8]> {
        // SAFETY: the caller's guarantee above.
        unsafe { self.remote.as_ref()?.store.filled(store) }.ok()
    }

    /// The unstable tree's page for digest `hash`.
    pub(crate) fn unstable_get(&self, hash: u64) -> Option<PageRef> {
        self.unstable.get(hash)
    }

    /// `page` is the unstable tree's page for `hash` from now on.
    pub(crate) fn unstable_insert(&mut self, hash: u64, page: PageRef) {
        self.unstable.insert(hash, page);
    }

    /// The unstable tree's page for `hash` was matched.
    pub(crate) fn unstable_remove(&mut self, hash: u64) {
        self.unstable.remove(hash);
    }

    /// The mapping budget, to read.
    pub(crate) fn map_budget(&self) -> &MapBudget {
        &self.map_budget
    }

    /// Whether a run of `pages` in `stretches` stretches may merge now
    /// (`MapBudget::admit`).
    pub(crate) fn admit(&mut self, pages: usize, stretches: usize) -> bool {
        self.map_budget.admit(pages, stretches)
    }

    /// Whether `maps` more mappings fit, for a remap of `pages` pages
    /// (`MapBudget::allow`).
    pub(crate) fn allow_mappings(&mut self, maps: usize, pages: u64) -> bool {
        self.map_budget.allow(maps, pages)
    }

    /// Counts this process's mappings again (`/proc/self/maps`).
    pub(crate) fn recount_mappings(&mut self) {
        self.map_budget.recount();
    }

    /// Where the scanner is.
    pub(crate) fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Where the scanner stands, for [`Registry::next_to_scan`] to be asked
    /// without this lock held (registrations hold the registry while this
    /// lock's other users wait).
    pub(crate) fn scan_point(&self) -> ScanPoint {
        ScanPoint { cursor: self.cursor, pass: self.pass, mark: self.read_mark }
    }

    /// Goes on from `at` (taken with [`Core::scan_point`]) to `next`, what
    /// the registry answered for it: the region and where in it, or None
    /// when the pass is over. `Err` when `at` no longer holds: a `run=2`
    /// restarted the scan, or, for the end of a pass, the counts were read
    /// with memory registered since, which this pass must then cover; ask
    /// again.
    ///
    /// A pass ends only once it visited every region registered before the
    /// counts were last read, those behind the cursor included: a program
    /// that marks memory mergeable, reads `full_scans` and waits for two
    /// more has had that memory looked at twice. (ksmd leaves memory
    /// behind its cursor to the next pass; its passes are short enough
    /// that a program practically never sees it, while one of ours that
    /// reads PROT_NONE pages through /proc/self/mem is not.)
    pub(crate) fn go_on(&mut self, at: ScanPoint, next: Option<Arc<Region>>) -> Result<Option<(Arc<Region>, Cursor)>, Stale> {
        let now = self.scan_point();
        if now.cursor != at.cursor || now.pass != at.pass || (next.is_none() && now.mark != at.mark) {
            return Err(Stale);
        }
        let Some(r) = next else { return Ok(None) };
        let cur = self.cursor;
        if cur.fresh || r.id != cur.region || r.start != cur.region_start {
            self.cursor = Cursor { region_start: r.start, region: r.id, page: 0, fresh: false };
        }
        Ok(Some((r, self.cursor)))
    }

    /// The scanner visited the last page of `r` in this pass.
    pub(crate) fn region_scanned(&mut self, r: &Region) {
        r.set_scanned_in(self.pass);
        self.cursor = Cursor { region_start: r.start, region: r.id, page: r.pages, fresh: false };
    }

    /// The pass is over without a full scan to count (nothing registered):
    /// the next begins at the first region.
    pub(crate) fn rewind(&mut self) {
        self.pass += 1;
        self.cursor = Cursor { fresh: true, ..Default::default() };
    }

    /// Someone may have read the counts now, with `seq` regions registered.
    pub(crate) fn counts_read(&mut self, seq: u64) {
        self.read_mark = self.read_mark.max(seq);
    }

    /// The scanner finished a batch ending before `page` of its region. Only
    /// the page: a `run=2` meanwhile may have restarted the cursor
    /// ([`Core::restart_scanning`]), and that restart stands.
    pub(crate) fn set_cursor_page(&mut self, page: usize) {
        self.cursor.page = page;
    }

    /// `run=2` took every merge back: the next scan starts from nothing, as
    /// ksmd's does after unmerging (`full_scans` from 0, an empty unstable
    /// tree, the cursor at the first region).
    pub(crate) fn restart_scanning(&mut self) {
        self.unstable.clear();
        self.rewind();
        self.counters.full_scans = 0;
    }

    /// The link to twinpaged, while connected.
    pub(crate) fn link(&self) -> Option<&crate::link::Link> {
        self.remote.as_ref()
    }

    /// The link to twinpaged, to queue reports on or ask.
    pub(crate) fn link_mut(&mut self) -> Option<&mut crate::link::Link> {
        self.remote.as_mut()
    }

    /// A new link to twinpaged: the scanner is not idle (it has news).
    pub(crate) fn linked(&mut self, link: crate::link::Link) {
        self.remote = Some(link);
        self.counters.activity += 1;
    }

    /// A forked child may map store pages freed from now on: keep them
    /// (neither punched nor reused) until [`Core::release_free_hold`].
    pub(crate) fn hold_frees(&mut self) {
        self.free_holds += 1;
    }

    /// One hold ends; with the last, the store pages freed meanwhile go.
    pub(crate) fn release_free_hold(&mut self, sh: &Shared) {
        self.free_holds -= 1;
        if self.free_holds == 0 {
            for idx in std::mem::take(&mut self.deferred_frees) {
                self.free_store_page(sh, idx);
            }
        }
    }

    /// Sends what is queued for the daemon; while frees are held, releases
    /// stay queued (a forked child may still map those store pages). A
    /// broken link is let go: the engine goes on alone.
    pub(crate) fn flush_link(&mut self, sh: &Shared) {
        if let (Some(link), 0) = (self.remote.as_mut(), self.free_holds) {
            if let Err(e) = link.flush() {
                self.lose_remote(sh, &e);
            }
        }
    }

    /// The link broke and its merges are not all orphans yet.
    pub(crate) fn link_lost(&self) -> bool {
        self.remote_lost
    }

    /// Every merge of the lost link is an orphan now: a new link may come.
    pub(crate) fn orphans_made(&mut self) {
        self.remote_lost = false;
    }

    /// The agent id of the link that broke last, while the same daemon may
    /// still take its orphans back.
    pub(crate) fn last_link(&self) -> Option<u32> {
        self.last_link
    }

    /// The lost link's orphans were taken back, or will never be.
    pub(crate) fn forget_last_link(&mut self) {
        self.last_link = None;
        self.retired_orphans.clear();
    }

    /// The last link's store pages retired since it broke, to claim and
    /// retire over the new one.
    pub(crate) fn take_retired_orphans(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.retired_orphans)
    }

    /// A batch merges under `mode`: the loosest since a stricter mode last
    /// took back what it disallows is what the next stricter mode compares with.
    pub(crate) fn merging_under(&mut self, mode: crate::tunables::MergeMode) {
        self.merged_under = self.merged_under.min(mode);
    }

    /// Whether pages may have merged under a looser mode than `now` (and so
    /// `now` must take some back); if not, `now` is the mode from here on.
    pub(crate) fn merged_looser_than(&mut self, now: crate::tunables::MergeMode) -> bool {
        if now <= self.merged_under {
            self.merged_under = now;
            return false;
        }
        true
    }

    /// A stricter mode took back what it disallows: batches merge under
    /// `now` at the loosest from here on.
    pub(crate) fn merge_mode_enforced(&mut self, now: crate::tunables::MergeMode) {
        self.merged_under = now;
    }

    /// `pages` records of a region of `m` came (`Shared::add_region`).
    fn records_added(&mut self, m: Mergeability, pages: u64) {
        self.counters.records_bytes += pages * std::mem::size_of::<PageRecord>() as u64;
        self.counters.registered_pages += pages;
        if m == Mergeability::ScanOnly {
            self.counters.unmergeable_pages += pages;
        }
    }

    /// `pages` records of a region of `m` went (`unmerge::remove_range`).
    pub(crate) fn records_gone(&mut self, m: Mergeability, pages: u64) {
        self.counters.records_bytes -= pages * std::mem::size_of::<PageRecord>() as u64;
        self.counters.registered_pages -= pages;
        if m == Mergeability::ScanOnly {
            self.counters.unmergeable_pages -= pages;
        }
    }

    /// Whether nothing changed during the last full scan nor since.
    pub(crate) fn idle(&self) -> bool {
        self.quiet_scans > 0 && self.counters.activity == self.activity_mark
    }

    /// A merged record stops mapping its store page: the reference goes back
    /// to whoever counts it (our stable tree, or the daemon's broker).
    pub(crate) fn release_record(&mut self, sh: &Shared, rec: &mut PageRecord) {
        self.release_record_as(sh, rec, false);
    }

    /// [`Core::release_record`]; `retire`: the store page is never handed
    /// out again once freed ([`crate::store::StoreAlloc::retire`]).
    fn release_record_as(&mut self, sh: &Shared, rec: &mut PageRecord, retire: bool) {
        if rec.flags() & (PageRecord::REMOTE | PageRecord::ORPHAN) != 0 {
            self.counters.daemon_merged -= 1;
            // A page of a link that broke is simply not claimed when the
            // daemon hands that link's references over (`Holding`).
            if let (Some(link), true) = (self.remote.as_mut(), rec.flags() & PageRecord::REMOTE != 0) {
                if retire {
                    link.retired.push(rec.key());
                } else {
                    link.released.push(rec.key());
                }
            } else if retire && (rec.flags() & PageRecord::LAST_LINK != 0 || self.remote.is_none() && rec.flags() & PageRecord::REMOTE != 0)
            {
                // Of the link that broke last (REMOTE: not made an orphan yet).
                self.retired_orphans.push(rec.key());
            }
            rec.clear_flags(PageRecord::REMOTE | PageRecord::ORPHAN | PageRecord::LAST_LINK);
        } else {
            if retire {
                self.alloc.retire(rec.key());
            }
            self.release(sh, rec.key());
        }
    }

    /// A merged page was written where it is mapped, inside its store
    /// mapping (the kernel's copy-on-write, not `merge::cow`'s): it is the
    /// program's own page again, and no pin check can reach it there. It
    /// stays where it is for as long as the mapping lives, so the store
    /// page under it is retired: never handed out again once freed.
    pub(crate) fn written_in_place(&mut self, sh: &Shared, rec: &mut PageRecord) {
        rec.set_state(PageState::None);
        self.counters.cow_breaks += 1;
        self.counters.cow_in_place += 1;
        self.counters.activity += 1;
        self.release_record_as(sh, rec, true);
    }

    /// A merged page's first write was served by an anonymous copy moved
    /// over it (`merge::cow`): it is the program's own page again, in a
    /// mapping of its own, where the next merge checks it as any other.
    pub(crate) fn written_by_copy(&mut self, sh: &Shared, rec: &mut PageRecord) {
        self.release_record(sh, rec);
        rec.set_state(PageState::None);
        rec.set_age(0);
        rec.set_own_mapping();
        self.counters.cow_breaks += 1;
        self.counters.activity += 1;
    }

    /// The link to the daemon broke: go on alone.
    pub(crate) fn lose_remote(&mut self, sh: &Shared, why: &crate::link::LinkError) {
        if let Some(mut link) = self.remote.take() {
            self.last_link = Some(link.agent_id);
            self.retired_orphans = std::mem::take(&mut link.retired);
            sh.daemon_fd.store(-1, std::sync::atomic::Ordering::SeqCst);
            let why = crate::link::chain(why);
            log::warn!("twinpage: lost twinpaged ({why}); this process merges its own pages until it is back");
            self.remote_lost = true;
            self.counters.activity += 1;
        }
    }

    /// Whether the page's checksum is the one recorded at its last visit
    /// (unchanged for a scan: it may enter the unstable tree); if not, records
    /// `cks` for the next visit.
    /// Called after [`Core::visiting`] (the key then holds the checksum alone).
    pub(crate) fn note_checksum(&mut self, rec: &mut PageRecord, cks: u32) -> bool {
        let cks = cks & !IN_UNSTABLE;
        if rec.state() == PageState::Hashed && rec.key() == cks {
            return true;
        }
        if rec.state() != PageState::Hashed {
            self.counters.hashed += 1;
        }
        self.counters.activity += 1;
        rec.set_state(PageState::Hashed);
        rec.set_key(cks);
        false
    }

    /// Clears a `Hashed` record's place in the counts.
    pub(crate) fn forget_hashed(&mut self, rec: &PageRecord) {
        if rec.state() == PageState::Hashed {
            self.counters.hashed -= 1;
            self.counters.unshared -= u64::from(rec.key() & IN_UNSTABLE != 0);
        }
    }

    /// The scanner offers the page to a decider: the visit takes it out of
    /// `pages_unshared`, as the kernel's takes its rmap_item out of the
    /// unstable tree before it looks the page up in either tree.
    pub(crate) fn visiting(&mut self, rec: &mut PageRecord) {
        if rec.state() == PageState::Hashed && rec.key() & IN_UNSTABLE != 0 {
            self.counters.unshared -= 1;
            rec.set_key(rec.key() & !IN_UNSTABLE);
        }
    }

    /// A `Hashed` record's page entered the unstable tree at this visit.
    pub(crate) fn entered_unstable(&mut self, rec: &mut PageRecord) {
        if rec.state() == PageState::Hashed && rec.key() & IN_UNSTABLE == 0 {
            rec.set_key(rec.key() | IN_UNSTABLE);
            self.counters.unshared += 1;
        }
    }

    /// Returns a store page nobody maps any more.
    pub(crate) fn free_store_page(&mut self, sh: &Shared, idx: u32) {
        if self.free_holds > 0 {
            self.deferred_frees.push(idx);
            return;
        }
        if let Err(e) = sh.store.punch(idx, 1) {
            warn_once!("punch", "twinpage: cannot free store pages: {e}");
        }
        self.alloc.free(idx);
    }

    /// A merged page stopped sharing its store page.
    pub(crate) fn release(&mut self, sh: &Shared, idx: u32) {
        if self.stable.release(idx) {
            self.free_store_page(sh, idx);
        }
    }

    /// Drops every record of `records` from the trees and counts. For merged
    /// pages the caller guarantees their mappings are gone or unmerged.
    pub(crate) fn drop_records(&mut self, sh: &Shared, records: &mut [PageRecord]) {
        for rec in records.iter_mut() {
            match rec.state() {
                PageState::Hashed => self.forget_hashed(rec),
                PageState::Merged => self.release_record(sh, rec),
                PageState::Zero => self.zero_gone(rec),
                PageState::None => {}
            }
            rec.set_state(PageState::None);
        }
    }

    /// A page now maps the zero page; `as_ksm`: `use_zero_pages` is 0, so
    /// it counts as the kernel's merge into a KSM page of zeros.
    pub(crate) fn zero_added(&mut self, rec: &mut PageRecord, as_ksm: bool) {
        rec.set_state(PageState::Zero);
        rec.set_key(u32::from(as_ksm));
        self.counters.zero_pages += 1;
        self.counters.zero_as_ksm += u64::from(as_ksm);
    }

    /// A `Zero` record stops mapping the zero page (its state is the caller's).
    pub(crate) fn zero_gone(&mut self, rec: &PageRecord) {
        self.counters.zero_pages -= 1;
        self.counters.zero_as_ksm -= u64::from(rec.key() == 1);
    }

    /// The published view of the counts. Zero pages dropped while
    /// `use_zero_pages` was 0 show as the kernel shows them: merged into KSM
    /// pages of zeros, each shared by at most `max_sharing` mappings
    /// (`pages_shared` the pages, `pages_sharing` the rest), not in
    /// `ksm_zero_pages`; what is saved is the same either way.
    pub(crate) fn snapshot(&self, regions: u64, store_bytes: u64, max_sharing: u64) -> KsmStats {
        let c = &self.counters;
        let zero_shared = c.zero_as_ksm.div_ceil(max_sharing.max(2));
        let shared = self.stable.pages_shared() + zero_shared;
        let sharing = self.stable.pages_sharing() + (c.zero_as_ksm - zero_shared);
        let unshared = c.unshared;
        let rmap_items = c.hashed + shared + sharing + c.daemon_merged;
        let metadata = c.records_bytes
            + self.stable.metadata_bytes()
            + self.unstable.metadata_bytes()
            + self.alloc.metadata_bytes()
            + regions * std::mem::size_of::<Region>() as u64;
        let saved = (self.stable.pages_sharing() + c.zero_pages) * PAGE_SIZE as u64;
        KsmStats {
            pages_shared: shared,
            pages_sharing: sharing,
            pages_unshared: unshared,
            pages_volatile: c.hashed.saturating_sub(unshared),
            pages_scanned: c.pages_scanned,
            pages_skipped: c.pages_skipped,
            full_scans: c.full_scans,
            ksm_zero_pages: c.zero_pages - c.zero_as_ksm,
            stable_node_chains: self.stable.chains(),
            stable_node_dups: self.stable.dups(),
            rmap_items,
            twinpage_metadata_bytes: metadata,
            twinpage_mappings_added: self.map_budget.added_total,
            twinpage_map_count: self.map_budget.current() as u64,
            twinpage_map_limit: self.map_budget.limit as u64,
            twinpage_merges_held_back: self.map_budget.held_back,
            twinpage_pages_held_back: self.map_budget.held_last_pass,
            twinpage_merge_runs: c.merge_runs,
            twinpage_cow_breaks: c.cow_breaks,
            twinpage_cow_in_place: c.cow_in_place,
            twinpage_merge_mismatches: c.mismatches,
            twinpage_pinned_skipped: c.pinned_skipped,
            twinpage_merges_unchecked: c.merges_unchecked,
            twinpage_uncheckable_skipped: c.uncheckable_skipped,
            twinpage_pages_unmergeable: c.unmergeable_pages,
            twinpage_pages_registered: c.registered_pages,
            twinpage_merging_pages: self.stable.sharers() + c.daemon_merged + c.zero_as_ksm,
            twinpage_daemon_merged: c.daemon_merged,
            twinpage_daemon_agents: u64::from(self.remote.is_some()),
            twinpage_daemon_proposals: 0,
            twinpage_store_bytes: store_bytes,
            twinpage_store_full: c.store_full,
            general_profit: saved as i64 - metadata as i64,
        }
    }

    pub(crate) fn end_full_scan(&mut self, sh: &Shared) {
        self.counters.full_scans += 1;
        self.rewind();
        // Under twinpaged the rate is one budget for all its agents; the
        // advisor steers a process merging on its own.
        if self.remote.is_none() {
            self.advisor.full_scan_ended(&sh.tunables);
        }
        if self.counters.activity == self.activity_mark {
            self.quiet_scans = self.quiet_scans.saturating_add(1);
        } else {
            self.quiet_scans = 0;
        }
        self.activity_mark = self.counters.activity;
        self.unstable.clear();
        self.map_budget.recount_at_full_scan();
        if let Some(link) = self.remote.as_mut() {
            if let Err(e) = link.full_scan() {
                self.lose_remote(sh, &e);
            }
        }
    }
}

/// Runs `f` on every live region, under its lock and then the core lock
/// (the engine's lock order).
pub(crate) fn each_live_region(sh: &Shared, mut f: impl FnMut(&Region, &mut RegionState, &mut Core)) {
    let regions: Vec<Arc<Region>> = sh.registry.read().iter().cloned().collect();
    for r in regions {
        let mut st = r.state.write();
        if st.dead {
            continue;
        }
        let mut core = sh.core.lock();
        f(&r, &mut st, &mut core);
    }
}

/// `full_scans` as of now, read as a program reading the counts reads it
/// (a pass then also covers every region registered so far), without
/// publishing the other counts.
pub(crate) fn read_full_scans(sh: &Shared) -> u64 {
    let seq = sh.registry.read().seq();
    let mut core = sh.core.lock();
    core.counts_read(seq);
    core.counters.full_scans
}

/// Publishes the counts.
pub fn publish(sh: &Shared) {
    let (regions, seq) = {
        let reg = sh.registry.read();
        (reg.len() as u64, reg.seq())
    };
    let store_bytes = sh.store.allocated_bytes().unwrap_or(0);
    let mut core = sh.core.lock();
    core.counts_read(seq);
    let snap = core.snapshot(regions, store_bytes, u64::from(sh.tunables.max_page_sharing()));
    // Under the lock: a publisher that took its snapshot earlier would
    // otherwise store it over this one (a count read fresh going back).
    sh.stats.publish(&snap);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::MappingKind;

    /// The scanner asks the registry without the core lock, then goes on
    /// only from where it asked; a pass ends only if no read of the counts
    /// raised the mark meanwhile.
    #[test]
    fn the_scanner_goes_on_only_from_where_it_asked() {
        let mut reg = Registry::default();
        let id = reg.next_id();
        let r = Arc::new(Region::new(id, 0x10_000, 1, MappingKind::Anon, Mergeability::Mergeable, 0, vec![PageRecord::default()]));
        reg.insert(r.clone());
        let mut core = Core::new(65530, 0);
        let at = core.scan_point();
        let next = at.ask(&reg);
        let (found, cur) = core.go_on(at, next).unwrap().unwrap();
        assert_eq!((found.id, cur.page, cur.fresh), (id, 0, false));
        core.region_scanned(&r);
        let at = core.scan_point();
        assert!(at.ask(&reg).is_none(), "the only region is visited");
        core.counts_read(reg.seq());
        assert!(core.go_on(at, None).is_err(), "a read since: the end of the pass is asked again");
        let at = core.scan_point();
        assert!(matches!(core.go_on(at, None), Ok(None)));
        core.restart_scanning();
        assert!(core.go_on(at, Some(r)).is_err(), "run=2 restarted the scan");
    }
}
