//! Reading a tree and writing its attributes from outside a publisher:
//! what `twinpage stat`, `top` and `set` (and the tests) use.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kernel_compat::{procfs, Attr, KsmStat, KsmSysfs, WriteError};

use super::counters::{self, Counters};
use super::file::{self, InPlaceFile, TreeLock};
use super::layout;

/// A refused write, as recorded in `twinpage/last_error`
/// (`SEQ PID ATTR ERRNO "VALUE"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Refusals so far in this tree, this one included.
    pub seq: u64,
    /// The publisher that refused it.
    pub pid: u32,
    /// The attribute written.
    pub attr: String,
    /// The kernel's errno for it.
    pub error: WriteError,
    /// What was written, quoted as a Rust string literal.
    pub value: String,
}

impl Refusal {
    fn parse(text: &str) -> Option<Refusal> {
        let line = text.lines().next()?;
        let mut f = line.splitn(5, ' ');
        let seq = f.next()?.parse().ok()?;
        let pid = f.next()?.parse().ok()?;
        let attr = f.next()?.to_string();
        let error = match f.next()? {
            "EINVAL" => WriteError::Inval,
            "EBUSY" => WriteError::Busy,
            "EACCES" => WriteError::ReadOnly,
            "ENOENT" => WriteError::NoSuchAttr,
            "ERANGE" => WriteError::Range,
            _ => return None,
        };
        Some(Refusal { seq, pid, attr, error, value: f.next().unwrap_or("").to_string() })
    }
}

/// One process of the tree (`proc/<pid>`).
#[derive(Debug, Clone)]
pub struct ProcessEntry {
    /// Its pid.
    pub pid: u32,
    /// `/proc/<pid>/comm` (empty if it is gone).
    pub comm: String,
    /// What an operator calls it: a QEMU guest's `-name`, else `comm`
    /// (empty if it is gone).
    pub name: String,
    /// Its `ksm_stat`, if readable.
    pub stat: Option<KsmStat>,
    /// It is still running (the pid and its start time match).
    pub live: bool,
    /// It is running but stopped (`SIGSTOP`, a tracer): it publishes nothing
    /// until it continues.
    pub stopped: bool,
    /// All its twinpage counters (`twinpage_counters`).
    pub counters: Counters,
    /// Its engine's tunables (`twinpage_tunables`), `name value`.
    pub tunables: Vec<(String, String)>,
}

impl ProcessEntry {
    /// One of its twinpage counters by name (0 if it has none, or one below 0).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).map_or(0, |&v| u64::try_from(v).unwrap_or(0))
    }
}

/// A write to an attribute file, to wait for with [`Tree::wait`].
#[derive(Debug, Clone)]
pub struct Ticket {
    name: String,
    generation: u64,
    errors: u64,
}

/// What became of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// A publisher applied it; the file now shows this value.
    Applied(String),
    /// A publisher refused it; the file shows the old value again.
    Refused(Refusal),
    /// No running process publishes into this tree; the value stays in the
    /// file and is checked and applied when one starts.
    NoPublisher,
    /// Publishers run but none picked the write up in time.
    TimedOut,
}

/// What `twinpage set` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetOutcome {
    /// Applied: the value before and after.
    Applied {
        /// The value shown before.
        before: String,
        /// The value shown after.
        after: String,
    },
    /// An empty write: accepted, nothing changes (as with sysfs).
    Unchanged,
    /// Accepted by the kernel's rules and written, but no process publishes
    /// into the tree now: it applies when one starts.
    Pending,
}

/// Why `twinpage set` failed.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    /// There is no `kernel/mm/ksm` under the root.
    #[error("no twinpage statistics tree at {0} (is a twinpage process running?)")]
    NoTree(PathBuf),
    /// The write was refused with the kernel's errno.
    #[error("{}", .0.name())]
    Refused(WriteError),
    /// Publishers run but none picked the write up in time.
    #[error("no publisher picked the write up within {0:?}")]
    NotPickedUp(Duration),
    /// Reading or writing the tree failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl SetError {
    /// The exit status for it: the errno of a refusal, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            SetError::Refused(e) => e.errno(),
            _ => 1,
        }
    }
}

/// The process whose `twinpage_counters` are `c`, if it is still running:
/// pid and start time both match (a recycled pid has another start time).
fn running(pid: u32, c: &Counters) -> Option<file::ProcState> {
    let start = c.get("starttime").and_then(|&v| u64::try_from(v).ok())?;
    file::process_state(pid).filter(|s| s.starttime == start)
}

/// A statistics tree, seen from outside the publishers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    root: PathBuf,
}

impl Tree {
    /// The tree under `root`.
    pub fn at(root: impl Into<PathBuf>) -> Tree {
        Tree { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A driver for `kernel/mm/ksm` (same API as for `/sys/kernel/mm/ksm`).
    pub fn ksm(&self) -> KsmSysfs {
        KsmSysfs::at(self.root.join(layout::KSM))
    }

    /// `kernel/mm/ksm` exists.
    pub fn exists(&self) -> bool {
        self.ksm().exists()
    }

    fn tw(&self, name: &str) -> PathBuf {
        self.root.join(layout::TWINPAGE).join(name)
    }

    /// Every attribute file there is, in `ls` order, with its value
    /// (without the newline).
    pub fn attributes(&self) -> io::Result<Vec<(&'static Attr, String)>> {
        let k = self.ksm();
        let mut out = Vec::new();
        for a in crate::tunables::all_attrs() {
            match k.read_raw(a.name) {
                Ok(v) => out.push((a, v.trim_end_matches('\n').to_string())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// One attribute's value (without the newline).
    pub fn attribute(&self, name: &str) -> io::Result<String> {
        Ok(self.ksm().read_raw(name)?.trim_end_matches('\n').to_string())
    }

    /// The global twinpage counters (`twinpage/stats`).
    pub fn twinpage_stats(&self) -> io::Result<Counters> {
        Ok(counters::parse_lines(&fs::read_to_string(self.tw(layout::STATS))?))
    }

    /// The `proc/<pid>` directories there are, with their pids.
    fn process_dirs(&self) -> io::Result<Vec<(u32, PathBuf)>> {
        let entries = match fs::read_dir(self.root.join(layout::PROC)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                out.push((pid, entry.path()));
            }
        }
        Ok(out)
    }

    /// The processes with a `proc/<pid>` directory, by pid.
    pub fn processes(&self) -> io::Result<Vec<ProcessEntry>> {
        let mut out = Vec::new();
        for (pid, dir) in self.process_dirs()? {
            let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_default();
            let counters = counters::parse_lines(&read(layout::COUNTERS));
            let running = running(pid, &counters);
            let live = running.is_some();
            let tunables =
                read(layout::OWN_TUNABLES).lines().filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string()))).collect();
            out.push(ProcessEntry {
                pid,
                comm: if live { file::process_comm(pid).unwrap_or_default() } else { String::new() },
                name: if live { file::process_name(pid).unwrap_or_default() } else { String::new() },
                stat: procfs::parse(&read(layout::KSM_STAT)).ok(),
                live,
                stopped: running.is_some_and(|s| s.stopped),
                counters,
                tunables,
            });
        }
        out.sort_by_key(|p| p.pid);
        Ok(out)
    }

    /// Whether some running process publishes into the tree.
    pub fn has_publisher(&self) -> bool {
        self.processes().is_ok_and(|p| p.iter().any(|p| p.live))
    }

    /// Whether every running process's engine has `value` for `name`
    /// (`proc/<pid>/twinpage_tunables`); a stopped one takes it when it
    /// continues.
    pub fn all_have(&self, name: &str, value: &str) -> bool {
        self.processes()
            .is_ok_and(|ps| ps.iter().filter(|p| p.live && !p.stopped).all(|p| p.tunables.iter().any(|(n, v)| n == name && v == value)))
    }

    /// The generation: publishers' passes so far.
    pub fn generation(&self) -> io::Result<u64> {
        match fs::read_to_string(self.tw(layout::GENERATION)) {
            Ok(t) => Ok(t.trim().parse().unwrap_or(0)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// The last refused write, if any.
    pub fn last_error(&self) -> io::Result<Option<Refusal>> {
        match fs::read_to_string(self.tw(layout::LAST_ERROR)) {
            Ok(t) => Ok(Refusal::parse(&t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Asks every publisher for counters taken from now on
    /// (`twinpage/request`, see `statsfs::wake`) and waits, up to
    /// `timeout`, until each running process not in `skip` has published
    /// them. A stopped process is not waited for: none of its threads runs
    /// until it continues (then it publishes, and takes any write made
    /// meanwhile). Returns the running processes that have not answered: a
    /// caller that reads again may pass them as `skip` rather than wait for
    /// them each time. Once it returns, a publisher's next pass puts fresh
    /// global counters together from the fresh ones.
    pub fn refresh(&self, timeout: Duration, skip: &HashSet<u32>) -> io::Result<HashSet<u32>> {
        let request = {
            let lock = self.lock()?;
            let _held = lock.lock_timeout(timeout)?;
            // In place (publishers watch this file), not replaced.
            let file = InPlaceFile::open(&self.tw(layout::REQUEST), 0o644)?;
            let r = String::from_utf8_lossy(&file.read()?).trim().parse::<u64>().unwrap_or(0) + 1;
            file.overwrite(format!("{r}\n").as_bytes())?;
            r
        };
        let deadline = Instant::now() + timeout;
        loop {
            let waiting = self.not_served(request)?;
            if waiting.iter().all(|&(p, stopped)| stopped || skip.contains(&p)) || Instant::now() >= deadline {
                return Ok(waiting.into_iter().map(|(p, _)| p).collect());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Running processes whose counters do not answer `request` yet, and
    /// whether each is stopped.
    fn not_served(&self, request: u64) -> io::Result<Vec<(u32, bool)>> {
        let mut out = Vec::new();
        for (pid, dir) in self.process_dirs()? {
            let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_default();
            let Some(state) = running(pid, &counters::parse_lines(&read(layout::COUNTERS))) else { continue };
            if read(layout::SERVED).trim().parse::<u64>().unwrap_or(0) < request {
                out.push((pid, state.stopped));
            }
        }
        Ok(out)
    }

    /// The tree's lock (publishers hold it during a pass).
    pub fn lock(&self) -> io::Result<TreeLock> {
        TreeLock::open(&self.tw(layout::LOCK))
    }

    fn ticket(&self, name: &str) -> io::Result<Ticket> {
        Ok(Ticket { name: name.to_string(), generation: self.generation()?, errors: self.last_error()?.map_or(0, |r| r.seq) })
    }

    /// Writes `bytes` into attribute file `name` exactly as given, like
    /// `echo -n`: opened without `O_CREAT`, truncated, written. Done under
    /// the lock, so any pass that ends after this has seen the write. No
    /// check: a publisher applies or refuses it ([`Tree::wait`]).
    pub fn write_raw(&self, name: &str, bytes: &[u8]) -> io::Result<Ticket> {
        let lock = self.lock()?;
        let _guard = lock.lock_timeout(Duration::from_secs(5))?;
        self.write_locked(name, bytes)
    }

    fn write_locked(&self, name: &str, bytes: &[u8]) -> io::Result<Ticket> {
        let ticket = self.ticket(name)?;
        let mut f = OpenOptions::new().write(true).truncate(true).open(self.ksm().path(name))?;
        f.write_all(bytes)?;
        Ok(ticket)
    }

    /// Waits until a publisher has handled the write of `ticket` (a pass
    /// that started after it ended), up to `timeout`.
    pub fn wait(&self, ticket: &Ticket, timeout: Duration) -> io::Result<WaitOutcome> {
        if !self.has_publisher() {
            return Ok(WaitOutcome::NoPublisher);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let g = self.generation()?;
            if g > ticket.generation {
                let content = self.ksm().read_raw(&ticket.name)?;
                // An empty file is taken for an empty write once it has stayed
                // empty for a while; then it shows the value again.
                if !content.is_empty() {
                    if let Some(r) = self.last_error()?.filter(|r| r.seq > ticket.errors && r.attr == ticket.name) {
                        return Ok(WaitOutcome::Refused(r));
                    }
                    return Ok(WaitOutcome::Applied(content.trim_end_matches('\n').to_string()));
                }
            }
            if Instant::now() >= deadline {
                return Ok(if self.has_publisher() { WaitOutcome::TimedOut } else { WaitOutcome::NoPublisher });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// `twinpage set`: checks `value` with the kernel's rules against the
    /// tree's current state (refusing as sysfs would, with its errno),
    /// writes it and waits up to `timeout` for a publisher to apply it (and,
    /// within the same time, for every running process's engine to have it).
    pub fn set(&self, name: &str, value: &[u8], timeout: Duration) -> Result<SetOutcome, SetError> {
        if !self.exists() {
            return Err(SetError::NoTree(self.root.clone()));
        }
        let lock = self.lock()?;
        let guard = lock.lock_timeout(Duration::from_secs(5))?;
        let ctx = self.ksm().write_context()?;
        match crate::tunables::model_write(name, value, &ctx) {
            Err(e) => return Err(SetError::Refused(e)),
            Ok(None) => return Ok(SetOutcome::Unchanged),
            Ok(Some(_)) => {}
        }
        let before = self.attribute(name)?;
        let ticket = self.write_locked(name, value)?;
        drop(guard);
        let deadline = Instant::now() + timeout;
        match self.wait(&ticket, timeout)? {
            WaitOutcome::Applied(after) => {
                // One publisher applied it; the others do within a period.
                while Instant::now() < deadline && !self.all_have(name, &after) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(SetOutcome::Applied { before, after })
            }
            WaitOutcome::Refused(r) => Err(SetError::Refused(r.error)),
            WaitOutcome::NoPublisher => Ok(SetOutcome::Pending),
            WaitOutcome::TimedOut => Err(SetError::NotPickedUp(timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree where this process looks like a publisher that answered
    /// request `served` (and never answers again: no publisher runs).
    fn tree_with_us(served: u64) -> (Tree, u32) {
        let root = std::env::temp_dir().join(format!("twinpage-refresh-{}-{served}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let pid = std::process::id();
        let dir = root.join(layout::PROC).join(pid.to_string());
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(root.join(layout::TWINPAGE)).unwrap();
        let start = file::process_starttime(pid).unwrap();
        fs::write(dir.join(layout::COUNTERS), format!("starttime {start}\npages_scanned 1\n")).unwrap();
        fs::write(dir.join(layout::SERVED), format!("{served}\n")).unwrap();
        (Tree::at(root), pid)
    }

    #[test]
    fn a_refresh_waits_for_each_running_publisher_and_skips_one_that_did_not_answer() {
        let (t, pid) = tree_with_us(0);
        let skip = t.refresh(Duration::from_millis(30), &HashSet::new()).unwrap();
        assert_eq!(skip, HashSet::from([pid]), "no publisher answered request 1");
        assert_eq!(fs::read_to_string(t.tw(layout::REQUEST)).unwrap(), "1\n");
        let t0 = Instant::now();
        let again = t.refresh(Duration::from_secs(30), &skip).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(30), "waited for a process it was told to skip");
        assert_eq!(again, skip, "still not answering: still reported");
        assert_eq!(fs::read_to_string(t.tw(layout::REQUEST)).unwrap(), "2\n");
        fs::write(t.root().join(layout::PROC).join(pid.to_string()).join(layout::SERVED), "3\n").unwrap();
        assert_eq!(t.refresh(Duration::from_secs(30), &skip).unwrap(), HashSet::new(), "answered request 3");
        let _ = fs::remove_dir_all(t.root());
    }

    #[test]
    fn refusal_line() {
        let r = Refusal::parse("3 42 pages_to_scan EINVAL \"a b\"\n").unwrap();
        assert_eq!(r.seq, 3);
        assert_eq!(r.pid, 42);
        assert_eq!(r.attr, "pages_to_scan");
        assert_eq!(r.error, WriteError::Inval);
        assert_eq!(r.value, "\"a b\"");
        assert_eq!(Refusal::parse(""), None);
    }
}
