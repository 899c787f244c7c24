//! The daemon's side of the socket: one thread per agent, all deciding on one
//! [`Broker`] under its lock. A peer that sends anything malformed is told
//! why (`Refused`) and disconnected; whatever way a connection ends, the
//! agent's references are dropped.

use std::io;
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

/// How long a new peer has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The broker as the daemon runs it, and as its stats tree publishes it.
#[derive(Debug, Default)]
pub struct Daemon {
    pub broker: Mutex<Broker>,
}

impl Source for Daemon {
    fn stats(&self) -> KsmStats {
        self.broker.lock().stats()
    }
    fn show_attr(&self, name: &str) -> Option<String> {
        let b = self.broker.lock();
        crate::tunables::show_attr(&b.tunables, &b.stats(), name, crate::engine::has_numa())
    }
    fn set_attr(&self, name: &str, text: &str) -> Result<(), kernel_compat::WriteError> {
        let b = self.broker.lock();
        let shared = b.stats().pages_shared;
        b.tunables.write_attr(name, text, shared, crate::engine::has_numa())
    }
    fn sleep_millisecs(&self) -> u32 {
        self.broker.lock().tunables.sleep_millisecs()
    }
}

/// Accepts agents until `stop` is set (checked whenever a connection
/// arrives; the caller wakes the loop by connecting once).
pub fn serve(daemon: Arc<Daemon>, listener: UnixListener, stop: Arc<AtomicBool>) -> io::Result<()> {
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
        let d = daemon.clone();
        let spawned = std::thread::Builder::new().name("twinpaged-agent".into()).spawn(move || serve_agent(&d, stream));
        if let Err(e) = spawned {
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
    let mut conn = Conn::new(stream);
    let cred = match conn.peer_cred() {
        Ok(c) => c,
        Err(e) => return log::warn!("twinpaged: cannot read a peer's credentials: {e}"),
    };
    let _ = conn.set_timeout(Some(HELLO_TIMEOUT));
    let domain = match conn.recv() {
        Ok((Msg::Hello { domain, .. }, _)) => domain,
        Ok((other, _)) => return refuse(&mut conn, format!("pid {} spoke before hello: {}", cred.pid, other.name())),
        Err(e) => return log::debug!("twinpaged: pid {} left before hello: {e}", cred.pid),
    };
    let joined = {
        let mut b = daemon.broker.lock();
        b.join(cred.pid as u32, cred.uid, domain.as_deref()).map(|(id, fd)| (id, fd, b.agents()))
    };
    let (id, fd, agents) = match joined {
        Ok(j) => j,
        Err(e) => return refuse(&mut conn, format!("pid {} (uid {}) refused: {e}", cred.pid, cred.uid)),
    };
    let name = domain.unwrap_or_else(|| super::default_domain(cred.uid));
    log::info!("twinpaged: agent {id} joined: pid {} uid {} domain {name}", cred.pid, cred.uid);
    let _ = conn.set_timeout(None);
    let end = if let Err(e) = conn.send_with_fd(&Msg::Welcome { agent_id: id, agents }, std::os::fd::AsFd::as_fd(&fd)) {
        Err(e)
    } else {
        drop(fd);
        agent_loop(daemon, &mut conn, id)
    };
    daemon.broker.lock().leave(id);
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
            Msg::Report { committed, cancelled, released } => {
                daemon.broker.lock().report(id, &committed, &cancelled, &released);
            }
            Msg::FullScan => daemon.broker.lock().full_scan(id),
            other => {
                let pid = daemon.broker.lock().pid_of(id).unwrap_or(0);
                refuse(conn, format!("agent {id} (pid {pid}) sent {} out of turn", other.name()));
                return Ok(());
            }
        }
    }
}
