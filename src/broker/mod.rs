//! The broker: stable tree, unstable tree and store shared by many processes
//! (the agents), hosted by `twinpaged`. Agents send digests of their pages in
//! batches and get merge orders back; only the broker writes a store, agents
//! get a read-only fd and compare bytes under write-protect before they remap.
//!
//! In-process (no daemon), an `Engine` keeps the same trees
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
    #[error("the daemon serves its maximum of {0} agents (twinpaged --max-agents)")]
    TooMany(usize),
}

/// What became of a `Resume`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The old agent's references are the new one's.
    Taken,
    /// The old agent's connection has not ended on this side yet.
    Busy,
    /// No such parked agent of this process and domain.
    No,
}

/// How much one daemon takes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connected agents at most; more are refused and merge alone.
    pub max_agents: usize,
    /// Unstable-tree entries per agent at most (the oldest are dropped).
    pub max_proposals: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // 2^22 proposals: every page of a 16 GiB guest, about 200 MiB of
        // daemon memory at worst per agent.
        Self { max_agents: 1024, max_proposals: 1 << 22 }
    }
}

/// One connected agent.
#[derive(Debug)]
struct Agent {
    pid: u32,
    domain: String,
    holdings: Holdings,
    /// Connected; false once parked (connection gone, process alive).
    connected: bool,
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
    pub limits: Limits,
    /// Where stores are created (`--store-dir`); `None`: memfds.
    pub store_dir: Option<std::path::PathBuf>,
    /// Merges held back for a full store by domains since gone.
    store_full_gone: u64,
}

pub use crate::statsfs::prom::DomainFigures;

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
        if self.agents() as usize >= self.limits.max_agents {
            return Err(JoinError::TooMany(self.limits.max_agents));
        }
        let name = match domain {
            Some(d) if d.starts_with("uid:") => return Err(JoinError::BadName(d.to_string())),
            Some(d) => d.to_string(),
            None => default_domain(uid),
        };
        let dom = match self.domains.entry(name.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Domain::new(name.clone(), uid, self.store_dir.as_deref()).map_err(JoinError::Store)?)
            }
        };
        if dom.owner != uid && uid != 0 {
            return Err(JoinError::NotOwner(name));
        }
        let fd = dom.store.reopen_read_only().map_err(JoinError::Reopen)?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        dom.join(id);
        self.agents.insert(id, Agent { pid, domain: name, holdings: Holdings::default(), connected: true });
        Ok((id, fd))
    }

    fn parts(&mut self, agent: u32) -> Option<(&mut Domain, &mut Holdings)> {
        let a = self.agents.get_mut(&agent)?;
        let d = self.domains.get_mut(&a.domain)?;
        Some((d, &mut a.holdings))
    }

    /// Connected agents.
    pub fn agents(&self) -> u32 {
        self.agents.values().filter(|a| a.connected).count() as u32
    }

    /// Agents whose connection ended while their process lives on.
    pub fn parked(&self) -> u32 {
        self.agents.len() as u32 - self.agents()
    }

    /// Merge orders for a batch of an agent's candidates.
    pub fn scan(&mut self, agent: u32, items: &[Candidate]) -> Vec<Order> {
        let max = self.tunables.max_page_sharing();
        let max_proposals = self.limits.max_proposals;
        self.totals.candidates += items.len() as u64;
        // The daemon's own twinpage_merge_mode: an agent that ignores it
        // gets no orders for content the mode excludes (a zero digest is
        // checked against the bytes on upload and by the agent on join).
        let mode = self.tunables.merge_mode();
        let allowed: Vec<Candidate> = items.iter().filter(|c| mode.allows(c.digest == crate::digest::zero_hash())).copied().collect();
        let Some((d, h)) = self.parts(agent) else { return Vec::new() };
        let orders = d.scan(agent, h, &allowed, max, max_proposals);
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

    /// What the agent did with its orders, and sharing that ended (`retired`:
    /// by a write in place over the store page, never to be reused).
    pub fn report(&mut self, agent: u32, committed: &[u32], cancelled: &[u32], released: &[u32], retired: &[u32]) {
        if let Some((d, h)) = self.parts(agent) {
            d.report(h, committed, cancelled, released, retired);
        }
    }

    /// The agent completed a full scan.
    pub fn full_scan(&mut self, agent: u32) {
        if let Some((d, h)) = self.parts(agent) {
            d.full_scan(agent, h);
        }
    }

    /// The agent's connection ended but its process lives: it keeps mapping
    /// the store pages it merged, so its references stay (a hole punched
    /// under them would read back as zeros in that process) until its
    /// process exits and [`leave`](Self::leave) is called.
    pub fn park(&mut self, agent: u32) {
        let Some(a) = self.agents.get_mut(&agent) else { return };
        a.connected = false;
        if let Some(d) = self.domains.get_mut(&a.domain) {
            d.park(agent, &mut a.holdings);
        }
    }

    /// Agent `new` says it was agent `old` (`Resume`): when `old` is parked
    /// for the same process and domain, its references become `new`'s.
    /// `Busy` while `old`'s connection is still being wound up.
    pub fn resume(&mut self, new: u32, old: u32) -> Resume {
        let (Some(o), Some(n)) = (self.agents.get(&old), self.agents.get(&new)) else { return Resume::No };
        if old == new || o.pid != n.pid || o.domain != n.domain {
            return Resume::No;
        }
        if o.connected {
            return Resume::Busy;
        }
        let Some(o) = self.agents.remove(&old) else { return Resume::No };
        let Some((d, h)) = self.parts(new) else { return Resume::No };
        d.adopt(o.holdings, h);
        Resume::Taken
    }

    /// The agent maps these store pages of the parked self it resumed; with
    /// `done`, the references it did not claim are dropped (returns how many).
    pub fn claim(&mut self, agent: u32, store: &[u32], done: bool) -> u64 {
        self.parts(agent).map_or(0, |(d, h)| d.claim(h, store, done))
    }

    /// The agent's process is gone: its references are dropped and store
    /// pages only it held are freed.
    pub fn leave(&mut self, agent: u32) {
        let Some(a) = self.agents.remove(&agent) else { return };
        if let Some(d) = self.domains.get_mut(&a.domain) {
            d.leave(agent, a.holdings);
            if d.is_unused() {
                self.store_full_gone += d.store_full;
                self.domains.remove(&a.domain);
            }
        }
    }

    /// The agent's pid, for logs.
    pub fn pid_of(&self, agent: u32) -> Option<u32> {
        self.agents.get(&agent).map(|a| a.pid)
    }

    /// Each sharing domain's figures, by name.
    pub fn domain_figures(&self) -> Vec<DomainFigures> {
        let mut v: Vec<DomainFigures> = self
            .domains
            .iter()
            .map(|(name, d)| {
                let t = d.stable();
                DomainFigures {
                    name: name.clone(),
                    agents: self.agents.values().filter(|a| &a.domain == name).count() as u64,
                    pages_shared: t.pages_shared(),
                    pages_sharing: t.pages_sharing(),
                    store_bytes: d.store.allocated_bytes().unwrap_or(0),
                }
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
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
        s.twinpage_store_full = self.store_full_gone;
        for d in self.domains.values() {
            s.twinpage_store_full += d.store_full;
            let t = d.stable();
            s.pages_shared += t.pages_shared();
            s.pages_sharing += t.pages_sharing();
            s.twinpage_daemon_proposals += d.unstable_len();
            s.stable_node_chains += t.chains();
            s.stable_node_dups += t.dups();
            metadata += d.metadata_bytes();
        }
        for a in self.agents.values() {
            metadata += 64 + a.holdings.merged() * 8;
        }
        s.twinpage_metadata_bytes = metadata;
        s.twinpage_daemon_agents = u64::from(self.agents());
        s.twinpage_store_bytes = self.store_bytes();
        s.general_profit = (s.pages_sharing * PAGE_SIZE as u64) as i64 - metadata as i64;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::proto::{Candidate, FillPage, OrderKind, PAGE};
    use super::*;

    fn page(seed: u8) -> Box<[u8; PAGE]> {
        Box::new([seed; PAGE])
    }

    fn cand(token: u64, p: &[u8; PAGE], stable: bool) -> Candidate {
        Candidate { token, digest: crate::digest::page_hash(&p[..]), stable }
    }

    #[test]
    fn second_proposal_uploads_then_others_join_and_leaving_frees() {
        let mut b = Broker::new();
        let (a1, _fd1) = b.join(10, 1000, None).unwrap();
        let (a2, _fd2) = b.join(11, 1000, None).unwrap();
        let p = page(7);
        // Unstable checksums are not proposed; the first steady one waits.
        assert!(b.scan(a1, &[cand(1, &p, false)]).is_empty());
        assert!(b.scan(a1, &[cand(1, &p, true)]).is_empty());
        // Same page again is not a match with itself.
        assert!(b.scan(a1, &[cand(1, &p, true)]).is_empty());
        let o = b.scan(a2, &[cand(5, &p, true)]);
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].kind, OrderKind::Upload);
        let s = o[0].store;
        // Nobody joins an unfilled page.
        assert!(b.scan(a1, &[cand(1, &p, true)]).is_empty());
        // A fill by an agent that was not asked, or with other bytes, is refused.
        assert_eq!(b.fill(a1, &[FillPage { store: s, digest: cand(0, &p, true).digest, bytes: p.clone() }]), vec![(s, false)]);
        let wrong = page(8);
        let (a3, _fd3) = b.join(12, 1000, None).unwrap();
        let o3 = b.scan(a3, &[cand(9, &wrong, true)]);
        assert!(o3.is_empty());
        assert_eq!(b.fill(a2, &[FillPage { store: s, digest: cand(0, &p, true).digest, bytes: p.clone() }]), vec![(s, true)]);
        b.report(a2, &[s], &[], &[], &[]);
        let o = b.scan(a1, &[cand(1, &p, true)]);
        assert_eq!((o.len(), o[0].kind, o[0].store), (1, OrderKind::Join, s));
        b.report(a1, &[s], &[], &[], &[]);
        let st = b.stats();
        assert_eq!((st.pages_shared, st.pages_sharing), (1, 1));
        assert_eq!(st.twinpage_store_bytes, PAGE as u64);
        // An agent cannot release what it does not hold.
        b.report(a3, &[], &[], &[s, s], &[]);
        assert_eq!(b.stats().pages_sharing, 1);
        b.leave(a1);
        assert_eq!((b.stats().pages_shared, b.stats().pages_sharing), (1, 0));
        b.report(a2, &[], &[], &[s], &[]);
        let st = b.stats();
        assert_eq!((st.pages_shared, st.twinpage_store_bytes), (0, 0));
    }

    /// A store page an agent's program wrote in place over (`retired`) is
    /// freed with its last sharer as any other, and never handed out again:
    /// the written page sits over it in that program's store mapping, where
    /// a discard the agent does not see would read it.
    #[test]
    fn a_retired_store_page_is_never_handed_out_again() {
        let mut b = Broker::new();
        let (a1, _fd1) = b.join(10, 1000, None).unwrap();
        let (a2, _fd2) = b.join(11, 1000, None).unwrap();
        let merge = |b: &mut Broker, token: u64, p: &[u8; PAGE]| -> u32 {
            assert!(b.scan(a1, &[cand(token, p, true)]).is_empty());
            let o = b.scan(a2, &[cand(token, p, true)]);
            assert_eq!((o.len(), o[0].kind), (1, OrderKind::Upload));
            let s = o[0].store;
            let fill = FillPage { store: s, digest: cand(0, p, true).digest, bytes: Box::new(*p) };
            assert_eq!(b.fill(a2, &[fill]), vec![(s, true)]);
            b.report(a2, &[s], &[], &[], &[]);
            let o = b.scan(a1, &[cand(token, p, true)]);
            assert_eq!((o.len(), o[0].kind, o[0].store), (1, OrderKind::Join, s));
            b.report(a1, &[s], &[], &[], &[]);
            s
        };
        let s = merge(&mut b, 1, &page(7));
        b.report(a1, &[], &[], &[], &[s]);
        b.report(a2, &[], &[], &[s], &[]);
        let st = b.stats();
        assert_eq!((st.pages_shared, st.pages_sharing, st.twinpage_store_bytes), (0, 0, 0), "freed with its last sharer");
        let t = merge(&mut b, 2, &page(8));
        assert_ne!(t, s, "the retired store page was handed out again");
        // Released the usual way, a store page is reused.
        b.report(a1, &[], &[], &[t], &[]);
        b.report(a2, &[], &[], &[t], &[]);
        assert_eq!(merge(&mut b, 3, &page(9)), t);
    }

    /// As ksmd merges the duplicates it meets in one pass, one batch of 300
    /// equal pages gets one upload and joins for all the others, chained at
    /// max_page_sharing (256): the proposer of the batch joins at once.
    #[test]
    fn the_duplicates_of_one_batch_join_the_page_it_uploads() {
        let mut b = Broker::new();
        let (a, _fd) = b.join(10, 1000, None).unwrap();
        let p = page(7);
        let batch: Vec<Candidate> = (1..=300).map(|t| cand(t, &p, true)).collect();
        let o = b.scan(a, &batch);
        let mut tokens: Vec<u64> = o.iter().map(|o| o.token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, (1..=300).collect::<Vec<u64>>(), "every page ordered once");
        let uploads: Vec<&Order> = o.iter().filter(|o| o.kind == OrderKind::Upload).collect();
        assert_eq!(uploads.iter().map(|o| o.token).collect::<Vec<_>>(), [2, 258]);
        for (up, n) in uploads.iter().zip([256, 44]) {
            assert_eq!(o.iter().filter(|x| x.store == up.store).count(), n);
        }
        let digest = batch[0].digest;
        // The first upload is taken, the second refused: its joins are
        // cancelled by the agent, and its store page goes.
        assert_eq!(b.fill(a, &[FillPage { store: uploads[0].store, digest, bytes: p.clone() }]), vec![(uploads[0].store, true)]);
        assert_eq!(b.fill(a, &[FillPage { store: uploads[1].store, digest, bytes: page(8) }]), vec![(uploads[1].store, false)]);
        let on = |s: u32| o.iter().filter(|x| x.store == s).map(|x| x.store).collect::<Vec<u32>>();
        b.report(a, &on(uploads[0].store), &on(uploads[1].store)[1..], &[], &[]);
        let st = b.stats();
        assert_eq!((st.pages_shared, st.pages_sharing, st.twinpage_store_bytes), (1, 255, PAGE as u64));
    }

    #[test]
    fn domains_are_apart_and_owned() {
        let mut b = Broker::new();
        let (red, _f) = b.join(1, 1000, Some("red")).unwrap();
        let (blue, _f2) = b.join(2, 1000, Some("blue")).unwrap();
        let p = page(3);
        assert!(b.scan(red, &[cand(1, &p, true)]).is_empty());
        assert!(b.scan(blue, &[cand(1, &p, true)]).is_empty());
        assert!(matches!(b.join(3, 1001, Some("red")), Err(JoinError::NotOwner(_))));
        assert!(matches!(b.join(3, 1001, Some("uid:1000")), Err(JoinError::BadName(_))));
        assert!(b.join(4, 0, Some("red")).is_ok(), "root may join any domain");
        let (other, _f3) = b.join(5, 1001, None).unwrap();
        assert!(b.scan(other, &[cand(1, &p, true)]).is_empty(), "uid 1001's default domain is its own");
        assert_eq!(b.stats().twinpage_daemon_proposals, 3);
    }

    /// An agent that ignores the daemon's twinpage_merge_mode gets no orders
    /// for content the mode excludes.
    #[test]
    fn the_merge_mode_holds_for_agents_that_ignore_it() {
        let mut b = Broker::new();
        b.tunables.write_attr("twinpage_merge_mode", "zero-only", 0, false).unwrap();
        let (a1, _f1) = b.join(1, 1000, None).unwrap();
        let (a2, _f2) = b.join(2, 1000, None).unwrap();
        let (data, zero) = (page(5), page(0));
        for a in [a1, a2] {
            assert!(b.scan(a, &[cand(1, &data, true)]).is_empty(), "non-zero page ordered under zero-only");
        }
        assert!(b.scan(a1, &[cand(2, &zero, true)]).is_empty());
        assert_eq!(b.scan(a2, &[cand(2, &zero, true)]).len(), 1, "zero pages still merge");
        b.tunables.write_attr("twinpage_merge_mode", "off", 0, false).unwrap();
        assert!(b.scan(a1, &[cand(3, &zero, true)]).is_empty() && b.scan(a2, &[cand(3, &zero, true)]).is_empty());
    }

    /// A parked agent's references stay (its process still maps the pages)
    /// and go to its reconnected self on `Resume`; only that process can
    /// take them, and only once the old connection is wound up.
    #[test]
    fn parked_references_stay_and_a_resume_takes_them_over() {
        let mut b = Broker::new();
        let (a1, _f1) = b.join(10, 1000, None).unwrap();
        let (a2, _f2) = b.join(11, 1000, None).unwrap();
        let p = page(5);
        assert!(b.scan(a1, &[cand(1, &p, true)]).is_empty());
        let s = b.scan(a2, &[cand(2, &p, true)])[0].store;
        assert_eq!(b.fill(a2, &[FillPage { store: s, digest: cand(0, &p, true).digest, bytes: p.clone() }]), vec![(s, true)]);
        b.report(a2, &[s], &[], &[], &[]);
        let o = b.scan(a1, &[cand(1, &p, true)]);
        assert_eq!(o[0].kind, OrderKind::Join);
        // a1's link breaks before it reports the join it did: parked.
        let (a1b, _f3) = b.join(10, 1000, None).unwrap();
        assert_eq!(b.resume(a1b, a1), Resume::Busy, "the old connection is not wound up yet");
        b.park(a1);
        assert_eq!(b.agents(), 2);
        assert_eq!(b.parked(), 1);
        assert_eq!(b.resume(a2, a1), Resume::No, "another process cannot take them");
        b.leave(a2);
        assert_eq!(b.stats().twinpage_store_bytes, PAGE as u64, "the parked join keeps the page");
        assert_eq!(b.resume(a1b, a1), Resume::Taken);
        assert_eq!(b.parked(), 0);
        // It did the join before the link broke: it maps the page.
        assert_eq!(b.claim(a1b, &[s, s, 12345], true), 0, "one claim per reference held; unknown pages claim nothing");
        assert_eq!(b.stats().twinpage_store_bytes, PAGE as u64);
        b.report(a1b, &[], &[], &[s], &[]);
        let st = b.stats();
        assert_eq!((st.pages_shared, st.twinpage_store_bytes), (0, 0));
    }

    /// Issue 19: after a broken link the broker held references for orders
    /// never carried out and for releases lost with the link. A resumed
    /// agent says what it maps; the rest goes when its claim is done, and a
    /// claim cut short by another break keeps everything (never a hole).
    #[test]
    fn a_resumed_agent_keeps_exactly_what_it_claims() {
        let mut b = Broker::new();
        let (a1, _f1) = b.join(10, 1000, None).unwrap();
        let (a2, _f2) = b.join(11, 1000, None).unwrap();
        let pages: Vec<_> = (0..3u8).map(page).collect();
        let cands = |base: u64| pages.iter().enumerate().map(|(i, p)| cand(base + i as u64, p, true)).collect::<Vec<_>>();
        assert!(b.scan(a2, &cands(0)).is_empty());
        let up = b.scan(a1, &cands(10));
        let filled: Vec<_> =
            up.iter().zip(&pages).map(|(o, p)| FillPage { store: o.store, digest: cand(0, p, true).digest, bytes: p.clone() }).collect();
        let stores: Vec<u32> = up.iter().map(|o| o.store).collect();
        assert!(b.fill(a1, &filled).iter().all(|r| r.1));
        // a1 merged all three and reported them; a2 was ordered to join all
        // three, did two, and its link broke before it reported.
        b.report(a1, &stores, &[], &[], &[]);
        let joins = b.scan(a2, &cands(0));
        assert_eq!(joins.len(), 3);
        b.park(a2);
        let (a2b, _f3) = b.join(11, 1000, None).unwrap();
        assert_eq!(b.resume(a2b, a2), Resume::Taken);
        assert_eq!(b.stats().twinpage_store_bytes, 3 * PAGE as u64);
        assert_eq!(b.claim(a2b, &stores[..1], false), 0);
        assert_eq!(b.claim(a2b, &stores[1..2], true), 1, "the join it never did is dropped");
        let st = b.stats();
        assert_eq!((st.pages_shared, st.pages_sharing), (3, 2));
        // a1 lets go of everything: only the two a2 maps stay.
        b.report(a1, &[], &[], &stores, &[]);
        assert_eq!(b.stats().twinpage_store_bytes, 2 * PAGE as u64);
        // Held references a claim leaves out are dropped too; a claim cut
        // short by a break keeps what was not claimed yet.
        b.park(a2b);
        let (a2c, _f4) = b.join(11, 1000, None).unwrap();
        assert_eq!(b.resume(a2c, a2b), Resume::Taken);
        b.park(a2c);
        assert_eq!(b.stats().twinpage_store_bytes, 2 * PAGE as u64, "a claim not done keeps everything");
        let (a2d, _f5) = b.join(11, 1000, None).unwrap();
        assert_eq!(b.resume(a2d, a2c), Resume::Taken);
        assert_eq!(b.claim(a2d, &stores[1..2], true), 1);
        assert_eq!(b.stats().twinpage_store_bytes, PAGE as u64);
        b.leave(a2d);
        assert_eq!(b.stats().twinpage_store_bytes, 0);
    }

    /// An agent keeps at most `max_proposals` entries in the unstable tree,
    /// the newest; the bound is checked on the tree itself.
    #[test]
    fn proposals_are_bounded_per_agent_oldest_dropped() {
        let mut b = Broker::new();
        b.limits.max_proposals = 100;
        let (a1, _f1) = b.join(1, 1000, None).unwrap();
        let (a2, _f2) = b.join(2, 1000, None).unwrap();
        let pages: Vec<_> = (0..1000u32)
            .map(|i| {
                let mut p = Box::new([0u8; PAGE]);
                p[..4].copy_from_slice(&i.to_le_bytes());
                p
            })
            .collect();
        let cands = |range: std::ops::Range<usize>| range.map(|i| cand(i as u64, &pages[i], true)).collect::<Vec<_>>();
        assert!(b.scan(a1, &cands(0..1000)).is_empty());
        let d = b.domains.get(&default_domain(1000)).unwrap();
        assert_eq!(d.proposals_of(a1), 100);
        assert_eq!(b.stats().twinpage_daemon_proposals, 100);
        // Only the newest 100 (900..1000) are left to match.
        assert!(b.scan(a2, &cands(0..100)).is_empty(), "dropped proposals do not match");
        let o = b.scan(a2, &cands(950..960));
        assert_eq!(o.len(), 10);
        assert!(o.iter().all(|o| o.kind == OrderKind::Upload));
        let d = b.domains.get(&default_domain(1000)).unwrap();
        assert_eq!((d.proposals_of(a1), d.proposals_of(a2)), (90, 100));
        // Next full scans: stale entries count against the bound too.
        b.full_scan(a1);
        assert!(b.scan(a1, &cands(200..700)).is_empty());
        assert_eq!(b.domains.get(&default_domain(1000)).unwrap().proposals_of(a1), 100);
    }

    /// The fd an agent gets reads the store but cannot change it in any way.
    #[test]
    fn the_agents_store_fd_cannot_write() {
        use std::os::fd::AsRawFd;
        let mut b = Broker::new();
        let (_a, fd) = b.join(1, 1000, None).unwrap();
        let raw = fd.as_raw_fd();
        let st = assert_read_only(raw);
        assert_eq!(st.st_mode & 0o777, 0o400, "other uids cannot reopen it for writing");
        // SAFETY: F_GET_SEALS on our own fd.
        let seals = unsafe { libc::fcntl(raw, libc::F_GET_SEALS) };
        assert_eq!(seals, libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL);
    }

    /// What every agent's store fd must refuse: write, truncate, hole
    /// punching, allocation, new seals, a shared-writable mapping. Returns
    /// its fstat.
    fn assert_read_only(raw: std::os::fd::RawFd) -> libc::stat {
        let errno = || std::io::Error::last_os_error().raw_os_error();
        // SAFETY: each call gets valid arguments: our fd, a local buffer, a null
        // hint for mmap, a zeroed stat; none touches memory we do not own.
        unsafe {
            assert_eq!(libc::write(raw, [1u8; 16].as_ptr().cast(), 16), -1);
            assert_eq!(errno(), Some(libc::EBADF));
            assert_eq!(libc::ftruncate(raw, 1 << 20), -1);
            assert_eq!(libc::fallocate(raw, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, 4096), -1);
            assert_eq!(errno(), Some(libc::EBADF));
            assert_eq!(libc::fallocate(raw, libc::FALLOC_FL_KEEP_SIZE, 0, 4096), -1);
            assert_eq!(libc::fcntl(raw, libc::F_ADD_SEALS, libc::F_SEAL_WRITE), -1);
            let m = libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, raw, 0);
            assert_eq!(m, libc::MAP_FAILED);
            assert_eq!(errno(), Some(libc::EACCES));
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::fstat(raw, &mut st), 0);
            st
        }
    }

    /// A store in a tmpfs directory (`--store-dir`) cannot be sealed, but the
    /// agent's read-only open still cannot write, truncate, punch, add seals
    /// or map it shared-writable, and the mode keeps other uids out.
    #[test]
    fn the_agents_fd_of_a_store_in_a_directory_cannot_write() {
        use std::os::fd::AsRawFd;
        let shm = std::path::Path::new("/dev/shm");
        if !crate::sys::memfd::is_tmpfs(shm).unwrap_or(false) {
            eprintln!("SKIP: /dev/shm is not a tmpfs");
            return;
        }
        let mut b = Broker { store_dir: Some(shm.to_path_buf()), ..Broker::new() };
        let (_a, fd) = b.join(1, 1000, None).unwrap();
        let st = assert_read_only(fd.as_raw_fd());
        assert_eq!(st.st_mode & 0o777, 0o400, "other uids cannot reopen it for writing");
        assert_eq!(st.st_nlink, 0, "an unnamed file: no path reaches it");
        // Not tmpfs: refused with a clear error.
        assert!(matches!(crate::store::Store::new_in(Some(std::path::Path::new("/proc"))), Err(crate::store::StoreError::NotTmpfs(_))));
    }
}
