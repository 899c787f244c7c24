//! The `qemu` workload: `--guests` TCG guests booted from the same image
//! (`scripts/boot-guest.sh`), under kernel KSM (QEMU marks guest RAM
//! `MADV_MERGEABLE` itself) or with `libtwinpage.so` preloaded, by default
//! under a private `twinpaged` so pages merge across the guests as under
//! the kernel (`--no-daemon`: each QEMU merges only its own pages). The
//! achievable sharing is not known in advance: the kernel side runs until
//! its saving plateaus, and that steady state is the target for twinpage.
//!
//! The guests verify their buffer once a second and print how long each
//! pass took (`TP-INFO verify round=N ms=X`): the median pass while a side
//! runs, against the median of a first run with no merging at all, is the
//! workload's slowdown.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kernel_compat::sysfs::KsmSysfs;

use super::daemon::{Daemon, TempDir};
use super::proc;
use super::{BenchArgs, Side, SideResult};

/// What runs the guests: nothing (the baseline), or one side.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// No merging (kernel KSM `run=0`, no preload): the slowdown baseline.
    Alone,
    /// One of the compared sides.
    Side(Side),
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Alone => "alone",
            Mode::Side(s) => s.as_str(),
        }
    }
}

/// After the twinpage side reaches its target it runs this much longer, as
/// the kernel side runs on until its plateau is established: both windows
/// of guest timing then include steady-state scanning.
const HOLD: Duration = Duration::from_secs(5);

const GUEST_SCRIPT: &str = "scripts/boot-guest.sh";

/// Where `scripts/boot-guest.sh` is: `--guest-script`, else the repository
/// the executable was built in (`target/release/../../scripts`), else
/// `./scripts`.
pub fn find_guest_script(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return if p.is_file() { Ok(p.to_path_buf()) } else { Err(format!("--guest-script {}: no such file", p.display())) };
    }
    let mut tried = Vec::new();
    if let Some(repo) = std::env::current_exe().ok().and_then(|e| Some(e.parent()?.parent()?.parent()?.to_path_buf())) {
        tried.push(repo.join(GUEST_SCRIPT));
    }
    tried.push(PathBuf::from(".").join(GUEST_SCRIPT));
    if let Some(p) = tried.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let names: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(format!("{GUEST_SCRIPT} not found (tried {}); give --guest-script PATH", names.join(", ")))
}

/// A file beside the running executable (`libtwinpage.so`, `twinpaged`).
fn beside_exe(name: &str) -> Result<PathBuf, String> {
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join(name)))
        .filter(|p| p.exists())
        .ok_or_else(|| format!("{name} not found beside the twinpage binary (cargo build --release --workspace)"))
}

fn tree_u64(root: &Path, name: &str) -> u64 {
    read_u64(&root.join("kernel/mm/ksm").join(name))
}

fn read_u64(p: &Path) -> u64 {
    fs::read_to_string(p).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn tree_stat(root: &Path, name: &str) -> Option<f64> {
    fs::read_to_string(root.join("twinpage/stats")).ok()?.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some(name)).then(|| w.next()?.parse().ok()).flatten()
    })
}

fn pid_pss_kb(pid: u32) -> u64 {
    let t = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    t.lines().find_map(|l| l.strip_prefix("Pss:").and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())).unwrap_or(0)
}

/// The running guests, stopped (SIGTERM, then SIGKILL) and reaped on drop.
struct Guests(Vec<Child>);

impl Guests {
    fn stop(&mut self) {
        for g in &self.0 {
            // Our child's pid, not yet reaped: it cannot name another process.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(g.id() as i32), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for g in &mut self.0 {
            while Instant::now() < deadline && matches!(g.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = g.kill();
            let _ = g.wait();
        }
        self.0.clear();
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a guest's console said so far.
#[derive(Default)]
struct Console {
    verify_ms: Vec<f64>,
    failures: u32,
}

fn console(log: &Path) -> Console {
    let text = fs::read_to_string(log).unwrap_or_default();
    let mut c = Console::default();
    for l in text.lines() {
        let l = l.trim_end_matches('\r');
        if let Some(rest) = l.strip_prefix("TP-INFO verify ") {
            if let Some(ms) = rest.split_whitespace().find_map(|w| w.strip_prefix("ms=")?.parse().ok()) {
                c.verify_ms.push(ms);
            }
        } else if l.starts_with("TP-VERDICT FAIL") || l.starts_with("TP-BAD") {
            c.failures += 1;
        }
    }
    c
}

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Finds what the runs will need before any guest boots, so a missing file
/// fails the bench at once rather than after the kernel side.
pub fn preflight(a: &BenchArgs, twinpage: bool) -> Result<(), String> {
    find_guest_script(a.guest_script.as_deref())?;
    if twinpage {
        beside_exe("libtwinpage.so")?;
        if !a.no_daemon {
            beside_exe("twinpaged")?;
        }
    }
    Ok(())
}

/// The guests' median verify pass (ms) with nothing merging.
pub fn run_baseline(a: &BenchArgs) -> Result<f64, String> {
    let r = run(a, Mode::Alone, None)?;
    Ok(r.get("guest_verify_ms"))
}

/// Runs one side of the qemu workload. `target` is the kernel's steady-state
/// saving (for the twinpage side).
pub fn run_side(a: &BenchArgs, side: Side, target: Option<u64>) -> Result<SideResult, String> {
    run(a, Mode::Side(side), target)
}

/// The `TWINPAGE_*` variables that give a guest's preload `tunables`
/// (written to sysfs in that order). With the advisor on, pages_to_scan is
/// the advisor's: the preload refuses that variable then, as sysfs refuses
/// the write, and the guest would run without twinpage.
fn tunable_env(tunables: &[(&str, String)]) -> Vec<(String, String)> {
    let advised = tunables.iter().any(|(n, v)| *n == "advisor_mode" && v != "none");
    tunables
        .iter()
        .filter(|(n, _)| !(advised && *n == "pages_to_scan"))
        .map(|(n, v)| (format!("TWINPAGE_{}", n.to_uppercase()), v.clone()))
        .collect()
}

fn run(a: &BenchArgs, mode: Mode, target: Option<u64>) -> Result<SideResult, String> {
    let script = find_guest_script(a.guest_script.as_deref())?;
    let mem_mib = (a.size >> 20).max(64);
    let buf_mib = (mem_mib / 4).max(16);
    let twinpage = mode == Mode::Side(Side::Twinpage);
    let daemon_mode = twinpage && !a.no_daemon;
    let preload = if twinpage { Some(beside_exe("libtwinpage.so")?) } else { None };
    let daemon_exe = if daemon_mode { Some(beside_exe("twinpaged")?) } else { None };
    // Declared before the daemon and the guests, so removed after them.
    let tmp = TempDir::new(mode.as_str())?;
    let tree = tmp.0.join("tree");
    let mut tunables = vec![
        ("pages_to_scan", a.pages_to_scan.to_string()),
        ("sleep_millisecs", a.sleep_millisecs.to_string()),
        ("use_zero_pages", u8::from(a.use_zero_pages).to_string()),
    ];
    tunables.extend(super::advisor_settings(a));
    let daemon = match &daemon_exe {
        Some(exe) => {
            let d = Daemon::start(exe, &tree, &a.out.join("twinpaged.log"), &tunables)?;
            println!("  {:>8} twinpaged (pid {}) on {}", mode.as_str(), d.pid(), tree.join("twinpaged.sock").display());
            Some(d)
        }
        None => None,
    };
    let k = KsmSysfs::kernel();
    let base = k.read_u64("pages_sharing").unwrap_or(0) + k.read_u64("ksm_zero_pages").unwrap_or(0);
    let cpu0 = proc::kthread_cpu("ksmd");
    let mut guests = Guests(Vec::new());
    let logs: Vec<PathBuf> = (0..a.guests).map(|i| a.out.join(format!("qemu-{}-{i}.log", mode.as_str()))).collect();
    let start = Instant::now();
    for log in &logs {
        let log = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut c = Command::new(&script);
        // The guest verifies 1 s after filling its buffer, then every second,
        // without rewriting anything (the achievable sharing stays put).
        c.args([
            format!("tp.mib={buf_mib}"),
            format!("tp.dup={}", a.dup_percent),
            format!("tp.patterns={}", a.patterns),
            "tp.wait=1".into(),
            "tp.rewrite=0".into(),
            "tp.settle=1".into(),
            "tp.loop=1".into(),
            "tp.interval=1".into(),
            "tp.looprewrite=0".into(),
        ])
        .args(["-m", &format!("{mem_mib}M")])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .env_remove("LD_PRELOAD");
        if let Some(preload) = &preload {
            c.env("LD_PRELOAD", preload).env("TWINPAGE_DIR", &tree).envs(tunable_env(&tunables));
            if daemon_mode {
                c.env_remove("TWINPAGE_SOCKET");
            } else {
                c.env("TWINPAGE_SOCKET", "off");
            }
        }
        guests.0.push(c.spawn().map_err(|e| format!("{}: {e}", script.display()))?);
    }
    println!(
        "  {:>8} {} guests booting ({mem_mib} MiB RAM, {buf_mib} MiB guest buffer each{})",
        mode.as_str(),
        a.guests,
        if daemon_mode {
            ", merging through twinpaged"
        } else if twinpage {
            ", each merging alone (--no-daemon)"
        } else {
            ""
        }
    );
    let mut r = SideResult { side: mode.as_str(), expected: target.unwrap_or(0), ..SideResult::default() };
    r.loadavg = super::loadavg();
    let read = || match mode {
        Mode::Alone => (0, 0),
        Mode::Side(Side::Kernel) => {
            let s = (k.read_u64("pages_sharing").unwrap_or(0) + k.read_u64("ksm_zero_pages").unwrap_or(0)).saturating_sub(base);
            (s, k.read_u64("full_scans").unwrap_or(0))
        }
        Mode::Side(Side::Twinpage) => (tree_u64(&tree, "pages_sharing") + tree_u64(&tree, "ksm_zero_pages"), tree_u64(&tree, "full_scans")),
    };
    let timeout = Duration::from_secs(a.timeout);
    // The saving has settled when it stayed within a small tolerance (guest
    // kernels keep changing a few pages) for 5 s and 3 full scans.
    let (mut last, mut last_scan, mut last_at) = (u64::MAX, 0, Duration::ZERO);
    let mut settled: Option<(Duration, u64)> = None;
    let mut reached: Option<Duration> = None;
    // When every guest had filled its buffer (TP-READY): boot time varies
    // with the machine's load, so times are also shown from here.
    let mut ready_at: Option<Duration> = None;
    let mut last_print = Instant::now();
    let enough_passes = || logs.iter().all(|l| console(l).verify_ms.len() >= a.guest_passes);
    let converge = loop {
        std::thread::sleep(Duration::from_millis(50));
        if twinpage::sys::signals::interrupted() {
            return Err("interrupted".into());
        }
        if let Some(pid) = guests.0.iter_mut().find_map(|g| (!matches!(g.try_wait(), Ok(None))).then(|| g.id())) {
            return Err(format!("guest (pid {pid}) exited early; see {}/qemu-{}-*.log", a.out.display(), mode.as_str()));
        }
        let (saved, scans) = read();
        let t = start.elapsed();
        if ready_at.is_none() && logs.iter().all(|l| fs::read_to_string(l).is_ok_and(|t| t.contains("TP-READY"))) {
            ready_at = Some(t);
        }
        if mode != Mode::Alone {
            r.samples.push((t.as_secs_f64(), saved));
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let passes: Vec<usize> = logs.iter().map(|l| console(l).verify_ms.len()).collect();
            let counters = if mode == Mode::Alone { String::new() } else { format!("sharing {saved:>9} pages, full_scans {scans}, ") };
            println!("  {:>8} {:7.2} s  {counters}guest verify passes {passes:?}", mode.as_str(), t.as_secs_f64());
        }
        if t > timeout {
            r.timed_out = true;
            break settled.map_or(t, |s| s.0);
        }
        let done = match mode {
            Mode::Alone => Some(t),
            Mode::Side(_) => {
                if reached.is_none() && target.is_some_and(|x| saved >= x && x > 0) {
                    reached = Some(t);
                }
                if let Some(at) = reached {
                    (t >= at + HOLD).then_some(at)
                } else {
                    let tolerance = (last / 500).max(8);
                    if last == u64::MAX || saved.abs_diff(last) > tolerance {
                        (last, last_scan, last_at) = (saved, scans, t);
                        settled = None;
                    } else if settled.is_none() && saved > 0 && scans >= last_scan + 3 && t > last_at + Duration::from_secs(5) {
                        settled = Some((last_at, last));
                    }
                    settled.map(|s| s.0)
                }
            }
        };
        if let Some(at) = done {
            if enough_passes() {
                break at;
            }
        }
    };
    let cpu = match mode {
        Mode::Alone => 0.0,
        Mode::Side(Side::Kernel) => proc::kthread_cpu("ksmd") - cpu0,
        Mode::Side(Side::Twinpage) => guests.0.iter().map(|g| proc::pid_threads_cpu(g.id(), &["twinpage-scan", "twinpage-fault"])).sum(),
    };
    let daemon_cpu = daemon.as_ref().map(Daemon::cpu_s);
    let v = &mut r.values;
    v.insert("converge_s".into(), converge.as_secs_f64());
    v.insert("run_s".into(), start.elapsed().as_secs_f64());
    if let Some(at) = ready_at {
        v.insert("guests_ready_s".into(), at.as_secs_f64());
    }
    v.insert("cpu_s".into(), cpu + daemon_cpu.unwrap_or(0.0));
    if let Some(d) = daemon_cpu {
        v.insert("daemon_cpu_s".into(), d);
    }
    let mut pss_total = 0;
    for (i, g) in guests.0.iter().enumerate() {
        let pid = g.id();
        let pss = pid_pss_kb(pid);
        pss_total += pss;
        v.insert(format!("guest{i}_pss_kb"), pss as f64);
        let merging = match mode {
            Mode::Side(Side::Twinpage) => tree.join(format!("proc/{pid}/ksm_merging_pages")),
            _ => PathBuf::from(format!("/proc/{pid}/ksm_merging_pages")),
        };
        v.insert(format!("guest{i}_ksm_merging_pages"), read_u64(&merging) as f64);
    }
    v.insert("qemu_pss_total_kb".into(), pss_total as f64);
    let consoles: Vec<Console> = logs.iter().map(|l| console(l)).collect();
    let all_ms: Vec<f64> = consoles.iter().flat_map(|c| c.verify_ms.iter().copied()).collect();
    v.insert("guest_verify_ms".into(), median(&all_ms));
    v.insert("guest_verify_passes".into(), all_ms.len() as f64);
    v.insert("guest_failures".into(), consoles.iter().map(|c| c.failures).sum::<u32>() as f64);
    match mode {
        Mode::Alone => {}
        Mode::Side(Side::Kernel) => {
            v.insert("pages_shared".into(), k.read_u64("pages_shared").unwrap_or(0) as f64);
            v.insert("pages_sharing".into(), k.read_u64("pages_sharing").unwrap_or(0) as f64);
            v.insert("ksm_zero_pages".into(), k.read_u64("ksm_zero_pages").unwrap_or(0) as f64);
            v.insert("metadata_bytes_per_page".into(), 64.0);
            v.insert("mappings_added".into(), 0.0);
            v.insert("merges_held_back".into(), 0.0);
        }
        Mode::Side(Side::Twinpage) => {
            for n in ["pages_shared", "pages_sharing", "ksm_zero_pages"] {
                v.insert(n.into(), tree_u64(&tree, n) as f64);
            }
            let meta = tree_stat(&tree, "twinpage_metadata_bytes").unwrap_or(f64::NAN);
            let reg = tree_stat(&tree, "twinpage_pages_registered").unwrap_or(f64::NAN);
            v.insert("metadata_bytes_per_page".into(), meta / reg.max(1.0));
            for (n, key) in [("twinpage_mappings_added", "mappings_added"), ("twinpage_merges_held_back", "merges_held_back")] {
                v.insert(key.into(), tree_stat(&tree, n).unwrap_or(f64::NAN));
            }
        }
    }
    if target.is_none() {
        // The steady state this side settled at (or what it reached).
        r.expected = settled.map_or_else(|| r.final_saved(), |s| s.1);
    }
    let failures = consoles.iter().map(|c| c.failures).sum::<u32>();
    guests.stop();
    drop(daemon);
    if failures > 0 {
        return Err(format!(
            "a guest found wrong data in its memory ({failures} TP-BAD/TP-VERDICT FAIL lines); see {}/qemu-{}-*.log",
            a.out.display(),
            mode.as_str()
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_console() {
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let dir = TempDir::new("console-test").unwrap();
        let log = dir.0.join("c.log");
        fs::write(&log, "TP-READY pages=1\r\nTP-INFO verify round=1 ms=26 uptime=4.95\r\nTP-INFO pages=3 fill_ms=9\r\nTP-INFO verify round=2 ms=30 uptime=6\r\nTP-BAD round=3 page=1\r\n").unwrap();
        let c = console(&log);
        assert_eq!(c.verify_ms, vec![26.0, 30.0]);
        assert_eq!(c.failures, 1);
    }

    /// The preload takes what the bench gives a guest, the advisor on or
    /// off. Before, with `--advisor-target-scan-time` it got
    /// `TWINPAGE_PAGES_TO_SCAN` as well, refused it and ran the guests
    /// without twinpage (the qemu row merged nothing).
    #[test]
    fn the_preload_takes_the_guests_tunables() {
        let plain = [("pages_to_scan", "100000".to_string()), ("sleep_millisecs", "20".into()), ("use_zero_pages", "0".into())];
        let mut advised = plain.to_vec();
        advised.extend(super::super::advisor_pairs(Some(1), Some(30)));
        for tunables in [&plain[..], &advised[..]] {
            let env = tunable_env(tunables);
            let c = twinpage::envconfig::from_vars(env.clone()).unwrap_or_else(|e| panic!("{env:?}: {e}"));
            assert_eq!(c.tunables.len(), env.len());
        }
        assert!(tunable_env(&plain).iter().any(|(k, _)| k == "TWINPAGE_PAGES_TO_SCAN"));
    }

    #[test]
    fn guest_script_lookup_names_what_it_tried() {
        let e = find_guest_script(Some(Path::new("/nonexistent/boot.sh"))).unwrap_err();
        assert!(e.contains("/nonexistent/boot.sh"), "{e}");
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join(GUEST_SCRIPT);
        assert_eq!(find_guest_script(Some(&here)).unwrap(), here);
    }
}
