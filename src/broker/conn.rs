//! A framed connection between an agent and the broker: whole [`Msg`]s over a
//! Unix stream socket, with a file descriptor riding along when one is sent.
//!
//! Reads never go past the end of the frame being read, so a descriptor that
//! arrives is always returned with the message its bytes belong to. Every
//! read takes descriptors (`recvmsg`), so none is ever dropped unseen; every
//! write is `MSG_NOSIGNAL`, so a vanished peer is an error, never a `SIGPIPE`
//! (this code runs inside QEMU). A frame header is checked as soon as its 8
//! bytes are in, so an oversized announcement fails at once rather than
//! waiting for bytes that may never come.
//!
//! After any error other than a timeout the connection is unusable and should
//! be dropped; a timed-out `recv` can be retried (what was read is kept), a
//! timed-out `send` cannot (part of the frame may have gone).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::proto::{self, Msg, ProtoError, HEADER};
use crate::sys::scm;

/// Receive buffers larger than this are freed after their message.
const KEEP_RBUF: usize = 256 << 10;

/// Errors of a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer closed the connection (end of stream, possibly mid-frame;
    /// or a reset or broken pipe).
    #[error("connection closed")]
    Closed,
    #[error("i/o")]
    Io(#[source] io::Error),
    #[error("protocol")]
    Proto(#[source] ProtoError),
}

impl ConnError {
    fn io(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ConnError::Closed,
            _ => ConnError::Io(e),
        }
    }
}

/// One end of a framed connection.
#[derive(Debug)]
pub struct Conn {
    sock: UnixStream,
    /// The frame being received: `rbuf[..filled]` has arrived.
    rbuf: Vec<u8>,
    filled: usize,
    /// The descriptor that came with the frame being received.
    pending_fd: Option<OwnedFd>,
}

impl Conn {
    /// Wraps a connected stream socket. Timeouts are left as they are.
    pub fn new(sock: UnixStream) -> Self {
        Conn { sock, rbuf: Vec::new(), filled: 0, pending_fd: None }
    }

    /// Connects to the socket at `path`, waiting at most `timeout` for the
    /// listener, and sets `timeout` as the read and write timeout.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ConnError> {
        let fd = scm::connect(path, timeout).map_err(ConnError::Io)?;
        let conn = Conn::new(UnixStream::from(fd));
        conn.set_timeout(Some(timeout)).map_err(ConnError::Io)?;
        Ok(conn)
    }

    /// Sets the read and write timeout (`None`: block indefinitely). A zero
    /// duration is `InvalidInput`. A timed-out operation fails with
    /// `Io(WouldBlock)`.
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)?;
        self.sock.set_write_timeout(t)
    }

    /// Sends one message. A message beyond the protocol's limits is not sent:
    /// `Proto` error.
    pub fn send(&mut self, msg: &Msg) -> Result<(), ConnError> {
        self.send_frame(msg, None)
    }

    /// Sends one message with `fd` attached (`SCM_RIGHTS`); the peer's
    /// [`recv`](Conn::recv) returns a duplicate of it with the message.
    pub fn send_with_fd(&mut self, msg: &Msg, fd: BorrowedFd<'_>) -> Result<(), ConnError> {
        self.send_frame(msg, Some(fd))
    }

    fn send_frame(&mut self, msg: &Msg, mut fd: Option<BorrowedFd<'_>>) -> Result<(), ConnError> {
        proto::validate(msg).map_err(ConnError::Proto)?;
        let mut buf = Vec::with_capacity(proto::encoded_len(msg));
        proto::encode(msg, &mut buf);
        let mut off = 0;
        while off < buf.len() {
            let n = scm::send_with_fd(self.sock.as_fd(), &buf[off..], fd).map_err(ConnError::io)?;
            if n == 0 {
                return Err(ConnError::Io(io::ErrorKind::WriteZero.into()));
            }
            // The descriptor went with the first bytes.
            fd = None;
            off += n;
        }
        Ok(())
    }

    /// Receives one message, blocking (up to the read timeout) until the
    /// whole frame is in. Returns the descriptor that came with the message's
    /// bytes, if any (a second one in the same frame is closed).
    ///
    /// End of stream, between frames or inside one, is `Closed`; a bad frame
    /// is `Proto` (as soon as its header is in when the header is bad); a
    /// timeout is `Io(WouldBlock)` and keeps what was read, so `recv` can be
    /// called again.
    pub fn recv(&mut self) -> Result<(Msg, Option<OwnedFd>), ConnError> {
        loop {
            let want = if self.filled < HEADER {
                HEADER
            } else {
                let total = proto::frame_len(&self.rbuf[..HEADER]).map_err(ConnError::Proto)?;
                if self.filled == total {
                    return self.take_frame(total);
                }
                total
            };
            if self.rbuf.len() < want {
                // A fresh zeroed allocation is cheap (calloc) even for the
                // largest frames; only the bytes already in are copied.
                let mut grown = vec![0u8; want];
                grown[..self.filled].copy_from_slice(&self.rbuf[..self.filled]);
                self.rbuf = grown;
            }
            let (n, fd) = scm::recv_with_fd(self.sock.as_fd(), &mut self.rbuf[self.filled..want]).map_err(ConnError::io)?;
            if let Some(fd) = fd {
                // A second descriptor within one frame is dropped (closed).
                self.pending_fd.get_or_insert(fd);
            }
            if n == 0 {
                return Err(ConnError::Closed);
            }
            self.filled += n;
        }
    }

    /// Decodes the complete frame in `rbuf[..total]` and starts the next one.
    fn take_frame(&mut self, total: usize) -> Result<(Msg, Option<OwnedFd>), ConnError> {
        let decoded = proto::decode(&self.rbuf[..total]);
        self.filled = 0;
        if self.rbuf.len() > KEEP_RBUF {
            self.rbuf = Vec::new();
        }
        let fd = self.pending_fd.take();
        let (msg, used) = decoded.map_err(ConnError::Proto)?;
        debug_assert_eq!(used, total);
        Ok((msg, fd))
    }

    /// Credentials of the peer process.
    pub fn peer_cred(&self) -> io::Result<scm::PeerCred> {
        scm::peer_cred(self.sock.as_fd())
    }

    /// The socket, e.g. to poll it.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Shuts the socket down in both directions (errors ignored): the peer
    /// sees end of stream, and a thread blocked in `recv` on this connection
    /// returns.
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::proto::{Candidate, FillPage, Order, OrderKind, MAX_FILL, PAGE};
    use std::io::{Read, Seek, Write};
    use std::time::Instant;

    fn pair() -> (Conn, Conn) {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (Conn::new(a), Conn::new(b));
        a.set_timeout(Some(Duration::from_secs(10))).unwrap();
        b.set_timeout(Some(Duration::from_secs(10))).unwrap();
        (a, b)
    }

    fn raw_pair() -> (UnixStream, Conn) {
        let (a, b) = UnixStream::pair().unwrap();
        let b = Conn::new(b);
        b.set_timeout(Some(Duration::from_secs(10))).unwrap();
        (a, b)
    }

    fn frame(msg: &Msg) -> Vec<u8> {
        let mut out = Vec::new();
        proto::encode(msg, &mut out);
        out
    }

    #[test]
    fn messages_both_ways() {
        let (mut agent, mut broker) = pair();
        let hello = Msg::Hello { pid: 77, domain: Some("guests".into()) };
        agent.send(&hello).unwrap();
        let scan = Msg::Scan { items: vec![Candidate { token: 1, digest: 2, stable: true }] };
        agent.send(&scan).unwrap();
        agent.send(&Msg::FullScan).unwrap();
        let (m, fd) = broker.recv().unwrap();
        assert_eq!((m, fd.is_none()), (hello, true));
        assert_eq!(broker.recv().unwrap().0, scan);
        assert_eq!(broker.recv().unwrap().0, Msg::FullScan);
        let orders = Msg::Orders { agents: 2, orders: vec![Order { token: 1, store: 0, kind: OrderKind::Upload }] };
        broker.send(&orders).unwrap();
        assert_eq!(agent.recv().unwrap().0, orders);
    }

    #[test]
    fn fd_travels_with_welcome() {
        let (mut agent, mut broker) = pair();
        let store = crate::sys::memfd::create(c"conn-test").unwrap();
        let mut f = std::fs::File::from(store);
        f.write_all(b"store page").unwrap();
        // A message before and after: the fd belongs to the Welcome only.
        broker.send(&Msg::Filled { results: vec![(1, true)] }).unwrap();
        broker.send_with_fd(&Msg::Welcome { agent_id: 5, agents: 1 }, f.as_fd()).unwrap();
        broker.send(&Msg::FullScan).unwrap();
        let (m, fd) = agent.recv().unwrap();
        assert!(matches!(m, Msg::Filled { .. }) && fd.is_none());
        let (m, fd) = agent.recv().unwrap();
        assert_eq!(m, Msg::Welcome { agent_id: 5, agents: 1 });
        let mut got = String::new();
        let mut g = std::fs::File::from(fd.expect("the store fd"));
        g.rewind().unwrap();
        g.read_to_string(&mut got).unwrap();
        assert_eq!(got, "store page");
        let (m, fd) = agent.recv().unwrap();
        assert_eq!((m, fd.is_none()), (Msg::FullScan, true));
    }

    #[test]
    fn largest_fill_crosses() {
        let (mut agent, mut broker) = pair();
        let pages: Vec<FillPage> = (0..MAX_FILL)
            .map(|i| {
                let mut bytes = Box::new([0u8; PAGE]);
                bytes.fill(i as u8);
                bytes[0] = (i >> 8) as u8;
                FillPage { store: i as u32, digest: i as u64 * 7, bytes }
            })
            .collect();
        let msg = Msg::Fill { pages };
        let sent = msg.clone();
        let writer = std::thread::spawn(move || {
            agent.send(&sent).unwrap();
            agent
        });
        assert_eq!(broker.recv().unwrap().0, msg);
        let mut agent = writer.join().unwrap();
        // The connection is still in step after a large frame.
        broker.send(&Msg::Welcome { agent_id: 1, agents: 1 }).unwrap();
        assert_eq!(agent.recv().unwrap().0, Msg::Welcome { agent_id: 1, agents: 1 });
    }

    #[test]
    fn garbage_header_is_a_protocol_error() {
        let (mut raw, mut conn) = raw_pair();
        raw.write_all(b"GARBAGE!").unwrap();
        assert!(matches!(conn.recv(), Err(ConnError::Proto(ProtoError::Version(_)))));
        let (mut raw, mut conn) = raw_pair();
        let mut h = frame(&Msg::FullScan);
        h[6] = 99;
        raw.write_all(&h).unwrap();
        assert!(matches!(conn.recv(), Err(ConnError::Proto(ProtoError::Kind(99)))));
        // A complete frame with a bad payload.
        let (mut raw, mut conn) = raw_pair();
        let mut f = frame(&Msg::Filled { results: vec![(1, true)] });
        *f.last_mut().unwrap() = 2;
        raw.write_all(&f).unwrap();
        assert!(matches!(conn.recv(), Err(ConnError::Proto(ProtoError::Malformed(_)))));
    }

    #[test]
    fn oversized_header_fails_without_waiting() {
        let (mut raw, mut conn) = raw_pair();
        let mut h = Vec::new();
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        h.extend_from_slice(&proto::VERSION.to_le_bytes());
        h.extend_from_slice(&3u16.to_le_bytes());
        raw.write_all(&h).unwrap();
        // The peer stays connected and sends nothing more.
        let start = Instant::now();
        assert!(matches!(conn.recv(), Err(ConnError::Proto(ProtoError::TooLarge(_)))));
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(raw);
    }

    #[test]
    fn close_mid_frame_or_between_frames() {
        let (mut raw, mut conn) = raw_pair();
        let f = frame(&Msg::Scan { items: vec![Candidate { token: 1, digest: 2, stable: false }; 3] });
        raw.write_all(&f).unwrap();
        raw.write_all(&f[..f.len() / 2]).unwrap();
        drop(raw);
        assert!(matches!(conn.recv(), Ok((Msg::Scan { .. }, None))));
        assert!(matches!(conn.recv(), Err(ConnError::Closed)));
        // Inside the header.
        let (mut raw, mut conn) = raw_pair();
        raw.write_all(&f[..3]).unwrap();
        drop(raw);
        assert!(matches!(conn.recv(), Err(ConnError::Closed)));
        // At a boundary.
        let (raw, mut conn) = raw_pair();
        drop(raw);
        assert!(matches!(conn.recv(), Err(ConnError::Closed)));
    }

    #[test]
    fn timeouts_keep_what_was_read() {
        let (mut raw, mut conn) = raw_pair();
        conn.set_timeout(Some(Duration::from_millis(50))).unwrap();
        let timed_out = |r: Result<(Msg, Option<OwnedFd>), ConnError>| match r {
            Err(ConnError::Io(e)) => matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
            _ => false,
        };
        assert!(timed_out(conn.recv()));
        let f = frame(&Msg::Refused { reason: "go away".into() });
        raw.write_all(&f[..5]).unwrap();
        assert!(timed_out(conn.recv()));
        raw.write_all(&f[5..11]).unwrap();
        assert!(timed_out(conn.recv()));
        raw.write_all(&f[11..]).unwrap();
        assert_eq!(conn.recv().unwrap().0, Msg::Refused { reason: "go away".into() });
    }

    #[test]
    fn send_timeout_and_closed_peer() {
        let (mut a, b) = pair();
        a.set_timeout(Some(Duration::from_millis(50))).unwrap();
        // Nobody reads: the socket buffer fills and the send times out.
        let big = Msg::Scan { items: vec![Candidate { token: 0, digest: 0, stable: false }; 65536] };
        let mut result = Ok(());
        for _ in 0..64 {
            result = a.send(&big);
            if result.is_err() {
                break;
            }
        }
        match result {
            Err(ConnError::Io(e)) => assert!(matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
            other => panic!("expected a timeout, got {other:?}"),
        }
        drop(b);
        assert!(matches!(a.send(&Msg::FullScan), Err(ConnError::Closed)));
    }

    #[test]
    fn send_refuses_messages_over_the_limits() {
        let (mut a, mut b) = pair();
        let long = Msg::Refused { reason: "x".repeat(proto::MAX_REASON + 1) };
        assert!(matches!(a.send(&long), Err(ConnError::Proto(_))));
        let bad = Msg::Hello { pid: 1, domain: Some("no spaces".into()) };
        assert!(matches!(a.send(&bad), Err(ConnError::Proto(_))));
        // Nothing went out: the next message arrives intact.
        a.send(&Msg::FullScan).unwrap();
        assert_eq!(b.recv().unwrap().0, Msg::FullScan);
    }

    #[test]
    fn connect_and_peer_cred() {
        let dir = std::env::temp_dir().join(format!("twinpage-conn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut agent = Conn::connect(&path, Duration::from_secs(5)).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let mut broker = Conn::new(stream);
        let cred = broker.peer_cred().unwrap();
        assert_eq!(cred.pid, std::process::id() as i32);
        assert_eq!(agent.peer_cred().unwrap(), cred);
        agent.send(&Msg::Hello { pid: 1, domain: None }).unwrap();
        assert_eq!(broker.recv().unwrap().0, Msg::Hello { pid: 1, domain: None });
        broker.shutdown();
        assert!(matches!(agent.recv(), Err(ConnError::Closed)));
        assert!(matches!(
            Conn::connect(&dir.join("absent"), Duration::from_secs(1)),
            Err(ConnError::Io(e)) if e.kind() == io::ErrorKind::NotFound
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
