//! 256 MiB of 50%-duplicate memory: the process's PSS drops by nearly all of
//! the duplicate bytes once merged.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn pss_drops_by_the_duplicate_bytes() {
    let Some(e) = engine() else { return };
    flat_out(&e);
    let pages = 65536; // 256 MiB
    let half = pages / 2;
    let m = Mem::anon(pages);
    // Two identical halves, as two copies of one guest image would be.
    for i in 0..pages {
        m.fill(i, (i % half) as u64 + 1000);
    }
    let pss_before = smaps_rollup_kb("Pss:");
    e.register(m.addr, m.len).unwrap();
    let (ok, s) = wait_for(&e, Duration::from_secs(120), |s| s.pages_sharing as usize == half);
    assert!(ok, "{s:?}");
    let pss_after = smaps_rollup_kb("Pss:");
    let dup_kb = (half * PAGE / 1024) as u64;
    let dropped = pss_before.saturating_sub(pss_after);
    eprintln!(
        "pss: before {pss_before} kB, after {pss_after} kB, dropped {dropped} kB of {dup_kb} kB duplicate ({:.1}%), {s:?}",
        dropped as f64 * 100.0 / dup_kb as f64
    );
    assert!(dropped * 10 >= dup_kb * 9, "PSS dropped {dropped} kB, want >= 90% of {dup_kb} kB");
    for i in (0..pages).step_by(97) {
        assert!(m.page_matches(i, (i % half) as u64 + 1000));
    }
    m.unmap(&e);
}
