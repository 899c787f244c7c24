//! Torture: writers hammer mostly-duplicate memory (anonymous and
//! memfd-private) with verifiable content while the engine merges flat out.
//! Some pages are all zeros now and then (anonymous ones drop to the zero
//! page, in sparse runs). A single lost write fails the test.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

const WRITERS: usize = 4;
const PAGES_PER_AREA: usize = 16384; // 64 MiB each
const PATTERNS: u64 = 16;
const WORDS: usize = PAGE / 8;

fn pattern_word(k: u64, w: usize) -> u64 {
    k.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(w as u64) | 1
}

struct Area {
    mem: Mem,
    /// The content every page must have, word by word.
    shadow: Vec<AtomicU64>,
}

impl Area {
    fn new(mem: Mem) -> Self {
        let shadow = (0..mem.pages() * WORDS).map(|_| AtomicU64::new(0)).collect();
        let a = Self { mem, shadow };
        for p in 0..a.mem.pages() {
            if p % 5 == 0 {
                a.write_zero(p);
            } else {
                a.write_pattern(p, p as u64 % PATTERNS);
            }
        }
        a
    }
    fn write_zero(&self, p: usize) {
        for w in 0..WORDS {
            self.shadow[p * WORDS + w].store(0, Ordering::Relaxed);
            self.mem.write_u64(p, w, 0);
        }
    }
    fn write_pattern(&self, p: usize, k: u64) {
        for w in 0..WORDS {
            let v = pattern_word(k, w);
            self.shadow[p * WORDS + w].store(v, Ordering::Relaxed);
            self.mem.write_u64(p, w, v);
        }
    }
    fn write_word(&self, p: usize, w: usize, v: u64) {
        self.shadow[p * WORDS + w].store(v, Ordering::Relaxed);
        self.mem.write_u64(p, w, v);
    }
    /// Index of the first word of page `p` that differs from the shadow.
    fn check(&self, p: usize) -> Option<usize> {
        (0..WORDS).find(|&w| self.mem.read_u64(p, w) != self.shadow[p * WORDS + w].load(Ordering::Relaxed))
    }
}

#[test]
fn no_write_is_ever_lost() {
    let Some(e) = engine() else { return };
    flat_out(&e);
    // Zero pages counted as such (ksm_zero_pages), not as one KSM page of zeros.
    e.set_use_zero_pages(true);
    let secs: u64 = std::env::var("TWINPAGE_TORTURE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let areas = Arc::new([Area::new(Mem::anon(PAGES_PER_AREA)), Area::new(Mem::memfd_private(PAGES_PER_AREA))]);
    for a in areas.iter() {
        e.register(a.mem.addr, a.mem.len).unwrap();
    }
    let total = 2 * PAGES_PER_AREA as u64;
    let (ok, s0) = wait_for(&e, Duration::from_secs(60), |s| s.pages_sharing > total / 4);
    assert!(ok, "initial merging did not happen: {s0:?}");
    eprintln!("torture: before writers: {s0:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let mismatches = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for id in 0..WRITERS {
        let (areas, stop, mismatches, ops) = (areas.clone(), stop.clone(), mismatches.clone(), ops.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(id as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                let a = &areas[rng.gen_range(0..2)];
                // Each writer owns the pages p with p % WRITERS == id.
                let p = rng.gen_range(0..PAGES_PER_AREA / WRITERS) * WRITERS + id;
                if rng.gen_bool(0.1) {
                    a.write_zero(p);
                } else if rng.gen_bool(0.4) {
                    a.write_pattern(p, rng.gen_range(0..PATTERNS));
                } else {
                    a.write_word(p, rng.gen_range(0..WORDS), rng.gen());
                }
                if let Some(w) = a.check(p) {
                    mismatches.fetch_add(1, Ordering::Relaxed);
                    eprintln!("MISMATCH writer {id} page {p} word {w}");
                }
                ops.fetch_add(1, Ordering::Relaxed);
                if rng.gen_ratio(1, 64) {
                    // Let merges catch up with whole-page duplicates now and then.
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }));
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(5));
        eprintln!("torture: {:?} ops={} {:?}", start.elapsed(), ops.load(Ordering::Relaxed), e.stats());
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let s1 = e.stats();
    eprintln!("torture: after writers: {s1:?}");
    let merges = s1.twinpage_merge_runs - s0.twinpage_merge_runs;
    let breaks = s1.twinpage_cow_breaks - s0.twinpage_cow_breaks;
    assert!(merges > 100, "too few merges during the run: {merges}");
    assert!(breaks > 100, "too few copy-on-write breaks during the run: {breaks}");
    // Writers then wrote into zero pages dropped before they started.
    assert!(s0.ksm_zero_pages > 0, "no zero pages merged before the writers: {s0:?}");

    // Let the engine merge the final state, then check every byte again.
    assert!(e.wait_full_scans(2, Duration::from_secs(60)));
    // smart_scan visits pages that kept changing only every few scans.
    let (ok, s2) = wait_for(&e, Duration::from_secs(30), |s| s.ksm_zero_pages > 0);
    assert!(ok, "the zero pages the writers left did not merge: {s2:?}");
    let mut bad = 0;
    for a in areas.iter() {
        for p in 0..PAGES_PER_AREA {
            if let Some(w) = a.check(p) {
                bad += 1;
                eprintln!("final MISMATCH page {p} word {w}");
            }
        }
    }
    assert_eq!(mismatches.load(Ordering::Relaxed), 0);
    assert_eq!(bad, 0);
    eprintln!(
        "torture: {} ops in {secs}s, {merges} merge runs and {breaks} copy-on-write breaks during the run, 0 mismatches",
        ops.load(Ordering::Relaxed)
    );
    let areas = Arc::try_unwrap(areas).ok().expect("writers joined");
    for a in areas {
        a.mem.unmap(&e);
    }
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (0, 0));
}
