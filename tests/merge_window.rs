//! A write that reaches a page between its store stretch being mapped and
//! that stretch being protected (nothing holds a writer there: the old
//! mapping's protection went with the old mapping). Forced here through
//! `twinpage::testhook`; on a loaded machine a writer woken by an earlier
//! first write and run late lands there by itself (it made
//! `ksm_semantics::ten_identical_pages_merge_and_unmerge_on_write` fail
//! about once in 300 runs under load).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;

/// The address the hook writes to, once (0: disarmed).
static TARGET: AtomicUsize = AtomicUsize::new(0);
const WRITTEN: u64 = 0x7777_7777;

fn write_in_window(addr: usize, bytes: usize) {
    let t = TARGET.load(Ordering::SeqCst);
    if t >= addr && t < addr + bytes && TARGET.compare_exchange(t, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
        // SAFETY: `t` is a page of the test's own mapping, just mapped
        // again by the merge; a plain store, as any thread of the program
        // could make there.
        unsafe { std::ptr::write_volatile(t as *mut u64, WRITTEN) };
    }
}

#[test]
fn a_write_before_the_stretch_is_protected_is_the_pages_own() {
    let Some(e) = engine() else { return };
    flat_out(&e);
    let m = Mem::anon(10);
    for i in 0..10 {
        m.fill(i, 42);
    }
    TARGET.store(m.addr + 4 * 4096, Ordering::SeqCst);
    twinpage::testhook::on_stretch_mapped(Some(write_in_window));
    e.register(m.addr, m.len).unwrap();
    assert!(e.wait_full_scans(3, Duration::from_secs(10)));
    twinpage::testhook::on_stretch_mapped(None);
    assert_eq!(TARGET.load(Ordering::SeqCst), 0, "page 4 was never merged");

    // The write is there, and page 4 is not counted as merged: it holds
    // other bytes than the store page, and it never merges again (a page
    // written inside a store mapping: no pin check reaches it).
    assert_eq!(m.read_u64(4, 0), WRITTEN);
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 8), "{s:?}");
    assert_eq!(s.twinpage_cow_in_place, 1, "{s:?}");
    for i in (0..10).filter(|&i| i != 4) {
        assert!(m.page_matches(i, 42));
    }
    // Written again, it keeps every write.
    m.write_u64(4, 1, 5);
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    assert_eq!((m.read_u64(4, 0), m.read_u64(4, 1)), (WRITTEN, 5));
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 8), "{s:?}");

    // run=2 leaves page 4 where it is: the same physical page, which a
    // device may be writing into, keeps its bytes; a copy elsewhere would
    // drop such a write (and no pin check reaches a page of a file
    // mapping). The merged pages get pages of their own.
    let frame = pagemap_pfn(m.addr + 4 * 4096);
    if require(frame != 0, "pagemap frames (root)") {
        e.set_run(2).unwrap();
        assert!(wait_until(Duration::from_secs(10), || {
            let s = e.stats();
            (s.pages_shared, s.pages_sharing) == (0, 0)
        }));
        assert_eq!(pagemap_pfn(m.addr + 4 * 4096), frame, "page 4 was copied by the unmerge");
        assert_eq!((m.read_u64(4, 0), m.read_u64(4, 1)), (WRITTEN, 5));
        for i in (0..10).filter(|&i| i != 4) {
            assert!(m.page_matches(i, 42));
            assert_eq!(pagemap_flags(m.addr + i * 4096), (true, false), "page {i} after run=2");
        }
        assert_eq!(e.store_allocated_bytes(), 0);
    }
    m.unmap(&e);
}
