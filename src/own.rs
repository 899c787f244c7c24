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

use std::sync::Mutex;

/// `[start, end)` of each piece of memory twinpage holds now; a range may be
/// listed more than once (an arena heap, once per thread that uses it).
static OWN: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

/// twinpage's own memory now, for merge-any to leave out.
pub fn ranges() -> Vec<(usize, usize)> {
    OWN.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// One range of [`ranges`], listed for as long as this lives: its owner
/// keeps it beside the mapping and drops it when the mapping goes.
#[derive(Debug)]
pub(crate) struct OwnMemory((usize, usize));

impl OwnMemory {
    pub(crate) fn add(start: usize, end: usize) -> OwnMemory {
        OWN.lock().unwrap_or_else(|e| e.into_inner()).push((start, end));
        OwnMemory((start, end))
    }
}

impl Drop for OwnMemory {
    fn drop(&mut self) {
        let mut own = OWN.lock().unwrap_or_else(|e| e.into_inner());
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
