//! What std does not tell of a file: where it has data and where holes
//! (`lseek` with `SEEK_DATA`, `SEEK_HOLE`), whether it lives on hugetlbfs
//! (`fstatfs`), and its identity as `/proc/<pid>/maps` shows it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

fn seek(fd: BorrowedFd<'_>, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a descriptor we borrow; it only moves the file offset.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    // ENXIO: no data (or no hole) at or after `off` before the end of file.
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The first offset at or after `off` that holds data; `None` past the last.
pub fn next_data(fd: BorrowedFd<'_>, off: u64) -> io::Result<Option<u64>> {
    seek(fd, off, libc::SEEK_DATA)
}

/// The first offset at or after `off` in a hole (the end of file counts as
/// one); `None` when `off` is past the end of file.
pub fn next_hole(fd: BorrowedFd<'_>, off: u64) -> io::Result<Option<u64>> {
    seek(fd, off, libc::SEEK_HOLE)
}

/// `f_type` of hugetlbfs (linux/magic.h).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Whether the file is on hugetlbfs, whose memory KSM leaves alone.
pub fn is_hugetlbfs(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes a statfs into the buffer we own.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between libcs
    Ok(st.f_type as i64 == HUGETLBFS_MAGIC)
}

/// A file as `/proc/<pid>/maps` names it, whatever its path says: device
/// (major, minor) and inode. A store made in `TWINPAGE_STORE_DIR` shows as
/// `/dev/shm/#N (deleted)`, a memfd as `/memfd:NAME (deleted)`; both are
/// recognised by this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileId {
    pub major: u32,
    pub minor: u32,
    pub inode: u64,
}

impl FileId {
    /// The identity of an open file.
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<FileId> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
        // SAFETY: fstat writes a stat into the buffer we own.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat succeeded, so it filled the buffer.
        let st = unsafe { st.assume_init() };
        Ok(FileId { major: libc::major(st.st_dev), minor: libc::minor(st.st_dev), inode: st.st_ino })
    }

    /// Parses the device (`"00:01"`, hex) and inode (decimal) fields of a
    /// maps line. Allocates nothing: a forked child calls it.
    pub fn parse_maps(dev: &[u8], inode: &[u8]) -> Option<FileId> {
        let colon = dev.iter().position(|&b| b == b':')?;
        let major = parse_radix(&dev[..colon], 16)?;
        let minor = parse_radix(&dev[colon + 1..], 16)?;
        let inode = parse_radix(inode, 10)?;
        Some(FileId { major: u32::try_from(major).ok()?, minor: u32::try_from(minor).ok()?, inode })
    }
}

/// An unsigned number in `radix` from ASCII digits, without allocating.
pub fn parse_radix(digits: &[u8], radix: u32) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| n.checked_mul(u64::from(radix))?.checked_add(u64::from(char::from(b).to_digit(radix)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memfd_is_found_by_the_identity_its_maps_line_shows() {
        let fd = crate::sys::memfd::create(c"file-id-test").unwrap();
        let id = FileId::of(std::os::fd::AsFd::as_fd(&fd)).unwrap();
        // SAFETY: a fresh shared mapping of our own memfd, one page.
        let addr = unsafe {
            libc::ftruncate(fd.as_raw_fd(), 4096);
            libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd(), 0)
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps.lines().find(|l| l.starts_with(&format!("{:x}-", addr as usize))).unwrap();
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        assert_eq!(FileId::parse_maps(f[3].as_bytes(), f[4].as_bytes()), Some(id), "{line}");
        // SAFETY: our own mapping.
        unsafe { libc::munmap(addr, 4096) };
        assert_eq!(FileId::parse_maps(b"fd:0x", b"1"), None);
        assert_eq!(FileId::parse_maps(b"08:01", b""), None);
    }
}
