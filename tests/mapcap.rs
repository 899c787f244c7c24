//! The mapping budget: with vm.max_map_count lowered, twinpage stays below
//! its headroom, the program's own mmap calls still succeed, and the stats
//! say merging was held back.

mod common;

use std::time::Duration;

use common::*;

const SYSCTL: &str = "/proc/sys/vm/max_map_count";

/// Restores vm.max_map_count on drop (also when the test panics).
struct SavedMaxMapCount(String);

impl Drop for SavedMaxMapCount {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.0);
    }
}

#[test]
fn merging_stays_under_a_lowered_max_map_count() {
    let old = std::fs::read_to_string(SYSCTL).unwrap_or_default();
    if !require(std::fs::write(SYSCTL, old.trim()).is_ok(), "root, to change vm.max_map_count") {
        return;
    }
    let _restore = SavedMaxMapCount(old.clone());
    let cap = 3000usize;
    std::fs::write(SYSCTL, cap.to_string()).unwrap();
    let Some(e) = engine() else { return };
    flat_out(&e);
    // Every other page a copy of one of 4 patterns: each merge is isolated
    // and splits the mapping, so merging all 4096 would need ~8000 mappings.
    let m = Mem::anon(8192);
    for i in 0..8192 {
        m.fill(i, if i % 2 == 0 { (i % 8) as u64 / 2 } else { 1000 + i as u64 });
    }
    e.register(m.addr, m.len).unwrap();
    let (ok, s) = wait_for(&e, Duration::from_secs(30), |s| s.twinpage_merges_held_back > 0 && s.pages_sharing > 500);
    assert!(ok, "merging was never held back: {s:?}");
    assert!(e.wait_full_scans(2, Duration::from_secs(30)));
    let s = e.stats();
    let maps = twinpage::maps::map_count().unwrap();
    eprintln!(
        "mapcap: cap {cap}, limit {}, mappings now {maps} (estimate {}), pages_sharing {}, held back {}",
        s.twinpage_map_limit, s.twinpage_map_count, s.pages_sharing, s.twinpage_merges_held_back
    );
    assert_eq!(s.twinpage_map_limit as usize, cap - cap / 8);
    assert!(maps <= s.twinpage_map_limit as usize + 2, "{maps} mappings, limit {}", s.twinpage_map_limit);
    // The program's own mappings still fit: 200 of them, alternating
    // protections so that none merges with its neighbour.
    let mut mine = Vec::new();
    for i in 0..200 {
        let prot = if i % 2 == 0 { libc::PROT_READ } else { libc::PROT_READ | libc::PROT_WRITE };
        // SAFETY: fresh anonymous mappings of our own.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), PAGE, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(p, libc::MAP_FAILED, "the program's mmap #{i} failed at {} mappings", twinpage::maps::map_count().unwrap());
        mine.push(p);
    }
    for p in mine {
        // SAFETY: our own mappings.
        unsafe { libc::munmap(p, PAGE) };
    }
    // Every page still holds what was written.
    for i in (0..8192).step_by(7) {
        assert!(m.page_matches(i, if i % 2 == 0 { (i % 8) as u64 / 2 } else { 1000 + i as u64 }));
    }
    m.unmap(&e);
    drop(e);
}
