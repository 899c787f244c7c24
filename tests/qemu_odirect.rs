//! Device writes into merged guest RAM, with kernel KSM as the oracle: a TCG
//! guest whose disk is `cache=none` (QEMU reads with O_DIRECT, so the host
//! pins guest RAM for every read) reads known disk blocks into buffers it
//! keeps filling with one byte, while the host merges flat out. On both
//! guest RAM backends (anonymous, THP where QEMU asks for it, and
//! `memory-backend-file,share=off`) the same guest runs once under kernel
//! KSM and once under twinpage's defaults: no read may be lost, and
//! twinpage's saving must be within 10% of the kernel's.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::guest::{prerequisites, Guest};
use common::kernel_ksm::{kernel_ksm_writable, ksm_read, KernelKsm};
use common::require;

const GUEST_MEM: &str = "256M";
const DISK_BLOCKS: u64 = 16384;
/// Seconds of O_DIRECT reads (the scenario of issue 14).
const ODIRECT_S: u64 = 30;

/// The disk the guest reads: block b holds the words `"TPK" | b << 16 | j`
/// (scripts/guest/workload.c checks them).
fn write_disk(path: &Path) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for b in 0..DISK_BLOCKS {
        for j in 0..512u64 {
            f.write_all(&(0x5450_4b00_0000_0000 | b << 16 | j).to_le_bytes()).unwrap();
        }
    }
    f.into_inner().unwrap().sync_all().unwrap();
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Kernel,
    Twinpage,
}

#[derive(Clone, Copy)]
enum Backend {
    Anon,
    FileShareOff,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Anon => "anonymous",
            Backend::FileShareOff => "memory-backend-file share=off",
        }
    }

    fn args(self, shm: &Path) -> Vec<String> {
        let mut a = vec!["-m".into(), GUEST_MEM.into()];
        if let Backend::FileShareOff = self {
            a.extend([
                "-object".into(),
                format!("memory-backend-file,id=mem,size={GUEST_MEM},mem-path={},share=off", shm.display()),
                "-machine".into(),
                "memory-backend=mem".into(),
            ]);
        }
        a
    }
}

/// What one guest run showed.
struct Outcome {
    reads: u64,
    lost: u64,
    /// Mean of `pages_sharing + ksm_zero_pages` during the O_DIRECT phase.
    saving: f64,
    /// QEMU's PSS at TP-READY, before merging starts, in kB.
    pss_ready_kb: f64,
    /// Mean of QEMU's PSS during the phase, in kB.
    pss_kb: f64,
    /// twinpage's own counters at the end (empty for the kernel).
    counters: String,
    verdict: String,
}

/// `key=N` from a console line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok()).unwrap_or(0)
}

fn run(lib: &Path, disk: &Path, side: Side, backend: Backend, pin_guard: &str) -> Outcome {
    let tag = format!("odirect-{}-{}", if side == Side::Kernel { "kernel" } else { "twinpage" }, std::process::id());
    let shm = PathBuf::from(format!("/dev/shm/twinpage-{tag}"));
    let tp_args = ["tp.mib=64", "tp.wait=15", "tp.poweroff=1"].map(String::from);
    let odirect = format!("tp.odirect={ODIRECT_S}");
    let tp_args: Vec<&str> = tp_args.iter().map(String::as_str).chain([odirect.as_str()]).collect();
    let mut qemu = backend.args(&shm);
    qemu.extend([
        "-smp".into(),
        "2".into(),
        "-drive".into(),
        format!("file={},format=raw,if=virtio,cache=none,aio=threads", disk.display()),
    ]);
    let env = [("TWINPAGE_SLEEP_MILLISECS", "0"), ("TWINPAGE_PIN_GUARD", pin_guard)];
    let kernel = (side == Side::Kernel).then(KernelKsm::flat_out);
    let env: &[(&str, &str)] = if side == Side::Kernel || pin_guard.is_empty() { &env[..1] } else { &env };
    let mut g = Guest::boot_env(&tag, lib, &tp_args, &qemu, side == Side::Twinpage, env);
    g.wait_line("TP-READY", Duration::from_secs(90));
    let pss_ready = g.pss_kb();
    let saving = |g: &Guest| match side {
        Side::Kernel => ksm_read("pages_sharing") + ksm_read("ksm_zero_pages"),
        Side::Twinpage => g.attr("pages_sharing") + g.attr("ksm_zero_pages"),
    };
    match &kernel {
        Some(k) => k.start(),
        None => g.start_merging(),
    }
    g.wait_line("TP-ODIRECT start", Duration::from_secs(90));
    let t = Instant::now();
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let result = loop {
        g.drain();
        if let Some(l) = g.console.iter().find(|l| l.contains("TP-ODIRECT reads=")) {
            break l.clone();
        }
        assert!(t.elapsed() < Duration::from_secs(ODIRECT_S + 60), "no TP-ODIRECT result; stderr: {}", g.stderr_text());
        samples.push((saving(&g), g.pss_kb()));
        std::thread::sleep(Duration::from_millis(500));
    };
    let counters = std::fs::read_to_string(g.tree.join(format!("proc/{}/twinpage_counters", g.pid()))).unwrap_or_default();
    let series: Vec<String> = samples.iter().step_by(6).map(|(s, p)| format!("{s}/{p}")).collect();
    eprintln!("{tag} {}: PSS at TP-READY {pss_ready} kB; saving pages/PSS kB every 3 s: {}", backend.name(), series.join(" "));
    let n = samples.len().max(1) as f64;
    let out = Outcome {
        reads: field(&result, "reads"),
        lost: field(&result, "lost") + field(&result, "corrupt") + field(&result, "errors"),
        saving: samples.iter().map(|s| s.0 as f64).sum::<f64>() / n,
        pss_ready_kb: pss_ready as f64,
        pss_kb: samples.iter().map(|s| s.1 as f64).sum::<f64>() / n,
        counters,
        verdict: String::new(),
    };
    let verdict = g.finish();
    drop(kernel);
    let _ = std::fs::remove_file(&shm);
    Outcome { verdict, ..out }
}

fn counter(text: &str, name: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0)
}

fn prerequisites_with_kernel_ksm() -> Option<PathBuf> {
    let lib = prerequisites()?;
    require(kernel_ksm_writable(), "root and a writable /sys/kernel/mm/ksm (the oracle)").then_some(lib)
}

/// The disk image, in a directory removed on drop.
struct Disk(PathBuf);

impl Disk {
    fn new() -> Disk {
        // On the root file system rather than tmpfs: QEMU opens it O_DIRECT.
        let dir = std::env::temp_dir().join(format!("twinpage-odirect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = Disk(dir.join("disk.img"));
        write_disk(&disk.0);
        disk
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

/// Issue 14's table, at twinpage's defaults: every read lands on both
/// backends, no merge goes unchecked, and the saving is kernel KSM's within
/// 10%, in pages and in QEMU's PSS.
///
/// Both PSS drops are taken from one baseline, QEMU's PSS at TP-READY under
/// the kernel (the same guest, nothing merged yet): each side's own reading
/// there varies by some MB from run to run (where THP backs guest RAM), which
/// decided a comparison of drops from two baselines; and what a user pays is
/// QEMU's PSS while it runs, twinpage's own memory included.
#[test]
fn odirect_reads_into_merged_guest_ram_land_and_the_saving_matches_kernel_ksm() {
    let Some(lib) = prerequisites_with_kernel_ksm() else { return };
    let disk = Disk::new();
    let mut rows = Vec::new();
    for backend in [Backend::FileShareOff, Backend::Anon] {
        let k = run(&lib, &disk.0, Side::Kernel, backend, "");
        let t = run(&lib, &disk.0, Side::Twinpage, backend, "");
        let (k_drop, t_drop) = (k.pss_ready_kb - k.pss_kb, k.pss_ready_kb - t.pss_kb);
        eprintln!(
            "{:32} kernel: {} of {} reads lost, saving {:.0} pages, PSS {:.0} -> {:.0} kB | twinpage: {} of {} lost, saving {:.0} pages ({:.2}x), PSS {:.0} -> {:.0} kB, {:.0} kB below the kernel's TP-READY ({:.2}x the kernel's drop); unchecked={} pin_skipped={} uncheckable_skipped={} cow_in_place={}",
            backend.name(),
            k.lost,
            k.reads,
            k.saving,
            k.pss_ready_kb,
            k.pss_kb,
            t.lost,
            t.reads,
            t.saving,
            t.saving / k.saving.max(1.0),
            t.pss_ready_kb,
            t.pss_kb,
            t_drop,
            t_drop / k_drop.max(1.0),
            counter(&t.counters, "twinpage_merges_unchecked"),
            counter(&t.counters, "twinpage_merges_pinned_skipped"),
            counter(&t.counters, "twinpage_uncheckable_skipped"),
            counter(&t.counters, "twinpage_cow_in_place"),
        );
        rows.push((backend, k, t, k_drop, t_drop));
    }
    for (backend, k, t, k_drop, t_drop) in &rows {
        let name = backend.name();
        assert_eq!(k.verdict, "TP-VERDICT OK", "{name}: the guest under kernel KSM");
        assert!(k.reads > 0 && k.lost == 0, "{name}: kernel KSM lost {} of {} reads", k.lost, k.reads);
        assert_eq!(t.verdict, "TP-VERDICT OK", "{name}: the guest under twinpage");
        assert!(t.reads > 0 && t.lost == 0, "{name}: twinpage lost {} of {} reads", t.lost, t.reads);
        assert!(!t.counters.is_empty(), "{name}: no twinpage counters");
        assert_eq!(counter(&t.counters, "twinpage_merges_unchecked"), 0, "{name}: unchecked merges:\n{}", t.counters);
        assert!(t.saving >= k.saving * 0.9, "{name}: twinpage saved {:.0} pages, kernel KSM {:.0}", t.saving, k.saving);
        assert!(*t_drop >= k_drop * 0.9, "{name}: PSS dropped {t_drop:.0} kB under twinpage, {k_drop:.0} kB under kernel KSM");
    }
}

/// What the pin check prevents: the same guest with the check switched off
/// (`TWINPAGE_PIN_GUARD=0`) loses reads. Not run by default: it passes only
/// when a race is hit, which is likely rather than certain.
#[test]
#[ignore]
fn odirect_reads_are_lost_without_the_pin_check() {
    let Some(lib) = prerequisites() else { return };
    let disk = Disk::new();
    let t = run(&lib, &disk.0, Side::Twinpage, Backend::FileShareOff, "0");
    eprintln!("PIN_GUARD=0: {} of {} reads lost; {}", t.lost, t.reads, t.counters.replace('\n', " "));
    assert!(t.lost > 0, "no read lost in {} reads", t.reads);
}
