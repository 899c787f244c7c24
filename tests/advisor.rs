//! The scan-time advisor's CPU cap (`advisor_max_cpu`): with a target scan
//! time the scanner cannot reach within the cap, it scans as fast as the cap
//! allows and no faster. The kernel's arithmetic (which twinpage follows)
//! counts scan time in whole seconds, a shorter scan as one second, so it
//! underestimates the CPU of sub-second scans: the workload is sized for
//! scans of seconds, 1000000 unique pages (4 GiB), `smart_scan=0` (every page
//! hashed every scan), a 1 s target. (With 400000 pages the same settings
//! gave 34% under a cap of 15.) The same run with the cap at 70% shows what
//! the cap holds back.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::procs::{daemon_bin, spawn_ready, trace, tree_attr, tree_counter, Kids};
use common::{have_uffd, preload_lib, program, tempdir, wait_until};
use twinpage::threads::SCAN_THREAD;

/// The scanning thread's CPU percent over 10 s, once the advisor has had
/// five full scans to settle, with `advisor_max_cpu=max_cpu`.
fn scan_cpu_percent(lib: &Path, prog: &Path, max_cpu: u32) -> f64 {
    let dir = tempdir(&format!("advisor-cpu-{max_cpu}"));
    let c = Kids(vec![spawn_ready(
        Command::new(prog)
            .args(["count", "1000000", "60", "-1"])
            .env("LD_PRELOAD", lib)
            .env("TWINPAGE_DIR", &dir)
            .env("TWINPAGE_SMART_SCAN", "0")
            .env("TWINPAGE_SLEEP_MILLISECS", "20")
            .env("TWINPAGE_ADVISOR_MODE", "scan-time")
            .env("TWINPAGE_ADVISOR_TARGET_SCAN_TIME", "1")
            .env("TWINPAGE_ADVISOR_MAX_PAGES_TO_SCAN", "100000")
            // The advisor starts here: a first scan of seconds, not the
            // 40 s the default 500 a wake would take (which made the runs
            // depend on whether the pages were filled before it began).
            .env("TWINPAGE_ADVISOR_MIN_PAGES_TO_SCAN", "20000")
            .env("TWINPAGE_ADVISOR_MAX_CPU", max_cpu.to_string()),
    )]);
    let pid = c.0[0].id();
    assert!(wait_until(Duration::from_secs(90), || tree_attr(&dir, "full_scans") >= 5), "no five full scans");
    let scan_cpu = || twinpage::threads::cpu_ns(&pid.to_string(), &[SCAN_THREAD]).expect("a twinpage-scan thread");
    let (t0, c0) = (Instant::now(), scan_cpu());
    std::thread::sleep(Duration::from_secs(10));
    let ns = scan_cpu() - c0;
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
    ns as f64 / 1e9 / t0.elapsed().as_secs_f64() * 100.0
}

/// The tests measure CPU and scan rates: one at a time.
static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn the_advisor_keeps_the_scanner_within_advisor_max_cpu() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let (Some(lib), Some(prog)) = (preload_lib(), program("prctl")) else { return };
    if !have_uffd() {
        return;
    }
    let capped = scan_cpu_percent(&lib, &prog, 15);
    let loose = scan_cpu_percent(&lib, &prog, 70);
    eprintln!("twinpage-scan CPU: {capped:.1}% with advisor_max_cpu=15, {loose:.1}% with 70");
    // The kernel's arithmetic rounds scan times to whole seconds and plans
    // from the last scan's cost: a few points over the cap on one scan.
    assert!(capped <= 15.0 * 1.4, "advisor_max_cpu=15 did not hold: {capped:.1}%");
    assert!(loose >= capped * 1.3, "the cap held nothing back ({loose:.1}% with 70): the test shows nothing");
}

/// `pages_to_scan` as process `pid` applies it (its twinpage_tunables).
fn own_pages_to_scan(dir: &Path, pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(format!("proc/{pid}/twinpage_tunables"))).ok()?;
    text.lines().find_map(|l| l.strip_prefix("pages_to_scan ")?.trim().parse().ok())
}

/// What the twinpaged tests here run: the preload, the `prctl` program and
/// the daemon (`None`, with the reason printed, when one is missing).
fn daemon_setup() -> Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    let (Some(lib), Some(prog), Some(bin)) = (preload_lib(), program("prctl"), daemon_bin()) else { return None };
    have_uffd().then_some((lib, prog, bin))
}

/// Under twinpaged the advisor steers the one `pages_to_scan` of all its
/// agents: two agents of 60000 unique pages each, a 1 s target and a cap of
/// 3000 pages (the kernel_oracle advisor test's workload, twice): the rate
/// climbs from the advisor's 500 and settles at the cap, never above it,
/// and both agents scan at the daemon's choice. Before, the agents' own
/// advisors stayed out under the daemon and nothing steered.
#[test]
fn twinpaged_steers_its_agents_with_the_advisor() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lib, prog, bin)) = daemon_setup() else { return };
    let dir = tempdir("advisor-daemon");
    let advisor = [
        ("TWINPAGE_SLEEP_MILLISECS", "20"),
        ("TWINPAGE_ADVISOR_MAX_PAGES_TO_SCAN", "3000"),
        ("TWINPAGE_ADVISOR_TARGET_SCAN_TIME", "1"),
        ("TWINPAGE_ADVISOR_MODE", "scan-time"),
    ];
    let mut kids = Kids(Vec::new());
    let mut d = Command::new(&bin);
    d.arg("--dir").arg(&dir).env("TWINPAGE_LOG", "warn").envs(advisor);
    kids.0.push(d.spawn().unwrap());
    assert!(wait_until(Duration::from_secs(10), || dir.join("twinpaged.sock").exists()), "twinpaged did not start");
    for _ in 0..2 {
        kids.0
            .push(spawn_ready(Command::new(&prog).args(["count", "60000", "40", "-1"]).env("LD_PRELOAD", &lib).env("TWINPAGE_DIR", &dir)));
    }
    let (a, b) = (kids.0[1].id(), kids.0[2].id());
    assert!(
        wait_until(Duration::from_secs(10), || tree_counter(&dir, a, "twinpage_daemon_agents") == 1
            && tree_counter(&dir, b, "twinpage_daemon_agents") == 1),
        "the agents did not connect"
    );
    let trace = trace(25, || tree_attr(&dir, "pages_to_scan"));
    let own = (own_pages_to_scan(&dir, a), own_pages_to_scan(&dir, b));
    eprintln!("pages_to_scan every 0.5 s: {trace:?}; the agents apply {own:?}");
    drop(kids);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(trace.iter().all(|&p| p <= 3000), "went past advisor_max_pages_to_scan: {trace:?}");
    assert!(trace.iter().any(|&p| p > 500), "never sped up: {trace:?}");
    assert_eq!(trace.last(), Some(&3000), "did not settle at the cap: {trace:?}");
    assert_eq!(own, (Some(3000), Some(3000)), "the agents do not scan at the daemon's choice");
}

/// The advisor's settings given to a twinpaged that starts after its agents
/// are its agents' too: switching `advisor_mode` to scan-time sets
/// `pages_to_scan` to `advisor_min_pages_to_scan` (the kernel's side
/// effect), and that value, not the one the agents published before the
/// daemon came, is the tree's and theirs. Before, the daemon adopted the
/// tree's 100 (only the variables it was given counted as its own), so
/// its advisor started from 100 pages a wake and took a full scan of
/// 12 s or more to decide anything.
#[test]
fn twinpaged_started_after_its_agents_brings_its_advisor_settings() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lib, prog, bin)) = daemon_setup() else { return };
    let dir = tempdir("advisor-late-daemon");
    let mut kids = Kids(Vec::new());
    for _ in 0..2 {
        kids.0.push(spawn_ready(Command::new(&prog).args(["count", "6000", "40", "-1"]).env("LD_PRELOAD", &lib).env("TWINPAGE_DIR", &dir)));
    }
    let (a, b) = (kids.0[0].id(), kids.0[1].id());
    assert!(
        wait_until(Duration::from_secs(10), || own_pages_to_scan(&dir, a) == Some(100) && own_pages_to_scan(&dir, b) == Some(100)),
        "the agents did not publish their defaults"
    );
    let mut d = Command::new(&bin);
    d.arg("--dir")
        .arg(&dir)
        .env("TWINPAGE_LOG", "warn")
        .env("TWINPAGE_ADVISOR_MODE", "scan-time")
        .env("TWINPAGE_ADVISOR_MIN_PAGES_TO_SCAN", "700")
        .env("TWINPAGE_SLEEP_MILLISECS", "1000");
    kids.0.push(d.spawn().unwrap());
    assert!(
        wait_until(Duration::from_secs(10), || tree_counter(&dir, a, "twinpage_daemon_agents") == 1
            && tree_counter(&dir, b, "twinpage_daemon_agents") == 1),
        "the agents did not connect"
    );
    // Within a few publishing periods (the advisor decides only after a
    // full scan, 6000 pages at 700 a wake of 1 s: not within these 3 s).
    std::thread::sleep(Duration::from_secs(3));
    let seen = (tree_attr(&dir, "pages_to_scan"), own_pages_to_scan(&dir, a), own_pages_to_scan(&dir, b));
    let mode = std::fs::read_to_string(dir.join("kernel/mm/ksm/advisor_mode")).unwrap_or_default();
    drop(kids);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(mode.trim(), "none [scan-time]", "the daemon's advisor_mode is not the tree's");
    assert_eq!(seen, (700, Some(700), Some(700)), "pages_to_scan (tree, agents) is not advisor_min_pages_to_scan");
}
