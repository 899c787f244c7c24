//! The tree's `kernel/mm/ksm` as a filesystem of its own (FUSE), mounted by
//! `twinpaged --sysfs DIR`: what sysfs gives a reader and a writer, for the
//! programs that are neither preloaded nor redirected (`cat`, `echo`,
//! `prometheus-node-exporter --path.sysfs=DIR`, libvirt's readers).
//!
//! - A read of a counter shows values taken after the read began: the view
//!   asks every publisher on the tree for its counters now ([`Tree::refresh`]:
//!   each process's publisher wakes at once, through inotify), waits for
//!   them (a stopped process is not waited for, and one that does not
//!   answer within [`REFRESH_WAIT`] not again until it answers: both are
//!   shown as of their last pass), then runs a pass of the daemon's publisher, which puts the
//!   global files together from them. A read takes the file under the
//!   tree's lock, which every publisher holds while it rewrites the files:
//!   never torn (a plain file being rewritten can be read as `678\n4` for
//!   an instant). Tunables need no refresh: a write that returned is in
//!   them.
//! - A write is checked with the kernel's rules and refused from `write(2)`
//!   with the kernel's errno (`EINVAL`, `EBUSY`, `ERANGE`); an accepted one
//!   returns once every running process's engine has it ([`Tree::set`]:
//!   `run=2` has unmerged everything) and the global counters show it
//!   (`pages_shared` 0 after `run=2`). The file offset is ignored and each
//!   `write(2)` is one store, as in sysfs; opening a read-only attribute for
//!   writing is `EACCES`, root included, as in sysfs.
//!
//! Requests are served one at a time (a write waits for the publishers, up
//! to [`WRITE_WAIT`]; reads queue behind it).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyWrite, Request,
};

use kernel_compat::Attr;
use twinpage::statsfs::{SetError, Tree};

/// How long a write waits for the publishers to apply it.
pub(crate) const WRITE_WAIT: Duration = Duration::from_secs(5);
/// How long a read of a counter waits for the publishers' fresh counters.
const REFRESH_WAIT: Duration = Duration::from_millis(500);
/// Attributes change at every publisher pass: the kernel caches nothing.
const TTL: Duration = Duration::ZERO;
/// sysfs reports every attribute as 4096 bytes; readers read until EOF.
const SIZE: u64 = 4096;

const ROOT: u64 = 1;
const KERNEL: u64 = 2;
const MM: u64 = 3;
const KSM: u64 = 4;
/// Attribute `i` of `tunables::all_attrs()` is inode `FIRST_ATTR + i`.
const FIRST_ATTR: u64 = 16;

/// The directories: inode, parent, name.
const DIRS: [(u64, u64, &str); 4] = [(ROOT, ROOT, ""), (KERNEL, ROOT, "kernel"), (MM, KERNEL, "mm"), (KSM, MM, "ksm")];

/// A mounted view; dropping it unmounts.
pub(crate) struct View {
    _session: fuser::BackgroundSession,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("View")
    }
}

/// Mounts the view of the tree at `root` on `at` (an existing directory),
/// readable by every user.
/// `republish` runs a pass of the daemon's own publisher and waits for it.
pub(crate) fn mount(root: &Path, at: &Path, republish: Republish) -> std::io::Result<View> {
    let fs = KsmFs {
        tree: Tree::at(root),
        opened: HashMap::new(),
        next_fh: 1,
        uid: nix::unistd::geteuid().as_raw(),
        republish,
        unanswered: HashSet::new(),
    };
    let options = [
        MountOption::FSName("twinpage".into()),
        MountOption::Subtype("twinpage".into()),
        MountOption::AllowOther,
        MountOption::DefaultPermissions,
        MountOption::NoExec,
        MountOption::NoSuid,
        MountOption::NoDev,
    ];
    Ok(View { _session: fuser::spawn_mount2(fs, at, &options)? })
}

/// Runs a pass of the daemon's publisher now and waits for it.
pub(crate) type Republish = Box<dyn Fn() -> bool + Send>;

struct KsmFs {
    tree: Tree,
    /// After an accepted write: every engine has applied it, each in a pass
    /// that published its counters after applying; one more pass of the
    /// daemon's publisher puts them, and the daemon's own, into the global
    /// files, so a read right after `write(2)` shows the write's effect
    /// (`run=2`: `pages_shared` 0), as sysfs's does.
    republish: Republish,
    /// What each open file showed at its last read from offset 0.
    opened: HashMap<u64, Vec<u8>>,
    next_fh: u64,
    uid: u32,
    /// Processes that did not answer the last refresh in time.
    unanswered: HashSet<u32>,
}

fn attrs() -> impl Iterator<Item = (u64, &'static Attr)> {
    twinpage::tunables::all_attrs().enumerate().map(|(i, a)| (FIRST_ATTR + i as u64, a))
}

impl KsmFs {
    /// The attribute of inode `ino`, if the tree has its file.
    fn attr(&self, ino: u64) -> Option<&'static Attr> {
        let (_, a) = attrs().find(|&(i, _)| i == ino)?;
        self.tree.ksm().path(a.name).is_file().then_some(a)
    }

    fn file_attr(&self, ino: u64, kind: FileType, perm: u16) -> FileAttr {
        let now = SystemTime::now();
        FileAttr {
            ino,
            size: if kind == FileType::Directory { 0 } else { SIZE },
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn stat(&self, ino: u64) -> Option<FileAttr> {
        if DIRS.iter().any(|d| d.0 == ino) {
            return Some(self.file_attr(ino, FileType::Directory, 0o755));
        }
        let a = self.attr(ino)?;
        Some(self.file_attr(ino, FileType::RegularFile, if a.writable { 0o644 } else { 0o444 }))
    }

    /// The file's content now, read under the tree's lock.
    fn content(&mut self, a: &Attr) -> std::io::Result<Vec<u8>> {
        if !a.writable {
            self.unanswered = self.tree.refresh(REFRESH_WAIT, &self.unanswered)?;
            (self.republish)();
        }
        let lock = self.tree.lock()?;
        let _held = lock.lock_timeout(Duration::from_secs(2))?;
        Ok(self.tree.ksm().read_raw(a.name)?.into_bytes())
    }
}

/// The errno `write(2)` fails with for `e`.
fn errno_of(e: &SetError) -> i32 {
    match e {
        SetError::Refused(w) => w.errno(),
        SetError::NoTree(_) => libc::ENOENT,
        SetError::NotPickedUp(_) => libc::ETIMEDOUT,
        SetError::Io(io) => io.raw_os_error().unwrap_or(libc::EIO),
    }
}

impl Filesystem for KsmFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let ino = match parent {
            KSM => attrs().find(|(_, a)| OsStr::new(a.name) == name).map(|(i, _)| i),
            _ => DIRS.iter().find(|d| d.1 == parent && d.0 != ROOT && OsStr::new(d.2) == name).map(|d| d.0),
        };
        match ino.and_then(|i| self.stat(i)) {
            Some(st) => reply.entry(&TTL, &st, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.stat(ino) {
            Some(st) => reply.attr(&TTL, &st),
            None => reply.error(libc::ENOENT),
        }
    }

    /// `O_TRUNC` of `echo v > file` arrives as a truncation: nothing to do
    /// (sysfs ignores it too).
    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        match self.stat(ino) {
            Some(st) => reply.attr(&TTL, &st),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let Some(a) = self.attr(ino) else { return reply.error(libc::ENOENT) };
        if flags & libc::O_ACCMODE != libc::O_RDONLY && !a.writable {
            return reply.error(libc::EACCES);
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.opened.insert(fh, Vec::new());
        // Every read comes here: the page cache would show old values.
        reply.opened(fh, fuser::consts::FOPEN_DIRECT_IO);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(a) = self.attr(ino) else { return reply.error(libc::ENOENT) };
        // As sysfs: the content is made at a read from offset 0 and served
        // from there until the next one.
        if offset == 0 {
            match self.content(a) {
                Ok(c) => {
                    self.opened.insert(fh, c);
                }
                Err(e) => return reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        }
        let c = self.opened.get(&fh).map(Vec::as_slice).unwrap_or_default();
        let from = (offset.max(0) as usize).min(c.len());
        let to = from.saturating_add(size as usize).min(c.len());
        reply.data(&c[from..to]);
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Some(a) = self.attr(ino) else { return reply.error(libc::ENOENT) };
        if !a.writable {
            return reply.error(libc::EACCES);
        }
        match self.tree.set(a.name, data, WRITE_WAIT) {
            Ok(_) => {
                if !(self.republish)() {
                    log::warn!("twinpaged: the counters after the write to {} are not published yet", a.name);
                }
                reply.written(data.len() as u32)
            }
            Err(e) => {
                log::info!("twinpaged: write of {:?} to {} refused: {e}", String::from_utf8_lossy(data), a.name);
                reply.error(errno_of(&e))
            }
        }
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        self.opened.remove(&fh);
        reply.ok();
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let Some(&(_, parent, _)) = DIRS.iter().find(|d| d.0 == ino) else { return reply.error(libc::ENOTDIR) };
        let mut entries: Vec<(u64, FileType, String)> =
            vec![(ino, FileType::Directory, ".".into()), (parent, FileType::Directory, "..".into())];
        if ino == KSM {
            entries.extend(attrs().filter(|(i, _)| self.attr(*i).is_some()).map(|(i, a)| (i, FileType::RegularFile, a.name.to_string())));
        } else {
            entries.extend(DIRS.iter().filter(|d| d.1 == ino && d.0 != ROOT).map(|d| (d.0, FileType::Directory, d.2.to_string())));
        }
        for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(i, k as i64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
