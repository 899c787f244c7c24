//! The kernel's scan-time advisor (mm/ksm.c, Linux 6.7+): with
//! `advisor_mode=scan-time`, `pages_to_scan` is chosen again after every
//! full scan so that one full scan takes about `advisor_target_scan_time`
//! seconds, within `advisor_max_cpu` percent of a CPU (measured on the
//! scanning thread, as ksmd measures itself) and at most
//! `advisor_max_pages_to_scan`. The arithmetic is the kernel's, in whole
//! seconds and integer percent, so that both move the same way on the same
//! scans: the new rate is the old one scaled by target/scan time and by a
//! moving average (weight 30%) of how this scan's time compares with the
//! last one's, then bounded by the CPU it would cost (at least 10% of the
//! rate a CPU would allow, at most `advisor_max_cpu`).

use std::time::Instant;

use crate::tunables::{AdvisorMode, Tunables};

/// Weight in percent of the newest change in the moving average.
const EWMA_WEIGHT: u64 = 30;
/// The least CPU percent the advisor plans for.
const MIN_CPU: u64 = 10;

/// The advisor's state between full scans (the kernel's `advisor_ctx`).
#[derive(Debug, Default)]
pub struct Advisor {
    start: Option<Instant>,
    /// The scanning thread's CPU time (ns) at the last decision.
    cpu_ns: u64,
    /// The last scan's time in seconds (0: none yet).
    scan_time: u64,
    /// The moving average of the change, in percent.
    change: u64,
    /// Whether the advisor was on at the last scan's end.
    on: bool,
}

/// CPU time of the calling thread, in ns.
fn thread_cpu_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// What one decision needs, apart from the state.
#[derive(Debug, Clone, Copy)]
pub struct Inputs {
    pub pages_to_scan: u64,
    pub scan_ms: u64,
    pub cpu_ns: u64,
    pub max_cpu: u64,
    pub max_pages: u64,
    pub target_scan_time: u64,
}

impl Advisor {
    /// A full scan ended (and the next begins) on the scanning thread: with
    /// the advisor on, `pages_to_scan` gets its new value.
    pub fn full_scan_ended(&mut self, t: &Tunables) {
        self.steer(t, thread_cpu_ns());
    }

    /// A full scan ended, the scanning having cost `cpu_ns` of CPU in all so
    /// far (one thread's, or the sum of twinpaged's agents' scanners): with
    /// the advisor on, `pages_to_scan` gets its new value.
    pub fn steer(&mut self, t: &Tunables, cpu_ns: u64) {
        let on = t.advisor_mode() == AdvisorMode::ScanTime;
        if !on {
            self.on = false;
            return;
        }
        if !self.on {
            // Just turned on: the kernel starts from a zeroed context.
            *self = Advisor { on: true, ..Advisor::default() };
        }
        let now = Instant::now();
        if let Some(start) = self.start {
            let inputs = Inputs {
                pages_to_scan: u64::from(t.pages_to_scan()),
                scan_ms: now.duration_since(start).as_millis() as u64,
                cpu_ns,
                max_cpu: u64::from(t.advisor_max_cpu()),
                max_pages: t.advisor_max_pages_to_scan(),
                target_scan_time: t.advisor_target_scan_time(),
            };
            let pages = self.decide(inputs);
            t.advise_pages_to_scan(u32::try_from(pages).unwrap_or(u32::MAX));
        }
        self.start = Some(now);
    }

    /// The kernel's computation: the new `pages_to_scan`.
    pub fn decide(&mut self, i: Inputs) -> u64 {
        let scan_time = (i.scan_ms / 1000).max(1);
        let cpu_ms = i.cpu_ns.saturating_sub(self.cpu_ns) / 1_000_000;
        let cpu_percent = (cpu_ms * 100 / (scan_time * 1000)).max(1);
        let last_scan_time = if self.scan_time == 0 { scan_time } else { self.scan_time };
        let factor = (i.target_scan_time * 100 / scan_time).max(1);
        let change = (scan_time * 100 / last_scan_time).max(1);
        let change = ((100 - EWMA_WEIGHT) * self.change + EWMA_WEIGHT * change) / 100;
        let mut pages = i.pages_to_scan * 100 / factor;
        pages = pages * change / 100;
        let per_page_cost = (i.pages_to_scan / cpu_percent).max(1);
        pages = pages.min(per_page_cost * i.max_cpu);
        pages = pages.max(per_page_cost * MIN_CPU);
        pages = pages.min(i.max_pages);
        self.change = change;
        self.scan_time = scan_time;
        self.cpu_ns = i.cpu_ns;
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(pages_to_scan: u64, scan_ms: u64, cpu_ns: u64) -> Inputs {
        Inputs { pages_to_scan, scan_ms, cpu_ns, max_cpu: 70, max_pages: 30000, target_scan_time: 200 }
    }

    #[test]
    fn a_scan_much_faster_than_the_target_slows_down_within_the_cpu_bounds() {
        let mut a = Advisor::default();
        // 1 s scans at 10% CPU, target 200 s: the rate falls, to the CPU floor.
        let mut pts = 5000;
        let mut cpu = 0;
        for _ in 0..5 {
            cpu += 100_000_000;
            let next = a.decide(inputs(pts, 1000, cpu));
            assert!(next <= pts, "{next} > {pts}");
            let per_page_cost = (pts / 10).max(1);
            assert!(next >= per_page_cost * MIN_CPU && next <= per_page_cost * 70, "{next}");
            pts = next;
        }
    }

    #[test]
    fn a_scan_slower_than_the_target_speeds_up_to_the_cpu_cap_and_max_pages() {
        let mut a = Advisor { scan_time: 20, change: 100, cpu_ns: 0, ..Advisor::default() };
        // 20 s scans at 5% CPU against a 10 s target.
        let next = a.decide(Inputs {
            pages_to_scan: 1000,
            scan_ms: 20_000,
            cpu_ns: 1_000_000_000,
            max_cpu: 70,
            max_pages: 30000,
            target_scan_time: 10,
        });
        assert!(next > 1000, "{next}");
        let capped = Advisor::default().decide(Inputs {
            pages_to_scan: 1000,
            scan_ms: 20_000,
            cpu_ns: 1_000_000_000,
            max_cpu: 70,
            max_pages: 1200,
            target_scan_time: 1,
        });
        assert!(capped <= 1200);
    }
}
