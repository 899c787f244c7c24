//! The store: one memfd whose pages are the merged pages. A merged guest page
//! is a page of the store mapped `MAP_PRIVATE` at the guest address; reads
//! share the one page-cache page and a write takes the kernel's ordinary
//! copy-on-write fault. A store page is written exactly once, before its first
//! sharer maps it, and its hole is punched when the last sharer is gone.
//!
//! An operator can put the store on a size-limited tmpfs instead
//! (`TWINPAGE_STORE_DIR`, `twinpaged --store-dir`): an unnamed `O_TMPFILE`
//! there. Its blocks are allocated with `fallocate` before a page is written
//! through the mapping, so a full filesystem is an `ENOSPC` to hold the merge
//! back, never a `SIGBUS`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::OnceLock;

use crate::sys::{memfd, mman, PAGE_SIZE};

/// Store pages per mapped segment of the engine's own view (1 GiB).
const SEGMENT_PAGES: u32 = 1 << 18;
/// Segments at most (1 TiB of merged content).
const MAX_SEGMENTS: usize = 1024;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the store memfd")]
    Create(#[source] io::Error),
    #[error("cannot grow the store")]
    Grow(#[source] io::Error),
    #[error("cannot map a store segment")]
    Map(#[source] io::Error),
    #[error("the store is full")]
    Full,
    #[error("the store's filesystem is full")]
    NoSpace(#[source] io::Error),
    #[error("TWINPAGE_STORE_DIR {0}: not a tmpfs directory (userfaultfd write-protect needs shmem)")]
    NotTmpfs(std::path::PathBuf),
    #[error("a read-only view of the store cannot be written")]
    ReadOnly,
}

/// The memfd and the engine's view of it: read-write for the store's owner
/// (the engine, or the daemon's broker), read-only for an agent of the daemon.
#[derive(Debug)]
pub struct Store {
    file: File,
    segments: Box<[OnceLock<mman::OwnMap>]>,
    writable: bool,
}

impl Store {
    /// Creates an empty store (a memfd).
    pub fn new() -> Result<Self, StoreError> {
        Self::new_in(None)
    }

    /// Creates an empty store: a memfd, or an unnamed file in `dir`, which
    /// must be on tmpfs (userfaultfd write-protects `MAP_PRIVATE` mappings of
    /// shmem, not of disk files).
    pub fn new_in(dir: Option<&std::path::Path>) -> Result<Self, StoreError> {
        let fd = match dir {
            None => memfd::create(c"twinpage-store").map_err(StoreError::Create)?,
            Some(d) => {
                if !memfd::is_tmpfs(d).map_err(StoreError::Create)? {
                    return Err(StoreError::NotTmpfs(d.to_path_buf()));
                }
                memfd::tmpfile(d).map_err(StoreError::Create)?
            }
        };
        Ok(Self::with_file(File::from(fd), true))
    }

    fn with_file(file: File, writable: bool) -> Self {
        let segments = (0..MAX_SEGMENTS).map(|_| OnceLock::new()).collect();
        Self { file, segments, writable }
    }

    /// Creates an empty store to share with other processes: only this fd
    /// writes it. The inode is made owner-read-only, so a process of another
    /// uid cannot reopen it for writing through `/proc/<pid>/fd`, and sealed
    /// against shrinking, so nobody can cut pages from under a mapping.
    ///
    /// In a store directory (an `O_TMPFILE`) there are no seals: the mode
    /// is set, and the agents' fds are read-only opens as always, so no
    /// agent can write, truncate or punch it; only this fd can.
    pub fn new_shared(dir: Option<&std::path::Path>) -> Result<Self, StoreError> {
        let store = Self::new_in(dir)?;
        memfd::restrict(store.fd(), dir.is_none()).map_err(StoreError::Create)?;
        Ok(store)
    }

    /// Allocates the blocks of store pages about to be written (`want[i]`,
    /// `None`: nothing to allocate for item i), one `fallocate` per run of
    /// consecutive pages. Returns per item whether it may be written;
    /// false only when the filesystem is full (`NoSpace` is the first error),
    /// other errors are returned.
    pub fn reserve(&self, want: &[Option<u32>]) -> (Vec<bool>, Option<StoreError>) {
        let mut ok = vec![true; want.len()];
        let mut err = None;
        let mut i = 0;
        while i < want.len() {
            let Some(first) = want[i] else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < want.len() && want[j] == Some(first + (j - i) as u32) {
                j += 1;
            }
            let res = memfd::allocate(self.fd(), Self::offset(first), (j - i) as u64 * PAGE_SIZE as u64);
            if let Err(e) = res {
                if j - i > 1 && e.raw_os_error() == Some(libc::ENOSPC) {
                    // Some of the run may still fit: page by page.
                    for (k, o) in ok[i..j].iter_mut().enumerate() {
                        if let Err(e) = memfd::allocate(self.fd(), Self::offset(first + k as u32), PAGE_SIZE as u64) {
                            *o = false;
                            err.get_or_insert(StoreError::NoSpace(e));
                        }
                    }
                } else {
                    ok[i..j].iter_mut().for_each(|o| *o = false);
                    err.get_or_insert(if e.raw_os_error() == Some(libc::ENOSPC) { StoreError::NoSpace(e) } else { StoreError::Grow(e) });
                }
            }
            i = j;
        }
        (ok, err)
    }

    /// A new read-only open of the store, to hand to an agent: it can map
    /// store pages `MAP_PRIVATE` and read them, but not write, grow, shrink
    /// or punch the file.
    pub fn reopen_read_only(&self) -> io::Result<std::os::fd::OwnedFd> {
        memfd::reopen_read_only(self.fd())
    }

    /// An agent's view of a store another process owns and writes.
    pub fn from_read_only(fd: std::os::fd::OwnedFd) -> Self {
        Self::with_file(File::from(fd), false)
    }

    /// Whether this view may write store pages.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The store fd, for remapping store pages into guest memory.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The store file's identity, by which its mappings are recognised in
    /// `/proc/<pid>/maps` (its path depends on how it was made).
    pub fn file_id(&self) -> io::Result<crate::sys::file::FileId> {
        crate::sys::file::FileId::of(self.fd())
    }

    /// Makes page `idx` addressable through the engine's view (growing the
    /// file and mapping its segment when first needed) and returns its address.
    /// Through a read-only view the page must only be read.
    fn page_ptr(&self, idx: u32) -> Result<*mut u8, StoreError> {
        let seg = (idx / SEGMENT_PAGES) as usize;
        let slot = self.segments.get(seg).ok_or(StoreError::Full)?;
        let map = match slot.get() {
            Some(m) => m,
            None => {
                let seg_bytes = SEGMENT_PAGES as u64 * PAGE_SIZE as u64;
                let prot = if self.writable {
                    let want = (seg as u64 + 1) * seg_bytes;
                    let have = self.file.metadata().map_err(StoreError::Grow)?.len();
                    if have < want {
                        memfd::truncate(self.fd(), want).map_err(StoreError::Grow)?;
                    }
                    libc::PROT_READ | libc::PROT_WRITE
                } else {
                    // The owner grew the file before it named a page in this segment.
                    libc::PROT_READ
                };
                let m = mman::OwnMap::shared(self.fd(), seg as u64 * seg_bytes, seg_bytes as usize, prot);
                let m = m.map_err(StoreError::Map)?;
                // A racing initialiser may have won; either mapping is the same file range.
                let _ = slot.set(m);
                slot.get().ok_or(StoreError::Full)?
            }
        };
        let off = (idx % SEGMENT_PAGES) as usize * PAGE_SIZE;
        // SAFETY: `off` is within the SEGMENT_PAGES pages of this mapping.
        Ok(unsafe { map.as_mut_ptr().add(off) })
    }

    /// The bytes of filled store page `idx`. Filled pages are never written
    /// again while they are in use (the engine and the broker each write a
    /// page once, before anybody maps it or is ordered to join it), and the
    /// view stays mapped while the store lives: the one place store pages
    /// are read as bytes. The engine reads them through `Core::own_page`
    /// and `Core::daemon_page`, whose bytes cannot outlive the core lock.
    ///
    /// # Safety
    /// Page `idx` must be filled and stay in use while the bytes are
    /// borrowed: the caller holds the lock under which pages are freed (the
    /// engine's core lock; the daemon's pages are freed only once no agent's
    /// reference is left).
    pub(crate) unsafe fn filled(&self, idx: u32) -> Result<&[u8], StoreError> {
        let ptr = self.page_ptr(idx)?;
        // SAFETY: `ptr` is PAGE_SIZE mapped bytes of this store's view; the
        // caller guarantees nothing writes them while borrowed.
        Ok(unsafe { std::slice::from_raw_parts(ptr.cast_const(), PAGE_SIZE) })
    }

    /// Writes `bytes` (a page) into store page `idx`, which is not filled
    /// yet. `src` is read with a raw copy: it may be guest memory, which no
    /// reference may cover.
    ///
    /// # Safety
    /// `src` must be PAGE_SIZE readable bytes that nothing writes meanwhile
    /// (a write-protected page, or our own copy); page `idx` must be
    /// unfilled, so that nobody maps or reads it while it is written (the
    /// caller holds the lock its fill is decided under).
    pub unsafe fn fill(&self, idx: u32, src: *const u8) -> Result<(), StoreError> {
        if !self.writable {
            return Err(StoreError::ReadOnly);
        }
        let ptr = self.page_ptr(idx)?;
        // SAFETY: the caller's guarantees; `ptr` is PAGE_SIZE writable bytes
        // of a distinct mapping.
        unsafe { std::ptr::copy_nonoverlapping(src, ptr, PAGE_SIZE) };
        Ok(())
    }

    /// Byte offset of page `idx` in the memfd.
    pub fn offset(idx: u32) -> u64 {
        idx as u64 * PAGE_SIZE as u64
    }

    /// Frees `count` pages from `idx`. The caller has established that no
    /// mapping still shares them.
    pub fn punch(&self, idx: u32, count: u32) -> io::Result<()> {
        memfd::punch_hole(self.fd(), Self::offset(idx), count as u64 * PAGE_SIZE as u64)
    }

    /// Bytes the store really holds (allocated blocks).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        memfd::allocated_bytes(self.fd())
    }
}

/// Hands out store page indices, preferring the one after the previous
/// allocation so that merged runs get consecutive store pages and their
/// mappings coalesce.
#[derive(Debug, Default)]
pub struct StoreAlloc {
    next: u32,
    free: BTreeSet<u32>,
    /// Retired indices still in use: once freed they are never handed out
    /// again ([`StoreAlloc::retire`]).
    retired: BTreeSet<u32>,
    /// Retired indices freed since: gone for good.
    gone: u64,
}

impl StoreAlloc {
    /// A free index, `after + 1` when that one is free.
    pub fn alloc(&mut self, after: Option<u32>) -> u32 {
        if let Some(prev) = after {
            let want = prev.wrapping_add(1);
            if want == self.next {
                self.next += 1;
                return want;
            }
            if self.free.remove(&want) {
                return want;
            }
        }
        if let Some(idx) = self.free.pop_first() {
            return idx;
        }
        let idx = self.next;
        self.next += 1;
        idx
    }

    /// Marks index `idx`, in use, never to be handed out again once it is
    /// freed: a page the program wrote in place sits over it in a mapping of
    /// the store (`twinpage_cow_in_place`), and a discard twinpage does not
    /// see (the range no longer registered) reads the store page under it.
    /// Never reused, that shows this program's own content from before the
    /// write, or zeros once punched, never another page's.
    pub fn retire(&mut self, idx: u32) {
        self.retired.insert(idx);
    }

    /// Returns an index.
    pub fn free(&mut self, idx: u32) {
        if self.retired.remove(&idx) {
            self.gone += 1;
            return;
        }
        if idx + 1 == self.next {
            self.next -= 1;
            while let Some(&last) = self.free.last() {
                if last + 1 != self.next {
                    break;
                }
                self.free.remove(&last);
                self.next -= 1;
            }
        } else {
            self.free.insert(idx);
        }
    }

    /// Indices in use.
    pub fn in_use(&self) -> u64 {
        self.next as u64 - self.free.len() as u64 - self.gone
    }

    /// Approximate heap bytes of the free and retired sets.
    pub fn metadata_bytes(&self) -> u64 {
        (self.free.len() + self.retired.len()) as u64 * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_get_consecutive_pages() {
        let mut a = StoreAlloc::default();
        let x = a.alloc(None);
        let y = a.alloc(Some(x));
        let z = a.alloc(Some(y));
        assert_eq!((x, y, z), (0, 1, 2));
        a.free(1);
        assert_eq!(a.alloc(Some(0)), 1);
        a.free(2);
        a.free(1);
        assert_eq!(a.in_use(), 1);
        assert_eq!(a.alloc(None), 1);
    }

    #[test]
    fn a_retired_index_is_never_handed_out_again() {
        let mut a = StoreAlloc::default();
        let (x, y, z) = (a.alloc(None), a.alloc(Some(0)), a.alloc(Some(1)));
        a.retire(y);
        a.free(y);
        assert_eq!(a.in_use(), 2);
        assert_eq!(a.alloc(Some(x)), 3, "the index after the previous is gone: a fresh one");
        a.free(3);
        a.free(z);
        a.free(x);
        assert_eq!(a.in_use(), 0);
        assert!((0..4).map(|_| a.alloc(None)).all(|i| i != y), "a retired index came back");
    }
}
