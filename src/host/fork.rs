//! What the child of a fork does before it returns to the program: give
//! every inherited mapping of a store a private anonymous copy, so that the
//! parent freeing or reusing a store page can never change the child's
//! memory.
//!
//! The parent may have had many threads, and any of them may have held a
//! lock at the fork (a logger's, std's stderr, the engine's); in the child
//! that thread is gone and the lock stays held. So nothing here allocates,
//! takes a lock other than by trying, or logs through `log`: maps are read
//! with raw system calls into a buffer on the stack, and an error is written
//! straight to fd 2.

use std::sync::Mutex;

use crate::sys::file::{parse_radix, FileId};
use crate::Engine;

/// Stores one process can have mapped: its own and each daemon's it was
/// linked to (one per daemon restart).
const MAX_STORES: usize = 16;
/// Store mappings converted per pass over `/proc/self/maps`.
const MAX_RANGES: usize = 1024;

/// The stores' identities, copied before the fork by the forking thread (in
/// the parent, where locks and allocation are fine), read by the child.
static STORES: Mutex<([FileId; MAX_STORES], usize)> = Mutex::new(([FileId { major: 0, minor: 0, inode: 0 }; MAX_STORES], 0));

/// Before the fork, in the parent (a `pthread_atfork` prepare handler):
/// which files are `engine`'s stores.
pub fn remember_stores(engine: &Engine) {
    let ids = engine.store_ids();
    let mut s = STORES.lock().unwrap_or_else(|e| e.into_inner());
    let n = ids.len().min(MAX_STORES);
    s.0[..n].copy_from_slice(&ids[..n]);
    s.1 = n;
}

/// In the child (a `pthread_atfork` child handler): every readable private
/// mapping of a store becomes private anonymous memory with the same content.
pub fn copy_inherited_store_mappings() {
    let Ok(stores) = STORES.try_lock() else {
        raw_warn(b"twinpage: a forked child cannot tell which mappings are merged memory; they stay shared with the parent\n");
        return;
    };
    let (ids, n) = *stores;
    drop(stores);
    let ids = &ids[..n];
    if ids.is_empty() {
        return;
    }
    loop {
        let mut ranges = [(0usize, 0usize, 0 as libc::c_int); MAX_RANGES];
        let Some(found) = store_mappings(ids, &mut ranges) else {
            raw_warn(b"twinpage: a forked child cannot read /proc/self/maps; merged memory stays shared with the parent\n");
            return;
        };
        let mut copied = 0;
        for &(start, end, prot) in &ranges[..found] {
            // SAFETY: in the child right after fork only this thread runs; the
            // range is an inherited store mapping, readable, and keeps its content.
            match unsafe { crate::merge::replace_with_anon_copy(start, end - start, prot) } {
                Ok(()) => copied += 1,
                Err(_) => raw_warn(b"twinpage: a forked child cannot copy some merged memory; it stays shared with the parent\n"),
            }
        }
        // A full batch may have left more; a pass that copied nothing would
        // only find the same ones again.
        if found < MAX_RANGES || copied == 0 {
            return;
        }
    }
}

/// Fills `out` with the readable private mappings of the stores `ids`, in
/// address order, as many as fit; None if maps cannot be read.
fn store_mappings(ids: &[FileId], out: &mut [(usize, usize, libc::c_int)]) -> Option<usize> {
    use nix::errno::Errno;
    use nix::fcntl::{open, OFlag};
    // A `CStr` path: nix passes it on without allocating.
    let fd = open(c"/proc/self/maps", OFlag::O_RDONLY | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty()).ok()?;
    let mut buf = [0u8; 16384];
    let (mut len, mut found, mut ok) = (0usize, 0usize, true);
    loop {
        let r = match nix::unistd::read(&fd, &mut buf[len..]) {
            Ok(r) => r,
            Err(Errno::EINTR) => continue,
            Err(_) => {
                ok = false;
                break;
            }
        };
        let eof = r == 0;
        len += r;
        let mut at = 0;
        while let Some(nl) = buf[at..len].iter().position(|&b| b == b'\n') {
            if found < out.len() {
                if let Some(m) = store_mapping(&buf[at..at + nl], ids) {
                    out[found] = m;
                    found += 1;
                }
            }
            at += nl + 1;
        }
        if eof {
            break;
        }
        // A line longer than the buffer (none is: paths are at most 4096
        // bytes) is dropped rather than read forever.
        at = if at == 0 && len == buf.len() { len } else { at };
        buf.copy_within(at..len, 0);
        len -= at;
    }
    ok.then_some(found)
}

/// `(start, end, prot)` of a maps line that is a readable private mapping of
/// one of the stores `ids`.
fn store_mapping(line: &[u8], ids: &[FileId]) -> Option<(usize, usize, libc::c_int)> {
    let mut f = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let (range, perms, _offset, dev, inode) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let id = FileId::parse_maps(dev, inode)?;
    if !ids.contains(&id) || perms.len() < 4 || perms[0] != b'r' || perms[3] != b'p' {
        return None;
    }
    let dash = range.iter().position(|&b| b == b'-')?;
    let start = usize::try_from(parse_radix(&range[..dash], 16)?).ok()?;
    let end = usize::try_from(parse_radix(&range[dash + 1..], 16)?).ok()?;
    let prot = libc::PROT_READ | if perms[1] == b'w' { libc::PROT_WRITE } else { 0 } | if perms[2] == b'x' { libc::PROT_EXEC } else { 0 };
    (start < end).then_some((start, end, prot))
}

/// Writes `msg` to stderr with one system call (no lock, no allocation).
fn raw_warn(msg: &[u8]) {
    let _ = nix::unistd::write(std::io::stderr(), msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_maps_line_of_a_store_is_recognised_by_device_and_inode() {
        let id = FileId { major: 0, minor: 1, inode: 4242 };
        let line = b"7f0000000000-7f0000004000 rw-p 00000000 00:01 4242                       /dev/shm/#4242 (deleted)";
        assert_eq!(store_mapping(line, &[id]), Some((0x7f00_0000_0000, 0x7f00_0000_4000, libc::PROT_READ | libc::PROT_WRITE)));
        let other = FileId { inode: 4243, ..id };
        assert_eq!(store_mapping(line, &[other]), None);
        let shared = b"7f0000000000-7f0000004000 rw-s 00000000 00:01 4242 /memfd:twinpage-store (deleted)";
        assert_eq!(store_mapping(shared, &[id]), None, "the agent's own shared view is not guest memory");
        let none = b"7f0000000000-7f0000004000 ---p 00000000 00:01 4242 /memfd:twinpage-store (deleted)";
        assert_eq!(store_mapping(none, &[id]), None);
    }
}
