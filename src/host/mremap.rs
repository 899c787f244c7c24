//! mremap across the mappings merging splits a range into.
//!
//! The kernel's mremap refuses (EFAULT) a range that spans several mappings;
//! merging (a store mapping per run) and userfaultfd registration split
//! private anonymous memory that the program mapped as one. A host that
//! interposes mremap uses [`spans_split_anon`] to tell that case from a real
//! fault and [`emulate`] to do what the kernel would have done.
//!
//! It also emulates a growth of memory whose end is still a store mapping
//! after unregistering ([`grows_store_mapping`]): the kernel would grow that
//! private file mapping with more of the store file, other pages' merged
//! bytes, where the program expects zeros.

use std::ffi::c_int;
use std::io;

use crate::sys::mman::{raw_mmap, raw_mremap, raw_munmap};
use crate::sys::PAGE_SIZE;
use crate::Engine;

/// Whether mremap of `[old, old+old_len)` to `new_len` would grow a store
/// mapping. Unregistering gives merged pages private copies, but a page the
/// kernel copied inside its store mapping (a write `merge::cow` could not
/// serve first) stays there: no pin check reaches it, so it is never copied
/// away. The range is private read-write memory the program mapped
/// anonymous, which [`emulate`] grows with fresh anonymous memory instead.
pub fn grows_store_mapping(engine: &Engine, old: usize, old_len: usize, new_len: usize) -> bool {
    new_len > old_len
        && anon_read_write(engine, old, old_len).is_some_and(|(vmas, stores)| vmas.iter().any(|v| v.is_store_mapping(&stores)))
}

/// mremap of private anonymous memory that spans several mappings: shrink in
/// place, grow in place into free space, or move each mapping with the
/// kernel's mremap (nothing copied, so no write from another thread is lost,
/// and each keeps its protection and advice). Returns the new address or
/// `-errno`.
pub fn emulate(old: usize, old_len: usize, new_len: usize, flags: c_int, new_addr: usize) -> isize {
    let page = PAGE_SIZE;
    let (old_len, new_len) = (old_len.next_multiple_of(page), new_len.next_multiple_of(page));
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    let err = |e: io::Error| -(e.raw_os_error().unwrap_or(libc::ENOMEM) as isize);
    if flags & libc::MREMAP_FIXED == 0 && new_len <= old_len {
        if new_len < old_len {
            // SAFETY: the tail the caller gives up, unregistered already.
            if let Err(e) = unsafe { raw_munmap(old + new_len, old_len - new_len) } {
                return err(e);
            }
        }
        return old as isize;
    }
    if flags & libc::MREMAP_MAYMOVE == 0 {
        // SAFETY: MAP_FIXED_NOREPLACE only maps into free address space.
        return match unsafe { raw_mmap(old + old_len, new_len - old_len, rw, anon | libc::MAP_FIXED_NOREPLACE, -1, 0) } {
            Ok(_) => old as isize,
            Err(_) => -(libc::ENOMEM as isize),
        };
    }
    let Ok(vmas) = crate::maps::vmas_in(old, old + old_len) else { return -(libc::EFAULT as isize) };
    let dst = if flags & libc::MREMAP_FIXED != 0 {
        new_addr
    } else {
        // SAFETY: an inaccessible reservation anywhere, replaced below.
        match unsafe { raw_mmap(0, new_len, libc::PROT_NONE, anon, -1, 0) } {
            Ok(d) => d,
            Err(e) => return err(e),
        }
    };
    // Each mapping moves with the kernel's own mremap: its pages, protection
    // and advice (DONTFORK, DONTDUMP) go along, nothing is copied, and a
    // write from another thread lands in a page that moves.
    let keep = old_len.min(new_len);
    let mut moved: Vec<(usize, usize)> = Vec::new();
    for v in &vmas {
        let (s, e) = (v.start.max(old), v.end.min(old + keep));
        if s >= e {
            continue;
        }
        let to = dst + (s - old);
        // SAFETY: [s, e) is one mapping of the caller's range, which it asked
        // to move; `to` lies in the destination the caller named or in our
        // reservation.
        if let Err(e2) = unsafe { raw_mremap(s, e - s, e - s, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, to) } {
            // Put back what moved: the caller sees a failed mremap, as the
            // kernel's fails whole.
            for &(from, len) in moved.iter().rev() {
                let back = old + (from - dst);
                // SAFETY: moving our own move back to where it was.
                let _ = unsafe { raw_mremap(from, len, len, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, back) };
            }
            if flags & libc::MREMAP_FIXED == 0 {
                // SAFETY: our own reservation.
                let _ = unsafe { raw_munmap(dst, new_len) };
            }
            return err(e2);
        }
        moved.push((to, e - s));
    }
    if new_len > old_len {
        // Growth: fresh private anonymous memory, as the kernel extends the
        // mapping (the range was checked readable and writable).
        // SAFETY: the tail of the destination, ours or the caller's.
        if let Err(e) = unsafe { raw_mmap(dst + old_len, new_len - old_len, rw, anon | libc::MAP_FIXED, -1, 0) } {
            log::warn!("twinpage: growing an emulated mremap failed: {e}");
        }
    } else if old_len > new_len {
        // SAFETY: the part of the old range the caller gives up.
        let _ = unsafe { raw_munmap(old + new_len, old_len - new_len) };
    }
    dst as isize
}

/// `[addr, addr+len)` is covered, without holes, by several private
/// anonymous mappings (or mappings of `engine`'s stores standing for them):
/// the split merging makes, which the kernel's mremap refuses with EFAULT.
pub fn spans_split_anon(engine: &Engine, addr: usize, len: usize) -> bool {
    anon_read_write(engine, addr, len).is_some_and(|(vmas, _)| vmas.len() > 1)
}

/// The mappings of `[addr, addr+len)` and `engine`'s stores, when they
/// cover it without holes and each is private anonymous memory (or a
/// mapping of a store standing for it), readable and writable: what
/// [`emulate`] can move and grow as the kernel would.
fn anon_read_write(engine: &Engine, addr: usize, len: usize) -> Option<(Vec<crate::maps::Vma>, Vec<crate::sys::file::FileId>)> {
    let stores = engine.store_ids();
    let end = addr.saturating_add(len);
    let vmas = crate::maps::vmas_in(addr, end).ok()?;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let mut at = addr;
    for v in &vmas {
        let anon = v.kind == crate::maps::MappingKind::Anon || v.is_store_mapping(&stores);
        if v.start > at || !anon || v.prot & rw != rw {
            return None;
        }
        at = v.end;
    }
    (at >= end).then_some((vmas, stores))
}
