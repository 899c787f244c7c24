//! twinpaged's scan-time advisor: under the daemon `pages_to_scan` is one
//! setting for all its agents, so the advisor steers it there, not in each
//! agent (an agent's own advisor stays out while it is connected).
//!
//! The kernel's advisor decides at the end of each full scan of everything
//! registered. The daemon's memory is its agents' together: a full scan of
//! it ends when every connected agent has finished one since the last
//! decision (an agent that joins counts from its next). The CPU the kernel
//! measures on ksmd is here the sum of the agents' scanning threads
//! (`twinpage-scan`, from `/proc/<pid>/task/*/stat`). The decision itself is
//! the kernel's arithmetic (`advisor`); the daemon's publisher carries
//! the choice to the tree, and each agent takes it from there.

use std::collections::BTreeMap;

use crate::advisor::Advisor;
use crate::statsfs::ProcessEntry;
use crate::tunables::{AdvisorMode, Tunables};

/// The advisor of one twinpaged.
#[derive(Debug, Default)]
pub struct Pacer {
    advisor: Advisor,
    /// Each connected agent's `full_scans` at the last decision.
    marks: BTreeMap<u32, u64>,
    /// The agents' scanning CPU when the advisor started looking (the
    /// agents may have scanned long before).
    base_cpu_ns: u64,
}

impl Pacer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks at the agents (the tree's processes); when they have all
    /// finished a full scan since the last decision, decides again.
    pub fn tick(&mut self, t: &Tunables, processes: &[ProcessEntry]) {
        let agents: Vec<&ProcessEntry> = processes.iter().filter(|p| p.live && p.counter("twinpage_daemon_agents") == 1).collect();
        if t.advisor_mode() != AdvisorMode::ScanTime || agents.is_empty() {
            if t.advisor_mode() != AdvisorMode::ScanTime {
                // Off: the next switch on starts afresh, as the kernel's.
                self.advisor.steer(t, 0);
            }
            self.marks.clear();
            return;
        }
        self.marks.retain(|pid, _| agents.iter().any(|p| p.pid == *pid));
        let scans = |p: &ProcessEntry| p.counter("full_scans");
        let ended = !self.marks.is_empty()
            && self.marks.len() == agents.len()
            && agents.iter().all(|p| self.marks.get(&p.pid).is_some_and(|&m| scans(p) > m));
        if ended || self.marks.is_empty() {
            let cpu_ns: u64 =
                agents.iter().map(|p| crate::threads::cpu_ns(&p.pid.to_string(), &[crate::threads::SCAN_THREAD]).unwrap_or(0)).sum();
            if self.marks.is_empty() {
                self.base_cpu_ns = cpu_ns;
            }
            self.advisor.steer(t, cpu_ns.saturating_sub(self.base_cpu_ns));
            self.marks = agents.iter().map(|p| (p.pid, scans(p))).collect();
            return;
        }
        for p in &agents {
            // A newcomer counts from now; `run=2` set an agent's count back.
            let m = self.marks.entry(p.pid).or_insert_with(|| scans(p));
            *m = (*m).min(scans(p));
        }
    }
}
