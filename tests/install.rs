//! scripts/install.sh: into a staging directory and out again, leaving what
//! was there; and the installed daemon, started as its unit file says, with
//! two programs and a QEMU guest preloaded with the installed library
//! merging through it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::guest;
use common::procs::{finish_twin, spawn_ready, tree_counter, Kids};
use common::view::{fuse_available, Unmount};
use common::*;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install.sh")
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(script()).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn files_under(root: &Path) -> Vec<String> {
    fn walk(d: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                walk(&p, root, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn installs_into_a_staging_dir_and_uninstalls_exactly_that() {
    let stage = tempdir("install-stage");
    std::fs::create_dir_all(stage.join("etc/keep")).unwrap();
    std::fs::write(stage.join("etc/keep/file"), "mine").unwrap();
    let before = files_under(&stage);
    let d = stage.to_str().unwrap();
    let (ok, text) = run(&["--destdir", d, "--prefix", "/opt/tp", "--store-dir", "/run/tp-store", "--store-size", "2G"]);
    assert!(ok, "{text}");
    let mode = |p: &str| std::fs::metadata(stage.join(p)).unwrap_or_else(|e| panic!("{p}: {e}")).permissions().mode() & 0o777;
    assert_eq!(mode("opt/tp/bin/twinpaged"), 0o755);
    assert_eq!(mode("opt/tp/bin/twinpage"), 0o755);
    assert_eq!(mode("opt/tp/lib/twinpage/libtwinpage.so"), 0o644);
    let unit = std::fs::read_to_string(stage.join("etc/systemd/system/twinpaged.service")).unwrap();
    assert!(unit.lines().any(|l| l == "ExecStart=/opt/tp/bin/twinpaged --dir /run/twinpage --sysfs /run/twinpage/sysfs"), "{unit}");
    let store = std::fs::read_to_string(stage.join("etc/systemd/system/twinpaged.service.d/store.conf")).unwrap();
    assert!(store.contains("Environment=TWINPAGE_STORE_DIR=/run/tp-store") && store.contains("size=2G"), "{store}");
    // The view is a mount the host's programs must see: no setting may give
    // the service a mount namespace of its own, where it would stay.
    for setting in [
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateDevices=",
        "PrivateNetwork=",
        "PrivateMounts=",
        "ReadWritePaths=",
        "ReadOnlyPaths=",
        "MountFlags=",
    ] {
        for (name, text) in [("unit", &unit), ("store.conf", &store)] {
            assert!(
                !text.lines().any(|l| l.starts_with(setting)),
                "{name} has {setting}: the sysfs view would be mounted where the host cannot see it"
            );
        }
    }
    let sysctl = std::fs::read_to_string(stage.join("etc/sysctl.d/60-twinpage.conf")).unwrap();
    assert!(sysctl.lines().any(|l| l == "vm.max_map_count = 1048576"), "{sysctl}");
    // Bad input changes nothing.
    let (ok, text) = run(&["--destdir", d, "--prefix", "relative"]);
    assert!(!ok && text.contains("--prefix must be absolute"), "{text}");
    let (ok, text) = run(&["--uninstall", "--destdir", d, "--prefix", "/opt/tp"]);
    assert!(ok, "{text}");
    assert_eq!(files_under(&stage), before, "uninstall left or took something");
    let (ok, text) = run(&["--uninstall", "--destdir", d, "--prefix", "/opt/tp"]);
    assert!(!ok && text.contains("nothing installed"), "{text}");
    let _ = std::fs::remove_dir_all(&stage);
}

/// The staged install, run: twinpaged started with its unit's ExecStart and
/// Environment (systemd does not run here), its sysfs view refusing a bad
/// write as sysfs does, two twin.c programs with the installed preload
/// sharing their common pages through it, and the view counting them.
#[test]
fn the_installed_daemon_and_preload_merge_across_processes() {
    let Some(prog) = program("twin") else { return };
    if !have_uffd() || !fuse_available() {
        return;
    }
    let stage = tempdir("install-run");
    let (ok, text) = run(&["--destdir", stage.to_str().unwrap(), "--prefix", "/opt/tp", "--no-sysctl"]);
    assert!(ok, "{text}");
    let unit = std::fs::read_to_string(stage.join("etc/systemd/system/twinpaged.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let mut words = exec.split_whitespace();
    let bin = stage.join(words.next().unwrap().trim_start_matches('/'));
    let tree = stage.join("tree");
    // The unit's own arguments, with the tree moved off /run.
    let args: Vec<String> =
        words.map(|w| w.strip_prefix("/run/twinpage").map_or_else(|| w.to_string(), |rest| format!("{}{rest}", tree.display()))).collect();
    let ksm = tree.join("sysfs/kernel/mm/ksm");
    let unmount = Unmount(tree.join("sysfs"));
    let mut daemon = Command::new(&bin);
    daemon.args(&args).stderr(Stdio::null());
    for env in unit.lines().filter_map(|l| l.strip_prefix("Environment=")) {
        let (k, v) = env.split_once('=').unwrap();
        daemon.env(k, v);
    }
    let mut kids = Kids(vec![daemon.spawn().unwrap()]);
    assert!(wait_until(Duration::from_secs(10), || tree.join("twinpaged.sock").exists()), "the installed daemon did not start");
    assert!(wait_until(Duration::from_secs(10), || ksm.join("pages_to_scan").exists()), "the installed daemon mounted no sysfs view");
    let bad = std::fs::write(ksm.join("pages_to_scan"), "abc").map_err(|e| e.raw_os_error());
    assert_eq!(bad, Err(Some(libc::EINVAL)), "a bad write through the installed view");
    let lib = stage.join("opt/tp/lib/twinpage/libtwinpage.so");
    for _ in 0..2 {
        kids.0.push(spawn_ready(
            Command::new(&prog)
                .args(["9", "512", "0", "0"])
                .env("LD_PRELOAD", &lib)
                .env("TWINPAGE_DIR", &tree)
                .env("TWINPAGE_PAGES_TO_SCAN", "100000")
                .env("TWINPAGE_SLEEP_MILLISECS", "5")
                .stdout(Stdio::piped()),
        ));
    }
    let (a, b) = (kids.0[1].id(), kids.0[2].id());
    assert!(
        wait_until(Duration::from_secs(20), || tree_counter(&tree, a, "twinpage_daemon_merged") == 512
            && tree_counter(&tree, b, "twinpage_daemon_merged") == 512),
        "the two programs did not share their pages through the installed daemon: {} and {}",
        tree_counter(&tree, a, "twinpage_daemon_merged"),
        tree_counter(&tree, b, "twinpage_daemon_merged")
    );
    let sharing: u64 = std::fs::read_to_string(ksm.join("pages_sharing")).unwrap().trim().parse().unwrap();
    assert!(sharing >= 512, "pages_sharing through the installed view: {sharing}");
    for _ in 0..2 {
        finish_twin(kids.0.remove(1));
    }
    // And QEMU, as an operator runs it: a guest with the installed preload
    // merges through the installed daemon and verifies its data.
    if guest::prerequisites().is_some() {
        let args = ["tp.mib=32", "tp.wait=15", "tp.poweroff=1"];
        let mut g = guest::Guest::boot_in("install", &lib, &args, &["-m".into(), "256M".into()], true, Some(&tree));
        g.wait_line("TP-READY", Duration::from_secs(90));
        g.start_merging();
        let pid = g.pid();
        g.wait_for("the guest merging through the installed daemon", Duration::from_secs(60), |_| {
            tree_counter(&tree, pid, "twinpage_daemon_merged") > 1000
        });
        eprintln!("guest {pid}: {} pages merged through the installed daemon", tree_counter(&tree, pid, "twinpage_daemon_merged"));
        let verdict = g.finish();
        assert!(verdict.contains("TP-VERDICT OK"), "{verdict}");
    }
    drop(kids);
    drop(unmount);
    let (ok, text) = run(&["--uninstall", "--destdir", stage.to_str().unwrap(), "--prefix", "/opt/tp"]);
    assert!(ok, "{text}");
    let _ = std::fs::remove_dir_all(&stage);
}
