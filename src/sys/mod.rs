//! Every unsafe kernel call twinpage makes lives below this module: userfaultfd
//! (hand-written, no bindgen), pagemap, mmap/madvise, memfd and Unix-socket
//! descriptor passing (`scm`). The rest of the crate calls safe wrappers whose
//! preconditions are stated here.

pub mod memfd;
pub mod mman;
pub mod pagemap;
pub mod pidfd;
pub mod scm;
pub mod signals;
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

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant
    // every Linux has.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
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
