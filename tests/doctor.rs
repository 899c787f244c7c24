//! `twinpage doctor` on this host: the facts it reports and its exit code,
//! with the conditions it warns about made real (a lowered
//! vm.max_map_count under a registered process, kernel KSM merging a
//! process twinpage does not see, a store directory that is not tmpfs).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::kernel_ksm::{kernel_ksm_writable, KernelKsm};
use common::procs::{setup, spawn_ready, Kids};
use common::*;

fn doctor(dir: &Path, env: &[(&str, &str)]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twinpage")).args(["doctor", "--dir"]).arg(dir).envs(env.iter().copied()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}");
    (out, text)
}

/// The line of `topic`, and the fix line after it if any.
fn topic<'a>(text: &'a str, topic: &str) -> (&'a str, &'a str) {
    let lines: Vec<&str> = text.lines().collect();
    let i = lines.iter().position(|l| l.split_whitespace().nth(1) == Some(topic)).unwrap_or_else(|| panic!("no {topic} line:\n{text}"));
    let fix = lines.get(i + 1).filter(|l| l.trim_start().starts_with("fix:")).copied().unwrap_or("");
    (lines[i], fix)
}

#[test]
fn every_fact_is_reported_and_a_store_dir_off_tmpfs_is_an_error() {
    let dir = tempdir("doctor-plain");
    let (out, text) = doctor(&dir, &[]);
    for t in ["kernel", "userfaultfd", "max_map_count", "thp", "kernel_ksm", "twinpaged", "sysfs", "store", "first_writes"] {
        let (line, _) = topic(&text, t);
        assert!(["ok", "warning", "error"].contains(&line.split_whitespace().next().unwrap()), "{line}");
    }
    let errors = text.lines().filter(|l| l.starts_with("error")).count();
    assert_eq!(out.status.code(), Some(i32::from(errors > 0)), "exit code against {errors} errors");
    // /tmp is the root file system here, not tmpfs.
    let (out, text) = doctor(&dir, &[("TWINPAGE_STORE_DIR", "/tmp")]);
    let (line, fix) = topic(&text, "store");
    assert!(line.starts_with("error") && line.contains("not tmpfs") && fix.contains("tmpfs"), "{line} / {fix}");
    assert_eq!(out.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process with 8000 pages registered at vm.max_map_count=3000: a
/// warning naming it, with the value that covers it.
#[test]
fn a_low_max_map_count_under_registered_memory_is_a_warning_with_its_fix() {
    let (Some(lib), Some(prog)) = (preload_lib(), program("twin")) else { return };
    if !have_uffd() {
        return;
    }
    let Some(_restore) = common::sysctl::lowered(3000) else { return };
    let dir = tempdir("doctor-maps");
    let kid = spawn_ready(
        Command::new(&prog)
            .args(["3", "0", "4000", "0"])
            .env("LD_PRELOAD", &lib)
            .env("TWINPAGE_DIR", &dir)
            .env("TWINPAGE_LOG", "error")
            .stdout(Stdio::piped()),
    );
    let pid = kid.id();
    let _kids = Kids(vec![kid]);
    assert!(
        wait_until(Duration::from_secs(10), || procs::tree_counter(&dir, pid, "twinpage_pages_registered") == 8000),
        "the program did not publish"
    );
    let (_, text) = doctor(&dir, &[]);
    let (line, fix) = topic(&text, "max_map_count");
    assert!(line.starts_with("warning") && line.contains("vm.max_map_count=3000") && line.contains(&format!("pid {pid}")), "{line}");
    assert!(fix.contains("sysctl -w vm.max_map_count=65536"), "{fix}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kernel KSM merging a process twinpage does not see: a warning naming it.
#[test]
fn kernel_ksm_merging_other_processes_is_a_warning() {
    let Some(prog) = program("prctl") else { return };
    if !require(kernel_ksm_writable(), "root and a writable /sys/kernel/mm/ksm") {
        return;
    }
    let k = KernelKsm::flat_out();
    let kid = spawn_ready(Command::new(&prog).args(["count", "64", "10"]).stdout(Stdio::piped()));
    let pid = kid.id();
    let _kids = Kids(vec![kid]);
    k.start();
    let merged =
        || std::fs::read_to_string(format!("/proc/{pid}/ksm_merging_pages")).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    assert!(wait_until(Duration::from_secs(10), || merged() == 64), "kernel KSM did not merge the program");
    let dir = tempdir("doctor-ksm");
    let (_, text) = doctor(&dir, &[]);
    let (line, fix) = topic(&text, "kernel_ksm");
    assert!(line.starts_with("warning") && line.contains(&format!("{pid} (")) && !fix.is_empty(), "{line} / {fix}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sysfs view: a warning with the command that mounts one while none is
/// mounted, ok naming it once twinpaged serves one, and a warning again
/// once the daemon was killed and left its mount stale.
#[test]
fn the_sysfs_view_is_reported_mounted_or_missing_or_stale() {
    let Some(daemon) = common::procs::daemon_bin() else { return };
    if !common::view::fuse_available() {
        return;
    }
    let dir = tempdir("doctor-view");
    let view = dir.join("sysfs");
    let unmount = common::view::Unmount(view.clone());
    let others = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(" - fuse twinpage ") || l.contains(" - fuse.twinpage "));
    if !others {
        let (_, text) = doctor(&dir, &[]);
        let (line, fix) = topic(&text, "sysfs");
        assert!(line.starts_with("warning") && line.contains("no twinpaged sysfs view"), "{line}");
        assert!(fix.contains(&format!("--sysfs {}", view.display())), "{fix}");
    }
    let mut kids = Kids(vec![common::procs::start_daemon(&daemon, &dir, &["--sysfs", view.to_str().unwrap()], "warn")]);
    assert!(wait_until(Duration::from_secs(10), || view.join("kernel/mm/ksm/run").exists()), "no view mounted");
    let (_, text) = doctor(&dir, &[]);
    let (line, _) = topic(&text, "sysfs");
    assert!(line.starts_with("ok") && line.contains(&format!("{}/kernel/mm/ksm", view.display())), "{line}");
    kids.0[0].kill().unwrap();
    kids.0[0].wait().unwrap();
    let (_, text) = doctor(&dir, &[]);
    let (line, fix) = topic(&text, "sysfs");
    assert!(line.starts_with("warning") && line.contains("stale") && fix.contains("umount"), "{line} / {fix}");
    drop(unmount);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The number in `twinpage/stats` of the tree at `dir` (0 if none yet).
fn global_counter(dir: &Path, name: &str) -> i128 {
    twinpage::statsfs::Tree::at(dir).twinpage_stats().ok().and_then(|c| c.get(name).copied()).unwrap_or(0)
}

/// First writes to merged pages of a real process are counted; a tree whose
/// counters show pages copied in place is a warning with what to change.
#[test]
fn first_writes_copied_in_place_are_a_warning() {
    let Some(s) = setup("doctor-writes") else { return };
    // 256 pairs, one page rewritten every 20 ms: merged pages get written.
    let kids = Kids(vec![spawn_ready(&mut s.twin([3, 0, 256, 1], 0))]);
    assert!(
        wait_until(Duration::from_secs(20), || global_counter(&s.dir, "twinpage_cow_breaks") >= 5),
        "no first write to a merged page was counted"
    );
    let (_, text) = doctor(&s.dir, &[]);
    let (line, _) = topic(&text, "first_writes");
    let (all, in_place) = (global_counter(&s.dir, "twinpage_cow_breaks"), global_counter(&s.dir, "twinpage_cow_in_place"));
    if in_place == 0 {
        assert!(line.starts_with("ok") && line.contains("first writes to merged pages"), "{line}");
    } else {
        assert!(line.starts_with("warning") && line.contains(&format!("{in_place} of ")), "{line} ({in_place} of {all})");
    }
    drop(kids);

    // A host where writes had to wait (the counters a busy one publishes).
    let busy = tempdir("doctor-busy");
    std::fs::create_dir_all(busy.join("twinpage")).unwrap();
    std::fs::write(busy.join("twinpage/stats"), "twinpage_cow_breaks 1000\ntwinpage_cow_in_place 3\n").unwrap();
    let (_, text) = doctor(&busy, &[]);
    let (line, fix) = topic(&text, "first_writes");
    assert!(line.starts_with("warning") && line.contains("3 of 1000") && line.contains("never merge again"), "{line}");
    assert!(fix.contains("pages_to_scan") && fix.contains("sleep_millisecs"), "{fix}");
    let _ = std::fs::remove_dir_all(&busy);
    let _ = std::fs::remove_dir_all(&s.dir);
}
