//! The scanner's side of the daemon link: a batch's candidates out, merge
//! orders in, content of new store pages uploaded; then, between batches,
//! orphaning the daemon's merges when the link broke and connecting again.

use std::time::Instant;

use super::decide::{Batch, Decide, Decisions, Offer};
use crate::broker::proto::{Candidate, FillPage, OrderKind, PAGE};
use crate::guest::copy_page;
use crate::link::Link;
use crate::merge::Item;
use crate::region::{PageRecord, Region, RegionState};
use crate::state::{Core, Shared};
use crate::sys::PAGE_SIZE;

/// A page's name in messages: its virtual page number, as the kernel names
/// a page by its address (`rmap_item`). Not its region's id and index: a
/// region split (`MADV_UNMERGEABLE` or `mprotect` of part of it) gives the
/// part a new id, and the broker then took the page, proposed under both
/// names in one full scan, for two pages with one digest and merged it
/// alone: a unique page uploaded as a store page with one sharer
/// (kernel_oracle's PROT_NONE test under twinpaged, about 1 run in 30
/// under load).
fn token(addr: usize) -> u64 {
    (addr / PAGE_SIZE) as u64
}

/// The page of `region` that `token` names, if it is one of `[first, first + n)`.
fn page_of(region: &Region, token: u64, first: usize, n: usize) -> Option<usize> {
    let page = usize::try_from(token).ok()?.checked_sub(region.start / PAGE_SIZE)?;
    (first..first + n).contains(&page).then_some(page)
}

/// The decider through twinpaged: every steady zero page drops to the zero
/// page here, every other page goes to the daemon's broker as a candidate
/// (its digest, and whether its checksum held for a scan), and the broker's
/// orders are the batch's decisions.
#[derive(Default)]
pub(crate) struct Remote {
    zeros: Vec<Item>,
    candidates: Vec<Candidate>,
}

impl Decide for Remote {
    fn offer(&mut self, b: &Batch<'_>, st: &mut RegionState, core: &mut Core, o: Offer<'_>) {
        let steady = core.note_checksum(&mut st.records[o.page], o.hash as u32);
        if steady && b.use_zero && o.zero {
            self.zeros.push(Item { page: o.page, store: 0 });
            return;
        }
        self.candidates.push(Candidate { token: token(b.region.addr(o.page)), digest: o.hash, stable: steady });
    }

    fn decide(self, b: &Batch<'_>, st: &mut RegionState, core: &mut Core) -> Decisions {
        let remote =
            if self.candidates.is_empty() { Vec::new() } else { exchange(b.sh, b.region, st, core, self.candidates, b.first, b.n) };
        Decisions { zeros: self.zeros, remote, ..Decisions::default() }
    }
}

/// Sends the candidates of pages `[first, first+n)` of `region` and returns
/// the joins to do, by page. Pages the broker wants as the content of a new
/// store page are uploaded first (the broker checks them against their
/// digest); the join then compares under write-protect as any other.
fn exchange(
    sh: &Shared,
    region: &Region,
    st: &mut RegionState,
    core: &mut Core,
    candidates: Vec<Candidate>,
    first: usize,
    n: usize,
) -> Vec<Item> {
    let mut digests = vec![0u64; n];
    // Steady pages the broker orders nothing for stay in its unstable tree.
    let mut proposed = vec![false; n];
    for c in &candidates {
        if let Some(page) = page_of(region, c.token, first, n) {
            digests[page - first] = c.digest;
            proposed[page - first] = c.stable;
        }
    }
    let Some(link) = core.link_mut() else { return Vec::new() };
    let orders = match link.scan(candidates) {
        Ok(o) => o,
        Err(e) => {
            core.lose_remote(sh, &e);
            return Vec::new();
        }
    };
    let mut joins = Vec::new();
    let mut uploads = Vec::new();
    for o in orders {
        let page = page_of(region, o.token, first, n);
        if let Some(p) = page {
            proposed[p - first] = false;
        }
        let Some(page) = page.filter(|p| digests[p - first] != 0 || o.kind != OrderKind::Upload) else {
            link.cancelled.push(o.store);
            continue;
        };
        let it = Item { page, store: o.store };
        match o.kind {
            OrderKind::Join => joins.push(it),
            OrderKind::Upload => uploads.push(it),
        }
    }
    if !uploads.is_empty() {
        let pages = uploads
            .iter()
            .map(|it| {
                let mut copy = Box::new([0u8; PAGE]);
                // SAFETY: a page of `region`, live under the lock our caller holds;
                // the copy may be torn by a concurrent write, which the broker's
                // digest check and our later comparison under write-protect catch
                // (as they catch a page that could not be read: zeros go).
                if unsafe { copy_page(region, region.prot, region.addr(it.page), &mut copy) }.is_err() {
                    copy.fill(0);
                }
                FillPage { store: it.store, digest: digests[it.page - first], bytes: copy }
            })
            .collect();
        match link.fill(pages) {
            Ok(results) => {
                let mut refused = Vec::new();
                for (it, (store, ok)) in uploads.iter().zip(results) {
                    if ok && store == it.store {
                        joins.push(*it);
                    } else {
                        refused.push(it.store);
                    }
                }
                // Joins on a store page whose upload was refused: it never
                // got its content.
                joins.retain(|it| {
                    let keep = !refused.contains(&it.store);
                    if !keep {
                        link.cancelled.push(it.store);
                    }
                    keep
                });
            }
            Err(e) => {
                core.lose_remote(sh, &e);
                return Vec::new();
            }
        }
    }
    joins.sort_unstable_by_key(|it| it.page);
    joins.dedup_by_key(|it| it.page);
    for (i, _) in proposed.iter().enumerate().filter(|&(_, &p)| p) {
        core.entered_unstable(&mut st.records[first + i]);
    }
    joins
}

/// Between batches: sends what is queued for the broker, makes the daemon's
/// merges orphans once the link broke, and connects (again) when it is time.
/// Returns the agents the daemon has (1 when not connected): pages_to_scan
/// is one budget for all of them.
pub fn tick(sh: &Shared, next_try: &mut Instant) -> usize {
    let lost = {
        // Releases from unmaps and unmerges (run=2 scans no batch) go out here too.
        let mut core = sh.core().lock();
        let core = &mut *core;
        core.flush_link(sh);
        if let Some(link) = core.link() {
            return link.agents.max(1) as usize;
        }
        core.link_lost()
    };
    if lost {
        orphan_all(sh);
    }
    if Instant::now() < *next_try {
        return 1;
    }
    *next_try = Instant::now() + crate::link::RETRY;
    let Some(cfg) = sh.daemon().lock().clone() else { return 1 };
    match Link::connect(&cfg) {
        Ok(mut link) => {
            // Pages merged over a link that broke while the daemon lived on are
            // still counted there, parked: take them back, so their releases
            // free store pages again.
            let last = sh.core().lock().last_link();
            let adopted = match last.map(|old| link.resume(old)) {
                None => false,
                Some(Ok(ok)) => ok,
                Some(Err(e)) => {
                    // Next time without: a daemon that does not know Resume
                    // closes the link on it.
                    log::debug!("twinpage: twinpaged at {} dropped the link on Resume: {}", cfg.socket.display(), crate::link::chain(&e));
                    forget_last_link(sh);
                    return 1;
                }
            };
            if last.is_some() && !adopted {
                forget_last_link(sh);
            }
            if let Ok(id) = link.store.file_id() {
                let mut stores = sh.stores().lock();
                if !stores.contains(&id) {
                    stores.push(id);
                }
            }
            let mut core = sh.core().lock();
            if core.link().is_none() && !core.link_lost() {
                use std::sync::atomic::Ordering;
                sh.daemon_fd().store(link.raw_fd(), Ordering::SeqCst);
                log::info!(
                    "twinpage: connected to twinpaged at {} as agent {} (domain {})",
                    cfg.socket.display(),
                    link.agent_id,
                    cfg.domain.as_deref().unwrap_or("of this uid")
                );
                let agents = link.agents.max(1) as usize;
                core.linked(link);
                drop(core);
                if adopted {
                    claim_last_link(sh);
                }
                return agents;
            }
        }
        Err(e) => {
            let why = crate::link::chain(&e);
            if !cfg.socket.exists() {
                // No daemon: the embedded default, nothing to warn about.
                log::debug!("twinpage: no twinpaged at {}", cfg.socket.display());
                return 1;
            }
            crate::warn_once!(
                "daemon-connect",
                "twinpage: twinpaged not reachable at {} ({why}); merging within this process",
                cfg.socket.display()
            );
        }
    }
    1
}

/// Every REMOTE record becomes an ORPHAN: it still maps the old daemon's
/// store page, which nobody frees while it is mapped. If the daemon lives
/// on, it keeps counting them (parked) until this process reconnects and
/// takes them back, or exits.
fn orphan_all(sh: &Shared) {
    let last = if sh.core().lock().last_link().is_some() { PageRecord::LAST_LINK } else { 0 };
    for_each_flagged(sh, PageRecord::REMOTE, |rec| {
        rec.set_flags((rec.flags() & !PageRecord::REMOTE) | PageRecord::ORPHAN | last);
    });
    sh.core().lock().orphans_made();
}

/// Runs `f` on every record with `flag`, region by region under each one's
/// lock. The registry is a leaf lock (whoever holds a region lock may take
/// it, to unregister): the regions are listed first, and it is let go
/// before any region lock is taken.
fn for_each_flagged(sh: &Shared, flag: u8, mut f: impl FnMut(&mut PageRecord)) {
    let regions: Vec<_> = sh.registry().read().iter().cloned().collect();
    for r in regions {
        let mut st = r.state.write();
        st.records.iter_mut().filter(|rec| rec.flags() & flag != 0).for_each(&mut f);
    }
}

/// The daemon did not take the lost link's references over (restarted, or
/// it gave up waiting): its orphans stay plain orphans.
fn forget_last_link(sh: &Shared) {
    for_each_flagged(sh, PageRecord::LAST_LINK, |rec| rec.clear_flags(PageRecord::LAST_LINK));
    sh.core().lock().forget_last_link();
}

/// The daemon took the lost link's references over (`Resumed`), and the new
/// link is in place: the lost link's orphans this process still maps are
/// REMOTE again, and the daemon is told exactly which (`Holding`), so it
/// drops the references the old link left behind that no page maps (orders
/// never carried out, reports lost with the link). A page released before
/// its region is gone through here is not claimed; one released after is
/// claimed and then released over the new link, in that order.
fn claim_last_link(sh: &Shared) {
    let mut claims = Vec::new();
    for_each_flagged(sh, PageRecord::LAST_LINK, |rec| {
        rec.set_flags((rec.flags() & !(PageRecord::ORPHAN | PageRecord::LAST_LINK)) | PageRecord::REMOTE);
        claims.push(rec.key());
    });
    let mut core = sh.core().lock();
    let core = &mut *core;
    // Store pages retired while the link was down (or queued when it broke)
    // are held by the old link's references too: claimed, then retired.
    let retired = core.take_retired_orphans();
    claims.extend_from_slice(&retired);
    core.forget_last_link();
    let Some(link) = core.link_mut() else { return };
    match link.hold(&claims) {
        Ok(()) => link.retired.extend(retired),
        Err(e) => core.lose_remote(sh, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::MappingKind;
    use crate::region::{Mergeability, PageRecord};

    fn region(id: u32, start: usize, pages: usize) -> Region {
        Region::new(id, start, pages, MappingKind::Anon, Mergeability::Mergeable, libc::PROT_READ, vec![PageRecord::default(); pages])
    }

    /// A page keeps its name when its region is split and the part gets a
    /// new id: the broker must not take it for a second page.
    #[test]
    fn a_page_keeps_its_token_across_a_split_of_its_region() {
        let whole = region(1, 0x7f00_0000_0000, 512);
        let part = region(2, 0x7f00_0000_0000, 256);
        let tail = region(3, whole.addr(256), 256);
        assert_eq!(token(whole.addr(7)), token(part.addr(7)));
        assert_eq!(token(whole.addr(300)), token(tail.addr(44)));
        assert_eq!(page_of(&tail, token(whole.addr(300)), 0, 256), Some(44));
        assert_eq!(page_of(&part, token(whole.addr(300)), 0, 256), None, "not in the part");
        assert_eq!(page_of(&tail, token(whole.addr(300)), 0, 44), None, "not in the batch");
        assert_eq!(page_of(&tail, token(whole.addr(3)), 0, 256), None, "below the region");
        assert_eq!(token(whole.addr(8)), token(whole.addr(7)) + 1, "neighbours stay neighbours");
    }
}
