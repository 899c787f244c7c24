//! `libtwinpage.so`: the LD_PRELOAD agent. Interposers only; every decision
//! is the engine's (`twinpage::Engine`) or the agent's (`agent.rs`).
//!
//! Each interposer ends in the raw system call, never in libc's symbol (which
//! would be this library again). Variadic C prototypes (`prctl`, `ioctl`,
//! `mremap`) are defined with their full fixed argument lists: on x86_64 the
//! System V ABI passes the integer arguments of a variadic call in the same
//! registers as a fixed-argument call.
//!
//! Nothing here may take the host program down: every call into the agent
//! runs under `catch_unwind`, and a panic disables twinpage for the rest of
//! the process (logged once) while the call goes on to the kernel.

mod agent;
mod config;
mod redirect;
mod sysfs;

use std::ffi::{c_int, c_ulong, c_void};

use agent::Agent;

const UFFDIO_REGISTER: c_ulong = twinpage::host::UFFDIO_REGISTER as c_ulong;
const UFFDIO_UNREGISTER: c_ulong = twinpage::host::UFFDIO_UNREGISTER as c_ulong;

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// The agent when it is active and this thread is not inside twinpage already.
fn agent_for(init: bool) -> Option<(&'static Agent, agent::Reentry)> {
    let guard = agent::Reentry::enter()?;
    let a = if init { agent::get_or_init()? } else { agent::get()? };
    Some((a, guard))
}

/// Runs `f` on the agent, catching panics; `None` means: pass the call on.
fn with_agent<R>(init: bool, f: impl FnOnce(&'static Agent) -> Option<R>) -> Option<R> {
    let (a, _guard) = agent_for(init)?;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(a))) {
        Ok(r) => r,
        Err(_) => {
            agent::disable("internal error (panic); twinpage stops merging and the program runs on");
            None
        }
    }
}

fn ret_of(r: std::io::Result<c_int>) -> c_int {
    match r {
        Ok(v) => v,
        Err(e) => {
            set_errno(e.raw_os_error().unwrap_or(libc::EINVAL));
            -1
        }
    }
}

/// A raw system call's result as `-errno` on failure, read at once so that
/// nothing twinpage does afterwards can change it.
fn neg_errno(ret: libc::c_long) -> isize {
    if ret == -1 {
        // SAFETY: errno slot of this thread.
        -(unsafe { *libc::__errno_location() }) as isize
    } else {
        ret as isize
    }
}

/// An mmap-like result (`-errno` on failure) as libc returns it: MAP_FAILED
/// with errno set, or the address.
fn map_ret(r: isize) -> *mut c_void {
    if r < 0 && r > -4096 {
        set_errno(-r as c_int);
        return libc::MAP_FAILED;
    }
    r as *mut c_void
}

/// Turns `-errno` back into libc's convention: -1 with errno set.
fn libc_ret(r: isize) -> c_int {
    if r < 0 {
        set_errno(-r as c_int);
        -1
    } else {
        r as c_int
    }
}

fn raw_madvise(addr: usize, len: usize, advice: c_int) -> c_int {
    // SAFETY: the host program's own madvise call, passed on unchanged.
    neg_errno(unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice as libc::c_long) }) as c_int
}

/// # Safety
/// As `madvise(2)`.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    let addr = addr as usize;
    let init = matches!(advice, libc::MADV_MERGEABLE);
    if let Some(r) = with_agent(init, |a| a.madvise(addr, len, advice, raw_madvise)) {
        return ret_of(r);
    }
    libc_ret(raw_madvise(addr, len, advice) as isize)
}

/// # Safety
/// As `posix_madvise(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    // POSIX_MADV_DONTNEED is a no-op in glibc; the others never discard.
    if advice == libc::POSIX_MADV_DONTNEED {
        return 0;
    }
    // SAFETY: forwarded as given.
    let r = unsafe { madvise(addr, len, advice) };
    if r == 0 {
        0
    } else {
        // SAFETY: errno slot of this thread.
        unsafe { *libc::__errno_location() }
    }
}

fn raw_munmap(addr: usize, len: usize) -> c_int {
    // SAFETY: the host program's own munmap, passed on unchanged.
    neg_errno(unsafe { libc::syscall(libc::SYS_munmap, addr, len) }) as c_int
}

/// # Safety
/// As `munmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    let addr = addr as usize;
    let r = with_agent(false, |a| a.munmap(addr, len, raw_munmap)).unwrap_or_else(|| raw_munmap(addr, len));
    libc_ret(r as isize)
}

/// A lock call of the program's (mlock, mlock2, munlock, mlockall,
/// munlockall), passed on unchanged; on success the engine hears which
/// memory is locked now (`Engine::note_locked`).
fn lock_call(nr: libc::c_long, args: [usize; 3], range: Option<(usize, usize)>, locked: bool) -> c_int {
    // SAFETY: the host program's own call, passed on unchanged.
    let r = neg_errno(unsafe { libc::syscall(nr, args[0], args[1], args[2]) });
    if r == 0 {
        let _ = with_agent(false, |a| {
            a.engine().note_locked(range, locked);
            Some(())
        });
    }
    libc_ret(r)
}

/// # Safety
/// As `mlock(2)`.
#[no_mangle]
pub unsafe extern "C" fn mlock(addr: *const c_void, len: usize) -> c_int {
    lock_call(libc::SYS_mlock, [addr as usize, len, 0], Some((addr as usize, len)), true)
}

/// # Safety
/// As `mlock2(2)`.
#[no_mangle]
pub unsafe extern "C" fn mlock2(addr: *const c_void, len: usize, flags: libc::c_uint) -> c_int {
    lock_call(libc::SYS_mlock2, [addr as usize, len, flags as usize], Some((addr as usize, len)), true)
}

/// # Safety
/// As `munlock(2)`.
#[no_mangle]
pub unsafe extern "C" fn munlock(addr: *const c_void, len: usize) -> c_int {
    lock_call(libc::SYS_munlock, [addr as usize, len, 0], Some((addr as usize, len)), false)
}

/// # Safety
/// As `mlockall(2)`. Memory registered later is seen locked when its
/// registration reads smaps, or at its first pin check.
#[no_mangle]
pub unsafe extern "C" fn mlockall(flags: c_int) -> c_int {
    let current = flags & libc::MCL_CURRENT != 0;
    if !current {
        // SAFETY: the host program's own call, passed on unchanged.
        return libc_ret(neg_errno(unsafe { libc::syscall(libc::SYS_mlockall, flags as libc::c_long) }));
    }
    lock_call(libc::SYS_mlockall, [flags as usize, 0, 0], None, true)
}

/// # Safety
/// As `munlockall(2)`.
#[no_mangle]
pub unsafe extern "C" fn munlockall() -> c_int {
    lock_call(libc::SYS_munlockall, [0; 3], None, false)
}

fn raw_mmap(addr: usize, len: usize, prot: c_int, flags: c_int, fd: c_int, off: i64) -> isize {
    // SAFETY: the host program's own mmap, passed on unchanged.
    neg_errno(unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot as libc::c_long, flags as libc::c_long, fd as libc::c_long, off) })
}

/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: libc::off_t) -> *mut c_void {
    let addr = addr as usize;
    // A forked child of a merge-any parent makes its agent at its first mmap.
    let r = with_agent(agent::merge_any_pending(), |a| a.mmap(addr, len, prot, flags, fd, off, raw_mmap))
        .unwrap_or_else(|| raw_mmap(addr, len, prot, flags, fd, off));
    map_ret(r)
}

/// # Safety
/// As `mmap64(2)` (the same call on x86_64).
#[no_mangle]
pub unsafe extern "C" fn mmap64(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: libc::off_t) -> *mut c_void {
    // SAFETY: forwarded as given.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

fn raw_mremap(old: usize, old_len: usize, new_len: usize, flags: c_int, new_addr: usize) -> isize {
    // SAFETY: the host program's own mremap, passed on unchanged.
    neg_errno(unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags as libc::c_long, new_addr) })
}

/// # Safety
/// As `mremap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mremap(old: *mut c_void, old_len: usize, new_len: usize, flags: c_int, new_addr: *mut c_void) -> *mut c_void {
    let (old, new_addr) = (old as usize, new_addr as usize);
    let r = with_agent(false, |a| a.mremap(old, old_len, new_len, flags, new_addr, raw_mremap))
        .unwrap_or_else(|| raw_mremap(old, old_len, new_len, flags, new_addr));
    map_ret(r)
}

fn raw_mprotect(addr: usize, len: usize, prot: c_int) -> c_int {
    // SAFETY: the host program's own mprotect, passed on unchanged.
    neg_errno(unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot as libc::c_long) }) as c_int
}

/// # Safety
/// As `mprotect(2)`.
#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: usize, prot: c_int) -> c_int {
    let addr = addr as usize;
    let r = with_agent(false, |a| a.mprotect(addr, len, prot, raw_mprotect)).unwrap_or_else(|| raw_mprotect(addr, len, prot));
    libc_ret(r as isize)
}

fn raw_prctl(option: c_int, a2: c_ulong, a3: c_ulong, a4: c_ulong, a5: c_ulong) -> c_int {
    // SAFETY: the host program's own prctl, passed on unchanged.
    neg_errno(unsafe { libc::syscall(libc::SYS_prctl, option as libc::c_long, a2, a3, a4, a5) }) as c_int
}

/// # Safety
/// As `prctl(2)`.
#[no_mangle]
pub unsafe extern "C" fn prctl(option: c_int, a2: c_ulong, a3: c_ulong, a4: c_ulong, a5: c_ulong) -> c_int {
    if option == kernel_compat::abi::PR_SET_MEMORY_MERGE || option == kernel_compat::abi::PR_GET_MEMORY_MERGE {
        let init = (option == kernel_compat::abi::PR_SET_MEMORY_MERGE && a2 != 0) || agent::merge_any_pending();
        if let Some(r) = with_agent(init, |a| Some(a.prctl_memory_merge(option, a2, a3, a4, a5))) {
            return ret_of(r);
        }
    }
    libc_ret(raw_prctl(option, a2, a3, a4, a5) as isize)
}

/// # Safety
/// As `ioctl(2)`.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    let range = |arg: *mut c_void| {
        // SAFETY: for UFFDIO_REGISTER and UFFDIO_UNREGISTER the caller passes
        // a struct uffdio_register or uffdio_range, both starting with the
        // range as two u64 (start, len); a bad pointer faults in the caller's
        // own call as it would in the kernel's copy.
        let (start, len) = unsafe { (*(arg as *const u64), *(arg as *const u64).add(1)) };
        (start as usize, start.saturating_add(len) as usize)
    };
    let handed = req == UFFDIO_REGISTER
        && !arg.is_null()
        && with_agent(false, |a| {
            let (s, e) = range(arg);
            a.host_uffd_register(fd, s, e - s);
            Some(())
        })
        .is_some();
    // SAFETY: the host program's own ioctl, passed on unchanged.
    let r = neg_errno(unsafe { libc::syscall(libc::SYS_ioctl, fd as libc::c_long, req, arg) });
    let released = (handed && r < 0) || (req == UFFDIO_UNREGISTER && r == 0 && !arg.is_null() && agent::handovers_active());
    if released {
        let (s, e) = range(arg);
        with_agent(false, |a| {
            a.host_uffd_released(fd, s, e);
            Some(())
        });
    }
    libc_ret(r)
}

/// # Safety
/// As `close(2)`.
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    // Only a userfaultfd can give memory back; twinpage's own threads close
    // files while holding engine locks, and must never get further than this
    // (the served files' table is a leaf lock, taken only while some are open).
    sysfs::forget(fd);
    let uffd = agent::handovers_active() && is_userfaultfd(fd);
    // SAFETY: the host program's own close, passed on unchanged.
    let r = neg_errno(unsafe { libc::syscall(libc::SYS_close, fd as libc::c_long) });
    // A host userfaultfd that held handed-over memory is gone: its ranges
    // come back (EINTR still closes the fd on Linux).
    if uffd && (r == 0 || r == -(libc::EINTR as isize)) {
        with_agent(false, |a| {
            a.host_uffd_released(fd, 0, usize::MAX);
            Some(())
        });
    }
    libc_ret(r)
}

/// `fd` is a userfaultfd (its /proc link reads `anon_inode:[userfaultfd]`).
fn is_userfaultfd(fd: c_int) -> bool {
    let Ok(path) = std::ffi::CString::new(format!("/proc/self/fd/{fd}")) else { return false };
    let mut buf = [0u8; 64];
    // SAFETY: path is NUL-terminated; readlink writes at most buf.len() bytes
    // into buf and opens no file descriptor.
    let n = unsafe { libc::readlink(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    n > 0 && buf[..n as usize] == *b"anon_inode:[userfaultfd]"
}

/// The system allocator, reporting twinpage's large blocks to
/// `twinpage::own` so that merge-any leaves them out: glibc maps each on
/// its own as unnamed anonymous memory, which merge-any would register as
/// the program's, and a write to a merged page of the engine's own records
/// under its lock hung the program (see `twinpage::own`).
struct OwnHeap;

// SAFETY: every call is the system allocator's, with the caller's layout;
// the bookkeeping around it only reads the addresses.
unsafe impl std::alloc::GlobalAlloc for OwnHeap {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        listed(unsafe { std::alloc::System.alloc(layout) }, layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as alloc.
        listed(unsafe { std::alloc::System.alloc_zeroed(layout) }, layout.size())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if layout.size() >= twinpage::own::HEAP_MIN {
            twinpage::own::heap_freed(ptr as usize);
        }
        // SAFETY: a block this allocator returned, with its layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // Unlisted before the block may move: once freed, another thread's
        // block may start at the same address and be listed.
        let large = layout.size() >= twinpage::own::HEAP_MIN;
        if large {
            twinpage::own::heap_freed(ptr as usize);
        }
        // SAFETY: a block this allocator returned, with its layout.
        let q = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if q.is_null() {
            listed(ptr, layout.size());
        } else {
            listed(q, new_size);
        }
        q
    }
}

/// A block of `size` bytes just allocated at `p` (null: none), listed as
/// twinpage's own when large.
fn listed(p: *mut u8, size: usize) -> *mut u8 {
    if !p.is_null() && size >= twinpage::own::HEAP_MIN {
        twinpage::own::heap_allocated(p as usize, size);
    }
    p
}

#[global_allocator]
static ALLOCATOR: OwnHeap = OwnHeap;

/// Fork: the lists of twinpage's own memory (the large blocks' map among
/// them) are locked across it (registered before the agent's handlers, so
/// its prepare runs last and its release first: the agent's handlers may
/// allocate).
extern "C" fn own_before_fork() {
    twinpage::own::lock_for_fork();
}

extern "C" fn own_after_fork() {
    // SAFETY: own_before_fork ran before this fork, once.
    unsafe { twinpage::own::unlock_after_fork() };
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = {
    extern "C" fn init() {
        // SAFETY: plain extern "C" functions valid for the life of the
        // process (this library is never unloaded).
        unsafe { libc::pthread_atfork(Some(own_before_fork), Some(own_after_fork), Some(own_after_fork)) };
        let _ = std::panic::catch_unwind(agent::load);
    }
    init
};

/// A symbol name with its NUL, as dlsym takes it.
fn name_of(nul_terminated: &'static str) -> &'static std::ffi::CStr {
    std::ffi::CStr::from_bytes_with_nul(nul_terminated.as_bytes()).unwrap_or(c"")
}

/// libc's own `name`, found past this library (RTLD_NEXT), as type `T`.
///
/// # Safety
/// `T` must be the function pointer type of libc's `name`.
unsafe fn next<T: Copy>(name: &std::ffi::CStr, cache: &std::sync::OnceLock<usize>) -> Option<T> {
    let f = *cache.get_or_init(|| {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
        unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
    });
    // SAFETY: a non-null result is the function named, whose type the caller
    // gives; function pointers and usize have the same size here.
    (f != 0).then(|| unsafe { std::mem::transmute_copy::<usize, T>(&f) })
}

/// Defines interposers of libc's read functions: a served KSM file
/// (`sysfs`) is computed again before a read from offset 0, then libc's own
/// function runs unchanged.
macro_rules! reads {
    ($($name:ident($($arg:ident: $ty:ty),*) off $off:expr;)*) => {$(
        /// # Safety
        /// As libc's function of this name.
        #[no_mangle]
        pub unsafe extern "C" fn $name(fd: c_int, $($arg: $ty),*) -> isize {
            static REAL: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
            sysfs::before_read(fd, $off);
            // SAFETY: libc's function of the same name and type.
            match unsafe { next::<unsafe extern "C" fn(c_int, $($ty),*) -> isize>(
                name_of(concat!(stringify!($name), "\0")), &REAL) } {
                // SAFETY: the program's own call, passed on unchanged.
                Some(real) => unsafe { real(fd, $($arg),*) },
                None => {
                    set_errno(libc::ENOSYS);
                    -1
                }
            }
        }
    )*};
}

reads! {
    read(buf: *mut c_void, n: usize) off None;
    pread(buf: *mut c_void, n: usize, off: libc::off_t) off Some(off);
    pread64(buf: *mut c_void, n: usize, off: libc::off_t) off Some(off);
    __read_chk(buf: *mut c_void, n: usize, buflen: usize) off None;
    __pread_chk(buf: *mut c_void, n: usize, off: libc::off_t, buflen: usize) off Some(off);
    __pread64_chk(buf: *mut c_void, n: usize, off: libc::off_t, buflen: usize) off Some(off);
}

/// Defines interposers of libc's write functions: a write to a served KSM
/// file is applied by the engine (`sysfs::write`), anything else goes to
/// libc's own function unchanged.
macro_rules! writes {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        /// # Safety
        /// As libc's function of this name.
        #[no_mangle]
        pub unsafe extern "C" fn $name(fd: c_int, buf: *const c_void, n: usize, $($arg: $ty),*) -> isize {
            static REAL: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
            if !buf.is_null() || n == 0 {
                let bytes: &[u8] = if n == 0 { &[] } else {
                    // SAFETY: the program hands write(2) n readable bytes at buf.
                    unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), n) }
                };
                match sysfs::write(fd, bytes) {
                    Some(Ok(done)) => return done as isize,
                    Some(Err(e)) => {
                        set_errno(e.raw_os_error().unwrap_or(libc::EIO));
                        return -1;
                    }
                    None => {}
                }
            }
            // SAFETY: libc's function of the same name and type.
            match unsafe { next::<unsafe extern "C" fn(c_int, *const c_void, usize, $($ty),*) -> isize>(
                name_of(concat!(stringify!($name), "\0")), &REAL) } {
                // SAFETY: the program's own call, passed on unchanged.
                Some(real) => unsafe { real(fd, buf, n, $($arg),*) },
                None => {
                    set_errno(libc::ENOSYS);
                    -1
                }
            }
        }
    )*};
}

writes! {
    write();
    pwrite(off: libc::off_t);
    pwrite64(off: libc::off_t);
}

/// # Safety
/// As `fclose(3)`.
#[no_mangle]
pub unsafe extern "C" fn fclose(f: *mut libc::FILE) -> c_int {
    static REAL: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let mut applied = Ok(());
    if !f.is_null() {
        // SAFETY: the program's open stream.
        let fd = unsafe { libc::fileno(f) };
        if sysfs::served_fd(fd) {
            // What stdio buffered reaches the memfd first.
            // SAFETY: as above.
            unsafe { libc::fflush(f) };
            applied = sysfs::close_stream(fd);
        }
    }
    // SAFETY: libc's fclose.
    let r = match unsafe { next::<unsafe extern "C" fn(*mut libc::FILE) -> c_int>(c"fclose", &REAL) } {
        // SAFETY: the program's own stream.
        Some(real) => unsafe { real(f) },
        None => libc::EOF,
    };
    match applied {
        Ok(()) => r,
        Err(e) => {
            set_errno(e.raw_os_error().unwrap_or(libc::EIO));
            libc::EOF
        }
    }
}
