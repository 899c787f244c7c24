//! Merges in flight, shared between the merging thread and the fault thread.
//!
//! The fault thread is a safety net: it reads userfaultfd events and removes
//! write protection from a page nobody is merging, so a writer can never be
//! left blocked. It must never do so for a page under merge: between the
//! byte comparison and the remap, a write let through would be lost. Both
//! sides decide under this one lock (modelled in `tests/loom.rs`).

use crate::primitive::Mutex;

/// Address ranges between write-protect and wake.
#[derive(Debug, Default)]
pub struct InFlight {
    ranges: Mutex<Vec<(usize, usize)>>,
}

impl InFlight {
    /// Marks `[start, end)` as under merge. Call before write-protecting it.
    pub fn begin(&self, start: usize, end: usize) {
        self.ranges.lock().push((start, end));
    }

    /// Ends a merge begun with the same range. Call after its wake.
    pub fn end(&self, start: usize, end: usize) {
        let mut r = self.ranges.lock();
        if let Some(pos) = r.iter().position(|&x| x == (start, end)) {
            r.swap_remove(pos);
        }
    }

    /// Whether a merge holds `addr` now.
    pub fn holds(&self, addr: usize) -> bool {
        self.ranges.lock().iter().any(|&(s, e)| addr >= s && addr < e)
    }

    /// Runs `release` (unprotect and wake) for a faulting address unless a
    /// merge holds it; returns whether it ran. Holding the lock across
    /// `release` keeps a merge from starting on that page meanwhile.
    pub fn release_stray<F: FnOnce()>(&self, addr: usize, release: F) -> bool {
        let r = self.ranges.lock();
        if r.iter().any(|&(s, e)| addr >= s && addr < e) {
            return false;
        }
        release();
        true
    }
}
