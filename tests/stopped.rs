//! A stopped process (`SIGSTOP`, a job-control stop, a debugger) runs none
//! of its threads, twinpage's included: until it continues it neither
//! merges nor publishes, and the tree must not wait for it. Before, a write
//! through `twinpage set` (or the `--sysfs` view) took its whole 5 s
//! timeout for each stopped process on the tree, and a preloaded program's
//! served sysfs write as long, once.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::procs::{finish_twin, setup, spawn_ready, store_mappings, tree_attr, Kids};
use common::wait_until;
use twinpage::statsfs::{process_stopped, SetOutcome, Tree};

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// Stops `pid` at a moment it does not hold the tree's lock (its publisher
/// takes it for each pass; a process stopped inside one holds up every
/// other until it continues, which is the other half of this story and not
/// what this test is about).
fn stop_outside_the_lock(pid: u32, dir: &Path) {
    let lock = Tree::at(dir).lock().unwrap();
    for _ in 0..100 {
        signal(pid, libc::SIGSTOP);
        assert!(wait_until(Duration::from_secs(5), || process_stopped(pid)), "pid {pid} never stopped");
        if lock.lock_timeout(Duration::ZERO).is_ok() {
            return;
        }
        signal(pid, libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("pid {pid} held the tree's lock each time it stopped");
}

/// Two processes on one tree with `run=0`; one is stopped; `run=1` through
/// the tree returns as soon as the running one has it (before: the whole
/// 30 s timeout, waiting for the stopped one), and only the running one
/// merges, and `full_scans` counts its rounds. Once continued, the stopped
/// one takes `run=1` and merges.
#[test]
fn the_tree_does_not_wait_for_a_stopped_process_which_takes_writes_when_it_continues() {
    let Some(s) = setup("stopped") else { return };
    let start = || spawn_ready(s.twin([5, 64, 8, 0], 20).env("TWINPAGE_RUN", "0"));
    let (a, b) = (start(), start());
    let (pa, pb) = (a.id(), b.id());
    let mut kids = Kids(vec![a, b]);
    let tree = Tree::at(&s.dir);
    // Published with their memory registered (a first pass may come before).
    let registered =
        |pid: u32| tree.processes().is_ok_and(|ps| ps.iter().any(|p| p.pid == pid && p.live && p.counter("twinpage_pages_registered") > 0));
    assert!(wait_until(Duration::from_secs(10), || registered(pa) && registered(pb)), "both never published their memory");
    stop_outside_the_lock(pb, &s.dir);

    let t = Instant::now();
    let out = tree.set("run", b"1", Duration::from_secs(30));
    let took = t.elapsed();
    assert!(matches!(out, Ok(SetOutcome::Applied { ref after, .. }) if after == "1"), "{out:?}");
    assert!(took < Duration::from_secs(10), "the write waited {took:?} for the stopped process");
    let t = Instant::now();
    let left = tree.refresh(Duration::from_secs(30), &HashSet::new()).unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(10), "a refresh waited {took:?} for the stopped process");
    assert_eq!(left, HashSet::from([pb]), "only the stopped process did not answer");
    let has_run = |pid: u32| {
        tree.processes().is_ok_and(|ps| ps.iter().any(|p| p.pid == pid && p.tunables.iter().any(|(n, v)| n == "run" && v == "1")))
    };
    assert!(has_run(pa), "the running process did not take the write");
    assert!(wait_until(Duration::from_secs(10), || store_mappings(pa) > 0), "the running process merged nothing");
    assert!(!has_run(pb) && store_mappings(pb) == 0, "a stopped process took a write or merged");
    // The global full_scans counts the running processes' rounds: before, a
    // stopped process with registered memory held it still for everyone.
    let from = tree_attr(&s.dir, "full_scans");
    assert!(wait_until(Duration::from_secs(10), || tree_attr(&s.dir, "full_scans") >= from + 3), "full_scans stood still");

    signal(pb, libc::SIGCONT);
    assert!(wait_until(Duration::from_secs(10), || has_run(pb)), "the process did not take the write once it continued");
    assert!(wait_until(Duration::from_secs(10), || store_mappings(pb) > 0), "the continued process merged nothing");
    assert!(tree.all_have("run", "1"));
    finish_twin(kids.0.remove(1));
    finish_twin(kids.0.remove(0));
    let _ = std::fs::remove_dir_all(&s.dir);
}
