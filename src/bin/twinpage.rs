//! `twinpage`: the command-line tool. For now it has `demo`, which merges
//! duplicate memory of its own process and shows the KSM-shaped counters and
//! the memory saved, measured from /proc/self/smaps_rollup.

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use twinpage::Engine;

#[derive(Parser)]
#[command(name = "twinpage", version, about = "userspace same-page merging (KSM)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Layout {
    /// Duplicates in long runs, as two copies of one guest image have.
    Runs,
    /// Duplicates of a few patterns at random positions.
    Scatter,
}

#[derive(Subcommand)]
enum Cmd {
    /// Allocate duplicate memory in this process, merge it, show the savings.
    Demo {
        /// Memory to allocate, in MiB.
        #[arg(long, default_value_t = 256)]
        mib: usize,
        /// Percentage of pages that duplicate another page (0-90).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=90))]
        dup: u8,
        /// Where duplicates are.
        #[arg(long, value_enum, default_value_t = Layout::Runs)]
        layout: Layout,
        /// Distinct pattern pages for the scatter layout.
        #[arg(long, default_value_t = 64)]
        patterns: usize,
        /// pages_to_scan for the demo.
        #[arg(long, default_value_t = 100_000)]
        pages_to_scan: u32,
        /// sleep_millisecs for the demo.
        #[arg(long, default_value_t = 0)]
        sleep_millisecs: u32,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("TWINPAGE_LOG", "warn")).init();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Demo { mib, dup, layout, patterns, pages_to_scan, sleep_millisecs } => {
            demo(mib, dup, layout, patterns.max(1), pages_to_scan, sleep_millisecs)
        }
    };
    std::process::exit(code);
}

const PAGE: usize = 4096;

fn rollup_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0)
}

fn fill(page: &mut [u8], seed: u64) {
    for (w, chunk) in page.chunks_exact_mut(8).enumerate() {
        let v = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(w as u64) | 1;
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

fn demo(mib: usize, dup: u8, layout: Layout, patterns: usize, pages_to_scan: u32, sleep: u32) -> i32 {
    let engine = match Engine::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("twinpage demo: {e}");
            return 1;
        }
    };
    if let Err(e) = engine.set_pages_to_scan(pages_to_scan) {
        eprintln!("twinpage demo: pages_to_scan: {e}");
        return 1;
    }
    engine.set_sleep_millisecs(sleep);
    let pages = mib * 1024 * 1024 / PAGE;
    let dups = pages * dup as usize / 100;
    let mut mem = memmap2::MmapMut::map_anon(pages * PAGE).expect("mmap");
    let mut rng_state = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = move || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let sources = pages - dups;
    let mut is_dup = vec![false; pages];
    match layout {
        Layout::Runs => (sources..pages).for_each(|i| is_dup[i] = true),
        Layout::Scatter => {
            let mut n = 0;
            while n < dups {
                let i = rand() as usize % pages;
                if !is_dup[i] {
                    is_dup[i] = true;
                    n += 1;
                }
            }
        }
    }
    let mut src = 0u64;
    for (i, page) in mem.chunks_exact_mut(PAGE).enumerate() {
        let seed = match (layout, is_dup[i]) {
            (Layout::Runs, true) => ((i - sources) % sources.max(1)) as u64,
            (Layout::Scatter, true) => 1 << 40 | (rand() % patterns as u64),
            (_, false) => {
                src += 1;
                src + (1 << 20)
            }
        };
        let seed = if matches!(layout, Layout::Runs) && !is_dup[i] { i as u64 } else { seed };
        fill(page, seed);
    }
    let pss_before = rollup_kb("Pss:");
    println!(
        "twinpage demo: {mib} MiB, {dup}% duplicate pages ({dups} of {pages}, layout {}), pages_to_scan={pages_to_scan} sleep_millisecs={sleep}",
        match layout { Layout::Runs => "runs", Layout::Scatter => "scatter" }
    );
    println!("PSS before merging: {} MiB", pss_before / 1024);
    let start = Instant::now();
    if let Err(e) = engine.register(mem.as_ptr() as usize, pages * PAGE) {
        eprintln!("twinpage demo: register: {e}");
        return 1;
    }
    println!(
        "{:>7} {:>10} {:>12} {:>13} {:>14} {:>14} {:>10} {:>9}",
        "time_s", "full_scans", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "saved_MiB", "PSS_MiB"
    );
    let mut last = (u64::MAX, u64::MAX);
    let mut stable_since = None;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let s = engine.stats();
        println!(
            "{:>7.2} {:>10} {:>12} {:>13} {:>14} {:>14} {:>10.1} {:>9}",
            start.elapsed().as_secs_f64(),
            s.full_scans,
            s.pages_shared,
            s.pages_sharing,
            s.pages_unshared,
            s.pages_volatile,
            s.bytes_saved() as f64 / (1 << 20) as f64,
            rollup_kb("Pss:") / 1024
        );
        let now = (s.pages_shared, s.pages_sharing);
        if now != last {
            last = now;
            stable_since = Some(s.full_scans);
        } else if stable_since.is_some_and(|f| s.full_scans >= f + 2) || start.elapsed() > Duration::from_secs(600) {
            break;
        }
    }
    let s = engine.stats();
    let pss_after = rollup_kb("Pss:");
    println!();
    for name in ["pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans", "general_profit"] {
        println!("{name:>16}: {}", engine.show_attr(name).unwrap_or_default());
    }
    println!(
        "memory saved: PSS {} MiB -> {} MiB, {:.1} MiB measured ({:.1} MiB by the counters) of {:.1} MiB duplicate; metadata {} KiB; {} mappings added",
        pss_before / 1024,
        pss_after / 1024,
        pss_before.saturating_sub(pss_after) as f64 / 1024.0,
        s.bytes_saved() as f64 / (1 << 20) as f64,
        (dups * PAGE) as f64 / (1 << 20) as f64,
        s.twinpage_metadata_bytes / 1024,
        s.twinpage_mappings_added,
    );
    if s.twinpage_merges_held_back > 0 {
        println!(
            "note: {} page merges were held back to stay under vm.max_map_count ({} of {} mappings in use)",
            s.twinpage_merges_held_back, s.twinpage_map_count, s.twinpage_map_limit
        );
    }
    let (a, l) = (mem.as_ptr() as usize, pages * PAGE);
    engine.unmap_with(a, l, || drop(mem));
    0
}
