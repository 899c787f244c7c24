//! `twinpage bench` (the built binary) against the real kernel KSM: a small
//! run writes result.json (valid JSON), result.md and saved.svg, and the
//! kernel's KSM settings are as before afterwards — also when the run is
//! interrupted with SIGINT or SIGTERM. The qemu workload's twinpage side
//! runs under a private twinpaged, which is gone afterwards, also after
//! SIGINT.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kernel_compat::sysfs::KsmSysfs;
use kernel_compat::testutil::{kernel_ksm_writable, require_or_skip, sysfs_lock};

fn prerequisites() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    require_or_skip(
        root && kernel_ksm_writable() && std::path::Path::new("/dev/userfaultfd").exists(),
        "root, a writable /sys/kernel/mm/ksm and /dev/userfaultfd",
    )
}

fn out_dir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("twinpage-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// `twinpage bench ARGS --out OUT`, which must succeed; its stdout.
fn bench(out: &Path, args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_twinpage")).arg("bench").args(args).arg("--out").arg(out).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    println!("{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "bench failed: {}", o.status);
    stdout
}

#[test]
fn small_run_writes_outputs_and_restores_settings() {
    if !prerequisites() {
        return;
    }
    let _lock = sysfs_lock();
    let k = KsmSysfs::kernel();
    let before = k.snapshot().unwrap();
    let out = out_dir("small");
    let started = Instant::now();
    let stdout = bench(&out, &["--workload", "runs", "--size", "32M", "--timeout", "20"]);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(stdout.contains("| time to 100% (s) |"), "no table printed");
    for f in ["result.json", "result.md", "saved.svg"] {
        assert!(out.join(f).metadata().map(|m| m.len() > 0).unwrap_or(false), "{f} missing or empty");
    }
    let svg = std::fs::read_to_string(out.join("saved.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 2, "one curve per side");
    let md = std::fs::read_to_string(out.join("result.md")).unwrap();
    assert!(md.contains("twinpage/kernel"));
    assert!(md.contains("| workload slowdown while merging (x) |"), "no slowdown row");
    assert!(md.contains("/proc/loadavg"), "no load average recorded");

    // The JSON parses, and both sides reached the achievable sharing.
    let check = r#"
import json, sys
j = json.load(open(sys.argv[1]))
for side in ("kernel", "twinpage"):
    s = j["sides"][side]
    assert s["achievable_pages"] == 4096, s["achievable_pages"]
    assert s["final_saved_pages"] >= 4096, (side, s["final_saved_pages"])
    assert s["time_to_100_s"] is not None, side
    assert s["cpu_s"] >= 0 and len(s["samples"]) > 0
    # The workload's own passes, before and while merging.
    assert s["workload_passes_per_s_alone"] > 0, s
    assert s["workload_passes_per_s_merging"] > 0, s
print("json ok")
"#;
    let py = Command::new("python3").arg("-c").arg(check).arg(out.join("result.json")).output();
    match py {
        Ok(p) => assert!(p.status.success(), "result.json: {}", String::from_utf8_lossy(&p.stderr)),
        Err(e) => {
            require_or_skip(false, &format!("python3 to parse result.json ({e})"));
        }
    }

    let after = k.snapshot().unwrap();
    assert_eq!(before, after, "kernel KSM settings changed");
    let _ = std::fs::remove_dir_all(&out);
}

/// `--advisor-target-scan-time`: both sides run with the scan-time advisor
/// on and converge; the kernel's settings (its advisor_mode among them) are
/// as before afterwards.
#[test]
fn advisor_run_converges_and_restores_settings() {
    if !prerequisites() {
        return;
    }
    let _lock = sysfs_lock();
    let k = KsmSysfs::kernel();
    let before = k.snapshot().unwrap();
    let out = out_dir("advisor");
    let args = ["--workload", "runs", "--size", "32M", "--timeout", "60", "--sleep-millisecs", "20", "--idle-secs", "0"];
    bench(&out, &[&args[..], &["--advisor-target-scan-time", "1", "--advisor-max-cpu", "50"]].concat());
    let md = std::fs::read_to_string(out.join("result.md")).unwrap();
    assert!(md.contains("advisor_mode=scan-time, advisor_target_scan_time=1, advisor_max_cpu=50"), "{md}");
    let json = std::fs::read_to_string(out.join("result.json")).unwrap();
    assert!(json.contains("\"advisor_target_scan_time\": 1, \"advisor_max_cpu\": 50"), "{json}");
    assert_eq!(json.matches("\"time_to_100_s\": null").count(), 0, "a side did not converge: {json}");
    assert_eq!(k.snapshot().unwrap(), before, "kernel KSM settings changed");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn sigint_restores_settings() {
    interrupted_run_restores_settings(libc::SIGINT, "sigint");
}

#[test]
fn sigterm_restores_settings() {
    interrupted_run_restores_settings(libc::SIGTERM, "sigterm");
}

fn interrupted_run_restores_settings(sig: i32, tag: &str) {
    if !prerequisites() {
        return;
    }
    let _lock = sysfs_lock();
    let k = KsmSysfs::kernel();
    let before = k.snapshot().unwrap();
    let out = out_dir(tag);
    // Slow tunables: the kernel side takes many seconds, so the signal lands mid-run.
    let mut child = Command::new(env!("CARGO_BIN_EXE_twinpage"))
        .args(["bench", "--workload", "scatter", "--size", "64M", "--pages-to-scan", "100", "--sleep-millisecs", "20"])
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("merging started") {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(k.read("run").unwrap(), "1", "kernel KSM should be running mid-benchmark");
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(child.id() as i32, sig) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "interrupted bench exits 130");
    let after = k.snapshot().unwrap();
    assert_eq!(before, after, "kernel KSM settings not restored after {tag}");
    assert_eq!(k.read_u64("pages_shared").unwrap(), 0);
    let _ = std::fs::remove_dir_all(&out);
}

fn qemu_prerequisites() -> bool {
    if !prerequisites() {
        return false;
    }
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_twinpage")).parent().unwrap().to_path_buf();
    let qemu = Command::new("sh").args(["-c", "command -v qemu-system-x86_64"]).output().is_ok_and(|o| o.status.success());
    require_or_skip(
        qemu && bin.join("twinpaged").exists() && bin.join("libtwinpage.so").exists(),
        "qemu-system-x86_64, and twinpaged and libtwinpage.so built beside twinpage (cargo build --release --workspace)",
    )
}

/// The pid in "twinpaged (pid N) on SOCKET", and the socket's directory.
fn daemon_of(line: &str) -> Option<(u32, PathBuf)> {
    let rest = line.split("twinpaged (pid ").nth(1)?;
    let (pid, rest) = rest.split_once(')')?;
    let sock = rest.trim().strip_prefix("on ")?;
    Some((pid.parse().ok()?, PathBuf::from(sock).parent()?.to_path_buf()))
}

fn gone(pid: u32) -> bool {
    // A reaped process has no /proc entry (a pid reused this fast is unlikely).
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Two small TCG guests, twinpage side only, under the bench's own
/// twinpaged: both guests' pages merge through it (each guest's
/// ksm_merging_pages from the private tree), the guests time their verify
/// passes on both runs, and the daemon and its tree are gone afterwards.
/// Then a run interrupted with SIGINT while its daemon runs leaves no daemon
/// behind either. About 40 s.
#[test]
fn qemu_workload_under_private_twinpaged() {
    if !qemu_prerequisites() {
        return;
    }
    let _lock = sysfs_lock();
    let k = KsmSysfs::kernel();
    let before = k.snapshot().unwrap();
    let out = out_dir("qemu");
    let started = Instant::now();
    let bench = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_twinpage"));
        c.args(["bench", "--workload", "qemu", "--size", "128M", "--guests", "2", "--only", "twinpage", "--guest-passes", "3"])
            .args(["--timeout", "60", "--out"])
            .arg(&out);
        c
    };
    let o = bench().output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "bench failed: {}", o.status);
    let line = stdout.lines().find(|l| l.contains("twinpaged (pid ")).expect("no twinpaged started");
    let (dpid, tree) = daemon_of(line).expect("daemon line");
    assert!(gone(dpid), "twinpaged {dpid} still running after the bench");
    assert!(!tree.exists(), "the daemon's tree {} was not removed", tree.display());
    assert!(stdout.contains("merging through twinpaged"));
    assert!(stdout.contains("| guest 2 ksm_merging_pages |"), "no per-guest rows");
    assert!(stdout.contains("| workload slowdown while merging (x) |"), "no slowdown row");
    let check = r#"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["params"]["no_daemon"] is False
s = j["sides"]["twinpage"]
assert s["final_saved_pages"] > 1000, s["final_saved_pages"]
assert s["daemon_cpu_s"] > 0 and s["cpu_s"] >= s["daemon_cpu_s"], (s["cpu_s"], s["daemon_cpu_s"])
for g in ("guest0", "guest1"):
    assert s[g + "_ksm_merging_pages"] > 1000, (g, s[g + "_ksm_merging_pages"])
    assert s[g + "_pss_kb"] > 0
assert s["guest_verify_passes"] >= 6 and s["guest_failures"] == 0, s
assert s["guest_verify_ms_alone"] > 0 and s["guest_verify_ms"] > 0
print("json ok")
"#;
    match Command::new("python3").arg("-c").arg(check).arg(out.join("result.json")).output() {
        Ok(p) => assert!(p.status.success(), "result.json: {}", String::from_utf8_lossy(&p.stderr)),
        Err(e) => {
            require_or_skip(false, &format!("python3 to parse result.json ({e})"));
        }
    }
    assert_eq!(before, k.snapshot().unwrap(), "kernel KSM settings changed");
    println!("completed run: {:.1} s", started.elapsed().as_secs_f64());

    // SIGINT while the daemon and the guests run.
    let mut child = bench().stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut daemon = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(d) = daemon_of(&line) {
            daemon = Some(d);
        }
        if line.contains("guests booting") && daemon.is_some() {
            break;
        }
    }
    let (dpid, tree) = daemon.expect("no twinpaged started");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!gone(dpid), "twinpaged should run mid-benchmark");
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "interrupted bench exits 130");
    assert!(gone(dpid), "twinpaged {dpid} left running after SIGINT");
    assert!(!tree.exists(), "the daemon's tree {} left behind after SIGINT", tree.display());
    assert_eq!(before, k.snapshot().unwrap(), "kernel KSM settings not restored after SIGINT");
    println!("both runs: {:.1} s", started.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&out);
}
