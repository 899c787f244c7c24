//! The statistics tree: twinpage in the shape of `/sys/kernel/mm/ksm` and
//! `/proc/<pid>/ksm_stat`, as plain files under a root directory
//! (`$TWINPAGE_DIR`, default `/run/twinpage`), so that tools which read the
//! kernel's files (scripts, `prometheus-node-exporter --path.sysfs=...`,
//! monitors) read twinpage unchanged.
//!
//! # Layout
//!
//! ```text
//! $TWINPAGE_DIR/
//!   kernel/mm/ksm/<attr>          every file /sys/kernel/mm/ksm has (kernel_compat::ATTRS;
//!                                 merge_across_nodes only with NUMA), same names, values
//!                                 printed as the kernel prints them ("100\n",
//!                                 "[none] scan-time\n"); 0644 if writable, else 0444
//!   proc/<pid>/ksm_stat           as /proc/<pid>/ksm_stat (six lines)
//!   proc/<pid>/ksm_merging_pages  as /proc/<pid>/ksm_merging_pages
//!   proc/<pid>/twinpage_counters  starttime, then every twinpage counter, `name value`
//!   proc/<pid>/twinpage_tunables  this process's engine settings, `name value`
//!   twinpage/stats                every twinpage counter of the whole tree, `name value`,
//!                                 and twinpage_publishers
//!   twinpage/last_error           the last refused write: `SEQ PID ATTR ERRNO "VALUE"`
//!   twinpage/generation           passes of all publishers so far (a write is handled
//!                                 once this has grown past its value at write time)
//!   twinpage/lock                 flock: held by a publisher for a pass, by `twinpage set`
//!   twinpage/request              a reader's request for counters taken after it (see `wake`)
//!   proc/<pid>/served             the request the process's counters answer
//!   twinpage/tunables, state      shared state of the publishers (see `shared`)
//! ```
//!
//! Only kernel names live under `kernel/mm/ksm`, so the set of names there
//! is exactly the kernel's; twinpage's own files are under `twinpage/`.
//!
//! # In place, never renamed
//!
//! Every file is opened once and rewritten in place (`pwrite` at offset 0,
//! then `ftruncate` if shorter), only when its content changes: a reader
//! that keeps an fd open and reads again (`pread`, or `lseek` + `read`) sees
//! fresh values, as with sysfs. A reader racing with a value that gets
//! shorter may for an instant see the new value's line followed by the tail
//! of the old one; the first line is always a whole value. `twinpaged
//! --sysfs DIR` serves the files under the tree's lock instead: never torn,
//! with sysfs's write semantics.
//!
//! # The publisher
//!
//! [`StatsTree::spawn`] starts a thread for one `Engine`
//! that passes over the tree at least once per `sleep_millisecs` (and at
//! least every 200 ms, at most every 50 ms; [`StatsTreeHandle::kick`]
//! forces a pass). A pass takes the lock (waiting at most 2 s, else the
//! pass is skipped: a stopped process holding it cannot hang the others),
//! writes the process's `proc/<pid>` files, recomputes the global files and
//! handles writes; it costs about 0.2 ms of CPU.
//!
//! A user's write to a writable attribute (the file's content or
//! modification time differs from what a publisher last wrote) is checked
//! with the kernel's rules ([`kernel_compat::model_write`], against the
//! tree's state: the summed `pages_shared`, the shared `advisor_mode`, ...;
//! in chunks of 4096 bytes as sysfs hands them to the store function) and,
//! if accepted, applied with `Engine::set_attr`,
//! so it takes effect within one period; the file then shows the value as
//! the kernel prints it (`+5` reads back as `5`). A refused write (EINVAL,
//! EBUSY, ERANGE as the kernel would answer) is never applied: the file
//! shows the current value again, the refusal goes to `twinpage/last_error`
//! and is logged once per distinct write. A file found empty is left alone
//! until it has stayed empty (same mtime) for a second: a writer's
//! `O_TRUNC` comes before its `write`, and a loaded machine can hold the two
//! apart for several passes; then it was an empty write, which sysfs
//! accepts as a no-op, and the file shows the value again. A user's write
//! that lands while a pass runs is kept for the next pass, not overwritten.
//! Writes to several files in one period are applied in the order of their
//! modification times. Writes by root to read-only files cannot be refused
//! with plain files; they are overwritten at the next pass.
//!
//! Dropping the [`StatsTreeHandle`] stops the thread and removes
//! `proc/<pid>`.
//!
//! # Several processes, one tree
//!
//! Each process that embeds an engine (a preloaded QEMU) merges its own
//! pages and runs its own publisher, all on the same root:
//!
//! - each writes only its `proc/<pid>/` files; the global counters in
//!   `kernel/mm/ksm` and `twinpage/stats` are recomputed under the lock by
//!   whichever publisher passes, from the `twinpage_counters` of the live
//!   processes (pid and start time from `/proc/<pid>/stat` match; the
//!   directories of dead processes are removed): levels (`pages_shared`,
//!   `pages_sharing`, `general_profit`, ...) are the sum over live
//!   processes; cumulative counters (`pages_scanned`, `pages_skipped`,
//!   `twinpage_cow_breaks`, ...) also keep what exited processes had
//!   reached, so they never go back; `full_scans` counts rounds in which
//!   every process with registered memory completed a full scan (the
//!   kernel's meaning: a pass over all mergeable memory; with one process
//!   it is that process's `full_scans`);
//! - the tunables in `kernel/mm/ksm` are shared by all: a user's write is
//!   applied by the publisher that sees it and recorded with a sequence
//!   number in `twinpage/tunables`; every other publisher applies changes
//!   it has not seen, in sequence order, to its own engine within one
//!   period (`proc/<pid>/twinpage_tunables` shows what each engine has). A
//!   change made through an engine's API is published the same way;
//! - a process joining a tree adopts its tunables (they persist while the
//!   root exists, as the kernel's do until reboot: values written before any
//!   process runs are checked and applied by the first publisher), except
//!   those listed in [`StatsTreeOptions::explicit`] (set for this process,
//!   e.g. from `TWINPAGE_<ATTR>` with their side effects,
//!   `envconfig::Config::explicit`), which it publishes instead;
//! - `max_page_sharing` and `merge_across_nodes` are refused with EBUSY
//!   while any process has shared pages (the summed `pages_shared`).
//!
//! All publishers must see the same `/proc` (one pid namespace), and a
//! process runs at most one publisher per root.

mod counters;
mod file;
pub mod prom;
mod publisher;
mod reader;
mod shared;
mod wake;

use std::path::PathBuf;
use std::sync::Arc;

pub use counters::{Combine, Counters, FIELDS};
pub use file::{process_stopped, TreeLock, TreeLockGuard};
pub use publisher::{forget_parent_publishers, process_stat, StatsTree, StatsTreeHandle, StatsTreeKicker};
pub use reader::{ProcessEntry, Refusal, SetError, SetOutcome, Ticket, Tree, WaitOutcome};

use crate::stats::KsmStats;

/// Names of the tree's directories and files.
pub mod layout {
    /// The attributes, as `/sys/kernel/mm/ksm`.
    pub const KSM: &str = "kernel/mm/ksm";
    /// Per-process directories, as `/proc`.
    pub const PROC: &str = "proc";
    /// twinpage's own files.
    pub const TWINPAGE: &str = "twinpage";
    /// `proc/<pid>/ksm_stat`.
    pub const KSM_STAT: &str = "ksm_stat";
    /// `proc/<pid>/ksm_merging_pages`.
    pub const MERGING_PAGES: &str = "ksm_merging_pages";
    /// `proc/<pid>/twinpage_counters`.
    pub const COUNTERS: &str = "twinpage_counters";
    /// `proc/<pid>/twinpage_tunables`.
    pub const OWN_TUNABLES: &str = "twinpage_tunables";
    /// `twinpage/stats`.
    pub const STATS: &str = "stats";
    /// `twinpage/last_error`.
    pub const LAST_ERROR: &str = "last_error";
    /// `twinpage/generation`.
    pub const GENERATION: &str = "generation";
    /// `twinpage/lock`.
    pub const LOCK: &str = "lock";
    /// `twinpage/tunables`.
    pub const SHARED_TUNABLES: &str = "tunables";
    /// `twinpage/state`.
    pub const STATE: &str = "state";
    /// `twinpage/request`: readers' requests for fresh counters.
    pub const REQUEST: &str = "request";
    /// `proc/<pid>/served`: the request the process's counters answer.
    pub const SERVED: &str = "served";
}

/// The root of the tree: `$TWINPAGE_DIR`, or `/run/twinpage`.
pub fn default_root() -> PathBuf {
    std::env::var_os("TWINPAGE_DIR").filter(|v| !v.is_empty()).map_or_else(|| PathBuf::from("/run/twinpage"), PathBuf::from)
}

/// What a publisher publishes: an engine (the implementation is in
/// `engine.rs`, which sits above this module), or the
/// daemon's broker (whose counters are the cross-process merges and whose
/// tunables every agent follows).
pub trait Source: Send + Sync + 'static {
    /// The counters now.
    fn stats(&self) -> KsmStats;
    /// What reading attribute `name` prints, without the newline.
    fn show_attr(&self, name: &str) -> Option<String>;
    /// A write to attribute `name`, with the kernel's rules.
    fn set_attr(&self, name: &str, text: &str) -> Result<(), kernel_compat::WriteError>;
    /// `sleep_millisecs` now (the publisher's period follows it).
    fn sleep_millisecs(&self) -> u32;
    /// The scan-time advisor of the tree (twinpaged's, for all its agents)
    /// chose `pages_to_scan`: take it, as a user's write may not be taken
    /// while the advisor is on. Sources that do not scan ignore it.
    fn follow_advisor(&self, _pages_to_scan: u32) {}
}

/// The two yes/no lines of `ksm_stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessFlags {
    /// `ksm_merge_any`: `prctl(PR_SET_MEMORY_MERGE, 1)` is in force.
    pub merge_any: bool,
    /// `ksm_mergeable`: some memory of the process is registered.
    pub mergeable: bool,
}

/// Computes a process's `ksm_stat` flags from its counters.
pub type FlagsFn = Arc<dyn Fn(&KsmStats) -> ProcessFlags + Send + Sync>;

/// How a publisher behaves.
#[derive(Clone, Default)]
pub struct StatsTreeOptions {
    /// The `ksm_stat` flags; by default `merge_any` is false and
    /// `mergeable` is whether any pages are registered.
    pub flags: Option<FlagsFn>,
    /// Tunables set explicitly for this process (e.g. from
    /// `TWINPAGE_<ATTR>`): published to the tree when joining it instead of
    /// adopting the tree's values.
    pub explicit: Vec<String>,
}

impl std::fmt::Debug for StatsTreeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsTreeOptions").field("flags", &self.flags.as_ref().map(|_| "<fn>")).field("explicit", &self.explicit).finish()
    }
}
