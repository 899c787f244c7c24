//! Who decides what a batch merges. The scanner walks a batch and offers
//! every page that passed its checks (present, anonymous, allowed by the
//! merge mode and the pin rules, not skipped by smart scan) to one
//! [`Decide`]r; once the batch is walked, the decider returns its
//! [`Decisions`] and the scanner hands them to the merge protocol. Two
//! deciders: in process ([`super::local::Local`], the kernel's stable and
//! unstable trees, compared byte for byte) and through twinpaged
//! ([`super::remote::Remote`], the daemon's broker, which shares store
//! pages across processes). Either way the scanner neither knows the trees
//! nor the link, and the merge protocol knows neither decider: scan ->
//! decide -> merge runs one way.

use crate::merge::Item;
use crate::primitive::Arc;
use crate::region::{Region, RegionState};
use crate::state::{Core, Shared};

/// What every decider of one batch reads.
pub(crate) struct Batch<'a> {
    pub(crate) sh: &'a Shared,
    pub(crate) region: &'a Arc<Region>,
    /// The batch is pages `[first, first + n)` of `region`.
    pub(crate) first: usize,
    pub(crate) n: usize,
    /// Zero pages go to the kernel's zero page (`use_zero_pages`, or
    /// anonymous memory, where it costs no mapping).
    pub(crate) use_zero: bool,
}

/// One page offered: its index in the region, a copy of its content (which
/// a concurrent write may have torn: a merge compares again under
/// write-protect) and that copy's digest.
pub(crate) struct Offer<'p> {
    pub(crate) page: usize,
    pub(crate) bytes: &'p [u8],
    pub(crate) hash: u64,
    /// The digest of a zero page and the bytes are all zero.
    pub(crate) zero: bool,
}

/// A batch's decisions, in the order the merge protocol takes them.
#[derive(Debug, Default)]
pub(crate) struct Decisions {
    /// Tree pages to copy into new store pages: (region id, page, store page).
    pub(crate) fills: Vec<(u32, usize, u32)>,
    /// Pages to join an existing (or just filled) store page of this engine.
    pub(crate) joins: Vec<Item>,
    /// Pages to drop to the zero page.
    pub(crate) zeros: Vec<Item>,
    /// Joins of the daemon's store pages, by page.
    pub(crate) remote: Vec<Item>,
}

/// A decider for one batch: offered pages in page order, then asked once.
pub(crate) trait Decide {
    /// Takes one page into account; may record a decision at once.
    fn offer(&mut self, b: &Batch<'_>, st: &mut RegionState, core: &mut Core, o: Offer<'_>);
    /// The batch's decisions, once every page was offered.
    fn decide(self, b: &Batch<'_>, st: &mut RegionState, core: &mut Core) -> Decisions;
}
