//! vm.max_map_count, lowered for a test and put back after (also when it
//! panics).

const SYSCTL: &str = "/proc/sys/vm/max_map_count";

/// The value now.
pub fn max_map_count() -> u64 {
    std::fs::read_to_string(SYSCTL).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Restores vm.max_map_count on drop.
pub struct SavedMaxMapCount(String);

impl Drop for SavedMaxMapCount {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.0);
    }
}

/// vm.max_map_count set to `cap` until the guard drops, or None (skipped:
/// not root; under CI=true a failure).
pub fn lowered(cap: u64) -> Option<SavedMaxMapCount> {
    let old = std::fs::read_to_string(SYSCTL).unwrap_or_default();
    if !super::require(std::fs::write(SYSCTL, old.trim()).is_ok(), "root, to change vm.max_map_count") {
        return None;
    }
    let saved = SavedMaxMapCount(old);
    std::fs::write(SYSCTL, cap.to_string()).unwrap();
    Some(saved)
}
