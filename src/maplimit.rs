//! `vm.max_map_count` for `twinpaged`: what its agents' merges need of it,
//! and raising it.
//!
//! Each merged page that stands alone costs its process one mapping (one
//! file page cannot appear at two offsets of one mapping), and the kernel
//! caps a process at `vm.max_map_count`; kernel KSM needs none. At Debian's
//! 65530 a 1 GiB guest of scattered duplicates merges about half of what
//! ksmd merges. So the daemon, when it runs as root, raises the limit to what
//! its agents' registered memory can need (never lowers it), and says so
//! once; otherwise it says once, when merges are held back, what fixes it.

use std::collections::HashMap;
use std::io;

use crate::map_budget::MapBudget;
use crate::statsfs::{ProcessEntry, Tree};

const SYSCTL: &str = "/proc/sys/vm/max_map_count";

/// What a process can need: its mappings now plus one for every page it
/// registered (each could end up a merge of its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// Mappings the process can need.
    pub mappings: u64,
    /// The `vm.max_map_count` that leaves twinpage room for all of it.
    pub max_map_count: u64,
    pub pid: u32,
    pub comm: String,
    pub registered: u64,
}

/// The largest need among `processes`, if any registered memory, counting
/// each process's mappings as they are now.
pub fn need(processes: &[ProcessEntry]) -> Option<Need> {
    need_from(processes, |p| p.counter("twinpage_map_count"))
}

/// [`need`], with a process's mappings before merging given by `maps`: the
/// mappings its merges added are already among the "one for every page it
/// registered".
fn need_from(processes: &[ProcessEntry], maps: impl Fn(&ProcessEntry) -> u64) -> Option<Need> {
    processes
        .iter()
        .filter(|p| p.live)
        .map(|p| {
            let registered = p.counter("twinpage_pages_registered");
            let maps = maps(p);
            let want = usize::try_from(maps + registered).unwrap_or(usize::MAX / 2);
            Need {
                mappings: want as u64,
                max_map_count: MapBudget::max_map_count_for(want) as u64,
                pid: p.pid,
                comm: p.comm.clone(),
                registered,
            }
        })
        .filter(|n| n.registered > 0)
        .max_by_key(|n| n.max_map_count)
}

impl Need {
    /// Whether `vm.max_map_count=now` leaves twinpage too little room for it.
    pub fn exceeds(&self, now: u64) -> bool {
        MapBudget::limit_for(usize::try_from(now).unwrap_or(usize::MAX)) < usize::try_from(self.mappings).unwrap_or(usize::MAX)
    }
}

/// Pages held back by the limit in the processes' last full scans.
pub fn held_back(processes: &[ProcessEntry]) -> u64 {
    processes.iter().filter(|p| p.live).map(|p| p.counter("twinpage_pages_held_back")).sum()
}

pub fn read() -> io::Result<u64> {
    std::fs::read_to_string(SYSCTL)?.trim().parse().map_err(|_| io::Error::other(format!("{SYSCTL}: not a number")))
}

/// The daemon's side: called every few seconds with the tree.
#[derive(Debug)]
pub struct Keeper {
    /// `--keep-max-map-count`: never write the sysctl.
    keep: bool,
    /// A raise failed (not root): only advise from then on.
    cannot: bool,
    advised: bool,
    /// The fewest mappings each running process (pid, start time) was seen
    /// with: its count before (most of) its merges. Counting its mappings
    /// now would count every merge twice, and raise the limit again and
    /// again while it merges.
    base: HashMap<(u32, u64), u64>,
}

impl Keeper {
    pub fn new(keep: bool) -> Keeper {
        Keeper { keep, cannot: false, advised: false, base: HashMap::new() }
    }

    /// The largest need among `processes`, each counted from the fewest
    /// mappings it was seen with.
    fn need(&mut self, processes: &[ProcessEntry]) -> Option<Need> {
        let key = |p: &ProcessEntry| (p.pid, p.counter("starttime"));
        self.base.retain(|k, _| processes.iter().any(|p| p.live && key(p) == *k));
        for p in processes.iter().filter(|p| p.live) {
            let maps = p.counter("twinpage_map_count");
            self.base.entry(key(p)).and_modify(|b| *b = (*b).min(maps)).or_insert(maps);
        }
        need_from(processes, |p| self.base.get(&key(p)).copied().unwrap_or(0))
    }

    /// Raises the limit to what the agents under `tree` can need, or advises
    /// (once) when merges are held back and it may not.
    pub fn tick(&mut self, tree: &Tree) {
        let Ok(processes) = tree.processes() else { return };
        let Ok(now) = read() else { return };
        let need = self.need(&processes);
        log::debug!("twinpaged: vm.max_map_count {now}, need {need:?}, held back {}", held_back(&processes));
        let Some(need) = need.filter(|n| n.exceeds(now)) else { return };
        if !self.keep && !self.cannot {
            match std::fs::write(SYSCTL, need.max_map_count.to_string()) {
                Ok(()) => {
                    log::info!(
                        "twinpaged: raised vm.max_map_count from {now} to {}: pid {} ({}) registered {} pages, and each merged page that stands alone costs it a mapping (kernel KSM needs none); left so at exit (--keep-max-map-count keeps the host's value)",
                        need.max_map_count,
                        need.pid,
                        need.comm,
                        need.registered
                    );
                    return;
                }
                Err(e) => {
                    self.cannot = true;
                    log::info!("twinpaged: cannot raise vm.max_map_count ({e}); merges it holds back will be reported");
                }
            }
        }
        let held = held_back(&processes);
        if held > 0 && !self.advised {
            self.advised = true;
            log::warn!(
                "twinpaged: {held} pages ({} MiB) are not merged because of vm.max_map_count={now}; `sysctl -w vm.max_map_count={}` lets them merge",
                (held * crate::sys::PAGE_SIZE as u64) >> 20,
                need.max_map_count
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_asked_limit_leaves_twinpage_the_room_it_needs() {
        for want in [1usize, 5000, 65530, 262_144 + 1000, 3_000_000] {
            let max = MapBudget::max_map_count_for(want);
            assert!(MapBudget::limit_for(max) >= want, "{want}: {max} gives {}", MapBudget::limit_for(max));
            assert_eq!(max % 65536, 0);
        }
    }

    #[test]
    fn a_small_process_does_not_move_the_limit() {
        let need = |mappings: u64| Need { mappings, max_map_count: 0, pid: 1, comm: String::new(), registered: mappings };
        assert!(!need(612).exceeds(65530), "a few hundred pages must not raise Debian's default");
        assert!(need(60_000).exceeds(65530));
        assert!(!need(60_000).exceeds(MapBudget::max_map_count_for(60_000) as u64));
    }

    fn process(pid: u32, maps: i128, registered: i128) -> ProcessEntry {
        let counters = [("starttime", 7), ("twinpage_map_count", maps), ("twinpage_pages_registered", registered)];
        ProcessEntry {
            pid,
            comm: "qemu".into(),
            name: "guest".into(),
            stat: None,
            live: true,
            stopped: false,
            counters: counters.iter().map(|&(n, v)| (n.to_string(), v)).collect(),
            tunables: Vec::new(),
        }
    }

    #[test]
    fn merging_does_not_move_the_need_of_a_process() {
        let mut k = Keeper::new(true);
        let before = k.need(&[process(10, 1000, 262_144)]).unwrap();
        assert_eq!(before.mappings, 263_144);
        // Its merges added 50000 mappings, already among the registered pages.
        let merging = k.need(&[process(10, 51_000, 262_144)]).unwrap();
        assert_eq!(merging, before);
        // Counted from now, the need would have grown with every merge.
        assert_eq!(need(&[process(10, 51_000, 262_144)]).unwrap().mappings, 313_144);
        // A new process with the same pid (another start time) starts again.
        let mut again = process(10, 51_000, 262_144);
        again.counters.insert("starttime".into(), 8);
        assert_eq!(k.need(&[again]).unwrap().mappings, 313_144);
    }
}
