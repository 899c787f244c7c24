//! memfd, ftruncate and hole punching for the store.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::cvt;

/// Creates a close-on-exec memfd that allows seals.
pub fn create(name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let ret = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    let raw = cvt(ret)?;
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Makes a store file owner-read-only (mode 0400: a process of another uid
/// cannot reopen it for writing through `/proc/<pid>/fd`) and, for a memfd
/// (`seal`), seals it against shrinking and further seals (tmpfs files
/// outside memfd_create cannot be sealed).
pub fn restrict(fd: BorrowedFd<'_>, seal: bool) -> io::Result<()> {
    // SAFETY: fchmod and fcntl(F_ADD_SEALS) on a valid fd have no memory-safety
    // preconditions.
    unsafe {
        cvt(libc::fchmod(fd.as_raw_fd(), 0o400))?;
        if seal {
            cvt(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL))?;
        }
    }
    Ok(())
}

/// An unnamed file (`O_TMPFILE`) in `dir`, read-write, close-on-exec,
/// mode 0600 until [`restrict`]ed.
pub fn tmpfile(dir: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let mut path = dir.as_os_str().as_bytes().to_vec();
    path.push(0);
    // SAFETY: `path` is NUL-terminated and outlives the call.
    let ret = unsafe { libc::open(path.as_ptr().cast(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600) };
    let raw = cvt(ret)?;
    // SAFETY: open returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Whether `dir` is on tmpfs (shmem).
pub fn is_tmpfs(dir: &std::path::Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let mut path = dir.as_os_str().as_bytes().to_vec();
    path.push(0);
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `path` is NUL-terminated; `st` is valid for writes of one statfs.
    cvt(unsafe { libc::statfs(path.as_ptr().cast(), st.as_mut_ptr()) })?;
    // SAFETY: statfs succeeded, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_type == libc::TMPFS_MAGIC)
}

/// Allocates the blocks of `[offset, offset+len)` without changing the size:
/// writing there through a mapping can no longer fail for lack of space.
/// `ENOSPC` when the filesystem is full (nothing is left allocated then).
pub fn allocate(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid fd has no memory-safety preconditions.
    let ret = unsafe { libc::fallocate(fd.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset as libc::off_t, len as libc::off_t) };
    cvt(ret).map(drop)
}

/// Opens the file behind `fd` again, read-only: a new open file description
/// that cannot write, truncate, punch holes or add seals.
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}\0", fd.as_raw_fd());
    // SAFETY: `path` is NUL-terminated and outlives the call.
    let ret = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
    let raw = cvt(ret)?;
    // SAFETY: open returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sets the file size.
pub fn truncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    // SAFETY: ftruncate on a valid fd has no memory-safety preconditions.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(drop)
}

/// Frees the pages of `[offset, offset+len)`; the file keeps its size and the
/// range reads back as zeros. Every mapping of those pages that has not been
/// copied-on-write is zapped, so the caller must know nobody maps them.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid fd has no memory-safety preconditions.
    let ret = unsafe {
        libc::fallocate(fd.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as libc::off_t, len as libc::off_t)
    };
    cvt(ret).map(drop)
}

/// Bytes actually allocated to the file (`st_blocks * 512`).
pub fn allocated_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is valid for writes of one `struct stat`.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.st_blocks as u64 * 512)
}
