//! The publisher: a thread that keeps one process's part of the tree and
//! the global files up to date, and applies what users write.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kernel_compat::write::SYSFS_WRITE_MAX;
use kernel_compat::{procfs, AdvisorMode, Attr, KsmStat, WriteContext, WriteError};

use super::counters::{self, Combine, Counters, FIELDS};
use super::file::{self, InPlaceFile, TreeLock};
use super::shared::{Mark, SharedTunables, State};
use super::wake::Wake;
use super::{layout, FlagsFn, ProcessFlags, Source, StatsTreeOptions};
use crate::stats::KsmStats;

/// Shortest and longest time between two passes; in between, the engine's
/// `sleep_millisecs`. Every process running an engine publishes into one
/// tree under one lock: at 10 ms, 28 agents' publishers took about 40% as
/// much CPU as their scanners and starved each other of the lock.
const MIN_PERIOD_MS: u64 = 50;
const MAX_PERIOD_MS: u64 = 200;
/// Passes between checks that no file was removed or replaced.
const ENSURE_EVERY: u64 = 32;
/// Longest wait for the tree's lock before a pass is skipped.
const LOCK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an attribute file must stay empty to count as an empty write
/// (a no-op, as a zero-length `write(2)` to sysfs) rather than a writer
/// between its `O_TRUNC` and its `write(2)`.
const EMPTY_GRACE: Duration = Duration::from_secs(1);
/// Distinct refused writes remembered for logging once each.
const WARNED_MAX: usize = 1024;

struct AttrFile {
    attr: &'static Attr,
    file: InPlaceFile,
    /// Created by us (or recreated) and not yet written: not a user write.
    fresh: bool,
}

enum Msg {
    Kick(Option<Sender<()>>),
    Stop,
}

/// The publisher of one process (one `Engine`) into one tree; see the
/// [module documentation](super) for the layout and the rules.
pub struct StatsTree {
    engine: Arc<dyn Source>,
    /// This program image publishes under `root` while the tree lives.
    _claim: RootClaim,
    root: PathBuf,
    pid: u32,
    starttime: u64,
    flags: Option<FlagsFn>,
    numa: bool,
    lock: Arc<TreeLock>,
    attrs: Vec<AttrFile>,
    proc_dir: PathBuf,
    ksm_stat: InPlaceFile,
    merging_pages: InPlaceFile,
    own_counters: InPlaceFile,
    own_tunables: InPlaceFile,
    stats: InPlaceFile,
    generation: InPlaceFile,
    last_error: InPlaceFile,
    shared_file: InPlaceFile,
    state_file: InPlaceFile,
    /// `twinpage/request`: the latest request of a reader for fresh counters.
    request: InPlaceFile,
    /// `proc/<pid>/served`: the request this process's counters answer.
    served: InPlaceFile,
    /// Per writable attribute: the sequence number of the last shared change
    /// this engine has (applied or made).
    synced: HashMap<&'static str, u64>,
    /// Per writable attribute: the engine's value after the last pass (a
    /// difference is a change made through the engine API).
    engine_view: HashMap<&'static str, String>,
    /// Attribute files found empty once: a writer may be between its
    /// `O_TRUNC` and its `write`; looked at again next pass.
    /// The file's mtime then and when it was first seen empty: an empty
    /// file seen again with a newer mtime is another writer's `O_TRUNC`.
    pending_empty: HashMap<&'static str, (i128, Instant)>,
    warned: HashSet<String>,
    passes: u64,
}

impl std::fmt::Debug for StatsTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsTree").field("root", &self.root).field("pid", &self.pid).finish_non_exhaustive()
    }
}

/// The running publisher. Dropping it stops the thread and removes this
/// process's `proc/<pid>` (its cumulative counters stay in the global ones).
#[derive(Debug)]
pub struct StatsTreeHandle {
    tx: Sender<Msg>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
    root: PathBuf,
    pid: u32,
}

impl StatsTreeHandle {
    /// The tree's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This process's directory, `proc/<pid>`.
    pub fn proc_dir(&self) -> PathBuf {
        self.root.join(layout::PROC).join(self.pid.to_string())
    }

    /// Starts a pass now without waiting for it.
    pub fn kick(&self) {
        let _ = self.tx.send(Msg::Kick(None));
        self.wake.notify();
    }

    /// Runs a pass now and waits (up to 5 s) until it is done; true when it
    /// was.
    pub fn publish_now(&self) -> bool {
        self.kicker().publish_now()
    }

    /// What asks this publisher for passes from any thread, without the
    /// handle: a caller that keeps the handle under a lock need not hold
    /// that lock while it waits.
    pub fn kicker(&self) -> StatsTreeKicker {
        StatsTreeKicker { tx: self.tx.clone(), wake: self.wake.clone(), root: self.root.clone() }
    }
}

/// Asks a running publisher for passes ([`StatsTreeHandle::kicker`]); once
/// the publisher stopped, its requests answer false.
#[derive(Debug, Clone)]
pub struct StatsTreeKicker {
    tx: Sender<Msg>,
    wake: Arc<Wake>,
    root: PathBuf,
}

impl StatsTreeKicker {
    /// Runs a pass now and waits (up to 5 s) until it is done; true when it
    /// was.
    pub fn publish_now(&self) -> bool {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Kick(Some(tx))).is_err() {
            return false;
        }
        self.wake.notify();
        rx.recv_timeout(Duration::from_secs(5)).is_ok()
    }

    /// [`publish_now`](Self::publish_now), then waits (up to `timeout`)
    /// until every other process on the tree not in `skip` has run a pass
    /// since, in which it applied what this one published: a write to `run`
    /// has then unmerged (2) or stopped merging (0) everywhere, as the
    /// kernel's write returns only then. Returns the processes that did not
    /// answer (a stopped one, say), for the caller to pass as `skip` next.
    pub fn publish_everywhere(&self, timeout: Duration, skip: &HashSet<u32>) -> io::Result<HashSet<u32>> {
        self.publish_now();
        super::Tree::at(self.root.clone()).refresh(timeout, skip)
    }
}

impl Drop for StatsTreeHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        self.wake.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn canonical(value: &str) -> Vec<u8> {
    kernel_compat::attrs::render(value).into_bytes()
}

/// The text to write to get a value as shown (`advisor_mode` shows
/// `[none] scan-time` but takes `none`).
fn write_text(name: &str, shown: &str) -> String {
    if name == "advisor_mode" {
        if let Some(m) = AdvisorMode::from_show(shown) {
            return m.as_str().to_string();
        }
    }
    if name == crate::tunables::MERGE_MODE {
        if let Some(m) = crate::tunables::MergeMode::from_show(shown) {
            return m.as_str().to_string();
        }
    }
    shown.to_string()
}

/// A process's `/proc/<pid>/ksm_stat` from its counters.
pub fn process_stat(s: &KsmStats, flags: ProcessFlags) -> KsmStat {
    let merging = s.twinpage_merging_pages;
    let zero = i64::try_from(s.ksm_zero_pages).unwrap_or(i64::MAX);
    KsmStat {
        ksm_rmap_items: s.rmap_items,
        ksm_zero_pages: zero,
        ksm_merging_pages: merging,
        ksm_process_profit: procfs::process_profit(merging, zero, s.rmap_items),
        ksm_merge_any: flags.merge_any,
        ksm_mergeable: flags.mergeable,
    }
}

fn own_counters_text(starttime: u64, s: &KsmStats) -> String {
    format!("starttime {starttime}\n{}", counters::render_lines(counters::of(s).iter().map(|(k, v)| (k.as_str(), *v))))
}

/// The roots this program image publishes under. A process's directory
/// with this process's start time under another root was left by the image
/// before an `exec`, which the kernel's counters forget as well.
static PUBLISHING: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// In the child of a fork: the parent's publishers are not this process's.
/// Only a try-lock and no freeing (the child may not be able to do more).
pub fn forget_parent_publishers() {
    if let Ok(mut roots) = PUBLISHING.try_lock() {
        std::mem::forget(std::mem::take(&mut *roots));
    }
}

/// One root in [`PUBLISHING`], given back on drop.
struct RootClaim(PathBuf);

impl RootClaim {
    /// None while this image publishes under `root` already.
    fn take(root: &Path) -> Option<RootClaim> {
        let mut roots = PUBLISHING.lock().unwrap_or_else(|e| e.into_inner());
        if roots.iter().any(|r| r == root) {
            return None;
        }
        roots.push(root.to_path_buf());
        Some(RootClaim(root.to_path_buf()))
    }
}

impl Drop for RootClaim {
    fn drop(&mut self) {
        PUBLISHING.lock().unwrap_or_else(|e| e.into_inner()).retain(|r| r != &self.0);
    }
}

/// The global counters of one pass.
struct Aggregate {
    counters: Counters,
    publishers: usize,
}

impl StatsTree {
    /// Publishes `engine`'s statistics under `root` (creating the tree if
    /// needed) and applies users' writes to the attribute files to it. The
    /// first pass is done before this returns, so the tree is complete then.
    ///
    /// Fails if the tree cannot be created, or if this process already runs
    /// a publisher on `root` (`AlreadyExists`).
    pub fn spawn<S: Source>(engine: Arc<S>, root: PathBuf, opts: StatsTreeOptions) -> io::Result<StatsTreeHandle> {
        let mut tree = StatsTree::open(engine, root.clone(), opts)?;
        // Watching before the first pass: a request made meanwhile is not missed.
        let wake = Arc::new(Wake::new(tree.request.path())?);
        tree.pass()?;
        let (tx, rx) = mpsc::channel();
        let pid = tree.pid;
        let waker = wake.clone();
        let thread = crate::threads::spawn("twinpage-stats", move || tree.run(rx, &waker))?;
        Ok(StatsTreeHandle { tx, wake, thread: Some(thread), root, pid })
    }

    fn open(engine: Arc<dyn Source>, root: PathBuf, opts: StatsTreeOptions) -> io::Result<Self> {
        let pid = std::process::id();
        let starttime =
            file::process_starttime(pid).ok_or_else(|| io::Error::other("cannot read this process's start time from /proc/self/stat"))?;
        let ksm_dir = root.join(layout::KSM);
        let tw = root.join(layout::TWINPAGE);
        file::create_dir(&root)?;
        file::check_root(&root)?;
        for d in [&ksm_dir, &root.join(layout::PROC), &tw] {
            file::create_dir(d)?;
        }
        let lock = Arc::new(TreeLock::open(&tw.join(layout::LOCK))?);
        let _guard = lock.lock_timeout(LOCK_TIMEOUT)?;
        let state_file = InPlaceFile::open(&tw.join(layout::STATE), 0o644)?;
        let proc_dir = root.join(layout::PROC).join(pid.to_string());
        let claim = RootClaim::take(&root).ok_or_else(|| {
            io::Error::new(io::ErrorKind::AlreadyExists, format!("this process already publishes into {}", root.display()))
        })?;
        if proc_dir.exists() {
            let old = counters::parse_lines(&fs::read_to_string(proc_dir.join(layout::COUNTERS)).unwrap_or_default());
            // Left by an earlier process with the same pid, or by this one
            // before it called exec (same start time; that image is gone,
            // and with it every page it had merged).
            let mut state = State::parse(&String::from_utf8_lossy(&state_file.read()?));
            retire_counters(&mut state, pid, &old);
            fs::remove_dir_all(&proc_dir)?;
            state_file.write(state.render().as_bytes())?;
        }
        file::create_dir(&proc_dir)?;
        let own_counters = InPlaceFile::open(&proc_dir.join(layout::COUNTERS), 0o444)?;
        own_counters.write(own_counters_text(starttime, &engine.stats()).as_bytes())?;
        let ksm_stat = InPlaceFile::open(&proc_dir.join(layout::KSM_STAT), 0o444)?;
        let merging_pages = InPlaceFile::open(&proc_dir.join(layout::MERGING_PAGES), 0o444)?;
        let own_tunables = InPlaceFile::open(&proc_dir.join(layout::OWN_TUNABLES), 0o444)?;
        let served = InPlaceFile::open(&proc_dir.join(layout::SERVED), 0o444)?;
        let mut attrs = Vec::new();
        for attr in crate::tunables::all_attrs().filter(|a| engine.show_attr(a.name).is_some()) {
            let path = ksm_dir.join(attr.name);
            let existed = path.exists();
            attrs.push(AttrFile { attr, file: InPlaceFile::open(&path, attr.mode())?, fresh: !existed });
        }
        let shared_file = InPlaceFile::open(&tw.join(layout::SHARED_TUNABLES), 0o644)?;
        let shared = SharedTunables::parse(&String::from_utf8_lossy(&shared_file.read()?));
        let numa = engine.show_attr("merge_across_nodes").is_some();
        let mut tree = StatsTree {
            _claim: claim,
            numa,
            root: root.clone(),
            pid,
            starttime,
            flags: opts.flags,
            lock: lock.clone(),
            attrs,
            proc_dir,
            ksm_stat,
            merging_pages,
            own_counters,
            own_tunables,
            stats: InPlaceFile::open(&tw.join(layout::STATS), 0o444)?,
            generation: InPlaceFile::open(&tw.join(layout::GENERATION), 0o644)?,
            last_error: InPlaceFile::open(&tw.join(layout::LAST_ERROR), 0o644)?,
            shared_file,
            state_file,
            request: InPlaceFile::open(&tw.join(layout::REQUEST), 0o644)?,
            served,
            synced: HashMap::new(),
            engine_view: HashMap::new(),
            pending_empty: HashMap::new(),
            warned: HashSet::new(),
            passes: 0,
            engine,
        };
        tree.engine_view = tree.engine_values();
        for name in tree.writable_names() {
            tree.synced.insert(name, 0);
            if opts.explicit.iter().any(|e| e == name) {
                // Set explicitly for this process: published to the tree
                // instead of adopting the tree's value.
                tree.synced.insert(name, shared.get(name).map_or(0, |t| t.seq));
                tree.engine_view.insert(name, String::new());
            }
        }
        Ok(tree)
    }

    fn run(mut self, rx: Receiver<Msg>, wake: &Wake) {
        'passes: loop {
            let ms = u64::from(self.engine.sleep_millisecs()).clamp(MIN_PERIOD_MS, MAX_PERIOD_MS);
            wake.wait(Duration::from_millis(ms));
            let mut replies = Vec::new();
            loop {
                match rx.try_recv() {
                    Ok(Msg::Stop) | Err(TryRecvError::Disconnected) => break 'passes,
                    Ok(Msg::Kick(reply)) => replies.extend(reply),
                    Err(TryRecvError::Empty) => break,
                }
            }
            if let Err(e) = self.pass() {
                self.warn(format!("pass:{:?}", e.kind()), format!("twinpage: cannot update {}: {e}", self.root.display()));
            }
            for r in replies {
                let _ = r.send(());
            }
        }
        if let Err(e) = self.retire() {
            log::warn!("twinpage: cannot remove {} from {}: {e}", self.proc_dir.display(), self.root.display());
        }
    }

    fn warn(&mut self, key: String, msg: String) {
        if self.warned.len() >= WARNED_MAX {
            self.warned.clear();
        }
        if self.warned.insert(key) {
            log::warn!("{msg}");
        }
    }

    fn writable_names(&self) -> Vec<&'static str> {
        self.attrs.iter().filter(|a| a.attr.writable).map(|a| a.attr.name).collect()
    }

    fn engine_values(&self) -> HashMap<&'static str, String> {
        self.writable_names().into_iter().map(|n| (n, self.engine.show_attr(n).unwrap_or_default())).collect()
    }

    /// One pass, under the lock: this process's files, the global counters,
    /// users' writes and shared tunables, and the generation.
    fn pass(&mut self) -> io::Result<()> {
        self.passes += 1;
        if self.passes.is_multiple_of(ENSURE_EVERY) {
            self.ensure_files()?;
        }
        // Read before the counters are taken: they answer this request.
        let request = String::from_utf8_lossy(&self.request.read()?).trim().parse::<u64>().unwrap_or(0);
        let stats = self.engine.stats();
        let lock = self.lock.clone();
        let _guard = lock.lock_timeout(LOCK_TIMEOUT)?;
        // Under the lock: other publishers read twinpage_counters under it.
        self.write_own(&stats)?;
        let mut state = State::parse(&String::from_utf8_lossy(&self.state_file.read()?));
        let mut shared = SharedTunables::parse(&String::from_utf8_lossy(&self.shared_file.read()?));
        let mut agg = self.aggregate(&mut state, Some(&stats), scanning(&shared))?;
        let pages_shared = u64::try_from(agg.counters.get("pages_shared").copied().unwrap_or(0)).unwrap_or(0);
        let run_seq = shared.get("run").map(|t| t.seq);
        let before = self.engine_view.clone();
        self.sync_tunables(&mut shared, &mut state, pages_shared)?;
        if shared.get("run").is_some_and(|t| Some(t.seq) != run_seq && t.value == "2") {
            // run=2 made in this pass: ksmd's full_scans starts again from 0 (each
            // process's own count did, in its engine).
            state.full_scans = 0;
        }
        if self.engine_view != before {
            // What this pass applied (run=2 unmerging everything, above all)
            // shows in the counters it publishes, as sysfs shows it as soon
            // as the write returns.
            let stats = self.engine.stats();
            self.write_own(&stats)?;
            agg = self.aggregate(&mut state, Some(&stats), scanning(&shared))?;
        }
        // Answered once what the tree held when the request came is applied
        // here too: a writer that asks after its write ([`StatsTreeKicker::
        // publish_everywhere`]) knows every process took it (run=2 unmerged).
        self.served.write(format!("{request}\n").as_bytes())?;
        let own: String =
            self.attrs.iter().filter(|a| a.attr.writable).map(|a| format!("{} {}\n", a.attr.name, self.engine_view[a.attr.name])).collect();
        self.own_tunables.write(own.as_bytes())?;
        self.write_global(&agg)?;
        self.shared_file.write(shared.render().as_bytes())?;
        self.state_file.write(state.render().as_bytes())?;
        self.bump_generation()
    }

    /// Recreates files somebody removed.
    fn ensure_files(&mut self) -> io::Result<()> {
        for f in [
            &mut self.ksm_stat,
            &mut self.merging_pages,
            &mut self.own_counters,
            &mut self.own_tunables,
            &mut self.stats,
            &mut self.generation,
            &mut self.last_error,
            &mut self.shared_file,
            &mut self.state_file,
            &mut self.request,
            &mut self.served,
        ] {
            f.ensure()?;
        }
        for a in &mut self.attrs {
            if a.file.ensure()? {
                a.fresh = true;
            }
        }
        Ok(())
    }

    fn write_own(&mut self, s: &KsmStats) -> io::Result<()> {
        let flags = match &self.flags {
            Some(f) => f(s),
            None => ProcessFlags { merge_any: false, mergeable: s.twinpage_pages_registered > 0 },
        };
        let stat = process_stat(s, flags);
        self.own_counters.write(own_counters_text(self.starttime, s).as_bytes())?;
        self.ksm_stat.write(stat.render().as_bytes())?;
        self.merging_pages.write(procfs::render_merging_pages(stat.ksm_merging_pages).as_bytes())?;
        Ok(())
    }

    /// Reads every process's counters (retiring the dead) and combines them.
    /// `own` is this process's, or `None` when it is leaving. A full-scan
    /// round is one that every running process with registered memory has
    /// completed (a stopped one is left out); rounds count only while
    /// `scanning` (`run` is 1): after `run=2` the global count stays at 0,
    /// as ksmd's, while processes that have not yet taken it finish their
    /// rounds.
    fn aggregate(&mut self, state: &mut State, own: Option<&KsmStats>, scanning: bool) -> io::Result<Aggregate> {
        let mut live: Vec<(u32, u64, Counters)> = Vec::new();
        let mut stopped: Vec<u32> = Vec::new();
        if let Some(s) = own {
            live.push((self.pid, self.starttime, counters::of(s)));
        }
        let entries = match fs::read_dir(self.root.join(layout::PROC)) {
            Ok(e) => e.collect::<Result<Vec<_>, _>>()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if pid == self.pid {
                continue;
            }
            let dir = entry.path();
            let c = counters::parse_lines(&fs::read_to_string(dir.join(layout::COUNTERS)).unwrap_or_default());
            let start = c.get("starttime").and_then(|&v| u64::try_from(v).ok());
            let running = file::process_state(pid);
            match start {
                Some(s) if running.map(|r| r.starttime) == Some(s) => {
                    if running.is_some_and(|r| r.stopped) {
                        stopped.push(pid);
                    }
                    live.push((pid, s, c));
                }
                // A directory without counters of a running process: not ours to judge.
                None if running.is_some() => {}
                _ => {
                    retire_counters(state, pid, &c);
                    let _ = fs::remove_dir_all(&dir);
                }
            }
        }
        // Full-scan rounds.
        state.marks.retain(|pid, _| live.iter().any(|l| l.0 == *pid));
        for (pid, start, _) in &live {
            let m = state.marks.entry(*pid).or_insert(Mark { starttime: *start, rounds: 0 });
            if m.starttime != *start {
                *m = Mark { starttime: *start, rounds: 0 };
            }
        }
        let value = |c: &Counters, n: &str| c.get(n).copied().unwrap_or(0);
        // A process's full_scans starts again from 0 at run=2: so do its
        // rounds, or the global count would wait for it to pass its old one.
        for (pid, _, c) in &live {
            let own = u64::try_from(value(c, "full_scans")).unwrap_or(0);
            if let Some(m) = state.marks.get_mut(pid) {
                m.rounds = m.rounds.min(own);
            }
        }
        // A stopped process scans nothing until it continues: ksmd would
        // scan it, nobody here can, and the processes that run must not
        // wait for it (its own count resumes where it stopped, so the global
        // one waits for its next full scan only once it runs again).
        let participants: Vec<&(u32, u64, Counters)> =
            live.iter().filter(|l| value(&l.2, "twinpage_pages_registered") > 0 && !stopped.contains(&l.0)).collect();
        let rounds = participants
            .iter()
            .map(|(pid, _, c)| u64::try_from(value(c, "full_scans")).unwrap_or(0).saturating_sub(state.marks[pid].rounds))
            .min()
            .unwrap_or(0);
        if rounds > 0 && scanning {
            state.full_scans += rounds;
            for (pid, _, _) in &participants {
                if let Some(m) = state.marks.get_mut(pid) {
                    m.rounds += rounds;
                }
            }
        }
        let mut global = Counters::new();
        for &(name, how) in FIELDS {
            let vals = live.iter().map(|l| value(&l.2, name));
            let v = match how {
                Combine::Sum => vals.sum(),
                Combine::Cumulative => state.retired.get(name).copied().unwrap_or(0) + vals.sum::<i128>(),
                Combine::Rounds => i128::from(state.full_scans),
                Combine::Max => vals.max().unwrap_or(0),
            };
            global.insert(name.to_string(), v);
        }
        Ok(Aggregate { counters: global, publishers: live.len() })
    }

    /// What a user's write is checked against: the kernel's rules on the
    /// tunables every publisher agreed on (not this engine's, which may not
    /// have applied another process's write yet).
    fn context(&self, shared: &SharedTunables, pages_shared: u64) -> WriteContext {
        crate::tunables::model_from_shown(|n| shared.value(n), self.numa).context(pages_shared)
    }

    /// Brings the engine, the shared tunables and the writable files into
    /// agreement: changes other publishers made are applied here (in the
    /// order they were made), changes made through this engine's API are
    /// published, users' writes are checked with the kernel's rules and
    /// applied or refused, and every writable file ends up showing the
    /// shared value.
    fn sync_tunables(&mut self, shared: &mut SharedTunables, state: &mut State, pages_shared: u64) -> io::Result<()> {
        let names = self.writable_names();
        let now = self.engine_values();
        let local: Vec<&'static str> = names.iter().copied().filter(|n| now.get(n) != self.engine_view.get(n)).collect();
        for &n in &names {
            if shared.get(n).is_none() {
                let seq = shared.change(n, now[n].clone());
                self.synced.insert(n, seq);
                if let Some(a) = self.attrs.iter_mut().find(|a| a.attr.name == n) {
                    a.fresh = true;
                }
            }
        }
        // Users' writes (against what the files showed after the last pass).
        let mut seen: HashMap<&'static str, (Vec<u8>, i128)> = HashMap::new();
        let mut writes: Vec<(i128, usize, &'static str)> = Vec::new();
        for (i, a) in self.attrs.iter().enumerate().filter(|(_, a)| a.attr.writable) {
            let n = a.attr.name;
            let content = a.file.read()?;
            let mtime = a.file.mtime()?;
            let Some(t) = shared.get(n) else { continue };
            let unchanged = a.fresh || (content == canonical(&t.value) && mtime == t.mtime);
            if unchanged {
                self.pending_empty.remove(n);
            } else if content.is_empty() && !self.pending_empty.get(n).is_some_and(|&(m, t)| m == mtime && t.elapsed() >= EMPTY_GRACE) {
                // Perhaps between a writer's O_TRUNC and its write(2), which a
                // loaded machine can hold apart for several passes (and
                // mtimes are coarse): an empty write only once it has stayed
                // empty for EMPTY_GRACE.
                let since = match self.pending_empty.get(n) {
                    Some(&(m, t)) if m == mtime => t,
                    _ => Instant::now(),
                };
                self.pending_empty.insert(n, (mtime, since));
            } else {
                self.pending_empty.remove(n);
                writes.push((mtime, i, n));
            }
            seen.insert(n, (content, mtime));
        }
        // Changes made by other publishers.
        let mut remote: Vec<(u64, &'static str)> = names
            .iter()
            .filter_map(|&n| {
                let t = shared.get(n)?;
                (t.seq > self.synced.get(n).copied().unwrap_or(0)).then_some((t.seq, n))
            })
            .collect();
        remote.sort_unstable();
        // What this pass itself changed in the engine (with side effects):
        // only those take their new values into `engine_view` at the end.
        let mut applied: HashSet<&'static str> = HashSet::new();
        for &(seq, n) in &remote {
            let before = self.engine_values();
            let v = shared.value(n).unwrap_or_default().to_string();
            let advised =
                n == "pages_to_scan" && shared.value("advisor_mode").and_then(AdvisorMode::from_show) == Some(AdvisorMode::ScanTime);
            if advised && self.engine.show_attr("advisor_mode").and_then(|m| AdvisorMode::from_show(&m)) == Some(AdvisorMode::ScanTime) {
                // The advisor's choice (twinpaged's, for all its agents).
                if let Ok(p) = v.parse() {
                    self.engine.follow_advisor(p);
                }
            } else if self.engine.show_attr(n).as_deref() != Some(v.as_str()) {
                match self.engine.set_attr(n, &write_text(n, &v)) {
                    Ok(()) => log::info!("twinpage: {n} = {v} (from {})", self.root.display()),
                    Err(e) => self.warn(
                        format!("remote:{n}:{v}:{}", e.name()),
                        format!("twinpage: cannot apply {n} = {v} from {} to this process: {}", self.root.display(), e.name()),
                    ),
                }
            }
            self.synced.insert(n, seq);
            let after = self.engine_values();
            applied.extend(after.iter().filter(|(k, v)| before.get(*k) != Some(*v)).map(|(k, _)| *k));
        }
        // Changes made through this engine's API.
        for n in local {
            if remote.iter().any(|r| r.1 == n) {
                continue;
            }
            let e = self.engine.show_attr(n).unwrap_or_default();
            if shared.value(n) != Some(e.as_str()) {
                let seq = shared.change(n, e);
                self.synced.insert(n, seq);
            }
        }
        // Users' writes, in the order they were made.
        writes.sort_unstable();
        for (_, _, n) in writes {
            let content = seen[n].0.clone();
            self.apply_user_write(n, &content, shared, state, pages_shared, &mut applied);
        }
        // Every writable file shows the shared value, canonically printed.
        for a in &mut self.attrs {
            let n = a.attr.name;
            if !a.attr.writable || self.pending_empty.contains_key(n) {
                continue;
            }
            let (Some(t), Some((content, mtime))) = (shared.get(n), seen.get(n)) else { continue };
            let want = canonical(&t.value);
            if *content != want || a.fresh {
                if !a.fresh && a.file.read()? != *content {
                    // A user wrote again during this pass: keep the write for
                    // the next pass rather than overwrite it unseen.
                    continue;
                }
                a.file.overwrite(&want)?;
                let m = a.file.mtime()?;
                shared.set_mtime(n, m);
            } else if *mtime != t.mtime {
                shared.set_mtime(n, *mtime);
            }
            a.fresh = false;
        }
        // A change made through the API while this pass ran (a served
        // write on the program's thread) is not in `now`: it stays a change
        // against the view, for the next pass to publish, instead of being
        // taken as seen.
        for (n, v) in self.engine_values() {
            let seen = if applied.contains(n) { v } else { now.get(n).cloned().unwrap_or(v) };
            self.engine_view.insert(n, seen);
        }
        Ok(())
    }

    /// A user wrote `content` into attribute `name`: applied like `write(2)`
    /// to sysfs (in chunks of at most 4096 bytes, each checked with the
    /// kernel's rules against the tree's state), or refused.
    fn apply_user_write(
        &mut self,
        name: &'static str,
        content: &[u8],
        shared: &mut SharedTunables,
        state: &mut State,
        pages_shared: u64,
        applied: &mut HashSet<&'static str>,
    ) {
        let chunks: Vec<&[u8]> = if content.is_empty() { vec![content] } else { content.chunks(SYSFS_WRITE_MAX).collect() };
        for chunk in chunks {
            let ctx = self.context(shared, pages_shared);
            let result = match crate::tunables::model_write(name, chunk, &ctx) {
                Ok(None) => Ok(()),
                Ok(Some(v)) => {
                    let before = self.engine_values();
                    let r = self.engine.set_attr(name, &v);
                    if r.is_ok() {
                        let after = self.engine_values();
                        for (&n, val) in after.iter().filter(|&(&n, val)| n == name || before.get(n) != Some(val)) {
                            applied.insert(n);
                            if shared.value(n) != Some(val.as_str()) {
                                let seq = shared.change(n, val.clone());
                                self.synced.insert(n, seq);
                            }
                        }
                        log::info!("twinpage: {name} = {} (written to {})", after[name], self.root.display());
                    }
                    r
                }
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                self.refuse(name, content, e, state);
                return;
            }
        }
    }

    fn refuse(&mut self, name: &str, content: &[u8], e: WriteError, state: &mut State) {
        state.errors += 1;
        let shown = String::from_utf8_lossy(content);
        let line = format!("{} {} {} {} {:?}\n", state.errors, self.pid, name, e.name(), shown);
        if let Err(err) = self.last_error.overwrite(line.as_bytes()) {
            log::warn!("twinpage: cannot write {}: {err}", self.last_error.path().display());
        }
        let path = self.root.join(layout::KSM).join(name);
        self.warn(
            format!("refused:{name}:{}:{shown:?}", e.name()),
            format!("twinpage: write {shown:?} to {} refused: {}; the file shows the current value again", path.display(), e.name()),
        );
    }

    fn write_global(&mut self, agg: &Aggregate) -> io::Result<()> {
        for a in self.attrs.iter().filter(|a| !a.attr.writable) {
            let v = agg.counters.get(a.attr.name).copied().unwrap_or(0);
            a.file.write(kernel_compat::attrs::render(&counters::show(a.attr, v)).as_bytes())?;
        }
        let mut text = counters::render_lines(FIELDS.iter().map(|&(n, _)| (n, agg.counters.get(n).copied().unwrap_or(0))));
        text.push_str(&format!("twinpage_publishers {}\n", agg.publishers));
        self.stats.write(text.as_bytes())?;
        Ok(())
    }

    fn bump_generation(&mut self) -> io::Result<()> {
        let g: u64 = String::from_utf8_lossy(&self.generation.read()?).trim().parse().unwrap_or(0);
        self.generation.overwrite(format!("{}\n", g + 1).as_bytes())
    }

    /// Leaves the tree: this process's cumulative counters go into the
    /// retired totals, its directory goes away, and the global files are
    /// recomputed without it.
    fn retire(&mut self) -> io::Result<()> {
        let stats = self.engine.stats();
        let lock = self.lock.clone();
        let _guard = lock.lock_timeout(LOCK_TIMEOUT)?;
        let mut state = State::parse(&String::from_utf8_lossy(&self.state_file.read()?));
        retire_counters(&mut state, self.pid, &counters::of(&stats));
        fs::remove_dir_all(&self.proc_dir)?;
        let shared = SharedTunables::parse(&String::from_utf8_lossy(&self.shared_file.read()?));
        let agg = self.aggregate(&mut state, None, scanning(&shared))?;
        self.write_global(&agg)?;
        self.state_file.write(state.render().as_bytes())?;
        self.bump_generation()
    }
}

/// Whether ksmd would be scanning: `run` is 1 (or not set yet).
fn scanning(shared: &SharedTunables) -> bool {
    shared.value("run").is_none_or(|v| v == "1")
}

/// Adds a leaving process's cumulative counters to the retired totals.
fn retire_counters(state: &mut State, pid: u32, c: &Counters) {
    for &(name, how) in FIELDS {
        if how == Combine::Cumulative {
            *state.retired.entry(name.to_string()).or_insert(0) += c.get(name).copied().unwrap_or(0);
        }
    }
    state.marks.remove(&pid);
}
