//! The KSM tunables, with the kernel's defaults and write rules (except `run`,
//! which starts at 1: preloading twinpage is the opt-in).

use crate::primitive::{AtomicU64, Ordering};
use kernel_compat::{Value, WriteContext, WriteError};

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

impl Tunables {
    /// Writes attribute `name` of `/sys/kernel/mm/ksm` with the kernel's
    /// parsing and rules (`pages_shared` as the kernel checks it for
    /// `max_page_sharing`); a refused value changes nothing.
    pub fn write_attr(&self, name: &str, text: &str, pages_shared: u64, numa: bool) -> Result<(), WriteError> {
        let t = self;
        let ctx = WriteContext {
            pages_shared,
            advisor_on: t.advisor_mode() == AdvisorMode::ScanTime,
            run: t.run(),
            max_page_sharing: t.max_page_sharing(),
            merge_across_nodes: t.merge_across_nodes(),
            numa,
        };
        let v = kernel_compat::parse_write(name, text, &ctx)?;
        let busy = |r: Result<(), TunableError>| {
            r.map_err(|e| match e {
                TunableError::Inval => WriteError::Inval,
                TunableError::Busy => WriteError::Busy,
            })
        };
        match v {
            Value::Run(x) => busy(t.set_run(x))?,
            Value::PagesToScan(x) => busy(t.set_pages_to_scan(x))?,
            Value::SleepMillisecs(x) => t.set_sleep_millisecs(x),
            Value::UseZeroPages(x) => t.set_use_zero_pages(x),
            Value::MaxPageSharing(x) => busy(t.set_max_page_sharing(x, pages_shared))?,
            Value::MergeAcrossNodes(x) => t.set_merge_across_nodes(x),
            Value::SmartScan(x) => t.set_smart_scan(x),
            Value::StableNodeChainsPruneMillisecs(x) => t.set_stable_node_chains_prune_millisecs(x),
            Value::AdvisorMode(m) => {
                let m = match m {
                    kernel_compat::AdvisorMode::None => AdvisorMode::None,
                    kernel_compat::AdvisorMode::ScanTime => AdvisorMode::ScanTime,
                };
                if m != t.advisor_mode() {
                    // The kernel resets pages_to_scan when the advisor turns on or off.
                    t.set_advisor_mode(AdvisorMode::None);
                    let pts = match m {
                        AdvisorMode::None => 100,
                        AdvisorMode::ScanTime => t.advisor_min_pages_to_scan() as u32,
                    };
                    busy(t.set_pages_to_scan(pts))?;
                    t.set_advisor_mode(m);
                }
            }
            Value::AdvisorMaxCpu(x) => t.set_advisor_max_cpu(x),
            Value::AdvisorMinPagesToScan(x) => t.set_advisor_min_pages_to_scan(x),
            Value::AdvisorMaxPagesToScan(x) => t.set_advisor_max_pages_to_scan(x),
            Value::AdvisorTargetScanTime(x) => t.set_advisor_target_scan_time(x),
        }
        Ok(())
    }
}

/// What reading attribute `name` of `/sys/kernel/mm/ksm` prints (without the
/// newline) for tunables `t` and counters `s`; `None` for a name the kernel
/// does not have (`merge_across_nodes` only exists with NUMA).
pub fn show_attr(t: &Tunables, s: &crate::KsmStats, name: &str, numa: bool) -> Option<String> {
        let v = match name {
            "run" => t.run().to_string(),
            "pages_to_scan" => t.pages_to_scan().to_string(),
            "sleep_millisecs" => t.sleep_millisecs().to_string(),
            "use_zero_pages" => u8::from(t.use_zero_pages()).to_string(),
            "max_page_sharing" => t.max_page_sharing().to_string(),
            "merge_across_nodes" if numa => t.merge_across_nodes().to_string(),
            "smart_scan" => u8::from(t.smart_scan()).to_string(),
            "stable_node_chains_prune_millisecs" => t.stable_node_chains_prune_millisecs().to_string(),
            "advisor_mode" => kernel_compat::format_advisor_mode(match t.advisor_mode() {
                AdvisorMode::None => kernel_compat::AdvisorMode::None,
                AdvisorMode::ScanTime => kernel_compat::AdvisorMode::ScanTime,
            }),
            "advisor_max_cpu" => t.advisor_max_cpu().to_string(),
            "advisor_min_pages_to_scan" => t.advisor_min_pages_to_scan().to_string(),
            "advisor_max_pages_to_scan" => t.advisor_max_pages_to_scan().to_string(),
            "advisor_target_scan_time" => t.advisor_target_scan_time().to_string(),
            "pages_shared" => s.pages_shared.to_string(),
            "pages_sharing" => s.pages_sharing.to_string(),
            "pages_unshared" => s.pages_unshared.to_string(),
            "pages_volatile" => s.pages_volatile.to_string(),
            "pages_scanned" => s.pages_scanned.to_string(),
            "pages_skipped" => s.pages_skipped.to_string(),
            "full_scans" => s.full_scans.to_string(),
            "ksm_zero_pages" => s.ksm_zero_pages.to_string(),
            "general_profit" => s.general_profit.to_string(),
            "stable_node_chains" => s.stable_node_chains.to_string(),
            "stable_node_dups" => s.stable_node_dups.to_string(),
            _ => return None,
        };
        Some(v)
}
