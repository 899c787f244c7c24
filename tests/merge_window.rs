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

/// The hook is process-wide: one test at a time.
static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Ten pages of seed 42 merged, page 4 written (`WRITTEN` at word 0) by the
/// hook between its stretch being mapped and protected: the kernel copied
/// it inside the store mapping.
fn merged_with_page_4_written_in_place(e: &twinpage::Engine) -> Mem {
    flat_out(e);
    let m = Mem::anon(10);
    for i in 0..10 {
        m.fill(i, 42);
    }
    TARGET.store(m.addr + 4 * 4096, Ordering::SeqCst);
    twinpage::testhook::on_stretch_mapped(Some(write_in_window));
    e.register(m.addr, m.len).unwrap();
    let merged = wait_until(Duration::from_secs(20), || TARGET.load(Ordering::SeqCst) == 0);
    twinpage::testhook::on_stretch_mapped(None);
    assert!(merged, "page 4 was never merged");
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    m
}

#[test]
fn a_write_before_the_stretch_is_protected_is_the_pages_own() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(e) = engine() else { return };
    let m = merged_with_page_4_written_in_place(&e);

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

/// `MADV_UNMERGEABLE` leaves page 4 where it is too (a device may be writing
/// into it), and the range leaves twinpage: a discard of page 4 is then the
/// kernel's alone, and it reads the store page under it. That store page
/// was retired when page 4 was written: freed with its last sharer and
/// never handed out again, the discard reads zeros, never the content of
/// pages merged since (with the store page reused, it read the next
/// merge's bytes).
#[test]
fn madv_unmergeable_leaves_a_page_written_in_place_over_a_store_page_nobody_gets_again() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(e) = engine() else { return };
    unmergeable_then_discard(&e);
}

/// The same through twinpaged: the agent tells the daemon which store page
/// it retired (`Report`'s `retired`), and the daemon's store never hands it
/// out again.
#[test]
fn through_twinpaged_the_retired_store_page_is_the_daemons_to_keep() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let (Some(e), Some(bin)) = (engine(), common::procs::daemon_bin()) else { return };
    let dir = tempdir("merge-window-daemon");
    let _daemon = common::procs::Kids(vec![common::procs::start_daemon(&bin, &dir, &[], "warn")]);
    e.set_daemon(Some(twinpage::link::DaemonConfig { socket: dir.join("twinpaged.sock"), domain: None }));
    e.start().unwrap();
    assert!(wait_until(Duration::from_secs(10), || e.daemon_connected()), "no link to twinpaged");
    unmergeable_then_discard(&e);
    assert!(e.daemon_connected(), "the link broke during the test");
    let _ = std::fs::remove_dir_all(&dir);
}

fn unmergeable_then_discard(e: &twinpage::Engine) {
    let m = merged_with_page_4_written_in_place(e);
    let frame = pagemap_pfn(m.addr + 4 * 4096);
    e.unregister(m.addr, m.len).unwrap();
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.twinpage_pages_registered), (0, 0, 0), "{s:?}");
    if require(frame != 0, "pagemap frames (root)") {
        assert_eq!(pagemap_pfn(m.addr + 4 * 4096), frame, "page 4 was copied by the unmerge");
    }
    assert_eq!(m.read_u64(4, 0), WRITTEN);
    for i in (0..10).filter(|&i| i != 4) {
        assert!(m.page_matches(i, 42), "page {i} after MADV_UNMERGEABLE");
    }

    // Other pages merge: they take store pages, never page 4's.
    discard_reads_zeros_after_other_merges(e, m, 4);
}

/// The path of the mapping at `addr` in this process's maps.
fn mapping_path(addr: usize) -> String {
    twinpage::maps::vmas_in(addr, addr + 1).unwrap().into_iter().next().map(|v| v.path).unwrap_or_default()
}

/// `mprotect` (unregister, the call, register again, as the preload does)
/// keeps page 4 where it is, in its store mapping; registered again, it
/// is known for a copy inside a store mapping: never merged, and given an
/// anonymous mapping of its own before a discard. Before, it was taken
/// for the region's own anonymous page, so the discard left the store
/// mapping in place and the page read the store page under it.
#[test]
fn mprotect_keeps_a_page_written_in_place_and_registers_it_as_a_copy_in_the_store() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(e) = engine() else { return };
    let m = merged_with_page_4_written_in_place(&e);
    let frame = pagemap_pfn(m.addr + 4 * 4096);
    e.unregister(m.addr, m.len).unwrap();
    // SAFETY: the test's own mapping, its protection unchanged.
    assert_eq!(unsafe { libc::mprotect(m.addr as *mut libc::c_void, m.len, libc::PROT_READ | libc::PROT_WRITE) }, 0);
    e.register(m.addr, m.len).unwrap();
    if require(frame != 0, "pagemap frames (root)") {
        assert_eq!(pagemap_pfn(m.addr + 4 * 4096), frame, "page 4 was copied by the unmerge");
    }
    assert!(mapping_path(m.addr + 4 * 4096).contains("twinpage-store"), "page 4 left its store mapping");
    assert!(wait_until(Duration::from_secs(10), || e.stats().twinpage_merging_pages == 9), "{:?}", e.stats());
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    assert_eq!(e.stats().twinpage_merging_pages, 9, "page 4 merged from a store mapping");
    assert_eq!(m.read_u64(4, 0), WRITTEN);
    // SAFETY: page 4 of the test's own mapping, discarded through the engine
    // as the preload discards registered memory.
    let r = e.discard_with(m.addr + 4 * 4096, 4096, || unsafe {
        libc::madvise((m.addr + 4 * 4096) as *mut libc::c_void, 4096, libc::MADV_DONTNEED)
    });
    assert_eq!(r, 0);
    assert!(!mapping_path(m.addr + 4 * 4096).contains("twinpage-store"), "the discard left page 4 in the store mapping");
    assert!((0..512).all(|w| m.read_u64(4, w) == 0), "page 4 does not read zeros after its discard");
    m.unmap(&e);
}

/// `mremap` growing memory that ends in page 4 (the preload's steps:
/// unregister, then the call). Page 4 stays in its store mapping after the
/// unregister; the kernel's mremap grows that private file mapping with
/// more of the store file, so the grown pages read other pages' merged
/// bytes where the program expects zeros (`tests/programs/churn.c` in CI:
/// "after=mremap ... page=1 of 13 ... got=1 want=0", the grown pages a
/// `/memfd:twinpage-store` mapping). `host::mremap` grows it with fresh
/// anonymous memory instead, and page 4 moves with its frame.
#[test]
fn mremap_growing_a_page_written_in_place_grows_it_with_zeros() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(e) = engine() else { return };
    let m = merged_with_page_4_written_in_place(&e);
    let p4 = m.addr + 4 * 4096;
    let frame = pagemap_pfn(p4);
    e.unregister(p4, 4096).unwrap();
    assert!(mapping_path(p4).contains("twinpage-store"), "page 4 left its store mapping");
    const GROWN: usize = 13;
    assert!(twinpage::host::mremap::grows_store_mapping(&e, p4, 4096, GROWN * 4096));
    assert!(!twinpage::host::mremap::grows_store_mapping(&e, p4, 4096, 4096), "no growth, nothing to emulate");
    let r = twinpage::host::mremap::emulate(p4, 4096, GROWN * 4096, libc::MREMAP_MAYMOVE, 0);
    assert!(r > 0, "emulated mremap failed: {r}");
    let new = r as usize;
    // SAFETY: reads of the memory the mremap just returned.
    let word = |page: usize, w: usize| unsafe { ((new + page * 4096) as *const u64).add(w).read_volatile() };
    assert_eq!(word(0, 0), WRITTEN, "page 4 lost its write in the move");
    if require(frame != 0, "pagemap frames (root)") {
        assert_eq!(pagemap_pfn(new), frame, "page 4 was copied, not moved");
    }
    for p in 1..GROWN {
        assert!(!mapping_path(new + p * 4096).contains("twinpage-store"), "grown page {p} is a store mapping");
        assert!((0..512).all(|w| word(p, w) == 0), "grown page {p} does not read zeros");
    }
    // SAFETY: the test's own memory, which the engine no longer holds.
    assert_eq!(unsafe { libc::munmap(new as *mut libc::c_void, GROWN * 4096) }, 0);
    m.unmap(&e);
}

/// The page whose first write the hook holds (0: disarmed), and whether it
/// holds it now / may let it go.
static HOLD_AT: AtomicUsize = AtomicUsize::new(0);
static HOLDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static RELEASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keeps the fault thread between a first write's copy and the writer's
/// wake (at most 20 s): the writer has its copy and has not run since.
fn hold_first_write(page: usize) {
    if page != HOLD_AT.load(Ordering::SeqCst) {
        return;
    }
    HOLDING.store(true, Ordering::SeqCst);
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while !RELEASE.load(Ordering::SeqCst) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The writer a first write woke stores when it runs. Until then its copy
/// holds the merged bytes, and a scan that merged it again would put that
/// store in the window above: copied in place, out of merging for good. So
/// a page is not merged again before its writer has run: here the hook
/// keeps the writer from being woken while the scanner makes full scans
/// (the page stays unmerged: `(1, 2)`), and once woken, its store of the
/// same bytes merges in the next scans (`(1, 3)`), with nothing copied in
/// place. Merged again at once, it showed `(1, 3)` while held.
#[test]
fn a_page_is_not_merged_again_before_the_writer_of_its_first_write_ran() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(e) = engine() else { return };
    let m = four_pages_merged(&e);
    HOLDING.store(false, Ordering::SeqCst);
    RELEASE.store(false, Ordering::SeqCst);
    HOLD_AT.store(m.addr + 4096, Ordering::SeqCst);
    twinpage::testhook::on_first_write_copied(Some(hold_first_write));
    let (addr, value) = (m.addr + 4096, m.read_u64(1, 0));
    let writer = std::thread::spawn(move || {
        // SAFETY: page 1 of the test's own mapping, which outlives the thread
        // (joined below); the bytes it already holds.
        unsafe { std::ptr::write_volatile(addr as *mut u64, value) };
    });
    assert!(wait_until(Duration::from_secs(10), || HOLDING.load(Ordering::SeqCst)), "the first write never came");
    assert!(e.wait_full_scans(3, Duration::from_secs(10)));
    let held = e.stats_now();
    RELEASE.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    twinpage::testhook::on_first_write_copied(None);
    HOLD_AT.store(0, Ordering::SeqCst);
    assert_eq!(
        (held.pages_shared, held.pages_sharing, held.twinpage_cow_breaks),
        (1, 2, 1),
        "merged again before its writer ran: {held:?}"
    );
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    let s = e.stats_now();
    assert_eq!((s.pages_shared, s.pages_sharing, s.twinpage_cow_in_place), (1, 3, 0), "{s:?}");
    for i in 0..4 {
        assert!(m.page_matches(i, 77));
    }
    m.unmap(&e);
}
