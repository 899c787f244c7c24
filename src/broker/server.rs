//! The daemon's side of the socket: one thread per agent, all deciding on one
//! [`Broker`] under its lock. A peer that sends anything malformed is told
//! why (`Refused`) and disconnected.
//!
//! When a connection ends, the agent's references are dropped only once its
//! process has exited: a live process (its link timed out, was cut, or it
//! sent garbage) still maps the store pages it merged, and a hole punched
//! under them would read back as zeros there. Such an agent is parked (its
//! proposals go, its references stay) and a reaper drops it when its process
//! exits, watched through a pidfd.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::conn::{Conn, ConnError};
use super::proto::Msg;
use super::Broker;
use crate::stats::KsmStats;
use crate::statsfs::Source;
use crate::sys::pidfd;

/// How long a new peer has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection's end waits for the agent's process to finish
/// exiting (a killed process closes its sockets just before it is gone).
const EXIT_GRACE_MS: i32 = 200;
/// How often parked agents' processes are checked.
const REAP_EVERY: Duration = Duration::from_millis(100);
/// How long a `Resume` waits for the old connection to be wound up.
const RESUME_WAIT: Duration = Duration::from_millis(EXIT_GRACE_MS as u64 * 3);
/// Connections beyond `max_agents` allowed in before their hello.
const PRE_HELLO_SLACK: usize = 16;

/// The broker as the daemon runs it, and as its stats tree publishes it.
#[derive(Debug, Default)]
pub struct Daemon {
    pub broker: Mutex<Broker>,
    /// Parked agents and their processes' pidfds.
    parked: Mutex<Vec<(u32, OwnedFd)>>,
    /// Each connected agent's socket, so that its process reconnecting
    /// (`Resume`) can wind up the connection it gave up on.
    live: Mutex<std::collections::HashMap<u32, UnixStream>>,
    /// Connections being served (one thread each).
    connections: std::sync::atomic::AtomicUsize,
}

impl Daemon {
    /// A daemon with these limits.
    pub fn new(limits: super::Limits) -> Self {
        let d = Self::default();
        d.broker.lock().limits = limits;
        d
    }

    /// Drops parked agents whose processes have exited.
    pub fn reap(&self) {
        let gone: Vec<u32> = {
            let mut parked = self.parked.lock();
            let mut gone = Vec::new();
            parked.retain(|(id, fd)| {
                let exited = pidfd::exited(fd.as_fd(), 0).unwrap_or(true);
                if exited {
                    gone.push(*id);
                }
                !exited
            });
            gone
        };
        if gone.is_empty() {
            return;
        }
        let mut b = self.broker.lock();
        for id in gone {
            log::info!("twinpaged: parked agent {id} (pid {}) exited; its references are dropped", b.pid_of(id).unwrap_or(0));
            b.leave(id);
        }
        drop(b);
        // What the parked agents' holdings took goes back, as when an
        // agent's own thread ends.
        crate::sys::heap::release_free();
    }
}

/// The process whose memory holds an agent's merges: the pid its hello
/// names when the peer is in the daemon's pid namespace (so the name means
/// the same process here) and that process belongs to the peer's uid (root
/// may name any; lying only hurts the liar, whose references outlive or
/// undercut its own mappings); otherwise the peer, whose pid the kernel
/// translated (an agent in a container). Naming it lets a relay (a test's)
/// stand between agent and daemon.
fn holder_pid(claimed: u32, peer_pid: u32, peer_uid: u32) -> u32 {
    if claimed == peer_pid || claimed == 0 {
        return peer_pid;
    }
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let same_ns = ns(&peer_pid.to_string()).is_some_and(|p| Some(p) == ns("self"));
    let owner = std::fs::metadata(format!("/proc/{claimed}")).map(|m| m.uid());
    match owner {
        Ok(uid) if same_ns && (uid == peer_uid || peer_uid == 0) => claimed,
        _ => peer_pid,
    }
}

impl Source for Daemon {
    fn stats(&self) -> KsmStats {
        self.broker.lock().stats()
    }
    fn show_attr(&self, name: &str) -> Option<String> {
        let b = self.broker.lock();
        crate::tunables::show_attr(&b.tunables, &b.stats(), name, crate::tunables::has_numa())
    }
    fn set_attr(&self, name: &str, text: &str) -> Result<(), kernel_compat::WriteError> {
        let b = self.broker.lock();
        let shared = b.stats().pages_shared;
        b.tunables.write_attr(name, text, shared, crate::tunables::has_numa())
    }
    fn sleep_millisecs(&self) -> u32 {
        self.broker.lock().tunables.sleep_millisecs()
    }
}

/// Accepts agents until `stop` is set (checked whenever a connection
/// arrives; the caller wakes the loop by connecting once).
pub fn serve(daemon: Arc<Daemon>, listener: UnixListener, stop: Arc<AtomicBool>) -> io::Result<()> {
    let (d, s) = (daemon.clone(), stop.clone());
    std::thread::Builder::new().name("twinpaged-reap".into()).spawn(move || {
        while !s.load(Ordering::SeqCst) {
            std::thread::sleep(REAP_EVERY);
            d.reap();
        }
    })?;
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("twinpaged: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // One thread per connection, bounded: agents, plus a few peers that
        // have not said hello yet (each has HELLO_TIMEOUT to do so).
        let max = daemon.broker.lock().limits.max_agents.saturating_add(PRE_HELLO_SLACK);
        if daemon.connections.load(Ordering::SeqCst) >= max {
            crate::warn_once!("too-many-connections", "twinpaged: {max} connections open; more are refused");
            let mut conn = Conn::new(stream);
            let _ = conn.set_timeout(Some(Duration::from_millis(100)));
            let _ = conn.send(&Msg::Refused { reason: format!("the daemon has its maximum of {max} connections open") });
            continue;
        }
        daemon.connections.fetch_add(1, Ordering::SeqCst);
        let d = daemon.clone();
        let spawned = std::thread::Builder::new().name("twinpaged-agent".into()).spawn(move || {
            struct Done<'a>(&'a Daemon);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.connections.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _done = Done(&d);
            serve_agent(&d, stream);
            // This thread's arena holds what the agent's batches allocated,
            // its connection's buffers included.
            crate::sys::heap::release_free();
        });
        if let Err(e) = spawned {
            daemon.connections.fetch_sub(1, Ordering::SeqCst);
            log::warn!("twinpaged: cannot start a thread for an agent: {e}");
        }
    }
    Ok(())
}

fn refuse(conn: &mut Conn, reason: String) {
    log::warn!("twinpaged: {reason}");
    let _ = conn.send(&Msg::Refused { reason });
    conn.shutdown();
}

/// One agent's connection, from hello to goodbye.
pub fn serve_agent(daemon: &Daemon, stream: UnixStream) {
    // For a `Resume` to shut the connection down from another thread.
    let handle = stream.try_clone().ok();
    let mut conn = Conn::new(stream);
    let cred = match conn.peer_cred() {
        Ok(c) => c,
        Err(e) => return log::warn!("twinpaged: cannot read a peer's credentials: {e}"),
    };
    let _ = conn.set_timeout(Some(HELLO_TIMEOUT));
    let (domain, claimed) = match conn.recv() {
        Ok((Msg::Hello { domain, pid }, _)) => (domain, pid),
        Ok((other, _)) => return refuse(&mut conn, format!("pid {} spoke before hello: {}", cred.pid, other.name())),
        Err(e) => return log::debug!("twinpaged: pid {} left before hello: {e}", cred.pid),
    };
    let holder = holder_pid(claimed, cred.pid as u32, cred.uid);
    // Without a pidfd (the process is already gone, or an old kernel) the
    // references go when the connection ends, as the process is gone.
    let watch = pidfd::open(holder).map_err(|e| log::debug!("twinpaged: no pidfd for pid {holder}: {e}")).ok();
    let joined = {
        let mut b = daemon.broker.lock();
        b.join(holder, cred.uid, domain.as_deref()).map(|(id, fd)| (id, fd, b.agents()))
    };
    let (id, fd, agents) = match joined {
        Ok(j) => j,
        Err(e @ super::JoinError::TooMany(_)) => {
            // Refused agents retry every second: one line, not one a second.
            crate::warn_once!("too-many-agents", "twinpaged: {e}; more agents are refused and merge alone");
            let _ = conn.send(&Msg::Refused { reason: format!("pid {} (uid {}) refused: {e}", cred.pid, cred.uid) });
            return conn.shutdown();
        }
        Err(e) => return refuse(&mut conn, format!("pid {} (uid {}) refused: {e}", cred.pid, cred.uid)),
    };
    if let Some(s) = handle {
        daemon.live.lock().insert(id, s);
    }
    let name = domain.unwrap_or_else(|| super::default_domain(cred.uid));
    log::info!("twinpaged: agent {id} joined: pid {} uid {} domain {name}", cred.pid, cred.uid);
    let _ = conn.set_timeout(None);
    let end = if let Err(e) = conn.send_with_fd(&Msg::Welcome { agent_id: id, agents }, std::os::fd::AsFd::as_fd(&fd)) {
        Err(e)
    } else {
        drop(fd);
        agent_loop(daemon, &mut conn, id)
    };
    daemon.live.lock().remove(&id);
    let alive = watch.as_ref().is_some_and(|fd| !pidfd::exited(fd.as_fd(), EXIT_GRACE_MS).unwrap_or(true));
    match watch.filter(|_| alive) {
        Some(fd) => {
            log::info!("twinpaged: agent {id} (pid {holder}) disconnected but runs on: its references stay until it exits");
            let mut parked = daemon.parked.lock();
            daemon.broker.lock().park(id);
            parked.push((id, fd));
        }
        None => daemon.broker.lock().leave(id),
    }
    match end {
        Ok(()) | Err(ConnError::Closed) => log::info!("twinpaged: agent {id} (pid {}) left", cred.pid),
        Err(ConnError::Proto(e)) => refuse(&mut conn, format!("agent {id} (pid {}) sent a bad message: {e}", cred.pid)),
        Err(e) => log::info!("twinpaged: agent {id} (pid {}) dropped: {e}", cred.pid),
    }
}

fn agent_loop(daemon: &Daemon, conn: &mut Conn, id: u32) -> Result<(), ConnError> {
    loop {
        let (msg, _stray_fd) = conn.recv()?;
        match msg {
            Msg::Scan { items } => {
                let mut b = daemon.broker.lock();
                let orders = b.scan(id, &items);
                let agents = b.agents();
                drop(b);
                conn.send(&Msg::Orders { agents, orders })?;
            }
            Msg::Fill { pages } => {
                let results = daemon.broker.lock().fill(id, &pages);
                conn.send(&Msg::Filled { results })?;
            }
            Msg::Report { committed, cancelled, released, retired } => {
                daemon.broker.lock().report(id, &committed, &cancelled, &released, &retired);
            }
            Msg::FullScan => daemon.broker.lock().full_scan(id),
            Msg::AskTotals => {
                let s = daemon.broker.lock().stats();
                conn.send(&Msg::Totals { pages_shared: s.pages_shared, pages_sharing: s.pages_sharing })?;
            }
            Msg::Holding { store, done } => {
                let dropped = daemon.broker.lock().claim(id, &store, done);
                if dropped > 0 {
                    log::info!("twinpaged: agent {id} no longer maps {dropped} pages of its parked self; their references are dropped");
                }
            }
            Msg::Resume { agent_id } => {
                // The old connection's thread may not have seen its end yet:
                // the process gave up on it (a stalled reply), and the daemon
                // may not have read that far. The process's word is enough
                // (`resume` checks it is the same process and domain): the old
                // connection is shut down, its thread parks the old agent
                // (after up to EXIT_GRACE_MS watching the process), and this
                // waits a little longer than that.
                let deadline = std::time::Instant::now() + RESUME_WAIT;
                let mut cut = false;
                let ok = loop {
                    match daemon.broker.lock().resume(id, agent_id) {
                        super::Resume::Taken => break true,
                        super::Resume::Busy if std::time::Instant::now() < deadline => {
                            if !std::mem::replace(&mut cut, true) {
                                if let Some(old) = daemon.live.lock().get(&agent_id) {
                                    let _ = old.shutdown(std::net::Shutdown::Both);
                                }
                            }
                        }
                        _ => break false,
                    }
                    std::thread::sleep(Duration::from_millis(10));
                };
                if ok {
                    log::info!("twinpaged: agent {id} took over the references of its parked self, agent {agent_id}");
                    daemon.parked.lock().retain(|(parked, _)| *parked != agent_id);
                }
                conn.send(&Msg::Resumed { ok })?;
            }
            other => {
                let pid = daemon.broker.lock().pid_of(id).unwrap_or(0);
                refuse(conn, format!("agent {id} (pid {pid}) sent {} out of turn", other.name()));
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::holder_pid;

    #[test]
    fn the_named_holder_must_exist_here_and_belong_to_the_peer() {
        let me = std::process::id();
        let uid = nix::unistd::getuid().as_raw();
        let child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        assert_eq!(holder_pid(child.id(), me, uid), child.id(), "a process of the peer's uid, same namespace");
        assert_eq!(holder_pid(u32::MAX - 1, me, uid), me, "no such process: the peer");
        assert_eq!(holder_pid(0, me, uid), me);
        if uid != 0 {
            assert_eq!(holder_pid(1, me, uid), me, "another uid's process: the peer");
        } else {
            assert_eq!(holder_pid(child.id(), me, 12345), me, "another uid's process: the peer");
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
    }
}
