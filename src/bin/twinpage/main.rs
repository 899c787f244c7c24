//! `twinpage`: the command-line tool.
//!
//! - `stat`: every KSM attribute of the statistics tree, the memory saved
//!   and a per-process table (`--json` for programs);
//! - `top`: a live view of the same, with saved memory over time;
//! - `set ATTR VALUE`: a tunable, with the kernel's rules (exit status: the
//!   errno of a refusal, e.g. 22 for EINVAL);
//! - `demo`: merges duplicate memory of its own process and shows the
//!   KSM-shaped counters and the memory saved, measured from
//!   /proc/self/smaps_rollup (`--publish` also publishes the tree).
//!
//! `--dir` defaults to `$TWINPAGE_DIR`, else `/run/twinpage`.

mod bench;

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use twinpage::statsfs::{self, ProcessEntry, SetOutcome, StatsTree, StatsTreeOptions, Tree};
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

/// `twinpage demo`: what to allocate and how to merge it.
#[derive(clap::Args)]
struct DemoArgs {
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
    /// Publish the statistics tree (under --dir) while running.
    #[arg(long)]
    publish: bool,
    /// The tree's root [default: $TWINPAGE_DIR or /run/twinpage].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep running (and publishing) this many seconds after merging settled.
    #[arg(long, default_value_t = 0)]
    hold: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Allocate duplicate memory in this process, merge it, show the savings.
    Demo(DemoArgs),
    /// Show every KSM attribute, the memory saved and the processes.
    Stat {
        /// The tree's root [default: $TWINPAGE_DIR or /run/twinpage].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a KSM attribute with the kernel's rules and wait until it applies.
    Set {
        /// Attribute name (as in /sys/kernel/mm/ksm).
        attr: String,
        /// Value, as it would be written with `echo -n`.
        #[arg(allow_hyphen_values = true)]
        value: String,
        /// The tree's root [default: $TWINPAGE_DIR or /run/twinpage].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// A live view: key counters, processes, saved memory over time.
    Top {
        /// The tree's root [default: $TWINPAGE_DIR or /run/twinpage].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Refresh interval in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval: u64,
        /// Print one frame and exit.
        #[arg(long)]
        once: bool,
    },
    /// Check this host for what twinpage needs (kernel, userfaultfd,
    /// vm.max_map_count, THP, kernel KSM, twinpaged, the store directory):
    /// each fact ok / warning / error with its fix; exits 1 on an error.
    Doctor {
        /// The tree's root [default: $TWINPAGE_DIR or /run/twinpage].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run one workload under kernel KSM and under twinpage, and compare (root).
    Bench(bench::BenchArgs),
    /// One side of `bench`, in its own process.
    #[command(hide = true)]
    BenchWorker(bench::WorkerArgs),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("TWINPAGE_LOG", "warn")).init();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Demo(a) => demo(&a),
        Cmd::Stat { dir, json } => stat(&tree(dir), json),
        Cmd::Doctor { dir } => doctor(&tree(dir)),
        Cmd::Set { attr, value, dir } => set(&tree(dir), &attr, &value),
        Cmd::Top { dir, interval, once } => top(&tree(dir), interval.max(50), once),
        Cmd::Bench(a) => bench::main(&a),
        Cmd::BenchWorker(a) => bench::worker_main(&a),
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

fn demo(a: &DemoArgs) -> i32 {
    let (mib, dup, layout, patterns, pages_to_scan, sleep, hold) =
        (a.mib, a.dup, a.layout, a.patterns.max(1), a.pages_to_scan, a.sleep_millisecs, a.hold);
    let publish = a.publish.then(|| a.dir.clone().unwrap_or_else(statsfs::default_root));
    let engine = match Engine::new() {
        Ok(e) => Arc::new(e),
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
    let publisher = match publish {
        None => None,
        Some(root) => {
            let opts = StatsTreeOptions { explicit: vec!["pages_to_scan".into(), "sleep_millisecs".into()], ..StatsTreeOptions::default() };
            match StatsTree::spawn(engine.clone(), root.clone(), opts) {
                Ok(h) => {
                    println!("publishing statistics under {}", root.display());
                    Some(h)
                }
                Err(e) => {
                    eprintln!("twinpage demo: cannot publish under {}: {e}", root.display());
                    return 1;
                }
            }
        }
    };
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
    if hold > 0 {
        println!("holding for {hold} s");
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(hold));
    }
    drop(publisher);
    let (a, l) = (mem.as_ptr() as usize, pages * PAGE);
    engine.unmap_with(a, l, || drop(mem));
    0
}

fn tree(dir: Option<PathBuf>) -> Tree {
    Tree::at(dir.unwrap_or_else(statsfs::default_root))
}

const MIB: f64 = (1 << 20) as f64;

/// What `stat` and `top` show, read from the tree.
struct Snapshot {
    attrs: Vec<(&'static kernel_compat::Attr, String)>,
    processes: Vec<ProcessEntry>,
    twinpage: statsfs::Counters,
}

impl Snapshot {
    fn read(t: &Tree) -> Result<Snapshot, String> {
        if !t.exists() {
            return Err(format!("no twinpage statistics tree at {} (is a twinpage process running?)", t.root().display()));
        }
        let err = |e: std::io::Error| format!("cannot read {}: {e}", t.root().display());
        Ok(Snapshot {
            attrs: t.attributes().map_err(err)?,
            processes: t.processes().map_err(err)?.into_iter().filter(|p| p.live).collect(),
            twinpage: t.twinpage_stats().unwrap_or_default(),
        })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(a, _)| a.name == name).map(|(_, v)| v.as_str())
    }

    fn num(&self, name: &str) -> i128 {
        self.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// (pages_sharing + ksm_zero_pages) * page size.
    fn saved_bytes(&self) -> i128 {
        (self.num("pages_sharing") + self.num("ksm_zero_pages")) * PAGE as i128
    }

    /// The line about merges `vm.max_map_count` holds back, when it does.
    fn held_back_line(&self) -> Option<String> {
        let held = self.twinpage.get("twinpage_pages_held_back").copied().unwrap_or(0);
        if held <= 0 {
            return None;
        }
        let now = twinpage::maplimit::read().map_or("?".to_string(), |v| v.to_string());
        let want = twinpage::maplimit::need(&self.processes).map_or(1 << 20, |n| n.max_map_count);
        Some(format!(
            "held back: {held} pages ({:.1} MiB) not merged because of vm.max_map_count={now}; `sysctl -w vm.max_map_count={want}` lets them merge (twinpaged running as root raises it itself)",
            (held * PAGE as i128) as f64 / MIB
        ))
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn process_rows(s: &Snapshot) -> Vec<String> {
    let mut rows = vec![format!(
        "{:>8} {:<16} {:>14} {:>11} {:>16} {:>11}",
        "PID", "NAME", "MERGING_PAGES", "ZERO_PAGES", "PROFIT_BYTES", "PROFIT_MiB"
    )];
    for p in &s.processes {
        let st = p.stat.unwrap_or_default();
        rows.push(format!(
            "{:>8} {:<16} {:>14} {:>11} {:>16} {:>11.1}",
            p.pid,
            p.name,
            st.ksm_merging_pages,
            st.ksm_zero_pages,
            st.ksm_process_profit,
            st.ksm_process_profit as f64 / MIB
        ));
    }
    rows
}

fn stat(t: &Tree, json: bool) -> i32 {
    let s = match Snapshot::read(t) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("twinpage: {e}");
            return 1;
        }
    };
    if json {
        let attrs: Vec<String> = s
            .attrs
            .iter()
            .map(|(a, v)| {
                let numeric = a.format != kernel_compat::attrs::Format::AdvisorMode && v.parse::<i128>().is_ok();
                format!("{}:{}", json_str(a.name), if numeric { v.clone() } else { json_str(v) })
            })
            .collect();
        let tp: Vec<String> = s.twinpage.iter().map(|(k, v)| format!("{}:{v}", json_str(k))).collect();
        let procs: Vec<String> = s
            .processes
            .iter()
            .map(|p| {
                let st = p.stat.unwrap_or_default();
                format!(
                    "{{\"pid\":{},\"comm\":{},\"name\":{},\"ksm_rmap_items\":{},\"ksm_merging_pages\":{},\"ksm_zero_pages\":{},\"ksm_process_profit\":{},\"ksm_merge_any\":{},\"ksm_mergeable\":{}}}",
                    p.pid,
                    json_str(&p.comm),
                    json_str(&p.name),
                    st.ksm_rmap_items,
                    st.ksm_merging_pages,
                    st.ksm_zero_pages,
                    st.ksm_process_profit,
                    st.ksm_merge_any,
                    st.ksm_mergeable
                )
            })
            .collect();
        println!(
            "{{\"dir\":{},\"attributes\":{{{}}},\"saved_bytes\":{},\"saved_mib\":{:.3},\"twinpage\":{{{}}},\"processes\":[{}]}}",
            json_str(&t.root().display().to_string()),
            attrs.join(","),
            s.saved_bytes(),
            s.saved_bytes() as f64 / MIB,
            tp.join(","),
            procs.join(",")
        );
        return 0;
    }
    println!("twinpage statistics under {} ({} processes)", t.root().display(), s.processes.len());
    for (a, v) in &s.attrs {
        println!("{:<36} {v}", a.name);
    }
    println!();
    println!(
        "memory saved: {:.1} MiB ((pages_sharing {} + ksm_zero_pages {}) x {PAGE} bytes)",
        s.saved_bytes() as f64 / MIB,
        s.num("pages_sharing"),
        s.num("ksm_zero_pages")
    );
    if let Some(l) = s.held_back_line() {
        println!("{l}");
    }
    println!();
    for r in process_rows(&s) {
        println!("{r}");
    }
    0
}

fn doctor(t: &Tree) -> i32 {
    let findings = twinpage::doctor::check(t);
    for f in &findings {
        println!("{:<8} {:<14} {}", f.level.as_str(), f.topic, f.fact);
        if !f.fix.is_empty() {
            println!("{:<8} {:<14} fix: {}", "", "", f.fix);
        }
    }
    let worst = findings.iter().map(|f| f.level).max().unwrap_or(twinpage::doctor::Level::Ok);
    i32::from(worst == twinpage::doctor::Level::Error)
}

fn set(t: &Tree, attr: &str, value: &str) -> i32 {
    match t.set(attr, value.as_bytes(), Duration::from_secs(2)) {
        Ok(SetOutcome::Applied { before, after }) => {
            println!("{attr}: {before} -> {after}");
            0
        }
        Ok(SetOutcome::Unchanged) => 0,
        Ok(SetOutcome::Pending) => {
            println!("{attr}: written; no twinpage process is running, it applies when one starts");
            0
        }
        Err(e) => {
            eprintln!("twinpage: {attr}: {e}");
            e.exit_code()
        }
    }
}

fn sparkline(values: &VecDeque<f64>) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().copied().fold(0.0f64, f64::max);
    values.iter().map(|&v| if max <= 0.0 { BARS[0] } else { BARS[((v / max) * 7.0).round().clamp(0.0, 7.0) as usize] }).collect()
}

fn clock() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) % 86400;
    format!("{:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

fn top(t: &Tree, interval_ms: u64, once: bool) -> i32 {
    const HISTORY: usize = 60;
    let mut saved: VecDeque<f64> = VecDeque::with_capacity(HISTORY);
    let mut last: Option<(Instant, i128)> = None;
    loop {
        let s = match Snapshot::read(t) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("twinpage: {e}");
                return 1;
            }
        };
        let now = Instant::now();
        let scanned = s.num("pages_scanned");
        let rate = last.map(|(at, n)| (scanned - n) as f64 / now.duration_since(at).as_secs_f64().max(1e-3));
        last = Some((now, scanned));
        if saved.len() == HISTORY {
            saved.pop_front();
        }
        saved.push_back(s.saved_bytes() as f64 / MIB);
        let mut out = String::new();
        if !once {
            out.push_str("\x1b[H\x1b[2J");
        }
        let mode = kernel_compat::AdvisorMode::from_show(s.get("advisor_mode").unwrap_or("")).map_or("?", |m| m.as_str());
        out.push_str(&format!(
            "twinpage top - {} - {} - {} processes - every {:.1} s\n",
            t.root().display(),
            clock(),
            s.processes.len(),
            interval_ms as f64 / 1000.0
        ));
        out.push_str(&format!(
            "run {}  pages_to_scan {}  sleep_millisecs {}  use_zero_pages {}  advisor {mode}\n\n",
            s.num("run"),
            s.num("pages_to_scan"),
            s.num("sleep_millisecs"),
            s.num("use_zero_pages")
        ));
        out.push_str(&format!(
            "pages_shared   {:>12}   pages_sharing  {:>12}   pages_unshared {:>12}\n",
            s.num("pages_shared"),
            s.num("pages_sharing"),
            s.num("pages_unshared")
        ));
        out.push_str(&format!(
            "pages_volatile {:>12}   ksm_zero_pages {:>12}   full_scans     {:>12}\n",
            s.num("pages_volatile"),
            s.num("ksm_zero_pages"),
            s.num("full_scans")
        ));
        out.push_str(&format!(
            "pages_scanned  {:>12}   scan rate      {:>10}/s   cow breaks     {:>12}\n",
            scanned,
            rate.map_or("-".to_string(), |r| format!("{r:.0}")),
            s.twinpage.get("twinpage_cow_breaks").copied().unwrap_or(0)
        ));
        out.push_str(&format!(
            "saved {:.1} MiB   general_profit {:.1} MiB\n",
            s.saved_bytes() as f64 / MIB,
            s.num("general_profit") as f64 / MIB
        ));
        out.push_str(&format!(
            "saved over time [{}] (last {} samples, max {:.1} MiB)\n\n",
            sparkline(&saved),
            saved.len(),
            saved.iter().copied().fold(0.0f64, f64::max)
        ));
        if let Some(l) = s.held_back_line() {
            out.push_str(&l);
            out.push_str("\n\n");
        }
        for r in process_rows(&s) {
            out.push_str(&r);
            out.push('\n');
        }
        print!("{out}");
        let _ = std::io::stdout().flush();
        if once {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
}
