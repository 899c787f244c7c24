//! The agent: one per process, created on the first registration (a process
//! that never marks memory mergeable pays nothing but the checks at load).

use std::cell::Cell;
use std::ffi::{c_int, c_ulong};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use twinpage::link::DaemonConfig;
use twinpage::statsfs::{ProcessFlags, StatsTree, StatsTreeHandle, StatsTreeOptions};
use twinpage::{Engine, EngineError};

use crate::config::{self, Config};

const LOADING: u8 = 0;
const CONFIGURED: u8 = 1;
const ACTIVE: u8 = 2;
const DISABLED: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(LOADING);
static CONFIG: OnceLock<Config> = OnceLock::new();
static AGENT: AtomicPtr<Agent> = AtomicPtr::new(std::ptr::null_mut());
static INIT: Mutex<()> = Mutex::new(());

/// Set in the child of a fork whose parent merged any (`PR_SET_MEMORY_MERGE`):
/// the child's agent is made at its first `mmap` or `prctl`, in the program's
/// own context, never in the fork handler.
static MERGE_ANY_PENDING: AtomicBool = AtomicBool::new(false);

/// Whether the agent should be made now for merge-any (see [`MERGE_ANY_PENDING`]).
pub fn merge_any_pending() -> bool {
    MERGE_ANY_PENDING.load(Ordering::Relaxed)
}

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside twinpage: calls it makes to interposed
/// functions (the store's own mmap, say) go straight to the kernel.
pub struct Reentry(());

impl Reentry {
    pub fn enter() -> Option<Self> {
        INSIDE.with(|i| if i.replace(true) { None } else { Some(Reentry(())) })
    }
}

impl Drop for Reentry {
    fn drop(&mut self) {
        INSIDE.with(|i| i.set(false));
    }
}

/// The per-process agent.
pub struct Agent {
    engine: Arc<Engine>,
    cfg: &'static Config,
    merge_any: AtomicBool,
    /// Ranges the host program registered with its own userfaultfd
    /// (postcopy, background snapshot): twinpage stays out of them until
    /// the program unregisters them or closes that userfaultfd.
    excluded: Mutex<Vec<Handover>>,
}

/// A range handed over to the host program's own userfaultfd `fd`.
struct Handover {
    fd: c_int,
    start: usize,
    end: usize,
    /// What twinpage had registered (or was asked to register meanwhile)
    /// inside the range: registered again when the range comes back.
    parts: Vec<(usize, usize)>,
}

/// Number of live hand-overs: `close` looks at the agent only when nonzero.
static HANDOVERS: AtomicUsize = AtomicUsize::new(0);

/// Whether any host userfaultfd holds memory that twinpage handed over.
pub fn handovers_active() -> bool {
    HANDOVERS.load(Ordering::Acquire) != 0
}

/// The ranges sorted, with overlapping and touching ones joined: guest RAM
/// comes back as a few ranges, not one per mapping merging left behind
/// (each registration reads the process's maps).
fn coalesce(mut ranges: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    ranges.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `[s, e)` clipped to `[lo, hi)`, if not empty.
fn clip((s, e): (usize, usize), lo: usize, hi: usize) -> Option<(usize, usize)> {
    let (s, e) = (s.max(lo), e.min(hi));
    (s < e).then_some((s, e))
}

/// Runs when the library is loaded: reads the environment, sets up logging.
pub fn load() {
    let cfg = match config::from_env() {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("twinpage: invalid environment: {msg}; twinpage is disabled and the program runs without it");
            STATE.store(DISABLED, Ordering::SeqCst);
            return;
        }
    };
    let _ = env_logger::Builder::new()
        .parse_filters(&format!("twinpage={0},twinpage_preload={0}", cfg.log))
        .format(|buf, rec| {
            use std::io::Write;
            writeln!(buf, "{}", rec.args())
        })
        .try_init();
    let merge_any = cfg.merge_any;
    let _ = CONFIG.set(cfg);
    STATE.store(CONFIGURED, Ordering::SeqCst);
    // SAFETY: the handlers are plain extern "C" functions valid for the
    // lifetime of the process (this library is never unloaded).
    unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork_parent), Some(after_fork_child)) };
    if merge_any {
        // PR_SET_MEMORY_MERGE survives exec, as the kernel's flag does.
        if let Some(a) = get_or_init() {
            a.merge_any.store(true, Ordering::SeqCst);
            MERGE_ANY.store(true, Ordering::SeqCst);
        }
    }
}

/// The configuration read at load, when it was valid.
pub fn config() -> Option<&'static Config> {
    CONFIG.get()
}

/// The active agent, if any.
pub fn get() -> Option<&'static Agent> {
    if STATE.load(Ordering::Acquire) != ACTIVE {
        return None;
    }
    let p = AGENT.load(Ordering::Acquire);
    // SAFETY: AGENT is set once to a leaked Box and never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// The agent, created now if twinpage is configured and not yet running.
pub fn get_or_init() -> Option<&'static Agent> {
    if let Some(a) = get() {
        return Some(a);
    }
    if STATE.load(Ordering::Acquire) != CONFIGURED {
        return None;
    }
    let _lock = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = get() {
        return Some(a);
    }
    if STATE.load(Ordering::Acquire) != CONFIGURED {
        return None;
    }
    let cfg = CONFIG.get()?;
    let engine = match Engine::with_store_dir(cfg.store_dir.as_deref()) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            log::warn!("twinpage: cannot start: {e}; memory is not merged and the program runs on");
            STATE.store(DISABLED, Ordering::SeqCst);
            return None;
        }
    };
    for (attr, value) in &cfg.tunables {
        if let Err(e) = engine.set_attr(attr, value) {
            // Checked at load against the kernel's rules; only a state-dependent
            // refusal can get here.
            log::warn!("twinpage: TWINPAGE_{}={value:?} refused ({})", attr.to_ascii_uppercase(), e.name());
        }
    }
    engine.set_daemon(cfg.socket.clone().map(|socket| DaemonConfig { socket, domain: cfg.domain.clone() }));
    start_stats(&engine, cfg);
    let merge_any = AtomicBool::new(MERGE_ANY_PENDING.swap(false, Ordering::SeqCst));
    let agent = Box::new(Agent { engine, cfg, merge_any, excluded: Mutex::new(Vec::new()) });
    AGENT.store(Box::into_raw(agent), Ordering::Release);
    STATE.store(ACTIVE, Ordering::Release);
    get()
}

/// Mirrors the agent's merge-any flag for the stats tree's `ksm_stat`.
static MERGE_ANY: AtomicBool = AtomicBool::new(false);
static STATS: Mutex<Option<StatsTreeHandle>> = Mutex::new(None);

/// Starts the publisher of `$TWINPAGE_DIR` (kernel/mm/ksm and proc/<pid>);
/// without it (an unwritable directory, say) twinpage merges all the same.
fn start_stats(engine: &Arc<Engine>, cfg: &Config) {
    let opts = StatsTreeOptions {
        flags: Some(Arc::new(|s: &twinpage::KsmStats| ProcessFlags {
            merge_any: MERGE_ANY.load(Ordering::Relaxed),
            mergeable: s.twinpage_pages_registered > 0,
        })),
        explicit: cfg.explicit.clone(),
    };
    match StatsTree::spawn(engine.clone(), cfg.dir.clone(), opts) {
        Ok(h) => {
            *STATS.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
            // SAFETY: a plain extern "C" function, valid for the life of the process.
            unsafe { libc::atexit(stop_stats) };
        }
        Err(e) => log::warn!("twinpage: cannot write statistics under {}: {e}", cfg.dir.display()),
    }
}

/// Publishes this process's tunables to the tree now and waits until every
/// process on it has applied them: a write to a served sysfs file is then
/// the tree's when `write(2)` returns, ordered before any write another
/// process makes later, as writes to the kernel's one file are; and `run=2`
/// has unmerged every process's pages by then, as the kernel's has. A
/// stopped process is not waited for (it takes the write when it
/// continues); one that does not answer within [`EVERYWHERE_WAIT`] is not
/// waited for again until it answers.
pub fn publish_now() {
    static UNANSWERED: Mutex<Option<std::collections::HashSet<u32>>> = Mutex::new(None);
    // No lock held while it waits: a fork meanwhile would leave the child a
    // lock nobody releases (its exit, `stop_stats`, would hang on STATS).
    let kicker = STATS.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|h| h.kicker());
    if let Some(h) = kicker {
        let known = UNANSWERED.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
        match h.publish_everywhere(EVERYWHERE_WAIT, &known) {
            Ok(left) => {
                let (stopped, stuck): (Vec<u32>, Vec<u32>) =
                    left.iter().filter(|p| !known.contains(p)).partition(|&&p| twinpage::statsfs::process_stopped(p));
                if !stopped.is_empty() {
                    log::info!("twinpage: processes {stopped:?} on the tree are stopped: they take the write when they continue");
                }
                if !stuck.is_empty() {
                    log::warn!("twinpage: processes {stuck:?} on the tree did not take a write within {EVERYWHERE_WAIT:?}");
                }
                *UNANSWERED.lock().unwrap_or_else(|e| e.into_inner()) = Some(left);
            }
            Err(e) => log::warn!("twinpage: cannot ask the tree's other processes to take a write: {e}"),
        }
    }
}

/// How long a served write waits for the tree's other processes.
const EVERYWHERE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// At exit: the publisher records that this process is gone.
extern "C" fn stop_stats() {
    let _ = std::panic::catch_unwind(|| {
        let h = STATS.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(h);
    });
}

/// Turns twinpage off for the rest of the process (after an internal error).
pub fn disable(why: &str) {
    if STATE.swap(DISABLED, Ordering::SeqCst) != DISABLED {
        log::error!("twinpage: {why}");
    }
}

/// A pipe whose write end only the child keeps: EOF tells the parent that
/// the child has copied its inherited merged memory (or exec'd, or died).
static FORK_PIPE: Mutex<Option<(std::io::PipeReader, std::io::PipeWriter)>> = Mutex::new(None);

extern "C" fn before_fork() {
    let _ = std::panic::catch_unwind(|| {
        let Some(a) = get() else { return };
        twinpage::host::fork::remember_stores(&a.engine);
        if let (Ok(pipe), Ok(mut g)) = (std::io::pipe(), FORK_PIPE.try_lock()) {
            *g = Some(pipe);
        }
    });
}

/// In the parent: store pages are not freed until the child is done copying.
extern "C" fn after_fork_parent() {
    let _ = std::panic::catch_unwind(|| {
        let Some((mut rd, wr)) = FORK_PIPE.try_lock().ok().and_then(|mut g| g.take()) else { return };
        // The child holds its copy of the write end; ours goes now.
        drop(wr);
        let Some(a) = get() else { return };
        let hold = a.engine.hold_frees();
        let waiter = twinpage::host::spawn_thread("twinpage-fork", move || {
            // Until EOF: the child closed its end (interrupted reads are retried).
            let _ = std::io::copy(&mut rd, &mut std::io::sink());
            drop(hold);
        });
        if waiter.is_err() {
            log::warn!("twinpage: cannot wait for a forked child; store pages are freed at once");
        }
    });
}

/// In the child of a fork: twinpage starts clean (no registrations, threads
/// start again on the next one). Inherited store mappings get private copies
/// first, so the parent freeing a store page can never change the child's memory.
/// Like `twinpage::host::fork`, nothing here allocates, locks (but by trying) or logs.
extern "C" fn after_fork_child() {
    let _ = std::panic::catch_unwind(|| {
        let was_active = STATE.load(Ordering::SeqCst) == ACTIVE;
        let merge_any = get().is_some_and(|a| a.merge_any.load(Ordering::SeqCst));
        // The parent's daemon connection is the parent's: keeping it open here
        // would hide the parent's exit from the daemon.
        if let Some(fd) = get().and_then(|a| a.engine.daemon_raw_fd()) {
            // SAFETY: the inherited copy of the parent's socket; the parent's
            // engine, which owns it, is never used (nor dropped) in the child.
            unsafe { libc::close(fd) };
        }
        AGENT.store(std::ptr::null_mut(), Ordering::SeqCst);
        // The parent's publisher thread does not exist here; forget its handle
        // without running its Drop.
        if let Ok(mut g) = STATS.try_lock() {
            std::mem::forget(g.take());
        }
        twinpage::statsfs::forget_parent_publishers();
        if was_active {
            STATE.store(CONFIGURED, Ordering::SeqCst);
            twinpage::host::fork::copy_inherited_store_mappings();
            MERGE_ANY_PENDING.store(merge_any, Ordering::SeqCst);
        }
        // Copies done: the parent may free store pages again (dropping the
        // child's copies of the pipe only closes them).
        drop(FORK_PIPE.try_lock().ok().and_then(|mut g| g.take()));
    });
}

fn errno(e: c_int) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl Agent {
    /// This process's engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// `PR_SET_MEMORY_MERGE` is in force (`ksm_merge_any`).
    pub fn merges_any(&self) -> bool {
        self.merge_any.load(Ordering::Relaxed)
    }

    /// `[addr, addr+len)` without the ranges handed over to the program's
    /// own userfaultfd.
    fn not_excluded(&self, addr: usize, len: usize) -> Vec<(usize, usize)> {
        let ex = self.excluded.lock().unwrap_or_else(|e| e.into_inner());
        let cut: Vec<(usize, usize)> = ex.iter().map(|h| (h.start, h.end)).collect();
        twinpage::host::without(addr, addr.saturating_add(len), &cut)
    }

    fn register(&self, addr: usize, len: usize) -> io::Result<c_int> {
        self.register_with(addr, len, None)
    }

    /// `register`, with the mappings' advice known (see
    /// `Engine::register_with`).
    fn register_with(&self, addr: usize, len: usize, advice: Option<twinpage::engine::Advice>) -> io::Result<c_int> {
        let mut result = Ok(0);
        {
            // What falls in a handed-over range is remembered for its return.
            let end = addr.saturating_add(len);
            let mut ex = self.excluded.lock().unwrap_or_else(|e| e.into_inner());
            for h in ex.iter_mut() {
                if let Some(p) = clip((addr, end), h.start, h.end) {
                    h.parts.push(p);
                }
            }
        }
        for (s, e) in self.not_excluded(addr, len) {
            match self.engine.register_with(s, e - s, advice) {
                Ok(()) | Err(EngineError::Shared) => {}
                Err(EngineError::Unmapped) => result = Err(errno(libc::ENOMEM)),
                Err(EngineError::Inval) => return Err(errno(libc::EINVAL)),
                Err(err) => log::warn!("twinpage: cannot register {s:#x}..{e:#x}: {err}"),
            }
        }
        result
    }

    /// `madvise`: `Some(result)` when handled here, `None` to pass it on.
    pub fn madvise(&self, addr: usize, len: usize, advice: c_int, raw: fn(usize, usize, c_int) -> c_int) -> Option<io::Result<c_int>> {
        match advice {
            libc::MADV_MERGEABLE => {
                let len = match madvise_range(addr, len) {
                    Err(e) => return Some(Err(errno(e))),
                    Ok(0) => return Some(Ok(0)),
                    Ok(len) => len,
                };
                let r = self.register(addr, len);
                if self.cfg.pass_mergeable && raw(addr, len, advice) != 0 {
                    log::warn!("twinpage: the kernel refused MADV_MERGEABLE at {addr:#x}");
                }
                Some(r)
            }
            libc::MADV_UNMERGEABLE => {
                // Arguments the kernel refuses or an empty range: it answers.
                let Ok(len @ 1..) = madvise_range(addr, len) else { return None };
                self.forget_handed_over(addr, addr.saturating_add(len));
                if let Err(e) = self.engine.unregister(addr, len) {
                    log::warn!("twinpage: unmerge at {addr:#x} failed: {e}");
                }
                None
            }
            libc::MADV_DONTNEED | libc::MADV_REMOVE | libc::MADV_FREE | 24 /* MADV_DONTNEED_LOCKED */ => {
                if !self.engine.overlaps(addr, len) {
                    return None;
                }
                let r = self.engine.discard_with(addr, len, || raw(addr, len, advice));
                Some(if r < 0 { Err(errno(-r)) } else { Ok(r) })
            }
            _ => None,
        }
    }

    /// `munmap`: the range leaves the registry before the kernel unmaps it.
    pub fn munmap(&self, addr: usize, len: usize, raw: fn(usize, usize) -> c_int) -> Option<c_int> {
        let r = if self.engine.overlaps(addr, len) {
            self.engine.unmap_with(addr, len, || raw(addr, len))
        } else if handovers_active() {
            raw(addr, len)
        } else {
            return None;
        };
        if r == 0 {
            self.forget_handed_over(addr, addr.saturating_add(len));
        }
        Some(r)
    }

    /// `mmap`: a fixed mapping over registered memory replaces it; with
    /// PR_SET_MEMORY_MERGE, new private anonymous memory is registered.
    #[allow(clippy::too_many_arguments)]
    pub fn mmap(
        &self,
        addr: usize,
        len: usize,
        prot: c_int,
        flags: c_int,
        fd: c_int,
        off: i64,
        raw: fn(usize, usize, c_int, c_int, c_int, i64) -> isize,
    ) -> Option<isize> {
        let fixed = flags & libc::MAP_FIXED != 0 && flags & libc::MAP_FIXED_NOREPLACE == 0;
        let r = if fixed && self.engine.overlaps(addr, len) {
            self.engine.unmap_with(addr, len, || raw(addr, len, prot, flags, fd, off))
        } else {
            raw(addr, len, prot, flags, fd, off)
        };
        if fixed && r >= 0 {
            self.forget_handed_over(addr, addr.saturating_add(len));
        }
        let anon_private = flags & libc::MAP_ANONYMOUS != 0 && flags & libc::MAP_PRIVATE != 0;
        if r >= 0 && anon_private && prot & libc::PROT_WRITE != 0 && self.merge_any.load(Ordering::Relaxed) {
            let _ = self.register(r as usize, len);
        }
        Some(r)
    }

    /// `mremap`: merged pages are unmerged before the memory moves, and the
    /// moved range is registered again at its new address.
    pub fn mremap(
        &self,
        old: usize,
        old_len: usize,
        new_len: usize,
        flags: c_int,
        new_addr: usize,
        raw: fn(usize, usize, usize, c_int, usize) -> isize,
    ) -> Option<isize> {
        let kinds = self.engine.registered_kinds_in(old, old_len);
        let advice = Some(self.engine.advice_in(old, old_len));
        let parts: Vec<(usize, usize)> = kinds.iter().map(|&(s, e, _)| (s, e)).collect();
        let _ = self.engine.unregister(old, old_len);
        let fixed_over = flags & libc::MREMAP_FIXED != 0 && self.engine.overlaps(new_addr, new_len);
        // A page written inside a store mapping stays there: growing that
        // mapping would show more of the store file.
        let grows_store = twinpage::host::mremap::grows_store_mapping(&self.engine, old, old_len, new_len);
        let call = || {
            if grows_store {
                twinpage::host::mremap::emulate(old, old_len, new_len, flags, new_addr)
            } else {
                raw(old, old_len, new_len, flags, new_addr)
            }
        };
        let mut r = if fixed_over { self.engine.unmap_with(new_addr, new_len, call) } else { call() };
        if r == -(libc::EFAULT as isize) && twinpage::host::mremap::spans_split_anon(&self.engine, old, old_len) {
            // Merging (or userfaultfd registration flags) split the range into
            // several mappings, which mremap refuses; for private anonymous
            // memory, do what it would have done.
            r = twinpage::host::mremap::emulate(old, old_len, new_len, flags, new_addr);
        }
        if r >= 0 {
            self.forget_handed_over(old, old.saturating_add(old_len));
            if flags & libc::MREMAP_FIXED != 0 {
                self.forget_handed_over(new_addr, new_addr.saturating_add(new_len));
            }
            let base = r as usize;
            for (s, e) in parts {
                let (ns, ne) = (base + (s - old), (base + (e - old)).min(base + new_len));
                if ns < ne {
                    let _ = self.register_with(ns, ne - ns, advice);
                }
            }
        } else {
            for (s, e) in parts {
                let _ = self.register_with(s, e - s, advice);
            }
        }
        Some(r)
    }

    /// `mprotect` of registered memory: merged pages are remapped with the
    /// protection they had at registration, so the range is unmerged and
    /// unregistered first and registered again with its new protection (as
    /// the kernel keeps VM_MERGEABLE; `PROT_NONE` anonymous memory merges too).
    pub fn mprotect(&self, addr: usize, len: usize, prot: c_int, raw: fn(usize, usize, c_int) -> c_int) -> Option<c_int> {
        if !self.engine.overlaps(addr, len) {
            return None;
        }
        let parts = self.engine.registered_in(addr, len);
        let _ = self.engine.unregister(addr, len);
        let r = raw(addr, len, prot);
        for (s, e) in parts {
            let _ = self.register(s, e - s);
        }
        Some(r)
    }

    /// `prctl(PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE)`, emulated with the
    /// kernel's argument checks.
    pub fn prctl_memory_merge(&self, option: c_int, a2: c_ulong, a3: c_ulong, a4: c_ulong, a5: c_ulong) -> io::Result<c_int> {
        if option == kernel_compat::abi::PR_GET_MEMORY_MERGE {
            if a2 != 0 || a3 != 0 || a4 != 0 || a5 != 0 {
                return Err(errno(libc::EINVAL));
            }
            return Ok(c_int::from(self.merge_any.load(Ordering::SeqCst)));
        }
        if a3 != 0 || a4 != 0 || a5 != 0 {
            return Err(errno(libc::EINVAL));
        }
        MERGE_ANY.store(a2 != 0, Ordering::SeqCst);
        if a2 != 0 {
            if !self.merge_any.swap(true, Ordering::SeqCst) {
                // SAFETY: setenv while other threads may read the environment is
                // what the kernel's flag surviving exec requires; glibc's setenv
                // takes its own lock.
                unsafe { libc::setenv(c"TWINPAGE_MERGE_ANY".as_ptr(), c"1".as_ptr(), 1) };
                self.register_existing_anon();
            }
        } else if self.merge_any.swap(false, Ordering::SeqCst) {
            // SAFETY: as above.
            unsafe { libc::unsetenv(c"TWINPAGE_MERGE_ANY".as_ptr()) };
            self.forget_handed_over(0, usize::MAX);
            for (s, e) in self.engine.registered_in(0, usize::MAX) {
                let _ = self.engine.unregister(s, e - s);
            }
        }
        Ok(0)
    }

    /// Registers the private anonymous memory mapped now, except the brk heap,
    /// the main stack (which twinpage's own threads write while merging) and
    /// the stacks and arena heaps of twinpage's threads (not the program's
    /// memory; see `twinpage::host::merge_any_ranges`).
    fn register_existing_anon(&self) {
        if let Err(e) = self.engine.start() {
            log::warn!("twinpage: cannot start merging: {e}; merge-any registers nothing");
            return;
        }
        let twinpage::host::MergeAny { ranges, own } = match twinpage::host::merge_any_ranges() {
            Ok(found) => found,
            Err(e) => {
                log::warn!("twinpage: cannot read /proc/self/maps ({e}); merge-any registers nothing");
                return;
            }
        };
        let shown: Vec<String> = own.iter().map(|(s, e)| format!("{s:#x}-{e:#x}")).collect();
        log::info!("twinpage: merge-any leaves out twinpage's own memory: {}", shown.join(" "));
        for (s, e) in ranges {
            // Memory registered already (MADV_MERGEABLE) stays as it is:
            // merging splits it into a mapping per merged stretch, and
            // registering each again read the process's maps once per
            // mapping (prctl took minutes at 18000 mappings).
            if coalesce(self.engine.registered_in(s, e - s)) == [(s, e)] {
                continue;
            }
            let _ = self.register(s, e - s);
        }
    }

    /// The host program is about to register `[start, start+len)` with its
    /// own userfaultfd `fd` (QEMU's background snapshot, postcopy): a range
    /// belongs to one userfaultfd only, so twinpage gives its merged pages
    /// there back as private copies, unregisters its own userfaultfd and
    /// stops merging the range until the program lets go of it
    /// ([`Agent::host_uffd_released`]).
    pub fn host_uffd_register(&self, fd: c_int, start: usize, len: usize) {
        if fd == self.engine.uffd_raw_fd() {
            return;
        }
        let end = start.saturating_add(len);
        let parts = coalesce(self.engine.registered_in(start, len));
        if !parts.is_empty() {
            twinpage::warn_once!(
                "host-uffd",
                "twinpage: the program registers {start:#x}..{end:#x} with its own userfaultfd (snapshot or postcopy); \
                 twinpage unmerges it and stops merging there until the program unregisters it"
            );
            let _ = self.engine.unregister(start, len);
        }
        self.excluded.lock().unwrap_or_else(|e| e.into_inner()).push(Handover { fd, start, end, parts });
        HANDOVERS.fetch_add(1, Ordering::AcqRel);
    }

    /// The program unmapped, replaced, moved or made unmergeable `[start,
    /// end)`: what twinpage handed over there is not registered again when
    /// the program's userfaultfd lets go, as the kernel leaves no
    /// `VM_MERGEABLE` there either (a mapping at the same address since is
    /// not the memory that was mergeable; memory moved with `mremap` while
    /// handed over stays unmerged).
    fn forget_handed_over(&self, start: usize, end: usize) {
        if !handovers_active() {
            return;
        }
        let mut ex = self.excluded.lock().unwrap_or_else(|e| e.into_inner());
        for h in ex.iter_mut() {
            h.parts = h.parts.iter().flat_map(|&(s, e)| twinpage::host::without(s, e, &[(start, end)])).collect();
        }
    }

    /// The host program's userfaultfd `fd` let go of `[start, end)`: its
    /// `UFFDIO_REGISTER` failed, it unregistered the range, or it closed
    /// `fd` (the whole address space then). What twinpage handed over there
    /// is registered again, unless another hand-over still covers it or the
    /// kernel still shows a userfaultfd on it (a close that another
    /// thread's reference delays).
    pub fn host_uffd_released(&self, fd: c_int, start: usize, end: usize) {
        let mut back = Vec::new();
        {
            let mut ex = self.excluded.lock().unwrap_or_else(|e| e.into_inner());
            let before = ex.len();
            let mut kept = Vec::with_capacity(before);
            for h in ex.drain(..) {
                if h.fd != fd || h.end <= start || h.start >= end {
                    kept.push(h);
                    continue;
                }
                back.extend(h.parts.iter().filter_map(|&p| clip(p, start, end)));
                for (lo, hi) in [(h.start, start), (end, h.end)] {
                    if let Some((s, e)) = clip((h.start, h.end), lo, hi) {
                        let parts = h.parts.iter().filter_map(|&p| clip(p, s, e)).collect();
                        kept.push(Handover { fd, start: s, end: e, parts });
                    }
                }
            }
            let after = kept.len();
            *ex = kept;
            if after < before {
                HANDOVERS.fetch_sub(before - after, Ordering::AcqRel);
            } else {
                HANDOVERS.fetch_add(after - before, Ordering::AcqRel);
            }
        }
        let back = coalesce(back);
        if back.is_empty() {
            return;
        }
        let (lo, hi) = (back[0].0, back.iter().map(|p| p.1).max().unwrap_or(0));
        let held = match twinpage::host::userfaultfd_ranges_in(lo, hi) {
            Ok(v) => v,
            Err(e) => {
                log::warn!("twinpage: cannot read /proc/self/smaps ({e}); handed-over memory stays unmerged");
                return;
            }
        };
        let mut resumed = 0usize;
        for (s, e) in back {
            if held.iter().any(|&h| clip(h, s, e).is_some()) {
                twinpage::warn_once!(
                    "host-uffd-held",
                    "twinpage: {s:#x}..{e:#x} is still registered with another userfaultfd; twinpage does not merge it again"
                );
                continue;
            }
            if self.register(s, e - s).is_ok() {
                resumed += e - s;
            }
        }
        if resumed > 0 {
            log::info!("twinpage: the program's userfaultfd let go of {lo:#x}..{hi:#x}; merging {} KiB there again", resumed / 1024);
        }
    }
}

/// `madvise`'s range as the kernel checks it (mm/madvise.c, before it
/// looks at the advice's work): a start that is not page-aligned or a
/// length that overflows once rounded up to pages is `EINVAL`; an empty
/// range succeeds doing nothing (0); otherwise the rounded length.
fn madvise_range(addr: usize, len: usize) -> Result<usize, c_int> {
    twinpage::host::page_span(addr, len).ok_or(libc::EINVAL)
}
