//! Registered memory as bytes: read in place where the program can read it,
//! and through `/proc/self/mem` where it made the memory `PROT_NONE`.
//!
//! The kernel merges `PROT_NONE` anonymous memory (its own selftests check
//! it), and so must twinpage; but a load from such a page faults in our
//! threads as it would in the program's. `/proc/self/mem` reads with the
//! kernel's `FOLL_FORCE`, which may read any mapping the process could make
//! readable, without changing its protection: nothing the program does can
//! observe the read.

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::unix::fs::FileExt;

use crate::sys::PAGE_SIZE;

/// A guest page as bytes, for as long as `held` is borrowed: the region
/// (or scratch mapping) the page belongs to, so the bytes cannot outlive it.
///
/// # Safety
/// `addr` must be a page that stays mapped and readable while the bytes
/// are used: a page of `held`, a live registered region whose lock the
/// caller holds meanwhile, or of a scratch mapping `held` owns. Its bytes
/// may still change under the reader unless it is write-protected; callers
/// use the bytes only as hash input or under write-protect.
pub(crate) unsafe fn guest_page<W: ?Sized>(_held: &W, addr: usize) -> &[u8] {
    // SAFETY: the caller guarantees the page is mapped and readable while
    // `held` is borrowed, which bounds the borrow returned.
    unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) }
}

/// One page of registered memory: borrowed where it is readable in place,
/// else a copy.
pub(crate) enum PageBytes<'a> {
    InPlace(&'a [u8]),
    Copied(Box<[u8; PAGE_SIZE]>),
}

impl Deref for PageBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::InPlace(b) => b,
            Self::Copied(b) => &b[..],
        }
    }
}

/// The page at `addr` of a mapping with protection `prot`, for as long as
/// `held` is borrowed.
///
/// # Safety
/// As [`guest_page`], except that the page need only be mapped: a page the
/// program cannot read is copied through `/proc/self/mem`.
pub(crate) unsafe fn read_page<W: ?Sized>(held: &W, prot: libc::c_int, addr: usize) -> io::Result<PageBytes<'_>> {
    if prot & libc::PROT_READ != 0 {
        // SAFETY: the caller's guarantees, and the mapping is readable.
        return Ok(PageBytes::InPlace(unsafe { guest_page(held, addr) }));
    }
    let mut copy = Box::new([0u8; PAGE_SIZE]);
    read_unreadable(addr, &mut copy[..])?;
    Ok(PageBytes::Copied(copy))
}

/// Copies `buf.len()` bytes of this process's memory at `addr` into `buf`
/// through `/proc/self/mem`, whatever their protection.
pub(crate) fn read_unreadable(addr: usize, buf: &mut [u8]) -> io::Result<()> {
    // Opened for each read: a descriptor kept open would go on reading the
    // parent's memory in a forked child.
    let mem = File::open("/proc/self/mem")?;
    mem.read_exact_at(buf, addr as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prot_none_page_reads_through_proc_mem() {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a fresh private mapping of our own.
        let addr = unsafe { crate::sys::mman::raw_mmap(0, PAGE_SIZE, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) }.unwrap();
        // SAFETY: our own writable page, no reference into it.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0x5a, PAGE_SIZE) };
        // SAFETY: our own mapping.
        unsafe { crate::sys::mman::mprotect(addr, PAGE_SIZE, libc::PROT_NONE) }.unwrap();
        // SAFETY: mapped (PROT_NONE), ours, nobody writes it.
        let page = unsafe { read_page(&(), libc::PROT_NONE, addr) }.unwrap();
        assert!(matches!(page, PageBytes::Copied(_)));
        assert!(page.iter().all(|&b| b == 0x5a));
        drop(page);
        // SAFETY: our own mapping.
        unsafe { crate::sys::mman::raw_munmap(addr, PAGE_SIZE) }.unwrap();
    }
}
