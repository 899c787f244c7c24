//! The `twinpage` command (the built binary) and `scripts/ksm-monitor.sh`
//! against a live tree: `set` exit statuses and messages, `stat` (text and
//! JSON), `top --once`, the monitor script on the tree and on `/sys`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::Mem;
use kernel_compat::testutil::require_or_skip;
use twinpage::statsfs::{StatsTree, StatsTreeHandle, StatsTreeOptions, Tree};
use twinpage::Engine;

struct TempRoot(PathBuf);

impl TempRoot {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let p = std::env::temp_dir().join(format!("twinpage-cli-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempRoot(p)
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn twinpage(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_twinpage")).args(args).arg("--dir").arg(dir).env_remove("TWINPAGE_DIR").output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An engine publishing into a fresh tree, with 2 MiB of memory half of
/// which duplicates the other half, merged.
struct Setup {
    mem: Option<Mem>,
    handle: Option<StatsTreeHandle>,
    engine: Arc<Engine>,
    root: TempRoot,
}

impl Setup {
    fn new(tag: &str, merged: bool) -> Option<Setup> {
        let engine = Arc::new(common::engine()?);
        let root = TempRoot::new(tag);
        let handle = StatsTree::spawn(engine.clone(), root.0.clone(), StatsTreeOptions::default()).unwrap();
        let mem = merged.then(|| {
            common::flat_out(&engine);
            let m = Mem::anon(512);
            for i in 0..512 {
                m.fill(i, 77 + (i % 256) as u64);
            }
            engine.register(m.addr, m.len).unwrap();
            let (ok, s) = common::wait_for(&engine, Duration::from_secs(20), |s| s.pages_sharing >= 256);
            assert!(ok, "{s:?}");
            assert!(handle.publish_now());
            m
        });
        Some(Setup { mem, handle: Some(handle), engine, root })
    }

    fn dir(&self) -> &Path {
        &self.root.0
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.handle.take();
        if let Some(m) = self.mem.take() {
            m.unmap(&self.engine);
        }
    }
}

#[test]
fn set_exit_statuses_and_messages() {
    let Some(s) = Setup::new("set", false) else { return };
    let t = Tree::at(s.dir());
    for (attr, value, code, errno) in [
        ("pages_to_scan", "abc", 22, "EINVAL"),
        ("pages_to_scan", "-1", 22, "EINVAL"),
        ("pages_to_scan", "0x10", 22, "EINVAL"),
        ("run", "3", 22, "EINVAL"),
        ("use_zero_pages", "maybe", 22, "EINVAL"),
        ("advisor_mode", "[none] scan-time", 22, "EINVAL"),
        ("advisor_target_scan_time", "0", 22, "EINVAL"),
        ("max_page_sharing", "1", 22, "EINVAL"),
        ("max_page_sharing", "99999999999999999999", 34, "ERANGE"),
        ("pages_shared", "5", 13, "EACCES"),
        ("no_such_attribute", "1", 2, "ENOENT"),
        ("twinpage_merge_mode", "zero", 22, "EINVAL"),
        ("twinpage_merge_mode", " off", 22, "EINVAL"),
    ] {
        let before = t.attribute("pages_to_scan").unwrap();
        let out = twinpage(&["set", attr, value], s.dir());
        assert_eq!(out.status.code(), Some(code), "set {attr} {value:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stderr), format!("twinpage: {attr}: {errno}\n"));
        assert_eq!(t.attribute("pages_to_scan").unwrap(), before);
    }
    assert_eq!(s.engine.tunables().pages_to_scan(), 100);

    let out = twinpage(&["set", "pages_to_scan", "4321"], s.dir());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "pages_to_scan: 100 -> 4321\n");
    assert_eq!(s.engine.tunables().pages_to_scan(), 4321, "applied when set returns");
    let out = twinpage(&["set", "sleep_millisecs", "+7\n"], s.dir());
    assert_eq!(text(&out.stdout), "sleep_millisecs: 20 -> 7\n");
    assert_eq!(t.attribute("sleep_millisecs").unwrap(), "7");
    // The advisor: pages_to_scan becomes advisor_min_pages_to_scan and refuses writes.
    assert!(twinpage(&["set", "advisor_mode", "scan-time"], s.dir()).status.success());
    assert_eq!(t.attribute("advisor_mode").unwrap(), "none [scan-time]");
    assert_eq!(s.engine.tunables().pages_to_scan(), 500);
    assert_eq!(twinpage(&["set", "pages_to_scan", "5"], s.dir()).status.code(), Some(22));
    assert!(twinpage(&["set", "advisor_mode", "none"], s.dir()).status.success());
    assert_eq!(t.attribute("pages_to_scan").unwrap(), "100");
    let out = twinpage(&["set", "twinpage_merge_mode", "zero-only\n"], s.dir());
    assert_eq!(text(&out.stdout), "twinpage_merge_mode: [all] zero-only off -> all [zero-only] off\n");
    assert_eq!(s.engine.tunables().merge_mode(), twinpage::MergeMode::ZeroOnly);
    assert!(twinpage(&["set", "twinpage_merge_mode", "all"], s.dir()).status.success());
    // Malformed command lines: usage, status 2, nothing written.
    for args in
        [&["set"][..], &["set", "run"], &["set", "run", "1", "2"], &["stat", "--bogus"], &["frobnicate"], &["top", "--interval", "x"]]
    {
        let out = twinpage(args, s.dir());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(!out.stderr.is_empty());
    }
    assert_eq!(s.engine.tunables().run(), 1);
    // An empty value is a no-op, as `echo -n "" > run`.
    assert!(twinpage(&["set", "run", ""], s.dir()).status.success());

    // No tree.
    let out = twinpage(&["set", "run", "1"], &s.dir().join("nowhere"));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no twinpage statistics tree"), "{}", text(&out.stderr));
}

#[test]
fn set_refuses_max_page_sharing_while_shared() {
    let Some(s) = Setup::new("busy", true) else { return };
    let out = twinpage(&["set", "max_page_sharing", "300"], s.dir());
    assert_eq!(out.status.code(), Some(16));
    assert_eq!(text(&out.stderr), "twinpage: max_page_sharing: EBUSY\n");
    let out = twinpage(&["set", "max_page_sharing", "256"], s.dir());
    assert_eq!(out.status.code(), Some(0), "the same value is accepted: {}", text(&out.stderr));
    assert_eq!(s.engine.tunables().max_page_sharing(), 256);
}

#[test]
fn set_without_a_running_publisher() {
    let Some(mut s) = Setup::new("nopub", false) else { return };
    s.handle.take();
    let out = twinpage(&["set", "sleep_millisecs", "30"], s.dir());
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("applies when one starts"), "{}", text(&out.stdout));
    s.handle = Some(StatsTree::spawn(s.engine.clone(), s.dir().to_path_buf(), StatsTreeOptions::default()).unwrap());
    assert_eq!(s.engine.tunables().sleep_millisecs(), 30);
}

#[test]
fn stat_text_and_json() {
    let Some(s) = Setup::new("stat", true) else { return };
    let t = Tree::at(s.dir());
    // Freeze the counters.
    assert!(twinpage(&["set", "run", "0"], s.dir()).status.success());
    // A batch under way when run became 0 still finishes and is published.
    let mut last = String::new();
    assert!(common::wait_until(Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(250));
        let now = t.attribute("full_scans").unwrap();
        std::mem::replace(&mut last, now.clone()) == now
    }));
    let out = twinpage(&["stat"], s.dir());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    for (a, v) in t.attributes().unwrap() {
        assert!(o.lines().any(|l| l.split_whitespace().next() == Some(a.name) && l.ends_with(&v)), "{} {v}:\n{o}", a.name);
    }
    let sharing: u64 = t.attribute("pages_sharing").unwrap().parse().unwrap();
    assert!(sharing >= 256);
    assert!(o.contains(&format!("memory saved: {:.1} MiB", (sharing * 4096) as f64 / 1048576.0)), "{o}");
    let me = std::process::id().to_string();
    let row = o.lines().find(|l| l.split_whitespace().next() == Some(me.as_str())).unwrap_or_else(|| panic!("{o}"));
    let st = t.processes().unwrap()[0].stat.unwrap();
    assert!(row.contains(&st.ksm_merging_pages.to_string()) && row.contains(&st.ksm_process_profit.to_string()), "{row}");
    println!("{o}");

    let out = twinpage(&["stat", "--json"], s.dir());
    assert!(out.status.success());
    let json = text(&out.stdout);
    assert!(json.contains(&format!("\"pages_sharing\":{sharing}")), "{json}");
    assert!(json.contains("\"advisor_mode\":\"[none] scan-time\""), "{json}");
    assert!(json.contains(&format!("\"pid\":{me}")), "{json}");
    assert!(json.contains(&format!("\"saved_bytes\":{}", sharing * 4096)), "{json}");
    // A real JSON parser agrees, where there is one.
    if let Ok(mut py) = Command::new("python3")
        .args(["-c", "import json,sys; d=json.load(sys.stdin); print(d['attributes']['pages_sharing'], len(d['processes']))"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write as _;
        py.stdin.take().unwrap().write_all(json.as_bytes()).unwrap();
        let r = py.wait_with_output().unwrap();
        assert!(r.status.success(), "python3 could not parse: {json}");
        assert_eq!(text(&r.stdout).trim(), format!("{sharing} 1"));
    }
    let out = twinpage(&["stat"], &s.dir().join("nowhere"));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn top_once() {
    let Some(s) = Setup::new("top", true) else { return };
    let out = twinpage(&["top", "--once"], s.dir());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    for want in ["pages_sharing", "pages_shared", "full_scans", "saved over time [", "PROFIT_BYTES", &std::process::id().to_string()] {
        assert!(o.contains(want), "{want}:\n{o}");
    }
    assert!(!o.contains('\x1b'), "--once does not clear the screen");
    println!("{o}");
}

fn monitor(root: &Path) -> Output {
    Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ksm-monitor.sh")).arg(root).args(["0.1", "3"]).output().unwrap()
}

#[test]
fn ksm_monitor_script_on_the_tree_and_on_sys() {
    let Some(s) = Setup::new("monitor", true) else { return };
    assert!(twinpage(&["set", "run", "0"], s.dir()).status.success());
    let t = Tree::at(s.dir());
    let out = monitor(s.dir());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    let lines: Vec<&str> = o.lines().collect();
    assert_eq!(lines.len(), 4, "{o}");
    assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["time", "pages_shared", "pages_sharing", "pages_unshared", "saved_MiB"]);
    let f: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(f[1], t.attribute("pages_shared").unwrap());
    assert_eq!(f[2], t.attribute("pages_sharing").unwrap());
    assert_eq!(f[3], t.attribute("pages_unshared").unwrap());
    let sharing: f64 = f[2].parse().unwrap();
    assert_eq!(f[4], format!("{:.1}", sharing * 4096.0 / 1048576.0));
    println!("{o}");
    if require_or_skip(Path::new("/sys/kernel/mm/ksm/pages_sharing").exists(), "/sys/kernel/mm/ksm") {
        let out = monitor(Path::new("/sys"));
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).lines().count(), 4);
        println!("{}", text(&out.stdout));
    }
    let out = monitor(&s.dir().join("nowhere"));
    assert!(!out.status.success());
}

#[test]
fn demo_still_runs() {
    if common::engine().is_none() {
        return;
    }
    let root = TempRoot::new("demo");
    let out =
        Command::new(env!("CARGO_BIN_EXE_twinpage")).args(["demo", "--mib", "16", "--publish", "--dir"]).arg(&root.0).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(o.contains("memory saved:") && o.contains("publishing statistics under"), "{o}");
    // The demo left: no process directory, cumulative counters kept.
    let t = Tree::at(&root.0);
    assert!(t.processes().unwrap().is_empty());
    assert!(t.attribute("pages_scanned").unwrap().parse::<u64>().unwrap() > 0);
    assert_eq!(t.attribute("pages_sharing").unwrap(), "0");
}
