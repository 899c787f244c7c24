//! What a host running the engine inside a program (the `LD_PRELOAD` agent)
//! needs besides [`Engine`](crate::Engine): the fork protocol for merged
//! memory, mremap across the mappings merging splits, and the memory
//! `PR_SET_MEMORY_MERGE` covers. The agent reaches nothing else of the
//! engine's internals, so the merge protocol's invariants stay in this crate.

use std::io;

use crate::maps::{self, MappingKind};

pub mod fork;
pub mod mremap;

pub use crate::sys::{page_span, PAGE_SIZE};
pub use crate::threads::spawn as spawn_thread;

/// The userfaultfd ioctls a host watches for: a program registering its own
/// userfaultfd over memory the engine merges (QEMU's background snapshot,
/// postcopy) makes the engine hand the range over.
pub const UFFDIO_REGISTER: u64 = crate::sys::uffd::UFFDIO_REGISTER;
/// See [`UFFDIO_REGISTER`].
pub const UFFDIO_UNREGISTER: u64 = crate::sys::uffd::UFFDIO_UNREGISTER;

/// What `PR_SET_MEMORY_MERGE` registers when it is turned on, as the
/// kernel's `ksm_enable_merge_any` marks every VMA: unnamed private
/// anonymous read-write memory (not `[heap]`, `[stack]` or files), less
/// twinpage's own memory (`own.rs`: its threads' stacks and heaps, the
/// pin check's scratch mapping, the first-write copy pool), which is not the
/// program's and which twinpage writes while merging. The kernel may have
/// joined a mapping of twinpage's to one of the program's, so its own ranges
/// are cut out of a mapping rather than leaving the whole mapping out.
/// Returns the ranges and, for the log, the memory left out as twinpage's own.
pub fn merge_any_ranges() -> io::Result<MergeAny> {
    let own = crate::own::ranges();
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let vmas = maps::vmas_in(0, usize::MAX)?;
    let program = vmas.iter().filter(|v| v.kind == MappingKind::Anon && v.path.is_empty() && v.prot & rw == rw);
    let ranges = program.flat_map(|v| without(v.start, v.end, &own)).collect();
    Ok(MergeAny { ranges, own })
}

/// `[start, end)` less every range of `cut`, as the pieces left in order.
pub fn without(start: usize, end: usize, cut: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut cut: Vec<(usize, usize)> = cut.iter().copied().filter(|&(s, e)| s < end && start < e).collect();
    cut.sort_unstable();
    let mut left = Vec::new();
    let mut at = start;
    for (s, e) in cut {
        if s > at {
            left.push((at, s));
        }
        at = at.max(e);
    }
    if at < end {
        left.push((at, end));
    }
    left
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

#[cfg(test)]
mod tests {
    use super::without;

    #[test]
    fn own_ranges_are_cut_out_of_a_mapping() {
        assert_eq!(without(0x1000, 0x9000, &[]), vec![(0x1000, 0x9000)]);
        assert_eq!(without(0x1000, 0x9000, &[(0x3000, 0x4000), (0x0, 0x2000)]), vec![(0x2000, 0x3000), (0x4000, 0x9000)]);
        assert_eq!(
            without(0x1000, 0x9000, &[(0x3000, 0x5000), (0x4000, 0x6000), (0x8000, 0xa000)]),
            vec![(0x1000, 0x3000), (0x6000, 0x8000)]
        );
        assert_eq!(without(0x1000, 0x9000, &[(0x0, 0xa000)]), vec![]);
        assert_eq!(without(0x1000, 0x9000, &[(0x9000, 0xa000)]), vec![(0x1000, 0x9000)]);
    }
}
