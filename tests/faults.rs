//! Crash faults under twinpaged, with real preloaded processes
//! (tests/programs/twin.c): the connection cut at every message boundary
//! (a frame-level relay in this test), agents killed mid-merge, the daemon
//! killed mid-batch. Each time the processes run on, their data verifies,
//! and once every agent has exited the daemon's store is empty again.
//! Also the daemon's bounds (agents, proposals per agent).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::{finish_twin, setup, spawn_ready, start_daemon, tree_counter, tree_counters, Kids, Setup};
use common::wait_until;
use twinpage::broker::conn::Conn;

/// `twin SEED COMMON PAIRS WRITES`, preloaded, connecting to `socket`.
fn twin_cmd(s: &Setup, socket: &Path, args: [u64; 4]) -> Command {
    let mut cmd = Command::new(&s.prog);
    cmd.args(args.map(|a| a.to_string()))
        .env("LD_PRELOAD", &s.lib)
        .env("TWINPAGE_DIR", &s.dir)
        .env("TWINPAGE_SOCKET", socket)
        .env("TWINPAGE_PAGES_TO_SCAN", "100000")
        .env("TWINPAGE_SLEEP_MILLISECS", "5")
        .env("TWINPAGE_LOG", "error")
        .stdout(Stdio::piped());
    cmd
}

/// Starts a twin and waits for READY.
fn start(mut cmd: Command) -> Child {
    spawn_ready(&mut cmd)
}

/// The daemon's store is empty and it counts no sharing and no agent.
fn daemon_empty(dir: &Path, d: u32) -> bool {
    let c = tree_counters(dir, d);
    ["twinpage_store_bytes", "pages_shared", "pages_sharing", "twinpage_daemon_agents"].iter().all(|k| c.get(*k) == Some(&0))
}

/// Where a relay cuts its first connection: after forwarding its `k`-th
/// frame (counted over both directions), or instead of forwarding it.
#[derive(Debug, Clone, Copy)]
struct Cut {
    k: usize,
    deliver: bool,
}

/// A frame-level relay to the daemon listening on `upstream`, itself
/// listening on `listen`: `judge` sees every frame, either way, with its
/// direction and the state `connection` made for its connection, and may
/// forward it (`send`, false if that failed); it says whether the connection
/// goes on.
fn frame_relay<C: Send + Sync + 'static>(
    listen: &Path,
    upstream: PathBuf,
    connection: impl Fn() -> C + Send + 'static,
    judge: impl Fn(&C, &str, &twinpage::broker::proto::Msg, &mut dyn FnMut() -> bool) -> bool + Send + Sync + 'static,
) {
    let _ = std::fs::remove_file(listen);
    let l = UnixListener::bind(listen).unwrap();
    let judge = Arc::new(judge);
    std::thread::spawn(move || {
        for agent in l.incoming() {
            let Ok(agent) = agent else { return };
            let Ok(daemon) = UnixStream::connect(&upstream) else { continue };
            let state = Arc::new(connection());
            for (from, to, dir) in [(&agent, &daemon, "->"), (&daemon, &agent, "<-")] {
                let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                let (state, judge) = (state.clone(), judge.clone());
                std::thread::spawn(move || {
                    let mut rx = Conn::new(from.try_clone().unwrap());
                    let mut tx = Conn::new(to.try_clone().unwrap());
                    loop {
                        let Ok((msg, fd)) = rx.recv() else { break };
                        let mut send = || {
                            match &fd {
                                Some(fd) => tx.send_with_fd(&msg, std::os::fd::AsFd::as_fd(fd)),
                                None => tx.send(&msg),
                            }
                            .is_ok()
                        };
                        if !judge(&state, dir, &msg, &mut send) {
                            break;
                        }
                    }
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
}

/// A relay whose connection is cut as `cut` says, later ones pass
/// untouched. (Should a connection end before its k-th frame, e.g. the
/// agent's 2 s timeout on a loaded machine, the next one is cut instead, so
/// every k happens.)
fn relay(listen: &Path, upstream: PathBuf, cut: Cut, log: Arc<Mutex<Vec<String>>>) {
    let armed = Arc::new(Mutex::new(Some(cut)));
    let connection = {
        let armed = armed.clone();
        // The cut this connection is armed with, and its frames so far.
        move || (*armed.lock().unwrap(), Mutex::new(0usize))
    };
    frame_relay(listen, upstream, connection, move |(limit, count), dir, msg, send| {
        let mut c = count.lock().unwrap();
        *c += 1;
        match *limit {
            Some(cut) if *c > cut.k => false,
            Some(cut) if *c == cut.k => {
                if cut.deliver && !send() {
                    // Not cut here: the next connection is.
                    return false;
                }
                *armed.lock().unwrap() = None;
                log.lock().unwrap().push(format!("{cut:?}: cut at {dir} {}", msg.name()));
                false
            }
            _ => send(),
        }
    });
}

/// What a killing relay is armed with: the frame, counted from arming,
/// on which it kills the daemon (after forwarding it, or with it in flight).
#[derive(Debug, Clone, Copy)]
struct KillAt {
    frames: usize,
    deliver: bool,
}

/// A relay (every connection) that, when armed, SIGKILLs the daemon `pid`
/// names on the armed frame: the daemon dies in the middle of an exchange,
/// deliberately. The frames hit are logged.
fn killing_relay(
    listen: &Path,
    upstream: PathBuf,
    arm: Arc<Mutex<Option<KillAt>>>,
    pid: Arc<std::sync::atomic::AtomicU32>,
    log: Arc<Mutex<Vec<String>>>,
) {
    frame_relay(
        listen,
        upstream,
        || (),
        move |(), dir, msg, send| {
            let mut armed = arm.lock().unwrap();
            let kill = armed.as_mut().and_then(|k| {
                k.frames -= 1;
                (k.frames == 0).then_some(k.deliver)
            });
            let Some(deliver) = kill else { return send() };
            if deliver {
                send();
            }
            let p = pid.load(std::sync::atomic::Ordering::SeqCst);
            // SAFETY: kill(2) of the test's own daemon child.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
            *armed = None;
            log.lock().unwrap().push(format!("{} {dir} {}", if deliver { "after" } else { "with in flight" }, msg.name()));
            true
        },
    );
}

/// Every message boundary of a merge cycle, both ways (the k-th frame
/// delivered then the connection cut, or the connection cut instead of
/// delivering it): each agent runs on, reconnects, merges everything, keeps
/// its data; when all have exited, the daemon's store is empty.
#[test]
fn a_connection_cut_at_every_message_boundary_loses_nothing_and_leaks_nothing() {
    let Some(s) = setup("faults-cut") else { return };
    let (common, pairs) = (48u64, 48u64);
    let all = common + 2 * pairs;
    let mut kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &[], "warn")]);
    let d = kids.0[0].id();
    let upstream = s.dir.join("twinpaged.sock");
    let log = Arc::new(Mutex::new(Vec::new()));
    let cuts: Vec<Cut> = (1..=14).flat_map(|k| [Cut { k, deliver: true }, Cut { k, deliver: false }]).collect();
    let mut agents = Vec::new();
    for (i, &cut) in cuts.iter().enumerate() {
        let sock = s.dir.join(format!("relay-{i}.sock"));
        relay(&sock, upstream.clone(), cut, log.clone());
        kids.0.push(start(twin_cmd(&s, &sock, [3, common, pairs, 0])));
        agents.push((kids.0.last().unwrap().id(), cut));
    }
    // Every agent reconnects and all its pages end up merged (those merged
    // through the first link stay merged as its orphans, pairs merged alone
    // meanwhile stay in the agent's own store, the rest go through the
    // daemon); none dies on the way.
    let t = Instant::now();
    let merged = wait_until(Duration::from_secs(40), || {
        for c in kids.0.iter_mut().skip(1) {
            if let Ok(Some(st)) = c.try_wait() {
                let mut out = String::new();
                let _ = BufReader::new(c.stdout.take().unwrap()).read_line(&mut out);
                let cut = agents.iter().find(|a| a.0 == c.id()).map(|a| a.1);
                panic!("{cut:?}: pid {} exited: {st} {out:?}", c.id());
            }
        }
        agents.iter().all(|&(p, _)| {
            let c = tree_counters(&s.dir, p);
            c.get("twinpage_merging_pages") == Some(&all) && c.get("twinpage_daemon_agents") == Some(&1)
        })
    });
    let cuts_seen = log.lock().unwrap().clone();
    eprintln!("{} cuts: {}", cuts_seen.len(), cuts_seen.join("; "));
    for &(p, cut) in &agents {
        let c = tree_counters(&s.dir, p);
        if c.get("twinpage_merging_pages") != Some(&all) {
            eprintln!("{cut:?}: pid {p} {c:?}");
        }
    }
    eprintln!("all merged after {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(cuts_seen.len(), cuts.len(), "every relay cut its first connection");
    assert!(merged, "an agent did not merge everything after its connection was cut");
    for _ in 0..agents.len() {
        finish_twin(kids.0.remove(1));
    }
    let empty = wait_until(Duration::from_secs(10), || daemon_empty(&s.dir, d));
    eprintln!("daemon after all exited: {:?}", tree_counters(&s.dir, d));
    assert!(empty, "references leaked: the store is not empty after every agent exited");
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// A small tmpfs mounted for a test, unmounted (and its directory removed)
/// on drop, also when the test fails.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    /// `None` (skipped, or failed under CI) when not root.
    fn mount(under: &Path, size: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if !common::require(unsafe { libc::geteuid() } == 0, "root, to mount a size-limited tmpfs") {
            return None;
        }
        let dir = under.join("store");
        std::fs::create_dir_all(&dir).unwrap();
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let opts = std::ffi::CString::new(format!("size={size},mode=0700")).unwrap();
        // SAFETY: NUL-terminated strings that outlive the call.
        let ret = unsafe { libc::mount(c"tmpfs".as_ptr(), path.as_ptr(), c"tmpfs".as_ptr(), 0, opts.as_ptr().cast()) };
        assert_eq!(ret, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        Some(Self(dir))
    }

    /// Fills the filesystem with a file until `leave` bytes are free.
    fn fill(&self, leave: u64) -> PathBuf {
        let free = self.free();
        let f = self.0.join("filler");
        let file = std::fs::File::create(&f).unwrap();
        use std::io::Write;
        let mut w = std::io::BufWriter::new(file);
        let chunk = vec![0x5au8; 4096];
        for _ in 0..(free - leave) / 4096 {
            w.write_all(&chunk).unwrap();
        }
        w.flush().unwrap();
        f
    }

    fn free(&self) -> u64 {
        let path = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs is plain old data; all zeros is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a statvfs to fill.
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_bsize
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let path = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; a lazy unmount cannot fail on busy.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Free store pages left on the tmpfs when the test fills it.
const ROOM: u64 = 64;

/// The embedded engine with TWINPAGE_STORE_DIR on an 8 MiB tmpfs that is
/// nearly full: merging stops at the space left, twinpage_store_full says
/// why, the process's data verifies; with the filler deleted merging
/// completes.
#[test]
fn a_full_store_tmpfs_pauses_merging_and_space_resumes_it() {
    let Some(s) = setup("faults-full") else { return };
    let Some(fs) = SmallTmpfs::mount(&s.dir, "8m") else { return };
    let pairs = 512u64;
    let filler = fs.fill(ROOM * 4096);
    let mut cmd = twin_cmd(&s, Path::new("/nonexistent"), [1, 0, pairs, 0]);
    cmd.env("TWINPAGE_SOCKET", "off").env("TWINPAGE_STORE_DIR", &fs.0);
    let mut kids = Kids(vec![start(cmd)]);
    let p = kids.0[0].id();
    let held = wait_until(Duration::from_secs(20), || {
        tree_counter(&s.dir, p, "twinpage_store_full") > 0 && tree_counter(&s.dir, p, "full_scans") > 20
    });
    let c = tree_counters(&s.dir, p);
    eprintln!("full: {} pages free, {c:?}", fs.free() / 4096);
    assert!(held, "merging was not held back by the full store");
    assert!(c["pages_shared"] <= ROOM && c["pages_shared"] > 0, "merged up to the space left: {} store pages", c["pages_shared"]);
    assert_eq!(c["pages_sharing"], c["pages_shared"]);
    assert!(kids.0[0].try_wait().unwrap().is_none(), "the process died");

    std::fs::remove_file(filler).unwrap();
    let t = Instant::now();
    let resumed = wait_until(Duration::from_secs(20), || tree_counter(&s.dir, p, "pages_sharing") == pairs);
    eprintln!("resumed in {:.2} s: {:?}", t.elapsed().as_secs_f64(), tree_counters(&s.dir, p));
    assert!(resumed, "merging did not resume when space returned");
    assert_eq!(tree_counter(&s.dir, p, "twinpage_store_bytes"), pairs * 4096);
    eprintln!("{}", finish_twin(kids.0.remove(0)).trim());
    drop(fs);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// The same under twinpaged --store-dir: uploads wait while the store is
/// full (joins of existing pages go on), resume with space; the store
/// empties when the agents exit.
#[test]
fn a_full_daemon_store_pauses_merging_and_space_resumes_it() {
    let Some(s) = setup("faults-dfull") else { return };
    let Some(fs) = SmallTmpfs::mount(&s.dir, "8m") else { return };
    let common = 384u64;
    let filler = fs.fill(ROOM * 4096);
    let store_dir = fs.0.to_str().unwrap().to_string();
    let mut kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &["--store-dir", &store_dir], "warn")]);
    let d = kids.0[0].id();
    let sock = s.dir.join("twinpaged.sock");
    kids.0.push(start(twin_cmd(&s, &sock, [2, common, 0, 0])));
    kids.0.push(start(twin_cmd(&s, &sock, [2, common, 0, 0])));
    let held = wait_until(Duration::from_secs(20), || {
        tree_counter(&s.dir, d, "twinpage_store_full") > 0 && tree_counter(&s.dir, d, "pages_shared") >= ROOM - 1
    });
    std::thread::sleep(Duration::from_millis(500));
    let c = tree_counters(&s.dir, d);
    eprintln!("full: {c:?}");
    assert!(held, "merging was not held back by the full store");
    assert!(c["pages_shared"] <= ROOM, "more store pages than the space left: {}", c["pages_shared"]);
    for k in &kids.0[1..] {
        assert!(tree_counter(&s.dir, k.id(), "twinpage_daemon_merged") <= ROOM);
    }
    std::fs::remove_file(filler).unwrap();
    let t = Instant::now();
    let resumed = wait_until(Duration::from_secs(20), || tree_counter(&s.dir, d, "pages_sharing") == common);
    eprintln!("resumed in {:.2} s: {:?}", t.elapsed().as_secs_f64(), tree_counters(&s.dir, d));
    assert!(resumed, "merging did not resume when space returned");
    for _ in 0..2 {
        eprintln!("{}", finish_twin(kids.0.remove(1)).trim());
    }
    assert!(wait_until(Duration::from_secs(5), || daemon_empty(&s.dir, d)), "store not empty after the agents left");
    drop(kids);
    drop(fs);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// A seed for the random kill points: `TWINPAGE_FAULT_SEED` replays one.
fn seeded_rng(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = std::env::var("TWINPAGE_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    eprintln!("{test}: TWINPAGE_FAULT_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Agents killed (SIGKILL) at random points while they merge flat out with
/// two survivors (same content: every merge joins or uploads shared store
/// pages): the survivors' data verifies, and once they exit too the store
/// is empty.
#[test]
fn agents_killed_mid_merge_leak_nothing_and_survivors_verify() {
    use rand::Rng;
    let Some(s) = setup("faults-agentkill") else { return };
    let mut rng = seeded_rng("agents_killed_mid_merge");
    let (common, pairs) = (1024u64, 64u64);
    let mut kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &[], "warn")]);
    let d = kids.0[0].id();
    let sock = s.dir.join("twinpaged.sock");
    let flat_out = |args: [u64; 4]| {
        let mut c = twin_cmd(&s, &sock, args);
        c.env("TWINPAGE_SLEEP_MILLISECS", "0");
        c
    };
    kids.0.push(start(flat_out([8, common, pairs, 1])));
    kids.0.push(start(flat_out([8, common, pairs, 1])));
    let survivors = [kids.0[1].id(), kids.0[2].id()];
    let (mut killed, mut merged_when_killed) = (0, 0u64);
    let t = Instant::now();
    let mut victims: Vec<Child> = Vec::new();
    while killed < 30 {
        // Three victims at a time, each killed 0-250 ms after it is ready:
        // from before its hello to the middle of its uploads and joins.
        while victims.len() < 3 {
            victims.push(start(flat_out([8, common, pairs, 1])));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..250)));
        let mut v = victims.remove(rng.gen_range(0..victims.len()));
        merged_when_killed += tree_counter(&s.dir, v.id(), "twinpage_daemon_merged");
        v.kill().unwrap();
        v.wait().unwrap();
        killed += 1;
    }
    for mut v in victims {
        v.kill().unwrap();
        v.wait().unwrap();
    }
    eprintln!(
        "{killed} agents killed in {:.1} s, {merged_when_killed} of their pages merged through the daemon when last read; daemon {:?}",
        t.elapsed().as_secs_f64(),
        tree_counters(&s.dir, d)
    );
    assert!(merged_when_killed > 0, "no victim was killed with merged pages: the kills missed the merging");
    // The survivors: merged with each other, every byte as written.
    assert!(wait_until(Duration::from_secs(10), || survivors
        .iter()
        .all(|&p| tree_counter(&s.dir, p, "twinpage_daemon_merged") > common / 2)));
    for _ in 0..2 {
        eprintln!("{}", finish_twin(kids.0.remove(1)).trim());
    }
    let empty = wait_until(Duration::from_secs(10), || daemon_empty(&s.dir, d));
    eprintln!("daemon after all exited: {:?}", tree_counters(&s.dir, d));
    assert!(empty, "references leaked: the store is not empty after every agent exited");
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// The daemon killed (SIGKILL) while agents exchange batches with it flat
/// out (one agent's pages are unique, so every scan is a stream of Scan
/// batches; two others merge with each other and keep writing), then
/// restarted, ten times: at random points, and deliberately mid-exchange by
/// a relay in front of one agent that kills it on the 1st-6th frame after
/// arming (Scan, Orders, Fill, Filled, Report...), forwarded or in flight.
/// The agents keep running, verify their data, reconnect each time, and the
/// last daemon is empty once they have exited.
#[test]
fn the_daemon_killed_mid_batch_again_and_again_loses_nothing() {
    use rand::Rng;
    let Some(s) = setup("faults-daemonkill") else { return };
    let mut rng = seeded_rng("daemon_killed_mid_batch");
    let sock = s.dir.join("twinpaged.sock");
    let mut daemon = start_daemon(&s.daemon, &s.dir, &[], "warn");
    let daemon_pid = Arc::new(std::sync::atomic::AtomicU32::new(daemon.id()));
    let arm = Arc::new(Mutex::new(None));
    let hits = Arc::new(Mutex::new(Vec::new()));
    let relayed = s.dir.join("relay.sock");
    killing_relay(&relayed, sock.clone(), arm.clone(), daemon_pid.clone(), hits.clone());
    let flat_out = |args: [u64; 4], via: &Path| {
        let mut c = twin_cmd(&s, via, args);
        c.env("TWINPAGE_SLEEP_MILLISECS", "0");
        c
    };
    let flat_out = |args: [u64; 4]| flat_out(args, &sock);
    let mut kids = Kids(vec![
        start({
            let mut c = flat_out([12, 1024, 64, 1]);
            c.env("TWINPAGE_SOCKET", &relayed);
            c
        }),
        start(flat_out([12, 1024, 64, 1])),
        start({
            // smart_scan off: its unique pages are proposed at every scan.
            let mut c = flat_out([13, 4096, 0, 1]);
            c.env("TWINPAGE_SMART_SCAN", "0");
            c
        }),
    ]);
    let pids: Vec<u32> = kids.0.iter().map(|c| c.id()).collect();
    let connected = |pids: &[u32]| pids.iter().all(|&p| tree_counter(&s.dir, p, "twinpage_daemon_agents") == 1);
    for round in 0..10 {
        assert!(wait_until(Duration::from_secs(10), || connected(&pids)), "round {round}: agents did not (re)connect");
        if round % 2 == 0 {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
            daemon.kill().unwrap();
        } else {
            *arm.lock().unwrap() = Some(KillAt { frames: rng.gen_range(1..=6), deliver: rng.gen() });
            let died = wait_until(Duration::from_secs(10), || daemon.try_wait().unwrap().is_some());
            assert!(died, "round {round}: the relayed agent sent nothing for the relay to kill on");
        }
        daemon.wait().unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || pids.iter().all(|&p| tree_counter(&s.dir, p, "twinpage_daemon_agents") == 0)),
            "round {round}: agents did not notice the daemon's death"
        );
        for c in kids.0.iter_mut() {
            assert!(c.try_wait().unwrap().is_none(), "round {round}: pid {} died with the daemon", c.id());
        }
        daemon = start_daemon(&s.daemon, &s.dir, &[], "warn");
        daemon_pid.store(daemon.id(), std::sync::atomic::Ordering::SeqCst);
    }
    let hits = hits.lock().unwrap().clone();
    eprintln!("daemon killed by the relay: {}", hits.join("; "));
    assert_eq!(hits.len(), 5);
    let d = daemon.id();
    kids.0.push(daemon);
    assert!(wait_until(Duration::from_secs(10), || connected(&pids)), "agents did not reconnect to the last daemon");
    // The last daemon still merges: two newcomers with the same content.
    kids.0.push(start(flat_out([14, 256, 0, 0])));
    kids.0.push(start(flat_out([14, 256, 0, 0])));
    assert!(wait_until(Duration::from_secs(10), || tree_counter(&s.dir, d, "pages_shared") > 0), "the last daemon merged nothing");
    eprintln!("last daemon {:?}", tree_counters(&s.dir, d));
    // kids: the three twins, the daemon, the two newcomers.
    for _ in 0..2 {
        eprintln!("{}", finish_twin(kids.0.pop().unwrap()).trim());
    }
    for _ in 0..3 {
        eprintln!("{}", finish_twin(kids.0.remove(0)).trim());
    }
    assert!(wait_until(Duration::from_secs(10), || daemon_empty(&s.dir, d)), "the last daemon's store is not empty");
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// --max-agents: one agent over the bound is refused with the reason, runs
/// and merges alone, and gets in once a place is free.
#[test]
fn agents_over_the_maximum_are_refused_and_merge_alone() {
    let Some(s) = setup("faults-maxagents") else { return };
    let mut kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &["--max-agents", "2"], "warn")]);
    let d = kids.0[0].id();
    let sock = s.dir.join("twinpaged.sock");
    kids.0.push(start(twin_cmd(&s, &sock, [21, 64, 16, 0])));
    kids.0.push(start(twin_cmd(&s, &sock, [21, 64, 16, 0])));
    assert!(wait_until(Duration::from_secs(10), || tree_counter(&s.dir, d, "twinpage_daemon_agents") == 2));
    let log = s.dir.join("third.log");
    let mut third = twin_cmd(&s, &sock, [21, 64, 16, 0]);
    third.env("TWINPAGE_LOG", "warn").stderr(std::fs::File::create(&log).unwrap());
    kids.0.push(start(third));
    let p3 = kids.0[3].id();
    // It merges its own pairs alone, and stays out of the daemon.
    assert!(
        wait_until(Duration::from_secs(10), || tree_counter(&s.dir, p3, "pages_sharing") == 16),
        "the refused agent did not merge alone"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(tree_counter(&s.dir, p3, "twinpage_daemon_agents"), 0);
    assert_eq!(tree_counter(&s.dir, d, "twinpage_daemon_agents"), 2);
    let text = std::fs::read_to_string(&log).unwrap();
    eprintln!("refused agent's log: {}", text.trim());
    assert!(text.contains("maximum of 2 agents"), "the refusal's reason did not reach the agent");
    // A place frees up: it connects (and merges its new pages with the others').
    finish_twin(kids.0.remove(1));
    assert!(
        wait_until(Duration::from_secs(5), || tree_counter(&s.dir, p3, "twinpage_daemon_agents") == 1),
        "the agent did not get the free place"
    );
    for _ in 0..2 {
        finish_twin(kids.0.remove(1));
    }
    assert!(wait_until(Duration::from_secs(5), || daemon_empty(&s.dir, d)));
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// --max-proposals: an agent with many unique pages keeps at most that many
/// in the daemon's unstable tree; with a second agent of the same content,
/// everything still merges (the window moves as pages merge).
#[test]
fn proposals_per_agent_are_bounded() {
    let Some(s) = setup("faults-maxprop") else { return };
    let (cap, pages) = (100u64, 1000u64);
    let mut kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &["--max-proposals", &cap.to_string()], "warn")]);
    let d = kids.0[0].id();
    let sock = s.dir.join("twinpaged.sock");
    let no_smart = |args| {
        let mut c = twin_cmd(&s, &sock, args);
        c.env("TWINPAGE_SMART_SCAN", "0");
        c
    };
    kids.0.push(start(no_smart([31, pages, 0, 0])));
    let a = kids.0[1].id();
    let mut most = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        most = most.max(tree_counter(&s.dir, d, "twinpage_daemon_proposals"));
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "one agent of {pages} unique pages: at most {most} proposals (cap {cap}); agent {:?}",
        tree_counters(&s.dir, a).get("full_scans")
    );
    assert!(most > 0 && most <= cap, "proposals of one agent: {most}, cap {cap}");
    kids.0.push(start(no_smart([31, pages, 0, 0])));
    let b = kids.0[2].id();
    let t = Instant::now();
    let merged = wait_until(Duration::from_secs(30), || {
        most = most.max(tree_counter(&s.dir, d, "twinpage_daemon_proposals"));
        tree_counter(&s.dir, d, "pages_sharing") == pages
    });
    eprintln!("two agents: all merged in {:.2} s, at most {most} proposals", t.elapsed().as_secs_f64());
    assert!(merged, "not everything merged under the proposal bound: {:?}", tree_counters(&s.dir, d));
    assert!(most <= 2 * cap);
    for _ in 0..2 {
        finish_twin(kids.0.remove(1));
    }
    let _ = (a, b);
    assert!(wait_until(Duration::from_secs(5), || daemon_empty(&s.dir, d)));
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// Connections that never say hello are bounded too (max_agents + 16): one
/// more gets a Refused frame at once, an agent arriving then merges alone,
/// and gets in once they are gone.
#[test]
fn connections_without_hello_are_bounded() {
    let Some(s) = setup("faults-maxconn") else { return };
    let mut kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &["--max-agents", "1"], "warn")]);
    let d = kids.0[0].id();
    let sock = s.dir.join("twinpaged.sock");
    let idle: Vec<UnixStream> = (0..17).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = Conn::new(UnixStream::connect(&sock).unwrap());
    extra.set_timeout(Some(Duration::from_secs(2))).unwrap();
    match extra.recv() {
        Ok((twinpage::broker::proto::Msg::Refused { reason }, _)) => {
            eprintln!("18th connection: {reason}");
            assert!(reason.contains("maximum of 17 connections"));
        }
        other => panic!("the 18th connection was not refused: {other:?}"),
    }
    kids.0.push(start(twin_cmd(&s, &sock, [41, 32, 16, 0])));
    let p = kids.0[1].id();
    assert!(wait_until(Duration::from_secs(10), || tree_counter(&s.dir, p, "pages_sharing") == 16), "the agent did not merge alone");
    assert_eq!(tree_counter(&s.dir, p, "twinpage_daemon_agents"), 0);
    drop(idle);
    assert!(wait_until(Duration::from_secs(5), || tree_counter(&s.dir, p, "twinpage_daemon_agents") == 1), "the agent did not get in");
    // The daemon publishes on its own period, after the agent may have.
    assert!(
        wait_until(Duration::from_secs(2), || tree_counter(&s.dir, d, "twinpage_daemon_agents") == 1),
        "the daemon does not count the agent: {}",
        tree_counter(&s.dir, d, "twinpage_daemon_agents")
    );
    finish_twin(kids.0.remove(1));
    assert!(wait_until(Duration::from_secs(5), || daemon_empty(&s.dir, d)));
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// A stopped (SIGSTOP) daemon: the agents' 2 s timeout fires mid-exchange
/// and they go on alone; when the daemon runs again it finds their
/// connections closed while their processes live, and must not free the
/// store pages they still map. They verify, reconnect, and the store
/// empties only once they have exited.
#[test]
fn a_stalled_daemon_does_not_free_pages_live_agents_map() {
    let Some(s) = setup("faults-stall") else { return };
    let mut kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &[], "warn")]);
    let d = kids.0[0].id();
    let sock = s.dir.join("twinpaged.sock");
    let logs = [s.dir.join("a.log"), s.dir.join("b.log")];
    let flat_out = |args: [u64; 4], log: &Path| {
        let mut c = twin_cmd(&s, &sock, args);
        c.env("TWINPAGE_SLEEP_MILLISECS", "0").env("TWINPAGE_SMART_SCAN", "0").env("TWINPAGE_LOG", "warn");
        c.stderr(std::fs::File::create(log).unwrap());
        c
    };
    kids.0.push(start(flat_out([51, 512, 64, 1], &logs[0])));
    kids.0.push(start(flat_out([51, 512, 64, 1], &logs[1])));
    let pids = [kids.0[1].id(), kids.0[2].id()];
    assert!(wait_until(Duration::from_secs(20), || pids.iter().all(|&p| tree_counter(&s.dir, p, "twinpage_daemon_merged") > 500)));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(d as i32, libc::SIGSTOP) };
    // Their logs, not the tree: the stopped daemon may hold the tree's lock,
    // and then nobody's counters are published until it runs again.
    let alone = wait_until(Duration::from_secs(10), || {
        logs.iter().all(|l| std::fs::read_to_string(l).unwrap_or_default().contains("lost twinpaged"))
    });
    // SAFETY: as above.
    unsafe { libc::kill(d as i32, libc::SIGCONT) };
    assert!(alone, "the agents did not give up on the stopped daemon");
    let merged: Vec<u64> = pids.iter().map(|&p| tree_counter(&s.dir, p, "twinpage_daemon_merged")).collect();
    eprintln!("timed out with {merged:?} pages merged through the daemon");
    assert!(
        wait_until(Duration::from_secs(10), || pids.iter().all(|&p| tree_counter(&s.dir, p, "twinpage_daemon_agents") == 1)),
        "no reconnect"
    );
    // Their pages (orphans now) are still mapped and still theirs: give
    // a wrong free time to show, with the processes checking every 20 ms.
    std::thread::sleep(Duration::from_secs(1));
    for c in kids.0.iter_mut().skip(1) {
        assert!(c.try_wait().unwrap().is_none(), "pid {} died", c.id());
    }
    assert!(tree_counter(&s.dir, d, "twinpage_store_bytes") > 0);
    // Reconnected, they took their parked references back: pages they
    // rewrite since are released to the daemon, whose sharers stay those
    // the agents count (a parked reference would stay after the write).
    let sharers = || {
        let c = tree_counters(&s.dir, d);
        c.get("pages_shared").copied().unwrap_or(0) + c.get("pages_sharing").copied().unwrap_or(0)
    };
    let agree = wait_until(Duration::from_secs(5), || {
        let before = sharers();
        let agents: u64 = pids.iter().map(|&p| tree_counter(&s.dir, p, "twinpage_daemon_merged")).sum();
        before == agents && sharers() == before
    });
    eprintln!(
        "after 1 s of writes: daemon sharers {}, agents' daemon merges {:?}",
        sharers(),
        pids.map(|p| tree_counter(&s.dir, p, "twinpage_daemon_merged"))
    );
    assert!(agree, "the daemon counts references the agents no longer hold");
    for _ in 0..2 {
        eprintln!("{}", finish_twin(kids.0.remove(1)).trim());
    }
    assert!(wait_until(Duration::from_secs(5), || daemon_empty(&s.dir, d)), "store not empty after the agents exited");
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// A merged page written in place while the link to twinpaged is stalled,
/// and the link then broken: the store page under it stays retired across
/// the new link (`Core::retired_orphans`, claimed and retired over it), so
/// the daemon never hands it out again and a later discard of the page
/// reads zeros, never another merge's bytes.
///
/// An in-process engine reaches the daemon through a relay that holds the
/// first `Scan` it sees after being armed and then cuts the connection
/// (the agent gives up after `link::TIMEOUT`, reconnects and resumes while
/// the daemon still has the old connection open: the daemon shuts it). While the scanner waits for
/// the daemon it holds the region's lock, so a write to a merged page
/// waits past the fault thread's 200 ms and the kernel copies the page in
/// place, inside its store mapping.
#[test]
fn a_page_written_in_place_while_the_link_is_down_keeps_its_store_page_from_reuse() {
    use std::sync::atomic::{AtomicU8, Ordering};
    use twinpage::broker::proto::Msg;
    let (Some(e), Some(bin)) = (common::engine(), common::procs::daemon_bin()) else { return };
    let dir = common::tempdir("retired-orphan");
    let _daemon = Kids(vec![start_daemon(&bin, &dir, &[], "warn")]);
    let relay_sock = dir.join("relay.sock");
    // 0: pass; 1: armed (hold the next Scan); 2: holding one; 3: pass again.
    let mode = Arc::new(AtomicU8::new(0));
    let judge_mode = mode.clone();
    frame_relay(
        &relay_sock,
        dir.join("twinpaged.sock"),
        || (),
        move |_, dir, msg, send| {
            if dir == "->"
                && matches!(msg, Msg::Scan { .. })
                && judge_mode.compare_exchange(1, 2, Ordering::SeqCst, Ordering::SeqCst).is_ok()
            {
                // Held until the agent gives up on it, then the connection goes.
                std::thread::sleep(twinpage::link::TIMEOUT + Duration::from_secs(1));
                judge_mode.store(3, Ordering::SeqCst);
                return false;
            }
            send()
        },
    );
    common::flat_out(&e);
    e.set_daemon(Some(twinpage::link::DaemonConfig { socket: relay_sock, domain: None }));
    e.start().unwrap();
    assert!(wait_until(Duration::from_secs(10), || e.daemon_connected()), "no link to twinpaged");

    // Ten pages of seed 42 merge through the daemon; ten of changing
    // content keep the scanner asking it.
    let m = common::Mem::anon(20);
    for i in 0..10 {
        m.fill(i, 42);
    }
    e.register(m.addr, m.len).unwrap();
    assert!(wait_until(Duration::from_secs(10), || e.stats().twinpage_merging_pages == 10), "{:?}", e.stats());
    let mut round = 0u64;
    mode.store(1, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(10), || {
            round += 1;
            (10..20).for_each(|i| m.fill(i, 1000 + round * 20 + i as u64));
            mode.load(Ordering::SeqCst) == 2
        }),
        "the scanner sent no Scan"
    );
    std::thread::sleep(Duration::from_millis(100));
    m.write_u64(4, 0, 0x7777_7777);
    assert!(wait_until(Duration::from_secs(10), || mode.load(Ordering::SeqCst) == 3), "the relay never let go");
    assert!(wait_until(Duration::from_secs(10), || e.daemon_connected()), "no new link to twinpaged");
    // The new link took over the old one's references, and the daemon
    // counts exactly the nine pages still merged. Before, the daemon still
    // served the old connection (the relay held it) when the agent resumed,
    // refused the resume, and kept the old references parked (ten, page 4's
    // too), the store pages with them, until the process exited.
    let daemon_pid = _daemon.0[0].id();
    let counted = || {
        let c = common::procs::tree_counters(&dir, daemon_pid);
        c.get("pages_shared").copied().unwrap_or(0) + c.get("pages_sharing").copied().unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(5), || e.stats().twinpage_merging_pages == 9 && counted() == 9),
        "the daemon counts {} merged pages, the agent {}",
        counted(),
        e.stats().twinpage_merging_pages
    );
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    let s = e.stats();
    assert_eq!(s.twinpage_cow_in_place, 1, "page 4 was not written in place: {s:?}");
    assert_eq!(m.read_u64(4, 0), 0x7777_7777);

    // The range leaves twinpage (page 4 stays in its store mapping); pages
    // merged since take other store pages, so the discard reads zeros.
    e.unregister(m.addr, m.len).unwrap();
    common::discard_reads_zeros_after_other_merges(&e, m, 4);
    let _ = std::fs::remove_dir_all(&dir);
}
