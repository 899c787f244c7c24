//! The statistics tree against the kernel and in use: conformance with the
//! running kernel's `/sys/kernel/mm/ksm` (names, formats, the accept/refuse
//! outcome of a table of writes), readers holding an fd, a tunable written
//! to the tree changing the scan rate, refused writes, several processes on
//! one tree, and leaving the tree.
//!
//! Tests that need userfaultfd, the kernel's KSM directory or root skip with
//! a printed reason outside CI and fail under `CI=true`.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_until, Mem};
use kernel_compat::sysfs::RESTORE_ORDER;
use kernel_compat::testutil::{kernel_ksm_writable, require_or_skip, sysfs_lock};
use kernel_compat::write::SYSFS_WRITE_MAX;
use kernel_compat::{attrs, procfs, AdvisorMode, KsmSysfs, Snapshot, WriteError};
use twinpage::statsfs::{StatsTree, StatsTreeHandle, StatsTreeOptions, Tree, WaitOutcome};
use twinpage::Engine;

/// A fresh directory for one test's tree, removed at the end.
struct TempRoot(PathBuf);

impl TempRoot {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let p = std::env::temp_dir().join(format!("twinpage-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempRoot(p)
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn engine() -> Option<Arc<Engine>> {
    common::engine().map(Arc::new)
}

fn publish(engine: &Arc<Engine>, root: &Path) -> StatsTreeHandle {
    StatsTree::spawn(engine.clone(), root.to_path_buf(), StatsTreeOptions::default()).expect("spawn publisher")
}

fn pread_all(f: &File) -> String {
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0).unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// `pages` pages where page i and page i + pages/2 are equal.
fn duplicated(pages: usize, seed: u64) -> Mem {
    let m = Mem::anon(pages);
    for i in 0..pages {
        m.fill(i, seed + (i % (pages / 2)) as u64);
    }
    m
}

/// Writes through the tree and has the publisher handle it now.
fn tree_write(tree: &Tree, h: &StatsTreeHandle, name: &str, bytes: &[u8]) -> WaitOutcome {
    let t = tree.write_raw(name, bytes).unwrap();
    assert!(h.publish_now());
    if bytes.is_empty() {
        assert!(h.publish_now());
    }
    tree.wait(&t, Duration::from_secs(5)).unwrap()
}

#[test]
fn names_formats_and_modes_match_the_kernel() {
    let Some(e) = engine() else { return };
    let root = TempRoot::new("names");
    let h = publish(&e, &root.0);
    let tree = Tree::at(&root.0);
    let ours = tree.ksm().names().unwrap();
    let expected: BTreeSet<String> =
        twinpage::tunables::all_attrs().filter(|a| e.show_attr(a.name).is_some()).map(|a| a.name.to_string()).collect();
    assert_eq!(ours, expected, "only kernel names and twinpage_* under kernel/mm/ksm");
    assert!(ours.iter().all(|n| attrs::find(n).is_some() || n.starts_with("twinpage_")));
    for (name, dir) in [("twinpage", &tree.ksm()), ("kernel", &KsmSysfs::kernel())] {
        if name == "kernel" && !require_or_skip(dir.exists(), "/sys/kernel/mm/ksm (CONFIG_KSM)") {
            break;
        }
        for n in dir.names().unwrap() {
            let a = twinpage::tunables::find_attr(&n).unwrap_or_else(|| panic!("{name}: unknown attribute {n}"));

            let raw = dir.read_raw(&n).unwrap();
            assert!(raw.ends_with('\n') && raw.matches('\n').count() == 1, "{name} {n}: {raw:?}");
            if n == twinpage::tunables::MERGE_MODE {
                assert!(twinpage::MergeMode::from_show(&raw).is_some(), "{raw:?}");
            } else {
                assert!(a.matches_format(&raw), "{name} {n}: {raw:?} is not in format {:?}", a.format);
            }
            let mode = std::fs::metadata(dir.path(&n)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, a.mode(), "{name}: mode of {n}");
        }
    }
    let kernel = KsmSysfs::kernel();
    if kernel.exists() {
        let kernel_names: BTreeSet<String> = ours.iter().filter(|n| !n.starts_with("twinpage_")).cloned().collect();
        assert_eq!(kernel_names, kernel.names().unwrap(), "names under $TWINPAGE_DIR/kernel/mm/ksm and /sys/kernel/mm/ksm");
    }
    // The settings read back as the kernel driver reads them.
    let t = tree.ksm().tunables().unwrap();
    for a in attrs::writable().filter(|a| ours.contains(a.name)) {
        assert_eq!(t.show(a.name).unwrap(), tree.attribute(a.name).unwrap(), "{}", a.name);
        assert_eq!(e.show_attr(a.name).unwrap(), tree.attribute(a.name).unwrap(), "{}", a.name);
    }
    // proc/<pid>: the kernel's formats.
    let proc_dir = h.proc_dir();
    let stat_text = std::fs::read_to_string(proc_dir.join("ksm_stat")).unwrap();
    let stat = procfs::parse(&stat_text).unwrap();
    assert_eq!(stat.render(), stat_text);
    assert_eq!(std::fs::read_to_string(proc_dir.join("ksm_merging_pages")).unwrap(), procfs::render_merging_pages(stat.ksm_merging_pages));
    // The kernel's own file for this process parses with the same parser.
    if let Ok(k) = std::fs::read_to_string(procfs::ksm_stat_path(Path::new("/proc"), std::process::id())) {
        procfs::parse(&k).unwrap_or_else(|err| panic!("/proc/self/ksm_stat: {err}"));
    }
    drop(h);
    assert!(!proc_dir.exists(), "proc/<pid> removed when the publisher stops");
}

/// Inputs tried on every writable attribute (as kernel-compat's
/// conformance test).
const CASES: &[&str] = &[
    "",
    "abc",
    "-1",
    "-0",
    "0",
    "1",
    "2",
    "3",
    "5",
    "+5",
    " 5",
    "5 ",
    "5\n",
    "5\n\n",
    "\n",
    "+",
    "+-5",
    "0x10",
    "010",
    "99999999999999999999",
    "99999999999999999999x",
    "4294967295",
    "4294967296",
    "4294967297",
    "2147483647",
    "2147483648",
    "-2147483648",
    "18446744073709551615",
    "18446744073709551616",
    "256",
    "300",
    "y",
    "Y",
    "yes",
    "n",
    "no",
    "on",
    "off",
    "of",
    "o",
    "t",
    "true",
    "false",
    "e",
    "d",
    "x",
    "none",
    "none\n",
    " none",
    "None",
    "scan-time",
    "scan-time\n",
    "scan-time\n\n",
    "scan_time",
    "[none] scan-time",
    "[none] scan-time\n",
    "5\0junk",
    "none\0junk",
];

/// Gives the engine the kernel's saved settings, and publishes them.
fn mirror(e: &Engine, h: &StatsTreeHandle, snap: &Snapshot) {
    e.set_attr("advisor_mode", "none").unwrap();
    let scan_time = snap.get("advisor_mode").and_then(AdvisorMode::from_show) == Some(AdvisorMode::ScanTime);
    // The kernel's restore order, then `run`.
    for &n in RESTORE_ORDER.iter().chain(&["run"]) {
        let Some(v) = snap.get(n) else { continue };
        if n == "pages_to_scan" && scan_time {
            continue;
        }
        let v = if n == "advisor_mode" { AdvisorMode::from_show(v).unwrap().as_str() } else { v };
        e.set_attr(n, v).unwrap_or_else(|err| panic!("engine {n}={v}: {err}"));
    }
    assert!(h.publish_now());
}

fn settings(k: &KsmSysfs) -> Vec<(String, String)> {
    k.snapshot().unwrap().values.into_iter().collect()
}

#[test]
fn writes_get_the_kernels_outcome() {
    if !require_or_skip(kernel_ksm_writable(), "root and a writable /sys/kernel/mm/ksm") {
        return;
    }
    let Some(e) = engine() else { return };
    let _lock = sysfs_lock();
    let saved = KsmSysfs::kernel().save().expect("snapshot the kernel's KSM settings");
    let root = TempRoot::new("writes");
    let h = publish(&e, &root.0);
    let tree = Tree::at(&root.0);
    let tk = tree.ksm();
    let names: Vec<&str> = attrs::writable().map(|a| a.name).filter(|n| tk.path(n).exists()).collect();
    let started = Instant::now();
    let mut mismatches = Vec::new();
    let mut checked = 0;
    let mut refused = 0;

    let mut long = vec![b'0'; SYSFS_WRITE_MAX];
    long.push(b'7');
    let mut cases: Vec<(&str, Vec<u8>, bool)> = Vec::new();
    for &n in &names {
        for c in CASES {
            cases.push((n, c.as_bytes().to_vec(), false));
        }
    }
    cases.push(("stable_node_chains_prune_millisecs", long[1..].to_vec(), false));
    cases.push(("stable_node_chains_prune_millisecs", long.clone(), false));
    // Under the scan-time advisor pages_to_scan refuses everything.
    for c in CASES {
        for n in ["pages_to_scan", "advisor_mode"] {
            cases.push((n, c.as_bytes().to_vec(), true));
        }
    }

    for (name, bytes, advisor) in cases {
        saved.restore().expect("restore the kernel between cases");
        if advisor {
            saved.write("advisor_min_pages_to_scan", "777").unwrap();
            saved.write("advisor_mode", "scan-time").unwrap();
        }
        mirror(&e, &h, &saved.sysfs().snapshot().unwrap());
        assert_eq!(settings(&tk), settings(&saved), "twinpage mirrors the kernel before {name} <- {bytes:?}");
        let ctx = saved.write_context().unwrap();
        let predicted = kernel_compat::model_write(name, &bytes, &ctx);
        if name == "run" && matches!(predicted, Ok(Some(kernel_compat::Value::Run(2)))) && ctx.pages_shared > 0 {
            eprintln!("not writing run=2 to the kernel: {} pages are shared", ctx.pages_shared);
            continue;
        }
        let kernel = saved.write(name, &bytes).map_err(|err| err.kind());
        let ours = match tree_write(&tree, &h, name, &bytes) {
            WaitOutcome::Applied(_) => Ok(()),
            WaitOutcome::Refused(r) => Err(Some(r.error)),
            other => panic!("{name} <- {bytes:?}: {other:?}"),
        };
        checked += 1;
        refused += usize::from(ours.is_err());
        let shown = String::from_utf8_lossy(&bytes).into_owned();
        if ours != kernel {
            mismatches.push(format!("{name} <- {shown:?}: kernel {kernel:?}, twinpage {ours:?}"));
            continue;
        }
        let (k, t) = (settings(&saved), settings(&tk));
        if k != t {
            mismatches.push(format!("{name} <- {shown:?}: kernel settings {k:?}, twinpage {t:?}"));
        }
        // The engine has what the tree shows.
        for (n, v) in &t {
            assert_eq!(e.show_attr(n).as_deref(), Some(v.as_str()), "engine {n} after {name} <- {shown:?}");
        }
    }
    saved.finish().expect("restore the kernel's KSM settings");
    eprintln!("{checked} writes compared with the kernel ({refused} refused by both) in {:.1} s", started.elapsed().as_secs_f64());
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
    assert!(checked > 700 && refused > 300);
}

#[test]
fn a_reader_holding_an_fd_sees_fresh_values() {
    let Some(e) = engine() else { return };
    let root = TempRoot::new("fd");
    let h = publish(&e, &root.0);
    let tree = Tree::at(&root.0);
    let sharing_path = tree.ksm().path("pages_sharing");
    let sharing = File::open(&sharing_path).unwrap();
    let scans = File::open(tree.ksm().path("full_scans")).unwrap();
    let stat = File::open(h.proc_dir().join("ksm_stat")).unwrap();
    let merging = File::open(h.proc_dir().join("ksm_merging_pages")).unwrap();
    let ino = sharing.metadata().unwrap().ino();
    assert_eq!(pread_all(&sharing), "0\n");
    assert_eq!(pread_all(&merging), "0\n");
    assert_eq!(procfs::parse(&pread_all(&stat)).unwrap().ksm_merging_pages, 0);

    common::flat_out(&e);
    let m = duplicated(512, 1000);
    e.register(m.addr, m.len).unwrap();
    let (ok, s) = common::wait_for(&e, Duration::from_secs(20), |s| s.pages_sharing >= 256);
    assert!(ok, "merging: {s:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v: u64 = pread_all(&sharing).trim().parse().unwrap();
        if v >= 256 {
            break;
        }
        assert!(Instant::now() < deadline, "the held fd still reads {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(pread_all(&scans).trim().parse::<u64>().unwrap() >= 1);
    let st = procfs::parse(&pread_all(&stat)).unwrap();
    assert!(st.ksm_merging_pages >= 512, "{st:?}");
    assert!(st.ksm_mergeable);
    assert_eq!(st.ksm_process_profit, procfs::process_profit(st.ksm_merging_pages, st.ksm_zero_pages, st.ksm_rmap_items));
    assert_eq!(pread_all(&merging), format!("{}\n", st.ksm_merging_pages));
    assert_eq!(std::fs::metadata(&sharing_path).unwrap().ino(), ino, "rewritten in place, not renamed");
    eprintln!("held fd: pages_sharing 0 -> {}, ksm_stat merging pages {}", pread_all(&sharing).trim(), st.ksm_merging_pages);
    drop(h);
    m.unmap(&e);
}

fn rate(counter: &File, over: Duration) -> f64 {
    let read = || pread_all(counter).trim().parse::<u64>().unwrap();
    let (a, t0) = (read(), Instant::now());
    std::thread::sleep(over);
    let (b, t1) = (read(), Instant::now());
    (b - a) as f64 / (t1 - t0).as_secs_f64()
}

#[test]
fn pages_to_scan_written_to_the_tree_changes_the_scan_rate() {
    let Some(e) = engine() else { return };
    let root = TempRoot::new("rate");
    let h = publish(&e, &root.0);
    let tree = Tree::at(&root.0);
    // 64 MiB of unique pages: scanning never runs out of work.
    let m = Mem::anon(16384);
    for i in 0..m.pages() {
        m.fill(i, 1 << 32 | i as u64);
    }
    for (n, v) in [("smart_scan", "0"), ("sleep_millisecs", "20"), ("pages_to_scan", "100")] {
        assert_eq!(tree_write(&tree, &h, n, v.as_bytes()), WaitOutcome::Applied(v.to_string()));
    }
    e.register(m.addr, m.len).unwrap();
    let scanned = File::open(tree.ksm().path("pages_scanned")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let low = rate(&scanned, Duration::from_millis(1500));
    assert_eq!(tree_write(&tree, &h, "pages_to_scan", b"10000"), WaitOutcome::Applied("10000".into()));
    assert_eq!(e.tunables().pages_to_scan(), 10000);
    std::thread::sleep(Duration::from_millis(200));
    let high = rate(&scanned, Duration::from_millis(1500));
    // Invalid writes change nothing.
    for (n, v) in
        [("pages_to_scan", "abc"), ("pages_to_scan", "-1"), ("pages_to_scan", "99999999999999999999"), ("sleep_millisecs", "0x10")]
    {
        match tree_write(&tree, &h, n, v.as_bytes()) {
            WaitOutcome::Refused(r) => assert_eq!((r.attr.as_str(), r.error), (n, WriteError::Inval)),
            other => panic!("{n} <- {v:?}: {other:?}"),
        }
    }
    assert_eq!(tree.attribute("pages_to_scan").unwrap(), "10000");
    assert_eq!(tree.attribute("sleep_millisecs").unwrap(), "20");
    assert_eq!((e.tunables().pages_to_scan(), e.tunables().sleep_millisecs()), (10000, 20));
    let after = rate(&scanned, Duration::from_millis(1500));
    eprintln!(
        "scan rate at sleep_millisecs=20: pages_to_scan=100: {low:.0} pages/s; 10000: {high:.0} pages/s ({:.0}x); after invalid writes: {after:.0} pages/s",
        high / low
    );
    assert!(low > 1000.0 && low < 6000.0, "100 pages per 20 ms: {low:.0}/s");
    assert!(high > 10.0 * low, "{high:.0} vs {low:.0}");
    assert!(after > 10.0 * low, "after invalid writes: {after:.0}");
    drop(h);
    m.unmap(&e);
}

#[test]
fn refused_writes_revert_and_are_recorded() {
    let Some(e) = engine() else { return };
    let root = TempRoot::new("refuse");
    let h = publish(&e, &root.0);
    let tree = Tree::at(&root.0);
    common::flat_out(&e);
    let m = duplicated(256, 5000);
    e.register(m.addr, m.len).unwrap();
    let (ok, _) = common::wait_for(&e, Duration::from_secs(20), |s| s.pages_shared > 0);
    assert!(ok);
    assert!(h.publish_now());
    // EBUSY while pages are shared; the same value is accepted.
    let first = tree.last_error().unwrap().map_or(0, |r| r.seq);
    match tree_write(&tree, &h, "max_page_sharing", b"300") {
        WaitOutcome::Refused(r) => {
            assert_eq!((r.attr.as_str(), r.error, r.pid, r.seq), ("max_page_sharing", WriteError::Busy, std::process::id(), first + 1));
            assert_eq!(r.value, "\"300\"");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(tree.attribute("max_page_sharing").unwrap(), "256");
    assert_eq!(e.tunables().max_page_sharing(), 256);
    assert_eq!(tree_write(&tree, &h, "max_page_sharing", b"256\n"), WaitOutcome::Applied("256".into()));
    // ERANGE passes through for max_page_sharing, as in the kernel.
    match tree_write(&tree, &h, "max_page_sharing", b"99999999999") {
        WaitOutcome::Refused(r) => assert_eq!(r.error, WriteError::Range),
        other => panic!("{other:?}"),
    }
    // A shell-style write: echo 7 > file.
    std::fs::write(tree.ksm().path("sleep_millisecs"), "7\n").unwrap();
    assert!(h.publish_now());
    assert_eq!(e.tunables().sleep_millisecs(), 7);
    // Rewriting the same invalid text counts as a new write.
    for _ in 0..2 {
        let t = tree.write_raw("advisor_mode", b"[none] scan-time\n").unwrap();
        assert!(h.publish_now());
        assert!(matches!(tree.wait(&t, Duration::from_secs(5)).unwrap(), WaitOutcome::Refused(_)));
    }
    assert_eq!(tree.attribute("advisor_mode").unwrap(), "[none] scan-time");
    // An empty write (": > file") is a no-op.
    assert_eq!(tree_write(&tree, &h, "pages_to_scan", b""), WaitOutcome::Applied("100000".into()));
    drop(h);
    m.unmap(&e);
}

/// Kills the child at the end of the test.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn num(tree: &Tree, name: &str) -> i128 {
    tree.attribute(name).unwrap().parse().unwrap()
}

#[test]
fn several_processes_share_one_tree() {
    let Some(e) = engine() else { return };
    let root = TempRoot::new("multi");
    let h = publish(&e, &root.0);
    let tree = Tree::at(&root.0);
    common::flat_out(&e);
    let m = duplicated(1024, 9000);
    e.register(m.addr, m.len).unwrap();
    let (ok, _) = common::wait_for(&e, Duration::from_secs(20), |s| s.pages_sharing >= 512);
    assert!(ok);
    let child = Command::new(env!("CARGO_BIN_EXE_twinpage"))
        .args(["demo", "--mib", "16", "--publish", "--hold", "120", "--dir"])
        .arg(&root.0)
        .env_remove("TWINPAGE_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let cpid = child.0.id();
    let child_sharing = |tree: &Tree| {
        tree.processes().unwrap().iter().find(|p| p.pid == cpid).map_or(0, |p| p.counters.get("pages_sharing").copied().unwrap_or(0))
    };
    assert!(wait_until(Duration::from_secs(30), || child_sharing(&tree) >= 2048), "the child merges and publishes");
    let procs = tree.processes().unwrap();
    assert_eq!(procs.iter().filter(|p| p.live).count(), 2, "{procs:?}");
    assert_eq!(procs.iter().find(|p| p.pid == cpid).unwrap().comm, "twinpage");
    // The global counters are the sum (read under the lock, once values settle).
    let summed = wait_until(Duration::from_secs(10), || {
        let lock = tree.lock().unwrap();
        let _g = lock.lock().unwrap();
        let procs = tree.processes().unwrap();
        let sum = |n: &str| procs.iter().map(|p| p.counters.get(n).copied().unwrap_or(0)).sum::<i128>();
        ["pages_shared", "pages_sharing", "pages_unshared", "general_profit"].iter().all(|n| num(&tree, n) == sum(n))
    });
    assert!(summed, "kernel/mm/ksm counters are the sum over processes");
    let stat_sum: u64 = tree.processes().unwrap().iter().map(|p| p.stat.unwrap().ksm_merging_pages).sum();
    eprintln!(
        "two processes: pages_sharing {} (ours {}, child {}), ksm_merging_pages total {stat_sum}, full_scans {}",
        num(&tree, "pages_sharing"),
        e.stats().pages_sharing,
        child_sharing(&tree),
        num(&tree, "full_scans")
    );
    // A tunable written once applies to both engines.
    let out = tree.set("pages_to_scan", b"777", Duration::from_secs(2)).unwrap();
    assert!(matches!(out, twinpage::statsfs::SetOutcome::Applied { ref after, .. } if after == "777"), "{out:?}");
    assert_eq!(e.tunables().pages_to_scan(), 777);
    let both = wait_until(Duration::from_secs(2), || {
        tree.processes().unwrap().iter().all(|p| p.tunables.iter().any(|(n, v)| n == "pages_to_scan" && v == "777"))
    });
    assert!(both, "the child applied pages_to_scan=777: {:?}", tree.processes().unwrap());
    // EBUSY judged on the summed pages_shared.
    assert!(matches!(
        tree.set("max_page_sharing", b"3", Duration::from_secs(2)),
        Err(twinpage::statsfs::SetError::Refused(WriteError::Busy))
    ));
    // The child dies: its directory goes, cumulative counters stay.
    let scanned_before = num(&tree, "pages_scanned");
    let full_before = num(&tree, "full_scans");
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(wait_until(Duration::from_secs(2), || tree.processes().unwrap().len() == 1), "the dead process's directory is removed");
    assert!(h.publish_now());
    assert!(num(&tree, "pages_scanned") >= scanned_before);
    assert!(num(&tree, "full_scans") >= full_before);
    assert!(wait_until(Duration::from_secs(2), || num(&tree, "pages_sharing") == i128::from(e.stats().pages_sharing)));
    drop(h);
    m.unmap(&e);
}

#[test]
fn leaving_and_joining_a_tree() {
    let Some(e) = engine() else { return };
    let root = TempRoot::new("join");
    let tree = Tree::at(&root.0);
    let h = publish(&e, &root.0);
    assert_eq!(
        StatsTree::spawn(e.clone(), root.0.clone(), StatsTreeOptions::default()).unwrap_err().kind(),
        std::io::ErrorKind::AlreadyExists
    );
    common::flat_out(&e);
    let m = Mem::anon(256);
    for i in 0..256 {
        m.fill(i, i as u64);
    }
    e.register(m.addr, m.len).unwrap();
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    assert_eq!(tree_write(&tree, &h, "stable_node_chains_prune_millisecs", b"1234"), WaitOutcome::Applied("1234".into()));
    let proc_dir = h.proc_dir();
    drop(h);
    assert!(!proc_dir.exists());
    let scanned = num(&tree, "pages_scanned");
    assert!(scanned >= 512 && scanned <= i128::from(e.stats().pages_scanned), "cumulative counters stay: {scanned}");
    assert_eq!(num(&tree, "pages_unshared"), 0, "levels of a process that left are gone");
    // No publisher: the write waits in the file and applies when one starts.
    let t = tree.write_raw("sleep_millisecs", b"45").unwrap();
    assert_eq!(tree.wait(&t, Duration::from_secs(1)).unwrap(), WaitOutcome::NoPublisher);
    m.unmap(&e);
    drop(e);
    let Some(e2) = engine() else { return };
    let h2 = publish(&e2, &root.0);
    assert_eq!(e2.tunables().sleep_millisecs(), 45, "written while nobody published");
    assert_eq!(e2.tunables().stable_node_chains_prune_millisecs(), 1234, "tunables persist in the tree");
    assert_eq!(e2.tunables().pages_to_scan(), 100000, "adopted from the tree");
    assert_eq!(tree.attribute("sleep_millisecs").unwrap(), "45");
    assert!(num(&tree, "pages_scanned") >= scanned, "never goes back");
    drop(h2);
    // explicit: this process's value wins.
    let Some(e3) = engine() else { return };
    e3.set_attr("pages_to_scan", "4242").unwrap();
    let opts = StatsTreeOptions { explicit: vec!["pages_to_scan".into()], ..Default::default() };
    let h3 = StatsTree::spawn(e3.clone(), root.0.clone(), opts).unwrap();
    assert_eq!(tree.attribute("pages_to_scan").unwrap(), "4242");
    assert_eq!(e3.tunables().sleep_millisecs(), 45);
    drop(h3);
}
