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
