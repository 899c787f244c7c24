//! `twinpage bench` (the built binary) against the real kernel KSM: a small
//! run writes result.json (valid JSON), result.md and saved.svg, and the
//! kernel's KSM settings are as before afterwards — also when the run is
//! interrupted with SIGINT or SIGTERM.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
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
    let o = Command::new(env!("CARGO_BIN_EXE_twinpage"))
        .args(["bench", "--workload", "runs", "--size", "32M", "--timeout", "20", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "bench failed: {}", o.status);
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
