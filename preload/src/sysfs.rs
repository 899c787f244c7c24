//! The kernel's KSM files served in-process, for `TWINPAGE_REDIRECT_SYSFS=1`:
//! a program that opens `/sys/kernel/mm/ksm/*`, `/proc/self/ksm_stat` or
//! `/proc/self/ksm_merging_pages` gets a memfd whose content is computed
//! when it is read from offset 0 (as sysfs computes a file at its first
//! read), and whose writes the engine applies before `write(2)` returns,
//! failing with the kernel's errno (`EINVAL`, `EBUSY`) and ignoring the
//! file offset, as sysfs does. An accepted write is in the stats tree and
//! every process on it has applied it when the write returns: `run=2` has
//! unmerged every process's pages, and a write another process makes later
//! is ordered after it.
//!
//! Reads through stdio (`fopen`/`fscanf`) see the content as of the open,
//! which is how such programs read sysfs (one open per value); writes
//! through stdio are applied at `fclose`, whose failure carries the errno.
//! The values are this process's engine's: with other processes merging
//! into the same tree, the tree's files (not redirected) show the host.

use std::ffi::c_int;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use kernel_compat::procfs;
use twinpage::statsfs::ProcessFlags;

/// What an open file shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum File {
    /// `/sys/kernel/mm/ksm/<name>`.
    Attr(&'static str),
    /// `/proc/self/ksm_stat`.
    KsmStat,
    /// `/proc/self/ksm_merging_pages`.
    MergingPages,
}

struct Open {
    fd: c_int,
    file: File,
    writable: bool,
    /// The content written into the memfd at open (stdio writes change it).
    rendered: Vec<u8>,
}

static OPEN: Mutex<Vec<Open>> = Mutex::new(Vec::new());
/// `OPEN.len()`, read without the lock by every interposed read and write.
static COUNT: AtomicUsize = AtomicUsize::new(0);

fn open_files() -> std::sync::MutexGuard<'static, Vec<Open>> {
    OPEN.lock().unwrap_or_else(|e| e.into_inner())
}

fn lookup(fd: c_int) -> Option<(File, bool)> {
    if COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    open_files().iter().find(|o| o.fd == fd).map(|o| (o.file, o.writable))
}

/// Whether `fd` is a served file.
pub fn served_fd(fd: c_int) -> bool {
    lookup(fd).is_some()
}

/// The file a redirected path names, if it is one of the kernel's.
pub fn classify(path: &str) -> Option<File> {
    if let Some(name) = path.strip_prefix("/sys/kernel/mm/ksm/") {
        return kernel_compat::attrs::ATTRS.iter().find(|a| a.name == name).map(|a| File::Attr(a.name));
    }
    let pid = std::process::id();
    let rest = path.strip_prefix("/proc/self/").or_else(|| path.strip_prefix(&format!("/proc/{pid}/"))?.into())?;
    match rest {
        "ksm_stat" => Some(File::KsmStat),
        "ksm_merging_pages" => Some(File::MergingPages),
        _ => None,
    }
}

/// The file's content now.
fn render(a: &crate::agent::Agent, file: File) -> Option<Vec<u8>> {
    let e = a.engine();
    match file {
        File::Attr(name) => {
            // A counter reads as of now (zero pages written since the last
            // scan let go first); a tunable needs no look at memory.
            if kernel_compat::attrs::ATTRS.iter().any(|x| x.name == name && !x.writable) {
                let _ = e.stats_now();
            }
            Some(kernel_compat::attrs::render(&e.show_attr(name)?).into_bytes())
        }
        File::KsmStat | File::MergingPages => {
            let s = e.stats_now();
            let flags = ProcessFlags { merge_any: a.merges_any(), mergeable: s.twinpage_pages_registered > 0 };
            let stat = twinpage::statsfs::process_stat(&s, flags);
            Some(match file {
                File::MergingPages => procfs::render_merging_pages(stat.ksm_merging_pages).into_bytes(),
                _ => stat.render().into_bytes(),
            })
        }
    }
}

fn raw(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Replaces the memfd's content with `bytes`.
fn fill(fd: c_int, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: our own memfd; the buffer is ours.
    raw(unsafe { libc::syscall(libc::SYS_ftruncate, fd as libc::c_long, 0) })?;
    // SAFETY: as above.
    raw(unsafe { libc::syscall(libc::SYS_pwrite64, fd as libc::c_long, bytes.as_ptr(), bytes.len(), 0) })?;
    Ok(())
}

/// `open` of a served file: a memfd holding its content, or the error the
/// kernel gives. None: not served here (no agent), the caller opens the
/// tree's file instead.
pub fn open(file: File, flags: c_int) -> Option<io::Result<c_int>> {
    let a = crate::agent::get_or_init()?;
    let acc = flags & libc::O_ACCMODE;
    let writable = acc != libc::O_RDONLY;
    if writable {
        let can = match file {
            File::Attr(name) => kernel_compat::attrs::ATTRS.iter().any(|x| x.name == name && x.writable),
            _ => false,
        };
        if !can {
            return Some(Err(io::Error::from_raw_os_error(libc::EACCES)));
        }
    }
    let Some(content) = render(a, file) else { return Some(Err(io::Error::from_raw_os_error(libc::ENOENT))) };
    let cloexec = if flags & libc::O_CLOEXEC != 0 { libc::MFD_CLOEXEC } else { 0 };
    // SAFETY: a NUL-terminated name; the fd is returned to the program.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_create, c"twinpage-ksm-file".as_ptr(), cloexec) } as c_int;
    if fd < 0 {
        return Some(Err(io::Error::last_os_error()));
    }
    // A write-only or truncating open starts empty: what stdio writes is
    // then exactly what `fclose` applies.
    let rendered = if writable && (acc == libc::O_WRONLY || flags & libc::O_TRUNC != 0) { Vec::new() } else { content };
    if let Err(e) = fill(fd, &rendered) {
        // SAFETY: our own fd.
        unsafe { libc::syscall(libc::SYS_close, fd as libc::c_long) };
        return Some(Err(e));
    }
    let mut files = open_files();
    files.retain(|o| o.fd != fd);
    files.push(Open { fd, file, writable, rendered });
    COUNT.store(files.len(), Ordering::Release);
    Some(Ok(fd))
}

/// Before a read of `fd` at `off` (None: the file offset): a served file's
/// content is computed again when the read starts at 0.
pub fn before_read(fd: c_int, off: Option<i64>) {
    let Some((file, _)) = lookup(fd) else { return };
    let at = match off {
        Some(o) => o,
        // SAFETY: lseek on the program's fd, which is our memfd.
        None => unsafe { libc::syscall(libc::SYS_lseek, fd as libc::c_long, 0, libc::SEEK_CUR) },
    };
    if at != 0 {
        return;
    }
    let Some(a) = crate::agent::get() else { return };
    if let Some(content) = render(a, file) {
        let _ = fill(fd, &content);
        if let Some(o) = open_files().iter_mut().find(|o| o.fd == fd) {
            o.rendered = content;
        }
    }
}

/// A write to a served fd: applied now. None: not a served fd.
pub fn write(fd: c_int, bytes: &[u8]) -> Option<io::Result<usize>> {
    let (file, writable) = lookup(fd)?;
    let File::Attr(name) = file else { return Some(Err(io::Error::from_raw_os_error(libc::EBADF))) };
    if !writable {
        return Some(Err(io::Error::from_raw_os_error(libc::EBADF)));
    }
    let a = crate::agent::get()?;
    Some(match a.engine().write_attr(name, bytes) {
        Ok(()) => {
            crate::agent::publish_now();
            Ok(bytes.len())
        }
        Err(e) => Err(io::Error::from_raw_os_error(e.errno())),
    })
}

/// Before `fclose` of a served stream, once stdio flushed: the fd is no
/// longer served, and what stdio wrote into the memfd is applied; an `Err`
/// is what `fclose` reports.
pub fn close_stream(fd: c_int) -> io::Result<()> {
    let taken = {
        let mut files = open_files();
        let at = files.iter().position(|o| o.fd == fd);
        let o = at.map(|i| files.swap_remove(i));
        COUNT.store(files.len(), Ordering::Release);
        o
    };
    let Some(Open { file: File::Attr(name), writable: true, rendered, .. }) = taken else { return Ok(()) };
    let mut buf = vec![0u8; 8192];
    // SAFETY: reads our memfd into our buffer.
    let n = raw(unsafe { libc::syscall(libc::SYS_pread64, fd as libc::c_long, buf.as_mut_ptr(), buf.len(), 0) })?;
    buf.truncate(n as usize);
    if buf == rendered {
        return Ok(());
    }
    let Some(a) = crate::agent::get() else { return Ok(()) };
    a.engine().write_attr(name, &buf).map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    crate::agent::publish_now();
    Ok(())
}

/// The fd is closed (or about to be): no longer served.
pub fn forget(fd: c_int) {
    if COUNT.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut files = open_files();
    files.retain(|o| o.fd != fd);
    COUNT.store(files.len(), Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_paths_are_classified() {
        assert_eq!(classify("/sys/kernel/mm/ksm/run"), Some(File::Attr("run")));
        assert_eq!(classify("/sys/kernel/mm/ksm/full_scans"), Some(File::Attr("full_scans")));
        assert_eq!(classify("/sys/kernel/mm/ksm/nope"), None);
        assert_eq!(classify("/proc/self/ksm_stat"), Some(File::KsmStat));
        assert_eq!(classify(&format!("/proc/{}/ksm_merging_pages", std::process::id())), Some(File::MergingPages));
        assert_eq!(classify("/proc/1/ksm_stat"), None);
        assert_eq!(classify("/proc/self/status"), None);
    }
}
