//! Conformance of kernel-compat against the running kernel's
//! `/sys/kernel/mm/ksm` and `/proc/self/ksm_stat`.
//!
//! Tests that write need root and a writable `/sys/kernel/mm/ksm`; without
//! them they print why and return, except under `CI=true`, where they fail.
//! Every writing test holds [`sysfs_lock`] and a [`SavedKsm`] guard, so the
//! kernel's settings are put back even if an assertion fails.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kernel_compat::testutil::{kernel_ksm_writable, require_or_skip, sysfs_lock};
use kernel_compat::write::SYSFS_WRITE_MAX;
use kernel_compat::{attrs, procfs, AdvisorMode, KsmSysfs, SavedKsm, Tunables, Value, WriteContext, WriteError};

/// Inputs tried on every writable attribute.
const CASES: &[&str] = &[
    "",
    "abc",
    "-1",
    "-0",
    "0",
    "1",
    "2",
    "3",
    "5",
    "+5",
    " 5",
    "5 ",
    "5\n",
    "5\n\n",
    "\n",
    "+",
    "+-5",
    "0x10",
    "010",
    "99999999999999999999",
    "99999999999999999999x",
    "4294967295",
    "4294967296",
    "4294967297",
    "2147483647",
    "2147483648",
    "-2147483648",
    "18446744073709551615",
    "18446744073709551616",
    "256",
    "300",
    "y",
    "Y",
    "yes",
    "n",
    "no",
    "on",
    "off",
    "of",
    "o",
    "t",
    "true",
    "false",
    "e",
    "d",
    "x",
    "none",
    "none\n",
    " none",
    "None",
    "scan-time",
    "scan-time\n",
    "scan-time\n\n",
    "scan_time",
    "[none] scan-time",
    "5\0junk",
    "none\0junk",
];

fn ksm() -> KsmSysfs {
    KsmSysfs::kernel()
}

/// `write_all` as the driver does it: one `write(2)` per chunk of at most
/// [`SYSFS_WRITE_MAX`] bytes, applying each accepted chunk.
fn model_write_all(name: &str, bytes: &[u8], tun: &mut Tunables, pages_shared: u64) -> Result<(), WriteError> {
    for chunk in bytes.chunks(SYSFS_WRITE_MAX) {
        if let Some(v) = kernel_compat::model_write(name, chunk, &tun.context(pages_shared))? {
            tun.apply(v);
        }
    }
    if bytes.is_empty() {
        kernel_compat::model_write(name, bytes, &tun.context(pages_shared))?;
    }
    Ok(())
}

/// Writes `bytes` to the kernel and compares outcome and resulting settings
/// with the model. Returns a description of any difference.
fn check_one(k: &KsmSysfs, name: &str, bytes: &[u8]) -> Option<String> {
    let ctx: WriteContext = k.write_context().expect("read context");
    let before = k.tunables().expect("read tunables");
    let mut predicted_state = before;
    let predicted = model_write_all(name, bytes, &mut predicted_state, ctx.pages_shared);

    // Never unmerge pages somebody else has merged.
    if name == "run" && predicted_state.run == 2 && ctx.pages_shared > 0 {
        eprintln!("not writing run=2: {} pages are shared", ctx.pages_shared);
        return None;
    }
    let actual = k.write(name, bytes).map_err(|e| e.kind());
    let shown = String::from_utf8_lossy(bytes);
    let outcome_ok = match (&predicted, &actual) {
        (Ok(()), Ok(())) => true,
        (Err(p), Err(Some(a))) => p == a,
        _ => false,
    };
    if !outcome_ok {
        return Some(format!("{name} <- {shown:?}: model {predicted:?}, kernel {actual:?}"));
    }
    let after = k.tunables().expect("read tunables");
    let mut expected = predicted_state;
    if after.run != 0 && after.advisor_mode == AdvisorMode::ScanTime {
        // ksmd's advisor may be retuning pages_to_scan right now.
        expected.pages_to_scan = after.pages_to_scan;
    }
    if after != expected {
        return Some(format!("{name} <- {shown:?}: model state {expected:?}, kernel state {after:?}"));
    }
    None
}

#[test]
fn attrs_match_real_directory() {
    let k = ksm();
    if !require_or_skip(k.exists(), "/sys/kernel/mm/ksm (CONFIG_KSM)") {
        return;
    }
    let real = k.names().unwrap();
    let numa = real.contains("merge_across_nodes");
    let ours: BTreeSet<String> = attrs::ATTRS.iter().filter(|a| numa || !a.numa_only).map(|a| a.name.to_string()).collect();
    assert_eq!(real, ours, "ATTRS differs from the directory listing");
    if !numa {
        eprintln!("note: kernel without CONFIG_NUMA: no merge_across_nodes");
    }
    for a in attrs::ATTRS.iter().filter(|a| real.contains(a.name)) {
        let mode = std::fs::metadata(k.path(a.name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, a.mode(), "mode of {}", a.name);
        let raw = k.read_raw(a.name).unwrap();
        assert!(raw.ends_with('\n') && raw.matches('\n').count() == 1, "{}: {raw:?}", a.name);
        assert!(a.matches_format(&raw), "{}: {raw:?} is not in format {:?}", a.name, a.format);
    }
    // The settings read back as Tunables, and their show() is byte-exact.
    let t = k.tunables().unwrap();
    for a in attrs::writable().filter(|a| real.contains(a.name)) {
        assert_eq!(t.show(a.name).unwrap(), k.read(a.name).unwrap(), "{}", a.name);
    }
}

#[test]
fn proc_self_ksm_stat_round_trips() {
    let path = procfs::ksm_stat_path(std::path::Path::new("/proc"), std::process::id());
    if !require_or_skip(path.exists(), "/proc/<pid>/ksm_stat (CONFIG_KSM, Linux >= 6.1)") {
        return;
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let stat = procfs::parse(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert_eq!(stat.render(), text, "render is not byte-exact");
    let merging = std::fs::read_to_string(path.with_file_name("ksm_merging_pages")).unwrap();
    assert_eq!(procfs::render_merging_pages(stat.ksm_merging_pages), merging);
    assert_eq!(stat.ksm_process_profit, procfs::process_profit(stat.ksm_merging_pages, stat.ksm_zero_pages, stat.ksm_rmap_items));
    // A kernel thread has no mm: both files are empty.
    if let Ok(kthread) = std::fs::read_to_string("/proc/2/ksm_stat") {
        assert_eq!(procfs::parse(&kthread), Err(procfs::ParseStatError::Empty));
    }
}

#[test]
fn writes_match_kernel() {
    if !require_or_skip(kernel_ksm_writable(), "root and a writable /sys/kernel/mm/ksm") {
        return;
    }
    let _lock = sysfs_lock();
    let saved = SavedKsm::new(ksm()).expect("snapshot");
    let names = saved.names().unwrap();
    let mut mismatches = Vec::new();
    let mut checked = 0usize;

    let mut targets: Vec<&str> = attrs::ATTRS.iter().map(|a| a.name).filter(|n| names.contains(*n)).collect();
    targets.push("no_such_attribute");
    for &name in &targets {
        for case in CASES {
            saved.restore().expect("restore between cases");
            mismatches.extend(check_one(&saved, name, case.as_bytes()));
            checked += 1;
        }
    }

    // Longer than one sysfs write: kernfs hands the store 4096 bytes at a time.
    let mut long = vec![b'0'; SYSFS_WRITE_MAX];
    long.push(b'7');
    for bytes in [&long[1..], &long[..]] {
        saved.restore().unwrap();
        mismatches.extend(check_one(&saved, "stable_node_chains_prune_millisecs", bytes));
        checked += 1;
    }

    // Under the scan-time advisor pages_to_scan refuses everything.
    for case in CASES {
        saved.restore().unwrap();
        saved.write("advisor_min_pages_to_scan", "777").unwrap();
        saved.write("advisor_mode", "scan-time").unwrap();
        for name in ["pages_to_scan", "advisor_mode"] {
            mismatches.extend(check_one(&saved, name, case.as_bytes()));
            checked += 1;
        }
    }

    saved.finish().expect("restore");
    eprintln!("{checked} writes compared with the kernel");
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
}

#[test]
fn saved_ksm_restores_everything() {
    if !require_or_skip(kernel_ksm_writable(), "root and a writable /sys/kernel/mm/ksm") {
        return;
    }
    let _lock = sysfs_lock();
    let k = ksm();
    let before = k.snapshot().unwrap();
    {
        let saved = k.save().unwrap();
        let ctx = saved.write_context().unwrap();
        let mut changes = vec![
            Value::AdvisorMaxCpu(33),
            Value::AdvisorMinPagesToScan(123),
            Value::AdvisorMaxPagesToScan(4567),
            Value::AdvisorTargetScanTime(9),
            Value::PagesToScan(55),
            Value::SleepMillisecs(7),
            Value::UseZeroPages(true),
            Value::SmartScan(false),
            Value::StableNodeChainsPruneMillisecs(1234),
            Value::AdvisorMode(AdvisorMode::ScanTime),
        ];
        if ctx.pages_shared == 0 {
            changes.push(Value::MaxPageSharing(ctx.max_page_sharing + 1));
            if ctx.numa {
                changes.push(Value::MergeAcrossNodes(1 - ctx.merge_across_nodes));
            }
        }
        for v in &changes {
            saved.write_value(v).unwrap_or_else(|e| panic!("{v:?}: {e}"));
        }
        // Switching to scan-time started pages_to_scan at the advisor minimum.
        assert_eq!(saved.read_u64("pages_to_scan").unwrap(), 123);
        assert_ne!(saved.snapshot().clone(), saved.sysfs().snapshot().unwrap());
    }
    assert_eq!(k.snapshot().unwrap(), before, "SavedKsm did not restore");
}

/// A helper process with 256 identical pages marked `MADV_MERGEABLE`
/// (Python's `mmap.madvise`; this crate has no `unsafe` to do it itself).
const MERGEABLE_HELPER: &str = r#"
import mmap, sys
m = mmap.mmap(-1, 256 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(256):
    m[i * 4096:(i + 1) * 4096] = b"\x07" * 4096
m.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
sys.stdin.read()
"#;

struct Helper(std::process::Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// EBUSY rules of max_page_sharing and merge_across_nodes, with pages
/// really shared by ksmd.
#[test]
fn busy_rules_with_shared_pages() {
    if !require_or_skip(kernel_ksm_writable(), "root and a writable /sys/kernel/mm/ksm") {
        return;
    }
    let python = Command::new("python3").arg("-c").arg("import mmap; mmap.MADV_MERGEABLE").status();
    if !matches!(python, Ok(s) if s.success()) {
        eprintln!("skipping: needs python3 with mmap.madvise to create mergeable memory");
        return;
    }
    let _lock = sysfs_lock();
    let saved = SavedKsm::new(ksm()).expect("snapshot");
    if saved.read_u64("pages_shared").unwrap() != 0 || saved.read("run").unwrap() != "0" {
        eprintln!("skipping: kernel KSM is in use (run != 0 or pages shared)");
        return;
    }
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(MERGEABLE_HELPER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let helper = Helper(child);

    saved.write("pages_to_scan", "5000").unwrap();
    saved.write("sleep_millisecs", "0").unwrap();
    saved.write("run", "1").unwrap();
    let merged = wait_until(Duration::from_secs(10), || saved.read_u64("pages_sharing").unwrap_or(0) > 0);
    assert!(merged, "ksmd did not merge the helper's pages");
    saved.write("run", "0").unwrap();

    // The helper's ksm_stat shows its merged pages.
    let stat_text = std::fs::read_to_string(format!("/proc/{}/ksm_stat", helper.0.id())).unwrap();
    let stat = procfs::parse(&stat_text).unwrap();
    assert_eq!(stat.render(), stat_text);
    assert!(stat.ksm_mergeable && !stat.ksm_merge_any && stat.ksm_merging_pages > 0, "{stat:?}");
    // Per-process profit: 4 KiB per merged page, 64 bytes per rmap item.
    assert_eq!(stat.ksm_process_profit, procfs::process_profit(stat.ksm_merging_pages, stat.ksm_zero_pages, stat.ksm_rmap_items));
    let profit = saved.read_i64("general_profit").unwrap();
    assert!(profit > 0, "general_profit {profit}");

    let mut mismatches = Vec::new();
    for name in ["max_page_sharing", "merge_across_nodes"] {
        if !saved.names().unwrap().contains(name) {
            continue;
        }
        for case in ["256", "300", "0", "1", "2", "abc", "99999999999999999999", "-1"] {
            let ctx = saved.write_context().unwrap();
            assert!(ctx.pages_shared > 0);
            mismatches.extend(check_one(&saved, name, case.as_bytes()));
        }
    }
    let busy = kernel_compat::parse_write("max_page_sharing", "300", &saved.write_context().unwrap());
    assert_eq!(busy, Err(WriteError::Busy));

    // Let the helper go and ksmd drop its stable nodes again.
    drop(helper);
    saved.write("run", "1").unwrap();
    let drained = wait_until(Duration::from_secs(10), || saved.read_u64("pages_shared").unwrap_or(1) == 0);
    if !drained {
        // Only our helper's pages were merged (pages_shared was 0 before).
        saved.write("run", "2").unwrap();
    }
    saved.finish().expect("restore");
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
}
