//! Helpers for tests that need the real `/sys/kernel/mm/ksm`.

use std::sync::{Mutex, MutexGuard};

/// `true` when the environment variable `CI` is `true` (or `1`): missing
/// prerequisites are then failures, not skips.
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true" | "1"))
}

/// Returns `cond`. When it is false, prints why the test is skipped and
/// returns `false` — unless `CI=true`, where a missing prerequisite panics
/// so that CI cannot pass by skipping.
///
/// ```
/// # use kernel_compat::testutil::require_or_skip;
/// if !require_or_skip(true, "root and a writable /sys/kernel/mm/ksm") {
///     return;
/// }
/// ```
pub fn require_or_skip(cond: bool, what: &str) -> bool {
    if cond {
        return true;
    }
    if in_ci() {
        panic!("missing prerequisite (CI=true, not skipping): {what}");
    }
    eprintln!("skipping: missing prerequisite: {what}");
    false
}

static SYSFS_LOCK: Mutex<()> = Mutex::new(());

/// Serialises the tests of one process that change `/sys/kernel/mm/ksm`
/// (test threads run in parallel). Poisoning is ignored: a failed test has
/// already restored its settings through its guard.
pub fn sysfs_lock() -> MutexGuard<'static, ()> {
    SYSFS_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the real KSM directory is present and writable (root).
pub fn kernel_ksm_writable() -> bool {
    let k = crate::sysfs::KsmSysfs::kernel();
    k.exists() && k.is_writable()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_or_skip_pattern() {
        assert!(require_or_skip(true, "always there"));
        if in_ci() {
            assert!(std::panic::catch_unwind(|| require_or_skip(false, "missing")).is_err());
        } else {
            assert!(!require_or_skip(false, "missing"));
        }
    }
}
