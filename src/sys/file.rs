//! What std does not tell of a file: where it has data and where holes
//! (`lseek` with `SEEK_DATA`, `SEEK_HOLE`), and whether it lives on
//! hugetlbfs (`fstatfs`).

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
