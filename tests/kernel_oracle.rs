//! Programs written for kernel KSM, run unchanged on kernel KSM and on
//! twinpage in one test: the kernel is the oracle for what they see.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::kernel_ksm::{kernel_ksm_writable, ksm_read, KernelKsm};
use common::procs::{daemon_bin, spawn_ready, start_daemon, trace, tree_attr, Kids};
use common::{have_uffd, preload_lib, program, require, tempdir, wait_until};

/// What a program left in the counters once merging settled.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    pages_shared: u64,
    pages_sharing: u64,
    ksm_zero_pages: u64,
}

impl Seen {
    fn read(read: impl Fn(&str) -> u64) -> Seen {
        Seen { pages_shared: read("pages_shared"), pages_sharing: read("pages_sharing"), ksm_zero_pages: read("ksm_zero_pages") }
    }
}

/// Waits for the program's verdict line.
fn finish(mut c: Child, verdict: &str) {
    let mut out = String::new();
    c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = c.wait().unwrap();
    assert!(status.success() && out.contains(verdict), "{out} ({status})");
}

/// `prog args` under kernel KSM (flat out, from `run=2`, with `tunables`):
/// the counters after three more full scans once it printed READY.
fn on_kernel(prog: &Path, args: &[&str], verdict: &str, tunables: &[(&str, &str)]) -> Seen {
    let k = KernelKsm::flat_out();
    for (n, v) in tunables {
        k.set(n, v);
    }
    let c = spawn_ready(Command::new(prog).args(args));
    k.start();
    assert!(k.wait_full_scans(3, Duration::from_secs(30)), "ksmd made no three full scans");
    let seen = Seen::read(ksm_read);
    finish(c, verdict);
    seen
}

/// The same under the preload (flat out, the same tunables as
/// `TWINPAGE_*`), read from its tree.
fn on_twinpage(lib: &Path, prog: &Path, args: &[&str], verdict: &str, tunables: &[(&str, &str)], tag: &str) -> Seen {
    let dir = tempdir(tag);
    let c = spawn_ready(
        Command::new(prog)
            .args(args)
            .envs(tunables.iter().map(|(n, v)| (format!("TWINPAGE_{}", n.to_uppercase()), *v)))
            .env("LD_PRELOAD", lib)
            .env("TWINPAGE_DIR", &dir)
            .env("TWINPAGE_PAGES_TO_SCAN", "100000")
            .env("TWINPAGE_SLEEP_MILLISECS", "0"),
    );
    let from = tree_attr(&dir, "full_scans");
    assert!(wait_until(Duration::from_secs(30), || tree_attr(&dir, "full_scans") >= from + 3), "no three full scans");
    let seen = Seen::read(|n| tree_attr(&dir, n));
    finish(c, verdict);
    let _ = std::fs::remove_dir_all(&dir);
    seen
}

/// The tests compare what a program sees step by step, full scans as the
/// barrier, on both sides: one runs at a time, so that another's scanning
/// (the advisor test scans 60000 pages flat out) does not decide the race.
static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The preload, the program `name`, and this file's turn (held while the
/// guard lives).
fn prerequisites(name: &str) -> Option<(std::path::PathBuf, std::path::PathBuf, std::sync::MutexGuard<'static, ()>)> {
    let one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let (lib, prog) = (preload_lib()?, program(name)?);
    (have_uffd() && require(kernel_ksm_writable(), "root and a writable /sys/kernel/mm/ksm (the oracle)")).then_some((lib, prog, one))
}

/// ksm_functional_tests' test_prctl: after `PR_SET_MEMORY_MERGE`, ten pages
/// of one byte merge into one shared page and nine sharers, and nothing else
/// of the process shows in the counters. twinpage's own thread stacks used
/// to (3 shared, 11 sharing).
#[test]
fn merge_any_counts_only_the_programs_memory() {
    let Some((lib, prog, _one)) = prerequisites("prctl") else { return };
    let args = ["count", "10", "4"];
    let kernel = on_kernel(&prog, &args, "COUNT OK", &[]);
    let twin = on_twinpage(&lib, &prog, &args, "COUNT OK", &[], "oracle-count");
    eprintln!("kernel {kernel:?}, twinpage {twin:?}");
    assert_eq!(kernel, Seen { pages_shared: 1, pages_sharing: 9, ksm_zero_pages: 0 }, "the oracle itself");
    assert_eq!(twin, kernel);
}

/// Zero pages count as the tunable says, on both: with use_zero_pages=0 as
/// KSM pages of zeros (chained at max_page_sharing), with 1 in
/// ksm_zero_pages. twinpage used to count them in ksm_zero_pages always.
#[test]
fn zero_page_counters_follow_use_zero_pages() {
    let Some((lib, prog, _one)) = prerequisites("prctl") else { return };
    let args = ["count", "600", "4", "0"];
    for (i, tunables) in
        [vec![("use_zero_pages", "0")], vec![("use_zero_pages", "1")], vec![("use_zero_pages", "0"), ("max_page_sharing", "16")]]
            .into_iter()
            .enumerate()
    {
        let kernel = on_kernel(&prog, &args, "COUNT OK", &tunables);
        let twin = on_twinpage(&lib, &prog, &args, "COUNT OK", &tunables, &format!("oracle-zero-{i}"));
        eprintln!("{tunables:?}: kernel {kernel:?}, twinpage {twin:?}");
        assert_eq!(twin, kernel, "{tunables:?}");
    }
}

/// A program that drives KSM through its files (tests/programs/ksmfiles.c,
/// the patterns of the kernel's selftests: long-lived fds read with pread,
/// one-byte writes that must fail with the kernel's errno, `run=2` then
/// `run=1` and two full scans as the barrier, stdio for one-off values)
/// prints the same lines on kernel KSM and under the preload with
/// `TWINPAGE_REDIRECT_SYSFS=1`. Before, writes returned at once and were
/// applied 50-200 ms later (bad values too), and reads were as stale.
#[test]
fn ksm_files_answer_as_the_kernels_do() {
    same_lines("ksmfiles", &[], "KSMFILES DONE", "oracle-files", false);
}

/// The same program, merging through twinpaged: `pages_shared` and
/// `pages_sharing` read in-process are the daemon's, asked when read. Before,
/// they read 0 (the engine counted only its own store pages, and under the
/// daemon it has none).
#[test]
fn ksm_files_answer_as_the_kernels_do_under_twinpaged() {
    same_lines("ksmfiles", &[], "KSMFILES DONE", "oracle-files-daemon", true);
}

/// PROT_NONE anonymous memory merges (ksm_merging_pages, shared frames),
/// takes writes through /proc/self/mem, unmerges with MADV_UNMERGEABLE and
/// keeps its content and merging across mprotect to PROT_NONE and back
/// (tests/programs/protnone.c, the steps of the kernel's test_prot_none and
/// more). Before, twinpage never registered PROT_NONE memory: a program
/// waiting for two full scans waited for ever.
#[test]
fn prot_none_memory_merges_as_the_kernels_does() {
    same_lines("protnone", &[], "PROTNONE DONE", "oracle-protnone", false);
}

/// The same program, merging through twinpaged.
#[test]
fn prot_none_memory_merges_as_the_kernels_does_under_twinpaged() {
    same_lines("protnone", &[], "PROTNONE DONE", "oracle-protnone-daemon", true);
}

/// "run=2, mark N pages of one byte mergeable, run=1, wait for two full
/// scans": then every page is merged, chained at max_page_sharing
/// (tests/programs/barrier.c; 300 pages: 2 shared, 298 sharing), PROT_NONE
/// pages and pages a forked child shares or shared too,
/// alone and through twinpaged; a page written with the bytes it holds is
/// merged again two full scans later (before, held back for a second: 63
/// of 64 merging, where the kernel shows 64). Before, the daemon merged only
/// the uploaded page of a batch's duplicates in the scan that found them,
/// the rest a scan later: 1 or 257 of 512 PROT_NONE pages after two scans
/// (2 runs in 3 by hand).
#[test]
fn two_full_scans_after_run_1_merge_every_duplicate_as_the_kernels_do() {
    let args = ["300", "512n", "300n", "512", "512n", "64n", "64f", "64c", "64w", "300w"];
    same_lines("barrier", &args, "BARRIER DONE", "oracle-barrier", false);
    same_lines("barrier", &args, "BARRIER DONE", "oracle-barrier-daemon", true);
}

/// Memory the program registers with its own userfaultfd (QEMU's snapshot
/// and postcopy do) and then makes unmergeable, or unmaps and maps afresh
/// at the same address, does not merge when the userfaultfd lets go
/// (tests/programs/uffdhand.c; kernel: 80 merging, then the 16 pages kept
/// mergeable). Before, twinpage registered again what it had handed over:
/// 80 merged after the close, in both cases.
#[test]
fn memory_made_unmergeable_while_handed_to_a_userfaultfd_stays_unmerged() {
    same_lines("uffdhand", &["unmergeable"], "HAND DONE", "oracle-uffdhand", false);
    same_lines("uffdhand", &["unmapped"], "HAND DONE", "oracle-uffdhand-unmapped", false);
}

/// A forked child's `run=2` has unmerged the parent's pages when its
/// `write(2)` returns, as on the kernel (tests/programs/childstop.c, what
/// ksm_functional_tests' test_fork_global_ksm_zero_pages_count does; kernel:
/// 96 merging and 32 zero pages, then 0 and 0 at once). Before, the parent
/// took the child's write at its publisher's next pass and still showed 96
/// and 32 right after the child exited.
#[test]
fn a_childs_run_2_has_unmerged_the_parent_when_it_returns() {
    same_lines("childstop", &[], "CHILDSTOP DONE", "oracle-childstop", false);
    same_lines("childstop", &[], "CHILDSTOP DONE", "oracle-childstop-daemon", true);
}

/// madvise(MADV_MERGEABLE / MADV_UNMERGEABLE) answers as the kernel's for
/// the arguments programs get wrong or rely on (tests/programs/madvargs.c:
/// zero lengths, unaligned starts, lengths that are not page multiples or
/// overflow, holes, nothing mapped). Before, a zero length was `EINVAL`
/// under twinpage (the kernel: 0).
#[test]
fn madvise_arguments_are_answered_as_the_kernel_answers_them() {
    same_lines("madvargs", &[], "MADVARGS DONE", "oracle-madvargs", false);
}

/// Locked memory (tests/programs/mlock.c), kernel and twinpage printing
/// the same lines: 64 equal pages locked with mlock(2), or under
/// mlockall(MCL_CURRENT | MCL_FUTURE) as QEMU's -overcommit mem-lock=on,
/// all merge, stay locked after a write and after run=2, and the process
/// stays under 64 MiB resident, alone and through twinpaged. Before: with
/// mlock(2) 0 merged (the pin check's scratch mapping was not locked like
/// the memory: UFFDIO_MOVE refused every page); under mlockall 0 merged
/// (each store stretch was faulted in for writing as it was mapped) and
/// about 1 GiB resident (twinpage's own store segment faulted in whole);
/// merged and written pages of an mlock(2)ed range lost the lock. Memory
/// unlocked again (munlock) after merging stays unlocked when it is
/// written ("munlock"); before the preload heard of munlock, the written
/// page's copy was locked again.
#[test]
fn locked_memory_merges_and_stays_locked_as_the_kernels_does() {
    same_lines("mlock", &["mlock"], "MLOCK DONE", "oracle-mlock", false);
    same_lines("mlock", &["mlockall"], "MLOCK DONE", "oracle-mlockall", false);
    same_lines("mlock", &["mlock"], "MLOCK DONE", "oracle-mlock-daemon", true);
    same_lines("mlock", &["mlockall"], "MLOCK DONE", "oracle-mlockall-daemon", true);
    same_lines("mlock", &["munlock"], "MLOCK DONE", "oracle-munlock", false);
}

/// Runs `name args` on kernel KSM and under the preload with
/// `TWINPAGE_REDIRECT_SYSFS=1` (through twinpaged if `daemon`); the two
/// print the same lines, ending `done`.
fn same_lines(name: &str, args: &[&str], done: &str, tag: &str, daemon: bool) {
    let Some((lib, prog, _one)) = prerequisites(name) else { return };
    let bin = if daemon {
        match daemon_bin() {
            Some(b) => Some(b),
            None => return,
        }
    } else {
        None
    };
    let kernel = {
        let _k = KernelKsm::flat_out();
        Command::new(&prog).args(args).output().unwrap()
    };
    let dir = tempdir(tag);
    let _kids = Kids(bin.iter().map(|b| start_daemon(b, &dir, &[], "warn")).collect());
    let twin = Command::new(&prog)
        .args(args)
        .env("LD_PRELOAD", &lib)
        .env("TWINPAGE_REDIRECT_SYSFS", "1")
        .env("TWINPAGE_DIR", &dir)
        .output()
        .unwrap();
    let (k, t) = (String::from_utf8_lossy(&kernel.stdout), String::from_utf8_lossy(&twin.stdout));
    eprintln!("kernel:\n{k}{}\ntwinpage:\n{t}{}", String::from_utf8_lossy(&kernel.stderr), String::from_utf8_lossy(&twin.stderr));
    assert!(kernel.status.success() && k.ends_with(&format!("{done}\n")), "the oracle itself");
    for (a, b) in k.lines().zip(t.lines()) {
        assert_eq!(b, a, "twinpage differs from the kernel");
    }
    assert_eq!(t.lines().count(), k.lines().count());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A unique page counts once, as the kernel counts it: in `pages_unshared`
/// from the visit that put it in an unstable tree until its next visit,
/// else in `pages_volatile`. With smart scan off (every page visited every
/// scan), twin.c's 1000 unique pages and 10 pairs read `pages_shared`,
/// `pages_sharing`, `pages_unshared`, `pages_volatile` (10, 10, 1000, 0) on
/// the kernel, at any moment; alone and through twinpaged the same. Before, alone, the count
/// followed the unstable tree, which each full scan empties: with 100
/// pages a wake it read 100, 500, 900, 300, ... of 1000 (the rest
/// volatile); through twinpaged, the agent counted the pages it had
/// proposed to the daemon's unstable tree as volatile too, while the
/// daemon counted them unshared: (1000, 1000).
#[test]
fn unique_pages_count_once_as_unshared_as_the_kernels_do() {
    let Some((lib, prog, _one)) = prerequisites("twin") else { return };
    let Some(daemon) = daemon_bin() else { return };
    let args = ["7", "1000", "10", "0"];
    // The median of 11 readings 50 ms apart, wakes 50 ms apart: a reading
    // may fall in the middle of a page's way out of a tree and back.
    let settled = |read: &dyn Fn(&str) -> u64| {
        let mut seen: Vec<[u64; 4]> = (0..11)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(50));
                ["pages_shared", "pages_sharing", "pages_unshared", "pages_volatile"].map(read)
            })
            .collect();
        seen.sort_unstable();
        seen[seen.len() / 2]
    };
    let kernel = {
        let k = KernelKsm::flat_out();
        k.set("smart_scan", "0");
        k.set("pages_to_scan", "100");
        k.set("sleep_millisecs", "50");
        let _c = Kids(vec![spawn_ready(Command::new(&prog).args(args))]);
        k.start();
        assert!(k.wait_full_scans(3, Duration::from_secs(30)), "ksmd made no three full scans");
        settled(&ksm_read)
    };
    assert_eq!(kernel, [10, 10, 1000, 0], "the oracle itself");
    for through_daemon in [false, true] {
        let dir = tempdir(if through_daemon { "oracle-unshared-daemon" } else { "oracle-unshared" });
        let mut kids = Kids(if through_daemon { vec![start_daemon(&daemon, &dir, &[], "warn")] } else { vec![] });
        let mut cmd = Command::new(&prog);
        cmd.args(args)
            .env("LD_PRELOAD", &lib)
            .env("TWINPAGE_DIR", &dir)
            .env("TWINPAGE_SMART_SCAN", "0")
            .env("TWINPAGE_PAGES_TO_SCAN", "100")
            .env("TWINPAGE_SLEEP_MILLISECS", "50");
        kids.0.push(spawn_ready(&mut cmd));
        let from = tree_attr(&dir, "full_scans");
        assert!(wait_until(Duration::from_secs(30), || tree_attr(&dir, "full_scans") >= from + 3), "no three full scans");
        let twin = settled(&|n| tree_attr(&dir, n));
        assert_eq!(twin, kernel, "shared, sharing, unshared, volatile; twinpaged: {through_daemon}");
        drop(kids);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The scan-time advisor on both, the same workload (60000 unique pages,
/// which take 2.4 s a scan at the advisor's starting 500 pages per 20 ms,
/// against a 1 s target, capped at 3000 pages): both speed up from 500 and
/// settle at the cap, never above it.
#[test]
fn the_scan_time_advisor_steers_as_the_kernels_does() {
    let Some((lib, prog, _one)) = prerequisites("prctl") else { return };
    let advisor = [("advisor_max_pages_to_scan", "3000"), ("advisor_target_scan_time", "1"), ("sleep_millisecs", "20")];
    let args = ["count", "60000", "35", "-1"];
    let kernel = {
        let k = KernelKsm::flat_out();
        for (n, v) in advisor {
            k.set(n, v);
        }
        k.set("advisor_mode", "scan-time");
        let c = Kids(vec![spawn_ready(Command::new(&prog).args(args).stdout(Stdio::piped()))]);
        k.start();
        let t = trace(30, || ksm_read("pages_to_scan"));
        drop(c);
        t
    };
    let dir = tempdir("oracle-advisor");
    let twin = {
        let mut cmd = Command::new(&prog);
        cmd.args(args).env("LD_PRELOAD", &lib).env("TWINPAGE_DIR", &dir).env("TWINPAGE_ADVISOR_MODE", "scan-time").stdout(Stdio::piped());
        for (n, v) in advisor {
            cmd.env(format!("TWINPAGE_{}", n.to_uppercase()), v);
        }
        let c = Kids(vec![spawn_ready(&mut cmd)]);
        let t = trace(30, || tree_attr(&dir, "pages_to_scan"));
        drop(c);
        t
    };
    eprintln!("pages_to_scan every 0.5 s\nkernel:   {kernel:?}\ntwinpage: {twin:?}");
    for (side, t) in [("kernel", &kernel), ("twinpage", &twin)] {
        assert!(t.iter().all(|&p| p <= 3000), "{side} went past advisor_max_pages_to_scan: {t:?}");
        assert!(t.iter().any(|&p| p > 500), "{side} never sped up: {t:?}");
        assert_eq!(t.last(), Some(&3000), "{side} did not settle at the cap: {t:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
