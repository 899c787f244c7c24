//! twinpaged with real preloaded processes (tests/programs/twin.c): pages
//! merge across processes, a killed agent's references are dropped and the
//! store pages only it held are freed, a killed daemon leaves its agents
//! running with their data and a restarted one merges again, and domains
//! keep identical pages apart.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::procs::{finish_twin, setup, spawn_ready, start_daemon, tree_attr, tree_counter, tree_counters, Kids, Setup};
use common::wait_until;

const PAGE: u64 = 4096;

/// Starts `twin SEED COMMON PAIRS WRITES` preloaded, and waits for READY.
fn start_twin(s: &Setup, args: [u64; 4], domain: Option<&str>) -> Child {
    let mut cmd = s.twin(args, 0);
    cmd.env("TWINPAGE_LOG", "info");
    if let Some(d) = domain {
        cmd.env("TWINPAGE_DOMAIN", d);
    }
    spawn_ready(&mut cmd)
}

#[test]
fn pages_merge_across_processes_and_a_killed_agent_is_forgotten() {
    let Some(s) = setup("daemon-cross") else { return };
    let (common, pairs) = (1024u64, 256u64);
    let mut kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &[], "info")]);
    let d = kids.0[0].id();
    kids.0.push(start_twin(&s, [7, common, pairs, 0], None));
    kids.0.push(start_twin(&s, [7, common, pairs, 0], None));
    let (a, b) = (kids.0[1].id(), kids.0[2].id());

    // Common pages are unique within each process: only sharing across the
    // two can merge them. Each process's pairs merge within itself.
    let all = common + 2 * pairs;
    let t = Instant::now();
    // Each process publishes its own counters (at most every 50 ms): wait
    // for the daemon's too, not only the agents'.
    let merged = wait_until(Duration::from_secs(30), || {
        tree_counter(&s.dir, a, "twinpage_daemon_merged") == all
            && tree_counter(&s.dir, b, "twinpage_daemon_merged") == all
            && tree_counter(&s.dir, d, "pages_sharing") == common + 2 * pairs
    });
    let (ca, cb, cd) = (tree_counters(&s.dir, a), tree_counters(&s.dir, b), tree_counters(&s.dir, d));
    eprintln!("merged in {:.2} s\nagent a {ca:?}\nagent b {cb:?}\ndaemon {cd:?}", t.elapsed().as_secs_f64());
    assert!(merged, "not every page merged through the daemon");
    assert_eq!(cd["pages_shared"], common + 2 * pairs, "store pages: one per common page, one per pair of each");
    assert_eq!(cd["pages_sharing"], common + 2 * pairs);
    assert_eq!(cd["twinpage_store_bytes"], (common + 2 * pairs) * PAGE);
    assert_eq!(ca["pages_sharing"] + cb["pages_sharing"], 0, "no local merges: everything went through the daemon");
    assert!(wait_until(Duration::from_secs(2), || tree_attr(&s.dir, "pages_sharing") == common + 2 * pairs));
    for pid in [a, b] {
        let mp: u64 = std::fs::read_to_string(s.dir.join(format!("proc/{pid}/ksm_merging_pages"))).unwrap().trim().parse().unwrap();
        assert_eq!(mp, all, "ksm_merging_pages of {pid}");
    }

    // kill -9 of one agent: its references go, the store pages only it held
    // (its pairs) are freed, and the counts agree with what remains.
    let mut ka = kids.0.remove(1);
    ka.kill().unwrap();
    ka.wait().unwrap();
    let t = Instant::now();
    let freed = wait_until(Duration::from_secs(5), || tree_counter(&s.dir, d, "twinpage_store_bytes") == (common + pairs) * PAGE);
    let cd = tree_counters(&s.dir, d);
    eprintln!("after kill -9 of {a} ({:.2} s): daemon {cd:?}", t.elapsed().as_secs_f64());
    assert!(freed, "store pages only the killed process held were not freed");
    assert_eq!((cd["pages_shared"], cd["pages_sharing"]), (common + pairs, pairs));
    assert_eq!(cd["pages_shared"] + cd["pages_sharing"], tree_counter(&s.dir, b, "twinpage_daemon_merged"));
    assert_eq!(cd["twinpage_daemon_agents"], 1);

    // The last agent leaves: the store is empty.
    let kb = kids.0.remove(1);
    finish_twin(kb);
    assert!(wait_until(Duration::from_secs(5), || tree_counter(&s.dir, d, "twinpage_store_bytes") == 0
        && tree_counter(&s.dir, d, "twinpage_daemon_agents") == 0));
    assert_eq!(tree_counter(&s.dir, d, "pages_shared"), 0);
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
fn a_killed_daemon_leaves_agents_running_and_a_new_one_merges_again() {
    let Some(s) = setup("daemon-kill") else { return };
    let mut kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &[], "info")]);
    kids.0.push(start_twin(&s, [11, 512, 64, 1], None));
    kids.0.push(start_twin(&s, [11, 512, 64, 1], None));
    let (a, b) = (kids.0[1].id(), kids.0[2].id());
    assert!(wait_until(Duration::from_secs(30), || {
        tree_counter(&s.dir, a, "twinpage_daemon_merged") > 500 && tree_counter(&s.dir, b, "twinpage_daemon_merged") > 500
    }));

    // kill -9 mid-work: both agents are writing and merging flat out.
    let mut d = kids.0.remove(0);
    d.kill().unwrap();
    d.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || tree_counter(&s.dir, a, "twinpage_daemon_agents") == 0
            && tree_counter(&s.dir, b, "twinpage_daemon_agents") == 0),
        "agents did not notice the daemon's death"
    );
    // They run on (writing, breaking sharing, merging their own pairs locally).
    std::thread::sleep(Duration::from_secs(2));
    let ca = tree_counters(&s.dir, a);
    eprintln!("alone after the daemon died: {ca:?}");
    assert!(ca["twinpage_daemon_merged"] > 0, "pages merged through the dead daemon stay merged");

    // A new daemon: both reconnect and cross-process merging resumes for a
    // newcomer with the same content.
    kids.0.insert(0, start_daemon(&s.daemon, &s.dir, &[], "info"));
    let d2 = kids.0[0].id();
    assert!(
        wait_until(Duration::from_secs(5), || tree_counter(&s.dir, a, "twinpage_daemon_agents") == 1
            && tree_counter(&s.dir, b, "twinpage_daemon_agents") == 1),
        "agents did not reconnect"
    );
    kids.0.push(start_twin(&s, [11, 512, 64, 0], None));
    kids.0.push(start_twin(&s, [11, 512, 64, 0], None));
    let (c, e) = (kids.0[3].id(), kids.0[4].id());
    let resumed = wait_until(Duration::from_secs(30), || {
        tree_counter(&s.dir, d2, "pages_sharing") >= 512 + 2 * 64
            && tree_counter(&s.dir, c, "twinpage_daemon_merged") > 0
            && tree_counter(&s.dir, e, "twinpage_daemon_merged") > 0
    });
    eprintln!("new daemon {:?}\nnewcomer {:?}", tree_counters(&s.dir, d2), tree_counters(&s.dir, c));
    assert!(resumed, "the restarted daemon did not merge the newcomers' pages");

    // Everybody's data is intact.
    for _ in 0..4 {
        let k = kids.0.remove(1);
        eprintln!("{}", finish_twin(k).trim());
    }
    assert!(
        wait_until(Duration::from_secs(5), || tree_counter(&s.dir, d2, "twinpage_store_bytes") == 0),
        "store not empty after all agents left"
    );
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
fn domains_never_share() {
    let Some(s) = setup("daemon-domains") else { return };
    let mut kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &[], "info")]);
    let d = kids.0[0].id();
    // Identical content, no duplicates within a process: only sharing across
    // processes could merge anything.
    kids.0.push(start_twin(&s, [5, 1024, 0, 0], Some("red")));
    kids.0.push(start_twin(&s, [5, 1024, 0, 0], Some("blue")));
    let (red, blue) = (kids.0[1].id(), kids.0[2].id());
    let scanned = wait_until(Duration::from_secs(20), || {
        [red, blue].iter().all(|&p| tree_counter(&s.dir, p, "full_scans") >= 20 && tree_counter(&s.dir, p, "twinpage_daemon_agents") == 1)
    });
    assert!(scanned, "agents did not connect and scan");
    assert_eq!(tree_counter(&s.dir, d, "pages_shared"), 0, "pages were shared across domains");
    assert_eq!(tree_counter(&s.dir, red, "twinpage_daemon_merged") + tree_counter(&s.dir, blue, "twinpage_daemon_merged"), 0);

    // The same content in the same domain merges: the setup could merge.
    kids.0.push(start_twin(&s, [5, 1024, 0, 0], Some("red")));
    let red2 = kids.0[3].id();
    assert!(wait_until(Duration::from_secs(30), || tree_counter(&s.dir, red2, "twinpage_daemon_merged") == 1024));
    assert_eq!(tree_counter(&s.dir, blue, "twinpage_daemon_merged"), 0);
    assert!(wait_until(Duration::from_secs(2), || tree_counter(&s.dir, d, "pages_sharing") == 1024));
    for _ in 0..3 {
        finish_twin(kids.0.remove(1));
    }
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
fn run_2_unmerges_daemon_merges_and_empties_the_store() {
    let Some(s) = setup("daemon-run2") else { return };
    let mut kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &[], "info")]);
    let d = kids.0[0].id();
    kids.0.push(start_twin(&s, [9, 512, 32, 0], None));
    kids.0.push(start_twin(&s, [9, 512, 32, 0], None));
    let (a, b) = (kids.0[1].id(), kids.0[2].id());
    let all = 512 + 64;
    assert!(wait_until(Duration::from_secs(30), || {
        tree_counter(&s.dir, a, "twinpage_daemon_merged") == all && tree_counter(&s.dir, b, "twinpage_daemon_merged") == all
    }));
    // run=2 written to the tree reaches every agent: each gives its pages
    // private copies and releases them; the daemon frees the whole store.
    std::fs::write(s.dir.join("kernel/mm/ksm/run"), "2\n").unwrap();
    let empty = wait_until(Duration::from_secs(10), || {
        tree_counter(&s.dir, d, "twinpage_store_bytes") == 0
            && tree_counter(&s.dir, a, "twinpage_daemon_merged") == 0
            && tree_counter(&s.dir, b, "twinpage_daemon_merged") == 0
    });
    eprintln!("after run=2: daemon {:?}", tree_counters(&s.dir, d));
    assert!(empty, "run=2 left pages merged or store pages allocated");
    assert_eq!(tree_counter(&s.dir, d, "pages_shared"), 0);
    std::fs::write(s.dir.join("kernel/mm/ksm/run"), "1\n").unwrap();
    assert!(wait_until(Duration::from_secs(30), || tree_counter(&s.dir, a, "twinpage_daemon_merged") == all), "run=1 did not merge again");
    for _ in 0..2 {
        finish_twin(kids.0.remove(1));
    }
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// Anonymous memory of `pid` in KiB (`RssAnon` in its status).
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn agents_that_leave_take_their_memory_with_them() {
    let Some(s) = setup("daemon-rss") else { return };
    let kids = Kids(vec![start_daemon(&s.daemon, &s.dir, &[], "warn")]);
    let d = kids.0[0].id();
    std::thread::sleep(Duration::from_millis(500));
    let base = rss_anon_kib(d);
    // Six agents at a time, each on a thread of the daemon's: with glibc's
    // default arenas, 4-17 MB stayed after they left (measured).
    let mut after = Vec::new();
    for round in 0..4u64 {
        let twins: Vec<Child> = (0..6)
            .map(|_| {
                let mut cmd = s.twin([round % 3, 8192, 2048, 1], 20);
                cmd.env("TWINPAGE_LOG", "warn");
                spawn_ready(&mut cmd)
            })
            .collect();
        let twins = Kids(twins);
        assert!(
            wait_until(Duration::from_secs(30), || tree_counter(&s.dir, d, "pages_sharing") >= 8192),
            "round {round}: the agents did not merge through the daemon"
        );
        let mut twins = twins;
        for t in twins.0.drain(..) {
            finish_twin(t);
        }
        assert!(wait_until(Duration::from_secs(10), || tree_counter(&s.dir, d, "twinpage_daemon_agents") == 0
            && tree_counter(&s.dir, d, "twinpage_store_bytes") == 0));
        std::thread::sleep(Duration::from_millis(300));
        after.push(rss_anon_kib(d));
    }
    eprintln!("twinpaged RssAnon: {base} kB at start, {after:?} kB after each round");
    assert!(after.iter().all(|&a| a <= base + 3072), "twinpaged kept the memory of agents that left: {base} -> {after:?} kB");
    drop(kids);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// Two twinpaged started at once on one tree: one serves, the other stops
/// before it publishes or binds anything and says which socket is taken.
/// Before, both found no socket and both published; the loser stopped at
/// its bind ("Address already in use"), or, between the winner's bind and
/// listen, could take the winner's socket for a stale one and remove it.
#[test]
fn of_two_daemons_started_at_once_one_serves_and_the_other_says_why_it_stops() {
    use std::process::{Command, Stdio};
    let Some(bin) = common::procs::daemon_bin() else { return };
    for round in 0..5 {
        let dir = common::tempdir(&format!("two-daemons-{round}"));
        let spawn = || Command::new(&bin).arg("--dir").arg(&dir).env("TWINPAGE_LOG", "warn").stderr(Stdio::piped()).spawn().unwrap();
        let mut kids = Kids(vec![spawn(), spawn()]);
        let mut stopped = None;
        assert!(
            wait_until(Duration::from_secs(10), || {
                stopped = kids.0.iter_mut().position(|c| c.try_wait().unwrap().is_some());
                stopped.is_some()
            }),
            "round {round}: neither daemon stopped"
        );
        let loser = kids.0.remove(stopped.unwrap());
        let status = loser.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&status.stderr);
        assert!(!status.status.success(), "round {round}: the daemon that stopped succeeded");
        assert!(said.contains("another twinpaged is running on"), "round {round}: {said}");
        std::thread::sleep(Duration::from_millis(300));
        assert!(kids.0[0].try_wait().unwrap().is_none(), "round {round}: the other daemon stopped too");
        let sock = dir.join("twinpaged.sock");
        assert!(
            wait_until(Duration::from_secs(10), || std::os::unix::net::UnixStream::connect(&sock).is_ok()),
            "round {round}: no daemon listens"
        );
        drop(kids);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
