//! `twinpaged --sysfs DIR`: the tree's `kernel/mm/ksm` served as sysfs
//! serves it, for programs that are not preloaded (`cat`, `echo`,
//! node_exporter): bad writes fail in `write(2)` with the kernel's errno and
//! change nothing, accepted ones have reached every process when `write(2)`
//! returns (`run=2`: nothing merged any more), read-only files refuse
//! writers (root too), and reads are never torn.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::procs::{finish_twin, setup, spawn_ready, start_daemon, store_mappings, tree_counter, Kids};
use common::view::{fuse_available, mounted, Unmount};
use common::{tempdir, wait_until};

/// Merged stretches of `pid`: private mappings of the daemon's store memfd
/// (the agent also maps the whole store shared and read-only, to compare).
fn write(path: &Path, value: &str) -> Result<(), i32> {
    std::fs::write(path, value).map_err(|e| e.raw_os_error().unwrap_or(0))
}

#[test]
fn the_view_answers_readers_and_writers_as_sysfs_does() {
    let Some(s) = setup("view") else { return };
    if !fuse_available() {
        return;
    }
    let view: PathBuf = tempdir("view-mnt");
    let _unmount = Unmount(view.clone());
    let mut kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &["--sysfs", view.to_str().unwrap()], "info")]);
    let ksm = view.join("kernel/mm/ksm");
    assert!(wait_until(Duration::from_secs(10), || ksm.join("run").is_file()), "the view never showed kernel/mm/ksm/run");
    let agent = spawn_ready(&mut s.twin([7, 512, 64, 0], 0));
    let pid = agent.id();
    kids.0.push(agent);
    assert!(
        wait_until(Duration::from_secs(20), || tree_counter(&s.dir, pid, "twinpage_daemon_merged") >= 64 && store_mappings(pid) > 0),
        "nothing merged through the daemon"
    );

    // The same files as the tree, with sysfs's modes.
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&ksm), names(&s.dir.join("kernel/mm/ksm")));
    assert_eq!(std::fs::read_to_string(ksm.join("advisor_mode")).unwrap(), "[none] scan-time\n");

    // A bad value fails in write(2) and changes nothing.
    let tree_pts = s.dir.join("kernel/mm/ksm/pages_to_scan");
    let before = std::fs::read_to_string(&tree_pts).unwrap();
    assert_eq!(write(&ksm.join("pages_to_scan"), "12abc\n"), Err(libc::EINVAL));
    assert_eq!(write(&ksm.join("sleep_millisecs"), "-1"), Err(libc::EINVAL));
    assert_eq!(std::fs::read_to_string(&tree_pts).unwrap(), before);
    assert_eq!(std::fs::read_to_string(ksm.join("pages_to_scan")).unwrap(), before);
    // Read-only attributes refuse writers, root too (sysfs: EACCES at open).
    assert_eq!(write(&ksm.join("pages_shared"), "5"), Err(libc::EACCES));

    // An accepted value is every process's when write(2) returns.
    assert_eq!(write(&ksm.join("pages_to_scan"), "1234\n"), Ok(()));
    assert_eq!(std::fs::read_to_string(ksm.join("pages_to_scan")).unwrap(), "1234\n");
    let own = std::fs::read_to_string(s.dir.join(format!("proc/{pid}/twinpage_tunables"))).unwrap();
    assert!(own.lines().any(|l| l == "pages_to_scan 1234"), "the agent's settings right after the write:\n{own}");

    // Reads are whole values, while the publishers rewrite the files under
    // them (flat-out scanning moves pages_scanned at every pass).
    for _ in 0..2000 {
        let v = std::fs::read_to_string(ksm.join("pages_scanned")).unwrap();
        assert!(v.ends_with('\n') && v.trim_end().parse::<u64>().is_ok() && v.matches('\n').count() == 1, "torn read {v:?}");
    }

    // run=2: nothing is merged any more when write(2) returns.
    assert!(store_mappings(pid) > 0);
    assert_eq!(write(&ksm.join("run"), "2\n"), Ok(()));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert_eq!(store_mappings(pid), 0, "store pages still mapped right after run=2 returned:\n{maps}");
    assert_eq!(std::fs::read_to_string(ksm.join("run")).unwrap(), "2\n");
    // And every counter says so at once, as the kernel's do.
    for name in ["pages_shared", "pages_sharing", "full_scans"] {
        assert_eq!(std::fs::read_to_string(ksm.join(name)).unwrap(), "0\n", "{name} right after run=2 returned");
    }
    // run=1: full_scans counts again from 0, and two full scans later
    // every duplicate is merged again (the barrier the selftests use).
    // Scanning slowly (a full scan a period) from here, as a program that
    // waits for full scans would run ksmd, so that counting from 0 again
    // is what makes the wait short.
    let before = std::fs::read_to_string(s.dir.join("twinpage/state")).unwrap_or_default();
    assert_eq!(write(&ksm.join("sleep_millisecs"), "100"), Ok(()));
    assert_eq!(write(&ksm.join("run"), "1"), Ok(()));
    let read = |name: &str| std::fs::read_to_string(ksm.join(name)).unwrap().trim_end().parse::<u64>().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || read("full_scans") >= 2),
        "full_scans after run=1: {}; the tree's state before: {before}",
        read("full_scans")
    );
    assert!(store_mappings(pid) > 0 && read("pages_sharing") > 0, "nothing merged again two full scans after run=1");

    finish_twin(kids.0.remove(1));
    let mut daemon = kids.0.remove(0);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    daemon.wait().unwrap();
    assert!(!mounted(&view), "the view stayed mounted after twinpaged stopped");
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// A read of a counter through the view shows values taken after the read
/// began, as sysfs's do. The oracle is the program's own engine: between
/// two reads of its own `pages_scanned` (exact, in-process), a read of the
/// view's must fall between them. The program scans 64 pages every 5 ms
/// while its publisher passes every 50 ms: values as of the last pass lag
/// by hundreds of pages.
#[test]
fn a_read_through_the_view_shows_counters_taken_after_it_began() {
    let Some(s) = setup("view-fresh") else { return };
    if !fuse_available() {
        return;
    }
    let Some(prog) = common::program("scanread") else { return };
    let view: PathBuf = tempdir("view-fresh-mnt");
    let _unmount = Unmount(view.clone());
    let daemon = start_daemon(&s.daemon, &s.dir, &["--sysfs", view.to_str().unwrap()], "info");
    let daemon_pid = daemon.id();
    let mut kids = Kids(vec![daemon]);
    let ksm = view.join("kernel/mm/ksm");
    assert!(wait_until(Duration::from_secs(10), || ksm.join("run").is_file()), "the view never showed kernel/mm/ksm/run");
    let mut cmd = Command::new(prog);
    cmd.arg("256")
        .env("LD_PRELOAD", &s.lib)
        .env("TWINPAGE_DIR", &s.dir)
        .env("TWINPAGE_REDIRECT_SYSFS", "1")
        .env("TWINPAGE_PAGES_TO_SCAN", "64")
        .env("TWINPAGE_SLEEP_MILLISECS", "5")
        .stdin(std::process::Stdio::piped());
    let mut agent = spawn_ready(&mut cmd);
    let mut to = agent.stdin.take().unwrap();
    let mut from = std::io::BufReader::new(agent.stdout.take().unwrap());
    kids.0.push(agent);
    let mut own = || {
        use std::io::{BufRead, Write};
        to.write_all(b"r\n").unwrap();
        let mut line = String::new();
        from.read_line(&mut line).unwrap();
        line.trim().parse::<u64>().unwrap_or_else(|_| panic!("scanread said {line:?}"))
    };
    assert!(wait_until(Duration::from_secs(10), || own() > 1000), "the program's engine is not scanning");
    // The daemon scans nothing itself: the global count is the program's.
    assert_eq!(tree_counter(&s.dir, daemon_pid, "pages_scanned"), 0);
    let mut seen = Vec::new();
    for _ in 0..20 {
        let before = own();
        let v: u64 = std::fs::read_to_string(ksm.join("pages_scanned")).unwrap().trim().parse().unwrap();
        let after = own();
        seen.push((before, v, after));
        std::thread::sleep(Duration::from_millis(7));
    }
    eprintln!("(own before, view, own after): {seen:?}");
    for &(before, v, after) in &seen {
        assert!(before <= v && v <= after, "the view showed {v}, outside {before}..={after}: not taken during the read; all: {seen:?}");
    }
    drop(to);
    drop(kids);
}
