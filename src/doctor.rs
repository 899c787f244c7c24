//! `twinpage doctor`: the facts about a host that decide whether twinpage
//! can be safe and useful there, each with what fixes it.

use std::path::Path;

use crate::statsfs::{ProcessEntry, Tree};

/// How a fact stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One checked fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    /// What was checked, one word (`kernel`, `max_map_count`, ...).
    pub topic: &'static str,
    pub fact: String,
    /// What to do about it (empty when nothing).
    pub fix: String,
}

fn finding(level: Level, topic: &'static str, fact: String, fix: impl Into<String>) -> Finding {
    Finding { level, topic, fact, fix: fix.into() }
}

/// Every check, against the tree at `tree`.
pub fn check(tree: &Tree) -> Vec<Finding> {
    let processes: Vec<ProcessEntry> = tree.processes().unwrap_or_default().into_iter().filter(|p| p.live).collect();
    vec![
        kernel(),
        userfaultfd(),
        max_map_count(&processes),
        thp(),
        kernel_ksm(&processes),
        daemon(tree),
        sysfs_view(tree),
        store_dir(),
        first_writes(tree),
    ]
}

/// `(major, minor)` of a kernel release such as `6.8.0-45-generic`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn kernel() -> Finding {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    match parse_release(release) {
        Some(v) if v >= (6, 8) => {
            finding(Level::Ok, "kernel", format!("Linux {release} has UFFDIO_MOVE, the pin check every writable merge needs"), "")
        }
        Some(_) => finding(
            Level::Error,
            "kernel",
            format!("Linux {release} has no UFFDIO_MOVE: writable memory (all guest RAM) never merges, only read-only mappings do"),
            "run Linux 6.8 or later",
        ),
        None => finding(Level::Warning, "kernel", format!("cannot read the kernel release ({release:?})"), ""),
    }
}

fn userfaultfd() -> Finding {
    match crate::sys::uffd::Userfaultfd::open() {
        Ok(_) => finding(Level::Ok, "userfaultfd", "this user can open a userfaultfd with write-protection".into(), ""),
        Err(e) => finding(
            Level::Error,
            "userfaultfd",
            format!("this user cannot open a userfaultfd with write-protection: {e}; preloaded processes of this user run unmerged"),
            "run QEMU as root, or give its user /dev/userfaultfd (e.g. `setfacl -m u:libvirt-qemu:rw /dev/userfaultfd`), or `sysctl -w vm.unprivileged_userfaultfd=1`",
        ),
    }
}

fn max_map_count(processes: &[ProcessEntry]) -> Finding {
    let Ok(now) = crate::maplimit::read() else {
        return finding(Level::Warning, "max_map_count", "cannot read vm.max_map_count".into(), "");
    };
    let held = crate::maplimit::held_back(processes);
    match crate::maplimit::need(processes) {
        Some(need) if need.exceeds(now) => finding(
            Level::Warning,
            "max_map_count",
            format!(
                "vm.max_map_count={now} is below what pid {} ({}, {} registered pages) can need ({}){}; each merged page that stands alone costs a mapping",
                need.pid,
                need.comm,
                need.registered,
                need.max_map_count,
                if held > 0 { format!(", and {held} pages are held back now") } else { String::new() }
            ),
            format!("`sysctl -w vm.max_map_count={}` (twinpaged running as root does it itself)", need.max_map_count),
        ),
        Some(_) => finding(Level::Ok, "max_map_count", format!("vm.max_map_count={now} covers the registered memory"), ""),
        None if now < 1 << 20 => finding(
            Level::Warning,
            "max_map_count",
            format!(
                "vm.max_map_count={now}: about {} MiB of scattered duplicates per process can merge (kernel KSM has no such limit)",
                (crate::map_budget::MapBudget::limit_for(now as usize) * crate::sys::PAGE_SIZE) >> 20
            ),
            "`sysctl -w vm.max_map_count=1048576` (Fedora's, Ubuntu's and Arch's default), or run twinpaged as root",
        ),
        None => finding(Level::Ok, "max_map_count", format!("vm.max_map_count={now}"), ""),
    }
}

fn thp() -> Finding {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let chosen = mode.split_whitespace().find(|w| w.starts_with('[')).map(|w| w.trim_matches(['[', ']']).to_string());
    match chosen.as_deref() {
        Some("always") => finding(
            Level::Warning,
            "thp",
            "transparent huge pages: always: khugepaged may collapse ranges twinpage has just split to merge, and they are merged again"
                .into(),
            "`echo madvise > /sys/kernel/mm/transparent_hugepage/enabled` (QEMU asks for huge pages where it wants them)",
        ),
        Some(m) => finding(Level::Ok, "thp", format!("transparent huge pages: {m}"), ""),
        None => finding(Level::Ok, "thp", "no transparent huge pages".into(), ""),
    }
}

/// Processes the kernel's KSM merges now: `(pid, comm, pages)`.
fn kernel_merged() -> Vec<(u32, String, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let pages: u64 = std::fs::read_to_string(format!("/proc/{pid}/ksm_merging_pages")).ok()?.trim().parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
        (pages > 0).then_some((pid, comm, pages))
    })
    .collect()
}

fn kernel_ksm(processes: &[ProcessEntry]) -> Finding {
    let ksm = Path::new("/sys/kernel/mm/ksm/run");
    let run = std::fs::read_to_string(ksm).unwrap_or_default();
    if run.trim() != "1" {
        return finding(Level::Ok, "kernel_ksm", format!("kernel KSM is not running (run={})", run.trim()), "");
    }
    let merged = kernel_merged();
    let both: Vec<String> = merged
        .iter()
        .filter(|(pid, ..)| processes.iter().any(|p| p.pid == *pid))
        .map(|(pid, comm, n)| format!("{pid} ({comm}, {n} pages)"))
        .collect();
    if !both.is_empty() {
        return finding(
            Level::Error,
            "kernel_ksm",
            format!("kernel KSM and twinpage both merge the same processes: {}", both.join(", ")),
            "stop one: `echo 2 > /sys/kernel/mm/ksm/run` (kernel KSM), or start those processes without the preload",
        );
    }
    if merged.is_empty() {
        return finding(Level::Ok, "kernel_ksm", "kernel KSM runs, merging nothing now".into(), "");
    }
    let list: Vec<String> = merged.iter().take(8).map(|(pid, comm, n)| format!("{pid} ({comm}, {n} pages)")).collect();
    finding(
        Level::Warning,
        "kernel_ksm",
        format!("kernel KSM is merging processes twinpage does not see: {}; guests started without the preload are merged there, apart from twinpage's", list.join(", ")),
        "start every guest with the preload and `echo 2 > /sys/kernel/mm/ksm/run`, or leave it if those are not guests",
    )
}

/// The command that starts twinpaged on `tree` with its sysfs view.
fn start_command(tree: &Tree) -> String {
    format!("`twinpaged --dir {0} --sysfs {0}/sysfs`", tree.root().display())
}

fn daemon(tree: &Tree) -> Finding {
    let sock = std::env::var_os("TWINPAGE_SOCKET").map_or_else(|| tree.root().join("twinpaged.sock"), Into::into);
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        finding(Level::Ok, "twinpaged", format!("twinpaged listens on {}: guests share pages with each other", sock.display()), "")
    } else {
        finding(
            Level::Warning,
            "twinpaged",
            format!("no twinpaged on {}: each process merges only its own pages, nothing is shared between guests", sock.display()),
            format!("{} (or `systemctl enable --now twinpaged`)", start_command(tree)),
        )
    }
}

/// Mount points of twinpaged's sysfs views (FUSE, source `twinpage`), as this
/// process's mount namespace shows them: a view mounted in a namespace of its
/// own (a unit with `ProtectSystem=`) is not there for the programs on the host.
fn views(mountinfo: &str) -> Vec<std::path::PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (fields, fs) = l.split_once(" - ")?;
            let mut fs = fs.split(' ');
            // fuser's own mount (no libfuse) sets no subtype: `fuse twinpage`.
            let ours = matches!((fs.next()?, fs.next()?), ("fuse.twinpage", _) | ("fuse", "twinpage"));
            ours.then(|| fields.split(' ').nth(4).map(|p| p.replace("\\040", " ").into()))?
        })
        .collect()
}

fn sysfs_view(tree: &Tree) -> Finding {
    let found = views(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    let (live, stale): (Vec<_>, Vec<_>) = found
        .iter()
        .partition(|v| std::fs::metadata(v.join("kernel/mm/ksm/run")).map_or_else(|e| e.raw_os_error() != Some(libc::ENOTCONN), |_| true));
    if let Some(v) = stale.first() {
        return finding(
            Level::Warning,
            "sysfs",
            format!("the sysfs view at {} is stale (its twinpaged was killed): reads fail with ENOTCONN", v.display()),
            format!("start twinpaged again with the same --sysfs (it takes the stale mount away), or `umount -l {}`", v.display()),
        );
    }
    if live.is_empty() {
        return finding(
            Level::Warning,
            "sysfs",
            format!(
                "no twinpaged sysfs view is mounted: a write to {}/kernel/mm/ksm returns at once even with a bad value (refused later, in twinpage/last_error), and a counter can be read torn",
                tree.root().display()
            ),
            format!("{} (the installed unit does); point programs and node_exporter (--path.sysfs) at that directory", start_command(tree)),
        );
    }
    let list: Vec<String> = live.iter().map(|v| format!("{}/kernel/mm/ksm", v.display())).collect();
    finding(Level::Ok, "sysfs", format!("{} answers as sysfs does: a bad write fails with the kernel's errno", list.join(", ")), "")
}

fn store_dir() -> Finding {
    let Some(dir) = std::env::var_os("TWINPAGE_STORE_DIR").map(std::path::PathBuf::from) else {
        return finding(Level::Ok, "store", "stores are memfds (TWINPAGE_STORE_DIR unset): they grow with the merged pages".into(), "");
    };
    match crate::sys::memfd::is_tmpfs(&dir) {
        Ok(true) => {
            let free = nix::sys::statvfs::statvfs(&dir).map_or(0, |st| st.blocks_available() * st.fragment_size());
            finding(Level::Ok, "store", format!("TWINPAGE_STORE_DIR={} is tmpfs with {} MiB free", dir.display(), free >> 20), "")
        }
        Ok(false) => finding(
            Level::Error,
            "store",
            format!("TWINPAGE_STORE_DIR={} is not tmpfs: userfaultfd cannot write-protect its pages, twinpage refuses it", dir.display()),
            "point it at a tmpfs (e.g. `mount -t tmpfs -o size=4G tmpfs /run/twinpage-store`)",
        ),
        Err(e) => finding(Level::Error, "store", format!("TWINPAGE_STORE_DIR={}: {e}", dir.display()), "create it on a tmpfs"),
    }
}

/// First writes to merged pages so far (every process of the tree, exited
/// ones too): a page the kernel copied in place, because the fault thread
/// waited 200 ms for a region a scan batch held, never merges again.
fn first_writes(tree: &Tree) -> Finding {
    let Ok(stats) = tree.twinpage_stats() else {
        return finding(Level::Ok, "first_writes", format!("no counters in {} yet", tree.root().display()), "");
    };
    let get = |name: &str| stats.get(name).copied().unwrap_or(0);
    let (all, in_place) = (get("twinpage_cow_breaks"), get("twinpage_cow_in_place"));
    if in_place == 0 {
        return finding(
            Level::Ok,
            "first_writes",
            format!("{all} first writes to merged pages, each given an anonymous page of its own by the fault thread"),
            "",
        );
    }
    finding(
        Level::Warning,
        "first_writes",
        format!(
            "{in_place} of {all} first writes to merged pages were copied in place by the kernel: the fault thread waited 200 ms \
             for a region a scan batch held (a busy host, or a slow twinpaged); those pages never merge again, and each \
             keeps a store page index out of use for the life of the store"
        ),
        "scan less per wake (a lower pages_to_scan or a longer sleep_millisecs), or give the guests' hosts and twinpaged more CPU",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_release("6.8.0-45-generic"), Some((6, 8)));
        assert_eq!(parse_release("6.18.1"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0"), Some((5, 15)));
        assert!(parse_release("6.7.12").unwrap() < (6, 8));
        assert_eq!(parse_release("x"), None);
    }

    #[test]
    fn views_are_the_twinpage_fuse_mounts_of_mountinfo() {
        let info = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    90 25 0:52 / /run/twinpage/sysfs rw,nosuid,nodev - fuse twinpage rw,user_id=0\n\
                    91 25 0:53 / /srv/a\\040b rw - fuse.twinpage twinpage rw\n\
                    92 25 0:54 / /mnt/x rw - fuse.sshfs host: rw\n\
                    93 25 0:55 / /mnt/y rw - fuse other rw\n";
        let v = views(info);
        assert_eq!(v, [std::path::PathBuf::from("/run/twinpage/sysfs"), std::path::PathBuf::from("/srv/a b")]);
    }
}
