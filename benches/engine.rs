//! Engine micro-benchmarks:
//!
//! - `page_digest`: what the scanner spends per 4 KiB page: the xxh3_64 key
//!   twinpage uses (`digest::page_hash`), blake3 for comparison, the zero-page
//!   check and the byte comparison done under write-protect.
//! - `stable_tree` / `unstable_tree`: tree operations at 1e5 and 1e6 entries
//!   with random 64-bit keys.
//! - `merge`: the merge primitive (write-protect, compare, remap, wake) for an
//!   isolated page and for runs of 64 and 512 consecutive pages merged in one
//!   call. Needs userfaultfd (root); skipped otherwise.
//! - `unmerge`: the inverse (`MADV_UNMERGEABLE`, `run=2`) for runs of 64 and
//!   512 merged pages: their content back in anonymous memory of their own.
//!
//! Quick run:
//! `cargo bench --bench engine -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use twinpage::bench_api::MergeHarness;
use twinpage::digest::is_zero;
use twinpage::digest::page_hash;
use twinpage::sys::PAGE_SIZE;
use twinpage::tree::{PageRef, StableTree, UnstableTree};

const TREE_SIZES: [usize; 2] = [100_000, 1_000_000];
/// Keys probed per benchmark, cycled through (a power of two).
const PROBES: usize = 1 << 16;

fn random_page(rng: &mut StdRng) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    rng.fill(&mut page[..]);
    page
}

fn page_digest(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let page = random_page(&mut rng);
    let copy = page.clone();
    let zero = vec![0u8; PAGE_SIZE];

    let mut g = c.benchmark_group("page_digest");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    g.bench_function("xxh3_64", |b| b.iter(|| page_hash(black_box(&page))));
    g.bench_function("blake3", |b| b.iter(|| blake3::hash(black_box(&page))));
    // The worst case of the zero check: every byte is looked at.
    g.bench_function("is_zero", |b| b.iter(|| is_zero(black_box(&zero))));
    // The comparison a merge makes under write-protect (equal pages: full length).
    g.bench_function("compare_equal", |b| b.iter(|| black_box(&page[..]) == black_box(&copy[..])));
    g.finish();
}

fn random_keys(rng: &mut StdRng, n: usize) -> Vec<u64> {
    (0..n).map(|_| rng.gen()).collect()
}

/// `PROBES` keys drawn at random from `keys`.
fn probes_from(rng: &mut StdRng, keys: &[u64]) -> Vec<u64> {
    (0..PROBES).map(|_| keys[rng.gen_range(0..keys.len())]).collect()
}

/// A stable tree holding `keys`, store page `i` for key `i`, one sharer each.
fn stable_tree(keys: &[u64]) -> StableTree {
    let mut t = StableTree::default();
    for (i, &k) in keys.iter().enumerate() {
        t.insert(k, i as u32, 1);
        t.commit(i as u32);
    }
    t
}

fn stable(c: &mut Criterion) {
    let mut g = c.benchmark_group("stable_tree");
    for &n in &TREE_SIZES {
        let mut rng = StdRng::seed_from_u64(n as u64);
        let keys = random_keys(&mut rng, n);
        let hits = probes_from(&mut rng, &keys);
        // Random 64-bit keys: absent from the tree (a collision has odds ~2^-44).
        let misses = random_keys(&mut rng, PROBES);

        // Building the whole tree: a new store page per key, then its first sharer.
        g.throughput(Throughput::Elements(n as u64));
        g.sample_size(10);
        g.bench_with_input(BenchmarkId::new("build(insert+commit)", n), &keys, |b, keys| {
            b.iter_batched(
                StableTree::default,
                |mut t| {
                    for (i, &k) in keys.iter().enumerate() {
                        t.insert(k, i as u32, 1);
                        t.commit(i as u32);
                    }
                    t
                },
                BatchSize::LargeInput,
            )
        });

        g.throughput(Throughput::Elements(1));
        g.sample_size(100);
        let mut t = stable_tree(&keys);
        // A scanned page whose content is in the stable tree: reserve, then the
        // merge is called off (the node keeps its sharer).
        g.bench_function(BenchmarkId::new("reserve_hit+cancel", n), |b| {
            let mut i = 0;
            b.iter(|| {
                let k = hits[i & (PROBES - 1)];
                i += 1;
                let s = t.reserve(black_box(k), u32::MAX);
                if let Some(s) = s {
                    black_box(t.cancel(s));
                }
                s
            })
        });
        // A scanned page whose content is not in the stable tree.
        g.bench_function(BenchmarkId::new("reserve_miss", n), |b| {
            let mut i = 0;
            b.iter(|| {
                let k = misses[i & (PROBES - 1)];
                i += 1;
                t.reserve(black_box(k), u32::MAX)
            })
        });
        // A join and its later copy-on-write break: reserve, commit, release.
        g.bench_function(BenchmarkId::new("reserve+commit+release", n), |b| {
            let mut i = 0;
            b.iter(|| {
                let k = hits[i & (PROBES - 1)];
                i += 1;
                let s = t.reserve(black_box(k), u32::MAX).unwrap_or(0);
                t.commit(s);
                black_box(t.release(s))
            })
        });
        // A new store page that is given up (its node reaped): insert + cancel,
        // the tree staying at `n` entries.
        g.bench_function(BenchmarkId::new("insert+cancel", n), |b| {
            let mut i = 0;
            b.iter(|| {
                let k = misses[i & (PROBES - 1)];
                let idx = (n + (i & (PROBES - 1))) as u32;
                i += 1;
                t.insert(black_box(k), idx, 1);
                black_box(t.cancel(idx))
            })
        });
        assert_eq!(t.pages_shared(), n as u64, "the benchmarks left the tree as they found it");
    }
    g.finish();
}

fn unstable(c: &mut Criterion) {
    let mut g = c.benchmark_group("unstable_tree");
    for &n in &TREE_SIZES {
        let mut rng = StdRng::seed_from_u64(n as u64 + 7);
        let keys = random_keys(&mut rng, n);
        let hits = probes_from(&mut rng, &keys);
        let misses = random_keys(&mut rng, PROBES);
        let mut t = UnstableTree::default();
        let fill = |t: &mut UnstableTree| {
            t.clear();
            for (i, &k) in keys.iter().enumerate() {
                t.insert(k, PageRef { region: 1, page: i as u32 });
            }
        };
        fill(&mut t);

        // A full scan's rebuild: clear (the table keeps its allocation), insert all.
        g.throughput(Throughput::Elements(n as u64));
        g.sample_size(10);
        g.bench_function(BenchmarkId::new("rebuild(clear+insert)", n), |b| b.iter(|| fill(&mut t)));
        // The table keeps 32 bits of each key: random keys share them with
        // odds n^2/2^33 (about one pair at 1e5, a hundred at 1e6).
        assert!(t.len() >= n as u64 - n as u64 / 1000, "{} of {n}", t.len());

        g.throughput(Throughput::Elements(1));
        g.sample_size(100);
        g.bench_function(BenchmarkId::new("get_hit", n), |b| {
            let mut i = 0;
            b.iter(|| {
                let k = hits[i & (PROBES - 1)];
                i += 1;
                t.get(black_box(k))
            })
        });
        g.bench_function(BenchmarkId::new("get_miss", n), |b| {
            let mut i = 0;
            b.iter(|| {
                let k = misses[i & (PROBES - 1)];
                i += 1;
                t.get(black_box(k))
            })
        });
    }
    g.finish();
}

fn merge(c: &mut Criterion) {
    let mut h = match MergeHarness::new() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("merge benchmarks skipped: {e} (userfaultfd needs root or access to /dev/userfaultfd)");
            return;
        }
    };
    let mut g = c.benchmark_group("merge");
    // Each measured iteration is one merge_run call; throughput counts pages,
    // so 1/throughput is the cost per page.
    g.throughput(Throughput::Elements(1));
    g.bench_function("isolated_page", |b| b.iter_custom(|iters| h.merge_isolated(iters)));
    for run_len in [64usize, 512] {
        g.throughput(Throughput::Elements(run_len as u64));
        g.bench_function(BenchmarkId::new("run", run_len), |b| b.iter_custom(|iters| h.merge_runs(run_len, iters)));
    }
    g.finish();
    let mut g = c.benchmark_group("unmerge");
    for run_len in [64usize, 512] {
        g.throughput(Throughput::Elements(run_len as u64));
        g.bench_function(BenchmarkId::new("run", run_len), |b| b.iter_custom(|iters| h.unmerge_runs(run_len, iters)));
    }
    g.finish();
    let s = h.stats();
    assert_eq!(s.twinpage_merge_mismatches, 0);
    assert_eq!(s.twinpage_merges_held_back, 0);
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = page_digest, stable, unstable, merge
}
criterion_main!(benches);
