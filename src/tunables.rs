//! The KSM tunables, with the kernel's defaults and write rules (except `run`,
//! which starts at 1: preloading twinpage is the opt-in).

use crate::primitive::{AtomicU64, Ordering};

/// Why a tunable write was refused; the names are the errno a sysfs write gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TunableError {
    #[error("EINVAL")]
    Inval,
    #[error("EBUSY")]
    Busy,
}

/// The scan-time advisor's mode (`advisor_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdvisorMode {
    None,
    ScanTime,
}

/// Tunables, read lock-free by the scanner on every wake.
#[derive(Debug)]
pub struct Tunables {
    run: AtomicU64,
    pages_to_scan: AtomicU64,
    sleep_millisecs: AtomicU64,
    use_zero_pages: AtomicU64,
    max_page_sharing: AtomicU64,
    smart_scan: AtomicU64,
    merge_across_nodes: AtomicU64,
    stable_node_chains_prune_millisecs: AtomicU64,
    advisor_mode: AtomicU64,
    advisor_max_cpu: AtomicU64,
    advisor_min_pages_to_scan: AtomicU64,
    advisor_max_pages_to_scan: AtomicU64,
    advisor_target_scan_time: AtomicU64,
}

impl Default for Tunables {
    fn default() -> Self {
        Self {
            run: AtomicU64::new(1),
            pages_to_scan: AtomicU64::new(100),
            sleep_millisecs: AtomicU64::new(20),
            use_zero_pages: AtomicU64::new(0),
            max_page_sharing: AtomicU64::new(256),
            smart_scan: AtomicU64::new(1),
            merge_across_nodes: AtomicU64::new(1),
            stable_node_chains_prune_millisecs: AtomicU64::new(2000),
            advisor_mode: AtomicU64::new(0),
            advisor_max_cpu: AtomicU64::new(70),
            advisor_min_pages_to_scan: AtomicU64::new(500),
            advisor_max_pages_to_scan: AtomicU64::new(30000),
            advisor_target_scan_time: AtomicU64::new(200),
        }
    }
}

macro_rules! getter {
    ($name:ident, $ty:ty) => {
        #[doc = concat!("Current `", stringify!($name), "`.")]
        pub fn $name(&self) -> $ty {
            self.$name.load(Ordering::Relaxed) as $ty
        }
    };
}

impl Tunables {
    getter!(run, u32);
    getter!(pages_to_scan, u32);
    getter!(sleep_millisecs, u32);
    getter!(max_page_sharing, u32);
    getter!(merge_across_nodes, u32);
    getter!(stable_node_chains_prune_millisecs, u32);
    getter!(advisor_max_cpu, u32);
    getter!(advisor_min_pages_to_scan, u64);
    getter!(advisor_max_pages_to_scan, u64);
    getter!(advisor_target_scan_time, u64);

    /// `use_zero_pages`.
    pub fn use_zero_pages(&self) -> bool {
        self.use_zero_pages.load(Ordering::Relaxed) != 0
    }
    /// `smart_scan`.
    pub fn smart_scan(&self) -> bool {
        self.smart_scan.load(Ordering::Relaxed) != 0
    }
    /// `advisor_mode`.
    pub fn advisor_mode(&self) -> AdvisorMode {
        if self.advisor_mode.load(Ordering::Relaxed) == 0 {
            AdvisorMode::None
        } else {
            AdvisorMode::ScanTime
        }
    }

    pub(crate) fn set_run(&self, v: u32) -> Result<(), TunableError> {
        if v > 2 {
            return Err(TunableError::Inval);
        }
        self.run.store(v.into(), Ordering::Relaxed);
        Ok(())
    }
    pub(crate) fn set_pages_to_scan(&self, v: u32) -> Result<(), TunableError> {
        if self.advisor_mode() != AdvisorMode::None {
            return Err(TunableError::Inval);
        }
        self.pages_to_scan.store(v.into(), Ordering::Relaxed);
        Ok(())
    }
    pub(crate) fn set_sleep_millisecs(&self, v: u32) {
        self.sleep_millisecs.store(v.into(), Ordering::Relaxed);
    }
    pub(crate) fn set_use_zero_pages(&self, v: bool) {
        self.use_zero_pages.store(v.into(), Ordering::Relaxed);
    }
    /// `pages_shared` is what the kernel checks: no change while pages are shared.
    pub(crate) fn set_max_page_sharing(&self, v: u32, pages_shared: u64) -> Result<(), TunableError> {
        if v < 2 {
            return Err(TunableError::Inval);
        }
        if u64::from(v) != self.max_page_sharing.load(Ordering::Relaxed) && pages_shared > 0 {
            return Err(TunableError::Busy);
        }
        self.max_page_sharing.store(v.into(), Ordering::Relaxed);
        Ok(())
    }
    pub(crate) fn set_smart_scan(&self, v: bool) {
        self.smart_scan.store(v.into(), Ordering::Relaxed);
    }
    pub(crate) fn set_merge_across_nodes(&self, v: u32) {
        self.merge_across_nodes.store(v.into(), Ordering::Relaxed);
    }
    pub(crate) fn set_stable_node_chains_prune_millisecs(&self, v: u32) {
        self.stable_node_chains_prune_millisecs.store(v.into(), Ordering::Relaxed);
    }
    pub(crate) fn set_advisor_mode(&self, m: AdvisorMode) {
        self.advisor_mode.store(u64::from(m == AdvisorMode::ScanTime), Ordering::Relaxed);
    }
    pub(crate) fn set_advisor_max_cpu(&self, v: u32) {
        self.advisor_max_cpu.store(v.into(), Ordering::Relaxed);
    }
    pub(crate) fn set_advisor_min_pages_to_scan(&self, v: u64) {
        self.advisor_min_pages_to_scan.store(v, Ordering::Relaxed);
    }
    pub(crate) fn set_advisor_max_pages_to_scan(&self, v: u64) {
        self.advisor_max_pages_to_scan.store(v, Ordering::Relaxed);
    }
    pub(crate) fn set_advisor_target_scan_time(&self, v: u64) {
        self.advisor_target_scan_time.store(v, Ordering::Relaxed);
    }
}
