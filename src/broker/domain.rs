//! One sharing domain of the daemon: its own store, stable tree and unstable
//! tree. Pages of different domains never meet: nothing here is looked up
//! across domains, and each domain's store is a separate memfd.
//!
//! The broker never sees guest memory. A digest only proposes a match: the
//! second page with a digest in the unstable tree gets an `Upload` order (the
//! broker allocates a store page and its sender sends the bytes, which the
//! broker checks against the digest before writing them), every later page
//! with that digest a `Join`; each agent compares its page with the store page
//! under write-protect before it remaps, so a wrong digest costs a failed
//! merge, never content.
//!
//! As in ksmd, the pages of one batch that meet merge in that batch: the
//! first page (when it is in the batch) and the later ones get joins on the
//! page being uploaded, which its agent does only once the upload was taken
//! (it cancels them otherwise). So "two full scans, then every duplicate is
//! merged" holds under the daemon as without it; before, every page but the
//! uploaded one waited for the next scan.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use nohash_hasher::BuildNoHashHasher;

use super::proto::{Candidate, FillPage, Order, OrderKind};
use crate::store::{Store, StoreAlloc, StoreError};
use crate::sys::PAGE_SIZE;
use crate::tree::{StableTree, U64Halves};

type NoHash<K, V> = HashMap<K, V, BuildNoHashHasher<u64>>;

/// After the store's filesystem was found full, new store pages wait this
/// long before the next try (joins of existing pages go on meanwhile).
const FULL_RETRY: Duration = Duration::from_secs(1);

/// An unstable-tree entry: which agent's page proposed the digest, during
/// which of its full scans.
///
/// Generations are u32 (an agent's full scans, wrapping; only compared for
/// equality): the entry is 16 bytes, not 24.
#[derive(Debug, Clone, Copy)]
struct Proposal {
    token: u64,
    agent: u32,
    generation: u32,
}

const _: () = assert!(std::mem::size_of::<Proposal>() == 16);

/// An agent's proposal queue entry in 20 bytes: as two u64 and a u32 it
/// would be padded to 24.
#[derive(Debug, Clone, Copy)]
struct Queued {
    digest: U64Halves,
    token: U64Halves,
    generation: u32,
}

const _: () = assert!(std::mem::size_of::<Queued>() == 20);

impl Queued {
    fn new(digest: u64, p: &Proposal) -> Self {
        Self { digest: U64Halves::new(digest), token: U64Halves::new(p.token), generation: p.generation }
    }

    fn digest(&self) -> u64 {
        self.digest.get()
    }

    /// Whether `p` is still the unstable entry this queue entry of `agent`
    /// stands for (not matched or replaced since).
    fn names(&self, agent: u32, p: &Proposal) -> bool {
        (p.agent, p.token, p.generation) == (agent, self.token.get(), self.generation)
    }
}

/// What one agent holds in a domain: merges done (`held`) and ordered but not
/// reported yet (`pending`), per store page. Only these can be released or
/// cancelled by the agent, so no agent can drop another's references.
#[derive(Debug, Default)]
pub struct Holdings {
    held: HashMap<u32, u32>,
    pending: HashMap<u32, u32>,
    /// Store pages the agent was told to upload and has not filled yet.
    uploads: HashMap<u32, u64>,
    /// Bumped (wrapping) at each of the agent's full scans: older proposals
    /// are stale.
    pub generation: u32,
    /// References of a parked self this agent took over (`Resume`) that it
    /// has not claimed yet (`Holding`).
    unclaimed: Option<Unclaimed>,
}

impl Holdings {
    /// Orders `kind` for `token` on store page `store`, which the stable tree
    /// has reserved for it: pending here until the agent reports it.
    fn order(&mut self, orders: &mut Vec<Order>, token: u64, store: u32, kind: OrderKind) {
        *self.pending.entry(store).or_default() += 1;
        orders.push(Order { token, store, kind });
    }
}

/// A parked self's references, held and ordered, until the agent says which
/// of them it still maps: the parked self may have carried out orders it
/// never reported, or not carried them out, and its last reports may have
/// gone with the link. Only the agent knows what it maps.
#[derive(Debug, Default)]
struct Unclaimed {
    held: HashMap<u32, u32>,
    pending: HashMap<u32, u32>,
}

impl Holdings {
    /// Merged pages the agent holds.
    pub fn merged(&self) -> u64 {
        let unclaimed = self.unclaimed.as_ref().map_or(0, |u| u.held.values().chain(u.pending.values()).map(|&n| u64::from(n)).sum());
        self.held.values().map(|&n| u64::from(n)).sum::<u64>() + unclaimed
    }
}

fn take_one(map: &mut HashMap<u32, u32>, idx: u32) -> bool {
    match map.get_mut(&idx) {
        Some(n) if *n > 1 => {
            *n -= 1;
            true
        }
        Some(_) => {
            map.remove(&idx);
            true
        }
        None => false,
    }
}

/// A domain's trees and store.
#[derive(Debug)]
pub struct Domain {
    pub name: String,
    /// The uid that created the domain; only it (and root) may join.
    pub owner: u32,
    pub store: Store,
    stable: StableTree,
    unstable: NoHash<u64, Proposal>,
    alloc: StoreAlloc,
    /// Agents' current generations, to tell stale proposals.
    generations: HashMap<u32, u32>,
    /// Live (not stale) proposals per agent: `pages_unshared`.
    live: HashMap<u32, u64>,
    /// Each agent's proposals, oldest first (digest, token): an agent never
    /// has more than `max_proposals` entries in the unstable tree, so a
    /// hostile or huge agent cannot grow the daemon without bound.
    proposals: HashMap<u32, VecDeque<Queued>>,
    /// Merges held back because the store's filesystem was full, cumulative.
    pub store_full: u64,
    /// No new store pages before this (the filesystem was full).
    full_until: Option<Instant>,
}

impl Domain {
    pub fn new(name: String, owner: u32, store_dir: Option<&std::path::Path>) -> Result<Self, StoreError> {
        Ok(Self {
            name,
            owner,
            store: Store::new_shared(store_dir)?,
            stable: StableTree::default(),
            unstable: NoHash::default(),
            alloc: StoreAlloc::default(),
            generations: HashMap::new(),
            live: HashMap::new(),
            proposals: HashMap::new(),
            store_full: 0,
            full_until: None,
        })
    }

    pub fn join(&mut self, agent: u32) {
        self.generations.insert(agent, 0);
    }

    /// Decides on a batch of candidates of `agent`, which keeps at most
    /// `max_proposals` entries in the unstable tree (the oldest go first).
    pub fn scan(&mut self, agent: u32, h: &mut Holdings, items: &[Candidate], max_sharing: u32, max_proposals: usize) -> Vec<Order> {
        let mut orders = Vec::new();
        // Consecutive pages get consecutive store pages, so their merges
        // coalesce into one mapping on the agent's side.
        let mut last_upload: Option<(u64, u32)> = None;
        // The store page this batch is uploading for a digest: later pages of
        // the batch join it.
        let mut batch: NoHash<u64, u32> = NoHash::default();
        // The batch's tokens, made only when a proposal of this agent is
        // matched (to know whether its page is in the batch).
        let mut tokens: Option<std::collections::HashSet<u64>> = None;
        for c in items {
            if let Some(idx) = self.stable.reserve_filled(c.digest, max_sharing) {
                h.order(&mut orders, c.token, idx, OrderKind::Join);
                continue;
            }
            if let Some(&idx) = batch.get(&c.digest) {
                if self.stable.reserve_at(idx, max_sharing) {
                    h.order(&mut orders, c.token, idx, OrderKind::Join);
                    continue;
                }
            }
            if !c.stable {
                continue;
            }
            let me = Proposal { agent, token: c.token, generation: h.generation };
            let live = |p: &Proposal, gens: &HashMap<u32, u32>| gens.get(&p.agent) == Some(&p.generation);
            match self.unstable.get(&c.digest).copied() {
                Some(p) if live(&p, &self.generations) && (p.agent, p.token) != (agent, c.token) => {
                    // A second page with this digest: it becomes the content of a
                    // new store page, which the first joins now if it is in this
                    // batch, else on its next visit. Another batch's page still
                    // waiting for its content is not joined: only its uploader
                    // knows when it is there.
                    if self.stable.has_unfilled(c.digest) && !batch.contains_key(&c.digest) {
                        continue;
                    }
                    if self.full_until.is_some_and(|t| Instant::now() < t) {
                        // Both pages stay as they are, proposed again next scan.
                        self.store_full += 1;
                        continue;
                    }
                    let first = p.agent;
                    self.unstable.remove(&c.digest);
                    if let Some(n) = self.live.get_mut(&first) {
                        *n = n.saturating_sub(1);
                    }
                    let after = last_upload.filter(|&(t, _)| t + 1 == c.token).map(|(_, i)| i);
                    let idx = self.alloc.alloc(after);
                    last_upload = Some((c.token, idx));
                    self.stable.insert(c.digest, idx, 1);
                    h.uploads.insert(idx, c.digest);
                    h.order(&mut orders, c.token, idx, OrderKind::Upload);
                    batch.insert(c.digest, idx);
                    let in_batch =
                        p.agent == agent && tokens.get_or_insert_with(|| items.iter().map(|c| c.token).collect()).contains(&p.token);
                    if in_batch && self.stable.reserve_at(idx, max_sharing) {
                        h.order(&mut orders, p.token, idx, OrderKind::Join);
                    }
                }
                Some(p) if live(&p, &self.generations) => {}
                _ => {
                    self.propose(agent, c.digest, me, max_proposals);
                }
            }
        }
        orders
    }

    fn propose(&mut self, agent: u32, digest: u64, me: Proposal, max_proposals: usize) {
        if max_proposals == 0 {
            return;
        }
        let fifo = self.proposals.entry(agent).or_default();
        while fifo.len() >= max_proposals {
            let Some(q) = fifo.pop_front() else { break };
            // Entries since matched or replaced are not this one any more.
            if let Some(p) = self.unstable.get(&q.digest()).copied().filter(|p| q.names(agent, p)) {
                self.unstable.remove(&q.digest());
                if self.generations.get(&agent) == Some(&p.generation) {
                    if let Some(n) = self.live.get_mut(&agent) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
        }
        fifo.push_back(Queued::new(digest, &me));
        // Only a stale entry (counted no more) can be replaced here.
        self.unstable.insert(digest, me);
        *self.live.entry(agent).or_default() += 1;
    }

    /// Writes uploaded pages into the store pages `agent` was told to fill.
    /// A page is refused (and its order cancelled) when it was not ordered
    /// from this agent, was filled already, or its bytes do not hash to the
    /// digest it was ordered for.
    pub fn fill(&mut self, h: &mut Holdings, pages: &[FillPage]) -> Vec<(u32, bool)> {
        pages
            .iter()
            .map(|p| {
                let ok = h.uploads.remove(&p.store).is_some_and(|digest| {
                    digest == p.digest
                        && crate::digest::page_hash(&p.bytes[..]) == digest
                        && self.stable.node(p.store).is_some_and(|n| !n.filled())
                        && self.write_page(p.store, &p.bytes)
                });
                if ok {
                    if let Some(n) = self.stable.node_mut(p.store) {
                        n.set_filled();
                    }
                } else if take_one(&mut h.pending, p.store) && self.stable.cancel(p.store) {
                    self.free(p.store);
                }
                (p.store, ok)
            })
            .collect()
    }

    fn write_page(&mut self, idx: u32, bytes: &[u8; PAGE_SIZE]) -> bool {
        // Blocks first: a write through the mapping into a hole of a full
        // tmpfs would be a SIGBUS.
        if let (_, Some(e)) = self.store.reserve(&[Some(idx)]) {
            self.store_full += 1;
            if self.full_until.is_none() {
                log::warn!("twinpaged: store of domain {} is full ({e}); new merges wait for space", self.name);
            }
            self.full_until = Some(Instant::now() + FULL_RETRY);
            return false;
        }
        if self.full_until.take().is_some() {
            log::info!("twinpaged: store of domain {} has space again; merging resumes", self.name);
        }
        // SAFETY: an unfilled store page: no agent maps it yet (joins are
        // ordered for filled pages, and for this one only to its uploader,
        // which maps it once this fill was taken), so nobody reads it while
        // we write; `bytes` is the agent's page, our own copy.
        match unsafe { self.store.fill(idx, bytes.as_ptr()) } {
            Ok(()) => true,
            Err(e) => {
                crate::warn_once!("broker-store", "twinpaged: cannot write the store of domain {}: {e}", self.name);
                false
            }
        }
    }

    /// Merges the agent did (`committed`), did not do (`cancelled`), and
    /// sharing that ended (`released`; `retired` when the program wrote its
    /// page in place over the store page, which then is never handed out
    /// again: `StoreAlloc::retire`). Entries the agent does not hold are
    /// ignored.
    pub fn report(&mut self, h: &mut Holdings, committed: &[u32], cancelled: &[u32], released: &[u32], retired: &[u32]) {
        for &idx in committed {
            if take_one(&mut h.pending, idx) {
                h.uploads.remove(&idx);
                self.stable.commit(idx);
                *h.held.entry(idx).or_default() += 1;
            }
        }
        for &idx in cancelled {
            if take_one(&mut h.pending, idx) {
                h.uploads.remove(&idx);
                if self.stable.cancel(idx) {
                    self.free(idx);
                }
            }
        }
        let ended = released.iter().map(|&idx| (idx, false)).chain(retired.iter().map(|&idx| (idx, true)));
        for (idx, retire) in ended {
            if !take_one(&mut h.held, idx) {
                continue;
            }
            if retire {
                self.alloc.retire(idx);
            }
            if self.stable.release(idx) {
                self.free(idx);
            }
        }
    }

    /// The agent finished a full scan: its proposals are stale from now on.
    pub fn full_scan(&mut self, agent: u32, h: &mut Holdings) {
        h.generation = h.generation.wrapping_add(1);
        self.generations.insert(agent, h.generation);
        self.live.insert(agent, 0);
        // Queue entries whose unstable entry was since matched or replaced
        // (the same page proposed again) stand for nothing: without this an
        // agent scanning flat out grows its queue by a scan's worth of pages
        // per full scan, up to max_proposals.
        if let Some(q) = self.proposals.get_mut(&agent) {
            let unstable = &self.unstable;
            q.retain(|e| unstable.get(&e.digest()).is_some_and(|p| e.names(agent, p)));
            q.shrink_to(q.len());
        }
        if self.unstable.len() > 1024 && self.unstable.len() > 2 * self.stable.pages_shared() as usize {
            let gens = &self.generations;
            self.unstable.retain(|_, p| gens.get(&p.agent) == Some(&p.generation));
        }
        // Room for what is left, not for the largest scan so far (rehashing
        // only when three quarters are unused keeps this amortised).
        if self.unstable.capacity() > 1024 && self.unstable.len() < self.unstable.capacity() / 4 {
            self.unstable.shrink_to(self.unstable.len() * 2);
        }
    }

    /// The agent's connection ended but its process lives on: it still maps
    /// what it merged (orphans on its side), so its references stay until it
    /// exits ([`leave`](Self::leave)); only its proposals go, and the store
    /// pages it was to upload and never filled (nobody maps those: joins of
    /// a page are ordered once it is filled), so others can merge them.
    pub fn park(&mut self, agent: u32, h: &mut Holdings) {
        // A claim cut short: what was not claimed yet may still be mapped,
        // so it stays held (a leak until the process exits, never a hole).
        if let Some(u) = h.unclaimed.take() {
            self.keep_all(u.held, u.pending, h);
        }
        for (idx, _) in std::mem::take(&mut h.uploads) {
            if take_one(&mut h.pending, idx) && self.stable.cancel(idx) {
                self.free(idx);
            }
        }
        self.generations.remove(&agent);
        self.live.remove(&agent);
        self.proposals.remove(&agent);
        self.unstable.retain(|_, p| p.agent != agent);
    }

    /// A reconnected agent takes over what its parked self held and was
    /// ordered, unclaimed until it says what it maps ([`claim`](Self::claim)).
    pub fn adopt(&mut self, from: Holdings, into: &mut Holdings) {
        // Unfilled uploads and unfinished claims were settled when it was parked.
        debug_assert!(from.uploads.is_empty() && from.unclaimed.is_none());
        let u = into.unclaimed.get_or_insert_with(Unclaimed::default);
        for (idx, n) in from.held {
            *u.held.entry(idx).or_default() += n;
        }
        for (idx, n) in from.pending {
            *u.pending.entry(idx).or_default() += n;
        }
    }

    /// The agent maps these store pages of its parked self (one entry per
    /// mapping): each moves one unclaimed reference to `held`, an order
    /// carried out becoming a merge. Entries beyond what the parked self held
    /// or was ordered are ignored. With `done`, every reference left
    /// unclaimed is dropped, and store pages nobody else holds are freed.
    /// Returns the references dropped.
    pub fn claim(&mut self, h: &mut Holdings, store: &[u32], done: bool) -> u64 {
        if let Some(u) = h.unclaimed.as_mut() {
            for &idx in store {
                if take_one(&mut u.held, idx) {
                    *h.held.entry(idx).or_default() += 1;
                } else if take_one(&mut u.pending, idx) {
                    self.stable.commit(idx);
                    *h.held.entry(idx).or_default() += 1;
                }
            }
        }
        let Some(u) = h.unclaimed.take_if(|_| done) else { return 0 };
        self.drop_all(u.held, u.pending)
    }

    /// Takes every reference in `held` and every order in `pending` as the
    /// agent's merges.
    fn keep_all(&mut self, held: HashMap<u32, u32>, pending: HashMap<u32, u32>, into: &mut Holdings) {
        for (idx, n) in held {
            *into.held.entry(idx).or_default() += n;
        }
        for (idx, n) in pending {
            for _ in 0..n {
                self.stable.commit(idx);
            }
            *into.held.entry(idx).or_default() += n;
        }
    }

    /// Releases every reference in `held` and cancels every order in
    /// `pending`, freeing store pages nobody holds any more; returns how many.
    fn drop_all(&mut self, held: HashMap<u32, u32>, pending: HashMap<u32, u32>) -> u64 {
        let mut dropped = 0;
        for (idx, n) in pending {
            for _ in 0..n {
                dropped += 1;
                if self.stable.cancel(idx) {
                    self.free(idx);
                }
            }
        }
        for (idx, n) in held {
            for _ in 0..n {
                dropped += 1;
                if self.stable.release(idx) {
                    self.free(idx);
                }
            }
        }
        dropped
    }

    /// The agent is gone (its process exited): everything it held or had
    /// been ordered is dropped; store pages nobody else holds are freed.
    pub fn leave(&mut self, agent: u32, mut h: Holdings) {
        self.park(agent, &mut h);
        self.drop_all(h.held, h.pending);
    }

    fn free(&mut self, idx: u32) {
        // No agent maps it (every holder released or left), so the hole
        // cannot zap anybody's page.
        if let Err(e) = self.store.punch(idx, 1) {
            crate::warn_once!("broker-punch", "twinpaged: cannot free store pages of domain {}: {e}", self.name);
        }
        self.alloc.free(idx);
    }

    pub fn stable(&self) -> &StableTree {
        &self.stable
    }

    /// Proposals of the agents' current full scans (`pages_unshared`).
    pub fn unstable_len(&self) -> u64 {
        self.live.values().sum()
    }

    pub fn metadata_bytes(&self) -> u64 {
        let fifo: usize = self.proposals.values().map(|q| q.capacity()).sum();
        let slot = (std::mem::size_of::<u64>() + std::mem::size_of::<Proposal>() + 1) as u64;
        let queued = std::mem::size_of::<Queued>() as u64;
        self.stable.metadata_bytes() + self.unstable.capacity() as u64 * slot + fifo as u64 * queued + self.alloc.metadata_bytes()
    }

    /// Entries `agent` has in the unstable tree, live or stale.
    pub fn proposals_of(&self, agent: u32) -> usize {
        self.unstable.values().filter(|p| p.agent == agent).count()
    }

    pub fn is_unused(&self) -> bool {
        self.generations.is_empty() && self.stable.is_empty()
    }
}
