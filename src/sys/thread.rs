//! The calling thread's stack, which nix does not wrap, and another
//! thread's CPU time, whose clock id nix builds only for the caller.

/// This thread's stack, `[start, end)`, from glibc's record of it.
pub(crate) fn current_stack() -> Option<(usize, usize)> {
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

/// The CPU time thread `tid` of this process has used, in nanoseconds;
/// `None` once it is gone (or `tid` is no thread of this process).
pub(crate) fn cpu_time_ns(tid: i32) -> Option<u64> {
    // The kernel's clock id for one thread's CPU time (MAKE_THREAD_CPUCLOCK
    // in include/linux/posix-timers_types.h: the id inverted, shifted by 3,
    // per-thread bit 4, the scheduler's clock 2), as glibc's
    // pthread_getcpuclockid builds it from a pthread_t, which the fault
    // thread does not have: a fault names its thread by id only.
    // A clock of a thread outside this process (or of none) is refused with
    // EINVAL.
    let clock = nix::time::ClockId::from_raw(((!tid) << 3) | 4 | 2);
    let t = nix::time::clock_gettime(clock).ok()?;
    Some(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gettid() -> i32 {
        // SAFETY: gettid(2) takes no arguments and cannot fail.
        unsafe { libc::gettid() }
    }

    fn own_clock() -> u64 {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    }

    #[test]
    fn a_threads_cpu_time_moves_only_while_it_runs() {
        let me = gettid();
        let (a, b, c) = (cpu_time_ns(me).unwrap(), own_clock(), cpu_time_ns(me).unwrap());
        assert!(a <= b && b <= c, "{a} {b} {c}: not this thread's clock");

        let (tx, rx) = std::sync::mpsc::channel();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let parked = std::thread::spawn(move || {
            tx.send(gettid()).unwrap();
            let _ = wait.recv();
            let end = std::time::Instant::now() + std::time::Duration::from_millis(20);
            while std::time::Instant::now() < end {
                std::hint::spin_loop();
            }
        });
        let tid = rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let t0 = cpu_time_ns(tid).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(cpu_time_ns(tid), Some(t0), "a blocked thread's CPU time moved");
        go.send(()).unwrap();
        let ran = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            cpu_time_ns(tid).is_some_and(|t| t > t0 + 5_000_000)
        });
        assert!(ran, "a running thread's CPU time did not move");
        parked.join().unwrap();
        // Joined once it cleared its tid; the kernel lets the task go just after.
        let gone = (0..5000).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            cpu_time_ns(tid).is_none()
        });
        assert!(gone, "an exited thread still has a clock");
        assert_eq!(cpu_time_ns(1), None, "init is no thread of this process");
    }
}
