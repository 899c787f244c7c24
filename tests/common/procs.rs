//! Child processes of the integration tests: twinpaged, and programs that
//! print `READY` once their memory is set up and a verdict on SIGTERM.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::{have_uffd, preload_lib, program, require, tempdir, wait_until};

/// Children killed on drop, so a failing assertion leaves nothing running.
pub struct Kids(pub Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The release twinpaged binary, if built.
pub fn daemon_bin() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/twinpaged");
    require(p.exists(), "target/release/twinpaged (cargo build --release)").then_some(p)
}

/// Starts twinpaged on `dir` (socket `dir/twinpaged.sock`) and waits for its
/// socket.
pub fn start_daemon(bin: &Path, dir: &Path, extra: &[&str], log: &str) -> Child {
    let sock = dir.join("twinpaged.sock");
    let _ = std::fs::remove_file(&sock);
    let c = Command::new(bin).arg("--dir").arg(dir).args(extra).env("TWINPAGE_LOG", log).spawn().unwrap();
    assert!(wait_until(Duration::from_secs(10), || sock.exists()), "twinpaged did not create its socket");
    c
}

/// Spawns `cmd` (stdout piped) and waits for its `READY` line.
pub fn spawn_ready(cmd: &mut Command) -> Child {
    let mut c = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("READY"), "the program did not start: {line:?}");
    c
}

/// SIGTERM, then the program's verdict on its memory, which must be OK.
pub fn finish_twin(mut c: Child) -> String {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let mut out = String::new();
    BufReader::new(c.stdout.take().unwrap()).read_line(&mut out).unwrap();
    let status = c.wait().unwrap();
    assert!(status.success() && out.starts_with("VERIFY OK"), "pid {} lost data: {out:?} ({status})", c.id());
    out
}

/// How many private mappings of a twinpage store process `pid` has: its
/// merged stretches, seen from outside.
pub fn store_mappings(pid: u32) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines().filter(|l| l.contains("twinpage-store") && l.split(' ').nth(1).is_some_and(|p| p.ends_with('p'))).count()
}

/// A number the tree shows in `kernel/mm/ksm/<name>` (0 if unreadable).
pub fn tree_attr(dir: &Path, name: &str) -> u64 {
    std::fs::read_to_string(dir.join("kernel/mm/ksm").join(name)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// `read()` every 0.5 s for `secs` seconds.
pub fn trace(secs: u64, read: impl Fn() -> u64) -> Vec<u64> {
    (0..secs * 2)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(500));
            read()
        })
        .collect()
}

/// A process's twinpage counters in the tree (empty if it has none yet).
pub fn tree_counters(dir: &Path, pid: u32) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(dir.join(format!("proc/{pid}/twinpage_counters"))).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// One of a process's counters in the tree, 0 if absent.
pub fn tree_counter(dir: &Path, pid: u32, name: &str) -> u64 {
    tree_counters(dir, pid).get(name).copied().unwrap_or(0)
}

/// What the twinpaged tests run: the preload, tests/programs/twin.c, the
/// daemon, and a fresh tree directory.
pub struct Setup {
    pub lib: PathBuf,
    pub prog: PathBuf,
    pub daemon: PathBuf,
    pub dir: PathBuf,
}

impl Setup {
    /// `twin SEED COMMON PAIRS WRITES` preloaded into this tree, scanning
    /// 100000 pages every `sleep_ms`, stdout piped (for [`spawn_ready`]).
    pub fn twin(&self, args: [u64; 4], sleep_ms: u32) -> Command {
        let mut cmd = Command::new(&self.prog);
        cmd.args(args.map(|a| a.to_string()))
            .env("LD_PRELOAD", &self.lib)
            .env("TWINPAGE_DIR", &self.dir)
            .env("TWINPAGE_PAGES_TO_SCAN", "100000")
            .env("TWINPAGE_SLEEP_MILLISECS", sleep_ms.to_string())
            .stdout(std::process::Stdio::piped());
        cmd
    }
}

/// The twinpaged tests' prerequisites, or `None` (skipped, or failed under
/// CI) when one is missing.
pub fn setup(tag: &str) -> Option<Setup> {
    let (Some(lib), Some(prog), Some(daemon)) = (preload_lib(), program("twin"), daemon_bin()) else { return None };
    if !have_uffd() {
        return None;
    }
    Some(Setup { lib, prog, daemon, dir: tempdir(tag) })
}
