//! The mapping budget: with vm.max_map_count lowered, twinpage stays below
//! its headroom, the program's own mmap calls still succeed, and the stats
//! say merging was held back; a root twinpaged raises the limit (and says
//! so), or with --keep-max-map-count the agent, the daemon and `twinpage
//! stat` say what is held back and what fixes it.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

use common::procs::{finish_twin, setup, spawn_ready, tree_counter, Kids};
use common::sysctl::{lowered, max_map_count};
use common::*;

/// The tests change one host-wide setting: one at a time.
static ONE: Mutex<()> = Mutex::new(());

#[test]
fn merging_stays_under_a_lowered_max_map_count() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let cap = 3000usize;
    let Some(_restore) = lowered(cap as u64) else { return };
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

/// Content of page `i` of the budget-order test: the first half, every
/// other page a copy of one of 4 patterns (isolated merges, two mappings a
/// page); the second half, 64 blocks whose first 32 pages repeat one run of
/// 32 different pages (a whole run merges as one stretch: two mappings for
/// 32 pages); everything else unique.
fn budget_order_page(i: usize) -> u64 {
    let half = 4096;
    if i < half {
        return if i.is_multiple_of(2) { (i % 8) as u64 / 2 } else { 1000 + i as u64 };
    }
    let j = (i - half) % 64;
    if j < 32 {
        500_000 + j as u64
    } else {
        2_000_000 + i as u64
    }
}

/// When the budget runs short, runs that save many pages per mapping merge
/// before isolated pages, even when the isolated pages come first in the
/// scanner's order. At a limit of 2625 mappings for twinpage, the 2048
/// isolated merges of the first half alone would take all of it (the run
/// half, scanned after, would never merge): now every run merges, and the
/// isolated pages take what is left.
#[test]
fn when_the_budget_is_short_whole_runs_merge_before_isolated_pages() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(_restore) = lowered(3000) else { return };
    let Some(e) = engine() else { return };
    flat_out(&e);
    let m = Mem::anon(8192);
    for i in 0..8192 {
        m.fill(i, budget_order_page(i));
    }
    e.register(m.addr, m.len).unwrap();
    // A merged page is a page of the store file (read first: a remapped page
    // is not in the page table until touched).
    let is_merged = |i: usize| {
        m.read_u64(i, 0);
        pagemap_flags(m.addr + i * PAGE).1
    };
    let merged = |range: std::ops::Range<usize>| range.filter(|&i| is_merged(i)).count();
    let runs = (4096..8192).filter(|i| (i - 4096) % 64 < 32);
    let all_runs = || runs.clone().all(is_merged);
    let done = wait_until(Duration::from_secs(30), || all_runs() && merged(0..4096) > 500);
    assert!(e.wait_full_scans(4, Duration::from_secs(30)));
    let s = e.stats();
    eprintln!(
        "budget order: run pages merged {} of 2048, isolated pages merged {} of 2048, pages_sharing {}, held back {}, mappings {} (limit {})",
        runs.clone().filter(|&i| is_merged(i)).count(),
        merged(0..4096),
        s.pages_sharing,
        s.twinpage_merges_held_back,
        twinpage::maps::map_count().unwrap(),
        s.twinpage_map_limit
    );
    assert!(done, "the runs did not all merge, or the isolated pages got nothing of the rest");
    assert!(s.twinpage_merges_held_back > 0, "the budget was never short: the test shows nothing");
    for i in (0..8192).step_by(5) {
        assert!(m.page_matches(i, budget_order_page(i)), "page {i}");
    }
    m.unmap(&e);
    drop(e);
}

/// twinpaged on `dir` with `extra` arguments, its log in `log`.
fn daemon(bin: &Path, dir: &Path, extra: &[&str], log: &Path) -> Child {
    let sock = dir.join("twinpaged.sock");
    let c = Command::new(bin)
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .env("TWINPAGE_LOG", "info")
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || sock.exists()), "twinpaged did not start");
    c
}

/// twin.c with 4000 pairs of equal neighbouring pages: each merged page
/// stands alone in its mapping, ~8000 mappings for all of them.
fn pairs(s: &common::procs::Setup, log: &Path) -> Child {
    spawn_ready(s.twin([5, 0, 4000, 0], 5).stderr(std::fs::File::create(log).unwrap()))
}

/// At vm.max_map_count=3000, a root twinpaged raises the limit to what its
/// agent's registered pages can need, logs it once, and every pair merges.
#[test]
fn a_root_daemon_raises_a_low_max_map_count_and_says_so() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = setup("mapcap-raise") else { return };
    let Some(_restore) = lowered(3000) else { return };
    let dlog = s.dir.join("daemon.log");
    let mut kids = Kids(vec![daemon(&s.daemon, &s.dir, &[], &dlog)]);
    kids.0.push(pairs(&s, &s.dir.join("agent.log")));
    let p = kids.0[1].id();
    assert!(wait_until(Duration::from_secs(15), || max_map_count() > 3000), "vm.max_map_count stayed at {}", max_map_count());
    let log = std::fs::read_to_string(&dlog).unwrap_or_default();
    eprintln!("{log}");
    assert_eq!(log.matches("raised vm.max_map_count from 3000 to").count(), 1, "{log}");
    // Merged through the daemon: the agent counts them as its merging pages.
    assert!(
        wait_until(Duration::from_secs(20), || tree_counter(&s.dir, p, "twinpage_merging_pages") >= 8000),
        "not every pair merged under the raised limit: {:?}",
        procs::tree_counters(&s.dir, p)
    );
    eprintln!("raised to {}; the agent merged {} pages", max_map_count(), tree_counter(&s.dir, p, "twinpage_merging_pages"));
    finish_twin(kids.0.remove(1));
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// With --keep-max-map-count the limit stays; the agent logs once what is
/// held back and the command that fixes it, so does the daemon, and
/// `twinpage stat` shows it.
#[test]
fn held_back_merges_are_reported_where_the_limit_is_kept() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = setup("mapcap-keep") else { return };
    let Some(_restore) = lowered(3000) else { return };
    let dlog = s.dir.join("daemon.log");
    let alog = s.dir.join("agent.log");
    let mut kids = Kids(vec![daemon(&s.daemon, &s.dir, &["--keep-max-map-count"], &dlog)]);
    kids.0.push(pairs(&s, &alog));
    let p = kids.0[1].id();
    assert!(
        wait_until(Duration::from_secs(15), || tree_counter(&s.dir, p, "twinpage_pages_held_back") > 0),
        "nothing held back: {:?}",
        procs::tree_counters(&s.dir, p)
    );
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&dlog)
            .unwrap_or_default()
            .contains("because of vm.max_map_count=3000")),
        "the daemon said nothing: {}",
        std::fs::read_to_string(&dlog).unwrap_or_default()
    );
    let stat = Command::new(env!("CARGO_BIN_EXE_twinpage")).args(["stat", "--dir"]).arg(&s.dir).output().unwrap();
    let stat = String::from_utf8_lossy(&stat.stdout);
    let agent = std::fs::read_to_string(&alog).unwrap_or_default();
    eprintln!("agent:\n{agent}\nstat:\n{stat}");
    assert_eq!(max_map_count(), 3000, "--keep-max-map-count changed it");
    assert_eq!(agent.matches("merges held back by vm.max_map_count=3000").count(), 1, "{agent}");
    assert!(agent.contains("sysctl -w vm.max_map_count="), "{agent}");
    let line = stat.lines().find(|l| l.starts_with("held back:")).unwrap_or_else(|| panic!("no held-back line:\n{stat}"));
    assert!(line.contains("vm.max_map_count=3000") && line.contains("sysctl -w vm.max_map_count="), "{line}");
    finish_twin(kids.0.remove(1));
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}
