//! The broker: stable tree, unstable tree and store shared by many processes
//! (the agents), hosted by `twinpaged`. Agents send digests of their pages in
//! batches and get merge orders back; only the broker writes a store, agents
//! get a read-only fd and compare bytes under write-protect before they remap.
//!
//! In-process (no daemon), an [`Engine`](crate::Engine) keeps the same trees
//! and store itself and merges only its own pages; connected to the daemon,
//! its new merges go through the broker (see `scan::remote`).
//!
//! Sharing domains: an agent joins the domain its `TWINPAGE_DOMAIN` names, or
//! by default the one of its uid (`SO_PEERCRED`). Pages never merge across
//! domains: each has its own trees and store. A named domain belongs to the
//! uid that created it; other uids (except root) are refused.

pub mod conn;
pub mod domain;
pub mod proto;
pub mod server;

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use domain::{Domain, Holdings};
use proto::{Candidate, FillPage, Order};

use crate::stats::KsmStats;
use crate::sys::PAGE_SIZE;
use crate::tunables::Tunables;

/// Why an agent cannot join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("domain {0:?} belongs to another user")]
    NotOwner(String),
    #[error("bad domain name {0:?}")]
    BadName(String),
    #[error("cannot create the store")]
    Store(#[source] crate::store::StoreError),
    #[error("cannot open the store read-only")]
    Reopen(#[source] std::io::Error),
}

/// One connected agent.
#[derive(Debug)]
struct Agent {
    pid: u32,
    domain: String,
    holdings: Holdings,
}

/// Cumulative counts of the broker.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    candidates: u64,
    uploads: u64,
    refused_fills: u64,
}

/// Every domain and agent of the daemon.
#[derive(Debug, Default)]
pub struct Broker {
    domains: HashMap<String, Domain>,
    agents: HashMap<u32, Agent>,
    next_id: u32,
    pub tunables: Tunables,
    totals: Totals,
}

/// The domain an agent of `uid` joins when it names none.
pub fn default_domain(uid: u32) -> String {
    format!("uid:{uid}")
}

impl Broker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Admits an agent (pid and uid from the socket's peer credentials).
    /// Returns its id and a read-only fd of its domain's store.
    pub fn join(&mut self, pid: u32, uid: u32, domain: Option<&str>) -> Result<(u32, OwnedFd), JoinError> {
        let name = match domain {
            Some(d) if d.starts_with("uid:") => return Err(JoinError::BadName(d.to_string())),
            Some(d) => d.to_string(),
            None => default_domain(uid),
        };
        let dom = match self.domains.entry(name.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Domain::new(name.clone(), uid).map_err(JoinError::Store)?)
            }
        };
        if dom.owner != uid && uid != 0 {
            return Err(JoinError::NotOwner(name));
        }
        let fd = dom.store.reopen_read_only().map_err(JoinError::Reopen)?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        dom.join(id);
        self.agents.insert(id, Agent { pid, domain: name, holdings: Holdings::default() });
        Ok((id, fd))
    }

    fn parts(&mut self, agent: u32) -> Option<(&mut Domain, &mut Holdings)> {
        let a = self.agents.get_mut(&agent)?;
        let d = self.domains.get_mut(&a.domain)?;
        Some((d, &mut a.holdings))
    }

    /// Connected agents.
    pub fn agents(&self) -> u32 {
        self.agents.len() as u32
    }

    /// Merge orders for a batch of an agent's candidates.
    pub fn scan(&mut self, agent: u32, items: &[Candidate]) -> Vec<Order> {
        let max = self.tunables.max_page_sharing();
        self.totals.candidates += items.len() as u64;
        let Some((d, h)) = self.parts(agent) else { return Vec::new() };
        let orders = d.scan(agent, h, items, max);
        let uploads = orders.iter().filter(|o| o.kind == proto::OrderKind::Upload).count();
        self.totals.uploads += uploads as u64;
        orders
    }

    /// Content for store pages the agent was told to upload.
    pub fn fill(&mut self, agent: u32, pages: &[FillPage]) -> Vec<(u32, bool)> {
        let Some((d, h)) = self.parts(agent) else { return pages.iter().map(|p| (p.store, false)).collect() };
        let res = d.fill(h, pages);
        self.totals.refused_fills += res.iter().filter(|r| !r.1).count() as u64;
        res
    }

    /// What the agent did with its orders, and sharing that ended.
    pub fn report(&mut self, agent: u32, committed: &[u32], cancelled: &[u32], released: &[u32]) {
        if let Some((d, h)) = self.parts(agent) {
            d.report(h, committed, cancelled, released);
        }
    }

    /// The agent completed a full scan.
    pub fn full_scan(&mut self, agent: u32) {
        if let Some((d, h)) = self.parts(agent) {
            d.full_scan(agent, h);
        }
    }

    /// The agent is gone: its references are dropped and store pages only it
    /// held are freed.
    pub fn leave(&mut self, agent: u32) {
        let Some(a) = self.agents.remove(&agent) else { return };
        if let Some(d) = self.domains.get_mut(&a.domain) {
            d.leave(agent, a.holdings);
            if d.is_unused() {
                self.domains.remove(&a.domain);
            }
        }
    }

    /// The agent's pid, for logs.
    pub fn pid_of(&self, agent: u32) -> Option<u32> {
        self.agents.get(&agent).map(|a| a.pid)
    }

    /// Bytes all stores hold.
    pub fn store_bytes(&self) -> u64 {
        self.domains.values().map(|d| d.store.allocated_bytes().unwrap_or(0)).sum()
    }

    /// The broker's counters, in the kernel's shape: `pages_shared` and
    /// `pages_sharing` count the store pages of all domains and their
    /// sharers across processes; the agents' own counters cover the rest
    /// (their records, including those of pages merged here, are their
    /// `rmap_items`).
    pub fn stats(&self) -> KsmStats {
        let mut s = KsmStats::default();
        let mut metadata = 0u64;
        for d in self.domains.values() {
            let t = d.stable();
            s.pages_shared += t.pages_shared();
            s.pages_sharing += t.pages_sharing();
            s.pages_unshared += d.unstable_len();
            s.stable_node_chains += t.chains();
            s.stable_node_dups += t.dups();
            metadata += d.metadata_bytes();
        }
        for a in self.agents.values() {
            metadata += 64 + a.holdings.merged() * 8;
        }
        s.twinpage_metadata_bytes = metadata;
        s.twinpage_daemon_agents = self.agents.len() as u64;
        s.twinpage_store_bytes = self.store_bytes();
        s.general_profit = (s.pages_sharing * PAGE_SIZE as u64) as i64 - metadata as i64;
        s
    }
}
