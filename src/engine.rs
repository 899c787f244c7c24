//! The engine: registration, tunables, stats, and the scanner and fault
//! threads (started on the first registration, so a process that never
//! registers memory pays nothing).

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::maps::{self, MappingKind};
use crate::primitive::{Arc, AtomicBool, Mutex, Ordering};
use crate::region::{Mergeability, PageRecord, Region};
use crate::scan;
use crate::state::{self, Shared};
use crate::stats::KsmStats;
use crate::store::{Store, StoreError};
use crate::sys::pagemap::Pagemap;
use crate::sys::uffd::{self, UffdError, UffdMsg, Userfaultfd};
use crate::sys::PAGE_SIZE;
use crate::tunables::{has_numa, AdvisorMode, TunableError, Tunables};
use crate::unmerge;
use crate::warn_once;
use kernel_compat::WriteError;

/// Errors of the engine API.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("cannot open /proc/self/pagemap")]
    Pagemap(#[source] io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read /proc/self/smaps")]
    Maps(#[source] io::Error),
    #[error("address or length not page-aligned or out of range (EINVAL)")]
    Inval,
    #[error("part of the range is not mapped (ENOMEM)")]
    Unmapped,
    #[error("shared mappings cannot be merged (EINVAL)")]
    Shared,
    #[error("page size {0} is not supported (4 KiB only)")]
    PageSize(usize),
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] io::Error),
}

struct Wakeup {
    generation: std::sync::Mutex<u64>,
    cond: std::sync::Condvar,
}

struct Inner {
    sh: Shared,
    shutdown: AtomicBool,
    wakeup: Wakeup,
}

/// See [`Engine::hold_frees`].
pub struct FreeHold {
    inner: Arc<Inner>,
}

impl Drop for FreeHold {
    fn drop(&mut self) {
        let sh = &self.inner.sh;
        sh.core().lock().release_free_hold(sh);
    }
}

/// A same-page merging engine for the memory of this process.
pub struct Engine {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("stats", &self.stats()).finish()
    }
}

impl Engine {
    /// Opens userfaultfd, pagemap and the store. Fails when userfaultfd
    /// write-protect is unavailable (needs root or access to /dev/userfaultfd).
    pub fn new() -> Result<Self, EngineError> {
        Self::with_store_dir(None)
    }

    /// As [`new`](Self::new), with the store in `store_dir` (a tmpfs
    /// directory, `TWINPAGE_STORE_DIR`) instead of a memfd.
    pub fn with_store_dir(store_dir: Option<&std::path::Path>) -> Result<Self, EngineError> {
        let ps = crate::sys::page_size();
        if ps != PAGE_SIZE {
            return Err(EngineError::PageSize(ps));
        }
        let uffd = Userfaultfd::open()?;
        let pagemap = Pagemap::open().map_err(EngineError::Pagemap)?;
        let store = Store::new_in(store_dir)?;
        let sh = Shared::new(uffd, pagemap, store);
        let inner = Arc::new(Inner {
            sh,
            shutdown: AtomicBool::new(false),
            wakeup: Wakeup { generation: std::sync::Mutex::new(0), cond: std::sync::Condvar::new() },
        });
        state::publish(&inner.sh);
        Ok(Self { inner, threads: Mutex::new(Vec::new()) })
    }

    /// The tunables (read side).
    pub fn tunables(&self) -> &Tunables {
        self.inner.sh.tunables()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> KsmStats {
        self.inner.sh.stats().snapshot()
    }

    /// Bytes the store memfd holds now.
    pub fn store_allocated_bytes(&self) -> u64 {
        self.inner.sh.store().allocated_bytes().unwrap_or(0)
    }

    /// The engine's own userfaultfd (the preload tells it apart from the host
    /// program's).
    pub fn uffd_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::{AsFd, AsRawFd};
        self.inner.sh.uffd().as_fd().as_raw_fd()
    }

    /// Whether any registered region overlaps `[addr, addr+len)`. Cheap: the
    /// interposers ask it on every munmap and mmap.
    pub fn overlaps(&self, addr: usize, len: usize) -> bool {
        let end = addr.saturating_add(len.max(1));
        self.inner.sh.registry().read().overlaps(addr, end)
    }

    /// The registered ranges overlapping `[addr, addr+len)`, clipped to it.
    pub fn registered_in(&self, addr: usize, len: usize) -> Vec<(usize, usize)> {
        self.registered_kinds_in(addr, len).into_iter().map(|(s, e, _)| (s, e)).collect()
    }

    /// The advice registered memory in `[addr, addr+len)` had when it was
    /// registered (any region's).
    pub fn advice_in(&self, addr: usize, len: usize) -> Advice {
        let regions = self.inner.sh.registry().read().overlapping(addr, addr.saturating_add(len));
        Advice { dontfork: regions.iter().any(|r| r.dontfork), dontdump: regions.iter().any(|r| r.dontdump) }
    }

    /// As [`Engine::registered_in`], with the kind of mapping each range was
    /// when registered.
    pub fn registered_kinds_in(&self, addr: usize, len: usize) -> Vec<(usize, usize, MappingKind)> {
        let end = addr.saturating_add(len);
        self.inner
            .sh
            .registry()
            .read()
            .overlapping(addr, end)
            .iter()
            .map(|r| (r.start.max(addr), r.end().min(end), r.kind))
            .filter(|(s, e, _)| s < e)
            .collect()
    }

    /// Registers `[addr, addr+len)` for merging (`MADV_MERGEABLE`). Parts
    /// already registered are left as they are. Shared mappings are refused;
    /// private mappings that userfaultfd cannot write-protect (regular disk
    /// files) are scanned and reported but never merged.
    pub fn register(&self, addr: usize, len: usize) -> Result<(), EngineError> {
        self.register_with(addr, len, None)
    }

    /// [`register`](Self::register), with the mappings' advice (DONTFORK,
    /// DONTDUMP, which remaps carry over) known already: for a range that
    /// was registered before it moved, whatever its length, without reading
    /// smaps (costly with many mappings).
    pub fn register_with(&self, addr: usize, len: usize, advice: Option<Advice>) -> Result<(), EngineError> {
        if !addr.is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(EngineError::Inval);
        }
        let len = len.checked_next_multiple_of(PAGE_SIZE).ok_or(EngineError::Inval)?;
        let end = addr.checked_add(len).ok_or(EngineError::Inval)?;
        // Flags such as DONTFORK matter for guest RAM; for small ranges the
        // cost of reading smaps is not worth it.
        let vmas = if advice.is_none() && len >= 1 << 20 { maps::vmas_with_flags_in(addr, end) } else { maps::vmas_in(addr, end) };
        let mut vmas = vmas.map_err(EngineError::Maps)?;
        if let Some(a) = advice {
            for v in &mut vmas {
                (v.dontfork, v.dontdump) = (a.dontfork, a.dontdump);
            }
        }
        let sh = &self.inner.sh;
        let (result, added) = register_vmas(sh, addr, end, &vmas);
        if added {
            state::publish(sh);
            self.start()?;
            self.kick();
        }
        result
    }

    /// Unregisters `[addr, addr+len)` while the memory stays
    /// (`MADV_UNMERGEABLE`): merged pages get private copies again first.
    pub fn unregister(&self, addr: usize, len: usize) -> Result<(), EngineError> {
        self.remove_range(addr, len, true, || ())
    }

    /// Unregisters `[addr, addr+len)` around `unmap`, which makes the memory go
    /// away (munmap, mremap, mmap over it). No scanner touches the range once
    /// this is called; store pages it held are freed after `unmap` ran.
    pub fn unmap_with<R>(&self, addr: usize, len: usize, unmap: impl FnOnce() -> R) -> R {
        let mut out = None;
        let mut f = Some(unmap);
        let _ = self.remove_range(addr, len, false, || out = f.take().map(|f| f()));
        match out {
            Some(r) => r,
            None => (f.take().expect("unmap ran or is still here"))(),
        }
    }

    fn remove_range(&self, addr: usize, len: usize, unmerge: bool, between: impl FnOnce()) -> Result<(), EngineError> {
        if !addr.is_multiple_of(PAGE_SIZE) {
            between();
            return Err(EngineError::Inval);
        }
        let len = len.checked_next_multiple_of(PAGE_SIZE).ok_or(EngineError::Inval)?;
        let end = addr.saturating_add(len);
        unmerge::remove_range(&self.inner.sh, addr, end, unmerge, between);
        Ok(())
    }

    /// Runs `discard` — the owner's `MADV_DONTNEED`, `MADV_REMOVE` or
    /// `MADV_FREE` of `[addr, addr+len)` — after giving merged pages there back
    /// the mapping they had without twinpage (fresh anonymous memory, or the
    /// file for a private file mapping), so the discard reads back what it
    /// would have, never a store page. The regions stay locked until `discard`
    /// returns, so the scanner cannot merge them again in between.
    pub fn discard_with<R>(&self, addr: usize, len: usize, discard: impl FnOnce() -> R) -> R {
        let Some(len) = len.checked_next_multiple_of(PAGE_SIZE) else { return discard() };
        let end = addr.saturating_add(len);
        let sh = &self.inner.sh;
        let regions = sh.registry().read().overlapping(addr, end);
        // Address order, as every holder of several region locks takes them.
        let mut guards = Vec::with_capacity(regions.len());
        for r in &regions {
            let mut st = r.state.write();
            if !st.dead {
                let from = (addr.max(r.start) - r.start) / PAGE_SIZE;
                let to = (end.min(r.end()) - r.start) / PAGE_SIZE;
                let mut core = sh.core().lock();
                unmerge::restore_range(sh, r, &mut st, &mut core, from, to);
            }
            guards.push(st);
        }
        let out = discard();
        drop(guards);
        state::publish(sh);
        out
    }

    /// Until the returned hold is dropped, store pages whose last sharer left
    /// are neither freed nor reused. A process that forks holds frees until
    /// its child has replaced the store mappings it inherited.
    pub fn hold_frees(&self) -> FreeHold {
        self.inner.sh.core().lock().hold_frees();
        FreeHold { inner: self.inner.clone() }
    }

    /// Sets `run`: 0 stops, 1 scans, 2 unmerges everything and stops.
    pub fn set_run(&self, v: u32) -> Result<(), TunableError> {
        self.tunables().set_run(v)?;
        self.kick();
        Ok(())
    }
    /// Sets `pages_to_scan` (refused while the advisor is on, as the kernel).
    pub fn set_pages_to_scan(&self, v: u32) -> Result<(), TunableError> {
        self.tunables().set_pages_to_scan(v)?;
        self.kick();
        Ok(())
    }
    /// Sets `sleep_millisecs`.
    pub fn set_sleep_millisecs(&self, v: u32) {
        self.tunables().set_sleep_millisecs(v);
        self.kick();
    }
    /// Sets `use_zero_pages`.
    pub fn set_use_zero_pages(&self, v: bool) {
        self.tunables().set_use_zero_pages(v);
    }
    /// Sets `max_page_sharing` (>= 2; EBUSY while pages are shared).
    pub fn set_max_page_sharing(&self, v: u32) -> Result<(), TunableError> {
        let core = self.inner.sh.core().lock();
        let shared = core.stable().pages_shared();
        self.tunables().set_max_page_sharing(v, shared)
    }
    /// Sets `smart_scan`.
    pub fn set_smart_scan(&self, v: bool) {
        self.tunables().set_smart_scan(v);
    }
    /// Sets `merge_across_nodes` (no effect: the store has no NUMA placement).
    pub fn set_merge_across_nodes(&self, v: u32) -> Result<(), TunableError> {
        if v > 1 {
            return Err(TunableError::Inval);
        }
        self.tunables().set_merge_across_nodes(v);
        Ok(())
    }
    /// Sets `stable_node_chains_prune_millisecs`.
    pub fn set_stable_node_chains_prune_millisecs(&self, v: u32) {
        self.tunables().set_stable_node_chains_prune_millisecs(v);
    }
    /// Sets `advisor_mode`.
    pub fn set_advisor_mode(&self, m: AdvisorMode) {
        self.tunables().set_advisor_mode(m);
    }
    /// Sets the advisor's limits.
    pub fn set_advisor_limits(&self, max_cpu: u32, min_pages: u64, max_pages: u64, target_scan_time: u64) {
        self.tunables().set_advisor_limits(max_cpu, min_pages, max_pages, target_scan_time);
    }

    /// Writes attribute `name` of `/sys/kernel/mm/ksm` with the kernel's
    /// parsing and rules; a refused value changes nothing. `run=2` has
    /// unmerged everything (and reset `full_scans`) when it returns, as the
    /// kernel's `run_store` has: whoever applies a write (the caller, a
    /// publisher taking another process's write) returns only then.
    pub fn set_attr(&self, name: &str, text: &str) -> Result<(), WriteError> {
        // The core lock keeps pages_shared from changing between check and store.
        let core = self.inner.sh.core().lock();
        self.tunables().write_attr(name, text, core.stable().pages_shared(), has_numa())?;
        drop(core);
        // A stricter merge mode has taken back what it disallows when the
        // write returns, as run=2 has unmerged.
        if name == crate::tunables::MERGE_MODE && enforce_merge_mode(&self.inner.sh) {
            let _ = self.daemon_totals();
        }
        if name == "run" && self.tunables().run() == 2 {
            unmerge::unmerge_all(&self.inner.sh);
            state::publish(&self.inner.sh);
            // Under twinpaged the releases reach it now, and it has counted
            // them when this returns (its pages_shared is the host's).
            let _ = self.daemon_totals();
        }
        self.kick();
        Ok(())
    }

    /// A `write(2)` of `bytes` to attribute `name`, as sysfs takes it: in
    /// chunks of at most a page, each checked with the kernel's rules and
    /// applied before this returns; the first refusal stops it.
    pub fn write_attr(&self, name: &str, bytes: &[u8]) -> Result<(), WriteError> {
        let chunks: Vec<&[u8]> = if bytes.is_empty() { vec![bytes] } else { bytes.chunks(kernel_compat::write::SYSFS_WRITE_MAX).collect() };
        for chunk in chunks {
            let Some(text) = crate::tunables::model_write(name, chunk, &self.write_context())? else { continue };
            self.set_attr(name, &text)?;
            state::publish(&self.inner.sh);
        }
        Ok(())
    }

    /// What the kernel's store functions check a write against, now.
    fn write_context(&self) -> kernel_compat::WriteContext {
        let pages_shared = self.inner.sh.core().lock().stable().pages_shared();
        self.tunables().context(pages_shared, has_numa())
    }

    /// The counters at this instant (the published ones are as of the
    /// scanner's last batch).
    pub fn stats_now(&self) -> KsmStats {
        scan::recheck_zero_pages(&self.inner.sh);
        state::publish(&self.inner.sh);
        self.stats()
    }

    /// What reading attribute `name` of `/sys/kernel/mm/ksm` prints, without
    /// the newline; `None` for a name the kernel does not have.
    pub fn show_attr(&self, name: &str) -> Option<String> {
        let mut stats = self.stats();
        // Under twinpaged the shared pages are the daemon's, counted there
        // for all its processes (the kernel's counts are host-wide too).
        if matches!(name, "pages_shared" | "pages_sharing") {
            if let Some((shared, sharing)) = self.daemon_totals() {
                stats.pages_shared += shared;
                stats.pages_sharing += sharing;
            }
        }
        crate::tunables::show_attr(self.tunables(), &stats, name, has_numa())
    }

    /// `pages_shared` and `pages_sharing` of the twinpaged this engine merges
    /// through, asked now (after sending what this process did since its
    /// last report); `None` when not connected.
    fn daemon_totals(&self) -> Option<(u64, u64)> {
        let sh = &self.inner.sh;
        let mut core = sh.core().lock();
        let core = &mut *core;
        // Releases held for a forked child stay queued (see `link`).
        core.flush_link(sh);
        let link = core.link_mut()?;
        match link.totals() {
            Ok(t) => Some(t),
            Err(e) => {
                core.lose_remote(sh, &e);
                None
            }
        }
    }

    /// Waits until `full_scans` has grown by `n` (or `timeout` passed); true
    /// when it did.
    pub fn wait_full_scans(&self, n: u64, timeout: Duration) -> bool {
        let target = self.stats().full_scans + n;
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.stats().full_scans >= target {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Merges through `twinpaged` at `cfg.socket` when it is there (tried when
    /// the scanner starts and every second while it is not connected); with
    /// no daemon, the engine merges its own pages. `None` stops trying (a
    /// live connection stays until it breaks).
    pub fn set_daemon(&self, cfg: Option<crate::link::DaemonConfig>) {
        *self.inner.sh.daemon().lock() = cfg;
        self.kick();
    }

    /// Whether the engine is connected to `twinpaged` now.
    pub fn daemon_connected(&self) -> bool {
        self.inner.sh.daemon_fd().load(std::sync::atomic::Ordering::SeqCst) >= 0
    }

    /// The stores whose pages this process may map (its own, and every
    /// daemon's it was linked to), by file identity.
    pub(crate) fn store_ids(&self) -> Vec<crate::sys::file::FileId> {
        self.inner.sh.stores().lock().clone()
    }

    /// The daemon socket's fd while connected: a forked child (which never
    /// uses its parent's engine) closes it, so that the daemon sees the parent
    /// leave when it exits.
    pub fn daemon_raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.inner.sh.daemon_fd().load(std::sync::atomic::Ordering::SeqCst)).filter(|&fd| fd >= 0)
    }

    /// Wakes the scanner now (a tunable changed or memory was registered).
    pub fn kick(&self) {
        let w = &self.inner.wakeup;
        *w.generation.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        w.cond.notify_all();
    }

    /// Starts the engine's threads now, if they are not running yet; the
    /// first registration starts them otherwise. Merge-any calls it before
    /// it registers the process's memory, so that their stacks and arena
    /// heaps are known to `threads::own_ranges` and left out.
    pub fn start(&self) -> Result<(), EngineError> {
        let mut threads = self.threads.lock();
        if !threads.is_empty() {
            return Ok(());
        }
        let inner = self.inner.clone();
        let scanner = crate::threads::spawn(crate::threads::SCAN_THREAD, move || scanner_main(&inner))
            .map_err(|e| EngineError::Thread("scanner", e))?;
        threads.push(scanner);
        let inner = self.inner.clone();
        let fault = crate::threads::spawn("twinpage-fault", move || fault_main(&inner)).map_err(|e| EngineError::Thread("fault", e))?;
        threads.push(fault);
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.kick();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

/// At sleep_millisecs=0, an idle scanner (no change in a whole scan) uses
/// one part in this many of the time.
const IDLE_SHARE: u32 = 5;

/// The longest a scanner rests at sleep_millisecs=0.
const MAX_REST: Duration = Duration::from_millis(100);

/// At sleep_millisecs>0, an idle scanner wakes this many times less often
/// (and scans as many times the pages each time).
const IDLE_COALESCE: u64 = 4;

/// When `twinpage_merge_mode` is stricter than the loosest mode pages were
/// merged under, unmerges what it no longer allows; returns whether it did.
/// A stricter mode takes back what it disallows whatever `run` says: the
/// operator asked for those pages not to be shared.
fn enforce_merge_mode(sh: &state::Shared) -> bool {
    let now = sh.tunables().merge_mode();
    {
        let mut core = sh.core().lock();
        if !core.merged_looser_than(now) {
            return false;
        }
    }
    unmerge::unmerge_disallowed(sh, now);
    // Batches that ran meanwhile merged under `now` at the loosest.
    sh.core().lock().merge_mode_enforced(now);
    state::publish(sh);
    true
}

/// Sleeps for `ms` or until kicked.
fn nap(inner: &Inner, since: u64, ms: u64) {
    nap_for(inner, since, Duration::from_millis(ms));
}

/// The kicks so far: taken before the scanner reads the tunables, so that a
/// kick after that read ends the nap that follows it.
fn kicks(inner: &Inner) -> u64 {
    *inner.wakeup.generation.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sleeps for `d`, or until kicked after [`kicks`] returned `since`. A kick
/// between the scanner's look at the tunables and its nap is not lost: a
/// program that writes `run=1` right after the engine started (ksm_tests
/// does) waited a whole second for the scan to begin, one run in three.
fn nap_for(inner: &Inner, since: u64, d: Duration) {
    let w = &inner.wakeup;
    let g = w.generation.lock().unwrap_or_else(|e| e.into_inner());
    let _ = w.cond.wait_timeout_while(g, d, |g| *g == since && !inner.shutdown.load(Ordering::Relaxed));
}

fn scanner_main(inner: &Inner) {
    let sh = &inner.sh;
    let mut unmerged = false;
    let mut next_try = std::time::Instant::now();
    while !inner.shutdown.load(Ordering::Relaxed) {
        let since = kicks(inner);
        let agents = scan::remote::tick(sh, &mut next_try);
        let t = &sh.tunables();
        enforce_merge_mode(sh);
        match t.run() {
            0 => {
                unmerged = false;
                crate::testhook::scanner_naps();
                nap(inner, since, 1000);
                continue;
            }
            2 => {
                if !unmerged {
                    unmerge::unmerge_all(sh);
                    state::publish(sh);
                    unmerged = true;
                }
                crate::testhook::scanner_naps();
                nap(inner, since, 1000);
                continue;
            }
            _ => unmerged = false,
        }
        // Connected to the daemon, pages_to_scan is one budget for all its
        // agents, as ksmd's is for all processes.
        let budget = match t.pages_to_scan() as usize {
            0 => 0,
            p => (p / agents).max(1),
        };
        let sleep = u64::from(t.sleep_millisecs());
        let idle = sh.core().lock().idle();
        // While whole scans change nothing, a sleeping scanner wakes a quarter
        // as often and scans four times the pages: the same pages per second,
        // a quarter of the fixed cost of each wake (the switch, the pagemap
        // read, publishing the counters).
        let coalesce = if idle && sleep > 0 { IDLE_COALESCE } else { 1 };
        let budget = budget.saturating_mul(coalesce as usize);
        let began = std::time::Instant::now();
        if budget > 0 {
            scan::scan_pages(sh, budget);
            state::publish(sh);
        }
        // sleep_millisecs=0 makes ksmd one thread flat out, one core for
        // every process. Agents of one daemon each scan their own process,
        // so each takes its share of that core: it rests (agents - 1) times
        // as long as its round took (wall time, which counts the daemon's
        // work for it too), at most MAX_REST so that a lost daemon or new
        // work is noticed soon. While whole scans change nothing, a
        // scanner runs at a fifth of that: a full scan here is an order of
        // magnitude cheaper than ksmd's, so it still notices a change as
        // soon as ksmd would, and burns no core doing nothing.
        let share = agents as u32 * if idle { IDLE_SHARE } else { 1 };
        if sleep > 0 || budget == 0 {
            nap(inner, since, sleep.max(1) * coalesce);
        } else if share > 1 {
            nap_for(inner, since, (began.elapsed() * (share - 1).min(8191)).min(MAX_REST));
        } else {
            std::thread::yield_now();
        }
    }
}

/// The safety net: a write fault on a page no merge holds is released at
/// once (a merged page's first write gets an anonymous page of its own).
///
/// A fault on a page a merge holds is the merge's to wake, but it may come
/// after the merge's wake: a writer the wake let go can fault again on the
/// protected store page before the merge has left its range. Such faults
/// are kept and woken once no merge holds their page any more; a writer
/// still blocked then faults again and is served as any other.
fn fault_main(inner: &Inner) {
    let sh = &inner.sh;
    let mut buf = [UffdMsg::default(); 64];
    let mut held: Vec<usize> = Vec::new();
    // First writes whose region a batch holds: (page, since).
    let mut waiting: Vec<(usize, std::time::Instant)> = Vec::new();
    while !inner.shutdown.load(Ordering::Relaxed) {
        use std::os::fd::AsFd;
        held.retain(|&page| {
            sh.inflight().holds(page) || {
                let _ = sh.uffd().wake(page, PAGE_SIZE);
                false
            }
        });
        waiting.retain(|&(page, since)| !serve_write(sh, page, since));
        let idle = held.is_empty() && waiting.is_empty();
        match uffd::poll_readable(sh.uffd().as_fd(), if idle { 100 } else { 1 }) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                warn_once!("uffd-poll", "twinpage: polling userfaultfd failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let n = match sh.uffd().read_events(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                warn_once!("uffd-read", "twinpage: reading userfaultfd failed: {e}");
                continue;
            }
        };
        for msg in &buf[..n] {
            if msg.event != uffd::UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let page = (msg.pf_address as usize) & !(PAGE_SIZE - 1);
            let released = if msg.pf_flags & uffd::UFFD_PAGEFAULT_FLAG_WP == 0 {
                // A missing fault: only the pin check registers missing mode,
                // for the length of a merge. One outside a merge is a hole of
                // anonymous memory left in that mode: the zero page is what it
                // would have read.
                sh.inflight().release_stray(page, || {
                    if sh.uffd().zeropage(page, PAGE_SIZE).is_err() {
                        let _ = sh.uffd().wake(page, PAGE_SIZE);
                    }
                })
            } else if sh.inflight().holds(page) {
                false
            } else {
                let now = std::time::Instant::now();
                if !serve_write(sh, page, now) {
                    waiting.push((page, now));
                }
                true
            };
            if !released {
                held.push(page);
            }
        }
    }
}

/// Serves a write fault on a protected page that no merge held when it came:
/// a merged page's first write gets an anonymous page (`merge::cow`), any
/// other page is released where it is, and so is a merged page whose region
/// stayed locked for [`cow::MAX_WAIT`](crate::merge::cow::MAX_WAIT) since
/// `since`. False while it should wait for the region's lock.
fn serve_write(sh: &Shared, page: usize, since: std::time::Instant) -> bool {
    use crate::merge::cow::{first_write, FirstWrite, MAX_WAIT};
    match first_write(sh, page) {
        FirstWrite::Done => return true,
        FirstWrite::Busy if since.elapsed() < MAX_WAIT => return false,
        FirstWrite::Busy | FirstWrite::NotMine => {}
    }
    // A merge that began meanwhile wakes its own waiters (this one included).
    sh.inflight().release_stray(page, || {
        let _ = sh.uffd().unprotect(page, PAGE_SIZE);
    });
    true
}

/// madvise flags of guest RAM that twinpage carries over to the mappings
/// it makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Advice {
    pub dontfork: bool,
    pub dontdump: bool,
}

/// An engine publishes itself into a stats tree.
impl crate::statsfs::Source for Engine {
    fn stats(&self) -> KsmStats {
        Engine::stats(self)
    }
    fn show_attr(&self, name: &str) -> Option<String> {
        Engine::show_attr(self, name)
    }
    fn set_attr(&self, name: &str, text: &str) -> Result<(), kernel_compat::WriteError> {
        Engine::set_attr(self, name, text)
    }
    fn sleep_millisecs(&self) -> u32 {
        self.tunables().sleep_millisecs()
    }
    fn follow_advisor(&self, pages_to_scan: u32) {
        self.tunables().advise_pages_to_scan(pages_to_scan);
    }
}

/// Registers the parts of `[addr, end)` not registered yet, mapping by
/// mapping (`vmas`, in address order): the one way memory becomes a region,
/// for [`Engine::register_with`] and the bench harness. Returns the result
/// for the caller (`Unmapped` for a hole, `Shared` for a shared mapping)
/// and whether any region was added.
pub(crate) fn register_vmas(sh: &Shared, addr: usize, end: usize, vmas: &[maps::Vma]) -> (Result<(), EngineError>, bool) {
    let mut result = Ok(());
    let mut covered = addr;
    let mut added = false;
    for vma in vmas {
        if vma.start > covered {
            result = Err(EngineError::Unmapped);
        }
        let s = vma.start.max(addr);
        let e = vma.end.min(end);
        covered = vma.end;
        if vma.kind == MappingKind::Shared {
            warn_once!(
                "shared",
                "twinpage: refusing to merge a shared mapping at {s:#x} ({}): shared memory is never merged, as with kernel KSM",
                vma.path
            );
            result = Err(EngineError::Shared);
            continue;
        }
        // A store mapping left by an earlier merge holds the owner's private
        // copies: it stands for anonymous memory. Known by device and inode:
        // with TWINPAGE_STORE_DIR (or a daemon's store) its name is a
        // deleted file's, not the memfd's.
        let mut vma = vma.clone();
        if vma.is_store_mapping(&sh.stores().lock()) {
            vma.kind = MappingKind::Anon;
        }
        // PROT_NONE anonymous memory merges, as with the kernel (read
        // through /proc/self/mem: `guest`); a file mapping's content is
        // read in place when it is registered (`anonymize`), so it waits
        // until it is readable again.
        if vma.prot & libc::PROT_READ == 0 && vma.kind != MappingKind::Anon {
            continue;
        }
        let vma = &vma;
        for (ps, pe) in unregistered_parts(sh, s, e) {
            let backing = match vma.kind {
                MappingKind::PrivateFile => open_backing(vma),
                _ => None,
            };
            // Hugetlbfs memory is left alone, as the kernel's KSM leaves it.
            if backing.as_ref().is_some_and(|f| crate::sys::file::is_hugetlbfs(std::os::fd::AsFd::as_fd(&**f)).unwrap_or(false)) {
                warn_once!("hugetlb", "twinpage: {} at {ps:#x} is hugetlbfs memory, which is never merged (as with kernel KSM)", vma.path);
                continue;
            }
            let no_backing = vma.kind == MappingKind::PrivateFile && backing.is_none();
            if no_backing {
                warn_once!("no-backing", "twinpage: cannot reopen the file behind {} at {ps:#x}; it is scanned but never merged", vma.path);
            }
            let mergeability =
                match if no_backing { Err(io::Error::from_raw_os_error(libc::ENOENT)) } else { sh.uffd().register_wp(ps, pe - ps) } {
                    Ok(()) => Mergeability::Mergeable,
                    Err(err) => {
                        warn_once!(
                            "scan-only",
                            "twinpage: {} at {ps:#x} cannot be write-protected ({err}); it is scanned and reported but never merged",
                            if vma.path.is_empty() { "memory" } else { vma.path.as_str() }
                        );
                        Mergeability::ScanOnly
                    }
                };
            let pages = (pe - ps) / PAGE_SIZE;
            let mut region = Region::new(0, ps, pages, vma.kind, mergeability, vma.prot, vec![PageRecord::default(); pages]);
            region.dontfork = vma.dontfork;
            region.dontdump = vma.dontdump;
            region.file_offset = vma.offset + (ps - vma.start) as u64;
            region.backing = backing;
            // A private file mapping's pages can be checked for pins only
            // in anonymous memory: where the file holds zeros, they move
            // there now (`anonymize`).
            let parts = match (&region.backing, mergeability) {
                (Some(file), Mergeability::Mergeable) => crate::anonymize::convert(sh, &region, file),
                _ => vec![crate::anonymize::Part { start: ps, end: pe, anon: false, registered: true }],
            };
            for part in parts {
                let n = (part.end - part.start) / PAGE_SIZE;
                let mut records = vec![PageRecord::default(); n];
                if !part.registered {
                    records.iter_mut().for_each(|r| r.add_flags(PageRecord::NEEDS_REGISTER));
                }
                let kind = if part.anon { MappingKind::Anon } else { region.kind };
                sh.add_region(|id| {
                    let mut r = Region::new(id, part.start, n, kind, mergeability, region.prot, records);
                    r.dontfork = region.dontfork;
                    r.dontdump = region.dontdump;
                    if !part.anon {
                        r.file_offset = region.file_offset + (part.start - ps) as u64;
                        r.backing = region.backing.clone();
                    }
                    r
                });
            }
            added = true;
        }
    }
    if covered < end {
        result = Err(EngineError::Unmapped);
    }
    if covered < end {
        result = Err(EngineError::Unmapped);
    }
    (result, added)
}

/// The parts of `[start, end)` no region covers.
fn unregistered_parts(sh: &Shared, start: usize, end: usize) -> Vec<(usize, usize)> {
    let reg = sh.registry().read();
    let mut parts = Vec::new();
    let mut at = start;
    for r in reg.overlapping(start, end) {
        if r.start > at {
            parts.push((at, r.start.min(end)));
        }
        at = at.max(r.end());
    }
    if at < end {
        parts.push((at, end));
    }
    parts
}

/// Reopens the file behind a private file mapping: by path, or through
/// /proc/self/map_files when the path is gone (memfd, deleted file).
fn open_backing(vma: &maps::Vma) -> Option<Arc<std::fs::File>> {
    let by_path = (!vma.path.ends_with("(deleted)") && vma.path.starts_with('/')).then(|| std::fs::File::open(&vma.path).ok()).flatten();
    by_path.or_else(|| std::fs::File::open(format!("/proc/self/map_files/{:x}-{:x}", vma.start, vma.end)).ok()).map(Arc::new)
}
