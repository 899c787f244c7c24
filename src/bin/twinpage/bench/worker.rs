//! `twinpage bench-worker`: one side of the benchmark, in a fresh process.
//!
//! Fills anonymous memory with the workload, then hands it to kernel KSM
//! (`MADV_MERGEABLE`; the parent has set the kernel's tunables and `run=1`)
//! or to a [`twinpage::Engine`] with the same tunables, samples the sharing
//! every 50 ms until it reaches the achievable sharing or a plateau, and
//! measures. It speaks to the parent in lines on stdout:
//! `info KEY VALUE`, `s T_MS SAVED_PAGES` (samples) and `r KEY VALUE`
//! (results), then `done`.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kernel_compat::sysfs::KsmSysfs;

use super::proc;
use super::workload::{fill, Plan, Shape};
use super::{Side, WorkerArgs};
use twinpage::Engine;

const PAGE: usize = 4096;

struct Out(std::io::Stdout);

impl Out {
    fn line(&mut self, s: std::fmt::Arguments<'_>) {
        let mut l = self.0.lock();
        let _ = l.write_fmt(s);
        let _ = l.write_all(b"\n");
        let _ = l.flush();
    }
}

/// Counters of one side, read the same way for both.
struct Counters {
    sharing: u64,
    shared: u64,
    zero: u64,
    full_scans: u64,
}

enum Merger {
    Kernel(KsmSysfs),
    Twinpage(Engine),
}

impl Merger {
    fn counters(&self) -> Counters {
        match self {
            Merger::Kernel(k) => {
                let r = |n: &str| k.read_u64(n).unwrap_or(0);
                Counters { sharing: r("pages_sharing"), shared: r("pages_shared"), zero: r("ksm_zero_pages"), full_scans: r("full_scans") }
            }
            Merger::Twinpage(e) => {
                let s = e.stats();
                Counters { sharing: s.pages_sharing, shared: s.pages_shared, zero: s.ksm_zero_pages, full_scans: s.full_scans }
            }
        }
    }

    /// CPU seconds of the merging threads so far.
    fn cpu(&self) -> f64 {
        match self {
            Merger::Kernel(_) => proc::kthread_cpu("ksmd"),
            Merger::Twinpage(_) => proc::own_threads_cpu(&["twinpage-scan", "twinpage-fault"]),
        }
    }
}

/// Runs the worker; returns the exit status.
pub fn run(a: &WorkerArgs) -> i32 {
    let mut out = Out(std::io::stdout());
    let shape = Shape {
        workload: a.workload,
        pages: a.size / PAGE,
        dup_percent: a.dup_percent,
        patterns: a.patterns,
        run_pages: a.run_pages,
        volatile_percent: a.volatile_percent,
    };
    let plan = Plan::new(&shape);

    let merger = match a.side {
        Side::Kernel => Merger::Kernel(KsmSysfs::kernel()),
        Side::Twinpage => {
            let e = match Engine::new() {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("twinpage bench-worker: engine: {e}");
                    return 1;
                }
            };
            let settings = [
                ("pages_to_scan", a.pages_to_scan.to_string()),
                ("sleep_millisecs", a.sleep_millisecs.to_string()),
                ("use_zero_pages", u8::from(a.use_zero_pages).to_string()),
            ];
            for (name, v) in settings.into_iter().chain(super::advisor_pairs(a.advisor_target_scan_time, a.advisor_max_cpu)) {
                if let Err(err) = e.set_attr(name, &v) {
                    eprintln!("twinpage bench-worker: {name}={v}: {err:?}");
                    return 1;
                }
            }
            Merger::Twinpage(e)
        }
    };

    let max_page_sharing = match &merger {
        Merger::Kernel(k) => k.read_u64("max_page_sharing").unwrap_or(256),
        Merger::Twinpage(e) => e.show_attr("max_page_sharing").and_then(|v| v.parse().ok()).unwrap_or(256),
    };
    let expected = plan.achievable(a.use_zero_pages, max_page_sharing);
    out.line(format_args!("info expected_pages {expected}"));
    out.line(format_args!("info pages {}", shape.pages));
    out.line(format_args!("r max_page_sharing {max_page_sharing}"));

    let len = shape.pages * PAGE;
    // SAFETY: a fresh private anonymous mapping; no other code refers to it.
    let addr = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if addr == libc::MAP_FAILED {
        eprintln!("twinpage bench-worker: mmap {len}: {}", std::io::Error::last_os_error());
        return 1;
    }
    let base = addr as usize;
    {
        // SAFETY: the mapping is `len` bytes, readable and writable, and only
        // this slice refers to it while it lives.
        let mem = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), len) };
        for (page, seed) in mem.chunks_exact_mut(PAGE).zip(&plan.seeds) {
            fill(page, *seed);
        }
    }

    // The workload's own activity, running before and while merging so its
    // slowdown can be measured: the volatile writer rewrites its pages flat
    // out; every other workload reads a word of every page and rewrites a
    // word of 1% of the pages (unique ones, with the value they hold, so the
    // achievable sharing does not change). Passes are counted.
    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicU64::new(0));
    let volatile = !plan.volatile.is_empty();
    let writes: Vec<usize> = if volatile { plan.volatile.clone() } else { touch_writes(&plan) };
    let pages = shape.pages;
    let worker = {
        let (stop, passes) = (stop.clone(), passes.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if volatile {
                    for &i in &writes {
                        // SAFETY: page `i` lies inside the live mapping; the
                        // write is volatile, other threads only read it.
                        unsafe { std::ptr::write_volatile((base + i * PAGE + 8) as *mut u64, n) };
                    }
                } else {
                    let mut sum = 0u64;
                    for i in 0..pages {
                        // SAFETY: page `i` lies inside the live, readable mapping.
                        sum = sum.wrapping_add(unsafe { std::ptr::read_volatile((base + i * PAGE) as *const u64) });
                    }
                    std::hint::black_box(sum);
                    for &i in &writes {
                        let p = (base + i * PAGE + 8) as *mut u64;
                        // SAFETY: page `i` lies inside the live mapping and
                        // only this thread writes it; it gets the value it
                        // holds, so its content never changes.
                        unsafe { std::ptr::write_volatile(p, std::ptr::read_volatile(p)) };
                    }
                }
                passes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let rate = |d: Duration| {
        let p0 = passes.load(Ordering::Relaxed);
        let t = Instant::now();
        std::thread::sleep(d);
        (passes.load(Ordering::Relaxed) - p0) as f64 / t.elapsed().as_secs_f64()
    };
    // The no-merging baseline: the same passes before anything is mergeable.
    let r = rate(Duration::from_secs(2));
    out.line(format_args!("r workload_passes_per_s_alone {r:.2}"));

    let maps_before = proc::map_count();
    let pss_before = proc::rollup_kb("Pss:");
    let avail_before = proc::meminfo_kb("MemAvailable:");
    let shmem_before = proc::meminfo_kb("Shmem:");
    out.line(format_args!("r pss_before_kb {pss_before}"));
    out.line(format_args!("r map_count_before {maps_before}"));
    let base_c = merger.counters();
    let baseline = base_c.sharing + base_c.zero;
    let cpu0 = merger.cpu();
    let passes0 = passes.load(Ordering::Relaxed);
    let start = Instant::now();
    match &merger {
        Merger::Kernel(_) => {
            // SAFETY: the range is our own live mapping.
            if unsafe { libc::madvise(addr, len, libc::MADV_MERGEABLE) } != 0 {
                eprintln!("twinpage bench-worker: MADV_MERGEABLE: {}", std::io::Error::last_os_error());
                return 1;
            }
        }
        Merger::Twinpage(e) => {
            if let Err(err) = e.register(base, len) {
                eprintln!("twinpage bench-worker: register: {err}");
                return 1;
            }
        }
    }
    out.line(format_args!("info started 1"));

    // Sample until the achievable sharing, a plateau, or the timeout.
    let timeout = Duration::from_secs(a.timeout);
    let mut last = u64::MAX;
    let mut last_change_scan = 0u64;
    let mut last_change_at = Instant::now();
    let mut reached = false;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let c = merger.counters();
        let saved = (c.sharing + c.zero).saturating_sub(baseline);
        let t = start.elapsed();
        out.line(format_args!("s {} {saved}", t.as_millis()));
        if saved >= expected && expected > 0 {
            reached = true;
            break;
        }
        if saved != last {
            last = saved;
            last_change_scan = c.full_scans;
            last_change_at = Instant::now();
        } else if saved > 0 && c.full_scans >= last_change_scan + 3 && last_change_at.elapsed() > Duration::from_secs(1) {
            break;
        }
        if t > timeout {
            out.line(format_args!("info timed_out 1"));
            break;
        }
    }
    let converge = start.elapsed();
    let cpu = merger.cpu() - cpu0;
    let during = (passes.load(Ordering::Relaxed) - passes0) as f64 / converge.as_secs_f64().max(1e-3);
    out.line(format_args!("r workload_passes_per_s_merging {during:.2}"));
    let c = merger.counters();
    let pss_after = proc::rollup_kb("Pss:");
    let avail_after = proc::meminfo_kb("MemAvailable:");
    let shmem_after = proc::meminfo_kb("Shmem:");
    out.line(format_args!("r reached_100 {}", u8::from(reached)));
    out.line(format_args!("r converge_s {:.3}", converge.as_secs_f64()));
    out.line(format_args!("r cpu_s {cpu:.3}"));
    out.line(format_args!("r pages_shared {}", c.shared));
    out.line(format_args!("r pages_sharing {}", c.sharing.saturating_sub(base_c.sharing)));
    out.line(format_args!("r ksm_zero_pages {}", c.zero.saturating_sub(base_c.zero)));
    out.line(format_args!("r full_scans {}", c.full_scans - base_c.full_scans));
    out.line(format_args!("r pss_after_kb {pss_after}"));
    out.line(format_args!("r pss_saved_kb {}", pss_before.saturating_sub(pss_after)));
    out.line(format_args!("r memavailable_gain_kb {}", avail_after as i64 - avail_before as i64));
    out.line(format_args!("r map_count_after {}", proc::map_count()));
    out.line(format_args!("r shmem_gain_kb {}", shmem_after as i64 - shmem_before as i64));
    match &merger {
        Merger::Kernel(_) => {
            out.line(format_args!("r metadata_bytes_per_page 64"));
            out.line(format_args!("r mappings_added 0"));
            out.line(format_args!("r merges_held_back 0"));
        }
        Merger::Twinpage(e) => {
            let s = e.stats();
            let per = s.twinpage_metadata_bytes as f64 / s.twinpage_pages_registered.max(1) as f64;
            out.line(format_args!("r metadata_bytes_per_page {per:.2}"));
            out.line(format_args!("r mappings_added {}", s.twinpage_mappings_added));
            out.line(format_args!("r merges_held_back {}", s.twinpage_merges_held_back));
            out.line(format_args!("r map_limit {}", s.twinpage_map_limit));
            out.line(format_args!("r store_allocated_kb {}", e.store_allocated_bytes() / 1024));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = worker.join();

    // Idle: nothing changes any more; what does merging cost now?
    if a.idle_secs > 0 {
        let (cpu0, scans0) = (merger.cpu(), merger.counters().full_scans);
        std::thread::sleep(Duration::from_secs(a.idle_secs));
        let cpu = merger.cpu() - cpu0;
        out.line(format_args!("r idle_cpu_s {cpu:.3}"));
        out.line(format_args!("r idle_full_scans {}", merger.counters().full_scans - scans0));
        out.line(format_args!("r idle_secs {}", a.idle_secs));
    }

    // First write to merged pages: up to `latency_pages` pages with a twin,
    // spread over the memory, one write each, timed.
    let n = a.latency_pages.min(plan.dups.len());
    if let Some(step) = plan.dups.len().checked_div(n) {
        let mut lat: Vec<f64> = Vec::with_capacity(n);
        for k in 0..n {
            let i = plan.dups[k * step];
            let p = (base + i * PAGE + 16) as *mut u64;
            let t = Instant::now();
            // SAFETY: page `i` lies inside the live mapping; nothing else
            // writes it now (the workload thread has stopped).
            unsafe { std::ptr::write_volatile(p, 0x5eed_0000 + k as u64) };
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        lat.sort_by(f64::total_cmp);
        let q = |f: f64| lat[((lat.len() as f64 * f) as usize).min(lat.len() - 1)];
        out.line(format_args!("r first_write_p50_us {:.2}", q(0.5)));
        out.line(format_args!("r first_write_p99_us {:.2}", q(0.99)));
        out.line(format_args!("r first_write_pages {n}"));
    }
    drop(merger);
    out.line(format_args!("done"));
    0
}

/// Pages the reading workload rewrites (with their own value): 1% of the
/// pages, all without a twin.
fn touch_writes(plan: &Plan) -> Vec<usize> {
    let mut twin = vec![false; plan.seeds.len()];
    for &i in &plan.dups {
        twin[i] = true;
    }
    let want = plan.seeds.len().div_ceil(100);
    let unique: Vec<usize> = (0..plan.seeds.len()).filter(|&i| !twin[i]).collect();
    let step = (unique.len() / want.max(1)).max(1);
    unique.into_iter().step_by(step).take(want).collect()
}
