//! Private file mappings become anonymous memory where the file holds zeros.
//!
//! A written page of a private file mapping (QEMU's `memory-backend-file`
//! with `share=off`) is an anonymous page inside a file mapping, which
//! `UFFDIO_MOVE`, the pin check, refuses: such pages could never merge
//! safely. When such a mapping is registered, every page whose file content
//! is zero (a hole, or zeros the kernel put in the file when the private
//! mapping first wrote there) is moved into anonymous memory holding the
//! page's content: a fresh anonymous mapping, with a copy of each page the
//! program wrote, `mremap`ed over the range in one step while writers wait
//! on userfaultfd's write-protection. Unwritten pages cost nothing: fresh
//! anonymous memory reads as zeros, which is what the file shows there.
//!
//! Nothing the program can see changes: each page reads as before, and a
//! discard (`MADV_DONTNEED`) reads back zeros, as the file would have shown.
//! `/proc/<pid>/maps` shows those ranges as anonymous. Pages where the file
//! holds data (a template several guests map privately) stay as they are,
//! never copied: once written they cannot be checked, and never merge.
//!
//! The copy is made under write-protection, which stops the CPU but not a
//! device: a direct read into such a page in flight at this very moment
//! would land in the old page; and a page first written, then swapped out,
//! in the microseconds between the look at pagemap before the protection
//! and the protection itself would be taken for an empty one (pagemap shows
//! the protection's marker in an empty pte as a swapped page, so the look
//! before tells the two apart). QEMU registers guest RAM before the guest
//! runs; a range converted once is anonymous when it is registered again.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use crate::digest::is_zero;
use crate::merge::{fill_and_move, reapply_advice};
use crate::region::Region;
use crate::state::Shared;
use crate::sys::pagemap::PageEntry;
use crate::sys::{file as sysfile, PAGE_SIZE};

/// A stretch of a registered private file mapping after conversion: whether
/// it is anonymous memory now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Part {
    pub start: usize,
    pub end: usize,
    pub anon: bool,
    /// Registered with the engine's userfaultfd (an anonymous part could
    /// fail to be; it is then registered before its first merge).
    pub registered: bool,
}

/// Converts the pages of `[start, end)` whose file content is zero into
/// anonymous memory registered with the engine's userfaultfd for
/// write-protection; `region` describes the range (protection, advice, file
/// offset). Returns the stretches, converted or not, in order. On an error
/// nothing more is converted and the rest stays a file mapping.
pub(crate) fn convert(sh: &Shared, region: &Region, file: &File) -> Vec<Part> {
    let (start, end) = (region.start, region.end());
    let whole = vec![Part { start, end, anon: false, registered: true }];
    if region.prot & libc::PROT_WRITE == 0 {
        // A read-only page cannot be written by a device: nothing to check.
        return whole;
    }
    let zero = match zero_in_file(file, region.file_offset, region.pages) {
        Ok(z) => z,
        Err(e) => {
            crate::warn_once!("anonymize-read", "twinpage: cannot read the file behind {start:#x}: {e}; its written pages never merge");
            return whole;
        }
    };
    if !zero.iter().any(|&z| z) {
        return whole;
    }
    let len = end - start;
    sh.inflight().begin(start, end);
    let mut parts: Vec<Part> = Vec::new();
    // Read before the protection too: write-protecting a file mapping puts
    // a uffd-wp marker in every empty pte, which pagemap then shows as
    // swapped, like a written page in swap.
    let mut before = vec![PageEntry::default(); region.pages];
    let read_before = sh.pagemap().read(start, &mut before);
    if let Err(e) = sh.uffd().protect(start, len) {
        crate::warn_once!("anonymize-protect", "twinpage: cannot write-protect {start:#x} to make it anonymous: {e}");
        sh.inflight().end(start, end);
        return whole;
    }
    let mut entries = vec![PageEntry::default(); region.pages];
    let read = sh.pagemap().read(start, &mut entries);
    let mut failed = read.is_err() || read_before.is_err();
    for (e, b) in entries.iter_mut().zip(&before) {
        *e = written_page(*b, *e);
    }
    let mut i = 0;
    while i < region.pages {
        let mut j = i + 1;
        while j < region.pages && zero[j] == zero[i] {
            j += 1;
        }
        let (s, e) = (region.addr(i), region.addr(j));
        let mut registered = true;
        let anon = zero[i] && !failed && {
            // SAFETY: [s, e) is part of the registered range, write-protected
            // and held in flight: no CPU write races the copy.
            match unsafe { move_to_anon(sh, region, s, e - s, &entries[i..j]) } {
                Ok(r) => {
                    registered = r;
                    true
                }
                Err(err) => {
                    crate::warn_once!("anonymize", "twinpage: cannot make {s:#x} anonymous: {err}; its written pages never merge");
                    failed = true;
                    false
                }
            }
        };
        if !anon {
            let _ = sh.uffd().unprotect(s, e - s);
        }
        match parts.last_mut() {
            Some(p) if p.anon == anon && p.registered == registered && p.end == s => p.end = e,
            _ => parts.push(Part { start: s, end: e, anon, registered }),
        }
        i = j;
    }
    let _ = sh.uffd().wake(start, len);
    sh.inflight().end(start, end);
    let moved: usize = parts.iter().filter(|p| p.anon).map(|p| p.end - p.start).sum();
    if moved > 0 {
        log::info!(
            "twinpage: {} MiB of a private file mapping at {start:#x} became anonymous memory (the file holds zeros there), so that its pages can be checked for pins",
            moved >> 20
        );
    }
    parts
}

/// The entry after write-protection, with a uffd-wp marker (an empty pte
/// before, "swapped" after) seen as the empty pte it is. Copying it as a
/// written page would read every page of the file through the mapping:
/// the file and the anonymous copy would both hold the whole range.
fn written_page(before: PageEntry, after: PageEntry) -> PageEntry {
    if after.swapped() && !before.present() && !before.swapped() {
        PageEntry::default()
    } else {
        after
    }
}

/// Which pages of the file, from `offset` on, hold zeros: holes are skipped
/// with `SEEK_DATA`, data is read and looked at.
fn zero_in_file(file: &File, offset: u64, pages: usize) -> io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    let mut zero = vec![true; pages];
    let end = offset + (pages * PAGE_SIZE) as u64;
    let mut buf = vec![0u8; 64 * PAGE_SIZE];
    let mut pos = offset;
    while pos < end {
        let Some(data) = sysfile::next_data(file.as_fd(), pos)? else { break };
        if data >= end {
            break;
        }
        let hole = sysfile::next_hole(file.as_fd(), data)?.unwrap_or(end).min(end);
        let mut p = data - (data - offset) % PAGE_SIZE as u64;
        while p < hole {
            let n = (buf.len() as u64).min(end - p) as usize;
            let got = file.read_at(&mut buf[..n], p)?;
            if got == 0 {
                // Past the end of file: nothing there but what a read would fault on.
                break;
            }
            for (k, page) in buf[..got].chunks(PAGE_SIZE).enumerate() {
                if !is_zero(page) {
                    zero[((p - offset) / PAGE_SIZE as u64) as usize + k] = false;
                }
            }
            p += got as u64;
        }
        pos = hole.max(p);
    }
    Ok(zero)
}

/// Replaces `[addr, addr+len)` with fresh anonymous memory holding a copy of
/// each page the program wrote (an anonymous page, or one in swap), and
/// registers it for write-protection (returns whether it could).
///
/// # Safety
/// The range must be part of a registered region, write-protected, with no
/// Rust reference into it.
unsafe fn move_to_anon(sh: &Shared, region: &Region, addr: usize, len: usize, entries: &[PageEntry]) -> io::Result<bool> {
    let copy_written = |tmp: usize| {
        for (k, e) in entries.iter().enumerate() {
            if (e.present() && !e.file()) || e.swapped() {
                let off = k * PAGE_SIZE;
                // SAFETY: the caller guarantees the source page is readable and
                // not written meanwhile; `tmp` is the fresh writable mapping.
                unsafe { std::ptr::copy_nonoverlapping((addr + off) as *const u8, (tmp + off) as *mut u8, PAGE_SIZE) };
            }
        }
        Ok(())
    };
    let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
    // SAFETY: the caller owns the range; `copy_written` writes only the
    // fresh mapping. Unwritten pages stay fresh zeros, what the file holds.
    unsafe { fill_and_move(addr, len, region.prot, anon, copy_written)? };
    reapply_advice(region, addr, len);
    // Unregistered, it is registered again before its first merge: a write
    // lands in anonymous memory either way.
    match sh.uffd().register_wp(addr, len) {
        Ok(()) => Ok(true),
        Err(e) => {
            crate::warn_once!("anonymize-register", "twinpage: cannot register anonymous memory at {addr:#x}: {e}");
            Ok(false)
        }
    }
}
