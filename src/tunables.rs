//! The KSM tunables, with the kernel's defaults and write rules (except `run`,
//! which starts at 1: preloading twinpage is the opt-in).

use crate::primitive::{AtomicU64, Mutex, Ordering};
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

/// Whether this kernel has NUMA (and so a `merge_across_nodes` attribute).
pub(crate) fn has_numa() -> bool {
    std::path::Path::new("/sys/devices/system/node/node0").exists()
}

/// The model an engine starts from: the kernel's defaults, except `run`
/// (1: a process that loads twinpage asked for merging).
pub(crate) fn default_model() -> kernel_compat::Tunables {
    kernel_compat::Tunables { run: 1, numa: has_numa(), ..kernel_compat::Tunables::default() }
}

/// The model as a stats tree's shared tunables show it (`shown(name)`, the
/// text every publisher agreed on), read back with the kernel's own reader
/// ([`kernel_compat::Tunables::from_shown`]); an attribute not published yet,
/// or whose text does not read back, keeps the engine's default.
pub(crate) fn model_from_shown<'a>(shown: impl Fn(&str) -> Option<&'a str>, numa: bool) -> kernel_compat::Tunables {
    let defaults = default_model();
    let reads_back = |name: &str, text: &str| kernel_compat::Tunables::from_shown([(name, text)]).is_ok();
    let pairs: Vec<(&'static str, String)> = defaults
        .values()
        .iter()
        .map(|v| match shown(v.name()) {
            Some(text) if reads_back(v.name(), text) => (v.name(), text.to_string()),
            _ => (v.name(), v.show()),
        })
        .collect();
    // Every pair reads back on its own, so together they do.
    let mut model = kernel_compat::Tunables::from_shown(pairs.iter().map(|(n, t)| (*n, t.as_str()))).unwrap_or(defaults);
    model.numa = numa;
    model
}

/// One write of `bytes` to attribute `name` judged against `model` and, if
/// accepted, applied to it with its side effects, parsing the value once.
/// twinpage's own attributes are judged by their rules and leave the model
/// as it is (it does not hold them).
pub(crate) fn write_into_model(model: &mut kernel_compat::Tunables, name: &str, bytes: &[u8]) -> Result<(), WriteError> {
    if name == MERGE_MODE {
        return model_write(name, bytes, &model.context(0)).map(drop);
    }
    if let Some(v) = kernel_compat::model_write(name, bytes, &model.context(0))? {
        model.apply(v);
    }
    Ok(())
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

/// The tunables of one engine (or of the daemon's broker). Every change goes
/// through kernel-compat's model of the kernel's (its defaults, its write
/// rules and their side effects: switching the advisor sets
/// `pages_to_scan`), held behind a lock; the scanner reads a mirror of it
/// in atomics on every wake, without the lock. `twinpage_merge_mode` is
/// twinpage's own and lives beside the model.
#[derive(Debug)]
pub struct Tunables {
    model: Mutex<kernel_compat::Tunables>,
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
    /// The kernel's defaults, except `run`: a process that loads twinpage
    /// asked for merging, so it is 1.
    fn default() -> Self {
        let model = default_model();
        let z = || AtomicU64::new(0);
        let t = Self {
            model: Mutex::new(model),
            run: z(),
            pages_to_scan: z(),
            sleep_millisecs: z(),
            use_zero_pages: z(),
            max_page_sharing: z(),
            smart_scan: z(),
            merge_across_nodes: z(),
            stable_node_chains_prune_millisecs: z(),
            advisor_mode: z(),
            advisor_max_cpu: z(),
            advisor_min_pages_to_scan: z(),
            advisor_max_pages_to_scan: z(),
            advisor_target_scan_time: z(),
            merge_mode: AtomicU64::new(MergeMode::All.to_u64()),
        };
        t.mirror(&model);
        t
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

    /// Copies the model into the atomics the scanner reads.
    fn mirror(&self, m: &kernel_compat::Tunables) {
        let set = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        set(&self.run, m.run.into());
        set(&self.pages_to_scan, m.pages_to_scan.into());
        set(&self.sleep_millisecs, m.sleep_millisecs.into());
        set(&self.use_zero_pages, m.use_zero_pages.into());
        set(&self.max_page_sharing, m.max_page_sharing.into());
        set(&self.smart_scan, m.smart_scan.into());
        set(&self.merge_across_nodes, m.merge_across_nodes.into());
        set(&self.stable_node_chains_prune_millisecs, m.stable_node_chains_prune_millisecs.into());
        set(&self.advisor_mode, u64::from(m.advisor_mode == AdvisorMode::ScanTime));
        set(&self.advisor_max_cpu, m.advisor_max_cpu.into());
        set(&self.advisor_min_pages_to_scan, m.advisor_min_pages_to_scan);
        set(&self.advisor_max_pages_to_scan, m.advisor_max_pages_to_scan);
        set(&self.advisor_target_scan_time, m.advisor_target_scan_time);
    }

    /// Changes the model with `f` and mirrors it; a refusal changes nothing.
    fn change(&self, f: impl FnOnce(&mut kernel_compat::Tunables) -> Result<(), WriteError>) -> Result<(), WriteError> {
        let mut m = self.model.lock();
        let mut next = *m;
        f(&mut next)?;
        *m = next;
        self.mirror(&m);
        Ok(())
    }

    /// A store of `value` into `name` by the kernel's rules (`pages_shared`
    /// as the kernel checks it), for the engine's typed setters.
    fn store(&self, name: &str, value: impl std::fmt::Display, pages_shared: u64) -> Result<(), TunableError> {
        self.change(|m| m.write(name, &value.to_string(), pages_shared).map(|_| ())).map_err(|e| match e {
            WriteError::Busy => TunableError::Busy,
            _ => TunableError::Inval,
        })
    }

    /// A value the kernel accepts whatever it is (booleans, the advisor's
    /// limits as the engine API gives them).
    fn apply(&self, v: Value) {
        let _ = self.change(|m| {
            m.apply(v);
            Ok(())
        });
    }

    pub(crate) fn set_run(&self, v: u32) -> Result<(), TunableError> {
        self.store("run", v, 0)
    }
    pub(crate) fn set_pages_to_scan(&self, v: u32) -> Result<(), TunableError> {
        self.store("pages_to_scan", v, 0)
    }
    /// The scan-time advisor's choice (`advisor`), which no user may
    /// write while it is on.
    pub(crate) fn advise_pages_to_scan(&self, v: u32) {
        let _ = self.change(|m| {
            if m.advisor_mode == AdvisorMode::ScanTime {
                m.pages_to_scan = v;
            }
            Ok(())
        });
    }
    pub(crate) fn set_sleep_millisecs(&self, v: u32) {
        self.apply(Value::SleepMillisecs(v));
    }
    pub(crate) fn set_use_zero_pages(&self, v: bool) {
        self.apply(Value::UseZeroPages(v));
    }
    /// `pages_shared` is what the kernel checks: no change while pages are shared.
    pub(crate) fn set_max_page_sharing(&self, v: u32, pages_shared: u64) -> Result<(), TunableError> {
        self.store("max_page_sharing", v, pages_shared)
    }
    pub(crate) fn set_smart_scan(&self, v: bool) {
        self.apply(Value::SmartScan(v));
    }
    pub(crate) fn set_merge_across_nodes(&self, v: u32) {
        self.apply(Value::MergeAcrossNodes(v));
    }
    pub(crate) fn set_stable_node_chains_prune_millisecs(&self, v: u32) {
        self.apply(Value::StableNodeChainsPruneMillisecs(v));
    }
    /// With the kernel's side effect: `pages_to_scan` becomes
    /// `advisor_min_pages_to_scan` (scan-time) or 100 (none) on a switch.
    pub(crate) fn set_advisor_mode(&self, m: AdvisorMode) {
        self.apply(Value::AdvisorMode(m));
    }
    pub(crate) fn set_advisor_limits(&self, max_cpu: u32, min_pages: u64, max_pages: u64, target_scan_time: u64) {
        let _ = self.change(|m| {
            m.apply(Value::AdvisorMaxCpu(max_cpu));
            m.apply(Value::AdvisorMinPagesToScan(min_pages));
            m.apply(Value::AdvisorMaxPagesToScan(max_pages));
            m.apply(Value::AdvisorTargetScanTime(target_scan_time));
            Ok(())
        });
    }

    /// Writes attribute `name` of `/sys/kernel/mm/ksm` with the kernel's
    /// parsing, rules and side effects (`pages_shared` as the kernel checks
    /// it for `max_page_sharing`); a refused value changes nothing.
    pub fn write_attr(&self, name: &str, text: &str, pages_shared: u64, numa: bool) -> Result<(), WriteError> {
        if name == MERGE_MODE {
            self.set_merge_mode(MergeMode::parse(text.as_bytes())?);
            return Ok(());
        }
        self.change(|m| {
            m.numa = numa;
            m.write(name, text, pages_shared).map(|_| ())
        })
    }

    /// What the kernel's store functions check a write against, by the
    /// model (`pages_shared` as the caller counts it).
    pub(crate) fn context(&self, pages_shared: u64, numa: bool) -> WriteContext {
        let mut m = *self.model.lock();
        m.numa = numa;
        m.context(pages_shared)
    }

    /// What reading tunable `name` prints (the model's), without the newline.
    fn show(&self, name: &str, numa: bool) -> Option<String> {
        if name == MERGE_MODE {
            return Some(self.merge_mode().show());
        }
        let mut m = *self.model.lock();
        m.numa = numa;
        m.show(name)
    }
}

/// What reading attribute `name` of `/sys/kernel/mm/ksm` prints (without the
/// newline) for tunables `t` and counters `s`; `None` for a name the kernel
/// does not have (`merge_across_nodes` only exists with NUMA).
pub fn show_attr(t: &Tunables, s: &crate::stats::KsmStats, name: &str, numa: bool) -> Option<String> {
    if let Some(v) = t.show(name, numa) {
        return Some(v);
    }
    let v = match name {
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
        assert_eq!(show_attr(&t, &crate::stats::KsmStats::default(), MERGE_MODE, false).unwrap(), "all zero-only [off]");
        assert_eq!(model_write(MERGE_MODE, b"", &WriteContext::default()), Ok(None));
    }

    #[test]
    fn the_shared_tunables_read_back_into_the_model_with_the_engines_defaults_for_the_rest() {
        let shared = [("max_page_sharing", "17"), ("advisor_mode", "none [scan-time]"), ("sleep_millisecs", "x")];
        let get = |n: &str| shared.iter().find(|p| p.0 == n).map(|p| p.1);
        let m = model_from_shown(get, false);
        assert_eq!(m.max_page_sharing, 17);
        assert_eq!(m.advisor_mode, AdvisorMode::ScanTime);
        assert_eq!(m.run, 1, "not published yet: the engine's default, not the kernel's 0");
        assert_eq!(m.sleep_millisecs, 20, "text that does not read back: the default");
        assert!(!m.numa);
        let ctx = m.context(5);
        assert!(ctx.advisor_on && ctx.run == 1 && ctx.max_page_sharing == 17 && ctx.pages_shared == 5);
    }
}
