//! The kernel's own KSM selftest expectations, on twinpage.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn ten_identical_pages_merge_and_unmerge_on_write() {
    let Some(e) = engine() else { return };
    flat_out(&e);
    let m = Mem::anon(10);
    for i in 0..10 {
        m.fill(i, 42);
    }
    e.register(m.addr, m.len).unwrap();
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 9), "{s:?}");
    for i in 0..10 {
        assert!(m.page_matches(i, 42));
    }
    // One byte into each of two merged pages breaks their sharing.
    m.write_u64(3, 0, 7);
    m.write_u64(8, 100, 7);
    // Two full scans, as the kernel's selftests wait: the first may have
    // passed the pages before the writes, and a write that found the region
    // busy for long (a loaded machine) is copied in place by the kernel,
    // which only a scan sees.
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 7), "{s:?}");
    assert_eq!(m.read_u64(3, 0), 7);
    assert_eq!(m.read_u64(8, 100), 7);
    m.unmap(&e);
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (0, 0));
    assert_eq!(e.store_allocated_bytes(), 0);
}

/// Ten pages written full of zeros, registered, two full scans later.
fn ten_zero_pages(e: &twinpage::Engine, m: Mem) -> Mem {
    flat_out(e);
    for i in 0..10 {
        m.zero(i);
    }
    e.register(m.addr, m.len).unwrap();
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    m
}

/// A private file mapping where the file holds zeros becomes anonymous
/// memory when it is registered (the pin check needs that): its zero pages
/// then go where anonymous ones go. Where the file holds data, a written
/// page sits in the file mapping, no pin check can reach it, and it never
/// merges, zeros or not.
#[test]
fn a_private_file_mapping_merges_where_the_file_holds_zeros_only() {
    let Some(e) = engine() else { return };
    let m = ten_zero_pages(&e, Mem::memfd_private(10));
    let s = e.stats();
    // use_zero_pages=0: counted as the kernel's one KSM page of zeros.
    assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages), (1, 9, 0), "{s:?}");
    assert_eq!(s.twinpage_uncheckable_skipped, 0, "{s:?}");
    m.unmap(&e);
    let Some(e) = engine() else { return };
    let m = ten_zero_pages(&e, Mem::memfd_private_of(10, 0xa5));
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages, s.twinpage_merges_unchecked), (0, 0, 0, 0), "{s:?}");
    assert!(s.twinpage_uncheckable_skipped >= 10, "{s:?}");
    for i in 0..10 {
        assert!((0..4096 / 8).all(|w| m.read_u64(i, w) == 0));
    }
    m.unmap(&e);
}

/// Making a private file mapping anonymous copies the pages the program
/// wrote and nothing else: the pages it never touched stay empty, in the
/// mapping and in the file. (Write-protection puts a marker in each empty
/// pte, which pagemap shows as swapped: taken for written pages, every page
/// was copied, reading each through the file, so a 256 MiB guest held
/// 256 MiB in its file and 256 MiB of anonymous copies before it merged.)
#[test]
fn making_a_file_mapping_anonymous_copies_only_the_written_pages() {
    let Some(e) = engine() else { return };
    let m = Mem::memfd_private(64);
    for i in [3, 20, 41] {
        m.fill(i, i as u64);
    }
    e.register(m.addr, m.len).unwrap();
    let present: Vec<usize> = (0..64).filter(|&i| pagemap_flags(m.page_ptr(i) as usize).0).collect();
    assert_eq!(present, [3, 20, 41], "pages present after registering");
    assert!([3, 20, 41].iter().all(|&i| m.page_matches(i, i as u64)));
    assert!((0..64).filter(|i| ![3, 20, 41].contains(i)).all(|i| m.read_u64(i, 7) == 0));
    m.unmap(&e);
}

/// Where twinpage differs from the kernel underneath: anonymous zero pages
/// go to the kernel's zero page even with use_zero_pages=0 (a store page
/// would cost a mapping per scattered zero page). The counters follow the
/// tunable all the same: as the kernel's, one KSM page of zeros shared by
/// the rest, chained at max_page_sharing, none in ksm_zero_pages.
#[test]
fn anonymous_zero_pages_drop_to_the_zero_page_without_use_zero_pages() {
    let Some(e) = engine() else { return };
    let m = ten_zero_pages(&e, Mem::anon(10));
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages), (1, 9, 0), "{s:?}");
    assert_eq!(s.twinpage_merging_pages, 10, "{s:?}");
    assert_eq!(s.twinpage_mappings_added, 0, "{s:?}");
    assert_eq!(e.store_allocated_bytes(), 0);
    // One written: nine left, still one shared page of zeros.
    m.write_u64(3, 0, 7);
    assert!(e.wait_full_scans(1, Duration::from_secs(10)));
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages), (1, 8, 0), "{s:?}");
    m.unmap(&e);
    let Some(e) = engine() else { return };
    e.set_max_page_sharing(4).unwrap();
    let m = ten_zero_pages(&e, Mem::anon(10));
    let s = e.stats();
    // Ten sharers at most four per page: three pages, seven sharing.
    assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages), (3, 7, 0), "{s:?}");
    m.unmap(&e);
}

/// A merged page between two zero pages keeps its first-write guard. Zero
/// pages that stay in place merge as one sparse run across the pages
/// between them, which the merge protects and unprotects with the run; a
/// merged page among them lost the protection that brings its first write
/// to twinpage, and the write was then copied inside the store mapping,
/// never to merge again. Before: no cow break, `twinpage_cow_in_place` 1.
#[test]
fn a_merged_page_between_two_zero_pages_keeps_its_first_write_guard() {
    let Some(e) = engine() else { return };
    flat_out(&e);
    e.set_use_zero_pages(true);
    let m = Mem::anon(4);
    for (i, seed) in [1, 5, 5, 2].into_iter().enumerate() {
        m.fill(i, seed);
    }
    e.register(m.addr, m.len).unwrap();
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| (s.pages_shared, s.pages_sharing) == (1, 1));
    assert!(ok, "pages 1 and 2 never merged: {s:?}");
    m.zero(0);
    m.zero(3);
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| s.ksm_zero_pages == 2);
    assert!(ok, "pages 0 and 3 never dropped to the zero page: {s:?}");
    m.write_u64(1, 0, 9);
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    let s = e.stats();
    assert_eq!((s.twinpage_cow_breaks, s.twinpage_cow_in_place), (1, 0), "{s:?}");
    assert_eq!(m.read_u64(1, 0), 9);
    assert!(m.page_matches(2, 5));
    m.unmap(&e);
}

#[test]
fn zero_pages_drop_to_the_zero_page_with_use_zero_pages() {
    let Some(e) = engine() else { return };
    e.set_use_zero_pages(true);
    let m = ten_zero_pages(&e, Mem::anon(10));
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages), (0, 0, 10), "{s:?}");
    // The pages read back as zeros and no longer hold memory.
    for i in 0..10 {
        assert_eq!(m.read_u64(i, 5), 0);
    }
    m.write_u64(2, 0, 1);
    assert!(e.wait_full_scans(1, Duration::from_secs(10)));
    assert_eq!(e.stats().ksm_zero_pages, 9);
    assert_eq!(m.read_u64(2, 0), 1);
    m.unmap(&e);
}

#[test]
fn max_page_sharing_builds_chains_like_the_kernel() {
    let Some(e) = engine() else { return };
    flat_out(&e);
    e.set_max_page_sharing(256).unwrap();
    let m = Mem::anon(1000);
    for i in 0..1000 {
        m.fill(i, 99);
    }
    e.register(m.addr, m.len).unwrap();
    let (ok, s) = wait_for(&e, Duration::from_secs(20), |s| s.pages_sharing == 996);
    assert!(ok, "{s:?}");
    assert!(e.wait_full_scans(1, Duration::from_secs(10)));
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.stable_node_chains, s.stable_node_dups), (4, 996, 1, 4), "{s:?}");
    assert_eq!(e.set_max_page_sharing(10), Err(twinpage::TunableError::Busy));
    m.unmap(&e);
}

#[test]
fn memfd_private_memory_merges() {
    let Some(e) = engine() else { return };
    flat_out(&e);
    let m = Mem::memfd_private(16);
    for i in 0..16 {
        m.fill(i, (i % 4) as u64);
    }
    e.register(m.addr, m.len).unwrap();
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| s.pages_shared == 4 && s.pages_sharing == 12);
    assert!(ok, "{s:?}");
    for i in 0..16 {
        assert!(m.page_matches(i, (i % 4) as u64));
    }
    m.unmap(&e);
}

/// A merged page rewritten with zeros sits in the store mapping (private
/// copy-on-write of the store file); dropping it to the zero page there
/// would show the store page again. It must read zeros from then on.
#[test]
fn a_merged_page_rewritten_with_zeros_becomes_a_zero_page_and_reads_zeros() {
    let Some(e) = engine() else { return };
    let m = four_pages_merged(&e);
    m.zero(1);
    // use_zero_pages=0: the zero page counts as the kernel's KSM page of
    // zeros, shared by one page.
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| (s.pages_shared, s.pages_sharing) == (2, 2));
    assert!(ok, "the rewritten page did not become a zero page: {s:?}");
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    assert!((0..512).all(|w| m.read_u64(1, w) == 0), "a zero page shows other content");
    for i in [0, 2, 3] {
        assert!(m.page_matches(i, 77));
    }
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages), (2, 2, 0), "{s:?}");
    m.write_u64(1, 3, 5);
    assert_eq!(m.read_u64(1, 3), 5);
    m.unmap(&e);
}

/// A first write to a merged page is served by moving an anonymous copy
/// of it into place and waking the writer, whose store lands when it runs
/// again. A store of the bytes the page holds changes nothing a scan can
/// see; on the kernel the page merges again in the next scan (the stable
/// tree has its content), and so it must here once its writer has run.
/// Before, such a page was held back for a second: after two full scans
/// still `(1, 2)`. (`tests/merge_window.rs` shows it held while the writer
/// has not run again.)
#[test]
fn a_store_of_the_same_bytes_merges_again_within_two_full_scans() {
    let Some(e) = engine() else { return };
    let m = four_pages_merged(&e);
    m.write_u64(1, 0, m.read_u64(1, 0));
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    let s = e.stats_now();
    assert_eq!((s.pages_shared, s.pages_sharing, s.twinpage_cow_breaks), (1, 3, 1), "not merged again: {s:?}");
    assert_eq!(s.twinpage_cow_in_place, 0, "{s:?}");
    for i in 0..4 {
        assert!(m.page_matches(i, 77));
    }
    m.unmap(&e);
}

/// A fork leaves every anonymous page of the parent "maybe shared" until
/// it is written, even once the child has exited, and `UFFDIO_MOVE` (the
/// pin check) refuses such a page as it refuses a pinned one. Kernel KSM
/// merges them; so must twinpage, by making them exclusive again first.
#[test]
fn pages_a_fork_left_maybe_shared_merge_once_the_child_is_gone() {
    let Some(e) = engine() else { return };
    flat_out(&e);
    let m = Mem::anon(64);
    for i in 0..64 {
        m.fill(i, (i % 2) as u64);
    }
    // SAFETY: the child only calls _exit, which is async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0);
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    e.register(m.addr, m.len).unwrap();
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| (s.pages_shared, s.pages_sharing) == (2, 62));
    assert!(ok, "{s:?}");
    for i in 0..64 {
        assert!(m.page_matches(i, (i % 2) as u64));
    }
    m.unmap(&e);
}

/// Slow scanning (1000 pages each 5 ms) over `pages` registered unique
/// pages: each pass takes a while, so a program waiting for two full scans
/// waits for exactly two.
fn long_passes(e: &twinpage::Engine, pages: usize) -> Mem {
    e.set_pages_to_scan(1000).unwrap();
    e.set_attr("sleep_millisecs", "5").unwrap();
    let m = Mem::anon(pages);
    for i in 0..m.pages() {
        m.fill(i, 1_000_000 + i as u64);
    }
    e.register(m.addr, m.len).unwrap();
    m
}

/// Pages a live child shares (it forked after they were written) merge
/// within the two full scans a program waits for, as on the kernel (which
/// merges the parent's mapping and leaves the child its page). The pin
/// check's `UFFDIO_MOVE` refuses a page that is not exclusive to this
/// process (`EBUSY`, as for a pinned one); the merge makes it exclusive
/// with a write fault that changes no byte and moves it again. Before, such
/// a page was made exclusive only in the next pass, and with passes long
/// enough for the barrier to be exact, two full scans ended with (0, 0)
/// (seen in CI, where another test's fork caught a test's pages).
#[test]
fn pages_shared_with_a_live_child_merge_within_two_full_scans() {
    let Some(e) = engine() else { return };
    // Long passes make the barrier exact.
    let unique = long_passes(&e, 10_000);
    let m = Mem::anon(64);
    for i in 0..m.pages() {
        m.fill(i, 5);
    }
    let mut pipe = [0; 2];
    // SAFETY: a plain syscall into our array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: the child only calls close, read and _exit, which are
    // async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut c = 0u8;
        // SAFETY: the child waits for the parent to close the pipe, then ends.
        unsafe {
            libc::close(pipe[1]);
            libc::read(pipe[0], (&mut c as *mut u8).cast(), 1);
            libc::_exit(0)
        };
    }
    assert!(pid > 0);
    // SAFETY: closes our own descriptor.
    unsafe { libc::close(pipe[0]) };
    e.register(m.addr, m.len).unwrap();
    let scanned = e.wait_full_scans(2, Duration::from_secs(20));
    let s = e.stats_now();
    let mut status = 0;
    // SAFETY: ends and reaps our own child.
    unsafe {
        libc::close(pipe[1]);
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
    }
    assert!(scanned, "{s:?}");
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 63), "{s:?}");
    for i in 0..m.pages() {
        assert!(m.page_matches(i, 5));
    }
    m.unmap(&e);
    unique.unmap(&e);
}

/// Hugetlbfs memory is never merged, as the kernel's KSM leaves it: not
/// registered, and never turned into small anonymous pages.
#[test]
fn hugetlbfs_memory_is_left_alone() {
    let Some(e) = engine() else { return };
    const NR: &str = "/proc/sys/vm/nr_hugepages";
    let before = std::fs::read_to_string(NR).unwrap_or_default();
    let need = before.trim().parse::<u64>().unwrap_or(0).max(2);
    let _ = std::fs::write(NR, need.to_string());
    let free = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:")?.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if !common::require(free >= 1, "a free huge page (root, /proc/sys/vm/nr_hugepages)") {
        return;
    }
    let len = 2 << 20;
    // SAFETY: plain syscalls on a fresh hugetlbfs memfd and our own mapping.
    let addr = unsafe {
        let fd = libc::memfd_create(c"tp-huge".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_HUGETLB);
        assert!(fd >= 0, "memfd_create(MFD_HUGETLB): {}", std::io::Error::last_os_error());
        assert_eq!(libc::ftruncate(fd, len as i64), 0);
        let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE, fd, 0);
        assert_ne!(p, libc::MAP_FAILED);
        libc::close(fd);
        std::ptr::write_bytes(p as *mut u8, 7, len);
        p as usize
    };
    flat_out(&e);
    e.register(addr, len).unwrap();
    let s = e.stats();
    assert_eq!((s.twinpage_pages_registered, s.pages_sharing, s.ksm_zero_pages), (0, 0, 0), "{s:?}");
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let block = smaps.split_inclusive('\n').skip_while(|l| !l.starts_with(&format!("{addr:x}-"))).take(30).collect::<String>();
    assert!(block.contains("KernelPageSize:     2048 kB"), "no longer hugetlbfs memory:\n{block}");
    // SAFETY: reading and unmapping our own mapping.
    unsafe {
        assert!((0..len).step_by(4096).all(|i| *((addr + i) as *const u8) == 7));
        libc::munmap(addr as *mut libc::c_void, len);
    }
    let _ = std::fs::write(NR, before.trim());
}

/// ksmd's barrier, as the kernel's selftests use it: after `run=2` (which
/// resets `full_scans` to 0) and `run=1`, two more full scans merge every
/// duplicate, even memory registered while the scanner was in the middle
/// of a pass. Before, `run=2` kept the cursor where it was: the first
/// "full scan" after `run=1` was the rest of the old pass, and the new
/// memory (mapped below the cursor) was only noted once, not merged.
#[test]
fn two_full_scans_after_run_2_and_run_1_merge_everything() {
    let Some(e) = engine() else { return };
    // A big area of unique pages keeps the cursor busy mid-pass.
    let a = long_passes(&e, 20_000);
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(37 + 50 * round));
        e.set_attr("run", "2").unwrap();
        assert!(wait_until(Duration::from_secs(5), || e.stats().full_scans == 0), "run=2 did not reset full_scans: {:?}", e.stats());
        let b = Mem::anon(64);
        for i in 0..b.pages() {
            b.fill(i, 7);
        }
        e.register(b.addr, b.len).unwrap();
        e.set_attr("run", "1").unwrap();
        assert!(e.wait_full_scans(2, Duration::from_secs(20)));
        let s = e.stats();
        assert_eq!((s.pages_shared, s.pages_sharing), (1, 63), "round {round}: {s:?}");
        b.unmap(&e);
    }
    a.unmap(&e);
}

/// `full_scans` as a barrier without `run=2`: memory marked mergeable while
/// the scanner is in the middle of a pass, below its cursor, merges within
/// the two full scans a program waits for once it has read the count. A
/// pass ends only once it visited every region registered before the count
/// was read. Before, the pass under way ended without the new memory and
/// the next only noted its checksums; it merged early in the pass after,
/// which the program, reading the count while the scanner was still in
/// the unique pages below it, did not wait for: (0, 0).
#[test]
fn memory_registered_behind_the_cursor_merges_within_two_full_scans() {
    let Some(e) = engine() else { return };
    e.set_pages_to_scan(1000).unwrap();
    e.set_attr("sleep_millisecs", "5").unwrap();
    // One mapping, in address order: unique pages, three slices of 64
    // pages for the rounds, more unique pages. The cursor is put in the
    // upper unique pages before each round's slice is registered; the
    // lower ones keep the next pass busy before it reaches the slice.
    const ROUNDS: usize = 3;
    const LOW: usize = 10_000;
    const HIGH: usize = 20_000;
    let whole = Mem::anon(LOW + ROUNDS * 64 + HIGH);
    let slice = |first: usize, pages: usize| Mem { addr: whole.addr + first * PAGE, len: pages * PAGE };
    let (low, high) = (slice(0, LOW), slice(LOW + ROUNDS * 64, HIGH));
    for m in [&low, &high] {
        for i in 0..m.pages() {
            m.fill(i, (m.addr / PAGE + i) as u64);
        }
        e.register(m.addr, m.len).unwrap();
    }
    for round in 0..ROUNDS {
        // The pass's first page: when full_scans moves.
        let scans = e.stats_now().full_scans;
        assert!(wait_until(Duration::from_secs(20), || e.stats_now().full_scans > scans));
        let first = e.stats_now().pages_scanned;
        let in_high = || e.stats_now().pages_scanned >= first + LOW as u64 + 2000;
        assert!(wait_until(Duration::from_secs(20), in_high), "the cursor never reached the upper pages");
        let b = slice(LOW + round * 64, 64);
        for i in 0..b.pages() {
            b.fill(i, 9);
        }
        e.register(b.addr, b.len).unwrap();
        assert!(e.wait_full_scans(2, Duration::from_secs(20)));
        let s = e.stats_now();
        assert_eq!((s.pages_shared, s.pages_sharing), (1, 63), "round {round}: {s:?}");
        b.unmap(&e);
    }
    low.unmap(&e);
    high.unmap(&e);
}
