//! Registration: the parts of a range that are not regions yet become
//! regions, mapping by mapping, each with what its kind of mapping needs
//! (the backing file of a private file mapping, write-protect for a
//! writable one).

use std::io;

use super::EngineError;
use crate::maps::{self, MappingKind};
use crate::primitive::Arc;
use crate::region::{Mergeability, PageRecord, Region};
use crate::state::Shared;
use crate::sys::PAGE_SIZE;
use crate::warn_once;

/// Registers the parts of `[addr, end)` not registered yet, mapping by
/// mapping (`vmas`, in address order): the one way memory becomes a region,
/// for [`Engine::register_with`] and the bench harness. Returns the result
/// for the caller (`Unmapped` for a hole, `Shared` for a shared mapping)
/// and whether any region was added.
pub(crate) fn register_vmas(sh: &Shared, addr: usize, end: usize, vmas: &[maps::Vma]) -> (Result<(), EngineError>, bool) {
    let mut result = Ok(());
    let mut covered = addr;
    let mut added = false;
    for vma in vmas {
        if vma.start > covered {
            result = Err(EngineError::Unmapped);
        }
        let s = vma.start.max(addr);
        let e = vma.end.min(end);
        covered = vma.end;
        if vma.kind == MappingKind::Shared {
            warn_once!(
                "shared",
                "twinpage: refusing to merge a shared mapping at {s:#x} ({}): shared memory is never merged, as with kernel KSM",
                vma.path
            );
            result = Err(EngineError::Shared);
            continue;
        }
        // A store mapping left by an earlier merge holds the owner's private
        // copies (pages written in place, left there by an unmerge): it
        // stands for anonymous memory, its pages overlays — never merged
        // again (no pin check reaches them), given an anonymous mapping of
        // their own before a discard. Known by device and inode: with
        // TWINPAGE_STORE_DIR (or a daemon's store) its name is a deleted
        // file's, not the memfd's.
        let mut vma = vma.clone();
        let in_store = vma.is_store_mapping(&sh.stores().lock());
        if in_store {
            vma.kind = MappingKind::Anon;
        }
        // PROT_NONE anonymous memory merges, as with the kernel (read
        // through /proc/self/mem: `guest`); a file mapping's content is
        // read in place when it is registered (`anonymize`), so it waits
        // until it is readable again.
        if vma.prot & libc::PROT_READ == 0 && vma.kind != MappingKind::Anon {
            continue;
        }
        let vma = &vma;
        for (ps, pe) in unregistered_parts(sh, s, e) {
            let backing = match vma.kind {
                MappingKind::PrivateFile => open_backing(vma),
                _ => None,
            };
            // Hugetlbfs memory is left alone, as the kernel's KSM leaves it.
            if backing.as_ref().is_some_and(|f| crate::sys::file::is_hugetlbfs(std::os::fd::AsFd::as_fd(&**f)).unwrap_or(false)) {
                warn_once!("hugetlb", "twinpage: {} at {ps:#x} is hugetlbfs memory, which is never merged (as with kernel KSM)", vma.path);
                continue;
            }
            let no_backing = vma.kind == MappingKind::PrivateFile && backing.is_none();
            if no_backing {
                warn_once!("no-backing", "twinpage: cannot reopen the file behind {} at {ps:#x}; it is scanned but never merged", vma.path);
            }
            let mergeability =
                match if no_backing { Err(io::Error::from_raw_os_error(libc::ENOENT)) } else { sh.uffd().register_wp(ps, pe - ps) } {
                    Ok(()) => Mergeability::Mergeable,
                    Err(err) => {
                        warn_once!(
                            "scan-only",
                            "twinpage: {} at {ps:#x} cannot be write-protected ({err}); it is scanned and reported but never merged",
                            if vma.path.is_empty() { "memory" } else { vma.path.as_str() }
                        );
                        Mergeability::ScanOnly
                    }
                };
            let pages = (pe - ps) / PAGE_SIZE;
            let mut region = Region::new(0, ps, pages, vma.kind, mergeability, vma.prot, vec![PageRecord::default(); pages]);
            region.dontfork = vma.dontfork;
            region.dontdump = vma.dontdump;
            region.set_locked(vma.locked);
            region.file_offset = vma.offset + (ps - vma.start) as u64;
            region.backing = backing;
            // A private file mapping's pages can be checked for pins only
            // in anonymous memory: where the file holds zeros, they move
            // there now (`anonymize`).
            let parts = match (&region.backing, mergeability) {
                (Some(file), Mergeability::Mergeable) => crate::anonymize::convert(sh, &region, file),
                _ => vec![crate::anonymize::Part { start: ps, end: pe, anon: false, registered: true }],
            };
            for part in parts {
                let n = (part.end - part.start) / PAGE_SIZE;
                let mut records = vec![PageRecord::default(); n];
                if !part.registered {
                    records.iter_mut().for_each(|r| r.add_flags(PageRecord::NEEDS_REGISTER));
                }
                if in_store {
                    records.iter_mut().for_each(|r| r.add_flags(PageRecord::OVERLAY));
                }
                let kind = if part.anon { MappingKind::Anon } else { region.kind };
                sh.add_region(|id| {
                    let mut r = Region::new(id, part.start, n, kind, mergeability, region.prot, records);
                    r.dontfork = region.dontfork;
                    r.dontdump = region.dontdump;
                    r.set_locked(region.locked());
                    if !part.anon {
                        r.file_offset = region.file_offset + (part.start - ps) as u64;
                        r.backing = region.backing.clone();
                    }
                    r
                });
            }
            added = true;
        }
    }
    if covered < end {
        result = Err(EngineError::Unmapped);
    }
    if covered < end {
        result = Err(EngineError::Unmapped);
    }
    (result, added)
}

/// The parts of `[start, end)` no region covers.
fn unregistered_parts(sh: &Shared, start: usize, end: usize) -> Vec<(usize, usize)> {
    let reg = sh.registry().read();
    let mut parts = Vec::new();
    let mut at = start;
    for r in reg.overlapping(start, end) {
        if r.start > at {
            parts.push((at, r.start.min(end)));
        }
        at = at.max(r.end());
    }
    if at < end {
        parts.push((at, end));
    }
    parts
}

/// Reopens the file behind a private file mapping: by path, or through
/// /proc/self/map_files when the path is gone (memfd, deleted file).
fn open_backing(vma: &maps::Vma) -> Option<Arc<std::fs::File>> {
    let by_path = (!vma.path.ends_with("(deleted)") && vma.path.starts_with('/')).then(|| std::fs::File::open(&vma.path).ok()).flatten();
    by_path.or_else(|| std::fs::File::open(format!("/proc/self/map_files/{:x}-{:x}", vma.start, vma.end)).ok()).map(Arc::new)
}
