//! Unix-socket plumbing for the broker protocol: `sendmsg`/`recvmsg` carrying at
//! most one file descriptor (`SCM_RIGHTS`), the peer's credentials
//! (`SO_PEERCRED`) and a connect bounded by a timeout, through nix.
//!
//! Every send uses `MSG_NOSIGNAL`: this code runs inside QEMU, where a `SIGPIPE`
//! from a dead daemon must never kill the guest. Every received descriptor is
//! close-on-exec (`MSG_CMSG_CLOEXEC`) and owned as soon as it arrives, so none is
//! ever leaked, whatever the peer sends.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::sys::time::TimeVal;

/// The most descriptors one message can carry (the kernel's `SCM_MAX_FD`: a
/// sender asking for more gets `EINVAL`). The receive buffer holds that many
/// and the credentials the kernel adds under `SO_PASSCRED`, so a peer cannot
/// truncate the control data: every descriptor it sends arrives, is owned,
/// and all but the first are closed.
const SCM_MAX_FD: usize = 253;

/// Room for one receive's control messages (the `cmsg_space!` of nix, without
/// a heap allocation per receive), aligned for `cmsghdr`.
const CMSG_BUF: usize = 16 + SCM_MAX_FD * 4 + 4 + 16 + 12 + 4;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF]);

const _: () = assert!(std::mem::align_of::<CmsgBuf>() >= std::mem::align_of::<libc::cmsghdr>());
const _: () = assert!(CMSG_BUF >= socket::cmsg_space::<[RawFd; SCM_MAX_FD]>() + socket::cmsg_space::<libc::ucred>());

/// Sends `data` on a stream socket, with `fd` attached (`SCM_RIGHTS`) when given.
///
/// Returns the number of bytes sent, which may be less than `data.len()`; the
/// descriptor, if any, went with those bytes, so the caller sends the rest
/// without it. `data` must not be empty when `fd` is given (a stream socket
/// drops descriptors sent with no bytes); that is an `InvalidInput` error.
/// Interrupted calls are retried; a timeout (`SO_SNDTIMEO`) is `WouldBlock`.
pub fn send_with_fd(sock: BorrowedFd<'_>, data: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<usize> {
    if data.is_empty() {
        if fd.is_some() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a descriptor needs at least one byte"));
        }
        return Ok(0);
    }
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: &[ControlMessage<'_>] = match &raw {
        Some(fds) => &[ControlMessage::ScmRights(fds)],
        None => &[],
    };
    let iov = [IoSlice::new(data)];
    loop {
        match socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(Errno::EINTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Receives up to `buf.len()` bytes from a stream socket, and the descriptor
/// that came with them, if any.
///
/// Returns `(0, None)` at end of stream (or when `buf` is empty). At most one
/// descriptor is returned: any others that arrived are closed. Should the
/// control data come truncated all the same (`MSG_CTRUNC`), the receive is
/// an `InvalidData` error and the caller should drop the connection.
/// Received descriptors are close-on-exec. Interrupted calls are retried; a
/// timeout (`SO_RCVTIMEO`) is `WouldBlock`.
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    if buf.is_empty() {
        return Ok((0, None));
    }
    let mut cmsg = CmsgBuf([0; CMSG_BUF]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match socket::recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg.0), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(Errno::EINTR) => continue,
            r => break r.map_err(io::Error::from)?,
        }
    };
    let bytes = msg.bytes;
    let truncated = || io::Error::new(io::ErrorKind::InvalidData, "control message truncated");
    // Every descriptor that arrived is owned before anything else, so that
    // each is closed on any path that does not hand it out.
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(|_| truncated())? {
        if let ControlMessageOwned::ScmRights(raws) = c {
            // SAFETY: SCM_RIGHTS installed each as a new descriptor of this
            // process that nothing else owns.
            fds.extend(raws.into_iter().filter(|&r| r >= 0).map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(truncated());
    }
    Ok((bytes, fds.into_iter().next()))
}

/// Credentials of the process at the other end of a Unix socket, as of when it
/// connected (or created the socket pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// The peer's credentials (`SO_PEERCRED`).
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let c = socket::getsockopt(&sock, sockopt::PeerCredentials)?;
    Ok(PeerCred { pid: c.pid(), uid: c.uid(), gid: c.gid() })
}

/// Connects a close-on-exec Unix stream socket to `path`, waiting at most
/// `timeout` when the listener's backlog is full (`SO_SNDTIMEO`, which the
/// kernel applies to `connect` on Unix sockets and which stays set on the
/// returned socket). A zero `timeout` is `InvalidInput`; a timeout is
/// `WouldBlock`.
pub fn connect(path: &Path, timeout: Duration) -> io::Result<OwnedFd> {
    if timeout.is_zero() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero timeout"));
    }
    let addr = UnixAddr::new(path).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket path is too long or contains NUL"))?;
    if path.as_os_str().is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path is empty"));
    }
    let sock = socket::socket(socket::AddressFamily::Unix, socket::SockType::Stream, socket::SockFlag::SOCK_CLOEXEC, None)?;
    // Round sub-microsecond timeouts up: a zero timeval means "no timeout".
    let tv = TimeVal::new(
        libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        if timeout.as_secs() == 0 { timeout.subsec_micros().max(1) } else { timeout.subsec_micros() } as libc::suseconds_t,
    );
    socket::setsockopt(&sock, sockopt::SendTimeout, &tv)?;
    loop {
        match socket::connect(sock.as_raw_fd(), &addr) {
            Ok(()) => return Ok(sock),
            Err(Errno::EINTR) => continue,
            // An interrupted connect that completed meanwhile.
            Err(Errno::EISCONN) => return Ok(sock),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::cvt;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixListener, UnixStream};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is valid for writes of two ints.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }).unwrap();
        // SAFETY: pipe2 returned two new fds that nothing else owns.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn fd_flags(fd: BorrowedFd<'_>) -> libc::c_int {
        // SAFETY: fcntl(F_GETFD) has no memory-safety preconditions.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) }
    }

    #[test]
    fn fd_passes_and_content_is_readable() {
        let (a, b) = UnixStream::pair().unwrap();
        let mfd = super::super::memfd::create(c"scm-test").unwrap();
        let mut file = std::fs::File::from(mfd);
        file.write_all(b"twinpage").unwrap();

        let n = send_with_fd(a.as_fd(), b"hello", Some(file.as_fd())).unwrap();
        assert_eq!(n, 5);
        let mut buf = [0u8; 16];
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        let fd = fd.expect("descriptor arrives with its bytes");
        assert!(fd_flags(fd.as_fd()) & libc::FD_CLOEXEC != 0, "received fds are close-on-exec");
        let mut got = String::new();
        let mut recv_file = std::fs::File::from(fd);
        std::io::Seek::seek(&mut recv_file, std::io::SeekFrom::Start(0)).unwrap();
        recv_file.read_to_string(&mut got).unwrap();
        assert_eq!(got, "twinpage");
    }

    #[test]
    fn pipe_passes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = pipe();
        send_with_fd(a.as_fd(), b"x", Some(w.as_fd())).unwrap();
        drop(w);
        let mut buf = [0u8; 4];
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!(n, 1);
        let mut w2 = std::fs::File::from(fd.unwrap());
        w2.write_all(b"through").unwrap();
        drop(w2);
        let mut got = String::new();
        std::fs::File::from(r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "through");
    }

    #[test]
    fn plain_bytes_have_no_fd_and_eof_is_zero() {
        let (a, b) = UnixStream::pair().unwrap();
        assert_eq!(send_with_fd(a.as_fd(), b"abc", None).unwrap(), 3);
        drop(a);
        let mut buf = [0u8; 8];
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fd.is_none()), (3, true));
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fd.is_none()), (0, true));
    }

    #[test]
    fn fd_without_bytes_is_rejected() {
        let (a, _b) = UnixStream::pair().unwrap();
        let (r, _w) = pipe();
        let err = send_with_fd(a.as_fd(), b"", Some(r.as_fd())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    /// Sends one message carrying `fds` (as a hostile peer might).
    fn send_many(sock: BorrowedFd<'_>, fds: &[RawFd]) -> nix::Result<usize> {
        let data = [7u8; 3];
        socket::sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&data)], &[ControlMessage::ScmRights(fds)], MsgFlags::MSG_NOSIGNAL, None)
    }

    /// Whether every write end of the pipe whose read end is `r` is closed:
    /// a non-blocking read sees end of file rather than `WouldBlock`.
    fn writers_closed(r: &OwnedFd) -> bool {
        // SAFETY: fcntl(F_SETFL) has no memory-safety preconditions.
        cvt(unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) }).unwrap();
        let mut byte = 0u8;
        // SAFETY: `byte` is valid for a write of one byte.
        let n = unsafe { libc::read(r.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
        match n {
            0 => true,
            -1 if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock => false,
            n => panic!("unexpected read result {n}"),
        }
    }

    #[test]
    fn extra_fds_are_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let pipes: Vec<_> = (0..3).map(|_| pipe()).collect();
        let raws: Vec<RawFd> = pipes.iter().map(|(_, w)| w.as_raw_fd()).collect();
        assert_eq!(send_many(a.as_fd(), &raws), Ok(3));
        let readers: Vec<OwnedFd> = pipes.into_iter().map(|(r, _w)| r).collect();
        let mut buf = [0u8; 8];
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!(n, 3);
        assert!(fd.is_some());
        assert!(!writers_closed(&readers[0]), "the first descriptor is handed out");
        assert!(writers_closed(&readers[1]), "second descriptor leaked");
        assert!(writers_closed(&readers[2]), "third descriptor leaked");
        drop(fd);
        assert!(writers_closed(&readers[0]));
    }

    /// The most a peer can send in one message all arrive and all but the
    /// first are closed; one more is refused at the sender, so the control
    /// data cannot come truncated.
    #[test]
    fn the_most_descriptors_a_message_carries_are_all_owned() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = pipe();
        assert_eq!(send_many(a.as_fd(), &vec![w.as_raw_fd(); SCM_MAX_FD + 1]), Err(Errno::EINVAL));
        assert_eq!(send_many(a.as_fd(), &vec![w.as_raw_fd(); SCM_MAX_FD]), Ok(3));
        drop(w);
        let mut buf = [0u8; 8];
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!(n, 3);
        assert!(!writers_closed(&r), "the first descriptor is handed out");
        drop(fd);
        assert!(writers_closed(&r), "a descriptor leaked");
    }

    #[test]
    fn peer_cred_is_ours() {
        let (a, b) = UnixStream::pair().unwrap();
        let cred = peer_cred(a.as_fd()).unwrap();
        assert_eq!(cred.pid, std::process::id() as i32);
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        assert_eq!(cred, PeerCred { pid: std::process::id() as i32, uid, gid });
        assert_eq!(peer_cred(b.as_fd()).unwrap(), cred);
    }

    #[test]
    fn connect_with_timeout() {
        let dir = std::env::temp_dir().join(format!("twinpage-scm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let sock = connect(&path, Duration::from_secs(1)).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        send_with_fd(sock.as_fd(), b"hi", None).unwrap();
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        assert_eq!(connect(&dir.join("missing"), Duration::from_secs(1)).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(connect(&path, Duration::ZERO).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
