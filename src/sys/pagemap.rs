//! `/proc/self/pagemap`: one 64-bit entry per virtual page. The flag bits need
//! no privilege (the PFN field reads as zero without CAP_SYS_ADMIN, and twinpage
//! never uses it).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::PAGE_SIZE;

/// One pagemap entry.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct PageEntry(pub u64);

impl PageEntry {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE: u64 = 1 << 61;
    const UFFD_WP: u64 = 1 << 57;
    const EXCLUSIVE: u64 = 1 << 56;

    /// A page is mapped at this address.
    pub fn present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }
    /// The page was swapped out.
    pub fn swapped(self) -> bool {
        self.0 & Self::SWAPPED != 0
    }
    /// The mapped page is a page-cache (file or shmem) page, not an anonymous
    /// copy: for a merged page, "still maps the store page".
    pub fn file(self) -> bool {
        self.0 & Self::FILE != 0
    }
    /// The pte carries the userfaultfd write-protect bit.
    pub fn uffd_wp(self) -> bool {
        self.0 & Self::UFFD_WP != 0
    }
    /// The page is mapped only here.
    pub fn exclusive(self) -> bool {
        self.0 & Self::EXCLUSIVE != 0
    }
    /// A present anonymous page (what KSM considers for merging).
    pub fn anon(self) -> bool {
        self.present() && !self.file()
    }
}

impl std::fmt::Debug for PageEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PageEntry{{present:{} file:{} wp:{} excl:{} swap:{}}}",
            self.present(),
            self.file(),
            self.uffd_wp(),
            self.exclusive(),
            self.swapped()
        )
    }
}

/// An open `/proc/self/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens this process's pagemap.
    pub fn open() -> io::Result<Self> {
        Ok(Self { file: File::open("/proc/self/pagemap")? })
    }

    /// Fills `out` with the entries of `out.len()` pages starting at `addr`.
    pub fn read(&self, addr: usize, out: &mut [PageEntry]) -> io::Result<()> {
        let offset = (addr / PAGE_SIZE * 8) as u64;
        let bytes: &mut [u8] = bytes_of_entries(out);
        self.file.read_exact_at(bytes, offset)
    }

    /// The entry of one page.
    pub fn entry(&self, addr: usize) -> io::Result<PageEntry> {
        let mut e = [PageEntry(0)];
        self.read(addr, &mut e)?;
        Ok(e[0])
    }
}

fn bytes_of_entries(entries: &mut [PageEntry]) -> &mut [u8] {
    let len = std::mem::size_of_val(entries);
    // SAFETY: PageEntry is a repr(transparent) u64 with no
    // padding; every byte pattern is a valid u64, the slice is exclusively
    // borrowed and the returned view lives no longer than that borrow.
    unsafe { std::slice::from_raw_parts_mut(entries.as_mut_ptr().cast::<u8>(), len) }
}

const _: () = assert!(std::mem::size_of::<PageEntry>() == 8);
