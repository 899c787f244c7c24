//! mmap, munmap, madvise and mprotect wrappers on raw address ranges.
//!
//! They issue the raw system calls, not libc's `mmap`/`madvise` symbols:
//! inside the preloaded library those symbols are twinpage's own interposers,
//! and the engine must never re-enter them.
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
pub unsafe fn map_private_fixed(addr: usize, len: usize, prot: libc::c_int, fd: BorrowedFd<'_>, offset: u64) -> io::Result<()> {
    // SAFETY: the caller guarantees the range may be replaced; MAP_FIXED
    // replaces exactly [addr, addr+len).
    let ret = unsafe { raw_mmap(addr, len, prot, libc::MAP_FIXED | libc::MAP_PRIVATE, fd.as_raw_fd(), offset as libc::off_t) };
    ret.map(drop)
}

/// [`map_private_fixed`] over a range the program locked (mlock,
/// mlockall): the kernel faults in every page of a new locked private
/// mapping for writing, which would copy each store page at once. The
/// mapping is made elsewhere unlocked ([`map_unlocked`]), moved over the
/// range (the caller locks it again on fault, which faults nothing in:
/// `merge::reapply_advice`).
///
/// # Safety
/// As for [`map_private_fixed`].
pub unsafe fn map_private_fixed_locked(addr: usize, len: usize, prot: libc::c_int, fd: BorrowedFd<'_>, offset: u64) -> io::Result<()> {
    // SAFETY: a fresh mapping at an address the kernel picks.
    let tmp = unsafe { map_unlocked(len, prot, libc::MAP_PRIVATE, fd.as_raw_fd(), offset as libc::off_t)? };
    // SAFETY: `tmp` is ours; the caller guarantees `[addr, addr+len)` may be
    // replaced, as MAP_FIXED would.
    if let Err(e) = unsafe { raw_mremap(tmp, len, len, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, addr) } {
        // SAFETY: `tmp` is still ours.
        let _ = unsafe { raw_munmap(tmp, len) };
        return Err(e);
    }
    Ok(())
}

/// Maps fresh private anonymous memory over `[addr, addr+len)`.
///
/// # Safety
/// As for [`map_private_fixed`].
pub unsafe fn map_anon_fixed(addr: usize, len: usize, prot: libc::c_int) -> io::Result<()> {
    // SAFETY: as for map_private_fixed; the caller owns the range.
    let ret = unsafe { raw_mmap(addr, len, prot, libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    ret.map(drop)
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
        let ret = unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice as libc::c_long) };
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
/// MADV_DONTNEED that also drops the pages of a locked mapping (Linux 5.18).
pub const MADV_DONTNEED_LOCKED: libc::c_int = 24;

/// `mmap(2)` as a raw system call; returns the mapped address.
///
/// # Safety
/// As for `mmap(2)`: with `MAP_FIXED` the range is replaced, so the caller
/// must own it and hold no Rust reference into it.
pub unsafe fn raw_mmap(
    addr: usize,
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
    offset: libc::off_t,
) -> io::Result<usize> {
    // SAFETY: the caller upholds mmap's contract for this range.
    let ret = unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot as libc::c_long, flags as libc::c_long, fd as libc::c_long, offset) };
    if ret < 0 {
        return Err(last_err());
    }
    Ok(ret as usize)
}

/// `munmap(2)` as a raw system call.
///
/// # Safety
/// The caller owns the range and holds no Rust reference into it.
pub unsafe fn raw_munmap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range.
    let ret = unsafe { libc::syscall(libc::SYS_munmap, addr, len) };
    if ret < 0 {
        return Err(last_err());
    }
    Ok(())
}

/// `mremap(2)` as a raw system call; returns the new address.
///
/// # Safety
/// As for `mremap(2)`: the caller owns both ranges.
pub unsafe fn raw_mremap(old: usize, old_len: usize, new_len: usize, flags: libc::c_int, new_addr: usize) -> io::Result<usize> {
    // SAFETY: the caller upholds mremap's contract.
    let ret = unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags as libc::c_long, new_addr) };
    if ret < 0 {
        return Err(last_err());
    }
    Ok(ret as usize)
}

/// `mprotect(2)` as a raw system call (the preload's interposer is not
/// involved).
///
/// # Safety
/// As for `mprotect(2)`: the caller owns the range, and no Rust reference
/// into it relies on the protection it loses.
pub unsafe fn mprotect(addr: usize, len: usize, prot: libc::c_int) -> io::Result<()> {
    // SAFETY: the caller upholds mprotect's contract.
    let ret = unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot as libc::c_long) };
    if ret < 0 {
        return Err(last_err());
    }
    Ok(())
}

/// `mmap(2)` at an address the kernel picks, for twinpage's own memory:
/// never locked, and so never populated, by the program's
/// `mlockall(MCL_FUTURE)` (QEMU's `-overcommit mem-lock=on`), which would
/// otherwise fault in every page of a new mapping: all 1 GiB of a store
/// segment, or a scratch page that `UFFDIO_MOVE` then finds occupied. The
/// mapping is made `PROT_NONE` (the kernel populates no inaccessible
/// mapping), unlocked, then given `prot`.
///
/// # Safety
/// As for `mmap(2)` without `MAP_FIXED`: `fd` and `offset`, if any, name
/// what the caller may map.
pub unsafe fn map_unlocked(len: usize, prot: libc::c_int, flags: libc::c_int, fd: libc::c_int, offset: libc::off_t) -> io::Result<usize> {
    // SAFETY: a fresh mapping at an address the kernel picks (no MAP_FIXED).
    let addr = unsafe { raw_mmap(0, len, libc::PROT_NONE, flags & !libc::MAP_POPULATE, fd, offset)? };
    // SAFETY: the mapping just made, which nothing else knows of yet.
    let done = unsafe { munlock(addr, len).and_then(|()| mprotect(addr, len, prot)) };
    if let Err(e) = done {
        // SAFETY: as above.
        let _ = unsafe { raw_munmap(addr, len) };
        return Err(e);
    }
    if flags & libc::MAP_POPULATE != 0 {
        let advice = if prot & libc::PROT_WRITE != 0 { libc::MADV_POPULATE_WRITE } else { libc::MADV_POPULATE_READ };
        // SAFETY: our fresh mapping; populating changes no byte.
        if let Err(e) = unsafe { madvise(addr, len, advice) } {
            // SAFETY: as above.
            let _ = unsafe { raw_munmap(addr, len) };
            return Err(e);
        }
    }
    Ok(addr)
}

/// `munlock(2)`.
///
/// # Safety
/// The caller owns the range (unlocking changes no byte, but lets the
/// kernel reclaim what the program may have locked on purpose).
pub unsafe fn munlock(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller's guarantee.
    let ret = unsafe { libc::syscall(libc::SYS_munlock, addr, len) };
    if ret < 0 {
        return Err(last_err());
    }
    Ok(())
}

/// `mlock2(addr, len, MLOCK_ONFAULT)`: the range is locked (`VM_LOCKED`)
/// without faulting anything in.
///
/// # Safety
/// The caller owns the range.
pub unsafe fn mlock_on_fault(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller's guarantee.
    let ret = unsafe { libc::syscall(libc::SYS_mlock2, addr, len, libc::MLOCK_ONFAULT as libc::c_long) };
    if ret < 0 {
        return Err(last_err());
    }
    Ok(())
}

/// One of twinpage's own mappings ([`map_unlocked`]), unmapped on drop.
#[derive(Debug)]
pub struct OwnMap {
    addr: usize,
    len: usize,
}

impl OwnMap {
    /// A shared mapping of `len` bytes of `fd` at `offset`.
    pub fn shared(fd: BorrowedFd<'_>, offset: u64, len: usize, prot: libc::c_int) -> io::Result<OwnMap> {
        // SAFETY: a fresh mapping of a file the caller lends us.
        let addr = unsafe { map_unlocked(len, prot, libc::MAP_SHARED, fd.as_raw_fd(), offset as libc::off_t)? };
        Ok(OwnMap { addr, len })
    }

    /// The first byte.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }
}

impl Drop for OwnMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping; its owner hands out no reference that
        // outlives it.
        let _ = unsafe { raw_munmap(self.addr, self.len) };
    }
}
