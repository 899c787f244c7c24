//! The scanner: walks registered pages `pages_to_scan` per wake, in the
//! kernel's order and with its rules (a page joins a store page found in the
//! stable tree at once; otherwise its checksum must stay the same for one full
//! scan before it enters the unstable tree, where a second identical page
//! makes a new store page). Decisions are collected per batch, then merged
//! run by run so that consecutive pages cost one remap.

use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use crate::broker::proto::Candidate;
use crate::guest::read_page;
use crate::inflight::InFlight;
use crate::merge::{self, is_zero, Item, RunKind};
use crate::primitive::{Arc, RwLock};
use crate::region::{Mergeability, PageRecord, PageState, Region, RegionState, Registry};
use crate::stats::{KsmStats, Stats};
use crate::store::{Store, StoreAlloc};
use crate::sys::pagemap::{PageEntry, Pagemap};
use crate::sys::uffd::Userfaultfd;
use crate::sys::{mman, PAGE_SIZE};
use crate::tree::{PageRef, StableTree, UnstableTree};
use crate::tunables::{MergeMode, Tunables};
use crate::warn_once;

pub mod advisor;
pub mod remote;

/// Pages handled under one region lock.
pub const BATCH_PAGES: usize = 512;

/// The content hash: stable-tree and unstable-tree key; its low 32 bits are
/// the checksum that must stay unchanged for a scan.
pub fn page_hash(page: &[u8]) -> u64 {
    xxh3_64(page)
}

/// Hash of an all-zero page.
pub fn zero_hash() -> u64 {
    static ZERO: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| page_hash(&[0u8; PAGE_SIZE]))
}

/// What the engine's threads share.
#[derive(Debug)]
pub struct Shared {
    pub uffd: Userfaultfd,
    pub pagemap: Pagemap,
    pub store: Store,
    pub inflight: InFlight,
    pub tunables: Tunables,
    pub stats: Stats,
    pub registry: RwLock<Registry>,
    pub core: crate::primitive::Mutex<Core>,
    /// Where twinpaged is, if this engine should use it.
    pub daemon: parking_lot::Mutex<Option<crate::link::DaemonConfig>>,
    /// The daemon socket's fd while connected (-1 otherwise), for a forked
    /// child to close without touching the core lock.
    pub daemon_fd: std::sync::atomic::AtomicI32,
    /// Where the pin check moves pages while it looks at them (`merge::pin`).
    pub scratch: parking_lot::Mutex<Option<crate::merge::Scratch>>,
    /// Every store this process may map: its own and each daemon's it was
    /// linked to (mappings of a store outlive the link that brought it).
    pub stores: parking_lot::Mutex<Vec<crate::sys::file::FileId>>,
}

impl Shared {
    /// A fresh engine's state around its kernel handles and store.
    pub fn new(uffd: Userfaultfd, pagemap: Pagemap, store: Store) -> Self {
        let stores = store.file_id().into_iter().collect();
        Self {
            stores: parking_lot::Mutex::new(stores),
            uffd,
            pagemap,
            store,
            inflight: InFlight::default(),
            tunables: Tunables::default(),
            stats: Stats::default(),
            registry: RwLock::new(Registry::default()),
            core: crate::primitive::Mutex::new(Core::new(crate::maps::max_map_count())),
            daemon: parking_lot::Mutex::new(None),
            daemon_fd: std::sync::atomic::AtomicI32::new(-1),
            scratch: parking_lot::Mutex::new(None),
        }
    }
}

/// Exact counts, kept under the core lock.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub pages_scanned: u64,
    pub pages_skipped: u64,
    pub full_scans: u64,
    /// Pages dropped to the kernel's zero page (records in `Zero` state).
    pub zero_pages: u64,
    /// Of `zero_pages`, those dropped while `use_zero_pages` was 0: the
    /// kernel would have merged them into a KSM page of zeros, and the
    /// published counts show them that way (`Core::snapshot`).
    pub zero_as_ksm: u64,
    /// Records in `Hashed` state.
    pub hashed: u64,
    pub merge_runs: u64,
    pub cow_breaks: u64,
    /// Copy-on-write breaks the kernel made inside a store mapping.
    pub cow_in_place: u64,
    pub mismatches: u64,
    /// Merges refused because the page was pinned (in-flight I/O) or not
    /// exclusive to this process (`UFFDIO_MOVE` said `EBUSY`).
    pub pinned_skipped: u64,
    /// Pages merged without the pin check (TWINPAGE_PIN_GUARD=0).
    pub merges_unchecked: u64,
    /// Scans of pages no pin check can cover, passed over.
    pub uncheckable_skipped: u64,
    pub records_bytes: u64,
    pub registered_pages: u64,
    pub unmergeable_pages: u64,
    /// Records merged into a daemon's store (REMOTE or ORPHAN).
    pub daemon_merged: u64,
    /// Merges held back because the store's filesystem was full.
    pub store_full: u64,
    /// Changes the scanner saw: a page's checksum changed, a page merged or
    /// was written after merging, memory was registered. A full scan that
    /// saw none was idle.
    pub activity: u64,
}

/// The mapping budget: twinpage's remaps split mappings, and the kernel caps a
/// process at `vm.max_map_count`. Stay under it with headroom so the host
/// program's own mmap never fails because of us.
#[derive(Debug)]
pub struct MapBudget {
    pub limit: usize,
    counted: usize,
    since_count: usize,
    pub added_total: u64,
    pub held_back: u64,
    /// Pages held back in the pass under way, and in the last whole pass
    /// that held any back (kept until [`HELD_FOR`](Self::HELD_FOR) passes
    /// without: under twinpaged, the orders for held-back pages come in
    /// some passes, not every one).
    held_this_pass: u64,
    pub held_last_pass: u64,
    held_at: Option<Instant>,
    /// The first refusal was logged (once a process).
    warned: bool,
    last_count: Option<Instant>,
}

impl MapBudget {
    pub fn new(max_map_count: usize) -> Self {
        Self {
            limit: Self::limit_for(max_map_count),
            counted: crate::maps::map_count().unwrap_or(0),
            since_count: 0,
            added_total: 0,
            held_back: 0,
            held_this_pass: 0,
            held_last_pass: 0,
            held_at: None,
            warned: false,
            last_count: Some(Instant::now()),
        }
    }

    /// The count twinpage stays under for a `vm.max_map_count`: the rest is
    /// headroom for the program's own mappings.
    pub fn limit_for(max_map_count: usize) -> usize {
        let headroom = (max_map_count / 8).clamp(64, 8192);
        max_map_count.saturating_sub(headroom)
    }

    /// The `vm.max_map_count` under which [`limit_for`](Self::limit_for)
    /// gives `limit`: what a process needing `limit` mappings asks for.
    pub fn max_map_count_for(limit: usize) -> usize {
        let with = limit + (limit / 7).clamp(64, 8192);
        with.div_ceil(65536) * 65536
    }

    /// Whether `maps` more mappings would fit (recounting when the estimate
    /// says no and the last count is stale); reserves nothing.
    pub fn has_room(&mut self, maps: usize) -> bool {
        // The estimate adds two mappings a remap: mostly too many (a remap
        // beside one of ours merges with it), sometimes too few (splits we do
        // not see drift it about 1% low). Count again once the additions
        // since the last count reach half the room that count left: a few
        // counts on the way to the limit, each halving the error's reach.
        // Held back at the limit, count again now and then.
        let room = self.limit.saturating_sub(self.counted);
        if self.since_count > 0 && self.since_count + maps >= room.div_ceil(2) {
            self.recount();
        } else if self.counted + self.since_count + maps > self.limit {
            self.recount_if_older(Self::RECOUNT_HELD_BACK);
        }
        self.counted + self.since_count + maps <= self.limit
    }

    /// Reserves room for `maps` new mappings (covering `pages` pages).
    pub fn allow(&mut self, maps: usize, pages: u64) -> bool {
        if !self.has_room(maps) {
            self.hold_back(pages);
            return false;
        }
        self.since_count += maps;
        self.added_total += maps as u64;
        true
    }

    /// Counts `pages` not merged for want of room; the first time (in this
    /// process) says so in the log, with the command that fixes it.
    pub fn hold_back(&mut self, pages: u64) {
        self.held_back += pages;
        self.held_this_pass += pages;
        if !self.warned && pages > 0 {
            self.warned = true;
            let max = crate::maps::max_map_count();
            let want = Self::max_map_count_for(self.limit * 4).max(1 << 20);
            log::warn!(
                "twinpage: merges held back by vm.max_map_count={max}: this process has {} mappings of the {} twinpage may use, and each merged page that stands alone costs one (kernel KSM needs none); `sysctl -w vm.max_map_count={want}` lets them merge (twinpaged running as root raises it itself)",
                self.current(),
                self.limit
            );
        }
    }

    /// Counting reads all of /proc/self/maps, whose cost grows with the
    /// mappings (tens of ms at 60k): while merges are held back at most once
    /// a second; at the end of a full scan every few seconds.
    const RECOUNT_HELD_BACK: Duration = Duration::from_secs(1);
    const RECOUNT_FULL_SCAN: Duration = Duration::from_secs(3);
    /// How long a held-back count stays published without a new one.
    const HELD_FOR: Duration = Duration::from_secs(10);

    /// At the end of a full scan: every few seconds (the published count).
    pub fn recount_at_full_scan(&mut self) {
        let held = std::mem::take(&mut self.held_this_pass);
        if held > 0 {
            self.held_last_pass = held;
            self.held_at = Some(Instant::now());
        } else if self.held_at.is_none_or(|t| t.elapsed() > Self::HELD_FOR) {
            self.held_last_pass = 0;
        }
        self.recount_if_older(Self::RECOUNT_FULL_SCAN);
    }

    /// Recounts if the last count is older than `age`.
    pub fn recount_if_older(&mut self, age: Duration) {
        if self.last_count.is_none_or(|t| t.elapsed() > age) {
            self.recount();
        }
    }

    /// Counts the process's mappings again, and reads the limit again (an
    /// operator or twinpaged may have raised it).
    pub fn recount(&mut self) {
        self.limit = Self::limit_for(crate::maps::max_map_count());
        if let Ok(n) = crate::maps::map_count() {
            self.counted = n;
            self.since_count = 0;
            self.last_count = Some(Instant::now());
        }
    }

    pub fn current(&self) -> usize {
        self.counted + self.since_count
    }
}

/// Where the scanner is.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor {
    pub region_start: usize,
    pub page: usize,
    /// The cursor has passed no region yet in this full scan.
    pub fresh: bool,
}

/// Trees, store allocation and counts: everything one batch decides on.
#[derive(Debug)]
pub struct Core {
    pub stable: StableTree,
    pub unstable: UnstableTree,
    pub alloc: StoreAlloc,
    pub counters: Counters,
    pub map_budget: MapBudget,
    pub cursor: Cursor,
    /// While non-zero, freed store pages are neither punched nor reused (a
    /// forked child may still map them until it has made its own copies).
    pub free_holds: u32,
    pub deferred_frees: Vec<u32>,
    /// The link to twinpaged, while connected.
    pub remote: Option<crate::link::Link>,
    /// The link broke and REMOTE records have not all been made orphans yet:
    /// no new link until they have (their keys name the old daemon's pages).
    pub remote_lost: bool,
    /// The agent id of the link that broke last, while its orphans
    /// (LAST_LINK) may still be taken back by the same daemon.
    pub last_link: Option<u32>,
    /// `counters.activity` when the last full scan ended.
    activity_mark: u64,
    /// Full scans in a row that saw no activity.
    quiet_scans: u32,
    /// The scan-time advisor (`advisor_mode=scan-time`).
    advisor: advisor::Advisor,
}

impl Core {
    pub fn new(max_map_count: usize) -> Self {
        Self {
            stable: StableTree::default(),
            unstable: UnstableTree::default(),
            alloc: StoreAlloc::default(),
            counters: Counters::default(),
            map_budget: MapBudget::new(max_map_count),
            cursor: Cursor { fresh: true, ..Default::default() },
            free_holds: 0,
            deferred_frees: Vec::new(),
            remote: None,
            remote_lost: false,
            last_link: None,
            activity_mark: 0,
            quiet_scans: 0,
            advisor: advisor::Advisor::default(),
        }
    }

    /// Whether nothing changed during the last full scan nor since.
    pub fn idle(&self) -> bool {
        self.quiet_scans > 0 && self.counters.activity == self.activity_mark
    }

    /// A merged record stops mapping its store page: the reference goes back
    /// to whoever counts it (our stable tree, or the daemon's broker).
    pub fn release_record(&mut self, sh: &Shared, rec: &mut PageRecord) {
        if rec.flags() & (PageRecord::REMOTE | PageRecord::ORPHAN) != 0 {
            self.counters.daemon_merged -= 1;
            // A page of a link that broke is simply not claimed when the
            // daemon hands that link's references over (`Holding`).
            if let (Some(link), true) = (self.remote.as_mut(), rec.flags() & PageRecord::REMOTE != 0) {
                link.released.push(rec.key());
            }
            rec.clear_flags(PageRecord::REMOTE | PageRecord::ORPHAN | PageRecord::LAST_LINK);
        } else {
            self.release(sh, rec.key());
        }
    }

    /// The link to the daemon broke: go on alone.
    pub fn lose_remote(&mut self, sh: &Shared, why: &crate::link::LinkError) {
        if let Some(link) = self.remote.take() {
            self.last_link = Some(link.agent_id);
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
    pub fn note_checksum(&mut self, rec: &mut PageRecord, cks: u32) -> bool {
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
    pub fn forget_hashed(&mut self, rec: &PageRecord) {
        if rec.state() == PageState::Hashed {
            self.counters.hashed -= 1;
        }
    }

    /// Returns a store page nobody maps any more.
    pub fn free_store_page(&mut self, sh: &Shared, idx: u32) {
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
    pub fn release(&mut self, sh: &Shared, idx: u32) {
        if self.stable.release(idx) {
            self.free_store_page(sh, idx);
        }
    }

    /// Drops every record of `records` from the trees and counts. For merged
    /// pages the caller guarantees their mappings are gone or unmerged.
    pub fn drop_records(&mut self, sh: &Shared, records: &mut [PageRecord]) {
        for rec in records.iter_mut() {
            match rec.state() {
                PageState::Hashed => self.counters.hashed -= 1,
                PageState::Merged => self.release_record(sh, rec),
                PageState::Zero => self.zero_gone(rec),
                PageState::None => {}
            }
            rec.set_state(PageState::None);
        }
    }

    /// A page now maps the zero page; `as_ksm`: `use_zero_pages` is 0, so
    /// it counts as the kernel's merge into a KSM page of zeros.
    pub fn zero_added(&mut self, rec: &mut PageRecord, as_ksm: bool) {
        rec.set_state(PageState::Zero);
        rec.set_key(u32::from(as_ksm));
        self.counters.zero_pages += 1;
        self.counters.zero_as_ksm += u64::from(as_ksm);
    }

    /// A `Zero` record stops mapping the zero page (its state is the caller's).
    pub fn zero_gone(&mut self, rec: &PageRecord) {
        self.counters.zero_pages -= 1;
        self.counters.zero_as_ksm -= u64::from(rec.key() == 1);
    }

    /// The published view of the counts. Zero pages dropped while
    /// `use_zero_pages` was 0 show as the kernel shows them: merged into KSM
    /// pages of zeros, each shared by at most `max_sharing` mappings
    /// (`pages_shared` the pages, `pages_sharing` the rest), not in
    /// `ksm_zero_pages`; what is saved is the same either way.
    pub fn snapshot(&self, regions: u64, store_bytes: u64, max_sharing: u64) -> KsmStats {
        let c = &self.counters;
        let zero_shared = c.zero_as_ksm.div_ceil(max_sharing.max(2));
        let shared = self.stable.pages_shared() + zero_shared;
        let sharing = self.stable.pages_sharing() + (c.zero_as_ksm - zero_shared);
        let unshared = self.unstable.len();
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
            twinpage_store_bytes: store_bytes,
            twinpage_store_full: c.store_full,
            general_profit: saved as i64 - metadata as i64,
        }
    }

    fn end_full_scan(&mut self, sh: &Shared) {
        self.counters.full_scans += 1;
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

/// Merge decisions of one batch.
#[derive(Debug, Default)]
struct Decisions {
    /// Tree pages to copy into new store pages: (region id, page, store page).
    fills: Vec<(u32, usize, u32)>,
    joins: Vec<Item>,
    zeros: Vec<Item>,
    /// Joins of the daemon's store pages, by page.
    remote: Vec<Item>,
}

/// Scans up to `budget` pages; returns how many it visited.
pub fn scan_pages(sh: &Shared, budget: usize) -> usize {
    let mut left = budget;
    let mut visited = 0;
    let mut empty_wraps = 0;
    while left > 0 {
        // The registry is a leaf lock: nobody holding it waits for another lock.
        let cur = sh.core.lock().cursor;
        let (found, empty) = {
            let reg = sh.registry.read();
            let f = if cur.fresh { reg.first() } else { reg.at_or_after(cur.region_start) };
            (f.cloned(), reg.is_empty())
        };
        let (region, cursor) = {
            let mut core = sh.core.lock();
            match found {
                Some(r) => {
                    if cur.fresh || r.start != cur.region_start {
                        core.cursor = Cursor { region_start: r.start, page: 0, fresh: false };
                    }
                    (r, core.cursor)
                }
                None => {
                    if !cur.fresh {
                        core.end_full_scan(sh);
                    }
                    core.cursor = Cursor { fresh: true, ..Default::default() };
                    empty_wraps += 1;
                    if empty || empty_wraps > 2 {
                        return visited;
                    }
                    continue;
                }
            }
        };
        if cursor.page >= region.pages {
            sh.core.lock().cursor = Cursor { region_start: region.start + 1, page: 0, fresh: false };
            continue;
        }
        empty_wraps = 0;
        let n = left.min(BATCH_PAGES).min(region.pages - cursor.page);
        {
            let mut st = region.state.write();
            let mut core = sh.core.lock();
            if !st.dead {
                scan_batch(sh, &region, &mut st, &mut core, cursor.page, n);
            }
            core.cursor.page = cursor.page + n;
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
    let mut entries = vec![PageEntry::default(); n];
    if let Err(e) = sh.pagemap.read(region.addr(first), &mut entries) {
        warn_once!("pagemap", "twinpage: cannot read pagemap: {e}");
        return;
    }
    let mergeable = region.mergeability == Mergeability::Mergeable && !st.failed;
    // Zero pages of anonymous memory always drop to the kernel's zero page,
    // whatever `use_zero_pages`: it costs no mapping, where merging them into
    // one store page (the kernel's use_zero_pages=0 behaviour) costs a mapping
    // per scattered zero page against vm.max_map_count. Counted in
    // `ksm_zero_pages`, as the kernel counts its use_zero_pages=1 merges.
    let use_zero = sh.tunables.use_zero_pages() || region.kind == crate::maps::MappingKind::Anon;
    let smart = sh.tunables.smart_scan();
    let max_sharing = sh.tunables.max_page_sharing();
    let zh = zero_hash();
    let mode = sh.tunables.merge_mode();
    let mut d = Decisions::default();
    let mut last_pair: Option<(usize, u32)> = None;
    let remote = core.remote.is_some();
    let mut candidates = Vec::new();

    for (i, &e) in entries.iter().enumerate() {
        let idx = first + i;
        core.counters.pages_scanned += 1;
        let rec = &mut st.records[idx];
        match rec.state() {
            PageState::Merged => {
                if !crate::merge::cow::still_store_content(e) {
                    // A write broke the sharing, and the kernel made the
                    // copy inside the store mapping (`merge::cow` could not).
                    rec.set_state(PageState::None);
                    core.counters.cow_breaks += 1;
                    core.counters.cow_in_place += 1;
                    core.counters.activity += 1;
                    core.release_record(sh, rec);
                } else {
                    continue;
                }
            }
            PageState::Zero => {
                if e.present() && (e.exclusive() || e.file()) {
                    core.zero_gone(rec);
                    rec.set_state(PageState::None);
                    core.counters.activity += 1;
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
            core.counters.uncheckable_skipped += 1;
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
            core.counters.pages_skipped += 1;
            continue;
        }
        // SAFETY: the page is in `region`, live under our lock; its bytes only
        // feed the hash here.
        let Ok(page) = (unsafe { read_page(region.prot, region.addr(idx)) }) else {
            continue;
        };
        let page = &*page;
        let h = page_hash(page);
        if h == zh && !e.exclusive() && is_zero(page) {
            // The shared zero page of a never-written page: nothing to merge.
            core.forget_hashed(rec);
            rec.set_state(PageState::None);
            continue;
        }
        // The merge mode decides here, before any tree or the daemon hears of
        // the page: a page the mode excludes is never proposed, so it can
        // neither join a store page nor become one.
        if !mode.allows(h == zh && is_zero(page)) {
            core.forget_hashed(rec);
            rec.set_state(PageState::None);
            continue;
        }
        let cks = h as u32;
        if remote {
            // Connected: the daemon's broker decides (cross-process sharing).
            let steady = core.note_checksum(rec, cks);
            if steady && use_zero && h == zh && is_zero(page) {
                d.zeros.push(Item { page: idx, store: 0 });
                continue;
            }
            candidates.push(Candidate { token: remote::token(region.id, idx), digest: h, stable: steady });
            continue;
        }
        if let Some(s) = core.stable.reserve(h, max_sharing) {
            d.joins.push(Item { page: idx, store: s });
            continue;
        }
        if !core.note_checksum(rec, cks) {
            continue;
        }
        if use_zero && h == zh && is_zero(page) {
            d.zeros.push(Item { page: idx, store: 0 });
            continue;
        }
        let me = PageRef { region: region.id, page: idx as u32 };
        match core.unstable.get(h) {
            Some(t) if t != me => {
                let equal = if t.region == region.id {
                    let tidx = t.page as usize;
                    st.records.get(tidx).is_some_and(|r| r.state() == PageState::Hashed) && {
                        // SAFETY: a page of our own region, under our lock.
                        unsafe { read_page(region.prot, region.addr(tidx)) }.is_ok_and(|other| *other == *page)
                    }
                } else {
                    with_other_region(sh, t, |r2, st2| {
                        let tidx = t.page as usize;
                        st2.records.get(tidx).is_some_and(|r| r.state() == PageState::Hashed) && {
                            // SAFETY: a page of `r2`, live while we hold its lock.
                            unsafe { read_page(r2.prot, r2.addr(tidx)) }.is_ok_and(|other| *other == *page)
                        }
                    })
                    .unwrap_or(false)
                };
                if equal {
                    core.unstable.remove(h);
                    let after = last_pair.filter(|&(p, _)| p + 1 == idx).map(|(_, s)| s);
                    let s = core.alloc.alloc(after);
                    core.stable.insert(h, s, 2);
                    d.fills.push((t.region, t.page as usize, s));
                    d.joins.push(Item { page: idx, store: s });
                    last_pair = Some((idx, s));
                } else {
                    core.unstable.insert(h, me);
                }
            }
            Some(_) => {}
            None => core.unstable.insert(h, me),
        }
    }

    if !candidates.is_empty() {
        d.remote = remote::exchange(sh, region, core, candidates, first, n);
    }
    execute(sh, region, st, core, d);
}

/// Runs `f` on another region under its lock, if it is free and alive.
fn with_other_region<R>(sh: &Shared, t: PageRef, f: impl FnOnce(&Region, &mut RegionState) -> R) -> Option<R> {
    let r2 = sh.registry.read().get(t.region).cloned()?;
    let mut st2 = r2.state.try_write()?;
    if st2.dead {
        return None;
    }
    Some(f(&r2, &mut st2))
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
    let mut out = Vec::new();
    let mut s = 0;
    let mut sparse_ok = anon && zeros.first().is_some_and(|it| in_place(it.page));
    for k in 1..zeros.len() {
        let (prev, next) = (zeros[k - 1].page, zeros[k].page);
        if sparse_ok && in_place(next) && (prev + 1..next).all(registered) {
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
                    if core.stable.cancel(it.store) {
                        core.free_store_page(sh, it.store);
                    }
                }
                for sub in runs(&live) {
                    merge::merge_run(sh, r, st2, core, sub, RunKind::Fill);
                }
            }
        };
        if rid == region.id {
            fill_all(region, st, core);
        } else {
            let done = with_other_region(sh, PageRef { region: rid, page: 0 }, |r2, st2| fill_all(r2, st2, core));
            if done.is_none() {
                for it in &items {
                    if core.stable.cancel(it.store) {
                        core.free_store_page(sh, it.store);
                    }
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
    if let Some(link) = core.remote.as_mut() {
        if core.free_holds == 0 {
            if let Err(e) = link.flush() {
                core.lose_remote(sh, &e);
            }
        }
    }
}

/// Unmerges pages `[from, to)` of a region: every page twinpage remapped
/// (merged, copy-on-write broken inside a store mapping, zero overlay) gets
/// its content back in a mapping of the region's own kind — anonymous memory,
/// or the backing file mapped privately — as if twinpage had never been
/// there; merged pages leave the trees. Returns whether all succeeded (a
/// failed run falls back to private copies inside the store mapping).
pub fn unmerge_range(sh: &Shared, region: &Region, st: &mut RegionState, core: &mut Core, from: usize, to: usize) -> bool {
    let mut all_ok = true;
    let touched = |r: &PageRecord| r.flags() & PageRecord::OVERLAY != 0 || r.state() == PageState::Merged;
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
            let _ = sh.uffd.unprotect(region.addr(i), (j - i) * PAGE_SIZE);
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
    each_live_region(sh, |r, st, core| {
        let disallowed = |st: &RegionState, i: usize| {
            st.records[i].state() == PageState::Merged && {
                // SAFETY: a page of a live region we hold locked; a merged page
                // is mapped (a remap keeps the region's protection).
                unsafe { read_page(r.prot, r.addr(i)) }.is_ok_and(|page| !mode.allows(is_zero(&page)))
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

/// Runs `f` on every live region, under its lock and then the core lock
/// (the engine's lock order).
fn each_live_region(sh: &Shared, mut f: impl FnMut(&Region, &mut RegionState, &mut Core)) {
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
    let mut core = sh.core.lock();
    core.unstable.clear();
    core.cursor = Cursor { fresh: true, ..Default::default() };
    core.counters.full_scans = 0;
}

/// Zero pages written since the scanner last looked stop counting now, as
/// the kernel's count drops at the write fault: every `Zero` record whose
/// page is no longer the zero page (pagemap) is let go. For reads that must
/// be exact (`Engine::stats_now`); the scan does the same as it passes.
pub fn recheck_zero_pages(sh: &Shared) {
    const CHUNK: usize = 4096;
    each_live_region(sh, |r, st, core| {
        if core.counters.zero_pages == 0 {
            return;
        }
        let mut entries = vec![PageEntry::default(); CHUNK.min(r.pages)];
        for first in (0..r.pages).step_by(CHUNK) {
            let n = CHUNK.min(r.pages - first);
            if !st.records[first..first + n].iter().any(|rec| rec.state() == PageState::Zero) {
                continue;
            }
            if sh.pagemap.read(r.addr(first), &mut entries[..n]).is_err() {
                return;
            }
            for (i, e) in entries[..n].iter().enumerate() {
                let rec = &mut st.records[first + i];
                if rec.state() == PageState::Zero && e.present() && (e.exclusive() || e.file()) {
                    core.zero_gone(rec);
                    rec.set_state(PageState::None);
                    core.counters.activity += 1;
                }
            }
        }
    });
}

/// Publishes the counts.
pub fn publish(sh: &Shared) {
    let regions = { sh.registry.read().len() as u64 };
    let store_bytes = sh.store.allocated_bytes().unwrap_or(0);
    let snap = sh.core.lock().snapshot(regions, store_bytes, u64::from(sh.tunables.max_page_sharing()));
    sh.stats.publish(&snap);
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
