//! Threads twinpage starts inside a host process, and the stacks they run
//! on. Merge-any (`PR_SET_MEMORY_MERGE`) registers the private anonymous
//! memory of the whole process, as the kernel does; twinpage's own stacks
//! are not the program's memory, change with every call twinpage makes,
//! and would show in the program's counters, so they are left out.

use std::io;
use std::sync::Mutex;
use std::thread::JoinHandle;

/// Stacks of twinpage's live threads: `[start, end)`.
static STACKS: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

/// The name of an engine's scanning thread (twinpaged's advisor measures it).
pub const SCAN_THREAD: &str = "twinpage-scan";

/// Starts a named thread whose stack is known to [`own_stacks`] while it runs.
pub fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> io::Result<JoinHandle<T>> {
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let _mine = current_stack().map(StackEntry::add);
        f()
    })
}

/// utime + stime of a `/proc/<pid>[/task/<tid>]/stat` text, in ns.
pub fn stat_cpu_ns(stat: &str) -> Option<u64> {
    // The fields after the command name (which may hold spaces) in
    // parentheses start at field 3 (state); utime is field 14, stime 15.
    let f: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|&h| h > 0).unwrap_or(100);
    Some(ticks * 1_000_000_000 / hz)
}

/// CPU time so far, in ns, of the threads of process `pid` (`"self"` for
/// this one) named one of `names`, such as [`SCAN_THREAD`]; `None` if no
/// thread has such a name.
pub fn cpu_ns(pid: &str, names: &[&str]) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut found = None;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if names.contains(&comm.trim_end()) {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            *found.get_or_insert(0) += stat_cpu_ns(&stat).unwrap_or(0);
        }
    }
    found
}

/// The stacks of twinpage's threads running now.
pub fn own_stacks() -> Vec<(usize, usize)> {
    STACKS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

struct StackEntry((usize, usize));

impl StackEntry {
    fn add(range: (usize, usize)) -> StackEntry {
        STACKS.lock().unwrap_or_else(|e| e.into_inner()).push(range);
        StackEntry(range)
    }
}

impl Drop for StackEntry {
    fn drop(&mut self) {
        let mut stacks = STACKS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = stacks.iter().position(|r| *r == self.0) {
            stacks.swap_remove(i);
        }
    }
}

/// This thread's stack, from glibc's record of it.
fn current_stack() -> Option<(usize, usize)> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: fills `attr` for the calling thread; destroyed below.
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) } != 0 {
        return None;
    }
    let (mut addr, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: `attr` was initialised by pthread_getattr_np.
    let r = unsafe { libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size) };
    // SAFETY: as above; destroyed once.
    unsafe { libc::pthread_attr_destroy(attr.as_mut_ptr()) };
    (r == 0 && size > 0).then(|| (addr as usize, addr as usize + size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawned_threads_stack_is_known_while_it_runs() {
        let local = 0u8;
        let here = &local as *const u8 as usize;
        assert!(!own_stacks().iter().any(|&(s, e)| (s..e).contains(&here)), "the test's own thread is not twinpage's");
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = spawn("stack-test", move || {
            let local = 0u8;
            tx.send(&local as *const u8 as usize).unwrap();
            done_rx.recv().unwrap();
        })
        .unwrap();
        let inside = rx.recv().unwrap();
        assert!(own_stacks().iter().any(|&(s, e)| (s..e).contains(&inside)));
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(!own_stacks().iter().any(|&(s, e)| (s..e).contains(&inside)));
    }
}
