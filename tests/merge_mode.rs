//! `twinpage_merge_mode` (all, zero-only, off) on real memory: what merges
//! under each mode (counters and pagemap), a switch to a stricter mode
//! unmerges what it no longer allows with every byte intact, and the same
//! through twinpaged with preloaded processes (the agents propose nothing
//! the mode excludes, the daemon's store empties when the mode narrows).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::procs::{tree_counter as counter, Kids};
use common::{engine, flat_out, have_uffd, pagemap_flags, preload_lib, program, tempdir, wait_for, wait_until, Mem};
use twinpage::statsfs::{StatsTree, StatsTreeOptions};

const MODE: &str = "twinpage_merge_mode";
const ZEROS: usize = 16;
const PAIRS: usize = 24;

/// Writes the attribute as `echo v > file` does and waits until the file
/// shows the accepted value (as a user who checks would).
fn write_mode(dir: &Path, v: &str) {
    std::fs::write(dir.join("kernel/mm/ksm").join(MODE), v).unwrap();
    let word = v.trim_end();
    assert!(
        wait_until(Duration::from_secs(10), || read_mode(dir).contains(&format!("[{word}]"))),
        "{v:?} not applied: {:?}; last_error {:?}; shared {:?}",
        read_mode(dir),
        std::fs::read_to_string(dir.join("twinpage/last_error")),
        std::fs::read_to_string(dir.join("twinpage/tunables")),
    );
}

fn read_mode(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("kernel/mm/ksm").join(MODE)).unwrap()
}

/// Whether page `i` maps a store page (pagemap's file bit on private
/// anonymous memory).
fn merged(m: &Mem, i: usize) -> bool {
    // A remapped page is not present until touched; a read faults it in.
    m.read_u64(i, 0);
    pagemap_flags(m.addr + i * common::PAGE).1
}

/// `ZEROS` zero pages, then `PAIRS` pairs of identical pages.
fn layout(m: Mem) -> Mem {
    for i in 0..ZEROS {
        m.zero(i);
    }
    for p in 0..2 * PAIRS {
        m.fill(ZEROS + p, 1000 + (p / 2) as u64);
    }
    m
}

/// What [`layout`] wrote is still there.
fn data_intact(m: &Mem) -> bool {
    (0..ZEROS).all(|i| (0..512).all(|w| m.read_u64(i, w) == 0)) && (0..2 * PAIRS).all(|p| m.page_matches(ZEROS + p, 1000 + (p / 2) as u64))
}

#[test]
fn each_mode_merges_what_it_allows_and_a_stricter_one_unmerges() {
    let Some(e) = engine() else { return };
    let e = Arc::new(e);
    flat_out(&e);
    // Zero pages counted in ksm_zero_pages (with 0 they would count as one
    // KSM page of zeros, as the kernel's do).
    e.set_use_zero_pages(true);
    let dir = tempdir("merge-mode");
    let tree = StatsTree::spawn(e.clone(), dir.clone(), StatsTreeOptions::default()).unwrap();
    assert_eq!(read_mode(&dir), "[all] zero-only off\n", "the default, shown as the kernel's multi-choice attributes");
    e.set_attr(MODE, "zero-only").unwrap();

    // A private file mapping (QEMU's memory-backend-memfd share=off) of a
    // file of holes: anonymous memory once registered (the pin check needs
    // it), whose zero pages go to the kernel's zero page (see ksm_semantics).
    let m = layout(Mem::memfd_private(ZEROS + 2 * PAIRS));
    e.register(m.addr, m.len).unwrap();

    // zero-only: the zero pages are dropped, the pairs stay apart.
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| s.ksm_zero_pages == ZEROS as u64);
    assert!(ok, "zero-only: {s:?}");
    assert!(
        e.wait_full_scans(3, Duration::from_secs(10)),
        "{:?} {:?} {}",
        e.stats(),
        e.show_attr("run"),
        e.show_attr("pages_to_scan").unwrap()
    );
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages), (0, 0, ZEROS as u64), "zero-only merged a non-zero page: {s:?}");
    assert!((ZEROS..m.pages()).all(|i| !merged(&m, i)), "no non-zero page maps the store");
    println!("zero-only: pages_shared {} pages_sharing {}", s.pages_shared, s.pages_sharing);

    // all, written through the tree: the pairs merge too.
    write_mode(&dir, "all\n");
    let want = (PAIRS as u64, PAIRS as u64, ZEROS as u64);
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| (s.pages_shared, s.pages_sharing, s.ksm_zero_pages) == want);
    assert!(ok, "all: {s:?}");
    assert!((ZEROS..m.pages()).all(|i| merged(&m, i)), "every pair maps the store under all");
    assert_eq!(read_mode(&dir), "[all] zero-only off\n");
    println!("all: pages_shared {} pages_sharing {}", s.pages_shared, s.pages_sharing);

    // all -> zero-only: the non-zero pages are unmerged, every byte kept.
    write_mode(&dir, "zero-only\n");
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| (s.pages_shared, s.pages_sharing) == (0, 0));
    assert!(ok, "all -> zero-only did not unmerge: {s:?}");
    assert!((ZEROS..m.pages()).all(|i| !merged(&m, i)), "non-zero pages still map the store");
    assert_eq!(e.stats().ksm_zero_pages, ZEROS as u64, "zero pages stay merged");
    assert!(data_intact(&m), "data changed by the unmerge");
    assert!(e.wait_full_scans(3, Duration::from_secs(10)));
    assert_eq!(e.stats().pages_sharing, 0, "pairs merged again under zero-only");
    assert_eq!(read_mode(&dir), "all [zero-only] off\n");

    // off: everything unmerged and nothing merges again.
    write_mode(&dir, "off");
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| s.pages_shared == 0 && s.pages_sharing == 0 && s.ksm_zero_pages == 0);
    assert!(ok, "off did not unmerge: {s:?}");
    assert!((0..m.pages()).all(|i| !merged(&m, i)));
    assert!(e.wait_full_scans(3, Duration::from_secs(10)));
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages), (0, 0, 0), "off merged: {s:?}");
    assert!(data_intact(&m));
    // Writing to the merged-again-free memory still works and reads back.
    m.write_u64(ZEROS, 0, 7);
    assert_eq!(m.read_u64(ZEROS, 0), 7);

    // A refused write changes nothing.
    std::fs::write(dir.join("kernel/mm/ksm").join(MODE), "zero_only\n").unwrap();
    assert!(tree.publish_now() && tree.publish_now());
    assert_eq!(read_mode(&dir), "all zero-only [off]\n");
    let last = std::fs::read_to_string(dir.join("twinpage/last_error")).unwrap();
    assert!(last.contains("twinpage_merge_mode EINVAL"), "{last:?}");
    m.unmap(&e);
    drop(tree);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An engine with `use_zero_pages=1` under `zero-only` over [`layout`] in
/// anonymous memory, its zero pages merged.
fn zero_only_with_zero_pages_merged() -> Option<(twinpage::Engine, Mem)> {
    let e = engine()?;
    flat_out(&e);
    e.set_attr("use_zero_pages", "1").unwrap();
    e.set_attr(MODE, "zero-only").unwrap();
    let m = layout(Mem::anon(ZEROS + 2 * PAIRS));
    e.register(m.addr, m.len).unwrap();
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| s.ksm_zero_pages == ZEROS as u64);
    assert!(ok, "zero-only: {s:?}");
    Some((e, m))
}

#[test]
fn use_zero_pages_under_zero_only_drops_zero_pages_and_nothing_else() {
    let Some((e, m)) = zero_only_with_zero_pages_merged() else { return };
    assert!(e.wait_full_scans(3, Duration::from_secs(10)));
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (0, 0), "{s:?}");
    assert!(data_intact(&m));
    m.unmap(&e);
}

fn twin(prog: &Path, lib: &Path, dir: &Path) -> Child {
    let mut c = Command::new(prog)
        .args(["11", "512", "0", "0"])
        .env("LD_PRELOAD", lib)
        .env("TWINPAGE_DIR", dir)
        .env("TWINPAGE_PAGES_TO_SCAN", "100000")
        .env("TWINPAGE_SLEEP_MILLISECS", "0")
        .env("TWINPAGE_TWINPAGE_MERGE_MODE", "zero-only")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("READY"), "twin did not start: {line:?}");
    c
}

#[test]
fn through_twinpaged_the_mode_holds_for_agents_and_daemon() {
    let (Some(lib), Some(prog)) = (preload_lib(), program("twin")) else { return };
    let daemon = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/twinpaged");
    if !common::require(daemon.exists(), "target/release/twinpaged") || !have_uffd() {
        return;
    }
    let dir: PathBuf = tempdir("merge-mode-daemon");
    let sock = dir.join("twinpaged.sock");
    let mut kids = Kids(vec![Command::new(&daemon).arg("--dir").arg(&dir).spawn().unwrap()]);
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));
    let d = kids.0[0].id();
    kids.0.push(twin(&prog, &lib, &dir));
    kids.0.push(twin(&prog, &lib, &dir));
    let (a, b) = (kids.0[1].id(), kids.0[2].id());
    assert!(wait_until(Duration::from_secs(10), || counter(&dir, a, "twinpage_daemon_agents") == 1
        && counter(&dir, b, "twinpage_daemon_agents") == 1));

    // zero-only (from the agents' environment, adopted by the daemon through
    // the tree): 512 identical non-zero pages in each, none merged.
    let daemon_mode = || std::fs::read_to_string(dir.join(format!("proc/{d}/twinpage_tunables"))).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(5), || daemon_mode().contains("twinpage_merge_mode all [zero-only] off")), "{}", daemon_mode());
    let scans = |p| counter(&dir, p, "full_scans");
    let (sa, sb) = (scans(a), scans(b));
    assert!(wait_until(Duration::from_secs(10), || scans(a) >= sa + 3 && scans(b) >= sb + 3));
    for p in [a, b] {
        assert_eq!(counter(&dir, p, "twinpage_merging_pages"), 0, "agent {p} merged under zero-only");
    }
    assert_eq!(counter(&dir, d, "pages_shared"), 0, "the daemon merged under zero-only");

    // all: the 512 common pages merge across the two.
    write_mode(&dir, "all\n");
    assert!(
        wait_until(Duration::from_secs(10), || counter(&dir, a, "twinpage_daemon_merged") == 512
            && counter(&dir, b, "twinpage_daemon_merged") == 512),
        "a {} b {}",
        counter(&dir, a, "twinpage_daemon_merged"),
        counter(&dir, b, "twinpage_daemon_merged")
    );
    println!("all: daemon pages_shared {} store {} bytes", counter(&dir, d, "pages_shared"), counter(&dir, d, "twinpage_store_bytes"));

    // all -> zero-only: both unmerge, the daemon's store empties.
    write_mode(&dir, "zero-only\n");
    assert!(
        wait_until(Duration::from_secs(10), || counter(&dir, a, "twinpage_merging_pages") == 0
            && counter(&dir, b, "twinpage_merging_pages") == 0
            && counter(&dir, d, "pages_shared") == 0
            && counter(&dir, d, "twinpage_store_bytes") == 0),
        "a {} b {} daemon shared {} store {}; a's settings: {}",
        counter(&dir, a, "twinpage_merging_pages"),
        counter(&dir, b, "twinpage_merging_pages"),
        counter(&dir, d, "pages_shared"),
        counter(&dir, d, "twinpage_store_bytes"),
        std::fs::read_to_string(dir.join(format!("proc/{a}/twinpage_tunables"))).unwrap_or_default()
    );
    for mut c in kids.0.drain(1..).collect::<Vec<_>>() {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let mut out = String::new();
        BufReader::new(c.stdout.take().unwrap()).read_line(&mut out).unwrap();
        assert!(c.wait().unwrap().success() && out.starts_with("VERIFY OK"), "{out:?}");
    }
    drop(kids);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stricter mode has taken back what it disallows when the write
/// returns, as `run=2` has unmerged (before, the scanner did it at its next
/// wake, and missed it when `all` and back came within one wake).
#[test]
fn a_stricter_mode_has_unmerged_when_its_write_returns() {
    let Some((e, m)) = zero_only_with_zero_pages_merged() else { return };
    for _ in 0..5 {
        e.set_attr(MODE, "all").unwrap();
        let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| (s.pages_shared, s.pages_sharing) == (PAIRS as u64, PAIRS as u64));
        assert!(ok, "all: {s:?}");
        e.set_attr(MODE, "zero-only").unwrap();
        let s = e.stats();
        assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages), (0, 0, ZEROS as u64), "right after the write: {s:?}");
        assert!((ZEROS..m.pages()).all(|i| !merged(&m, i)), "a non-zero page still maps the store after the write returned");
        assert!(data_intact(&m));
    }
    m.unmap(&e);
}
