//! `/proc/self/maps` and `smaps`: what kind of mapping a registered range is,
//! and how many mappings the process has.

use std::fs;
use std::io::{self, Read};

/// What a mapping is, as far as merging is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappingKind {
    /// Private anonymous memory (heap, stack, `MAP_ANONYMOUS|MAP_PRIVATE`).
    Anon,
    /// A `MAP_PRIVATE` file mapping (tmpfs/memfd or disk).
    PrivateFile,
    /// A `MAP_SHARED` mapping: refused, as the kernel refuses it.
    Shared,
}

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    pub start: usize,
    pub end: usize,
    pub prot: libc::c_int,
    pub kind: MappingKind,
    pub offset: u64,
    pub path: String,
    /// `VmFlags` of smaps that twinpage reapplies after a remap.
    pub dontfork: bool,
    pub dontdump: bool,
    /// Locked (`lo` in `VmFlags`: mlock, mlockall).
    pub locked: bool,
    /// Registered with a userfaultfd (`um`, `uw` or `ui` in `VmFlags`).
    pub userfaultfd: bool,
    /// The mapped file (all zero for anonymous memory).
    pub file: crate::sys::file::FileId,
}

impl Vma {
    /// A private mapping of one of the files `stores` (a store of merged
    /// pages, known by device and inode: its name may be a deleted file's).
    /// Such a mapping stands for the private anonymous memory it replaced.
    pub fn is_store_mapping(&self, stores: &[crate::sys::file::FileId]) -> bool {
        self.kind == MappingKind::PrivateFile && stores.contains(&self.file)
    }
}

fn parse_line(line: &str) -> Option<Vma> {
    let mut it = line.split_ascii_whitespace();
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?;
    let inode_field = it.next()?;
    let inode: u64 = inode_field.parse().ok()?;
    let file = crate::sys::file::FileId::parse_maps(dev.as_bytes(), inode_field.as_bytes())?;
    let path = it.collect::<Vec<_>>().join(" ");
    let (s, e) = range.split_once('-')?;
    let start = usize::from_str_radix(s, 16).ok()?;
    let end = usize::from_str_radix(e, 16).ok()?;
    if perms.len() < 4 {
        return None;
    }
    let mut prot = 0;
    if perms[0] == b'r' {
        prot |= libc::PROT_READ;
    }
    if perms[1] == b'w' {
        prot |= libc::PROT_WRITE;
    }
    if perms[2] == b'x' {
        prot |= libc::PROT_EXEC;
    }
    let kind = if perms[3] == b's' {
        MappingKind::Shared
    } else if inode == 0 {
        MappingKind::Anon
    } else {
        MappingKind::PrivateFile
    };
    Some(Vma { start, end, prot, kind, offset, path, dontfork: false, dontdump: false, locked: false, userfaultfd: false, file })
}

/// The mappings overlapping `[start, end)`, in address order, from
/// /proc/self/maps (cheap); `dontfork`/`dontdump` are left false.
pub fn vmas_in(start: usize, end: usize) -> io::Result<Vec<Vma>> {
    let text = fs::read_to_string("/proc/self/maps")?;
    Ok(text.lines().filter_map(parse_line).filter(|v| v.end > start && v.start < end).collect())
}

/// As [`vmas_in`], with `VmFlags` from /proc/self/smaps. smaps walks the page
/// tables of every mapping of the process, so it is read only where the flags
/// matter (large ranges such as guest RAM).
pub fn vmas_with_flags_in(start: usize, end: usize) -> io::Result<Vec<Vma>> {
    let text = fs::read_to_string("/proc/self/smaps")?;
    let mut out: Vec<Vma> = Vec::new();
    let mut current: Option<Vma> = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(mut v) = current.take() {
                v.dontfork = flags.split_ascii_whitespace().any(|f| f == "dc");
                v.dontdump = flags.split_ascii_whitespace().any(|f| f == "dd");
                v.locked = flags.split_ascii_whitespace().any(|f| f == "lo");
                v.userfaultfd = flags.split_ascii_whitespace().any(|f| matches!(f, "um" | "uw" | "ui"));
                out.push(v);
            }
            continue;
        }
        let first = line.split_ascii_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            if let Some(v) = parse_line(line) {
                current = (v.end > start && v.start < end).then_some(v);
            }
        }
    }
    out.extend(current);
    Ok(out)
}

/// Whether the mapping at `addr` is locked (`lo` in its smaps `VmFlags`),
/// None if nothing is mapped there. Reads smaps only up to that mapping
/// (the kernel walks each mapping's page tables as its lines are read).
pub fn locked_at(addr: usize) -> io::Result<Option<bool>> {
    use std::io::BufRead;
    let mut found = false;
    for line in io::BufReader::new(fs::File::open("/proc/self/smaps")?).lines() {
        let line = line?;
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if found {
                return Ok(Some(flags.split_ascii_whitespace().any(|f| f == "lo")));
            }
            continue;
        }
        let first = line.split_ascii_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            if let Some(v) = parse_line(&line) {
                if v.start > addr {
                    return Ok(None);
                }
                found = v.end > addr;
            }
        }
    }
    Ok(None)
}

/// How many mappings the process has (lines of /proc/self/maps).
pub fn map_count() -> io::Result<usize> {
    let mut f = fs::File::open("/proc/self/maps")?;
    let mut buf = vec![0u8; 1 << 16];
    let mut lines = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(lines);
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
    }
}

/// `vm.max_map_count`.
pub fn max_map_count() -> usize {
    fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65530)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let v = parse_line("7f0000000000-7f0000002000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(v.kind, MappingKind::Anon);
        assert_eq!(v.prot, libc::PROT_READ | libc::PROT_WRITE);
        let v = parse_line("7f0000000000-7f0000002000 rw-s 00001000 00:05 42 /dev/shm/x").unwrap();
        assert_eq!(v.kind, MappingKind::Shared);
        assert_eq!(v.offset, 0x1000);
        let v = parse_line("7f0000000000-7f0000002000 r--p 00000000 00:05 42 /memfd:x (deleted)").unwrap();
        assert_eq!(v.kind, MappingKind::PrivateFile);
        assert_eq!(v.path, "/memfd:x (deleted)");
    }
}
