//! Files rewritten in place, the tree's lock, and what `/proc` says about a
//! process.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The most of a file this module reads (a user may write anything into an
/// attribute file; the kernel looks at 4096 bytes per `write(2)`).
const READ_MAX: usize = 1 << 20;

/// A file that is opened once and rewritten in place (`pwrite` at offset 0,
/// then `ftruncate` if it got shorter), never replaced by a rename: a reader
/// that keeps its fd open and reads again sees the new content.
#[derive(Debug)]
pub(crate) struct InPlaceFile {
    path: PathBuf,
    mode: u32,
    file: File,
}

impl InPlaceFile {
    /// Opens (creating if needed) `path` for reading and writing and gives it
    /// exactly `mode` (`0o444` files are opened while still writable to the
    /// owner, so a non-root publisher can keep writing them through its fd).
    pub(crate) fn open(path: &Path, mode: u32) -> io::Result<Self> {
        let file = open_rw(path)?;
        set_mode(&file, mode);
        Ok(Self { path: path.to_path_buf(), mode, file })
    }

    /// The path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Reopens the file if its path no longer leads to the inode we hold
    /// (somebody removed or replaced it); returns whether it did.
    pub(crate) fn ensure(&mut self) -> io::Result<bool> {
        let ours = self.file.metadata()?;
        match fs::metadata(&self.path) {
            Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => Ok(false),
            _ => {
                if let Some(dir) = self.path.parent() {
                    create_dir(dir)?;
                }
                *self = Self::open(&self.path, self.mode)?;
                Ok(true)
            }
        }
    }

    /// The whole content (at most 1 MiB).
    pub(crate) fn read(&self) -> io::Result<Vec<u8>> {
        read_all_at(&self.file)
    }

    /// Replaces the content with `content` unless it already is exactly
    /// that; returns whether it wrote.
    ///
    /// The new bytes are written first and the file is shortened after, so
    /// a reader racing with a shrink sees the new value on the first line
    /// (followed for an instant by the old tail), never a truncated prefix
    /// of the old value.
    pub(crate) fn write(&self, content: &[u8]) -> io::Result<bool> {
        if self.read()? == content {
            return Ok(false);
        }
        self.overwrite(content)?;
        Ok(true)
    }

    /// Replaces the content unconditionally.
    pub(crate) fn overwrite(&self, content: &[u8]) -> io::Result<()> {
        self.file.write_all_at(content, 0)?;
        if self.file.metadata()?.len() > content.len() as u64 {
            self.file.set_len(content.len() as u64)?;
        }
        Ok(())
    }

    /// Modification time in nanoseconds.
    pub(crate) fn mtime(&self) -> io::Result<i128> {
        let m = self.file.metadata()?;
        Ok(i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()))
    }
}

fn open_rw(path: &Path) -> io::Result<File> {
    let open = || OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o644).open(path);
    match open() {
        // A 0444 file of ours (we are not root): writable for the open only.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            fs::set_permissions(path, Permissions::from_mode(0o644))?;
            open()
        }
        r => r,
    }
}

/// Gives `file` exactly `mode` (the umask may have narrowed it). A file of
/// another user keeps its mode.
fn set_mode(file: &File, mode: u32) {
    if let Ok(m) = file.metadata() {
        if m.mode() & 0o7777 != mode {
            let _ = file.set_permissions(Permissions::from_mode(mode));
        }
    }
}

/// Creates a directory and its missing parents, each exactly mode 0755
/// whatever the umask (the tree is readable by all, as sysfs is; only its
/// owner writes). Directories that exist are left as they are.
pub(crate) fn create_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.is_dir()).collect();
    for d in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => fs::set_permissions(d, Permissions::from_mode(0o755))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Refuses a tree root that another user could rearrange: one owned by a
/// user other than us or root, or writable by others without the sticky
/// bit (they could swap `kernel/mm/ksm` for a directory of their own and
/// set our tunables through it).
pub(crate) fn check_root(root: &Path) -> io::Result<()> {
    let m = fs::metadata(root)?;
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me && m.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} belongs to uid {}, not to this user or root", root.display(), m.uid()),
        ));
    }
    if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is writable by other users (mode {:o}); use a directory only its owner can write",
                root.display(),
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

fn read_all_at(file: &File) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = file.read_at(&mut chunk, buf.len() as u64)?;
        if n == 0 || buf.len() >= READ_MAX {
            return Ok(buf);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The tree's lock file (`twinpage/lock`): publishers hold it (`flock`,
/// exclusive) for a whole pass, `twinpage set` while it writes.
#[derive(Debug)]
pub struct TreeLock {
    file: File,
}

impl TreeLock {
    /// Opens (creating if needed) the lock file.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            create_dir(dir)?;
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o644).open(path)?;
        set_mode(&file, 0o644);
        Ok(Self { file })
    }

    /// Takes the lock, waiting for other holders.
    pub fn lock(&self) -> io::Result<TreeLockGuard<'_>> {
        self.file.lock()?;
        Ok(TreeLockGuard { file: &self.file })
    }

    /// Takes the lock, waiting at most `timeout` (a holder that is stopped
    /// or stuck must not hang the others): `TimedOut` after that.
    pub fn lock_timeout(&self, timeout: std::time::Duration) -> io::Result<TreeLockGuard<'_>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.file.try_lock() {
                Ok(()) => return Ok(TreeLockGuard { file: &self.file }),
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, self.held_by()));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl TreeLock {
    /// Who holds the lock, as `/proc/locks` tells (an `flock` lists the
    /// process that took it), for the message of a timed-out wait: a
    /// process stopped while it held the lock holds up every other one on
    /// the tree until it continues, and the operator needs its pid.
    fn held_by(&self) -> String {
        let holder = self.file.metadata().ok().and_then(|m| {
            let locks = fs::read_to_string("/proc/locks").ok()?;
            flock_holder(&locks, m.dev(), m.ino())
        });
        match holder {
            Some(pid) if process_stopped(pid) => {
                format!("the tree's lock is held by process {pid}, which is stopped: the tree waits until it continues")
            }
            Some(pid) => format!("the tree's lock is held by process {pid}"),
            None => "the tree's lock is held by another process".to_string(),
        }
    }
}

/// The pid `/proc/locks` lists for an `flock` on the file `dev`/`ino`
/// (lines like `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`, the device
/// as major:minor in hex).
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = (u64::from(libc::major(dev)), u64::from(libc::minor(dev)));
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter's line starts "1: -> FLOCK"; only holders count.
        let (kind, pid, file) = (f.get(1)?, f.get(4)?, f.get(5)?);
        if *kind != "FLOCK" {
            return None;
        }
        let mut parts = file.split(':');
        let (ma, mi, i) = (parts.next()?, parts.next()?, parts.next()?);
        let same =
            u64::from_str_radix(ma, 16).ok()? == major && u64::from_str_radix(mi, 16).ok()? == minor && i.parse::<u64>().ok()? == ino;
        same.then(|| pid.parse().ok()).flatten()
    })
}

/// Holds the tree's lock until dropped.
#[derive(Debug)]
pub struct TreeLockGuard<'a> {
    file: &'a File,
}

impl Drop for TreeLockGuard<'_> {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// What `/proc/<pid>/stat` says of a process that is not a zombie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcState {
    /// Its start time (field 22, in clock ticks since boot): with the pid,
    /// it names a process even after pid reuse.
    pub(crate) starttime: u64,
    /// Stopped (`SIGSTOP`, a job-control stop) or stopped by its tracer
    /// (state `T` or `t`): it runs no thread, so its publisher cannot answer
    /// until it continues.
    pub(crate) stopped: bool,
}

/// `/proc/<pid>/stat` read once, or `None` if there is no such process or
/// it is a zombie.
pub(crate) fn process_state(pid: u32) -> Option<ProcState> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    // Field 3 is the state; the start time is field 22.
    let state = fields.next()?;
    if state == "Z" {
        return None;
    }
    Some(ProcState { starttime: fields.nth(18)?.parse().ok()?, stopped: matches!(state, "T" | "t") })
}

/// The process's start time ([`ProcState::starttime`]).
pub(crate) fn process_starttime(pid: u32) -> Option<u64> {
    process_state(pid).map(|s| s.starttime)
}

/// Whether process `pid` is stopped (`SIGSTOP`, a job-control stop) or
/// stopped by its tracer: it runs no thread until it continues.
pub fn process_stopped(pid: u32) -> bool {
    process_state(pid).is_some_and(|s| s.stopped)
}

/// `/proc/<pid>/comm`, without the newline.
pub(crate) fn process_comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end_matches('\n').to_string())
}

/// The name an operator knows a process by: a QEMU guest's name (`-name
/// guest=NAME,...` or `-name NAME`, as libvirt and people pass it), else
/// its command (`comm`).
pub(crate) fn process_name(pid: u32) -> Option<String> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    guest_name(&cmdline).or_else(|| process_comm(pid))
}

/// `-name`'s guest name in a NUL-separated command line.
fn guest_name(cmdline: &[u8]) -> Option<String> {
    let mut args = cmdline.split(|&b| b == 0).map(String::from_utf8_lossy);
    args.find(|a| a == "-name")?;
    let value = args.next()?;
    // QEMU's option syntax: `guest=NAME,debug-threads=on` or a bare first
    // value; a doubled comma is a literal comma.
    let first = value.replace(",,", "\u{0}");
    let part = first.split(',').find(|p| p.starts_with("guest=")).or_else(|| first.split(',').next().filter(|p| !p.contains('=')))?;
    let name = part.trim_start_matches("guest=").replace('\u{0}', ",");
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_is_named_as_qemu_was_told() {
        let cmd = |args: &[&str]| args.join("\0").into_bytes();
        assert_eq!(
            guest_name(&cmd(&["qemu-system-x86_64", "-name", "guest=web-1,debug-threads=on", "-m", "1G"])).as_deref(),
            Some("web-1")
        );
        assert_eq!(guest_name(&cmd(&["qemu", "-name", "db"])).as_deref(), Some("db"));
        assert_eq!(guest_name(&cmd(&["qemu", "-name", "a,,b,process=x"])).as_deref(), Some("a,b"));
        assert_eq!(guest_name(&cmd(&["qemu", "-m", "1G"])), None);
        assert_eq!(guest_name(&cmd(&["qemu", "-name", "process=x"])), None);
    }

    #[test]
    fn starttime_of_self() {
        let me = std::process::id();
        assert!(process_starttime(me).is_some());
        assert_eq!(process_starttime(me), process_starttime(me));
        assert!(process_comm(me).is_some());
        assert_eq!(process_starttime(u32::MAX), None);
    }

    /// A process stopped while it holds the tree's lock holds up the others:
    /// their wait ends with a message naming it as stopped.
    #[test]
    fn a_wait_for_the_lock_names_a_stopped_holder() {
        let dir = std::env::temp_dir().join(format!("twinpage-lock-{}", std::process::id()));
        create_dir(&dir).unwrap();
        let path = dir.join("lock");
        let lock = TreeLock::open(&path).unwrap();
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: the child makes only async-signal-safe calls (open, flock,
        // raise, _exit) on memory prepared before the fork.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: as above; its own open file description, so its own lock.
            unsafe {
                let fd = libc::open(cpath.as_ptr(), libc::O_RDWR);
                if fd < 0 || libc::flock(fd, libc::LOCK_EX) != 0 {
                    libc::_exit(1);
                }
                libc::raise(libc::SIGSTOP);
                libc::_exit(0);
            }
        }
        assert!(child > 0);
        let pid = child as u32;
        let mut status = 0;
        // SAFETY: waits for our own child to stop.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, libc::WUNTRACED) }, child);
        assert!(libc::WIFSTOPPED(status));
        assert!(process_stopped(pid));
        assert!(!process_stopped(std::process::id()));
        let e = lock.lock_timeout(std::time::Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains(&format!("process {pid}, which is stopped")), "{e}");
        // SAFETY: our own child; it exits once continued.
        unsafe {
            libc::kill(child, libc::SIGCONT);
            libc::waitpid(child, &mut status, 0);
        }
        assert!(lock.lock_timeout(std::time::Duration::from_secs(5)).is_ok(), "free once its holder exited");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn in_place_rewrite() {
        let dir = std::env::temp_dir().join(format!("twinpage-file-{}", std::process::id()));
        create_dir(&dir).unwrap();
        let path = dir.join("f");
        let f = InPlaceFile::open(&path, 0o444).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o444);
        let reader = File::open(&path).unwrap();
        assert!(f.write(b"12345\n").unwrap());
        assert!(!f.write(b"12345\n").unwrap());
        assert!(f.write(b"9\n").unwrap());
        assert_eq!(read_all_at(&reader).unwrap(), b"9\n");
        assert!(f.write(b"1234567\n").unwrap());
        assert_eq!(read_all_at(&reader).unwrap(), b"1234567\n");
        fs::remove_file(&path).unwrap();
        let mut f = f;
        f.ensure().unwrap();
        assert!(path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
