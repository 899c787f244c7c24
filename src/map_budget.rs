//! The mapping budget of one process: each merged stretch costs mappings,
//! and the kernel caps a process at `vm.max_map_count`.

use std::time::{Duration, Instant};

/// How much a merge saves per mapping it costs, in four classes. A run of
/// `pages` pages mapped as `stretches` stretches of consecutive store pages
/// costs about one mapping per stretch and one for the split it makes: an
/// isolated page saves one page for two mappings, a run of five different
/// pages five for six, a zero run of 64 pages (one stretch) 64 for two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Density(u8);

impl Density {
    /// At least 4 pages a mapping.
    const DENSEST: Density = Density(3);

    pub(crate) fn of(pages: usize, stretches: usize) -> Density {
        let cost = stretches + 1;
        Density(if 5 * pages < 3 * cost {
            0
        } else if pages < cost {
            1
        } else if pages < 4 * cost {
            2
        } else {
            3
        })
    }
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
    /// Once three quarters of the budget are spent, merges sparser than this wait: the
    /// rest goes to the merges that save most per mapping first.
    bar: Density,
    /// The densest merge refused for want of room in the pass under way.
    held_for_room: Option<Density>,
    /// Mappings taken in the pass under way by merges at or above the bar.
    dense_maps: usize,
    /// The densest merge the bar made wait in the pass under way.
    deferred: Option<Density>,
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
            bar: Density::DENSEST,
            held_for_room: None,
            dense_maps: 0,
            deferred: None,
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

    /// Whether a run of `pages` pages in `stretches` stretches may start
    /// merging (it then reserves its mappings stretch by stretch with
    /// [`allow`](Self::allow)); a refusal for want of room counts the pages
    /// as held back.
    ///
    /// Until three quarters of the budget are spent, every merge may, in the
    /// scanner's order. Beyond, a merge sparser than the bar waits for
    /// a later full scan (not counted as held back: the limit has not
    /// refused it), so that whole runs and zero runs merge before isolated
    /// pages, which cost two mappings for one page. The bar starts at the
    /// densest class and moves after each full scan
    /// ([`recount_at_full_scan`](Self::recount_at_full_scan)).
    pub fn admit(&mut self, pages: usize, stretches: usize) -> bool {
        let d = Density::of(pages, stretches);
        if d < self.bar && self.short() {
            self.deferred = self.deferred.max(Some(d));
            return false;
        }
        if !self.has_room(2) {
            self.held_for_room = self.held_for_room.max(Some(d));
            self.hold_back(pages as u64);
            return false;
        }
        if d >= self.bar {
            self.dense_maps += stretches + 1;
        }
        true
    }

    /// Three quarters of the budget spent: from here on the densest merges
    /// go first. (From half, a workload that fits in the budget anyway,
    /// `twinpage bench --workload scatter --size 256M` at 57% of it, took
    /// 10% more CPU and 20% longer to merge everything for nothing.)
    /// The estimate runs high (two mappings a remap), so it is confirmed by
    /// a count, at most once a second, before merges are made to wait.
    fn short(&mut self) -> bool {
        let over = |b: &Self| b.current() * 4 > b.limit * 3;
        if !over(self) {
            return false;
        }
        self.recount_if_older(Self::RECOUNT_HELD_BACK);
        over(self)
    }

    /// Moves the bar at the end of a full scan. Back under three quarters
    /// it returns to the densest class. A merge refused for want of room
    /// sets it to that merge's class: room that frees up goes to it first.
    /// While merges at or above it took a quarter of the room left or more
    /// in the scan, it stays; otherwise it comes down to the densest class
    /// it made wait, which merges in the next scan.
    fn move_bar(&mut self) {
        let refused = self.held_for_room.take();
        let deferred = self.deferred.take();
        let dense = std::mem::take(&mut self.dense_maps);
        let room = self.limit.saturating_sub(self.current());
        if !self.short() {
            self.bar = Density::DENSEST;
        } else if let Some(d) = refused {
            self.bar = d;
        } else if dense == 0 || room >= 4 * dense {
            self.bar = deferred.unwrap_or(self.bar);
        }
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
        self.move_bar();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A budget of `limit` mappings with `used` spent, counted just now (so
    /// nothing below reads this process's real mappings).
    fn budget(limit: usize, used: usize) -> MapBudget {
        let mut b = MapBudget::new(limit + limit / 8);
        b.limit = limit;
        b.counted = used;
        b.since_count = 0;
        b.last_count = Some(Instant::now());
        b
    }

    #[test]
    fn density_classes() {
        assert_eq!(Density::of(1, 1), Density(0), "an isolated page: 1 page for 2 mappings");
        assert_eq!(Density::of(2, 2), Density(1), "two different pages side by side: 2 for 3");
        assert_eq!(Density::of(5, 5), Density(1));
        assert_eq!(Density::of(2, 1), Density(2), "two pages of consecutive store pages: 2 for 2");
        assert_eq!(Density::of(7, 1), Density(2));
        assert_eq!(Density::of(8, 1), Density(3), "a run of 8 in one stretch: 8 for 2");
    }

    #[test]
    fn under_three_quarters_of_the_budget_everything_merges_in_order() {
        let mut b = budget(1000, 100);
        assert!(b.admit(1, 1));
        assert!(b.admit(5, 5));
        assert_eq!(b.held_back, 0);
    }

    #[test]
    fn beyond_three_quarters_the_densest_merge_first_then_the_densest_that_waited() {
        let mut b = budget(1000, 800);
        assert!(!b.admit(1, 1), "an isolated page waits while the bar is at the densest class");
        assert!(!b.admit(5, 5));
        assert!(b.admit(64, 1), "a 64-page stretch goes first");
        assert_eq!(b.held_back, 0, "waiting for the bar is not held back by the limit");
        b.recount_at_full_scan();
        assert!(b.admit(5, 5), "the densest class that waited comes next");
        assert!(!b.admit(1, 1));
        b.recount_at_full_scan();
        assert!(b.admit(1, 1), "then isolated pages take the rest");
        b.recount_at_full_scan();
        assert!(b.admit(1, 1), "nothing waited: the bar stays");
    }

    #[test]
    fn the_bar_holds_while_dense_merges_take_much_of_the_room_left() {
        let mut b = budget(1000, 800);
        assert!(b.admit(1024, 120), "121 mappings, over a quarter of the room left");
        assert!(!b.admit(6, 2));
        b.recount_at_full_scan();
        assert!(!b.admit(6, 2), "the bar stayed");
        b.recount_at_full_scan();
        assert!(b.admit(6, 2), "a scan without: the bar came down");
    }

    #[test]
    fn a_dense_merge_refused_for_room_raises_the_bar_again() {
        let mut b = budget(1000, 800);
        assert!(!b.admit(1, 1));
        b.recount_at_full_scan();
        assert!(b.admit(1, 1));
        b.counted = 1000;
        assert!(!b.admit(64, 1), "no room");
        b.recount_at_full_scan();
        b.counted = 900;
        assert!(!b.admit(1, 1), "room freed goes to the dense run that waited, not to an isolated page");
        assert!(b.admit(64, 1));
    }

    #[test]
    fn back_under_three_quarters_the_bar_starts_again_at_the_densest_class() {
        let mut b = budget(1000, 800);
        assert!(!b.admit(1, 1));
        b.recount_at_full_scan();
        b.counted = 100;
        b.recount_at_full_scan();
        b.counted = 800;
        assert!(!b.admit(1, 1));
    }
}
