//! `lseek` with `SEEK_DATA` and `SEEK_HOLE`, which std does not offer: where
//! a file (tmpfs, memfd) has data and where it has holes.

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
