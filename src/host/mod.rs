//! What a host running the engine inside a program (the `LD_PRELOAD` agent)
//! needs besides [`Engine`](crate::Engine): the fork protocol for merged
//! memory, mremap across the mappings merging splits, and the memory
//! `PR_SET_MEMORY_MERGE` covers. The agent reaches nothing else of the
//! engine's internals, so the merge protocol's invariants stay in this crate.

use std::io;

use crate::maps::{self, MappingKind};

pub mod fork;
pub mod mremap;

pub use crate::sys::PAGE_SIZE;
pub use crate::threads::spawn as spawn_thread;

/// The userfaultfd ioctls a host watches for: a program registering its own
/// userfaultfd over memory the engine merges (QEMU's background snapshot,
/// postcopy) makes the engine hand the range over.
pub const UFFDIO_REGISTER: u64 = crate::sys::uffd::UFFDIO_REGISTER;
/// See [`UFFDIO_REGISTER`].
pub const UFFDIO_UNREGISTER: u64 = crate::sys::uffd::UFFDIO_UNREGISTER;

/// What `PR_SET_MEMORY_MERGE` registers when it is turned on, as the
/// kernel's `ksm_enable_merge_any` marks every VMA: unnamed private
/// anonymous read-write memory (not `[heap]`, `[stack]` or files), less the
/// stacks and arena heaps of twinpage's own threads, which are not the
/// program's memory and which those threads write while merging. Returns
/// the ranges and, for the log, the memory left out as twinpage's own.
pub fn merge_any_ranges() -> io::Result<MergeAny> {
    let own = crate::threads::own_ranges();
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let ranges = maps::vmas_in(0, usize::MAX)?
        .iter()
        .filter(|v| v.kind == MappingKind::Anon && v.path.is_empty() && v.prot & rw == rw)
        .map(|v| (v.start, v.end))
        .filter(|&(s, e)| !own.iter().any(|&(os, oe)| os < e && s < oe))
        .collect();
    Ok(MergeAny { ranges, own })
}

/// What [`merge_any_ranges`] found: `[start, end)` pairs.
#[derive(Debug, Clone, Default)]
pub struct MergeAny {
    /// The program's memory to register.
    pub ranges: Vec<(usize, usize)>,
    /// twinpage's own threads' memory, left out.
    pub own: Vec<(usize, usize)>,
}

/// The mappings in `[lo, hi)` that some userfaultfd has registered now
/// (`smaps`' `uf` flag), whoever's it is.
pub fn userfaultfd_ranges_in(lo: usize, hi: usize) -> io::Result<Vec<(usize, usize)>> {
    Ok(maps::vmas_with_flags_in(lo, hi)?.iter().filter(|v| v.userfaultfd).map(|v| (v.start, v.end)).collect())
}
