//! Kernel KSM as the oracle: the same steps on `/sys/kernel/mm/ksm` and on
//! twinpage in one test.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

pub const KSM: &str = "/sys/kernel/mm/ksm";

pub fn ksm_read(name: &str) -> u64 {
    std::fs::read_to_string(Path::new(KSM).join(name)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

pub fn ksm_write(name: &str, value: &str) {
    std::fs::write(Path::new(KSM).join(name), value).unwrap_or_else(|e| panic!("{KSM}/{name} <- {value}: {e}"));
}

/// Kernel KSM merging flat out while it lives; on drop it unmerges
/// everything (`run=2`) and puts the host's settings back.
pub struct KernelKsm {
    saved: Vec<(&'static str, String)>,
    /// One test of a binary drives the kernel's KSM at a time.
    _one: MutexGuard<'static, ()>,
}

static ONE: Mutex<()> = Mutex::new(());

impl KernelKsm {
    pub fn flat_out() -> KernelKsm {
        let one = ONE.lock().unwrap_or_else(|e| e.into_inner());
        // `advisor_mode` first (pages_to_scan cannot be written while the
        // advisor is on; switching it resets pages_to_scan), `run` last.
        let saved = [
            "advisor_mode",
            "advisor_max_pages_to_scan",
            "advisor_target_scan_time",
            "pages_to_scan",
            "sleep_millisecs",
            "use_zero_pages",
            "max_page_sharing",
            "smart_scan",
            "run",
        ]
        .into_iter()
        .filter(|n| Path::new(KSM).join(n).exists())
        .map(|n| {
            let v = std::fs::read_to_string(Path::new(KSM).join(n)).unwrap().trim().to_string();
            // "[none] scan-time" is written back as "none".
            let v = v.split_whitespace().find(|w| w.starts_with('[')).map_or(v.clone(), |w| w.trim_matches(['[', ']']).to_string());
            (n, v)
        })
        .collect();
        ksm_write("run", "2"); // start from nothing merged
        ksm_write("advisor_mode", "none");
        ksm_write("pages_to_scan", "100000");
        ksm_write("sleep_millisecs", "0");
        KernelKsm { saved, _one: one }
    }

    /// Sets a tunable until drop.
    pub fn set(&self, name: &str, value: &str) {
        ksm_write(name, value);
    }

    pub fn start(&self) {
        ksm_write("run", "1");
    }

    /// Waits until `full_scans` has moved by `n` from now (ksmd's barrier).
    pub fn wait_full_scans(&self, n: u64, timeout: std::time::Duration) -> bool {
        let from = ksm_read("full_scans");
        super::wait_until(timeout, || ksm_read("full_scans") >= from + n)
    }
}

impl Drop for KernelKsm {
    fn drop(&mut self) {
        let _ = std::fs::write(Path::new(KSM).join("run"), "2");
        for (n, v) in &self.saved {
            let _ = std::fs::write(Path::new(KSM).join(n), v);
        }
    }
}

pub fn kernel_ksm_writable() -> bool {
    std::fs::OpenOptions::new().write(true).open(Path::new(KSM).join("run")).is_ok()
}
