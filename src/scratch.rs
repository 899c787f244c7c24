//! The scratch mapping where the pin check parks a run's pages while it
//! looks at them: owned, unmapped on drop.

use crate::sys::uffd::Userfaultfd;
use crate::sys::{mman, PAGE_SIZE};

/// An anonymous mapping registered with the engine's userfaultfd, where
/// pages wait while they are checked. Empty between merges.
#[derive(Debug)]
pub struct Scratch {
    addr: usize,
    pages: usize,
    prot: libc::c_int,
    /// Locked like the memory whose pages it takes (`UFFDIO_MOVE` moves
    /// only between mappings both locked or both not).
    locked: bool,
    /// Left out of merge-any, whose unregistering would take the mapping's
    /// userfaultfd registration with it.
    _own: crate::own::OwnMemory,
}

impl Scratch {
    pub(crate) fn new(uffd: &Userfaultfd, pages: usize, prot: libc::c_int, locked: bool) -> std::io::Result<Self> {
        let len = pages * PAGE_SIZE;
        // SAFETY: a fresh private anonymous mapping at an address the kernel
        // picks; unlocked and empty whatever the program's mlockall says
        // (a page there would make UFFDIO_MOVE fail with EEXIST).
        let addr = unsafe { mman::map_unlocked(len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)? };
        let s = Self { addr, pages, prot, locked, _own: crate::own::OwnMemory::add(addr, addr + len) };
        if locked {
            // SAFETY: our own mapping; locked on fault, nothing is faulted in.
            unsafe { mman::mlock_on_fault(addr, len)? };
        }
        // UFFDIO_MOVE wants its destination registered with the same
        // userfaultfd; write-protect mode is the one twinpage has anyway.
        uffd.register_wp(addr, len)?;
        Ok(s)
    }

    /// Whether it holds `pages` pages with protection `prot`, locked or not
    /// (a move needs the same on both sides).
    pub(crate) fn fits(&self, pages: usize, prot: libc::c_int, locked: bool) -> bool {
        self.pages >= pages && self.prot == prot && self.locked == locked
    }

    /// The advice that frees its pages: MADV_DONTNEED refuses a locked
    /// mapping.
    pub(crate) fn discard_advice(&self) -> libc::c_int {
        if self.locked {
            mman::MADV_DONTNEED_LOCKED
        } else {
            libc::MADV_DONTNEED
        }
    }

    pub(crate) fn page(&self, i: usize) -> usize {
        self.addr + i * PAGE_SIZE
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: our own mapping; nothing refers into it between merges.
        let _ = unsafe { mman::raw_munmap(self.addr, self.pages * PAGE_SIZE) };
    }
}
