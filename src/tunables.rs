//! The KSM tunables, with the kernel's defaults and write rules (except `run`,
//! which starts at 1: preloading twinpage is the opt-in).

use crate::primitive::{AtomicU64, Ordering};
use kernel_compat::attrs::{Attr, Format, Parser};
use kernel_compat::{parse::sysfs_streq, Value, WriteContext, WriteError};

/// Why a tunable write was refused; the names are the errno a sysfs write gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TunableError {
    #[error("EINVAL")]
    Inval,
    #[error("EBUSY")]
    Busy,
}

/// The scan-time advisor's mode (`advisor_mode`): kernel-compat's, the one
/// model of the kernel's attribute.
pub use kernel_compat::AdvisorMode;

/// Which pages may merge (`twinpage_merge_mode`): the side-channel switch.
/// Pages that share one physical page leak through copy-on-write timing,
/// so an operator can narrow merging to pages whose content is no secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MergeMode {
    /// Every duplicate page merges (the default, as kernel KSM).
    All,
    /// Only all-zero pages merge, like Windows' "safe pages".
    ZeroOnly,
    /// Nothing merges; what was merged is unmerged.
    Off,
}

impl MergeMode {
    /// The choices in the order the attribute shows them.
    pub const ALL: [MergeMode; 3] = [MergeMode::All, MergeMode::ZeroOnly, MergeMode::Off];

    /// The word a write takes.
    pub fn as_str(self) -> &'static str {
        match self {
            MergeMode::All => "all",
            MergeMode::ZeroOnly => "zero-only",
            MergeMode::Off => "off",
        }
    }

    /// Parses a write as sysfs multi-choice attributes do (`sysfs_streq`:
    /// one trailing newline allowed, nothing else around the word).
    pub fn parse(text: &[u8]) -> Result<MergeMode, WriteError> {
        Self::ALL.into_iter().find(|m| sysfs_streq(m.as_str(), text)).ok_or(WriteError::Inval)
    }

    /// What reading the attribute prints: every choice, the current one in
    /// brackets (`[all] zero-only off`), as the kernel's multi-choice
    /// attributes (`advisor_mode`, THP's `enabled`) print.
    pub fn show(self) -> String {
        Self::ALL
            .iter()
            .map(|&m| if m == self { format!("[{}]", m.as_str()) } else { m.as_str().to_string() })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The current choice out of a shown value.
    pub fn from_show(text: &str) -> Option<MergeMode> {
        let word = text.trim_end_matches('\n').split(' ').find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))?;
        Self::parse(word.as_bytes()).ok()
    }

    /// Whether a page of this content may merge under the mode.
    pub fn allows(self, zero: bool) -> bool {
        match self {
            MergeMode::All => true,
            MergeMode::ZeroOnly => zero,
            MergeMode::Off => false,
        }
    }

    fn from_u64(v: u64) -> MergeMode {
        match v {
            0 => MergeMode::All,
            1 => MergeMode::ZeroOnly,
            _ => MergeMode::Off,
        }
    }

    fn to_u64(self) -> u64 {
        match self {
            MergeMode::All => 0,
            MergeMode::ZeroOnly => 1,
            MergeMode::Off => 2,
        }
    }
}

/// Name of the merge-mode attribute.
pub const MERGE_MODE: &str = "twinpage_merge_mode";

/// twinpage's own attributes, published beside the kernel's under
/// `kernel/mm/ksm` with a `twinpage_` prefix (the kernel has no such names).
/// `format`/`parser` are the nearest kernel kind (a multi-choice word);
/// writes go through [`model_write`], never the kernel's parser.
pub const TWINPAGE_ATTRS: &[Attr] = &[Attr {
    name: MERGE_MODE,
    writable: true,
    default: "[all] zero-only off",
    format: Format::AdvisorMode,
    parser: Some(Parser::AdvisorMode),
    raw_parse_errors: false,
    numa_only: false,
    doc: "which pages merge: all, zero-only (only all-zero pages) or off; a stricter mode unmerges what it no longer allows",
}];

/// Every attribute of the tree: the kernel's, then twinpage's own.
pub fn all_attrs() -> impl Iterator<Item = &'static Attr> {
    kernel_compat::ATTRS.iter().chain(TWINPAGE_ATTRS)
}

/// The attribute `name`, kernel's or twinpage's.
pub fn find_attr(name: &str) -> Option<&'static Attr> {
    all_attrs().find(|a| a.name == name)
}

/// Whether `name` is one of twinpage's own attributes.
pub fn is_twinpage_attr(name: &str) -> bool {
    TWINPAGE_ATTRS.iter().any(|a| a.name == name)
}

/// One `write(2)` of `bytes` to attribute `name`, judged as sysfs would
/// (kernel attributes by the kernel's rules, [`kernel_compat::model_write`];
/// twinpage's own by theirs): `Ok(None)` for a zero-length write, which
/// changes nothing, else the text to hand to `set_attr`.
pub fn model_write(name: &str, bytes: &[u8], ctx: &WriteContext) -> Result<Option<String>, WriteError> {
    if name == MERGE_MODE {
        if bytes.is_empty() {
            return Ok(None);
        }
        let chunk = &bytes[..bytes.len().min(kernel_compat::write::SYSFS_WRITE_MAX)];
        return MergeMode::parse(chunk).map(|m| Some(m.as_str().to_string()));
    }
    kernel_compat::model_write(name, bytes, ctx).map(|v| v.map(|v| v.to_write_text()))
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
    merge_mode: AtomicU64,
}

impl Default for Tunables {
    /// The kernel's defaults (kernel-compat's model holds them), except
    /// `run`: a process that loads twinpage asked for merging, so it is 1.
    fn default() -> Self {
        let k = kernel_compat::Tunables::default();
        let n = |v: u32| AtomicU64::new(u64::from(v));
        Self {
            run: AtomicU64::new(1),
            pages_to_scan: n(k.pages_to_scan),
            sleep_millisecs: n(k.sleep_millisecs),
            use_zero_pages: AtomicU64::new(u64::from(k.use_zero_pages)),
            max_page_sharing: n(k.max_page_sharing),
            smart_scan: AtomicU64::new(u64::from(k.smart_scan)),
            merge_across_nodes: n(k.merge_across_nodes),
            stable_node_chains_prune_millisecs: n(k.stable_node_chains_prune_millisecs),
            advisor_mode: AtomicU64::new(u64::from(k.advisor_mode == AdvisorMode::ScanTime)),
            advisor_max_cpu: n(k.advisor_max_cpu),
            advisor_min_pages_to_scan: AtomicU64::new(k.advisor_min_pages_to_scan),
            advisor_max_pages_to_scan: AtomicU64::new(k.advisor_max_pages_to_scan),
            advisor_target_scan_time: AtomicU64::new(k.advisor_target_scan_time),
            merge_mode: AtomicU64::new(MergeMode::All.to_u64()),
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

    /// `twinpage_merge_mode`.
    pub fn merge_mode(&self) -> MergeMode {
        MergeMode::from_u64(self.merge_mode.load(Ordering::Relaxed))
    }
    pub(crate) fn set_merge_mode(&self, m: MergeMode) {
        self.merge_mode.store(m.to_u64(), Ordering::Relaxed);
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
    /// The scan-time advisor's choice (`scan::advisor`), which no user may
    /// write while it is on.
    pub(crate) fn advise_pages_to_scan(&self, v: u32) {
        if self.advisor_mode() == AdvisorMode::ScanTime {
            self.pages_to_scan.store(v.into(), Ordering::Relaxed);
        }
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
        if name == MERGE_MODE {
            t.set_merge_mode(MergeMode::parse(text.as_bytes())?);
            return Ok(());
        }
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
        "advisor_mode" => kernel_compat::format_advisor_mode(t.advisor_mode()),
        "advisor_max_cpu" => t.advisor_max_cpu().to_string(),
        "advisor_min_pages_to_scan" => t.advisor_min_pages_to_scan().to_string(),
        "advisor_max_pages_to_scan" => t.advisor_max_pages_to_scan().to_string(),
        "advisor_target_scan_time" => t.advisor_target_scan_time().to_string(),
        MERGE_MODE => t.merge_mode().show(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_mode_parses_like_sysfs_and_shows_its_choices() {
        assert_eq!(MergeMode::parse(b"zero-only\n"), Ok(MergeMode::ZeroOnly));
        assert_eq!(MergeMode::parse(b"off"), Ok(MergeMode::Off));
        for bad in [&b""[..], b"\n", b" all", b"all ", b"all\n\n", b"ALL", b"zero_only", b"2"] {
            assert_eq!(MergeMode::parse(bad), Err(WriteError::Inval), "{bad:?}");
        }
        assert_eq!(MergeMode::ZeroOnly.show(), "all [zero-only] off");
        for m in MergeMode::ALL {
            assert_eq!(MergeMode::from_show(&m.show()), Some(m));
        }
        let t = Tunables::default();
        assert_eq!(t.write_attr(MERGE_MODE, "sometimes", 0, false), Err(WriteError::Inval));
        assert_eq!(t.merge_mode(), MergeMode::All);
        t.write_attr(MERGE_MODE, "off\n", 0, false).unwrap();
        assert_eq!(show_attr(&t, &crate::KsmStats::default(), MERGE_MODE, false).unwrap(), "all zero-only [off]");
        assert_eq!(model_write(MERGE_MODE, b"", &WriteContext::default()), Ok(None));
    }
}
