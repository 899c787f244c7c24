//! mmap, munmap, madvise and mprotect wrappers on raw address ranges.
//!
//! These touch address ranges the engine does not own as Rust objects (guest
//! memory), so the functions are unsafe: the caller states that no Rust
//! reference into the range exists and that the range is one the engine is
//! allowed to change (registered, and held against concurrent unmap).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::last_err;

/// Maps `len` bytes of `fd` at `offset` over `[addr, addr+len)` with
/// `MAP_FIXED | MAP_PRIVATE`.
///
/// # Safety
/// The range must be page-aligned, owned by the caller's protocol (registered
/// and held against a concurrent unmap), and no Rust reference may point into
/// it: its old contents are replaced atomically.
pub unsafe fn map_private_fixed(
    addr: usize,
    len: usize,
    prot: libc::c_int,
    fd: BorrowedFd<'_>,
    offset: u64,
) -> io::Result<()> {
    // SAFETY: the caller guarantees the range may be replaced; MAP_FIXED
    // replaces exactly [addr, addr+len).
    let ret = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_FIXED | libc::MAP_PRIVATE,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if ret == libc::MAP_FAILED {
        return Err(last_err());
    }
    debug_assert_eq!(ret as usize, addr);
    Ok(())
}

/// Maps fresh private anonymous memory over `[addr, addr+len)`.
///
/// # Safety
/// As for [`map_private_fixed`].
pub unsafe fn map_anon_fixed(addr: usize, len: usize, prot: libc::c_int) -> io::Result<()> {
    // SAFETY: as for map_private_fixed; the caller owns the range.
    let ret = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ret == libc::MAP_FAILED {
        return Err(last_err());
    }
    Ok(())
}

/// `madvise(addr, len, advice)`, retrying on EAGAIN and EINTR.
///
/// # Safety
/// Advice that discards or changes contents (`MADV_DONTNEED`, `MADV_REMOVE`,
/// `MADV_FREE`, `MADV_POPULATE_WRITE` on a private mapping) must only be given
/// for a range the caller's protocol allows it to change, with no Rust
/// reference into it.
pub unsafe fn madvise(addr: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: the caller guarantees the advice is allowed on the range.
        let ret = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
        if ret == 0 {
            return Ok(());
        }
        let e = last_err();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// `MADV_POPULATE_READ` (22) and `MADV_POPULATE_WRITE` (23), spelled out for
/// libc versions that lack them.
pub const MADV_POPULATE_READ: libc::c_int = 22;
pub const MADV_POPULATE_WRITE: libc::c_int = 23;
