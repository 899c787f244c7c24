//! Debian's `prometheus-node-exporter`, with its ksmd collector pointed at
//! twinpage's tree (`--path.sysfs=$TWINPAGE_DIR`), reports twinpage's
//! values: scraped over loopback and compared with the tree.
//!
//! The exporter is installed by `scripts/test.sh`; without it (or without
//! userfaultfd) the test skips with a reason, or fails under `CI=true`.

mod common;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Mem;
use kernel_compat::testutil::require_or_skip;
use twinpage::statsfs::{SetOutcome, StatsTree, StatsTreeOptions, Tree};

const EXPORTER: &str = "prometheus-node-exporter";

struct TempRoot(PathBuf);

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The exporter process, killed when the test ends (also on failure).
struct Exporter(Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exporter_installed() -> bool {
    Command::new(EXPORTER).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// A loopback port nobody listens on now (not the package's 9100).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

/// GET /metrics over a plain TCP connection; the body, if the answer is 200.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then_some(())?;
    head.lines().next()?.contains(" 200 ").then(|| body.to_string())
}

/// `name value` samples of metrics without labels, plus `name{labels}`.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[test]
fn node_exporter_reports_twinpage() {
    if !require_or_skip(exporter_installed(), "prometheus-node-exporter (scripts/test.sh installs it)") {
        return;
    }
    let Some(engine) = common::engine().map(Arc::new) else { return };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let root = TempRoot(std::env::temp_dir().join(format!("twinpage-exporter-{}-{nanos}", std::process::id())));
    let handle = StatsTree::spawn(engine.clone(), root.0.clone(), StatsTreeOptions::default()).unwrap();
    let tree = Tree::at(&root.0);

    // 8 MiB, half duplicates: merged.
    common::flat_out(&engine);
    let m = Mem::anon(2048);
    for i in 0..2048 {
        m.fill(i, 4000 + (i % 1024) as u64);
    }
    engine.register(m.addr, m.len).unwrap();
    let (ok, s) = common::wait_for(&engine, Duration::from_secs(20), |s| s.pages_sharing >= 1024);
    assert!(ok, "{s:?}");
    // Values no kernel default has, then freeze the counters.
    for (n, v) in [("pages_to_scan", "1234"), ("sleep_millisecs", "37"), ("run", "0")] {
        let out = tree.set(n, v.as_bytes(), Duration::from_secs(2)).unwrap();
        assert!(matches!(out, SetOutcome::Applied { .. }), "{n}: {out:?}");
    }
    assert!(handle.publish_now());

    let port = free_port();
    let child = Command::new(EXPORTER)
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--collector.disable-defaults")
        .arg("--collector.ksmd")
        .arg(format!("--path.sysfs={}", root.0.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _exporter = Exporter(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        if let Some(b) = scrape(port) {
            break b;
        }
        assert!(Instant::now() < deadline, "the exporter does not answer on 127.0.0.1:{port}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let got = samples(&body);
    assert_eq!(got.get("node_scrape_collector_success{collector=\"ksmd\"}"), Some(&1.0), "{body}");
    let attr = |n: &str| tree.attribute(n).unwrap().parse::<f64>().unwrap();
    let mut compared = Vec::new();
    for (metric, file, scale) in [
        ("node_ksmd_pages_shared", "pages_shared", 1.0),
        ("node_ksmd_pages_sharing", "pages_sharing", 1.0),
        ("node_ksmd_pages_unshared", "pages_unshared", 1.0),
        ("node_ksmd_pages_volatile", "pages_volatile", 1.0),
        ("node_ksmd_full_scans_total", "full_scans", 1.0),
        ("node_ksmd_run", "run", 1.0),
        ("node_ksmd_pages_to_scan", "pages_to_scan", 1.0),
        ("node_ksmd_sleep_seconds", "sleep_millisecs", 0.001),
        ("node_ksmd_merge_across_nodes", "merge_across_nodes", 1.0),
    ] {
        if !tree.ksm().path(file).exists() {
            continue;
        }
        let want = attr(file) * scale;
        let have = *got.get(metric).unwrap_or_else(|| panic!("{metric} missing:\n{body}"));
        assert!((have - want).abs() < 1e-9, "{metric}: exporter {have}, tree {want}");
        compared.push(format!("{metric}={have}"));
    }
    assert!(attr("pages_sharing") >= 1024.0);
    assert_eq!(got["node_ksmd_pages_to_scan"], 1234.0);
    assert_eq!(got["node_ksmd_sleep_seconds"], 0.037);
    eprintln!("node exporter on 127.0.0.1:{port} reports twinpage: {}", compared.join(" "));

    drop(handle);
    m.unmap(&engine);
}

/// Per-VM figures: twinpaged's textfile (`--textfile-dir`), read by the real
/// exporter's textfile collector, has one series per process labelled by
/// pid and name, with the process's own ksm_merging_pages, and one per
/// sharing domain with what its store holds.
#[test]
fn node_exporter_reports_twinpaged_per_process_series() {
    if !require_or_skip(exporter_installed(), "prometheus-node-exporter (scripts/test.sh installs it)") {
        return;
    }
    let Some(s) = common::procs::setup("exporter-textfile") else { return };
    let textfiles = s.dir.join("textfiles");
    std::fs::create_dir_all(&textfiles).unwrap();
    let tf = textfiles.to_str().unwrap().to_string();
    let mut kids = common::procs::Kids(vec![common::procs::start_daemon(&s.daemon, &s.dir, &["--textfile-dir", &tf], "warn")]);
    for _ in 0..2 {
        kids.0.push(common::procs::spawn_ready(&mut s.twin([11, 512, 0, 0], 5)));
    }
    let pids = [kids.0[1].id(), kids.0[2].id()];
    let series = |pid: u32| {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        format!("twinpage_process_merging_pages{{name=\"{}\",pid=\"{pid}\"}}", comm.trim())
    };
    let port = free_port();
    let _exporter = Exporter(
        Command::new(EXPORTER)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!("--collector.textfile.directory={tf}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let b = scrape(port).unwrap_or_default();
        let m = samples(&b);
        if pids.iter().all(|&p| m.get(&series(p)) == Some(&512.0)) {
            break b;
        }
        assert!(Instant::now() < deadline, "no per-process series of 512 merged pages:\n{b}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let m = samples(&body);
    assert_eq!(m.get("node_textfile_scrape_error"), Some(&0.0), "the exporter could not parse the file");
    for p in pids {
        assert_eq!(m.get(&series(p).replace("merging_pages", "registered_pages")), Some(&512.0));
        // No writes: no first write, none copied in place.
        for n in ["cow_breaks_total", "cow_in_place_total"] {
            assert_eq!(m.get(&series(p).replace("merging_pages", n)), Some(&0.0), "{n}");
        }
    }
    // Per sharing domain: the two processes' 512 common pages are 512 store
    // pages of their uid's domain, each mapped twice.
    let domain = format!("domain=\"uid:{}\"", nix::unistd::geteuid().as_raw());
    let want = [("pages_shared", 512.0), ("pages_sharing", 512.0), ("agents", 2.0), ("store_bytes", 512.0 * 4096.0)];
    loop {
        let b = scrape(port).unwrap_or_default();
        let m = samples(&b);
        if want.iter().all(|(n, v)| m.get(&format!("twinpage_domain_{n}{{{domain}}}")) == Some(v)) {
            break;
        }
        assert!(Instant::now() < deadline, "no per-domain series {want:?} for {domain}:\n{b}");
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..2 {
        common::procs::finish_twin(kids.0.remove(1));
    }
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}
