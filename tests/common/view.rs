//! The daemon's sysfs view (`twinpaged --sysfs`) in tests: whether it can
//! be mounted here, and taking it away whatever happens.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::require;

/// Root and /dev/fuse, or a printed skip (a failure under `CI=true`).
pub fn fuse_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    require(root && Path::new("/dev/fuse").exists(), "root and /dev/fuse (the view is a FUSE mount)")
}

/// Whether something is mounted at `at`.
pub fn mounted(at: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts").unwrap().lines().any(|l| l.split(' ').nth(1) == Some(at.to_str().unwrap()))
}

/// Unmounts the view when the test ends, failed or not: a daemon killed by
/// `Kids` on a failed assertion leaves its mount behind.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}
