//! `twinpage bench`: the same workload under kernel KSM and under twinpage,
//! with identical tunables, in one invocation (issue 6).
//!
//! The parent saves the kernel's KSM settings ([`SavedKsm`], restored on
//! drop and on SIGINT/SIGTERM), sets the tunables, and runs each side in a
//! fresh `twinpage bench-worker` process (`worker`); it collects the
//! worker's samples and results and writes `result.json`, `result.md` and
//! `saved.svg` (`report`).

mod daemon;
mod proc;
mod qemu;
mod report;
mod worker;
pub mod workload;

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kernel_compat::sysfs::{KsmSysfs, SavedKsm};

pub use workload::Workload;

/// Which merger a worker runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    /// The kernel's KSM (ksmd).
    Kernel,
    /// A twinpage engine in the worker.
    Twinpage,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Kernel => "kernel",
            Side::Twinpage => "twinpage",
        }
    }
}

/// Options of `twinpage bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// The workload.
    #[arg(long, value_enum, default_value_t = Workload::Scatter)]
    pub workload: Workload,
    /// Memory per side (K, M, G suffixes).
    #[arg(long, default_value = "1G", value_parser = workload::parse_size)]
    pub size: usize,
    /// Percentage of pages that duplicate another (zero: that are zero).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub dup_percent: u32,
    /// Distinct pattern pages (scatter).
    #[arg(long, default_value_t = 64)]
    pub patterns: usize,
    /// Pages per duplicate run (runs, volatile).
    #[arg(long, default_value_t = 64)]
    pub run_pages: usize,
    /// Percentage of pages rewritten all the time (volatile).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub volatile_percent: u32,
    /// pages_to_scan for both sides.
    #[arg(long, default_value_t = 100_000)]
    pub pages_to_scan: u32,
    /// sleep_millisecs for both sides.
    #[arg(long, default_value_t = 0)]
    pub sleep_millisecs: u32,
    /// use_zero_pages for both sides.
    #[arg(long)]
    pub use_zero_pages: bool,
    /// Run both sides with the scan-time advisor on (`advisor_mode=scan-time`),
    /// aiming at full scans of this many seconds: it then chooses
    /// pages_to_scan, starting from advisor_min_pages_to_scan (qemu: under
    /// twinpaged, the daemon's advisor for all guests).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    pub advisor_target_scan_time: Option<u64>,
    /// With --advisor-target-scan-time: advisor_max_cpu (percent) for both sides.
    #[arg(long, requires = "advisor_target_scan_time", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub advisor_max_cpu: Option<u32>,
    /// Raise vm.max_map_count to N for the twinpage side (restored afterwards).
    #[arg(long)]
    pub raise_max_map_count: Option<u64>,
    /// Give up waiting for the achievable sharing after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Merged pages written once each to time the first write.
    #[arg(long, default_value_t = 2000)]
    pub latency_pages: usize,
    /// Memory workloads: after convergence, with the workload stopped, the
    /// merger's CPU over this many seconds (the idle row; 0: skip).
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(0..=3600))]
    pub idle_secs: u64,
    /// Guests for the qemu workload.
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub guests: usize,
    /// qemu workload: each run lasts until every guest has verified its
    /// buffer this many times (its own timing, for the slowdown row).
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub guest_passes: usize,
    /// qemu workload: no twinpaged; each QEMU merges only its own pages.
    #[arg(long)]
    pub no_daemon: bool,
    /// qemu workload: the guest boot script [default: scripts/boot-guest.sh
    /// of the repository the binary was built in, else ./scripts].
    #[arg(long)]
    pub guest_script: Option<PathBuf>,
    /// Run only one side.
    #[arg(long, value_enum)]
    pub only: Option<Side>,
    /// Output directory.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
}

impl BenchArgs {
    /// The workload and the tunables both sides run with, in one line.
    pub(crate) fn settings(&self) -> String {
        format!(
            "workload `{}`, {} MiB, {}% duplicates, pages_to_scan={}, sleep_millisecs={}, use_zero_pages={}",
            self.workload.as_str(),
            self.size >> 20,
            self.dup_percent,
            self.pages_to_scan,
            self.sleep_millisecs,
            u8::from(self.use_zero_pages)
        )
    }
}

/// Options of the hidden `twinpage bench-worker`.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    /// Which merger.
    #[arg(long, value_enum)]
    pub side: Side,
    /// The workload.
    #[arg(long, value_enum)]
    pub workload: Workload,
    /// Bytes.
    #[arg(long)]
    pub size: usize,
    /// As for bench.
    #[arg(long)]
    pub dup_percent: u32,
    /// As for bench.
    #[arg(long)]
    pub patterns: usize,
    /// As for bench.
    #[arg(long)]
    pub run_pages: usize,
    /// As for bench.
    #[arg(long)]
    pub volatile_percent: u32,
    /// As for bench.
    #[arg(long)]
    pub pages_to_scan: u32,
    /// As for bench.
    #[arg(long)]
    pub sleep_millisecs: u32,
    /// As for bench.
    #[arg(long)]
    pub use_zero_pages: bool,
    /// As for bench.
    #[arg(long)]
    pub advisor_target_scan_time: Option<u64>,
    /// As for bench.
    #[arg(long)]
    pub advisor_max_cpu: Option<u32>,
    /// As for bench.
    #[arg(long)]
    pub timeout: u64,
    /// As for bench.
    #[arg(long)]
    pub latency_pages: usize,
    /// As for bench.
    #[arg(long, default_value_t = 0)]
    pub idle_secs: u64,
}

/// The advisor's settings for `--advisor-target-scan-time`, in the order a
/// writer must give them (the bounds before the mode).
pub(crate) fn advisor_settings(a: &BenchArgs) -> Vec<(&'static str, String)> {
    advisor_pairs(a.advisor_target_scan_time, a.advisor_max_cpu)
}

pub(crate) fn advisor_pairs(target: Option<u64>, max_cpu: Option<u32>) -> Vec<(&'static str, String)> {
    let Some(t) = target else { return Vec::new() };
    let mut v = vec![("advisor_target_scan_time", t.to_string())];
    v.extend(max_cpu.map(|m| ("advisor_max_cpu", m.to_string())));
    v.push(("advisor_mode", "scan-time".into()));
    v
}

/// Runs `twinpage bench-worker`.
pub fn worker_main(a: &WorkerArgs) -> i32 {
    worker::run(a)
}

/// What one side measured.
#[derive(Debug, Default, Clone)]
pub struct SideResult {
    /// Which side.
    pub side: &'static str,
    /// (seconds since merging started, pages saved).
    pub samples: Vec<(f64, u64)>,
    /// The achievable sharing, in pages.
    pub expected: u64,
    /// Numeric results by name.
    pub values: BTreeMap<String, f64>,
    /// Whether the timeout ended the run.
    pub timed_out: bool,
    /// `/proc/loadavg` when the side started (the machine is shared).
    pub loadavg: String,
}

/// The first three fields of `/proc/loadavg`.
pub fn loadavg() -> String {
    let t = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    t.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

impl SideResult {
    /// Seconds until `frac` of the achievable sharing was reached.
    pub fn time_to(&self, frac: f64) -> Option<f64> {
        let want = (self.expected as f64 * frac).ceil() as u64;
        self.samples.iter().find(|s| s.1 >= want.max(1)).map(|s| s.0)
    }

    /// The last sample's saving.
    pub fn final_saved(&self) -> u64 {
        self.samples.last().map_or(0, |s| s.1)
    }

    /// A value, or NaN.
    pub fn get(&self, k: &str) -> f64 {
        self.values.get(k).copied().unwrap_or(f64::NAN)
    }
}

struct MaxMapCount {
    old: Option<String>,
}

const MAX_MAP_COUNT: &str = "/proc/sys/vm/max_map_count";

impl MaxMapCount {
    fn raise(n: Option<u64>) -> Result<MaxMapCount, String> {
        let Some(n) = n else { return Ok(MaxMapCount { old: None }) };
        let old = std::fs::read_to_string(MAX_MAP_COUNT).map_err(|e| format!("{MAX_MAP_COUNT}: {e}"))?;
        std::fs::write(MAX_MAP_COUNT, n.to_string()).map_err(|e| format!("{MAX_MAP_COUNT}: {e}"))?;
        Ok(MaxMapCount { old: Some(old.trim().to_string()) })
    }
}

impl Drop for MaxMapCount {
    fn drop(&mut self) {
        if let Some(old) = self.old.take() {
            if let Err(e) = std::fs::write(MAX_MAP_COUNT, &old) {
                eprintln!("twinpage bench: could not restore {MAX_MAP_COUNT}={old}: {e}");
            }
        }
    }
}

fn worker_command(a: &BenchArgs, side: Side) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let mut c = Command::new(exe);
    c.arg("bench-worker")
        .args(["--side", side.as_str(), "--workload", a.workload.as_str()])
        .args(["--size", &a.size.to_string()])
        .args(["--dup-percent", &a.dup_percent.to_string()])
        .args(["--patterns", &a.patterns.to_string()])
        .args(["--run-pages", &a.run_pages.to_string()])
        .args(["--volatile-percent", &a.volatile_percent.to_string()])
        .args(["--pages-to-scan", &a.pages_to_scan.to_string()])
        .args(["--sleep-millisecs", &a.sleep_millisecs.to_string()])
        .args(["--timeout", &a.timeout.to_string()])
        .args(["--latency-pages", &a.latency_pages.to_string()])
        .args(["--idle-secs", &a.idle_secs.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if a.use_zero_pages {
        c.arg("--use-zero-pages");
    }
    if let Some(t) = a.advisor_target_scan_time {
        c.args(["--advisor-target-scan-time", &t.to_string()]);
    }
    if let Some(m) = a.advisor_max_cpu {
        c.args(["--advisor-max-cpu", &m.to_string()]);
    }
    // The worker must not publish a stats tree or be preloaded.
    c.env_remove("LD_PRELOAD");
    c
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs one side; `Err` on interruption or worker failure.
fn run_side(a: &BenchArgs, side: Side) -> Result<SideResult, String> {
    let mut child = worker_command(a, side).spawn().map_err(|e| format!("spawn worker: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut r = SideResult { side: side.as_str(), loadavg: loadavg(), ..SideResult::default() };
    let mut last_print = Instant::now();
    let mut done = false;
    loop {
        if twinpage::sys::signals::interrupted() {
            kill(&mut child);
            return Err("interrupted".into());
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let mut w = line.split_whitespace();
                match (w.next(), w.next(), w.next()) {
                    (Some("s"), Some(t), Some(v)) => {
                        let t = t.parse::<f64>().unwrap_or(0.0) / 1000.0;
                        let v = v.parse().unwrap_or(0);
                        r.samples.push((t, v));
                        if last_print.elapsed() >= Duration::from_secs(1) {
                            last_print = Instant::now();
                            println!(
                                "  {:>8} {t:7.2} s  sharing {v:>9} / {} pages ({:5.1}%)",
                                side.as_str(),
                                r.expected,
                                100.0 * v as f64 / r.expected.max(1) as f64
                            );
                        }
                    }
                    (Some("info"), Some("expected_pages"), Some(v)) => r.expected = v.parse().unwrap_or(0),
                    (Some("info"), Some("timed_out"), _) => r.timed_out = true,
                    (Some("info"), Some("started"), _) => println!("  {:>8} merging started", side.as_str()),
                    (Some("r"), Some(k), Some(v)) => {
                        r.values.insert(k.to_string(), v.parse().unwrap_or(f64::NAN));
                    }
                    (Some("done"), _, _) => done = true,
                    _ => {}
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = reader.join();
    let status = child.wait().map_err(|e| format!("wait worker: {e}"))?;
    if !done || !status.success() {
        return Err(format!("{} worker failed ({status})", side.as_str()));
    }
    Ok(r)
}

fn unmerge_and_stop(k: &KsmSysfs) {
    if k.read_u64("pages_shared").unwrap_or(0) > 0 || k.read_u64("ksm_zero_pages").unwrap_or(0) > 0 {
        let _ = k.write("run", "2");
        let deadline = Instant::now() + Duration::from_secs(60);
        while k.read_u64("pages_shared").unwrap_or(0) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = k.write("run", "0");
}

/// Runs `twinpage bench`; returns the exit status.
pub fn main(a: &BenchArgs) -> i32 {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("twinpage bench: must run as root (kernel KSM settings, /dev/userfaultfd, ksmd's CPU time)");
        return 1;
    }
    let k = KsmSysfs::kernel();
    if !k.exists() || !k.is_writable() {
        eprintln!("twinpage bench: {} is missing or not writable", k.root().display());
        return 1;
    }
    if let Err(e) = std::fs::create_dir_all(&a.out) {
        eprintln!("twinpage bench: {}: {e}", a.out.display());
        return 1;
    }
    twinpage::sys::signals::install_handlers();
    let saved = match k.save() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("twinpage bench: cannot save kernel KSM settings: {e}");
            return 1;
        }
    };
    let code = run_both(a, &saved);
    unmerge_and_stop(&saved);
    match saved.finish() {
        Ok(()) => println!("kernel KSM settings restored"),
        Err(e) => {
            eprintln!("twinpage bench: restoring kernel KSM settings: {e}");
            return 1;
        }
    }
    if twinpage::sys::signals::interrupted() {
        eprintln!("twinpage bench: interrupted");
        return 130;
    }
    code
}

fn run_both(a: &BenchArgs, k: &SavedKsm) -> i32 {
    println!("twinpage bench: {}", a.settings());
    let mut results = Vec::new();
    let sides: &[Side] = match a.only {
        Some(Side::Kernel) => &[Side::Kernel],
        Some(Side::Twinpage) => &[Side::Twinpage],
        None => &[Side::Kernel, Side::Twinpage],
    };
    // The qemu workload's slowdown baseline: the same guests, nothing merging.
    let mut alone_ms = None;
    if a.workload == Workload::Qemu {
        unmerge_and_stop(k);
        println!("no merging (baseline for the guests' own timing):");
        match qemu::preflight(a, sides.contains(&Side::Twinpage)).and_then(|()| qemu::run_baseline(a)) {
            Ok(ms) => alone_ms = Some(ms),
            Err(e) => {
                if !twinpage::sys::signals::interrupted() {
                    eprintln!("twinpage bench: {e}");
                }
                return 1;
            }
        }
    }
    for &side in sides {
        unmerge_and_stop(k);
        let r = match side {
            Side::Kernel => {
                let set = |n: &str, v: String| k.write(n, v).map_err(|e| format!("kernel {n}: {e}"));
                // The kernel refuses pages_to_scan while the advisor is on.
                let setup = set("advisor_mode", "none".into())
                    .and_then(|_| set("pages_to_scan", a.pages_to_scan.to_string()))
                    .and_then(|_| set("sleep_millisecs", a.sleep_millisecs.to_string()))
                    .and_then(|_| set("use_zero_pages", u8::from(a.use_zero_pages).to_string()))
                    .and_then(|_| advisor_settings(a).into_iter().try_for_each(|(n, v)| set(n, v)))
                    .and_then(|_| set("run", "1".into()));
                setup.and_then(|_| {
                    println!("kernel KSM:");
                    if a.workload == Workload::Qemu {
                        qemu::run_side(a, side, None)
                    } else {
                        run_side(a, side)
                    }
                })
            }
            Side::Twinpage => match MaxMapCount::raise(a.raise_max_map_count) {
                Err(e) => Err(e),
                Ok(_guard) => {
                    println!("twinpage:");
                    if a.workload == Workload::Qemu {
                        let target = results.iter().find(|r: &&SideResult| r.side == "kernel").map(|r| r.expected);
                        qemu::run_side(a, side, target)
                    } else {
                        run_side(a, side)
                    }
                }
            },
        };
        match r {
            Ok(mut r) => {
                if let Some(ms) = alone_ms {
                    r.values.insert("guest_verify_ms_alone".into(), ms);
                }
                results.push(r)
            }
            Err(e) => {
                if !twinpage::sys::signals::interrupted() {
                    eprintln!("twinpage bench: {e}");
                }
                return 1;
            }
        }
    }
    unmerge_and_stop(k);
    let rep = report::Report { args: a, sides: &results };
    let md = rep.markdown();
    for (name, text) in [("result.json", rep.json()), ("result.md", md.clone()), ("saved.svg", rep.svg())] {
        let p = a.out.join(name);
        if let Err(e) = std::fs::write(&p, text) {
            eprintln!("twinpage bench: {}: {e}", p.display());
            return 1;
        }
    }
    println!();
    print!("{md}");
    println!("\nwrote {}/result.json, result.md, saved.svg", a.out.display());
    0
}
