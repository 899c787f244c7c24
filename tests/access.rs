//! Access: the tree is created readable by all and writable only by its
//! owner (as sysfs: 0755 directories, 0644 tunables, 0444 counters) even
//! under umask 077; a root that others could rearrange is refused; another
//! uid can read the statistics but cannot write a tunable; the daemon's
//! socket is 0600 (another uid cannot connect), and with a socket opened to
//! all, another uid cannot join a domain it does not own. The other uid is
//! 65534 (nobody), entered with setuid in a child: these tests need root
//! (skipped with the reason outside CI, failed under CI=true).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::procs::Kids;
use common::{preload_lib, program, require, tempdir, wait_until};
use twinpage::statsfs::{StatsTree, StatsTreeOptions};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    require(unsafe { libc::geteuid() } == 0, "root (to run a child as uid 65534)")
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

fn as_nobody(cmd: &mut Command) -> Output {
    cmd.uid(NOBODY).gid(NOBODY).current_dir("/").output().unwrap()
}

fn daemon_bin() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/twinpaged");
    require(p.exists(), "target/release/twinpaged (cargo build --release)").then_some(p)
}

#[test]
fn the_tree_is_readable_by_all_and_writable_by_its_owner_only() {
    let (Some(lib), Some(prog)) = (preload_lib(), program("twin")) else { return };
    if !common::have_uffd() || !is_root() {
        return;
    }
    let base = tempdir("access-tree");
    let root = base.join("run/twinpage");
    let mut kids = Kids(Vec::new());
    // umask 077, as a locked-down service might run: the tree is still 0755/0644/0444.
    let mut c = Command::new("sh")
        .arg("-c")
        .arg(format!("umask 077; exec {} 9 64 16 0", prog.display()))
        .env("LD_PRELOAD", &lib)
        .env("TWINPAGE_DIR", &root)
        .env("TWINPAGE_PAGES_TO_SCAN", "100000")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("READY"), "{line:?}");
    let pid = c.id();
    kids.0.push(c);
    let proc_dir = root.join(format!("proc/{pid}"));
    assert!(wait_until(Duration::from_secs(10), || proc_dir.join("ksm_stat").exists()));

    let ksm = root.join("kernel/mm/ksm");
    for d in
        [root.clone(), root.join("kernel"), root.join("kernel/mm"), ksm.clone(), root.join("proc"), proc_dir.clone(), root.join("twinpage")]
    {
        assert_eq!(mode(&d), 0o755, "{}", d.display());
    }
    let mut files = 0;
    for e in std::fs::read_dir(&ksm).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        let a = twinpage::tunables::find_attr(&name).unwrap_or_else(|| panic!("unknown {name}"));
        assert_eq!(mode(&p), a.mode(), "{name}");
        files += 1;
    }
    assert_eq!(mode(&ksm.join("twinpage_merge_mode")), 0o644);
    for p in [&proc_dir, &root.join("twinpage")] {
        for e in std::fs::read_dir(p).unwrap() {
            let p = e.unwrap().path();
            assert_eq!(mode(&p) & 0o022, 0, "{} writable by others", p.display());
            assert_eq!(mode(&p) & 0o444, 0o444, "{} not readable by all", p.display());
            files += 1;
        }
    }

    // Another uid reads the statistics but changes nothing.
    let before = std::fs::read_to_string(ksm.join("pages_to_scan")).unwrap();
    let cat = as_nobody(Command::new("cat").arg(ksm.join("pages_sharing")).arg(proc_dir.join("ksm_stat")));
    assert!(cat.status.success(), "{}", String::from_utf8_lossy(&cat.stderr));
    for (attr, value) in [("pages_to_scan", "5"), ("run", "2"), ("twinpage_merge_mode", "all")] {
        let echo = as_nobody(Command::new("sh").arg("-c").arg(format!("echo {value} > {}", ksm.join(attr).display())));
        assert!(!echo.status.success(), "uid {NOBODY} wrote {attr}");
        assert!(String::from_utf8_lossy(&echo.stderr).contains("Permission denied"));
        let set = as_nobody(Command::new(env!("CARGO_BIN_EXE_twinpage")).args(["set", attr, value, "--dir"]).arg(&root));
        assert!(!set.status.success(), "uid {NOBODY}: twinpage set {attr} {value} succeeded");
    }
    for p in [root.join("kernel/evil"), proc_dir.join("evil"), root.join("twinpage/evil")] {
        let touch = as_nobody(Command::new("touch").arg(&p));
        assert!(!touch.status.success() && !p.exists(), "uid {NOBODY} created {}", p.display());
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(std::fs::read_to_string(ksm.join("pages_to_scan")).unwrap(), before);
    assert_eq!(std::fs::read_to_string(ksm.join("run")).unwrap(), "1\n");
    println!("{files} files: modes as sysfs under umask 077; uid {NOBODY} reads, cannot write or create");

    let mut c = kids.0.pop().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(c.wait().unwrap().success() && line.starts_with("VERIFY OK"), "{line:?}");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn a_root_others_can_rearrange_is_refused() {
    let Some(e) = common::engine() else { return };
    let e = Arc::new(e);
    let base = tempdir("access-root");
    let open = base.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = StatsTree::spawn(e.clone(), open.clone(), StatsTreeOptions::default()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("writable by other users"), "{err}");
    assert!(!open.join("kernel").exists(), "nothing created in a refused root");
    // Sticky, as /tmp: others cannot move what is ours.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    drop(StatsTree::spawn(e.clone(), open.clone(), StatsTreeOptions::default()).unwrap());
    if is_root() {
        let theirs = base.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
        let err = StatsTree::spawn(e, theirs.clone(), StatsTreeOptions::default()).unwrap_err();
        assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        assert_eq!(std::fs::metadata(&theirs).unwrap().uid(), NOBODY);
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// Run as uid 65534 by [`another_uid_cannot_connect_or_join_a_domain_it_does_not_own`]
/// (ignored on its own): connects to `TWINPAGE_ACCESS_SOCKET` asking for
/// `TWINPAGE_ACCESS_DOMAIN` and prints what happened.
#[test]
#[ignore]
fn helper_connect_as_another_uid() {
    let Some(socket) = std::env::var_os("TWINPAGE_ACCESS_SOCKET") else { return };
    let domain = std::env::var("TWINPAGE_ACCESS_DOMAIN").ok().filter(|d| !d.is_empty());
    let cfg = twinpage::link::DaemonConfig { socket: socket.into(), domain };
    match twinpage::link::Link::connect(&cfg) {
        Ok(link) => println!("ACCESS: JOINED agent {}", link.agent_id()),
        Err(twinpage::link::LinkError::Refused(why)) => println!("ACCESS: REFUSED {why}"),
        Err(e) => println!("ACCESS: FAILED {}", twinpage::link::chain(&e)),
    }
}

fn connect_as_nobody(socket: &Path, domain: &str) -> String {
    let out = as_nobody(
        Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "helper_connect_as_another_uid", "--nocapture", "--test-threads", "1"])
            .env("TWINPAGE_ACCESS_SOCKET", socket)
            .env("TWINPAGE_ACCESS_DOMAIN", domain),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let at = text.find("ACCESS: ").unwrap_or_else(|| panic!("helper: {text} {}", String::from_utf8_lossy(&out.stderr)));
    text[at..].lines().next().unwrap_or_default().to_string()
}

/// Whether `sock` appears within 10 s, looked for without a pause.
fn socket_appears(sock: &Path) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if sock.exists() {
            return true;
        }
        std::hint::spin_loop();
    }
    false
}

fn daemon_counter(dir: &Path, pid: u32, name: &str) -> u64 {
    let text = std::fs::read_to_string(dir.join(format!("proc/{pid}/twinpage_counters"))).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn another_uid_cannot_connect_or_join_a_domain_it_does_not_own() {
    let (Some(lib), Some(prog), Some(bin)) = (preload_lib(), program("twin"), daemon_bin()) else { return };
    if !common::have_uffd() || !is_root() {
        return;
    }
    let dir = tempdir("access-daemon");
    let sock = dir.join("twinpaged.sock");
    let mut kids = Kids(Vec::new());

    // Default: the socket is 0600, another uid cannot even connect.
    kids.0.push(Command::new(&bin).arg("--dir").arg(&dir).spawn().unwrap());
    // Looked at as soon as it exists: it must never show another mode
    // (CI once caught the bound socket at the umask's 0755, before the chmod).
    assert!(socket_appears(&sock));
    assert_eq!(mode(&sock), 0o600);
    let r = connect_as_nobody(&sock, "");
    assert!(r.starts_with("ACCESS: FAILED") && r.contains("ermission denied"), "{r}");
    let mut d = kids.0.pop().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    d.wait().unwrap();

    // A socket open to all: each uid in its own domain; a named domain
    // belongs to the uid that created it.
    let _ = std::fs::remove_file(&sock);
    kids.0.push(Command::new(&bin).arg("--dir").arg(&dir).args(["--socket-mode", "666"]).spawn().unwrap());
    let d = kids.0[0].id();
    assert!(socket_appears(&sock));
    assert_eq!(mode(&sock), 0o666);
    let mut twin = Command::new(&prog)
        .args(["4", "64", "16", "0"])
        .env("LD_PRELOAD", &lib)
        .env("TWINPAGE_DIR", &dir)
        .env("TWINPAGE_DOMAIN", "vmA")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(twin.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    kids.0.push(twin);
    assert!(wait_until(Duration::from_secs(10), || daemon_counter(&dir, d, "twinpage_daemon_agents") == 1), "root's agent joined vmA");
    for (domain, want) in [("vmA", "ACCESS: REFUSED"), ("uid:0", "ACCESS: REFUSED"), ("", "ACCESS: JOINED"), ("nobodys", "ACCESS: JOINED")]
    {
        let r = connect_as_nobody(&sock, domain);
        assert!(r.starts_with(want), "uid {NOBODY} asking for domain {domain:?}: {r}");
        println!("uid {NOBODY}, domain {domain:?}: {r}");
    }
    // The refused never counted; the joined left when they exited.
    assert!(wait_until(Duration::from_secs(5), || daemon_counter(&dir, d, "twinpage_daemon_agents") == 1));
    drop(kids);
    let _ = std::fs::remove_dir_all(&dir);
}
