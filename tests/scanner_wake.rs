//! A write of `run=1` starts the scan at once, as the kernel's `run_store`
//! wakes ksmd, also when it lands while the scanner is on its way to its nap
//! (it has read `run=2` and unmerged). The scanner took the count of kicks
//! when its nap began, so a kick just before was lost and the scan began a
//! second later: one `ksm_tests -P` run in three through twinpaged. The
//! write is put in that window with `twinpage::testhook::on_scanner_naps`
//! (a hook is process-wide: this file has the one test that sets it).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;

static ENGINE: OnceLock<twinpage::Engine> = OnceLock::new();
static ARMED: AtomicBool = AtomicBool::new(false);
static WRITTEN: Mutex<Option<Instant>> = Mutex::new(None);

/// On the scanner thread, right before its nap: another thread's `run=1`.
fn write_run_1() {
    if ARMED.swap(false, Ordering::SeqCst) {
        let e = ENGINE.get().expect("set before the hook is armed");
        std::thread::scope(|s| {
            s.spawn(|| e.set_attr("run", "1").unwrap());
        });
        *WRITTEN.lock().unwrap() = Some(Instant::now());
    }
}

#[test]
fn run_1_written_as_the_scanner_goes_to_sleep_starts_the_scan_at_once() {
    let Some(e) = engine() else { return };
    let e = ENGINE.get_or_init(|| e);
    flat_out(e);
    e.set_attr("run", "2").unwrap();
    let m = Mem::anon(64);
    for i in 0..m.pages() {
        m.fill(i, 500 + i as u64);
    }
    // Starts the scanner, which finds run=2: it unmerges and naps (the
    // registration's own kick may wake it once).
    e.register(m.addr, m.len).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(e.stats().pages_scanned, 0, "scanned at run=2");
    // At its next wake it finds run=2 again; as it goes back to sleep the
    // hook writes run=1 from another thread.
    twinpage::testhook::on_scanner_naps(Some(write_run_1));
    ARMED.store(true, Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(5), || e.stats().pages_scanned > 0), "no scan: {:?}", e.stats());
    let scanned = Instant::now();
    twinpage::testhook::on_scanner_naps(None);
    let written = WRITTEN.lock().unwrap().expect("the scanner napped at run=2 and the hook wrote run=1");
    let waited = scanned - written;
    eprintln!("scan began within {waited:?} after run=1");
    assert!(waited < Duration::from_millis(500), "the scan began {waited:?} after run=1 was written");
    m.unmap(e);
}
