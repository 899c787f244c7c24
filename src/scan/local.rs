//! The in-process decider: the kernel's rules on this engine's own trees. A
//! page whose digest is in the stable tree joins that store page at once;
//! otherwise its checksum must stay the same for one full scan, then it
//! enters the unstable tree, where a second page with equal bytes (compared
//! on copies, under both regions' locks) makes a new store page: the tree
//! page is filled into it and both join.

use super::decide::{Batch, Decide, Decisions, Offer};
use crate::guest::PageCopy;
use crate::merge::Item;
use crate::region::{PageState, RegionState};
use crate::state::Core;
use crate::tree::PageRef;

/// One batch's in-process decisions.
pub(crate) struct Local {
    d: Decisions,
    /// The last pair made a new store page for: a pair right after it gets
    /// the next store page, so runs stay runs in the store too.
    last_pair: Option<(usize, u32)>,
    /// The unstable tree's page, copied to compare.
    other: PageCopy,
    max_sharing: u32,
}

impl Local {
    pub(crate) fn new(max_sharing: u32) -> Self {
        Self { d: Decisions::default(), last_pair: None, other: PageCopy::new(), max_sharing }
    }

    /// The unstable tree's page `t` is still the page it was entered as
    /// (`Hashed`) and has the bytes `page` has.
    fn equal_to_tree_page(&mut self, b: &Batch<'_>, st: &RegionState, t: PageRef, page: &[u8]) -> bool {
        let tidx = t.page as usize;
        let region = b.region;
        if t.region == region.id {
            return st.records.get(tidx).is_some_and(|r| r.state() == PageState::Hashed) && {
                // SAFETY: a page of our own region, under our lock.
                unsafe { self.other.read(region, region.prot, region.addr(tidx)) }.is_ok_and(|other| other == page)
            };
        }
        let other = &mut self.other;
        b.sh.with_region_if_free(t.region, |r2, st2| {
            st2.records.get(tidx).is_some_and(|r| r.state() == PageState::Hashed) && {
                // SAFETY: a page of `r2`, live while we hold its lock.
                unsafe { other.read(r2, r2.prot, r2.addr(tidx)) }.is_ok_and(|other| other == page)
            }
        })
        .unwrap_or(false)
    }
}

impl Decide for Local {
    fn offer(&mut self, b: &Batch<'_>, st: &mut RegionState, core: &mut Core, o: Offer<'_>) {
        let (idx, h) = (o.page, o.hash);
        if let Some(s) = core.reserve(h, self.max_sharing) {
            self.d.joins.push(Item { page: idx, store: s });
            return;
        }
        if !core.note_checksum(&mut st.records[idx], h as u32) {
            return;
        }
        if b.use_zero && o.zero {
            self.d.zeros.push(Item { page: idx, store: 0 });
            return;
        }
        let me = PageRef { region: b.region.id, page: idx as u32 };
        match core.unstable_get(h) {
            Some(t) if t != me && self.equal_to_tree_page(b, st, t, o.bytes) => {
                core.unstable_remove(h);
                let after = self.last_pair.filter(|&(p, _)| p + 1 == idx).map(|(_, s)| s);
                let s = core.new_store_page(h, after, 2);
                self.d.fills.push((t.region, t.page as usize, s));
                self.d.joins.push(Item { page: idx, store: s });
                self.last_pair = Some((idx, s));
            }
            Some(t) if t == me => {}
            // No page with this digest, or one with other bytes (a torn
            // copy, or a digest collision): this page takes its place.
            _ => {
                core.unstable_insert(h, me);
                core.entered_unstable(&mut st.records[idx]);
            }
        }
    }

    fn decide(self, _b: &Batch<'_>, _st: &mut RegionState, _core: &mut Core) -> Decisions {
        self.d
    }
}
