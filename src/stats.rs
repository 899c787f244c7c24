//! Counters in the shape of `/sys/kernel/mm/ksm`, plus twinpage's own.
//!
//! The scanner keeps exact counts under its lock and publishes them here after
//! every batch; readers (the stats tree, `twinpage stat`) never take a lock.

use crate::primitive::{AtomicU64, Ordering};

macro_rules! stats {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// A snapshot of every counter.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct KsmStats {
            $( $(#[$doc])* pub $name: u64, )*
            /// Bytes saved by merging minus twinpage's own metadata, as the
            /// kernel's `general_profit` (may be negative).
            pub general_profit: i64,
        }

        /// The published counters.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( pub(crate) $name: AtomicU64, )*
            pub(crate) general_profit: AtomicU64,
        }

        impl Stats {
            pub(crate) fn snapshot(&self) -> KsmStats {
                KsmStats {
                    $( $name: self.$name.load(Ordering::Relaxed), )*
                    general_profit: self.general_profit.load(Ordering::Relaxed) as i64,
                }
            }

            pub(crate) fn publish(&self, s: &KsmStats) {
                $( self.$name.store(s.$name, Ordering::Relaxed); )*
                self.general_profit.store(s.general_profit as u64, Ordering::Relaxed);
            }
        }
    };
}

stats! {
    /// Store pages in use (the kernel's KSM pages).
    pages_shared,
    /// Guest pages mapping a store page, beyond the first of each.
    pages_sharing,
    /// Pages in the unstable tree: checked, unique so far.
    pages_unshared,
    /// Pages whose content changed too fast to be considered.
    pages_volatile,
    /// Pages visited by the scanner, cumulative.
    pages_scanned,
    /// Pages smart_scan skipped, cumulative.
    pages_skipped,
    /// Completed passes over all registered memory.
    full_scans,
    /// Zero pages dropped to the kernel's zero page (use_zero_pages=1).
    ksm_zero_pages,
    /// Contents whose sharers span several store pages (max_page_sharing reached).
    stable_node_chains,
    /// Store pages that belong to such chains.
    stable_node_dups,
    /// Per-page records with a checksum or a merge (the kernel's rmap_items).
    rmap_items,
    /// Bytes of twinpage metadata (records, trees, store bookkeeping).
    twinpage_metadata_bytes,
    /// Mappings twinpage has added to the process (estimate, recounted every few seconds).
    twinpage_mappings_added,
    /// The process's mapping count when last counted plus twinpage's additions since.
    twinpage_map_count,
    /// The mapping count twinpage stays under (vm.max_map_count less headroom).
    twinpage_map_limit,
    /// Merges not done because they would have crossed that limit, cumulative.
    twinpage_merges_held_back,
    /// Pages the last full scan that held any back left unmerged for that
    /// limit (0 once none were for 10 s; not cumulative): about what raising
    /// `vm.max_map_count` would let merge.
    twinpage_pages_held_back,
    /// Remap calls made (each maps one run of consecutive store pages).
    twinpage_merge_runs,
    /// Merged pages whose sharing a write broke (copy-on-write), cumulative.
    twinpage_cow_breaks,
    /// Of those, writes the kernel copied inside a store mapping because the
    /// fault thread could not give the page an anonymous copy in time: such
    /// a page is never merged again (no pin check reaches it); cumulative.
    twinpage_cow_in_place,
    /// Merge attempts that failed the byte comparison under write-protect.
    twinpage_merge_mismatches,
    /// Merges refused because the page was pinned by in-flight I/O
    /// (`O_DIRECT`, io_uring) or shared with a forked child, cumulative.
    twinpage_pinned_skipped,
    /// Pages merged without the pin check: only with TWINPAGE_PIN_GUARD=0
    /// (a test's switch); cumulative.
    twinpage_merges_unchecked,
    /// Scans of pages passed over because no pin check can cover them (data
    /// of a private file mapping, a copy made inside a store mapping, any
    /// writable page on a kernel without UFFDIO_MOVE); cumulative.
    twinpage_uncheckable_skipped,
    /// Registered pages in regions that can be scanned but never merged.
    twinpage_pages_unmergeable,
    /// Pages registered for merging.
    twinpage_pages_registered,
    /// Pages of this process that map a store page, its own or the daemon's
    /// (the kernel's per-process `ksm_merging_pages`).
    twinpage_merging_pages,
    /// Of those, pages merged into the daemon's store (cross-process sharing).
    twinpage_daemon_merged,
    /// 1 while this process is connected to twinpaged; in the daemon's own
    /// counters, the agents connected to it.
    twinpage_daemon_agents,
    /// In the daemon's counters: pages its agents proposed in their current
    /// full scans that no other page matched yet (its unstable tree). The
    /// agents count them in `pages_unshared`, as the kernel would.
    twinpage_daemon_proposals,
    /// Bytes the store memfd holds (allocated, not its size); the daemon
    /// counts the stores of all its domains.
    twinpage_store_bytes,
    /// Merges held back because the store's filesystem was full (a store on
    /// a size-limited tmpfs), cumulative; they go on when space returns.
    twinpage_store_full,
}

impl KsmStats {
    /// Bytes the merging saves now: every sharer beyond the first and every
    /// dropped zero page is a page the process no longer holds.
    pub fn bytes_saved(&self) -> u64 {
        (self.pages_sharing + self.ksm_zero_pages) * crate::sys::PAGE_SIZE as u64
    }
}
