//! `TWINPAGE_REDIRECT_SYSFS=1`: a program that hard-codes the kernel's paths
//! (`/sys/kernel/mm/ksm/*`, `/proc/self/ksm_stat`,
//! `/proc/self/ksm_merging_pages`) reads twinpage's tree instead. open,
//! openat, fopen, access and stat of those paths are rewritten.

use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::OnceLock;

const SYSFS: &str = "/sys/kernel/mm/ksm";

/// The tree root when redirection is on (read each time: an open can come
/// before the library's constructor has read the environment).
fn root() -> Option<&'static str> {
    let cfg = crate::agent::config().filter(|c| c.redirect_sysfs)?;
    static ROOT: OnceLock<String> = OnceLock::new();
    Some(ROOT.get_or_init(|| cfg.dir.to_string_lossy().into_owned()).as_str())
}

/// The path to use instead of `path`, if it is one of the kernel's KSM files.
pub fn rewrite(path: *const c_char) -> Option<CString> {
    if path.is_null() {
        return None;
    }
    let root = root()?;
    // SAFETY: the caller passes a NUL-terminated path, as open(2) requires.
    let p = unsafe { CStr::from_ptr(path) }.to_str().ok()?;
    let pid = std::process::id();
    let new = if p == SYSFS || p.starts_with("/sys/kernel/mm/ksm/") {
        format!("{root}/kernel/mm/ksm{}", &p[SYSFS.len()..])
    } else {
        let rest = p
            .strip_prefix("/proc/self/")
            .or_else(|| p.strip_prefix(&format!("/proc/{pid}/")))
            .or_else(|| p.strip_prefix("/proc/thread-self/../"))?;
        if rest != "ksm_stat" && rest != "ksm_merging_pages" {
            return None;
        }
        format!("{root}/proc/{pid}/{rest}")
    };
    CString::new(new).ok()
}

type FopenFn = unsafe extern "C" fn(*const c_char, *const c_char) -> *mut libc::FILE;

fn real_fopen(name: &CStr) -> Option<FopenFn> {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name; the result is
    // either null or libc's fopen, whose type is FopenFn.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    // SAFETY: non-null results are the function named, of this signature.
    (!f.is_null()).then(|| unsafe { std::mem::transmute::<*mut libc::c_void, FopenFn>(f) })
}

/// The in-process file (`sysfs`) a redirected path names.
fn served(path: *const c_char) -> Option<crate::sysfs::File> {
    root()?;
    if path.is_null() {
        return None;
    }
    // SAFETY: the caller passes a NUL-terminated path, as open(2) requires.
    crate::sysfs::classify(unsafe { CStr::from_ptr(path) }.to_str().ok()?)
}

/// A program checking for the kernel's files (or their directory, as the
/// kernel's ksm_tests does) before it opens them finds them: the agent, and
/// with it the tree, is made now.
fn ensure_tree(path: *const c_char) {
    if served(path).is_some() || is_ksm_dir(path) {
        let _ = crate::agent::get_or_init();
    }
}

fn is_ksm_dir(path: *const c_char) -> bool {
    if root().is_none() || path.is_null() {
        return false;
    }
    // SAFETY: the caller passes a NUL-terminated path, as access(2) requires.
    let p = unsafe { CStr::from_ptr(path) }.to_bytes();
    p.strip_suffix(b"/").unwrap_or(p) == SYSFS.as_bytes()
}

fn openat_raw(dirfd: c_int, path: *const c_char, flags: c_int, mode: libc::c_uint) -> c_int {
    if let Some(file) = served(path) {
        match crate::sysfs::open(file, flags) {
            Some(Ok(fd)) => return fd,
            Some(Err(e)) => {
                crate::set_errno(e.raw_os_error().unwrap_or(libc::EIO));
                return -1;
            }
            None => {}
        }
    }
    let new = rewrite(path);
    let path = new.as_ref().map_or(path, |p| p.as_ptr());
    // SAFETY: the program's own openat, with (possibly) our rewritten path.
    unsafe { libc::syscall(libc::SYS_openat, dirfd as libc::c_long, path, flags as libc::c_long, mode as libc::c_long) as c_int }
}

/// # Safety
/// As `open(2)`.
#[no_mangle]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: libc::c_uint) -> c_int {
    openat_raw(libc::AT_FDCWD, path, flags, mode)
}

/// # Safety
/// As `open(2)`.
#[no_mangle]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: libc::c_uint) -> c_int {
    openat_raw(libc::AT_FDCWD, path, flags, mode)
}

/// # Safety
/// As `openat(2)`.
#[no_mangle]
pub unsafe extern "C" fn openat(dirfd: c_int, path: *const c_char, flags: c_int, mode: libc::c_uint) -> c_int {
    openat_raw(dirfd, path, flags, mode)
}

/// # Safety
/// As `openat(2)`.
#[no_mangle]
pub unsafe extern "C" fn openat64(dirfd: c_int, path: *const c_char, flags: c_int, mode: libc::c_uint) -> c_int {
    openat_raw(dirfd, path, flags, mode)
}

/// `open(2)` flags for an `fopen` mode string.
fn fopen_flags(mode: &[u8]) -> c_int {
    let plus = mode.contains(&b'+');
    let cloexec = if mode.contains(&b'e') { libc::O_CLOEXEC } else { 0 };
    cloexec
        | match mode.first() {
            Some(b'w') => (if plus { libc::O_RDWR } else { libc::O_WRONLY }) | libc::O_CREAT | libc::O_TRUNC,
            Some(b'a') => (if plus { libc::O_RDWR } else { libc::O_WRONLY }) | libc::O_CREAT | libc::O_APPEND,
            _ => {
                if plus {
                    libc::O_RDWR
                } else {
                    libc::O_RDONLY
                }
            }
        }
}

unsafe fn fopen_via(name: &CStr, path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    if let (Some(file), false) = (served(path), mode.is_null()) {
        // SAFETY: fopen's mode is a NUL-terminated string.
        let m = unsafe { CStr::from_ptr(mode) };
        match crate::sysfs::open(file, fopen_flags(m.to_bytes())) {
            Some(Ok(fd)) => {
                // SAFETY: our fresh fd, and the program's mode.
                let f = unsafe { libc::fdopen(fd, mode) };
                if f.is_null() {
                    crate::sysfs::forget(fd);
                    // SAFETY: our own fd.
                    unsafe { libc::syscall(libc::SYS_close, fd as libc::c_long) };
                }
                return f;
            }
            Some(Err(e)) => {
                crate::set_errno(e.raw_os_error().unwrap_or(libc::EIO));
                return std::ptr::null_mut();
            }
            None => {}
        }
    }
    let Some(real) = real_fopen(name) else {
        crate::set_errno(libc::ENOSYS);
        return std::ptr::null_mut();
    };
    let new = rewrite(path);
    let path = new.as_ref().map_or(path, |p| p.as_ptr());
    // SAFETY: libc's fopen with the program's mode and (possibly) our path.
    unsafe { real(path, mode) }
}

/// # Safety
/// As `fopen(3)`.
#[no_mangle]
pub unsafe extern "C" fn fopen(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    // SAFETY: forwarded.
    unsafe { fopen_via(c"fopen", path, mode) }
}

/// # Safety
/// As `fopen(3)`.
#[no_mangle]
pub unsafe extern "C" fn fopen64(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    // SAFETY: forwarded.
    unsafe { fopen_via(c"fopen64", path, mode) }
}

/// # Safety
/// As `access(2)`.
#[no_mangle]
pub unsafe extern "C" fn access(path: *const c_char, mode: c_int) -> c_int {
    ensure_tree(path);
    let new = rewrite(path);
    let path = new.as_ref().map_or(path, |p| p.as_ptr());
    // SAFETY: the program's own access(2).
    let r = unsafe { libc::syscall(libc::SYS_faccessat, libc::AT_FDCWD as libc::c_long, path, mode as libc::c_long, 0) };
    crate::libc_ret(crate::neg_errno(r))
}

/// # Safety
/// As `stat(2)`.
#[no_mangle]
pub unsafe extern "C" fn stat(path: *const c_char, buf: *mut libc::stat) -> c_int {
    ensure_tree(path);
    let new = rewrite(path);
    let path = new.as_ref().map_or(path, |p| p.as_ptr());
    // SAFETY: the program's own stat(2) into its buffer.
    let r = unsafe { libc::syscall(libc::SYS_newfstatat, libc::AT_FDCWD as libc::c_long, path, buf, 0) };
    crate::libc_ret(crate::neg_errno(r))
}
