//! The `qemu` workload: `--guests` TCG guests booted from the same image
//! (`scripts/boot-guest.sh`), under kernel KSM (QEMU marks guest RAM
//! `MADV_MERGEABLE` itself) or with `libtwinpage.so` preloaded. The
//! achievable sharing is not known in advance: the kernel side runs until
//! its saving plateaus, and that steady state is the target for twinpage.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kernel_compat::sysfs::KsmSysfs;

use super::proc;
use super::{BenchArgs, Side, SideResult};

const BOOT_GUEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/boot-guest.sh");

fn tree_u64(root: &Path, name: &str) -> u64 {
    fs::read_to_string(root.join("kernel/mm/ksm").join(name))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn tree_stat(root: &Path, name: &str) -> Option<f64> {
    fs::read_to_string(root.join("twinpage/stats")).ok()?.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some(name)).then(|| w.next()?.parse().ok()).flatten()
    })
}

fn pid_pss_kb(pid: u32) -> u64 {
    let t = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    t.lines()
        .find_map(|l| l.strip_prefix("Pss:").and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0)
}

fn stop_all(guests: &mut [Child]) {
    for g in guests.iter_mut() {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's (not yet reaped).
        unsafe { libc::kill(g.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for g in guests.iter_mut() {
        while Instant::now() < deadline && matches!(g.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = g.kill();
        let _ = g.wait();
    }
}

/// Runs one side of the qemu workload. `target` is the kernel's steady-state
/// saving (for the twinpage side).
pub fn run_side(a: &BenchArgs, side: Side, target: Option<u64>) -> Result<SideResult, String> {
    let mem_mib = (a.size >> 20).max(64);
    let buf_mib = (mem_mib / 4).max(16);
    let tree: PathBuf = a.out.join("twinpage-tree");
    let _ = fs::remove_dir_all(&tree);
    let preload = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("libtwinpage.so")))
        .filter(|p| p.exists())
        .ok_or("libtwinpage.so not found beside the twinpage binary (cargo build --release --workspace)")?;
    let k = KsmSysfs::kernel();
    let base = k.read_u64("pages_sharing").unwrap_or(0) + k.read_u64("ksm_zero_pages").unwrap_or(0);
    let cpu0 = proc::kthread_cpu("ksmd");
    let mut guests = Vec::new();
    let start = Instant::now();
    for i in 0..a.guests {
        let log = fs::File::create(a.out.join(format!("qemu-{}-{i}.log", side.as_str()))).map_err(|e| e.to_string())?;
        let mut c = Command::new(BOOT_GUEST);
        c.args([
            format!("tp.mib={buf_mib}"),
            format!("tp.dup={}", a.dup_percent),
            format!("tp.patterns={}", a.patterns),
            "tp.wait=1000000".into(),
            "tp.rewrite=0".into(),
        ])
        .args(["-m", &format!("{mem_mib}M")])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .env_remove("LD_PRELOAD");
        if side == Side::Twinpage {
            c.env("LD_PRELOAD", &preload)
                .env("TWINPAGE_DIR", &tree)
                .env("TWINPAGE_PAGES_TO_SCAN", a.pages_to_scan.to_string())
                .env("TWINPAGE_SLEEP_MILLISECS", a.sleep_millisecs.to_string())
                .env("TWINPAGE_USE_ZERO_PAGES", u8::from(a.use_zero_pages).to_string());
        }
        match c.spawn() {
            Ok(ch) => guests.push(ch),
            Err(e) => {
                stop_all(&mut guests);
                return Err(format!("{BOOT_GUEST}: {e}"));
            }
        }
    }
    println!("  {:>8} {} guests booting ({mem_mib} MiB RAM, {buf_mib} MiB guest buffer each)", side.as_str(), a.guests);
    let mut r = SideResult { side: side.as_str(), expected: target.unwrap_or(0), ..SideResult::default() };
    let read = || match side {
        Side::Kernel => {
            let s = (k.read_u64("pages_sharing").unwrap_or(0) + k.read_u64("ksm_zero_pages").unwrap_or(0)).saturating_sub(base);
            (s, k.read_u64("full_scans").unwrap_or(0))
        }
        Side::Twinpage => (tree_u64(&tree, "pages_sharing") + tree_u64(&tree, "ksm_zero_pages"), tree_u64(&tree, "full_scans")),
    };
    let timeout = Duration::from_secs(a.timeout);
    let (mut last, mut last_scan, mut last_at) = (u64::MAX, 0, Instant::now());
    let mut last_print = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if crate::sys::signals::interrupted() {
            stop_all(&mut guests);
            return Err("interrupted".into());
        }
        if let Some(pid) = guests.iter_mut().find_map(|g| (!matches!(g.try_wait(), Ok(None))).then(|| g.id())) {
            stop_all(&mut guests);
            return Err(format!("guest (pid {pid}) exited early; see {}/qemu-{}-*.log", a.out.display(), side.as_str()));
        }
        let (saved, scans) = read();
        let t = start.elapsed();
        r.samples.push((t.as_secs_f64(), saved));
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            println!("  {:>8} {:7.2} s  sharing {saved:>9} pages, full_scans {scans}", side.as_str(), t.as_secs_f64());
        }
        if target.is_some_and(|x| saved >= x && x > 0) {
            break;
        }
        if saved != last {
            (last, last_scan, last_at) = (saved, scans, Instant::now());
        } else if saved > 0 && scans >= last_scan + 3 && last_at.elapsed() > Duration::from_secs(5) {
            break;
        }
        if t > timeout {
            r.timed_out = true;
            break;
        }
    }
    let converge = start.elapsed().as_secs_f64();
    let cpu = match side {
        Side::Kernel => proc::kthread_cpu("ksmd") - cpu0,
        Side::Twinpage => guests.iter().map(|g| proc::pid_threads_cpu(g.id(), &["twinpage-scan", "twinpage-fault"])).sum(),
    };
    let pss: u64 = guests.iter().map(|g| pid_pss_kb(g.id())).sum();
    let v = &mut r.values;
    v.insert("converge_s".into(), converge);
    v.insert("cpu_s".into(), cpu);
    v.insert("qemu_pss_total_kb".into(), pss as f64);
    match side {
        Side::Kernel => {
            v.insert("pages_shared".into(), k.read_u64("pages_shared").unwrap_or(0) as f64);
            v.insert("pages_sharing".into(), k.read_u64("pages_sharing").unwrap_or(0) as f64);
            v.insert("ksm_zero_pages".into(), k.read_u64("ksm_zero_pages").unwrap_or(0) as f64);
            v.insert("metadata_bytes_per_page".into(), 64.0);
            v.insert("mappings_added".into(), 0.0);
            v.insert("merges_held_back".into(), 0.0);
        }
        Side::Twinpage => {
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
        r.expected = r.final_saved();
    }
    stop_all(&mut guests);
    Ok(r)
}
