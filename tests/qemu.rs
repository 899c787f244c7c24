//! The preload inside unmodified QEMU (TCG), on the test guest of
//! scripts/guest-image.sh: merging, the guest's own verdict after rewriting
//! merged data, the balloon, anonymous guest RAM, share=on refusal, and two
//! guests sharing pages through `twinpaged` (one guest, then the daemon, killed),
//! and QEMU's background snapshot of a merged guest.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::guest::{prerequisites, repo, Guest};
use common::require;

/// One test at a time: TCG guests share two cores with the scanners (the
/// twinpaged test runs its two guests together on purpose).
static SERIAL: Mutex<()> = Mutex::new(());

const GUEST_MIB: u64 = 128;
const DUP_PAGES: u64 = GUEST_MIB * 256 / 2;

fn tp_args(wait: u32) -> Vec<String> {
    vec![format!("tp.mib={GUEST_MIB}"), format!("tp.wait={wait}"), "tp.poweroff=1".into()]
}

fn file_backend(tag: &str, share: &str) -> Vec<String> {
    let path = format!("/dev/shm/twinpage-test-{tag}-{}", std::process::id());
    vec![
        "-object".into(),
        format!("memory-backend-file,id=mem,size=512M,mem-path={path},share={share}"),
        "-machine".into(),
        "memory-backend=mem".into(),
    ]
}

/// Boots, waits for the duplicate data to merge, checks PSS and the verdict.
fn merges_and_verifies(tag: &str, backend: Vec<String>) {
    let Some(lib) = prerequisites() else { return };
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let args = tp_args(20);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Named as libvirt names its guests: `twinpage stat` shows the name.
    let guest = format!("tp-{tag}");
    let mut backend = backend;
    backend.extend(["-name".to_string(), format!("guest={guest},debug-threads=on")]);
    let mut g = Guest::boot(tag, &lib, &args, &backend, true);
    g.wait_line("TP-READY", Duration::from_secs(60));
    // Merging starts only now (run=0 until here), so READY is the unmerged baseline.
    let pss_ready = g.pss_kb();
    let base = g.attr("pages_sharing");
    assert_eq!(base, 0);
    g.start_merging();
    let t = Instant::now();
    // The guest's duplicate pages merge (patterns past max_page_sharing cost a few dups).
    g.wait_for("the guest's duplicates to merge", Duration::from_secs(17), |g| g.attr("pages_sharing") >= DUP_PAGES * 95 / 100);
    let converge = t.elapsed();
    std::thread::sleep(Duration::from_millis(1000));
    let pss_merged = g.pss_kb();
    let sharing = g.attr("pages_sharing");
    let merging = g.merging_pages();
    let dropped = pss_ready.saturating_sub(pss_merged);
    let in_place = proc_counters(&g.tree, g.pid())["twinpage_cow_in_place"];
    eprintln!(
        "{tag}: merged in {:.2} s: pages_sharing={sharing} ksm_merging_pages={merging}; QEMU PSS {pss_ready} kB -> {pss_merged} kB (-{dropped} kB; guest duplicate data {} kB); copied in place {in_place}",
        converge.as_secs_f64(),
        DUP_PAGES * 4
    );
    assert!(merging >= DUP_PAGES);
    // Pages written in place (the fault thread could not step in) are rare;
    // a merge that copies every page as it maps it is not.
    assert!(in_place < DUP_PAGES / 100, "{in_place} merged pages were copied in place");
    assert!(dropped >= DUP_PAGES * 4 * 3 / 4, "QEMU's PSS dropped only {dropped} kB");
    let stat = Command::new(env!("CARGO_BIN_EXE_twinpage")).args(["stat", "--dir"]).arg(&g.tree).output().unwrap();
    let stat = String::from_utf8_lossy(&stat.stdout);
    let row = stat.lines().find(|l| l.split_whitespace().next() == Some(&g.pid().to_string())).unwrap_or_default();
    assert!(row.split_whitespace().nth(1) == Some(guest.as_str()), "twinpage stat does not name the guest {guest}:\n{stat}");
    let verdict = g.finish();
    assert_eq!(verdict, "TP-VERDICT OK");
}

#[test]
fn file_backed_share_off_guest_merges_and_verifies() {
    merges_and_verifies("file", file_backend("file", "off"));
}

/// A guest whose RAM QEMU locks (`-overcommit mem-lock=on`:
/// mlockall(MCL_CURRENT | MCL_FUTURE), libvirt's `<locked/>`) merges and
/// verifies as any other. Before, nothing merged: the kernel faulted in
/// each store stretch for writing as twinpage mapped it over the locked
/// RAM (every page copied in place at once), and twinpage's own 1 GiB
/// store segment was faulted in whole.
#[test]
fn locked_guest_ram_merges_and_verifies() {
    merges_and_verifies(
        "locked",
        vec![
            "-object".into(),
            "memory-backend-ram,id=mem,size=512M".into(),
            "-machine".into(),
            "memory-backend=mem".into(),
            "-overcommit".into(),
            "mem-lock=on".into(),
        ],
    );
}

#[test]
fn anonymous_guest_ram_merges_and_verifies() {
    merges_and_verifies(
        "ram",
        vec!["-object".into(), "memory-backend-ram,id=mem,size=512M".into(), "-machine".into(), "memory-backend=mem".into()],
    );
}

#[test]
fn share_on_is_refused_once_and_the_guest_runs() {
    let Some(lib) = prerequisites() else { return };
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let args = tp_args(3);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut g = Guest::boot("shared", &lib, &args, &file_backend("shared", "on"), true);
    g.wait_line("TP-READY", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    // Guest RAM is refused; QEMU's small anonymous RAM blocks (ROMs, video
    // RAM) may still merge, but never the guest's duplicate data.
    let merging = g.merging_pages();
    eprintln!("share=on: ksm_merging_pages={merging}");
    assert!(merging < DUP_PAGES / 4, "guest RAM merged despite share=on: {merging}");
    let err = g.stderr_text();
    assert_eq!(err.matches("refusing to merge a shared mapping").count(), 1, "stderr: {err}");
    assert_eq!(g.finish(), "TP-VERDICT OK");
}

#[test]
fn balloon_inflate_and_deflate_while_merged() {
    let Some(lib) = prerequisites() else { return };
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let args = tp_args(25);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut backend = file_backend("balloon", "off");
    backend.extend(["-device".to_string(), "virtio-balloon".to_string()]);
    let mut g = Guest::boot("balloon", &lib, &args, &backend, true);
    g.wait_line("TP-READY", Duration::from_secs(60));
    assert!(g.console.iter().any(|l| l.contains("TP-BALLOON present")), "balloon driver bound");
    g.start_merging();
    g.wait_for("merging", Duration::from_secs(15), |g| g.attr("pages_sharing") >= DUP_PAGES * 95 / 100);
    let before = g.attr("pages_sharing");
    // Inflate: the guest hands back 192 MiB of free memory; QEMU discards it.
    let r = g.qmp(&[r#"{"execute":"balloon","arguments":{"value":335544320}}"#]);
    assert!(r[1].contains("return"), "{r:?}");
    let actual = |g: &Guest| {
        let r = g.qmp(&[r#"{"execute":"query-balloon"}"#]);
        r[1].split("\"actual\":")
            .nth(1)
            .and_then(|s| s.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    g.wait_for("the balloon to inflate", Duration::from_secs(20), |g| actual(g) <= 340 << 20);
    let during = g.attr("pages_sharing");
    let r = g.qmp(&[r#"{"execute":"balloon","arguments":{"value":536870912}}"#]);
    assert!(r[1].contains("return"), "{r:?}");
    g.wait_for("the balloon to deflate", Duration::from_secs(20), |g| actual(g) >= 500 << 20);
    eprintln!("balloon: pages_sharing before {before}, inflated {during}, after {}", g.attr("pages_sharing"));
    assert_eq!(g.finish(), "TP-VERDICT OK");
}

// ---------------------------------------------------------------------------
// Two guests under twinpaged.
//
// Both guests run the workload with the same seed and size, so their unique
// pages are the same content in both and unique within each: only merging
// across the two processes can share them. Guest A has 4096 patterns (two
// copies each), B 16 (512 copies each): patterns 16..4095 live only in A,
// so their store pages are held by A alone and must be freed when A dies.

const SH_MIB: u64 = 64;
const SH_PAGES: u64 = SH_MIB * 256;
/// Pages of each buffer that are unique in their guest (tp.dup=50).
const SH_UNIQUE: u64 = SH_PAGES / 2;
const A_PATTERNS: u64 = 4096;
const B_PATTERNS: u64 = 16;
/// Store pages that only A's pattern pages map.
const A_ONLY_STORE_PAGES: u64 = A_PATTERNS - B_PATTERNS;

/// A process's counters by name; a missing one reads 0.
#[derive(Debug)]
struct Counts(HashMap<String, u64>);

impl std::ops::Index<&str> for Counts {
    type Output = u64;
    fn index(&self, name: &str) -> &u64 {
        self.0.get(name).unwrap_or(&0)
    }
}

/// `proc/<pid>/twinpage_counters` of a process of `tree` (empty while absent).
fn proc_counters(tree: &Path, pid: u32) -> Counts {
    let text = std::fs::read_to_string(tree.join(format!("proc/{pid}/twinpage_counters"))).unwrap_or_default();
    Counts(
        text.lines()
            .filter_map(|l| {
                let (n, v) = l.split_once(' ')?;
                Some((n.to_string(), v.trim().parse().ok()?))
            })
            .collect(),
    )
}

fn counter(tree: &Path, pid: u32, name: &str) -> u64 {
    proc_counters(tree, pid)[name]
}

/// Polls `cond` every 50 ms; on timeout fails with `state()`.
fn poll(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool, state: impl Fn() -> String) -> Duration {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}: {}", state());
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

/// A page of a store memfd: its inode and page index.
type StorePage = (u64, u64);

/// Pages of process `pid`'s memory that are merged pages, read from the
/// kernel rather than from twinpage: pages of private mappings of a
/// twinpage store memfd (`/proc/<pid>/maps`) that are not private copies
/// (`/proc/<pid>/pagemap`: not present, or present as the file's page), and
/// the distinct store pages they map. Reads of such a page reach the one
/// page-cache page of the store, so a store page mapped by two processes is
/// memory they share. (The agent's own read-only shared view of the store is
/// not guest memory and is left out.)
fn store_pages(pid: u32) -> (u64, HashSet<StorePage>) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let Ok(pagemap) = std::fs::File::open(format!("/proc/{pid}/pagemap")) else { return (0, HashSet::new()) };
    let (mut mapped, mut pages) = (0, HashSet::new());
    for line in maps.lines().filter(|l| l.ends_with("memfd:twinpage-store (deleted)")) {
        // start-end perms offset dev inode path
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some((start, end)) = f[0].split_once('-') else { continue };
        let (Ok(start), Ok(end), Ok(off), Ok(ino)) =
            (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16), u64::from_str_radix(f[2], 16), f[4].parse::<u64>())
        else {
            continue;
        };
        if !f[1].ends_with('p') {
            continue;
        }
        let mut buf = vec![0u8; ((end - start) / 4096 * 8) as usize];
        if pagemap.read_exact_at(&mut buf, start / 4096 * 8).is_err() {
            continue;
        }
        for (i, e) in buf.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(e.try_into().unwrap());
            let (present, file) = (v >> 63 & 1 == 1, v >> 61 & 1 == 1);
            if !present || file {
                mapped += 1;
                pages.insert((ino, off / 4096 + i as u64));
            }
        }
    }
    (mapped, pages)
}

/// `target/release/twinpaged --dir TREE`, killed (SIGKILL) and reaped on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(tree: &Path, log: PathBuf) -> Daemon {
        let sock = tree.join("twinpaged.sock");
        let _ = std::fs::remove_file(&sock); // a killed daemon's
        let child = Command::new(repo().join("target/release/twinpaged"))
            .arg("--dir")
            .arg(tree)
            .env_remove("TWINPAGE_SOCKET")
            .env("TWINPAGE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("twinpaged");
        let d = Daemon { child, log };
        poll("twinpaged to listen", Duration::from_secs(10), || sock.exists(), || d.log_text());
        d
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("twinpaged {} log:\n{}", self.child.id(), self.log_text());
        }
    }
}

/// A directory removed on drop (declared before the processes using it, so
/// it goes after them).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two TCG guests from one image, both QEMUs preloaded, one tree, twinpaged
/// running: (1) pages merge across the two (store pages mapped by both, more
/// sharing than the two could reach alone) and both guests verify their
/// data; (2) `kill -9` of guest A frees the store pages only A held and the
/// daemon's counts become B's; (3) `kill -9` of the daemon leaves B running
/// with its merged pages and verifying its data, and a restarted daemon takes
/// B back and merges B's new duplicates.
#[test]
fn two_guests_share_pages_through_twinpaged_and_survive_kills() {
    let Some(lib) = prerequisites() else { return };
    if !require(repo().join("target/release/twinpaged").exists(), "target/release/twinpaged built") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let scratch = Scratch(std::env::temp_dir().join(format!("twinpage-qemu-daemon-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    std::fs::create_dir_all(&scratch.0).unwrap();
    let tree = scratch.0.join("tree");
    let mut daemon = Daemon::start(&tree, scratch.0.join("twinpaged-1.log"));

    // A verifies once after tp.wait, rewrites 10% (tp.rewrite), verifies
    // again, prints its verdict and idles; B then keeps verifying every 3 s,
    // rewriting 5% of its pages before each round (new duplicates to merge).
    let size = format!("tp.mib={SH_MIB}");
    let a_args = [size.clone(), format!("tp.patterns={A_PATTERNS}"), "tp.wait=12".into()];
    let b_args = [
        size,
        format!("tp.patterns={B_PATTERNS}"),
        "tp.wait=12".into(),
        "tp.loop=1".into(),
        "tp.interval=3".into(),
        "tp.looprewrite=5".into(),
    ];
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let mem = ["-m".to_string(), "256M".to_string()];
    let mut a = Guest::boot_in("twin-a", &lib, &a_args, &mem, true, Some(&tree));
    let mut b = Guest::boot_in("twin-b", &lib, &b_args, &mem, true, Some(&tree));
    a.wait_line("TP-READY", Duration::from_secs(60));
    b.wait_line("TP-READY", Duration::from_secs(60));
    let (pa, pb) = (a.pid(), b.pid());
    let ready = started.elapsed();

    // Both agents are connected before merging starts, so every merge goes
    // through the daemon.
    let dpid = daemon.pid();
    poll(
        "both QEMUs to connect to twinpaged",
        Duration::from_secs(10),
        || {
            counter(&tree, pa, "twinpage_daemon_agents") == 1
                && counter(&tree, pb, "twinpage_daemon_agents") == 1
                && counter(&tree, dpid, "twinpage_daemon_agents") == 2
        },
        || format!("daemon {:?}; log {}", proc_counters(&tree, dpid), daemon.log_text()),
    );
    assert_eq!(a.attr("pages_sharing"), 0);
    a.start_merging(); // run=1 in the shared tree: every process of it
    let t_run = Instant::now();
    let merged = |pid| counter(&tree, pid, "twinpage_daemon_merged");
    poll(
        "each guest's buffer to merge through twinpaged",
        Duration::from_secs(30),
        || merged(pa) >= SH_PAGES * 95 / 100 && merged(pb) >= SH_PAGES * 95 / 100,
        || format!("daemon_merged A {} B {}; daemon {:?}", merged(pa), merged(pb), proc_counters(&tree, dpid)),
    );
    // Pages identical across the guests (their unique pages) are one store
    // page mapped by both QEMUs.
    let cross = |sa: &HashSet<StorePage>, sb: &HashSet<StorePage>| sa.intersection(sb).count() as u64;
    let mut seen_pages = (store_pages(pa), store_pages(pb));
    poll(
        "the guests' common pages to be shared across the two QEMUs",
        Duration::from_secs(20),
        || {
            seen_pages = (store_pages(pa), store_pages(pb));
            cross(&seen_pages.0 .1, &seen_pages.1 .1) >= SH_UNIQUE * 9 / 10
        },
        || format!("daemon {:?}", proc_counters(&tree, dpid)),
    );
    // Merging has settled when the daemon's pages_sharing stays put for 1 s.
    let mut last = (u64::MAX, Instant::now());
    poll(
        "merging to settle",
        Duration::from_secs(20),
        || {
            let v = counter(&tree, dpid, "pages_sharing");
            if v != last.0 {
                last = (v, Instant::now());
            }
            last.1.elapsed() >= Duration::from_secs(1)
        },
        || format!("daemon {:?}", proc_counters(&tree, dpid)),
    );
    let converged = t_run.elapsed() - Duration::from_secs(1);
    let ((na, sa), (nb, sb)) = (store_pages(pa), store_pages(pb));
    let both = cross(&sa, &sb);
    let d = proc_counters(&tree, dpid);
    let (ca, cb) = (proc_counters(&tree, pa), proc_counters(&tree, pb));
    let global = a.attr("pages_sharing");
    let local = ca["pages_sharing"] + cb["pages_sharing"];
    // What each QEMU would reach alone with the same merged pages: its pages
    // mapping a store page minus the distinct store pages it maps.
    let alone = (na - sa.len() as u64) + (nb - sb.len() as u64);
    let (ma, mb) = (a.merging_pages(), b.merging_pages());
    eprintln!(
        "twinpaged: settled {:.2} s after run=1 (guests ready {:.1} s after start): global pages_sharing={global} \
         (daemon pages_shared={} pages_sharing={} store {} KiB; QEMUs' own pages_sharing {local}); \
         daemon_merged A={} B={}; ksm_merging_pages A={ma} B={mb}; pagemap: A maps {na} store pages ({} distinct), \
         B {nb} ({}), {both} store pages mapped by both; alone the two would reach at most {alone}",
        converged.as_secs_f64(),
        ready.as_secs_f64(),
        d["pages_shared"],
        d["pages_sharing"],
        d["twinpage_store_bytes"] / 1024,
        ca["twinpage_daemon_merged"],
        cb["twinpage_daemon_merged"],
        sa.len(),
        sb.len(),
    );
    assert!(d["pages_sharing"] > 0);
    assert!(ca["twinpage_daemon_merged"] > 0 && cb["twinpage_daemon_merged"] > 0);
    assert!(ma > 0 && mb > 0, "ksm_merging_pages A={ma} B={mb}");
    assert!(global > local, "global pages_sharing {global} not above the QEMUs' own {local}");
    assert!(global >= alone + SH_UNIQUE / 2, "global pages_sharing {global}, alone {alone}");
    assert!(both >= SH_UNIQUE * 9 / 10);

    // Both guests verify their data (merged across processes), after a
    // rewrite of 10% of it.
    assert_eq!(a.wait_line("TP-VERDICT", Duration::from_secs(60)), "TP-VERDICT OK");
    assert_eq!(b.wait_line("TP-VERDICT", Duration::from_secs(60)), "TP-VERDICT OK");

    // kill -9 of guest A: the store pages only A held are freed, and the
    // daemon's counts are B's.
    let store_before = counter(&tree, dpid, "twinpage_store_bytes");
    a.child.kill().unwrap();
    let _ = a.child.wait();
    let t_kill = Instant::now();
    let store = || counter(&tree, dpid, "twinpage_store_bytes");
    let freed_in = poll(
        "the store pages only A held to be freed",
        Duration::from_secs(5),
        || store() + A_ONLY_STORE_PAGES * 4096 * 3 / 4 <= store_before,
        || format!("store {} -> {} bytes; daemon {:?}", store_before, store(), proc_counters(&tree, dpid)),
    );
    let seen = std::cell::Cell::new((0, 0, 0, 0));
    let agreed_in = t_kill.elapsed()
        + poll(
            "the daemon's counts to match B's",
            Duration::from_secs(10),
            || {
                let d = proc_counters(&tree, dpid);
                let cb = proc_counters(&tree, pb);
                let global = a.attr("pages_sharing");
                let s = (
                    d["pages_shared"] + d["pages_sharing"],
                    cb["twinpage_daemon_merged"],
                    global,
                    d["pages_sharing"] + cb["pages_sharing"],
                );
                seen.set(s);
                d["twinpage_daemon_agents"] == 1 && s.1 > 0 && s.0 == s.1 && s.2 == s.3
            },
            || {
                let s = seen.get();
                format!("daemon shared+sharing {} vs B daemon_merged {}; global pages_sharing {} vs daemon+B {}", s.0, s.1, s.2, s.3)
            },
        );
    let seen = seen.get();
    let store_after = store();
    eprintln!(
        "kill -9 A: daemon store {} KiB -> {} KiB (-{} KiB; A alone held >= {} KiB) within {:.2} s; \
         daemon pages_shared+pages_sharing = B's daemon_merged = {} after {:.2} s",
        store_before / 1024,
        store_after / 1024,
        (store_before - store_after) / 1024,
        A_ONLY_STORE_PAGES * 4,
        freed_in.as_secs_f64(),
        seen.0,
        agreed_in.as_secs_f64(),
    );

    // kill -9 of the daemon: B goes on alone with its merged pages and
    // verifies its data; a restarted daemon takes it back and merges again.
    b.drain();
    b.assert_no_failure();
    let (mapped_before, _) = store_pages(pb);
    daemon.kill();
    let t_dkill = Instant::now();
    poll(
        "B to notice the daemon is gone",
        Duration::from_secs(5),
        || counter(&tree, pb, "twinpage_daemon_agents") == 0,
        || format!("B {:?}", proc_counters(&tree, pb)),
    );
    let (mapped_after, _) = store_pages(pb);
    std::thread::sleep(Duration::from_millis(200)); // console lines in flight at the kill
    b.drain();
    let round = b.wait_verified_after(b.last_verified(), Duration::from_secs(20));
    eprintln!(
        "kill -9 twinpaged: B maps {mapped_before} -> {mapped_after} store pages; verified round {round} {:.1} s after the kill",
        t_dkill.elapsed().as_secs_f64()
    );
    assert!(mapped_after >= mapped_before * 3 / 4, "B lost its merged pages: {mapped_before} -> {mapped_after}");

    daemon = Daemon::start(&tree, scratch.0.join("twinpaged-2.log"));
    let t_restart = Instant::now();
    let dpid = daemon.pid();
    let reconnected = poll(
        "B to connect to the restarted daemon",
        Duration::from_secs(10),
        || counter(&tree, pb, "twinpage_daemon_agents") == 1 && counter(&tree, dpid, "twinpage_daemon_agents") == 1,
        || format!("B {:?}; daemon {:?}", proc_counters(&tree, pb), proc_counters(&tree, dpid)),
    );
    poll(
        "the restarted daemon to merge B's new duplicates",
        Duration::from_secs(20),
        || counter(&tree, dpid, "pages_sharing") > 0,
        || format!("B {:?}; daemon {:?}", proc_counters(&tree, pb), proc_counters(&tree, dpid)),
    );
    let resumed = t_restart.elapsed();
    b.drain();
    let round = b.wait_verified_after(b.last_verified(), Duration::from_secs(20));
    let d = proc_counters(&tree, dpid);
    let cb = proc_counters(&tree, pb);
    eprintln!(
        "restarted twinpaged: B reconnected after {:.2} s, daemon pages_sharing={} (pages_shared={}, store {} KiB) \
         after {:.2} s; B daemon_merged={} (with pages merged by the old daemon); B verified round {round}; test took {:.1} s",
        reconnected.as_secs_f64(),
        d["pages_sharing"],
        d["pages_shared"],
        d["twinpage_store_bytes"] / 1024,
        resumed.as_secs_f64(),
        cb["twinpage_daemon_merged"],
        started.elapsed().as_secs_f64(),
    );
    assert!(d["pages_sharing"] > 0);
    assert!(d["pages_shared"] + d["pages_sharing"] <= cb["twinpage_daemon_merged"]);
    eprintln!("QEMU B stderr:\n{}", b.stderr_text());
}

/// The status and the whole answer of `query-migrate`.
fn migrate_status(g: &Guest) -> (String, String) {
    let r = g.qmp(&[r#"{"execute":"query-migrate"}"#]);
    let s = r[1].split("\"status\":").nth(1).and_then(|s| s.split('"').nth(1)).unwrap_or("").to_string();
    (s, r[1].clone())
}

/// QEMU's background snapshot (`background-snapshot` capability, then
/// `migrate exec:...`) of a guest whose RAM twinpage has merged: QEMU
/// registers guest RAM with its own userfaultfd in write-protect mode, which
/// the preload lets it do by unmerging the range and leaving it (a range
/// belongs to one userfaultfd only); the snapshot completes, the file holds
/// guest RAM, the guest verifies its data, and merging resumes once QEMU
/// unregisters. Anonymous guest RAM (QEMU's default -m, mem-merge on).
#[test]
fn background_snapshot_of_a_merged_guest_completes() {
    let Some(lib) = prerequisites() else { return };
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The guest verifies, rewrites 10% and verifies again 30 s after READY:
    // during the snapshot (10-20 s of TCG here) or after it.
    let args = ["tp.mib=64", "tp.wait=30", "tp.poweroff=1"];
    let mem = ["-m".to_string(), "256M".to_string()];
    let dup = 64 * 256 / 2;
    let mut g = Guest::boot("snapshot", &lib, &args, &mem, true);
    g.wait_line("TP-READY", Duration::from_secs(60));
    g.start_merging();
    g.wait_for("the guest's duplicates to merge", Duration::from_secs(20), |g| g.attr("pages_sharing") >= dup * 95 / 100);
    let merged = g.attr("pages_sharing");
    let merging = g.merging_pages();
    assert!(merging >= dup, "ksm_merging_pages {merging}");

    let file = g.dir.join("snapshot");
    let r = g.qmp(&[
        r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"background-snapshot","state":true}]}}"#,
    ]);
    assert!(r[1].contains("return"), "background-snapshot refused: {r:?}; stderr: {}", g.stderr_text());
    let t = Instant::now();
    // A unix socket, not `exec:cat > file`: exec forks QEMU, and a fork
    // leaves every anonymous page not written since "maybe shared", which
    // UFFDIO_MOVE refuses (EBUSY) like a pinned page, so the pin check
    // keeps those pages from merging again (see docs/pinned-pages.md).
    let sock = g.dir.join("snapshot.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let sink = {
        let file = file.clone();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            std::io::copy(&mut conn, &mut std::fs::File::create(&file).unwrap()).unwrap();
        })
    };
    let uri = format!(r#"{{"execute":"migrate","arguments":{{"uri":"unix:{}"}}}}"#, sock.display());
    let r = g.qmp(&[&uri]);
    assert!(r[1].contains("return"), "migrate refused: {r:?}; stderr: {}", g.stderr_text());
    let mut last = (String::new(), String::new());
    while t.elapsed() < Duration::from_secs(75) {
        last = migrate_status(&g);
        if !matches!(last.0.as_str(), "setup" | "active" | "device" | "pre-switchover") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = t.elapsed();
    if last.0 == "completed" {
        sink.join().unwrap();
    }
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    assert_eq!(last.0, "completed", "snapshot did not complete: {}; stderr: {}", last.1, g.stderr_text());
    // The guest's RAM is in the file (at least its 64 MiB buffer), in
    // QEMU's savevm format ("QEVM").
    assert!(size >= 64 << 20, "snapshot file has {size} bytes");
    let mut magic = [0u8; 4];
    std::fs::File::open(&file).and_then(|mut f| f.read_exact(&mut magic)).unwrap();
    assert_eq!(&magic, b"QEVM");
    g.drain();
    g.assert_no_failure();
    let during = g.attr("pages_sharing");

    // QEMU unregistered guest RAM at the end: twinpage merges it again.
    g.wait_for("merging to resume after the snapshot", Duration::from_secs(30), |g| g.attr("pages_sharing") >= dup * 95 / 100);
    let resumed = t.elapsed() - took;
    let err = g.stderr_text();
    eprintln!(
        "background snapshot: pages_sharing {merged} (ksm_merging_pages {merging}) before; completed in {:.1} s, \
         file {} MiB; pages_sharing {during} right after; back to {} within {:.1} s; {}",
        took.as_secs_f64(),
        size >> 20,
        g.attr("pages_sharing"),
        resumed.as_secs_f64(),
        last.1.trim()
    );
    assert!(err.contains("with its own userfaultfd"), "no hand-over logged: {err}");
    assert_eq!(g.finish(), "TP-VERDICT OK");
}
