//! The engine: registration, tunables, stats, and the scanner and fault
//! threads (started on the first registration, so a process that never
//! registers memory pays nothing). How a range becomes regions is in
//! `register`, the two threads' loops in `workers`.

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::maps::{self, MappingKind};
use crate::primitive::{Arc, AtomicBool, Mutex, Ordering};
use crate::scan;
use crate::state::{self, Shared};
use crate::stats::KsmStats;
use crate::store::{Store, StoreError};
use crate::sys::pagemap::Pagemap;
use crate::sys::uffd::{UffdError, Userfaultfd};
use crate::sys::PAGE_SIZE;
use crate::tunables::{has_numa, AdvisorMode, TunableError, Tunables};
use crate::unmerge;
use kernel_compat::WriteError;

mod register;
mod workers;

pub(crate) use register::register_vmas;

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

    /// The program locked (`mlock`, `mlockall`) or unlocked
    /// (`munlock`, `munlockall`) `[addr, addr+len)`, or everything when
    /// `range` is None: the regions there say so, so that the pin check
    /// takes a scratch mapping locked alike and remapped pages are locked
    /// again only where the program wants them locked.
    pub fn note_locked(&self, range: Option<(usize, usize)>, locked: bool) {
        let reg = self.inner.sh.registry().read();
        let regions = match range {
            Some((addr, len)) => reg.overlapping(addr, addr.saturating_add(len)),
            None => reg.iter().cloned().collect(),
        };
        drop(reg);
        for r in regions {
            r.set_locked(locked);
        }
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
        let len = crate::sys::page_span(addr, len).filter(|&l| l > 0).ok_or(EngineError::Inval)?;
        let end = addr + len;
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
        if name == crate::tunables::MERGE_MODE && workers::enforce_merge_mode(&self.inner.sh) {
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
    /// when it did. Each look reads the count as of now, as a program
    /// reading the sysfs file does, not as last published (a pass may have
    /// ended since, and the scanner publishes only once its wake is done);
    /// the counts are published when it returns true.
    pub fn wait_full_scans(&self, n: u64, timeout: Duration) -> bool {
        let now = || state::read_full_scans(&self.inner.sh);
        let target = now() + n;
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if now() >= target {
                // What the caller reads next is as fresh as the count.
                state::publish(&self.inner.sh);
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
    /// heaps are known to `own::ranges` and left out.
    pub fn start(&self) -> Result<(), EngineError> {
        let mut threads = self.threads.lock();
        if !threads.is_empty() {
            return Ok(());
        }
        let inner = self.inner.clone();
        let scanner = crate::threads::spawn(crate::threads::SCAN_THREAD, move || workers::scanner_main(&inner))
            .map_err(|e| EngineError::Thread("scanner", e))?;
        threads.push(scanner);
        let inner = self.inner.clone();
        let fault =
            crate::threads::spawn("twinpage-fault", move || workers::fault_main(&inner)).map_err(|e| EngineError::Thread("fault", e))?;
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
