//! Numbers and names of the KSM user ABI (x86_64 / asm-generic values, as
//! in Linux 6.18 uapi headers), for an emulator that interposes `madvise`
//! and `prctl`.
//!
//! Behaviour checked on this machine's 6.18 kernel:
//! - `madvise(MADV_MERGEABLE)` on a `MAP_SHARED` mapping returns 0 but does
//!   nothing (the VMA does not get `VM_MERGEABLE`, no `mg` in `smaps`): the
//!   kernel silently skips mappings KSM cannot handle, it does not fail;
//! - `prctl(PR_SET_MEMORY_MERGE, arg2)` enables merge-any for any non-zero
//!   `arg2` (2 works) and returns `EINVAL` if `arg3..arg5` are not 0;
//!   `prctl(PR_GET_MEMORY_MERGE)` returns 0 or 1 and `EINVAL` if any
//!   argument is non-zero;
//! - an unknown `madvise` advice (e.g. 99) is `EINVAL`.

/// `madvise`: no special treatment.
pub const MADV_NORMAL: i32 = 0;
/// `madvise`: expect random page references.
pub const MADV_RANDOM: i32 = 1;
/// `madvise`: expect sequential page references.
pub const MADV_SEQUENTIAL: i32 = 2;
/// `madvise`: will need these pages.
pub const MADV_WILLNEED: i32 = 3;
/// `madvise`: drop the pages; private anonymous memory then reads as zeros.
pub const MADV_DONTNEED: i32 = 4;
/// `madvise`: pages may be freed lazily; contents undefined until written.
pub const MADV_FREE: i32 = 8;
/// `madvise`: remove the pages and their backing store (shmem/tmpfs).
pub const MADV_REMOVE: i32 = 9;
/// `madvise`: do not inherit across fork.
pub const MADV_DONTFORK: i32 = 10;
/// `madvise`: undo `MADV_DONTFORK`.
pub const MADV_DOFORK: i32 = 11;
/// `madvise`: KSM may merge these pages (sets `VM_MERGEABLE`).
pub const MADV_MERGEABLE: i32 = 12;
/// `madvise`: KSM may not merge these pages; merged ones are unmerged.
pub const MADV_UNMERGEABLE: i32 = 13;
/// `madvise`: worth backing with transparent huge pages.
pub const MADV_HUGEPAGE: i32 = 14;
/// `madvise`: not worth backing with transparent huge pages.
pub const MADV_NOHUGEPAGE: i32 = 15;
/// `madvise`: leave out of core dumps.
pub const MADV_DONTDUMP: i32 = 16;
/// `madvise`: undo `MADV_DONTDUMP`.
pub const MADV_DODUMP: i32 = 17;
/// `madvise`: zero-fill the range in the child after fork.
pub const MADV_WIPEONFORK: i32 = 18;
/// `madvise`: undo `MADV_WIPEONFORK`.
pub const MADV_KEEPONFORK: i32 = 19;
/// `madvise`: deactivate the pages (reclaim candidates).
pub const MADV_COLD: i32 = 20;
/// `madvise`: reclaim the pages now.
pub const MADV_PAGEOUT: i32 = 21;
/// `madvise`: populate (prefault) page tables readable.
pub const MADV_POPULATE_READ: i32 = 22;
/// `madvise`: populate (prefault) page tables writable, breaking COW.
pub const MADV_POPULATE_WRITE: i32 = 23;
/// `madvise`: like `MADV_DONTNEED` but also for locked pages.
pub const MADV_DONTNEED_LOCKED: i32 = 24;
/// `madvise`: synchronous transparent huge page collapse.
pub const MADV_COLLAPSE: i32 = 25;
/// `madvise`: poison the pages (testing, needs `CAP_SYS_ADMIN`).
pub const MADV_HWPOISON: i32 = 100;
/// `madvise`: soft-offline the pages (testing).
pub const MADV_SOFT_OFFLINE: i32 = 101;
/// `madvise`: install guard regions.
pub const MADV_GUARD_INSTALL: i32 = 102;
/// `madvise`: remove guard regions.
pub const MADV_GUARD_REMOVE: i32 = 103;

/// `prctl` option: `arg2` non-zero marks all present and future eligible
/// VMAs of the process mergeable (merge-any), zero undoes it.
pub const PR_SET_MEMORY_MERGE: i32 = 67;
/// `prctl` option: returns 1 if merge-any is set, else 0.
pub const PR_GET_MEMORY_MERGE: i32 = 68;

/// `run` value: stop ksmd (keep merged pages).
pub const KSM_RUN_STOP: u32 = 0;
/// `run` value: run ksmd.
pub const KSM_RUN_MERGE: u32 = 1;
/// `run` value: stop ksmd and unmerge all merged pages.
pub const KSM_RUN_UNMERGE: u32 = 2;

/// Page size of the machines twinpage targets (x86_64).
pub const PAGE_SIZE: u64 = 4096;

/// `sizeof(struct ksm_rmap_item)` on x86_64 (64 bytes: measured through
/// `general_profit` and `ksm_process_profit` on this machine's 6.18). The
/// profit formulas charge this for every page KSM tracks.
pub const KSM_RMAP_ITEM_SIZE: u64 = 64;

/// The `VmFlags` mnemonic in `/proc/<pid>/smaps` for a `VM_MERGEABLE` VMA.
pub const SMAPS_VMFLAG_MERGEABLE: &str = "mg";

/// Where the kernel's KSM attributes live.
pub const KSM_SYSFS_DIR: &str = "/sys/kernel/mm/ksm";

/// `general_profit` as 6.18 computes it:
/// `(pages_sharing + ksm_zero_pages) * PAGE_SIZE - rmap_items * 64`, in
/// wrapping `unsigned long` arithmetic printed as `long`.
pub fn general_profit(pages_sharing: u64, ksm_zero_pages: i64, rmap_items: u64) -> i64 {
    pages_sharing.wrapping_add(ksm_zero_pages as u64).wrapping_mul(PAGE_SIZE).wrapping_sub(rmap_items.wrapping_mul(KSM_RMAP_ITEM_SIZE))
        as i64
}

/// `pages_volatile` as 6.18 computes it:
/// `rmap_items - pages_shared - pages_sharing - pages_unshared` as a
/// `long`, clamped to 0 (the counters are read without locking).
pub fn pages_volatile(rmap_items: u64, pages_shared: u64, pages_sharing: u64, pages_unshared: u64) -> i64 {
    let v = rmap_items.wrapping_sub(pages_shared).wrapping_sub(pages_sharing).wrapping_sub(pages_unshared) as i64;
    v.max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profits_match_measurement() {
        // 256 identical pages merged into 1 KSM page + 255 sharers.
        assert_eq!(general_profit(255, 0, 256), 1028096);
        assert_eq!(general_profit(0, 0, 3), -192);
        assert_eq!(pages_volatile(256, 1, 255, 0), 0);
        assert_eq!(pages_volatile(10, 1, 2, 3), 4);
        assert_eq!(pages_volatile(1, 1, 2, 3), 0);
    }
}
