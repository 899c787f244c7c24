//! An engine's link to `twinpaged`: while connected, the scanner's new
//! merges go through the daemon's broker, so pages merge across processes.
//!
//! Only the scanner thread talks on the link, under the core lock (and a
//! reader of the daemon's counts, [`Link::totals`], under that lock too). What the
//! engine did with the broker's orders (`committed`, `cancelled`) and sharing
//! that ended (`released`, also from unmap and unmerge on other threads) is
//! queued here and sent in one `Report` after each batch, except while frees
//! are held for a forked child (a released page must not be punched before
//! the child has its own copy).
//!
//! When the link breaks (daemon killed, restarted, protocol error) the engine
//! goes on alone: pages merged through the daemon stay merged (the store
//! memfd lives as long as something maps it) and become orphans that no
//! broker counts; then it connects again every [`RETRY`].

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use crate::broker::conn::{Conn, ConnError};
use crate::broker::proto::{Candidate, FillPage, Msg, Order};
use crate::store::Store;

/// How long the engine waits for the daemon's answer before it gives up on it.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// How often a disconnected engine tries the socket again.
pub const RETRY: Duration = Duration::from_secs(1);

/// Where the daemon is and which sharing domain to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    /// `TWINPAGE_DOMAIN`; `None` joins the domain of this process's uid.
    pub domain: Option<String>,
}

/// Errors on the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error("the daemon sent {0} where {1} was expected")]
    Unexpected(&'static str, &'static str),
    #[error("the daemon sent no store fd")]
    NoStore,
}

/// `e` and its sources, for one log line ("i/o: Connection refused").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// A live connection, with the daemon's store seen read-only.
#[derive(Debug)]
pub struct Link {
    conn: Conn,
    /// The daemon's store of this domain, mapped read-only.
    pub(crate) store: Store,
    pub(crate) agent_id: u32,
    /// Agents connected to the daemon (pages_to_scan is shared among them).
    pub(crate) agents: u32,
    /// Reports queued for the next flush: merges done, orders not carried
    /// out, sharing that ended, sharing that ended by a write in place
    /// (store page indices).
    pub(crate) committed: Vec<u32>,
    pub(crate) cancelled: Vec<u32>,
    pub(crate) released: Vec<u32>,
    pub(crate) retired: Vec<u32>,
}

impl Link {
    /// The id the daemon gave this agent.
    pub fn agent_id(&self) -> u32 {
        self.agent_id
    }

    /// Connects and joins the domain.
    pub fn connect(cfg: &DaemonConfig) -> Result<Self, LinkError> {
        let mut conn = Conn::connect(&cfg.socket, TIMEOUT)?;
        conn.send(&Msg::Hello { pid: std::process::id(), domain: cfg.domain.clone() })?;
        match conn.recv()? {
            (Msg::Welcome { agent_id, agents }, Some(fd)) => Ok(Self {
                conn,
                store: Store::from_read_only(fd),
                agent_id,
                agents: agents.max(1),
                committed: Vec::new(),
                cancelled: Vec::new(),
                released: Vec::new(),
                retired: Vec::new(),
            }),
            (Msg::Welcome { .. }, None) => Err(LinkError::NoStore),
            (Msg::Refused { reason }, _) => Err(LinkError::Refused(reason)),
            (m, _) => Err(LinkError::Unexpected(m.name(), "Welcome")),
        }
    }

    /// The socket, for a forked child to close.
    pub fn raw_fd(&self) -> RawFd {
        self.conn.as_fd().as_raw_fd()
    }

    /// Merge orders for a batch of candidates.
    pub fn scan(&mut self, items: Vec<Candidate>) -> Result<Vec<Order>, LinkError> {
        self.conn.send(&Msg::Scan { items })?;
        match self.conn.recv()?.0 {
            Msg::Orders { agents, orders } => {
                self.agents = agents.max(1);
                Ok(orders)
            }
            Msg::Refused { reason } => Err(LinkError::Refused(reason)),
            m => Err(LinkError::Unexpected(m.name(), "Orders")),
        }
    }

    /// Sends the content of store pages the broker ordered us to upload.
    pub fn fill(&mut self, pages: Vec<FillPage>) -> Result<Vec<(u32, bool)>, LinkError> {
        self.conn.send(&Msg::Fill { pages })?;
        match self.conn.recv()?.0 {
            Msg::Filled { results } => Ok(results),
            Msg::Refused { reason } => Err(LinkError::Refused(reason)),
            m => Err(LinkError::Unexpected(m.name(), "Filled")),
        }
    }

    /// Sends what happened since the last report.
    pub fn flush(&mut self) -> Result<(), LinkError> {
        let max = crate::broker::proto::MAX_ITEMS;
        while !(self.committed.is_empty() && self.cancelled.is_empty() && self.released.is_empty() && self.retired.is_empty()) {
            let take = |v: &mut Vec<u32>| v.drain(..v.len().min(max)).collect::<Vec<u32>>();
            let msg = Msg::Report {
                committed: take(&mut self.committed),
                cancelled: take(&mut self.cancelled),
                released: take(&mut self.released),
                retired: take(&mut self.retired),
            };
            self.conn.send(&msg)?;
        }
        Ok(())
    }

    /// Asks the broker to hand over the references this process held as
    /// agent `old` (a link that broke while the daemon lived on).
    pub fn resume(&mut self, old: u32) -> Result<bool, LinkError> {
        self.conn.send(&Msg::Resume { agent_id: old })?;
        match self.conn.recv()?.0 {
            Msg::Resumed { ok } => Ok(ok),
            Msg::Refused { reason } => Err(LinkError::Refused(reason)),
            m => Err(LinkError::Unexpected(m.name(), "Resumed")),
        }
    }

    /// Tells the broker which store pages of the resumed agent this process
    /// still maps, one entry per mapping; the broker drops the rest.
    pub fn hold(&mut self, store: &[u32]) -> Result<(), LinkError> {
        let mut chunks = store.chunks(crate::broker::proto::MAX_ITEMS).peekable();
        if chunks.peek().is_none() {
            self.conn.send(&Msg::Holding { store: Vec::new(), done: true })?;
        }
        while let Some(c) = chunks.next() {
            self.conn.send(&Msg::Holding { store: c.to_vec(), done: chunks.peek().is_none() })?;
        }
        Ok(())
    }

    /// The daemon's `pages_shared` and `pages_sharing` now.
    pub fn totals(&mut self) -> Result<(u64, u64), LinkError> {
        self.conn.send(&Msg::AskTotals)?;
        match self.conn.recv()?.0 {
            Msg::Totals { pages_shared, pages_sharing } => Ok((pages_shared, pages_sharing)),
            Msg::Refused { reason } => Err(LinkError::Refused(reason)),
            m => Err(LinkError::Unexpected(m.name(), "Totals")),
        }
    }

    /// Tells the broker a full scan ended (our unstable-tree entries age out).
    pub fn full_scan(&mut self) -> Result<(), LinkError> {
        self.conn.send(&Msg::FullScan)?;
        Ok(())
    }
}
