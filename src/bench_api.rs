//! Bench-only harness: not part of twinpage's API, no stability promise.
//!
//! It drives the real merge primitive (`merge::merge_run`: write-protect,
//! pagemap check, byte compare, remap, wake) on memory of this process,
//! without the engine's threads, so `benches/engine.rs` can time exactly one
//! merge call. It builds a `Shared` and `Core` the way
//! `Engine::new` does and registers anonymous mappings the way
//! `Engine::register` does (`register_wp`, then a [`Region`]).
//!
//! Setup: [`SOURCE_PAGES`] pages of distinct content are filled into
//! consecutive store pages once (`RunKind::Fill`, as the scanner does for the
//! first pair of identical pages). Each timed call then maps fresh anonymous
//! memory holding copies of that content, reserves the store pages in the
//! stable tree as the scanner would, and times only the `RunKind::Join`
//! merges; afterwards the records are dropped (releasing the sharers) and the
//! memory unmapped, outside the timing.

use std::time::{Duration, Instant};

use memmap2::{Advice, MmapMut};

use crate::digest;
use crate::merge::{self, Item, RunKind};
use crate::primitive::Arc;
use crate::region::{Mergeability, PageState, Region};
use crate::state::Shared;
use crate::store::Store;
use crate::sys::pagemap::Pagemap;
use crate::sys::uffd::Userfaultfd;
use crate::sys::PAGE_SIZE;

/// Distinct page contents (and store pages) the joins draw from; a run may be
/// at most this long.
pub const SOURCE_PAGES: usize = 512;

/// Guest pages mapped per round of merges, at most (128 MiB).
const MAX_ROUND_PAGES: usize = 32 * 1024;
/// Merge calls per round, at most. Each isolated merge splits a mapping (about
/// two more), and a remap costs more the more mappings the process has
/// (measured here: ~9.5 us per isolated page with a few dozen extra mappings,
/// ~11 us with +2k, ~11.6 us with +8k). 1024 keeps a round at a moderate
/// +2k mappings, far below `vm.max_map_count`.
const MAX_ROUND_UNITS: usize = 1024;

/// Errors setting the harness up.
pub type HarnessError = Box<dyn std::error::Error + Send + Sync>;

/// An engine core without threads, with one source region merged into
/// [`SOURCE_PAGES`] consecutive store pages.
#[derive(Debug)]
pub struct MergeHarness {
    sh: Shared,
    /// The source pages; they keep one sharer on every store page.
    _source: Arc<Region>,
    _source_map: MmapMut,
    /// Content key and store page of each source position.
    keys: Vec<u64>,
    stores: Vec<u32>,
}

/// Writes the content of source position `pos` into `page`: distinct and
/// non-zero for every position.
fn fill_page(page: &mut [u8], pos: usize) {
    let seed = (pos as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (w, chunk) in page.chunks_exact_mut(8).enumerate() {
        let v = seed ^ (w as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

fn content(pos: usize) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    fill_page(&mut page, pos);
    page
}

impl MergeHarness {
    /// Opens userfaultfd (needs root or access to `/dev/userfaultfd`),
    /// pagemap and a store, and fills the store pages from a source region.
    pub fn new() -> Result<Self, HarnessError> {
        let ps = crate::sys::page_size();
        if ps != PAGE_SIZE {
            return Err(format!("page size {ps} is not supported (4 KiB only)").into());
        }
        let sh = Shared::new(Userfaultfd::open()?, Pagemap::open()?, Store::new()?);

        let mut map = map_anon(SOURCE_PAGES)?;
        for (pos, page) in map.chunks_exact_mut(PAGE_SIZE).enumerate() {
            fill_page(page, pos);
        }
        let source = register(&sh, &map)?;
        let keys: Vec<u64> = (0..SOURCE_PAGES).map(|pos| digest::page_hash(&content(pos))).collect();

        let mut stores = Vec::with_capacity(SOURCE_PAGES);
        let mut items = Vec::with_capacity(SOURCE_PAGES);
        {
            let mut st = source.state.write();
            let mut core = sh.core().lock();
            let mut prev = None;
            for (pos, &key) in keys.iter().enumerate() {
                // As the scanner does for a new pair: consecutive store pages, one
                // pending merge for the page that fills it.
                let s = core.new_store_page(key, prev, 1);
                stores.push(s);
                items.push(Item { page: pos, store: s });
                prev = Some(s);
            }
            if stores.windows(2).any(|w| w[1] != w[0] + 1) {
                return Err("store pages are not consecutive".into());
            }
            merge::merge_run(&sh, &source, &mut st, &mut core, &items, RunKind::Fill);
            let merged = st.records.iter().filter(|r| r.state() == PageState::Merged).count();
            if merged != SOURCE_PAGES {
                return Err(format!(
                    "filling the store merged {merged} of {SOURCE_PAGES} source pages (mismatches {}, held back {})",
                    core.counters().mismatches,
                    core.map_budget().held_back
                )
                .into());
            }
        }
        Ok(Self { sh, _source: source, _source_map: map, keys, stores })
    }

    /// Merges `n` isolated pages, one `merge_run` call each (every other page
    /// of fresh memory, so no two merges coalesce); returns the time spent in
    /// the merge calls only.
    pub fn merge_isolated(&mut self, n: u64) -> Duration {
        self.merge_runs(1, n)
    }

    /// Merges `n` runs of `run_len` consecutive pages, one `merge_run` call per
    /// run (runs separated by an unmerged page); returns the time spent in the
    /// merge calls only.
    ///
    /// # Panics
    /// If `run_len` is 0 or above [`SOURCE_PAGES`], if the memory cannot be
    /// set up, or if a page did not merge (the benchmark would time a failure
    /// path).
    pub fn merge_runs(&mut self, run_len: usize, n: u64) -> Duration {
        self.rounds(run_len, n, Timed::Merge)
    }

    /// Merges `n` runs of `run_len` consecutive pages as [`Self::merge_runs`]
    /// does, then unmerges each (`unmerge::unmerge_range`, what
    /// `MADV_UNMERGEABLE` and `run=2` run: the content back in the region's
    /// own anonymous memory); returns the time spent in the unmerge calls
    /// only.
    ///
    /// # Panics
    /// As [`Self::merge_runs`], and if a page is not back in its own memory
    /// with its content.
    pub fn unmerge_runs(&mut self, run_len: usize, n: u64) -> Duration {
        self.rounds(run_len, n, Timed::Unmerge)
    }

    fn rounds(&mut self, run_len: usize, n: u64, timed: Timed) -> Duration {
        assert!((1..=SOURCE_PAGES).contains(&run_len), "run length {run_len} out of 1..={SOURCE_PAGES}");
        let per_round = (MAX_ROUND_PAGES / (run_len + 1)).clamp(1, MAX_ROUND_UNITS) as u64;
        let mut total = Duration::ZERO;
        let mut left = n;
        while left > 0 {
            let units = left.min(per_round);
            total += self.round(run_len, units as usize, timed);
            left -= units;
        }
        total
    }

    /// One round: `units` runs of `run_len` pages in fresh memory, each
    /// followed by a gap page.
    fn round(&mut self, run_len: usize, units: usize, timed: Timed) -> Duration {
        let stride = run_len + 1;
        let slots = SOURCE_PAGES / run_len;
        let base = |u: usize| (u % slots) * run_len;

        let mut map = map_anon(units * stride).expect("bench_api: cannot map guest memory");
        for u in 0..units {
            for j in 0..run_len {
                let at = (u * stride + j) * PAGE_SIZE;
                fill_page(&mut map[at..at + PAGE_SIZE], base(u) + j);
            }
        }
        let region = register(&self.sh, &map).expect("bench_api: cannot register guest memory");
        let sh = &self.sh;
        let mut st = region.state.write();
        let mut core = sh.core().lock();

        // The scanner's decision, made before the merges: one reservation per page.
        let mut runs: Vec<Vec<Item>> = Vec::with_capacity(units);
        for u in 0..units {
            let run = (0..run_len)
                .map(|j| {
                    let pos = base(u) + j;
                    let s = core.reserve(self.keys[pos], u32::MAX);
                    assert_eq!(s, Some(self.stores[pos]), "bench_api: reservation found another store page");
                    Item { page: u * stride + j, store: self.stores[pos] }
                })
                .collect();
            runs.push(run);
        }

        let t = Instant::now();
        for run in &runs {
            merge::merge_run(sh, &region, &mut st, &mut core, run, RunKind::Join);
        }
        let mut elapsed = t.elapsed();

        let merged = st.records.iter().filter(|r| r.state() == PageState::Merged).count();
        assert_eq!(
            merged,
            units * run_len,
            "bench_api: not every page merged (mismatches {}, held back {})",
            core.counters().mismatches,
            core.map_budget().held_back
        );

        if timed == Timed::Unmerge {
            let t = Instant::now();
            for u in 0..units {
                let ok = crate::unmerge::unmerge_range(sh, &region, &mut st, &mut core, u * stride, u * stride + run_len);
                assert!(ok, "bench_api: an unmerge fell back to copies in place");
            }
            elapsed = t.elapsed();
            assert!(st.records.iter().all(|r| r.state() != PageState::Merged), "bench_api: a page stayed merged");
            for u in 0..units {
                for j in 0..run_len {
                    let at = (u * stride + j) * PAGE_SIZE;
                    assert!(map[at..at + PAGE_SIZE] == content(base(u) + j)[..], "bench_api: an unmerged page lost its content");
                }
            }
        }

        // Undo, as the owner's munmap does: the records go (releasing the
        // sharers; the source keeps every store page alive), then the
        // memory.
        drop(core);
        drop(st);
        crate::unmerge::remove_range(sh, region.start, region.end(), false, || drop(map));
        sh.core().lock().recount_mappings();
        elapsed
    }

    /// The engine's counters now (merge runs, mismatches, held-back pages).
    pub fn stats(&self) -> crate::stats::KsmStats {
        let regions = self.sh.registry().read().len() as u64;
        self.sh.core().lock().snapshot(
            regions,
            self.sh.store().allocated_bytes().unwrap_or(0),
            u64::from(self.sh.tunables().max_page_sharing()),
        )
    }
}

/// Which part of a round is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timed {
    Merge,
    Unmerge,
}

/// Fresh private anonymous memory of `pages` pages, without huge pages.
fn map_anon(pages: usize) -> std::io::Result<MmapMut> {
    let map = MmapMut::map_anon(pages * PAGE_SIZE)?;
    // Huge pages would make the first write-protect or remap split a PMD;
    // keep every run on 4 KiB pages. Best effort: THP may be compiled out.
    let _ = map.advise(Advice::NoHugePage);
    Ok(map)
}

/// Registers `map` through the engine's own registration
/// (`engine::register_vmas`, what `Engine::register` runs), without the
/// engine's threads: the harness is the only one merging.
fn register(sh: &Shared, map: &MmapMut) -> Result<Arc<Region>, HarnessError> {
    let addr = map.as_ptr() as usize;
    let end = addr + map.len();
    let (result, _) = crate::engine::register_vmas(sh, addr, end, &crate::maps::vmas_in(addr, end)?);
    result?;
    let region = sh.registry().read().containing(addr).cloned().ok_or("the mapping was not registered")?;
    if region.pages * PAGE_SIZE != map.len() || region.mergeability != Mergeability::Mergeable {
        return Err(
            format!("registered {} pages, {:?}; want {} mergeable", region.pages, region.mergeability, map.len() / PAGE_SIZE).into()
        );
    }
    Ok(region)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_merges_and_cleans_up() {
        let mut h = match MergeHarness::new() {
            Ok(h) => h,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        let s = h.stats();
        assert_eq!((s.pages_shared, s.pages_sharing), (SOURCE_PAGES as u64, 0));
        assert!(h.merge_isolated(3) > Duration::ZERO);
        assert!(h.merge_runs(64, 2) > Duration::ZERO);
        assert!(h.merge_runs(SOURCE_PAGES, 1) > Duration::ZERO);
        assert!(h.unmerge_runs(64, 2) > Duration::ZERO);
        let s = h.stats();
        assert_eq!(s.twinpage_merge_mismatches, 0);
        assert_eq!(s.twinpage_merges_held_back, 0);
        // One remap per run: the fill, 3 isolated pages, 2 + 1 + 2 runs.
        assert_eq!(s.twinpage_merge_runs, 1 + 3 + 2 + 1 + 2);
        // Every joined page was released again; the source keeps each store page.
        assert_eq!((s.pages_shared, s.pages_sharing), (SOURCE_PAGES as u64, 0));
        assert_eq!(s.twinpage_pages_registered, SOURCE_PAGES as u64);
    }
}
