//! Process descriptors (`pidfd_open`): the daemon watches the process that
//! maps an agent's merged pages, without races against pid reuse.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::cvt;

/// A pidfd for process `pid` (Linux 5.3+). `ESRCH`: no such process.
pub fn open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd; no memory
    // is passed.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let raw = cvt(ret as libc::c_int)?;
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Whether the process has exited, waiting up to `timeout_ms` for it
/// (0: just look). A pidfd polls readable once the process is gone, its
/// memory torn down.
pub fn exited(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let ret = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        match cvt(ret) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    #[test]
    fn a_child_is_watched_until_it_exits() {
        let mut child = std::process::Command::new("sleep").arg("0.2").spawn().unwrap();
        let fd = super::open(child.id()).unwrap();
        assert!(!super::exited(fd.as_fd(), 0).unwrap());
        assert!(super::exited(fd.as_fd(), 5000).unwrap());
        child.wait().unwrap();
    }
}
