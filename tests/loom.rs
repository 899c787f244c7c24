//! Loom models of the two protocols twinpage's safety rests on, run on the
//! crate's real types (`Registry`, `Region`, `InFlight`, and the locks and
//! atomics of `primitive`, which are loom-modelled under `cfg(loom)`), with
//! small stand-ins for the kernel's side:
//!
//! 1. registry vs munmap (`region.rs`): a scanner never touches memory after
//!    the unmap that removed it, and taking a second region with `try_write`
//!    never deadlocks;
//! 2. merge vs fault (`inflight.rs`): the fault thread never lets a write
//!    through between a merge's byte comparison and its remap, and a writer
//!    blocked on a stray protection is always released.
//!
//! Each protocol also has broken variants (`broken_*`: `should_panic` with the
//! expected message, or, for a deadlock, checked in a child process), which
//! show that the model can fail and fails for the stated reason.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --test loom
//! ```
//! (`scripts/loom.sh`). Each model has its own preemption bound (3 or 4);
//! `LOOM_MAX_PREEMPTIONS` overrides them all.
#![cfg(loom)]

use loom::thread;
use twinpage::inflight::InFlight;
use twinpage::maps::MappingKind;
use twinpage::primitive::{Arc, AtomicBool, Mutex, Ordering::SeqCst, RwLock};
use twinpage::region::{Mergeability, PageRecord, Region, RegionState, Registry};
use twinpage::sys::PAGE_SIZE;

/// Start of the modelled address space.
const BASE: usize = 0x10_0000;
/// Pages of the modelled address space.
const SPAN: usize = 4;

/// Explores `f` under every interleaving with at most `preemptions`
/// preemptions (`LOOM_MAX_PREEMPTIONS` overrides), and prints how many it ran
/// (`--nocapture`). Bounds are 4, or 3 for the four-thread cross-region model,
/// which keeps each run to a second or two; the mutations listed at each test
/// are caught at its bound.
fn model<F: Fn() + Sync + Send + 'static>(preemptions: usize, f: F) {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(preemptions);
    }
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    b.check(move || {
        counted.fetch_add(1, Relaxed);
        f();
    });
    eprintln!("loom: {} interleavings, preemption bound {:?}", runs.load(Relaxed), b.preemption_bound);
}

// ---------------------------------------------------------------------------
// 1. Registry vs munmap
// ---------------------------------------------------------------------------

/// What the model keeps of an engine: the registry, the engine lock (`core`,
/// taken after a region lock, before the registry write lock, as in
/// `scan_pages` and `remove_range`), and the kernel's page tables, reduced to
/// one "mapped" flag per page.
struct Sh {
    registry: RwLock<Registry>,
    core: Mutex<()>,
    mapped: Vec<AtomicBool>,
}

impl Sh {
    fn new() -> Self {
        Self {
            registry: RwLock::new(Registry::default()),
            core: Mutex::new(()),
            mapped: (0..SPAN).map(|_| AtomicBool::new(true)).collect(),
        }
    }

    /// `madvise(MADV_MERGEABLE)` on `[start, start + pages)` pages.
    fn register(&self, start: usize, pages: usize) -> u32 {
        let mut reg = self.registry.write();
        let id = reg.next_id();
        reg.insert(Arc::new(Region::new(
            id,
            start,
            pages,
            MappingKind::Anon,
            Mergeability::Mergeable,
            libc::PROT_READ | libc::PROT_WRITE,
            vec![PageRecord::default(); pages],
        )));
        id
    }

    /// Reads every page of a region (hashing, comparing, remapping): each must
    /// still be mapped.
    fn touch(&self, r: &Region) {
        for p in 0..r.pages {
            let idx = (r.addr(p) - BASE) / PAGE_SIZE;
            assert!(self.mapped[idx].load(SeqCst), "touched unmapped memory at page {idx}");
        }
    }

    /// The interposed `munmap(addr, pages)`: `Engine::remove_range` takes the
    /// range out with `region::take_range` (this very function), then the
    /// real call.
    fn munmap(&self, addr: usize, pages: usize) {
        twinpage::region::take_range(&self.registry, &self.core, addr, addr + pages * PAGE_SIZE, |_, _, _, _, _| {});
        // The real munmap, after every region is dead and out of the registry.
        for p in 0..pages {
            self.mapped[(addr - BASE) / PAGE_SIZE + p].store(false, SeqCst);
        }
    }

    /// One step of `scan_pages`: find the next region with the scanner's own
    /// `Registry::next_to_scan` (one pass, no region registered behind the
    /// cursor: mark 0; the registry lock is dropped before the region lock is
    /// taken), scan it in one batch under its lock, mark it visited, and
    /// advance the cursor. False at the end of the pass.
    fn scan_step(&self, cursor: &mut usize, check_dead: bool) -> bool {
        const PASS: u64 = 1;
        let found = self.registry.read().next_to_scan(Some(*cursor), PASS, 0).cloned();
        let Some(region) = found else { return false };
        {
            let st = region.state.write();
            let _core = self.core.lock();
            if !check_dead || !st.dead {
                self.touch(&region);
            }
        }
        region.set_scanned_in(PASS);
        *cursor = region.start + 1;
        true
    }

    /// The scanner's way to a second region: `region::with_region_if_free`
    /// itself, or, for the broken variant, the same steps with a blocking
    /// `write` for the second lock.
    fn with_other_region(&self, id: u32, blocking: bool, f: impl FnOnce(&Region, &mut RegionState)) {
        if !blocking {
            twinpage::region::with_region_if_free(&self.registry, id, f);
            return;
        }
        let Some(r2) = self.registry.read().get(id).cloned() else { return };
        let mut st2 = r2.state.write();
        if st2.dead {
            return;
        }
        f(&r2, &mut st2);
    }

    /// A scanner's batch on region `a` that merges with a page of region `b`
    /// (a fill: `scan::execute` takes `b` while it holds `a` and the engine
    /// lock).
    fn scan_pair(&self, a: u32, b: u32, blocking: bool) {
        let Some(ra) = self.registry.read().get(a).cloned() else { return };
        let st = ra.state.write();
        let _core = self.core.lock();
        if st.dead {
            return;
        }
        self.touch(&ra);
        self.with_other_region(b, blocking, |rb, _| self.touch(rb));
    }
}

/// A scanner walks the registry while another thread unmaps the tail page of a
/// two-page region (which splits it) and then its head page. The scanner may
/// find the old region, the split one, or nothing; it never reads a page after
/// its munmap.
///
/// Caught (checked by hand): the real munmap before the region is dead and
/// out of the registry; no `dead` check (see the broken variant below); the
/// registry lock held while the region lock is taken (deadlock).
#[test]
fn scanner_never_touches_unmapped_memory() {
    model(4, || {
        let sh = Arc::new(Sh::new());
        sh.register(BASE, 2);
        let u = {
            let sh = sh.clone();
            thread::spawn(move || {
                sh.munmap(BASE + PAGE_SIZE, 1);
                sh.munmap(BASE, 1);
            })
        };
        let mut cursor = 0;
        for _ in 0..2 {
            if !sh.scan_step(&mut cursor, true) {
                break;
            }
        }
        u.join().unwrap();
        assert!(sh.registry.read().is_empty());
    });
}

/// Two scanners, each holding one region (and the engine lock) and taking the
/// other with `try_write` (as `with_other_region` does), while B and then A
/// are unmapped: no deadlock, and neither region is read after its unmap.
///
/// Caught: a blocking second lock (the broken variant below). Not caught, by
/// design of the code rather than of the model: dropping the `dead` check on
/// the second region. The scanner looks the second region up and locks it
/// while it holds the engine lock, under which `remove_range` marks a region
/// dead and removes it, so a region found there is never dead; that check is
/// a second line of defence.
#[test]
fn cross_region_try_write_no_deadlock_no_touch_after_unmap() {
    model(3, || {
        let sh = Arc::new(Sh::new());
        let a = sh.register(BASE, 1);
        let b = sh.register(BASE + 2 * PAGE_SIZE, 1);
        let s1 = {
            let sh = sh.clone();
            thread::spawn(move || sh.scan_pair(a, b, false))
        };
        let s2 = {
            let sh = sh.clone();
            thread::spawn(move || sh.scan_pair(b, a, false))
        };
        sh.munmap(BASE + 2 * PAGE_SIZE, 1);
        sh.munmap(BASE, 1);
        s1.join().unwrap();
        s2.join().unwrap();
        assert!(sh.registry.read().is_empty());
    });
}

/// Broken variant: a scanner that does not check `dead` after taking the
/// region lock reads memory that is already unmapped.
#[test]
#[should_panic(expected = "touched unmapped memory")]
fn broken_scanner_without_dead_check_touches_unmapped_memory() {
    model(3, || {
        let sh = Arc::new(Sh::new());
        sh.register(BASE, 1);
        let u = {
            let sh = sh.clone();
            thread::spawn(move || sh.munmap(BASE, 1))
        };
        let mut cursor = 0;
        sh.scan_step(&mut cursor, false);
        u.join().unwrap();
    });
}

/// Broken variant: taking the second region with a blocking `write` instead of
/// `try_write` deadlocks two scanners that hold each other's region.
///
/// Loom reports a deadlock by panicking, but the region guards and `Arc`s that
/// the deadlocked thread unwinds through panic again in their destructors, and
/// the process aborts; `should_panic` cannot catch that. So the model runs in
/// a child process of this test binary, and the test checks that it died of
/// loom's deadlock report.
#[test]
fn broken_blocking_second_region_lock_deadlocks() {
    const NAME: &str = "broken_blocking_second_region_lock_deadlocks";
    const CHILD: &str = "TWINPAGE_LOOM_DEADLOCK_CHILD";
    if std::env::var_os(CHILD).is_some() {
        model(3, || {
            let sh = Arc::new(Sh::new());
            let a = sh.register(BASE, 1);
            let b = sh.register(BASE + 2 * PAGE_SIZE, 1);
            let s1 = {
                let sh = sh.clone();
                thread::spawn(move || sh.scan_pair(a, b, true))
            };
            sh.scan_pair(b, a, true);
            s1.join().unwrap();
        });
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("deadlock; threads ="), "loom did not find the deadlock ({}):\n{stderr}", out.status);
}

// ---------------------------------------------------------------------------
// 2. Merge vs fault (InFlight)
// ---------------------------------------------------------------------------

/// The page being merged.
const PAGE: usize = BASE;
/// The store page's content, which the guest page also holds at first.
const STORE: u64 = 7;
/// What the writer writes.
const NEW: u64 = 8;
/// How many times the writer may fault before the model calls it stuck.
const MAX_FAULTS: usize = 3;

/// The kernel's side: the page table entry (write-protect bit and the content
/// the mapping shows; a write checks the bit and stores under the page table
/// lock, atomically), and the userfaultfd event queue.
#[derive(Default)]
struct Pte {
    wp: bool,
    content: u64,
}

struct Kernel {
    pte: Mutex<Pte>,
    events: Mutex<Vec<usize>>,
    writer_done: AtomicBool,
}

impl Kernel {
    fn new(wp: bool) -> Self {
        Self { pte: Mutex::new(Pte { wp, content: STORE }), events: Mutex::new(Vec::new()), writer_done: AtomicBool::new(false) }
    }

    /// A guest write (vCPU, KVM, a syscall): lands if the page is not
    /// write-protected; otherwise the write faults, the kernel queues a WP
    /// event and the writer sleeps until the protection is gone (unprotect, or
    /// remap + wake), then retries.
    fn write(&self) {
        let mut faults = 0;
        loop {
            {
                let mut p = self.pte.lock();
                if !p.wp {
                    p.content = NEW;
                    break;
                }
            }
            faults += 1;
            assert!(faults <= MAX_FAULTS, "writer faulted {faults} times");
            self.events.lock().push(PAGE);
            while self.pte.lock().wp {
                thread::yield_now();
            }
        }
        self.writer_done.store(true, SeqCst);
    }

    /// `engine::fault_main`: reads WP events and releases pages nobody merges,
    /// until the writer is done and every event is handled. `ignore_inflight`
    /// is the broken variant that unprotects whatever faulted.
    fn fault_thread(&self, inflight: &InFlight, ignore_inflight: bool) {
        loop {
            let finished = self.writer_done.load(SeqCst);
            let events = std::mem::take(&mut *self.events.lock());
            for addr in events {
                let release = || self.pte.lock().wp = false;
                if ignore_inflight {
                    release();
                } else {
                    inflight.release_stray(addr, release);
                }
            }
            if finished {
                break;
            }
            thread::yield_now();
        }
    }
}

/// `merge::merge_run` on one page: begin, write-protect, compare with the
/// store page, then remap (equal) or unprotect (different), wake, end.
fn merge(k: &Kernel, inflight: &InFlight) {
    inflight.begin(PAGE, PAGE + PAGE_SIZE);
    k.pte.lock().wp = true;
    let compared = k.pte.lock().content;
    if compared == STORE {
        // mmap(MAP_FIXED|MAP_PRIVATE) of the store page over the guest page:
        // it shows the store's content, and the new mapping is not protected.
        let mut p = k.pte.lock();
        assert_eq!(p.content, compared, "a write landed between compare and remap");
        p.content = STORE;
        p.wp = false;
    } else {
        k.pte.lock().wp = false;
    }
    // UFFDIO_WAKE: implicit, a sleeping writer waits for `wp` to clear.
    inflight.end(PAGE, PAGE + PAGE_SIZE);
}

/// One merge, one writer and the fault thread on one page. `stray`: the page
/// starts write-protected by nobody (a protection left behind), so the fault
/// thread may be releasing it just as the merge begins.
fn merge_vs_fault(stray: bool, ignore_inflight: bool) {
    model(4, move || {
        let k = Arc::new(Kernel::new(stray));
        let inflight = Arc::new(InFlight::default());
        let writer = {
            let k = k.clone();
            thread::spawn(move || k.write())
        };
        let fault = {
            let (k, inflight) = (k.clone(), inflight.clone());
            thread::spawn(move || k.fault_thread(&inflight, ignore_inflight))
        };
        merge(&k, &inflight);
        writer.join().unwrap();
        fault.join().unwrap();
        let p = k.pte.lock();
        assert_eq!(p.content, NEW, "the write was lost");
        assert!(!p.wp, "the page was left protected");
        drop(p);
        assert!(inflight.release_stray(PAGE, || {}), "the merge was left in flight");
    });
}

/// A merge, a writer to the same page, and the fault thread: the fault thread
/// never unprotects the page while the merge holds it, so no write lands
/// between the comparison and the remap and none is lost; the writer always
/// completes (woken by the merge's own unprotect or remap).
///
/// Caught (checked by hand): `begin` after the protect instead of before;
/// `end` before the remap; `end` never called; a remap that leaves the writer
/// asleep (loom: "exceeded maximum number of branches", the writer's wait
/// never ends); the fault thread ignoring `InFlight` (broken variant below).
#[test]
fn merge_vs_fault_no_lost_write() {
    merge_vs_fault(false, false);
}

/// The fault thread releasing a stray protection while a merge of the same
/// page begins: `release_stray` decides and unprotects under the `InFlight`
/// lock, so the merge's protection cannot be the one it removes.
///
/// Caught: `release_stray` dropping the lock between its check and `release`
/// (found at 4 preemptions, not at 3).
#[test]
fn stray_release_racing_a_merge_no_lost_write() {
    merge_vs_fault(true, false);
}

/// Broken variant: a fault thread that unprotects without asking `InFlight`
/// lets a write in between the comparison and the remap.
#[test]
#[should_panic(expected = "a write landed between compare and remap")]
fn broken_fault_thread_ignoring_inflight_loses_write() {
    merge_vs_fault(false, true);
}

/// A protection nobody is merging under (left behind by a failed merge): the
/// fault thread releases it, so the writer completes and its write lands.
///
/// Caught: a `release_stray` that never releases (the writer never completes:
/// loom stops at its branch limit).
#[test]
fn stray_protection_is_released() {
    model(4, || {
        let k = Arc::new(Kernel::new(true));
        let inflight = InFlight::default();
        let writer = {
            let k = k.clone();
            thread::spawn(move || k.write())
        };
        k.fault_thread(&inflight, false);
        writer.join().unwrap();
        let p = k.pte.lock();
        assert_eq!(p.content, NEW, "the write was lost");
        assert!(!p.wp, "the page was left protected");
    });
}
