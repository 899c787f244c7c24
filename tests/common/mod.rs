//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use twinpage::{Engine, KsmStats};

pub mod guest;
pub mod kernel_ksm;
pub mod procs;
pub mod sysctl;
pub mod view;

pub const PAGE: usize = 4096;

/// Whether prerequisites hold; outside CI a missing one skips the test with a
/// printed reason, under `CI=true` it fails it.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("prerequisite missing under CI: {what}");
    }
    eprintln!("SKIP: {what}");
    false
}

/// A new engine, or None (skipped) where userfaultfd is unavailable.
pub fn engine() -> Option<Engine> {
    match Engine::new() {
        Ok(e) => Some(e),
        Err(e) => {
            require(false, &format!("twinpage engine needs userfaultfd write-protect: {e}"));
            None
        }
    }
}

/// Fast scanning for tests.
pub fn flat_out(e: &Engine) {
    e.set_pages_to_scan(100_000).unwrap();
    e.set_sleep_millisecs(0);
}

/// Test memory; `unmap` returns it through the engine.
pub struct Mem {
    pub addr: usize,
    pub len: usize,
}

impl Mem {
    pub fn anon(pages: usize) -> Self {
        let len = pages * PAGE;
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self { addr: p as usize, len }
    }

    /// A `MAP_PRIVATE` mapping of a fresh memfd (as QEMU's
    /// memory-backend-file share=off on tmpfs).
    pub fn memfd_private(pages: usize) -> Self {
        Self::memfd_private_of(pages, 0)
    }

    /// A private mapping of a memfd whose every page holds the byte `fill`
    /// in the file (0: a file of holes).
    pub fn memfd_private_of(pages: usize, fill: u8) -> Self {
        let len = pages * PAGE;
        // SAFETY: plain syscalls on a fresh memfd.
        unsafe {
            let fd = libc::memfd_create(c"tp-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, len as i64), 0);
            if fill != 0 {
                let data = vec![fill; len];
                assert_eq!(libc::pwrite(fd, data.as_ptr().cast(), len, 0), len as isize);
            }
            let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE, fd, 0);
            assert_ne!(p, libc::MAP_FAILED);
            libc::close(fd);
            Self { addr: p as usize, len }
        }
    }

    pub fn pages(&self) -> usize {
        self.len / PAGE
    }

    pub fn page_ptr(&self, i: usize) -> *mut u8 {
        (self.addr + i * PAGE) as *mut u8
    }

    /// Fills page `i` with a pattern derived from `seed`.
    pub fn fill(&self, i: usize, seed: u64) {
        let p = self.page_ptr(i) as *mut u64;
        for w in 0..PAGE / 8 {
            let v = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(w as u64) | 1;
            // SAFETY: within the mapping; volatile since the engine may remap
            // the page underneath at any time.
            unsafe { p.add(w).write_volatile(v) };
        }
    }

    /// Writes zeros into page `i` (a real anonymous page full of zeros).
    pub fn zero(&self, i: usize) {
        let p = self.page_ptr(i) as *mut u64;
        for w in 0..PAGE / 8 {
            // SAFETY: within the mapping.
            unsafe { p.add(w).write_volatile(0) };
        }
    }

    pub fn read_u64(&self, i: usize, word: usize) -> u64 {
        // SAFETY: within the mapping.
        unsafe { (self.page_ptr(i) as *const u64).add(word).read_volatile() }
    }

    pub fn write_u64(&self, i: usize, word: usize, v: u64) {
        // SAFETY: within the mapping.
        unsafe { (self.page_ptr(i) as *mut u64).add(word).write_volatile(v) }
    }

    pub fn page_matches(&self, i: usize, seed: u64) -> bool {
        (0..PAGE / 8).all(|w| self.read_u64(i, w) == seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(w as u64) | 1)
    }

    /// Unmaps through the engine's protocol.
    pub fn unmap(self, e: &Engine) {
        let (a, l) = (self.addr, self.len);
        // SAFETY: unmapping our own mapping.
        e.unmap_with(a, l, || unsafe { libc::munmap(a as *mut libc::c_void, l) });
    }
}

/// Page `page` of `m` (no longer registered) kept its frame and its store
/// page after a write in place: ten other pages merge (store pages are
/// handed out), then the program discards `page` as QEMU's balloon does. It
/// must read zeros, never the bytes merged since (its store page reused).
/// Unmaps both.
pub fn discard_reads_zeros_after_other_merges(e: &Engine, m: Mem, page: usize) {
    let other = Mem::anon(10);
    for i in 0..10 {
        other.fill(i, 43);
    }
    e.register(other.addr, other.len).unwrap();
    assert!(wait_until(Duration::from_secs(10), || e.stats().twinpage_merging_pages == 10), "{:?}", e.stats());
    // SAFETY: a page of the test's own mapping, no longer registered: the
    // program's discard.
    assert_eq!(unsafe { libc::madvise((m.addr + page * 4096) as *mut libc::c_void, 4096, libc::MADV_DONTNEED) }, 0);
    assert!(!m.page_matches(page, 43), "the discard of page {page} reads a page merged since");
    assert!((0..512).all(|w| m.read_u64(page, w) == 0), "page {page} does not read zeros after its discard");
    other.unmap(e);
    m.unmap(e);
}

/// Polls until `pred(stats)` holds or `timeout` passes; returns the last stats.
pub fn wait_for(e: &Engine, timeout: Duration, pred: impl Fn(&KsmStats) -> bool) -> (bool, KsmStats) {
    let deadline = Instant::now() + timeout;
    loop {
        let s = e.stats();
        if pred(&s) {
            return (true, s);
        }
        if Instant::now() > deadline {
            return (false, s);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Four pages of seed 77, registered and merged (one store page shared by
/// four), the scanner flat out.
pub fn four_pages_merged(e: &Engine) -> Mem {
    flat_out(e);
    let m = Mem::anon(4);
    for i in 0..4 {
        m.fill(i, 77);
    }
    e.register(m.addr, m.len).unwrap();
    let (ok, s) = wait_for(e, Duration::from_secs(10), |s| (s.pages_shared, s.pages_sharing) == (1, 3));
    assert!(ok, "{s:?}");
    m
}

/// The pagemap entry of this process's page at `addr`.
fn pagemap_entry(addr: usize) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / PAGE * 8) as u64).unwrap();
    u64::from_le_bytes(b)
}

/// pagemap flags of this process's page at `addr`: (present, file).
pub fn pagemap_flags(addr: usize) -> (bool, bool) {
    let v = pagemap_entry(addr);
    (v >> 63 & 1 == 1, v >> 61 & 1 == 1)
}

/// The physical frame of this process's page at `addr` (0 when absent, or
/// without CAP_SYS_ADMIN, which pagemap needs to show frames).
pub fn pagemap_pfn(addr: usize) -> u64 {
    pagemap_entry(addr) & ((1 << 55) - 1)
}

/// A field of /proc/self/smaps_rollup in kB.
pub fn smaps_rollup_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    s.lines().find_map(|l| l.strip_prefix(field).and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())).unwrap_or(0)
}

/// `target/release/libtwinpage.so` (scripts/test.sh builds it first).
pub fn preload_lib() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/libtwinpage.so");
    require(p.exists(), &format!("{} not built (cargo build --release -p twinpage-preload)", p.display())).then_some(p)
}

pub fn have_uffd() -> bool {
    require(twinpage::Engine::new().is_ok(), "userfaultfd write-protect (root or /dev/userfaultfd)")
}

/// Compiles tests/programs/NAME.c into a temp dir, once per test process
/// (tests running in parallel must not rewrite a binary another executes).
pub fn program(name: &str) -> Option<PathBuf> {
    static BUILT: std::sync::Mutex<Vec<(String, Option<PathBuf>)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/programs/{name}.c"));
    let out = std::env::temp_dir().join(format!("twinpage-{name}-{}", std::process::id()));
    let ok = Command::new("gcc").args(["-O2", "-Wall", "-o"]).arg(&out).arg(&src).status().is_ok_and(|s| s.success());
    let p = ok.then_some(out);
    built.push((name.to_string(), p.clone()));
    drop(built);
    require(ok, "gcc to build the test programs").then_some(p?)
}

/// A fresh directory under the temp dir, for a stats tree.
pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("twinpage-dir-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Polls `cond` every 10 ms until it holds or `timeout` passed; its last value.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}
