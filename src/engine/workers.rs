//! The engine's two threads: the scanner (its pacing, naps and kicks, and
//! `twinpage_merge_mode` taking back what a stricter mode disallows) and the
//! fault thread (first writes to merged pages, and the safety net that
//! releases every other write fault).

use std::time::Duration;

use super::Inner;
use crate::primitive::Ordering;
use crate::scan;
use crate::state::{self, Shared};
use crate::sys::uffd::{self, UffdMsg};
use crate::sys::PAGE_SIZE;
use crate::unmerge;
use crate::warn_once;

/// At sleep_millisecs=0, an idle scanner (no change in a whole scan) uses
/// one part in this many of the time.
const IDLE_SHARE: u32 = 5;

/// The longest a scanner rests at sleep_millisecs=0.
const MAX_REST: Duration = Duration::from_millis(100);

/// At sleep_millisecs>0, an idle scanner wakes this many times less often
/// (and scans as many times the pages each time).
const IDLE_COALESCE: u64 = 4;

/// When `twinpage_merge_mode` is stricter than the loosest mode pages were
/// merged under, unmerges what it no longer allows; returns whether it did.
/// A stricter mode takes back what it disallows whatever `run` says: the
/// operator asked for those pages not to be shared.
pub(super) fn enforce_merge_mode(sh: &state::Shared) -> bool {
    let now = sh.tunables().merge_mode();
    {
        let mut core = sh.core().lock();
        if !core.merged_looser_than(now) {
            return false;
        }
    }
    unmerge::unmerge_disallowed(sh, now);
    // Batches that ran meanwhile merged under `now` at the loosest.
    sh.core().lock().merge_mode_enforced(now);
    state::publish(sh);
    true
}

/// Sleeps for `ms` or until kicked.
fn nap(inner: &Inner, since: u64, ms: u64) {
    nap_for(inner, since, Duration::from_millis(ms));
}

/// The kicks so far: taken before the scanner reads the tunables, so that a
/// kick after that read ends the nap that follows it.
fn kicks(inner: &Inner) -> u64 {
    *inner.wakeup.generation.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sleeps for `d`, or until kicked after [`kicks`] returned `since`. A kick
/// between the scanner's look at the tunables and its nap is not lost: a
/// program that writes `run=1` right after the engine started (ksm_tests
/// does) waited a whole second for the scan to begin, one run in three.
fn nap_for(inner: &Inner, since: u64, d: Duration) {
    let w = &inner.wakeup;
    let g = w.generation.lock().unwrap_or_else(|e| e.into_inner());
    let _ = w.cond.wait_timeout_while(g, d, |g| *g == since && !inner.shutdown.load(Ordering::Relaxed));
}

pub(super) fn scanner_main(inner: &Inner) {
    let sh = &inner.sh;
    let mut unmerged = false;
    let mut next_try = std::time::Instant::now();
    while !inner.shutdown.load(Ordering::Relaxed) {
        let since = kicks(inner);
        let agents = scan::remote::tick(sh, &mut next_try);
        let t = &sh.tunables();
        enforce_merge_mode(sh);
        match t.run() {
            0 => {
                unmerged = false;
                crate::testhook::scanner_naps();
                nap(inner, since, 1000);
                continue;
            }
            2 => {
                if !unmerged {
                    unmerge::unmerge_all(sh);
                    state::publish(sh);
                    unmerged = true;
                }
                crate::testhook::scanner_naps();
                nap(inner, since, 1000);
                continue;
            }
            _ => unmerged = false,
        }
        // Connected to the daemon, pages_to_scan is one budget for all its
        // agents, as ksmd's is for all processes.
        let budget = match t.pages_to_scan() as usize {
            0 => 0,
            p => (p / agents).max(1),
        };
        let sleep = u64::from(t.sleep_millisecs());
        let idle = sh.core().lock().idle();
        // While whole scans change nothing, a sleeping scanner wakes a quarter
        // as often and scans four times the pages: the same pages per second,
        // a quarter of the fixed cost of each wake (the switch, the pagemap
        // read, publishing the counters).
        let coalesce = if idle && sleep > 0 { IDLE_COALESCE } else { 1 };
        let budget = budget.saturating_mul(coalesce as usize);
        let began = std::time::Instant::now();
        if budget > 0 {
            scan::scan_pages(sh, budget);
            state::publish(sh);
        }
        // sleep_millisecs=0 makes ksmd one thread flat out, one core for
        // every process. Agents of one daemon each scan their own process,
        // so each takes its share of that core: it rests (agents - 1) times
        // as long as its round took (wall time, which counts the daemon's
        // work for it too), at most MAX_REST so that a lost daemon or new
        // work is noticed soon. While whole scans change nothing, a
        // scanner runs at a fifth of that: a full scan here is an order of
        // magnitude cheaper than ksmd's, so it still notices a change as
        // soon as ksmd would, and burns no core doing nothing.
        let share = agents as u32 * if idle { IDLE_SHARE } else { 1 };
        if sleep > 0 || budget == 0 {
            nap(inner, since, sleep.max(1) * coalesce);
        } else if share > 1 {
            nap_for(inner, since, (began.elapsed() * (share - 1).min(8191)).min(MAX_REST));
        } else {
            std::thread::yield_now();
        }
    }
}

/// The safety net: a write fault on a page no merge holds is released at
/// once (a merged page's first write gets an anonymous page of its own).
///
/// A fault on a page a merge holds is the merge's to wake, but it may come
/// after the merge's wake: a writer the wake let go can fault again on the
/// protected store page before the merge has left its range. Such faults
/// are kept and woken once no merge holds their page any more; a writer
/// still blocked then faults again and is served as any other.
pub(super) fn fault_main(inner: &Inner) {
    let sh = &inner.sh;
    let mut buf = [UffdMsg::default(); 64];
    let mut held: Vec<usize> = Vec::new();
    // First writes whose region a batch holds: (page, since, writer).
    let mut waiting: Vec<(usize, std::time::Instant, Option<i32>)> = Vec::new();
    let mut pool = crate::merge::cow::CowPool::default();
    while !inner.shutdown.load(Ordering::Relaxed) {
        use std::os::fd::AsFd;
        held.retain(|&page| {
            sh.inflight().holds(page) || {
                let _ = sh.uffd().wake(page, PAGE_SIZE);
                false
            }
        });
        waiting.retain(|&(page, since, writer)| !serve_write(sh, page, since, writer, &mut pool));
        let idle = held.is_empty() && waiting.is_empty();
        match uffd::poll_readable(sh.uffd().as_fd(), if idle { 100 } else { 1 }) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                warn_once!("uffd-poll", "twinpage: polling userfaultfd failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let n = match sh.uffd().read_events(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                warn_once!("uffd-read", "twinpage: reading userfaultfd failed: {e}");
                continue;
            }
        };
        for msg in &buf[..n] {
            if msg.event != uffd::UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let page = (msg.pf_address as usize) & !(PAGE_SIZE - 1);
            let released = if msg.pf_flags & uffd::UFFD_PAGEFAULT_FLAG_WP == 0 {
                // A missing fault: only the pin check registers missing mode,
                // for the length of a merge. One outside a merge is a hole of
                // anonymous memory left in that mode: the zero page is what it
                // would have read.
                sh.inflight().release_stray(page, || {
                    if sh.uffd().zeropage(page, PAGE_SIZE).is_err() {
                        let _ = sh.uffd().wake(page, PAGE_SIZE);
                    }
                })
            } else if sh.inflight().holds(page) {
                false
            } else {
                let now = std::time::Instant::now();
                if !serve_write(sh, page, now, msg.thread(), &mut pool) {
                    waiting.push((page, now, msg.thread()));
                }
                true
            };
            if !released {
                held.push(page);
            }
        }
    }
}

/// Serves a write fault on a protected page that no merge held when it came:
/// a merged page's first write gets an anonymous page (`merge::cow`), any
/// other page is released where it is, and so is a merged page whose region
/// stayed locked for [`cow::MAX_WAIT`](crate::merge::cow::MAX_WAIT) since
/// `since`. False while it should wait for the region's lock.
fn serve_write(sh: &Shared, page: usize, since: std::time::Instant, writer: Option<i32>, pool: &mut crate::merge::cow::CowPool) -> bool {
    use crate::merge::cow::{first_write, FirstWrite, MAX_WAIT};
    match first_write(sh, page, writer, pool) {
        FirstWrite::Done => return true,
        FirstWrite::Busy if since.elapsed() < MAX_WAIT => return false,
        FirstWrite::Busy | FirstWrite::NotMine => {}
    }
    // A merge that began meanwhile wakes its own waiters (this one included).
    sh.inflight().release_stray(page, || {
        let _ = sh.uffd().unprotect(page, PAGE_SIZE);
    });
    true
}
