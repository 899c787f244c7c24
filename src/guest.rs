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
use std::os::unix::fs::FileExt;

use crate::sys::PAGE_SIZE;

/// A page of a mapping only twinpage can reach (a scratch mapping the pin
/// check moved a page into), as bytes for as long as `held` is borrowed.
///
/// # Safety
/// `addr` must be a page of a mapping `held` owns, mapped and readable
/// while the bytes are used, that nobody else writes: no program thread
/// and no device can reach it.
pub(crate) unsafe fn scratch_page<W: ?Sized>(_held: &W, addr: usize) -> &[u8] {
    // SAFETY: the caller guarantees the page is mapped, readable and written
    // by nobody while `held` is borrowed, which bounds the borrow returned.
    unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) }
}

/// Copies the page at `addr`, of a mapping with protection `prot`, into
/// `buf`: with a raw-pointer copy where the program can read it (vCPUs and
/// devices may write it meanwhile: the copy may be torn, and no reference
/// into guest memory is ever made, as vm-memory's accessors do it), else
/// through `/proc/self/mem`.
///
/// # Safety
/// `addr` must be a page that stays mapped while the copy runs: a page of
/// a live registered region whose lock the caller holds (`held`).
pub(crate) unsafe fn copy_page<W: ?Sized>(_held: &W, prot: libc::c_int, addr: usize, buf: &mut [u8; PAGE_SIZE]) -> io::Result<()> {
    if prot & libc::PROT_READ == 0 {
        return read_unreadable(addr, buf);
    }
    // SAFETY: `addr` is a mapped, readable page (the caller's guarantee) and
    // `buf` a page of our own: the two cannot overlap. A memcpy, not word by
    // word volatile reads: those cost the scan a fifth more CPU (`twinpage
    // bench`, scatter 256M), and a torn copy is harmless either way.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), PAGE_SIZE) };
    Ok(())
}

/// A buffer that pages of registered memory are copied into, so that
/// nothing borrows memory the program and its devices write.
pub(crate) struct PageCopy(Box<[u8; PAGE_SIZE]>);

impl std::fmt::Debug for PageCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageCopy")
    }
}

impl PageCopy {
    pub(crate) fn new() -> PageCopy {
        PageCopy(Box::new([0; PAGE_SIZE]))
    }

    /// Copies the page at `addr` (see [`copy_page`]) and returns the copy.
    ///
    /// # Safety
    /// As [`copy_page`].
    pub(crate) unsafe fn read<W: ?Sized>(&mut self, held: &W, prot: libc::c_int, addr: usize) -> io::Result<&[u8]> {
        // SAFETY: the caller's guarantees.
        unsafe { copy_page(held, prot, addr, &mut self.0) }?;
        Ok(&self.0[..])
    }
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
        let mut copy = PageCopy::new();
        // SAFETY: mapped (PROT_NONE), ours, nobody writes it.
        let page = unsafe { copy.read(&(), libc::PROT_NONE, addr) }.unwrap();
        assert!(page.iter().all(|&b| b == 0x5a));
        // SAFETY: our own mapping.
        unsafe { crate::sys::mman::raw_munmap(addr, PAGE_SIZE) }.unwrap();
    }

    #[test]
    fn a_readable_page_is_copied_word_for_word() {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a fresh private mapping of our own.
        let addr = unsafe { crate::sys::mman::raw_mmap(0, PAGE_SIZE, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) }.unwrap();
        for i in 0..PAGE_SIZE {
            // SAFETY: our own writable page, no reference into it.
            unsafe { (addr as *mut u8).add(i).write(i as u8 ^ 0x33) };
        }
        let mut copy = PageCopy::new();
        // SAFETY: mapped and readable, ours.
        let page = unsafe { copy.read(&(), rw, addr) }.unwrap();
        assert!(page.iter().enumerate().all(|(i, &b)| b == i as u8 ^ 0x33));
        // SAFETY: our own mapping.
        unsafe { crate::sys::mman::raw_munmap(addr, PAGE_SIZE) }.unwrap();
    }
}
