//! A private `twinpaged` for the twinpage side of the qemu workload, so the
//! guests merge across processes as they do under kernel KSM. It gets its
//! own temporary tree and socket (never the host's `/run/twinpage`), the
//! bench's tunables are written into that tree as a user would write them,
//! and it is stopped and its tree removed when the guard drops (also after
//! SIGINT/SIGTERM, which end the bench's loops).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::proc;

/// A temporary directory, removed on drop (declare it before the processes
/// using it, so it goes after them).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir, String> {
        let p = std::env::temp_dir().join(format!("twinpage-bench-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running `twinpaged`, stopped (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

impl Daemon {
    /// Starts `exe --dir tree` (log in `log`), waits for its socket, and
    /// sets `tunables` in the tree one at a time, each applied before the next.
    pub fn start(exe: &Path, tree: &Path, log: &Path, tunables: &[(&str, String)]) -> Result<Daemon, String> {
        let sock = tree.join("twinpaged.sock");
        let logf = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        // The bench sets vm.max_map_count itself (--raise-max-map-count,
        // restored after): its daemon leaves the host's value alone.
        let child = Command::new(exe)
            .arg("--dir")
            .arg(tree)
            .arg("--keep-max-map-count")
            .env_remove("TWINPAGE_SOCKET")
            .env_remove("LD_PRELOAD")
            .env("TWINPAGE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        let mut d = Daemon { child, log: log.to_path_buf() };
        d.wait_for("its socket", LISTEN_TIMEOUT, || sock.exists())?;
        let attrs = tree.join("kernel/mm/ksm");
        // The socket comes first, the tree's files just after.
        d.wait_for("its stats tree", LISTEN_TIMEOUT, || tunables.iter().all(|(n, _)| attrs.join(n).exists()))?;
        // One at a time, each applied before the next is written (as `twinpage
        // set` does): writes made within one mtime tick would otherwise be
        // taken in the files' order, not the writer's (advisor_mode before
        // pages_to_scan, which the advisor then refuses).
        let t = twinpage::statsfs::Tree::at(tree.to_path_buf());
        for (name, value) in tunables {
            t.set(name, value.as_bytes(), APPLY_TIMEOUT).map_err(|e| format!("twinpaged: {name}={value}: {e}"))?;
        }
        Ok(d)
    }

    fn wait_for(&mut self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !done() {
            if twinpage::sys::signals::interrupted() {
                return Err("interrupted".into());
            }
            if !matches!(self.child.try_wait(), Ok(None)) {
                return Err(format!("twinpaged exited while waiting for {what}; log {}:\n{}", self.log.display(), self.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!("twinpaged: no {what} after {:?}; log {}:\n{}", timeout, self.log.display(), self.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let t = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds of every thread of the daemon so far (exited threads
    /// included: the process's own utime + stime).
    pub fn cpu_s(&self) -> f64 {
        fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok().and_then(|s| proc::stat_cpu(&s)).unwrap_or(0.0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Our child's pid, not yet reaped: it cannot name another process.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
