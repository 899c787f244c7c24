//! The kernel's KSM ABI as data, as in Linux 6.18's `mm/ksm.c`,
//! `lib/kstrtox.c` and `fs/proc/base.c`, checked against the running 6.18
//! kernel:
//!
//! - [`parse`] — `kstrtouint`/`kstrtoul`/`kstrtoint`/`kstrtobool`/`sysfs_streq`
//!   with the kernel's exact acceptance rules;
//! - [`attrs`] — every file of `/sys/kernel/mm/ksm` (name, mode, default,
//!   print format);
//! - [`write`](mod@write) — the store functions' rules ([`parse_write`]) and the side
//!   effects of accepted writes ([`Tunables`]);
//! - [`procfs`] — `/proc/<pid>/ksm_stat` and `ksm_merging_pages`;
//! - [`abi`] — `madvise`/`prctl` numbers and the profit formulas;
//! - [`sysfs`] — a driver for a real (or emulated) KSM directory, with a
//!   snapshot/restore guard;
//! - [`testutil`] — skip-or-fail helpers for tests that need root.
//!
//! No `unsafe` anywhere.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod abi;
pub mod attrs;
pub mod parse;
pub mod procfs;
pub mod sysfs;
pub mod testutil;
pub mod types;
pub mod write;

pub use attrs::{find, format_advisor_mode, Attr, ATTRS};
pub use procfs::KsmStat;
pub use sysfs::{KsmSysfs, SavedKsm, Snapshot, WriteOutcomeError};
pub use write::{model_write, parse_write, AdvisorMode, Tunables, Value, WriteContext, WriteError};
