//! Threads twinpage starts inside a host process, and the memory they run
//! on: the stack of each and the glibc arena heap it allocates from are
//! listed as twinpage's own (`own.rs`) while it runs, so merge-any
//! leaves them out. Such memory changes with every call twinpage makes and
//! would show in the program's counters; the heap matters most, the fault
//! thread serves the write faults of merged pages, so a merged page in its
//! own heap would be a write it waits on itself for ever.

use std::io;
use std::thread::JoinHandle;

use crate::own::OwnMemory;
use crate::sys::thread::current_stack;

/// The name of an engine's scanning thread (twinpaged's advisor measures it).
pub const SCAN_THREAD: &str = "twinpage-scan";

/// glibc's reservation for one heap of a thread arena (`HEAP_MAX_SIZE`: twice
/// the largest mmap threshold, 32 MiB on 64-bit), aligned to its size, so a
/// heap is found from any address in it.
const ARENA_HEAP: usize = 64 << 20;

/// Starts a named thread whose stack and arena heap are known to
/// `own::ranges` from before this returns until the thread ends.
pub fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> io::Result<JoinHandle<T>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new().name(name.into()).spawn(move || {
        let _stack = current_stack().map(|(s, e)| OwnMemory::add(s, e));
        let _heap = current_arena_heap().map(|(s, e)| OwnMemory::add(s, e));
        let _ = tx.send(());
        f()
    })?;
    // Registration may come right after this (merge-any at the engine's
    // start): the ranges are known by then.
    let _ = rx.recv();
    Ok(handle)
}

/// utime + stime of a `/proc/<pid>[/task/<tid>]/stat` text, in ns.
pub fn stat_cpu_ns(stat: &str) -> Option<u64> {
    // The fields after the command name (which may hold spaces) in
    // parentheses start at field 3 (state); utime is field 14, stime 15.
    let f: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = crate::sys::clock_ticks_per_second();
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

/// The glibc arena heap this thread allocates from, found from a probe
/// allocation: a thread keeps its arena for life. `None` for the main
/// arena (the brk `[heap]`, which merge-any leaves out anyway), or when the
/// allocation is not in an aligned heap (another allocator).
fn current_arena_heap() -> Option<(usize, usize)> {
    // Larger than glibc's per-thread cache serves (1032 bytes): a small
    // probe could get back a chunk of another arena that this thread freed
    // (the spawning thread's closure, for one), a large one comes from
    // this thread's arena.
    let probe: Vec<u8> = Vec::with_capacity(4096);
    let at = probe.as_ptr() as usize;
    drop(probe);
    let base = at & !(ARENA_HEAP - 1);
    let vmas = crate::maps::vmas_in(at, at + 1).ok()?;
    let vma = vmas.iter().find(|v| v.start <= at && at < v.end)?;
    (vma.start == base && vma.path.is_empty()).then_some((base, base + ARENA_HEAP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawned_threads_stack_and_heap_are_known_while_it_runs() {
        let local = 0u8;
        let here = &local as *const u8 as usize;
        let known = |a: usize| crate::own::ranges().iter().any(|&(s, e)| (s..e).contains(&a));
        assert!(!known(here), "the test's own thread is not twinpage's");
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = spawn("own-test", move || {
            let local = 0u8;
            let heap = vec![7u8; 2048];
            tx.send((&local as *const u8 as usize, heap.as_ptr() as usize)).unwrap();
            done_rx.recv().unwrap();
            drop(heap);
        })
        .unwrap();
        let (stack, heap) = rx.recv().unwrap();
        assert!(known(stack), "its stack");
        assert!(known(heap), "its arena heap: {heap:#x} not in {:x?}", crate::own::ranges());
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(!known(stack));
    }
}
