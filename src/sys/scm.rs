//! Unix-socket plumbing for the broker protocol: `sendmsg`/`recvmsg` carrying at
//! most one file descriptor (`SCM_RIGHTS`), the peer's credentials
//! (`SO_PEERCRED`) and a connect bounded by a timeout.
//!
//! Every send uses `MSG_NOSIGNAL`: this code runs inside QEMU, where a `SIGPIPE`
//! from a dead daemon must never kill the guest. Every received descriptor is
//! close-on-exec (`MSG_CMSG_CLOEXEC`) and owned as soon as it arrives, so none is
//! ever leaked, whatever the peer sends.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use super::cvt;

/// Room for the control messages of one receive: one `SCM_RIGHTS` message of
/// at least [`RECV_FDS`] descriptors plus an `SCM_CREDENTIALS` message (sent by
/// the kernel when the socket has `SO_PASSCRED`). A peer sending more
/// descriptors than fit gets its message truncated (`MSG_CTRUNC`): what came
/// is closed and the receive fails.
const RECV_FDS: usize = 8;
const CMSG_BUF: usize = 128;

/// A control-message buffer aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF]);

const _: () = assert!(std::mem::align_of::<CmsgBuf>() >= std::mem::align_of::<libc::cmsghdr>());

/// `CMSG_SPACE(n)` for `n` bytes of data.
fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    unsafe { libc::CMSG_SPACE(n as libc::c_uint) as usize }
}

/// `CMSG_LEN(n)` for `n` bytes of data.
fn cmsg_len(n: usize) -> usize {
    // SAFETY: CMSG_LEN is pure arithmetic on its argument.
    unsafe { libc::CMSG_LEN(n as libc::c_uint) as usize }
}

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
    let mut cmsg = CmsgBuf([0; CMSG_BUF]);
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: msghdr is plain old data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        let space = cmsg_space(size_of::<RawFd>());
        debug_assert!(space <= CMSG_BUF);
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes of `cmsg`, aligned for
        // cmsghdr, so CMSG_FIRSTHDR returns a pointer to the start of it.
        let hdr = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if hdr.is_null() {
            return Err(io::Error::other("control buffer too small"));
        }
        let raw = fd.as_raw_fd();
        // SAFETY: `hdr` points at an aligned cmsghdr inside `cmsg`, followed by
        // room for one int (CMSG_SPACE(sizeof(int)) bytes were reserved above);
        // CMSG_DATA may be unaligned for int, hence write_unaligned.
        unsafe {
            (*hdr).cmsg_level = libc::SOL_SOCKET;
            (*hdr).cmsg_type = libc::SCM_RIGHTS;
            (*hdr).cmsg_len = cmsg_len(size_of::<RawFd>()) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(hdr).cast::<RawFd>(), raw);
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (valid for reads of `data.len()` bytes)
        // and, when set, at `cmsg`; both outlive the call.
        let ret = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if ret >= 0 {
            return Ok(ret as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives up to `buf.len()` bytes from a stream socket, and the descriptor
/// that came with them, if any.
///
/// Returns `(0, None)` at end of stream (or when `buf` is empty). At most one
/// descriptor is returned: any others that arrived are closed. A truncated
/// control message (`MSG_CTRUNC`: the peer sent more descriptors than fit)
/// closes what came and is an `InvalidData` error; the bytes of that receive
/// are lost, so the caller should drop the connection. Received descriptors are
/// close-on-exec. Interrupted calls are retried; a timeout (`SO_RCVTIMEO`) is
/// `WouldBlock`.
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    if buf.is_empty() {
        return Ok((0, None));
    }
    let mut cmsg = CmsgBuf([0; CMSG_BUF]);
    const _: () = assert!(CMSG_BUF >= 16 + RECV_FDS * 4 + 16 + 12 + 8);
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain old data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    let ret = loop {
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = CMSG_BUF as _;
        msg.msg_flags = 0;
        // SAFETY: `msg` points at `iov` (valid for writes of `buf.len()` bytes)
        // and at `cmsg` (valid for writes of CMSG_BUF bytes); both outlive the
        // call.
        let ret = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if ret >= 0 {
            break ret as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };

    // Take ownership of every descriptor that arrived before anything else, so
    // that each is closed on any path that does not hand it out.
    let mut first: Option<OwnedFd> = None;
    let mut extra: Vec<OwnedFd> = Vec::new();
    let controllen = (msg.msg_controllen as usize).min(CMSG_BUF);
    // SAFETY: `msg` was filled by recvmsg; its control pointer and length
    // describe the initialised prefix of `cmsg`.
    let mut hdr = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !hdr.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR only return headers lying wholly
        // within msg_control[..msg_controllen], which the kernel wrote.
        let (level, kind, len) = unsafe { ((*hdr).cmsg_level, (*hdr).cmsg_type, (*hdr).cmsg_len as usize) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_DATA points inside the same header.
            let data = unsafe { libc::CMSG_DATA(hdr) };
            let offset = data as usize - cmsg.0.as_ptr() as usize;
            let bytes = len.saturating_sub(cmsg_len(0)).min(controllen.saturating_sub(offset));
            for i in 0..bytes / size_of::<RawFd>() {
                // SAFETY: `data + i*4 .. +4` lies within the initialised
                // control data (bounded by cmsg_len and msg_controllen); it may
                // be unaligned.
                let raw = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                if raw < 0 {
                    continue;
                }
                // SAFETY: SCM_RIGHTS installed `raw` as a new descriptor of this
                // process that nothing else owns.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if first.is_none() {
                    first = Some(owned);
                } else {
                    extra.push(owned);
                }
            }
        }
        // SAFETY: `hdr` is a valid header within the control buffer of `msg`.
        hdr = unsafe { libc::CMSG_NXTHDR(&msg, hdr) };
    }
    drop(extra);
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        drop(first);
        return Err(io::Error::new(io::ErrorKind::InvalidData, "control message truncated (too many descriptors)"));
    }
    Ok((ret, first))
}

/// Credentials of the process at the other end of a Unix socket, as of when it
/// connected (or created the socket pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// `struct ucred` from `<sys/socket.h>`.
#[repr(C)]
#[derive(Default)]
struct Ucred {
    pid: i32,
    uid: u32,
    gid: u32,
}

const _: () = assert!(size_of::<Ucred>() == 12);

/// The peer's credentials (`SO_PEERCRED`).
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = Ucred::default();
    let mut len = size_of::<Ucred>() as libc::socklen_t;
    // SAFETY: `cred` is valid for writes of `len` bytes and `len` for a write
    // of one socklen_t; both outlive the call.
    let ret =
        unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut Ucred).cast(), &mut len) };
    cvt(ret)?;
    if len as usize != size_of::<Ucred>() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "SO_PEERCRED returned a short struct"));
    }
    Ok(PeerCred { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}

/// Connects a close-on-exec Unix stream socket to `path`, waiting at most
/// `timeout` when the listener's backlog is full (`SO_SNDTIMEO`, which the
/// kernel applies to `connect` on Unix sockets and which stays set on the
/// returned socket). A zero `timeout` is `InvalidInput`; a timeout is
/// `WouldBlock`.
pub fn connect(path: &Path, timeout: Duration) -> io::Result<OwnedFd> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path is empty, too long or contains NUL"));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let addr_len = (std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1) as libc::socklen_t;

    // SAFETY: socket has no memory-safety preconditions.
    let raw = cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket returned a new fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    set_timeout(sock.as_fd(), libc::SO_SNDTIMEO, timeout)?;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of at least `addr_len` bytes.
        let ret = unsafe { libc::connect(sock.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), addr_len) };
        if ret == 0 {
            return Ok(sock);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            // An interrupted connect that completed meanwhile.
            Some(libc::EISCONN) => return Ok(sock),
            _ => return Err(err),
        }
    }
}

/// Sets `SO_SNDTIMEO` or `SO_RCVTIMEO`.
fn set_timeout(sock: BorrowedFd<'_>, opt: libc::c_int, timeout: Duration) -> io::Result<()> {
    if timeout.is_zero() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero timeout"));
    }
    let secs = libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX);
    // Round sub-microsecond timeouts up: a zero timeval means "no timeout".
    let usecs = if secs == 0 { timeout.subsec_micros().max(1) } else { timeout.subsec_micros() };
    let tv = libc::timeval { tv_sec: secs, tv_usec: usecs as libc::suseconds_t };
    // SAFETY: `tv` is valid for reads of one timeval for the call.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    cvt(ret).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
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

    /// Sends one message carrying `fds` (hand-built, as a hostile peer would).
    fn send_many(sock: BorrowedFd<'_>, fds: &[RawFd]) {
        let data = [7u8; 3];
        let mut cbuf = vec![0u64; 64];
        let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
        // SAFETY: msghdr is plain old data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len() * 4) as _;
        assert!(cmsg_space(fds.len() * 4) <= cbuf.len() * 8);
        // SAFETY: the control buffer is aligned and large enough for one
        // header with `fds.len()` ints; the message buffers outlive sendmsg.
        unsafe {
            let hdr = libc::CMSG_FIRSTHDR(&msg);
            (*hdr).cmsg_level = libc::SOL_SOCKET;
            (*hdr).cmsg_type = libc::SCM_RIGHTS;
            (*hdr).cmsg_len = cmsg_len(fds.len() * 4) as _;
            let data = libc::CMSG_DATA(hdr).cast::<RawFd>();
            for (i, &fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), fd);
            }
            assert_eq!(libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL), 3);
        }
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
        send_many(a.as_fd(), &raws);
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

    #[test]
    fn truncated_control_closes_everything() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = pipe();
        let raws = vec![w.as_raw_fd(); 40];
        send_many(a.as_fd(), &raws);
        drop(w);
        let mut buf = [0u8; 8];
        let err = recv_with_fd(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
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
