//! Every unsafe kernel call twinpage makes lives below this module: userfaultfd
//! (hand-written, no bindgen), pagemap, mmap/madvise, memfd and Unix-socket
//! descriptor passing (`scm`), and the C allocator's policy in twinpaged
//! (`heap`). The rest of the crate calls safe wrappers whose
//! preconditions are stated here.

pub mod file;
pub mod heap;
pub mod memfd;
pub mod mman;
pub mod pagemap;
pub mod pidfd;
pub mod scm;
pub mod signals;
pub(crate) mod thread;
pub mod uffd;

/// The base page size. twinpage works on 4 KiB pages; `page_size()` is checked
/// against it when an engine starts.
pub const PAGE_SIZE: usize = 4096;

/// A range of memory as the kernel's mm checks one (mm/madvise.c): its
/// length rounded up to whole pages, or None when the start is not
/// page-aligned or the rounded range would overflow.
pub fn page_span(addr: usize, len: usize) -> Option<usize> {
    if !addr.is_multiple_of(PAGE_SIZE) {
        return None;
    }
    let rounded = len.checked_next_multiple_of(PAGE_SIZE)?;
    addr.checked_add(rounded).map(|_| rounded)
}

/// The page size the kernel reports.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(PAGE_SIZE)
}

/// Clock ticks per second (`/proc/<pid>/stat` counts CPU time in them).
pub fn clock_ticks_per_second() -> u64 {
    use nix::unistd::{sysconf, SysconfVar};
    sysconf(SysconfVar::CLK_TCK).ok().flatten().and_then(|h| u64::try_from(h).ok()).filter(|&h| h > 0).unwrap_or(100)
}

/// Last OS error as an `io::Error`.
pub(crate) fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Turns a `-1`-on-error libc return value into an `io::Result`.
pub(crate) fn cvt(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret == -1 {
        Err(last_err())
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_span_checks_a_range_as_the_kernel_does() {
        assert_eq!(page_span(0x1000, 0), Some(0));
        assert_eq!(page_span(0x1000, 1), Some(PAGE_SIZE));
        assert_eq!(page_span(0x1000, PAGE_SIZE + 1), Some(2 * PAGE_SIZE));
        assert_eq!(page_span(0x1001, PAGE_SIZE), None, "unaligned start");
        assert_eq!(page_span(0x1000, usize::MAX), None, "length overflows when rounded");
        assert_eq!(page_span(usize::MAX - PAGE_SIZE + 1, PAGE_SIZE), None, "end overflows");
        assert_eq!(page_span(usize::MAX - 2 * PAGE_SIZE + 1, PAGE_SIZE), Some(PAGE_SIZE));
    }
}
