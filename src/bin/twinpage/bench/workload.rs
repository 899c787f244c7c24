//! The workloads of `twinpage bench`: page contents and the sharing they allow.

use std::collections::HashMap;

/// Which memory a worker fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Duplicates of `--patterns` pattern pages at random positions.
    Scatter,
    /// Duplicates in runs of `--run-pages` pages, as identical guests have.
    Runs,
    /// Zero-heavy anonymous memory: `--dup-percent` of the pages are zero.
    Zero,
    /// As `runs`, and `--volatile-percent` of the pages rewritten all the time.
    Volatile,
    /// `--guests` TCG guests booted from one image (`--size`: RAM per guest).
    Qemu,
}

impl Workload {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Scatter => "scatter",
            Workload::Runs => "runs",
            Workload::Zero => "zero",
            Workload::Volatile => "volatile",
            Workload::Qemu => "qemu",
        }
    }
}

/// The shape of a workload.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Which workload.
    pub workload: Workload,
    /// Pages in all.
    pub pages: usize,
    /// Percentage of pages that duplicate another (or are zero).
    pub dup_percent: u32,
    /// Distinct pattern pages (scatter).
    pub patterns: usize,
    /// Pages per run (runs, volatile).
    pub run_pages: usize,
    /// Percentage of pages rewritten all the time (volatile).
    pub volatile_percent: u32,
}

/// The content of every page (`None`: a zero page), which are volatile, and
/// the sharing the workload allows.
pub struct Plan {
    /// Content seed per page; `None` for zero.
    pub seeds: Vec<Option<u64>>,
    /// Indexes of pages rewritten all the time.
    pub volatile: Vec<usize>,
    /// Indexes of pages that have a twin (candidates for first-write latency).
    pub dups: Vec<usize>,
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

impl Plan {
    /// Lays the workload out (deterministic: both sides get the same memory).
    pub fn new(s: &Shape) -> Plan {
        let pages = s.pages;
        let dups = pages * s.dup_percent.min(100) as usize / 100;
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let unique = |i: usize| Some((1u64 << 48) | i as u64);
        let mut seeds: Vec<Option<u64>> = (0..pages).map(unique).collect();
        let mut volatile = Vec::new();
        match s.workload {
            // Guest memory is laid out by the guest, not here.
            Workload::Qemu => {}
            Workload::Scatter => {
                let patterns = s.patterns.max(1) as u64;
                let mut n = 0;
                let mut is_dup = vec![false; pages];
                while n < dups {
                    let i = xorshift(&mut rng) as usize % pages;
                    if !is_dup[i] {
                        is_dup[i] = true;
                        seeds[i] = Some((1u64 << 40) | (xorshift(&mut rng) % patterns));
                        n += 1;
                    }
                }
            }
            Workload::Zero => {
                let mut n = 0;
                while n < dups {
                    let i = xorshift(&mut rng) as usize % pages;
                    if seeds[i].is_some() {
                        seeds[i] = None;
                        n += 1;
                    }
                }
            }
            Workload::Runs | Workload::Volatile => {
                let r = s.run_pages.max(1);
                let runs = pages.div_ceil(r);
                let dup_runs = (runs * s.dup_percent.min(100) as usize / 100).min(runs.saturating_sub(1));
                let unique_runs = runs - dup_runs;
                for run in unique_runs..runs {
                    let src = (run - unique_runs) % unique_runs;
                    for off in 0..r {
                        let (i, j) = (run * r + off, src * r + off);
                        if i < pages && j < pages {
                            seeds[i] = seeds[j];
                        }
                    }
                }
                if s.workload == Workload::Volatile {
                    // Volatile pages come from the unique runs, so the
                    // achievable sharing stays that of the duplicate runs.
                    let want = pages * s.volatile_percent.min(100) as usize / 100;
                    let pool = (unique_runs * r).min(pages);
                    let step = (pool / want.max(1)).max(1);
                    volatile = (0..pool).step_by(step).take(want).collect();
                    // Their sources' twins would change too: give each a seed of its own.
                    for &i in &volatile {
                        seeds[i] = Some((1u64 << 56) | i as u64);
                    }
                }
            }
        }
        let mut count: HashMap<Option<u64>, usize> = HashMap::new();
        for s in &seeds {
            *count.entry(*s).or_default() += 1;
        }
        let dups = (0..pages).filter(|&i| count[&seeds[i]] >= 2).collect();
        Plan { seeds, volatile, dups }
    }

    /// Pages that can be shared: for each content held by `n >= 2` pages,
    /// `n - 1` (as `pages_sharing` counts), less one for each further
    /// shared page a chain needs; with `use_zero_pages`, every zero page
    /// (as `ksm_zero_pages` counts).
    /// A content can have at most `max_page_sharing` sharers per shared
    /// page (the kernel's chains): `n` copies need `ceil(n / max)` of them.
    pub fn achievable(&self, use_zero_pages: bool, max_page_sharing: u64) -> u64 {
        let max = max_page_sharing.max(2);
        let mut count: HashMap<Option<u64>, u64> = HashMap::new();
        for s in &self.seeds {
            *count.entry(*s).or_default() += 1;
        }
        count
            .iter()
            .map(|(k, &n)| match k {
                None if use_zero_pages => n,
                _ if n >= 2 => n - n.div_ceil(max),
                _ => 0,
            })
            .sum()
    }
}

/// Fills one page from its seed (zero for `None`; still written, so the
/// page is present).
pub fn fill(page: &mut [u8], seed: Option<u64>) {
    match seed {
        None => page.fill(0),
        Some(seed) => {
            for (w, chunk) in page.chunks_exact_mut(8).enumerate() {
                let v = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(w as u64) | 1;
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Parses `1G`, `256M`, `64K` or a plain byte count.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1usize << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: usize = num.trim().parse().map_err(|_| format!("bad size {s:?} (e.g. 256M, 1G)"))?;
    let bytes = n.checked_mul(mult).ok_or_else(|| format!("size {s:?} too large"))?;
    if bytes < 4096 * 16 {
        return Err(format!("size {s:?} too small (at least 64K)"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(workload: Workload) -> Shape {
        Shape { workload, pages: 1024, dup_percent: 50, patterns: 8, run_pages: 64, volatile_percent: 10 }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("32M"), Ok(32 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn achievable_sharing() {
        assert_eq!(Plan::new(&shape(Workload::Runs)).achievable(false, 256), 512);
        assert_eq!(Plan::new(&shape(Workload::Scatter)).achievable(false, 256), 512 - 8);
        assert_eq!(Plan::new(&shape(Workload::Zero)).achievable(false, 256), 510);
        assert_eq!(Plan::new(&shape(Workload::Zero)).achievable(true, 256), 512);
        let big = Shape { pages: 4096, ..shape(Workload::Zero) };
        assert_eq!(Plan::new(&big).achievable(false, 256), 2048 - 8);
        let v = Plan::new(&shape(Workload::Volatile));
        assert_eq!(v.volatile.len(), 102);
        assert_eq!(v.achievable(false, 256), 512 - 102);
    }
}
