//! The mapping budget of one process: each merged stretch costs mappings,
//! and the kernel caps a process at `vm.max_map_count`.

use std::time::{Duration, Instant};

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
