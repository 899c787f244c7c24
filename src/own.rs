//! The memory twinpage maps for itself inside a host process: its threads'
//! stacks and arena heaps ([`crate::threads`]), the pin check's scratch
//! mapping, the pool of pages first writes are copied into, and the
//! mapping a page is filled in before it moves into place. Merge-any
//! (`PR_SET_MEMORY_MERGE`) registers the process's private anonymous memory
//! as the kernel does, less these: they are not the program's memory, and
//! registering them breaks twinpage itself. A merged page in the fault
//! thread's heap or copy pool is a write that thread waits on for ever, and
//! the scratch mapping, registered with the engine's userfaultfd for
//! `UFFDIO_MOVE`, lost that registration when the program turned merge-any
//! off again (every later writable merge then failed with `EINVAL`).
//!
//! Large heap blocks count too: glibc maps a block above its mmap threshold
//! on its own, as unnamed anonymous memory, and a region's page records
//! (6 bytes a page: above the threshold from 85 MiB) or a tree's table are
//! such blocks. Merged, a write to them by the scanner, which holds the
//! engine's lock, waited for the fault thread, which waited for that lock:
//! the program hung. The preload's allocator reports every block of at
//! least [`HEAP_MIN`] bytes here ([`heap_allocated`], [`heap_freed`]).

use std::collections::BTreeMap;

/// `[start, end)` of each piece of memory twinpage holds now; a range may be
/// listed more than once (an arena heap, once per thread that uses it).
/// Held across `fork` as [`HEAP`] is (taken first: a push under it may
/// allocate a large block): a child that starts an engine of its own lists
/// its threads here.
static OWN: parking_lot::Mutex<Vec<(usize, usize)>> = parking_lot::const_mutex(Vec::new());

/// Heap blocks of at least [`HEAP_MIN`] bytes, address to size. A
/// `parking_lot` mutex: the allocator takes it, so it must never allocate
/// itself under it beyond the map's small nodes, and fork must be able to
/// release it in the child ([`lock_heap_for_fork`]).
static HEAP: parking_lot::Mutex<BTreeMap<usize, usize>> = parking_lot::const_mutex(BTreeMap::new());

/// The smallest heap block the allocator reports: below glibc's smallest
/// mmap threshold (128 KiB), so every block glibc maps on its own is seen.
pub const HEAP_MIN: usize = 64 << 10;

/// A heap block of `size` bytes at `ptr` is twinpage's until
/// [`heap_freed`]. For the allocator: the map's nodes are far smaller
/// than [`HEAP_MIN`], so this never reports itself.
pub fn heap_allocated(ptr: usize, size: usize) {
    HEAP.lock().insert(ptr, size);
}

/// The heap block at `ptr` is about to be freed.
pub fn heap_freed(ptr: usize) {
    HEAP.lock().remove(&ptr);
}

/// Before `fork`: holds both lists' locks, so that no other thread holds
/// one when the child is made ([`unlock_after_fork`] in both).
pub fn lock_for_fork() {
    std::mem::forget(OWN.lock());
    std::mem::forget(HEAP.lock());
}

/// After `fork`, in parent and child: releases what [`lock_for_fork`]
/// took.
///
/// # Safety
/// Only after [`lock_for_fork`], once.
pub unsafe fn unlock_after_fork() {
    // SAFETY: the caller's guarantee: this thread (or, in the child, its
    // copy) holds both locks from lock_for_fork, whose guards were forgotten.
    unsafe {
        HEAP.force_unlock();
        OWN.force_unlock();
    }
}

/// twinpage's own memory now, for merge-any to leave out: heap blocks as
/// the pages they touch.
pub fn ranges() -> Vec<(usize, usize)> {
    let mut all = OWN.lock().clone();
    let page = crate::sys::PAGE_SIZE;
    all.extend(HEAP.lock().iter().map(|(&p, &n)| (p & !(page - 1), (p + n).next_multiple_of(page))));
    all
}

/// One range of [`ranges`], listed for as long as this lives: its owner
/// keeps it beside the mapping and drops it when the mapping goes.
#[derive(Debug)]
pub(crate) struct OwnMemory((usize, usize));

impl OwnMemory {
    pub(crate) fn add(start: usize, end: usize) -> OwnMemory {
        OWN.lock().push((start, end));
        OwnMemory((start, end))
    }
}

impl Drop for OwnMemory {
    fn drop(&mut self) {
        let mut own = OWN.lock();
        if let Some(i) = own.iter().position(|r| *r == self.0) {
            own.swap_remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_listed_while_its_guard_lives_once_per_guard() {
        let count = |r: (usize, usize)| ranges().iter().filter(|&&x| x == r).count();
        let r = (0x1000_0000, 0x1000_8000);
        let g = OwnMemory::add(r.0, r.1);
        let twin = OwnMemory::add(r.0, r.1);
        assert_eq!(count(r), 2);
        drop(twin);
        assert_eq!(count(r), 1, "each guard takes its own listing away");
        drop(g);
        assert_eq!(count(r), 0);
    }
}
