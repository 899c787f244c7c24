//! A TCG test guest (scripts/boot-guest.sh) driven from a test: boot it
//! (preloaded or not), read its console, its counters and its PSS, talk QMP.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::require;

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn prerequisites() -> Option<PathBuf> {
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

pub struct Guest {
    pub tag: String,
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub console: Vec<String>,
    pub dir: PathBuf,
    /// The stats tree (TWINPAGE_DIR): the guest's own, or one shared with a daemon.
    pub tree: PathBuf,
    pub stderr: PathBuf,
    pub qmp: PathBuf,
    pub shm: Option<PathBuf>,
}

impl Guest {
    pub fn boot(tag: &str, lib: &Path, tp_args: &[&str], qemu_args: &[String], preload: bool) -> Guest {
        Self::boot_in(tag, lib, tp_args, qemu_args, preload, None)
    }

    /// As `boot`, with `env` set for QEMU after the defaults (`TWINPAGE_*`
    /// settings).
    pub fn boot_env(tag: &str, lib: &Path, tp_args: &[&str], qemu_args: &[String], preload: bool, env: &[(&str, &str)]) -> Guest {
        Self::start(tag, lib, tp_args, qemu_args, preload, None, env)
    }

    /// As `boot`, with the stats tree `tree` (shared with other guests and
    /// twinpaged) instead of the guest's own.
    pub fn boot_in(tag: &str, lib: &Path, tp_args: &[&str], qemu_args: &[String], preload: bool, tree: Option<&Path>) -> Guest {
        Self::start(tag, lib, tp_args, qemu_args, preload, tree, &[])
    }

    fn start(
        tag: &str,
        lib: &Path,
        tp_args: &[&str],
        qemu_args: &[String],
        preload: bool,
        tree: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Guest {
        let dir = std::env::temp_dir().join(format!("twinpage-qemu-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let stderr = dir.join("stderr");
        let qmp = dir.join("qmp.sock");
        let tree = tree.map_or_else(|| dir.join("tree"), Path::to_path_buf);
        let mut cmd = Command::new(repo().join("scripts/boot-guest.sh"));
        cmd.args(tp_args)
            .args(qemu_args)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .env("TWINPAGE_DIR", &tree)
            .env_remove("TWINPAGE_SOCKET")
            .env("TWINPAGE_PAGES_TO_SCAN", "100000")
            .env("TWINPAGE_RUN", if tag == "shared" { "1" } else { "0" })
            .env("TWINPAGE_SLEEP_MILLISECS", "20")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        cmd.envs(env.iter().copied());
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
        Guest { tag: tag.to_string(), child, lines: rx, console: Vec::new(), dir, tree, stderr, qmp, shm }
    }

    /// Waits for a console line starting with `prefix`.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(l) => {
                    eprintln!("guest {}: {l}", self.tag);
                    self.console.push(l.clone());
                    if let Some(i) = l.find(prefix) {
                        return l[i..].to_string();
                    }
                }
                Err(_) => panic!("no '{prefix}' from guest {} in {timeout:?}; stderr: {}", self.tag, self.stderr_text()),
            }
        }
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn attr(&self, name: &str) -> u64 {
        super::procs::tree_attr(&self.tree, name)
    }

    pub fn merging_pages(&self) -> u64 {
        std::fs::read_to_string(self.tree.join(format!("proc/{}/ksm_merging_pages", self.child.id())))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn pss_kb(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", self.child.id())).unwrap_or_default();
        s.lines().find_map(|l| l.strip_prefix("Pss:").and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())).unwrap_or(0)
    }

    /// Starts merging through the stats tree, as an operator would
    /// (`echo 1 > $TWINPAGE_DIR/kernel/mm/ksm/run`).
    pub fn start_merging(&self) {
        std::fs::write(self.tree.join("kernel/mm/ksm/run"), "1\n").unwrap();
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Guest) -> bool) {
        let deadline = Instant::now() + timeout;
        while !pred(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; pages_sharing={}; twinpage counters: {}; stderr: {}",
                self.attr("pages_sharing"),
                std::fs::read_to_string(self.tree.join(format!("proc/{}/twinpage_counters", self.pid())))
                    .unwrap_or_default()
                    .replace('\n', " "),
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn qmp(&self, cmds: &[&str]) -> Vec<String> {
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

    /// The guest's verdict (read already, or awaited), once QEMU has exited
    /// or been killed.
    pub fn finish(mut self) -> String {
        let seen = self.console.iter().find_map(|l| l.find("TP-VERDICT").map(|i| l[i..].to_string()));
        let verdict = seen.unwrap_or_else(|| self.wait_line("TP-VERDICT", Duration::from_secs(120)));
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

impl Guest {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads the console lines printed so far.
    pub fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            eprintln!("guest {}: {l}", self.tag);
            self.console.push(l);
        }
    }

    pub fn assert_no_failure(&self) {
        let bad: Vec<&String> = self.console.iter().filter(|l| l.contains("TP-BAD") || l.contains("TP-VERDICT FAIL")).collect();
        assert!(bad.is_empty(), "guest {} found bad data: {bad:?}", self.tag);
    }

    /// The last round the guest verified, from the console read so far.
    pub fn last_verified(&self) -> u64 {
        self.console.iter().rev().find_map(|l| verified_round(l)).unwrap_or(0)
    }

    /// Waits for the guest to verify all its data in a round after `round`.
    pub fn wait_verified_after(&mut self, round: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let l = self.wait_line("TP-", deadline.saturating_duration_since(Instant::now()));
            self.assert_no_failure();
            if let Some(k) = verified_round(&l).filter(|&k| k > round) {
                return k;
            }
        }
    }
}

/// K of a "TP-VERIFY round=K ok" line.
pub fn verified_round(l: &str) -> Option<u64> {
    let rest = &l[l.find("TP-VERIFY round=")? + "TP-VERIFY round=".len()..];
    let (k, ok) = rest.split_once(' ')?;
    (ok.trim() == "ok").then(|| k.parse().ok()).flatten()
}
