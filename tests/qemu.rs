//! The preload inside unmodified QEMU (TCG), on the test guest of
//! scripts/guest-image.sh: merging, the guest's own verdict after rewriting
//! merged data, the balloon, anonymous guest RAM, and share=on refusal.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::require;

/// One guest at a time: two TCG guests would share two cores with the scanner.
static SERIAL: Mutex<()> = Mutex::new(());

const GUEST_MIB: u64 = 128;
const DUP_PAGES: u64 = GUEST_MIB * 256 / 2;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn prerequisites() -> Option<PathBuf> {
    let lib = repo().join("target/release/libtwinpage.so");
    if !require(lib.exists(), "target/release/libtwinpage.so built") {
        return None;
    }
    if !require(twinpage::Engine::new().is_ok(), "userfaultfd write-protect (root)") {
        return None;
    }
    let qemu = Command::new("sh").args(["-c", "command -v qemu-system-x86_64"]).output().is_ok_and(|o| o.status.success());
    if !require(qemu, "qemu-system-x86_64 (scripts/test.sh installs it)") {
        return None;
    }
    Some(lib)
}

struct Guest {
    child: Child,
    lines: mpsc::Receiver<String>,
    console: Vec<String>,
    dir: PathBuf,
    stderr: PathBuf,
    qmp: PathBuf,
    shm: Option<PathBuf>,
}

impl Guest {
    fn boot(tag: &str, lib: &Path, tp_args: &[&str], qemu_args: &[String], preload: bool) -> Guest {
        let dir = std::env::temp_dir().join(format!("twinpage-qemu-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let stderr = dir.join("stderr");
        let qmp = dir.join("qmp.sock");
        let mut cmd = Command::new(repo().join("scripts/boot-guest.sh"));
        cmd.args(tp_args)
            .args(qemu_args)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .env("TWINPAGE_DIR", dir.join("tree"))
            .env("TWINPAGE_PAGES_TO_SCAN", "100000")
            .env("TWINPAGE_RUN", if tag == "shared" { "1" } else { "0" })
            .env("TWINPAGE_SLEEP_MILLISECS", "20")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        if preload {
            cmd.env("LD_PRELOAD", lib);
        }
        let mut child = cmd.spawn().expect("boot-guest.sh");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line.trim_end_matches('\r').to_string());
            }
        });
        let shm = qemu_args.iter().find_map(|a| a.split(',').find_map(|kv| kv.strip_prefix("mem-path=")).map(PathBuf::from));
        Guest { child, lines: rx, console: Vec::new(), dir, stderr, qmp, shm }
    }

    /// Waits for a console line starting with `prefix`.
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(l) => {
                    eprintln!("guest: {l}");
                    self.console.push(l.clone());
                    if let Some(i) = l.find(prefix) {
                        return l[i..].to_string();
                    }
                }
                Err(_) => panic!("no '{prefix}' from the guest in {timeout:?}; stderr: {}", self.stderr_text()),
            }
        }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn attr(&self, name: &str) -> u64 {
        std::fs::read_to_string(self.dir.join("tree/kernel/mm/ksm").join(name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn merging_pages(&self) -> u64 {
        std::fs::read_to_string(self.dir.join(format!("tree/proc/{}/ksm_merging_pages", self.child.id())))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn pss_kb(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", self.child.id())).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("Pss:").and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok()))
            .unwrap_or(0)
    }

    /// Starts merging through the stats tree, as an operator would
    /// (`echo 1 > $TWINPAGE_DIR/kernel/mm/ksm/run`).
    fn start_merging(&self) {
        std::fs::write(self.dir.join("tree/kernel/mm/ksm/run"), "1\n").unwrap();
    }

    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Guest) -> bool) {
        let deadline = Instant::now() + timeout;
        while !pred(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; pages_sharing={}", self.attr("pages_sharing"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn qmp(&self, cmds: &[&str]) -> Vec<String> {
        let mut s = UnixStream::connect(&self.qmp).expect("qmp socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap(); // greeting
        let mut out = Vec::new();
        for c in std::iter::once(&r#"{"execute":"qmp_capabilities"}"#).chain(cmds) {
            writeln!(s, "{c}").unwrap();
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                if line.contains("\"return\"") || line.contains("\"error\"") {
                    out.push(line.clone());
                    break;
                }
            }
        }
        out
    }

    fn finish(mut self) -> String {
        let verdict = self.wait_line("TP-VERDICT", Duration::from_secs(120));
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut rest = String::new();
        let _ = std::fs::File::open(&self.stderr).and_then(|mut f| f.read_to_string(&mut rest));
        eprintln!("qemu stderr:\n{rest}");
        verdict
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = &self.shm {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tp_args(wait: u32) -> Vec<String> {
    vec![format!("tp.mib={GUEST_MIB}"), format!("tp.wait={wait}"), "tp.poweroff=1".into()]
}

fn file_backend(tag: &str, share: &str) -> Vec<String> {
    let path = format!("/dev/shm/twinpage-test-{tag}-{}", std::process::id());
    vec![
        "-object".into(),
        format!("memory-backend-file,id=mem,size=512M,mem-path={path},share={share}"),
        "-machine".into(),
        "memory-backend=mem".into(),
    ]
}

/// Boots, waits for the duplicate data to merge, checks PSS and the verdict.
fn merges_and_verifies(tag: &str, backend: Vec<String>) {
    let Some(lib) = prerequisites() else { return };
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let args = tp_args(20);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut g = Guest::boot(tag, &lib, &args, &backend, true);
    g.wait_line("TP-READY", Duration::from_secs(60));
    // Merging starts only now (run=0 until here), so READY is the unmerged baseline.
    let pss_ready = g.pss_kb();
    let base = g.attr("pages_sharing");
    assert_eq!(base, 0);
    g.start_merging();
    let t = Instant::now();
    // The guest's duplicate pages merge (patterns past max_page_sharing cost a few dups).
    g.wait_for("the guest's duplicates to merge", Duration::from_secs(17), |g| g.attr("pages_sharing") >= DUP_PAGES * 95 / 100);
    let converge = t.elapsed();
    std::thread::sleep(Duration::from_millis(1000));
    let pss_merged = g.pss_kb();
    let sharing = g.attr("pages_sharing");
    let merging = g.merging_pages();
    let dropped = pss_ready.saturating_sub(pss_merged);
    eprintln!(
        "{tag}: merged in {:.2} s: pages_sharing={sharing} ksm_merging_pages={merging}; QEMU PSS {pss_ready} kB -> {pss_merged} kB (-{dropped} kB; guest duplicate data {} kB)",
        converge.as_secs_f64(),
        DUP_PAGES * 4
    );
    assert!(merging >= DUP_PAGES);
    assert!(dropped >= DUP_PAGES * 4 * 3 / 4, "QEMU's PSS dropped only {dropped} kB");
    let verdict = g.finish();
    assert_eq!(verdict, "TP-VERDICT OK");
}

#[test]
fn file_backed_share_off_guest_merges_and_verifies() {
    merges_and_verifies("file", file_backend("file", "off"));
}

#[test]
fn anonymous_guest_ram_merges_and_verifies() {
    merges_and_verifies("ram", vec!["-object".into(), "memory-backend-ram,id=mem,size=512M".into(), "-machine".into(), "memory-backend=mem".into()]);
}

#[test]
fn share_on_is_refused_once_and_the_guest_runs() {
    let Some(lib) = prerequisites() else { return };
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let args = tp_args(3);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut g = Guest::boot("shared", &lib, &args, &file_backend("shared", "on"), true);
    g.wait_line("TP-READY", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    // Guest RAM is refused; QEMU's small anonymous RAM blocks (ROMs, video
    // RAM) may still merge, but never the guest's duplicate data.
    let merging = g.merging_pages();
    eprintln!("share=on: ksm_merging_pages={merging}");
    assert!(merging < DUP_PAGES / 4, "guest RAM merged despite share=on: {merging}");
    let err = g.stderr_text();
    assert_eq!(err.matches("refusing to merge a shared mapping").count(), 1, "stderr: {err}");
    assert_eq!(g.finish(), "TP-VERDICT OK");
}

#[test]
fn balloon_inflate_and_deflate_while_merged() {
    let Some(lib) = prerequisites() else { return };
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let args = tp_args(25);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut backend = file_backend("balloon", "off");
    backend.extend(["-device".to_string(), "virtio-balloon".to_string()]);
    let mut g = Guest::boot("balloon", &lib, &args, &backend, true);
    g.wait_line("TP-READY", Duration::from_secs(60));
    assert!(g.console.iter().any(|l| l.contains("TP-BALLOON present")), "balloon driver bound");
    g.start_merging();
    g.wait_for("merging", Duration::from_secs(15), |g| g.attr("pages_sharing") >= DUP_PAGES * 95 / 100);
    let before = g.attr("pages_sharing");
    // Inflate: the guest hands back 192 MiB of free memory; QEMU discards it.
    let r = g.qmp(&[r#"{"execute":"balloon","arguments":{"value":335544320}}"#]);
    assert!(r[1].contains("return"), "{r:?}");
    let actual = |g: &Guest| {
        let r = g.qmp(&[r#"{"execute":"query-balloon"}"#]);
        r[1].split("\"actual\":").nth(1).and_then(|s| s.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok()).unwrap_or(0)
    };
    g.wait_for("the balloon to inflate", Duration::from_secs(20), |g| actual(g) <= 340 << 20);
    let during = g.attr("pages_sharing");
    let r = g.qmp(&[r#"{"execute":"balloon","arguments":{"value":536870912}}"#]);
    assert!(r[1].contains("return"), "{r:?}");
    g.wait_for("the balloon to deflate", Duration::from_secs(20), |g| actual(g) >= 500 << 20);
    eprintln!("balloon: pages_sharing before {before}, inflated {during}, after {}", g.attr("pages_sharing"));
    assert_eq!(g.finish(), "TP-VERDICT OK");
}
