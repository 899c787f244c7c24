//! The write rules of `/sys/kernel/mm/ksm`: what each store function of
//! Linux 6.18's `mm/ksm.c` accepts, what it refuses and with which errno,
//! and what an accepted write changes.
//!
//! Every rule here was checked against the running 6.18 kernel (see the
//! crate's `tests/conformance.rs`).

use crate::attrs;
use crate::parse::{kstrtobool, kstrtoint, kstrtouint, kstrtoul, sysfs_streq};
pub use crate::types::{AdvisorMode, WriteError};

/// A value accepted by a store function, typed as the kernel variable it
/// lands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Value {
    /// `run`: 0 stop, 1 merge, 2 unmerge all (`ksm_run`, parsed as `unsigned int`).
    Run(u32),
    /// `pages_to_scan` (`unsigned int`).
    PagesToScan(u32),
    /// `sleep_millisecs` (`unsigned int`).
    SleepMillisecs(u32),
    /// `use_zero_pages` (`bool`).
    UseZeroPages(bool),
    /// `max_page_sharing` (`int`, always at least 2).
    MaxPageSharing(u32),
    /// `merge_across_nodes` (`unsigned int`, 0 or 1).
    MergeAcrossNodes(u32),
    /// `smart_scan` (`bool`).
    SmartScan(bool),
    /// `stable_node_chains_prune_millisecs` (`unsigned int`).
    StableNodeChainsPruneMillisecs(u32),
    /// `advisor_mode`.
    AdvisorMode(AdvisorMode),
    /// `advisor_max_cpu` (`unsigned int`; parsed as `unsigned long` and
    /// truncated, so `4294967297` stores 1).
    AdvisorMaxCpu(u32),
    /// `advisor_min_pages_to_scan` (`unsigned long`).
    AdvisorMinPagesToScan(u64),
    /// `advisor_max_pages_to_scan` (`unsigned long`).
    AdvisorMaxPagesToScan(u64),
    /// `advisor_target_scan_time` in seconds (`unsigned long`, at least 1).
    AdvisorTargetScanTime(u64),
}

impl Value {
    /// The attribute this value is written to.
    pub fn name(&self) -> &'static str {
        match self {
            Value::Run(_) => "run",
            Value::PagesToScan(_) => "pages_to_scan",
            Value::SleepMillisecs(_) => "sleep_millisecs",
            Value::UseZeroPages(_) => "use_zero_pages",
            Value::MaxPageSharing(_) => "max_page_sharing",
            Value::MergeAcrossNodes(_) => "merge_across_nodes",
            Value::SmartScan(_) => "smart_scan",
            Value::StableNodeChainsPruneMillisecs(_) => "stable_node_chains_prune_millisecs",
            Value::AdvisorMode(_) => "advisor_mode",
            Value::AdvisorMaxCpu(_) => "advisor_max_cpu",
            Value::AdvisorMinPagesToScan(_) => "advisor_min_pages_to_scan",
            Value::AdvisorMaxPagesToScan(_) => "advisor_max_pages_to_scan",
            Value::AdvisorTargetScanTime(_) => "advisor_target_scan_time",
        }
    }

    /// Canonical text to write to get this value (`"1"`, `"scan-time"`, ...).
    pub fn to_write_text(&self) -> String {
        match self {
            Value::AdvisorMode(m) => m.as_str().to_string(),
            _ => self.show(),
        }
    }

    /// What reading the attribute prints after this value was stored,
    /// without the trailing newline (`"[none] scan-time"` for the advisor,
    /// `0`/`1` for booleans).
    pub fn show(&self) -> String {
        match *self {
            Value::Run(v)
            | Value::PagesToScan(v)
            | Value::SleepMillisecs(v)
            | Value::MaxPageSharing(v)
            | Value::MergeAcrossNodes(v)
            | Value::StableNodeChainsPruneMillisecs(v)
            | Value::AdvisorMaxCpu(v) => v.to_string(),
            Value::UseZeroPages(b) | Value::SmartScan(b) => u32::from(b).to_string(),
            Value::AdvisorMode(m) => attrs::format_advisor_mode(m),
            Value::AdvisorMinPagesToScan(v) | Value::AdvisorMaxPagesToScan(v) | Value::AdvisorTargetScanTime(v) => v.to_string(),
        }
    }
}

/// The KSM state that store functions consult before accepting a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteContext {
    /// `pages_shared`: while non-zero, `max_page_sharing` and
    /// `merge_across_nodes` refuse a change with `EBUSY` (the kernel also
    /// refuses when a stale stable node cannot be removed; not modelled).
    pub pages_shared: u64,
    /// `advisor_mode` is `scan-time`: `pages_to_scan` refuses every write
    /// with `EINVAL`, before even parsing it.
    pub advisor_on: bool,
    /// Current `run`. No store refuses because of it; it is here so a
    /// caller can tell a no-op write from a state change.
    pub run: u32,
    /// Current `max_page_sharing`: writing the same value succeeds even
    /// while pages are shared.
    pub max_page_sharing: u32,
    /// Current `merge_across_nodes`: writing the same value succeeds even
    /// while pages are shared.
    pub merge_across_nodes: u32,
    /// The kernel is built with `CONFIG_NUMA` (it is on this machine): without
    /// it there is no `merge_across_nodes` file at all.
    pub numa: bool,
}

impl Default for WriteContext {
    /// The context of a freshly booted kernel: nothing shared, defaults.
    fn default() -> Self {
        Tunables::default().context(0)
    }
}

/// The largest write the kernel passes to a sysfs store function in one
/// `write(2)`: kernfs cuts a longer write to `PAGE_SIZE` bytes and returns a
/// short count, so `"0"*4096 + "7"` stores 0 (then 7 if the writer loops).
pub const SYSFS_WRITE_MAX: usize = 4096;

/// Applies exactly the checks of the 6.18 store function for attribute
/// `name` to the text it receives (`text`, up to its first NUL byte).
///
/// Order of the checks, as in the kernel:
/// - unknown attribute → [`WriteError::NoSuchAttr`]; read-only →
///   [`WriteError::ReadOnly`] (`merge_across_nodes` is unknown when
///   `ctx.numa` is false);
/// - `pages_to_scan` while `ctx.advisor_on` → `EINVAL` whatever the text;
/// - parse: `kstrtouint` (`run`, `pages_to_scan`, `sleep_millisecs`,
///   `stable_node_chains_prune_millisecs`), `kstrtoul` (`advisor_max_cpu`,
///   `advisor_*_pages_to_scan`, `advisor_target_scan_time`,
///   `merge_across_nodes`), `kstrtoint` (`max_page_sharing`), `kstrtobool`
///   (`use_zero_pages`, `smart_scan`), `sysfs_streq` against `scan-time`
///   and `none` (`advisor_mode`). A parse error is `EINVAL`, except that
///   `max_page_sharing` and `merge_across_nodes` return it unchanged
///   (`ERANGE` for overflow);
/// - ranges: `run` ≤ 2, `max_page_sharing` ≥ 2 (signed: `-1` is `EINVAL`),
///   `merge_across_nodes` ≤ 1, `advisor_target_scan_time` ≥ 1;
///   `advisor_max_cpu` has *no* range check and is truncated to 32 bits;
/// - `max_page_sharing` equal to the current value succeeds at once; a
///   different value, or a different `merge_across_nodes`, is `EBUSY`
///   while `ctx.pages_shared > 0`.
///
/// Not modelled: `-ENOMEM`, and the error of a failed unmerge on `run=2`.
/// An empty `text` gives what the store would say (`EINVAL`), but note that
/// a zero-length `write(2)` never reaches the store: see [`model_write`].
pub fn parse_write(name: &str, text: &str, ctx: &WriteContext) -> Result<Value, WriteError> {
    parse_write_bytes(name, text.as_bytes(), ctx)
}

/// [`parse_write`] for raw bytes (the kernel does not require UTF-8).
pub fn parse_write_bytes(name: &str, text: &[u8], ctx: &WriteContext) -> Result<Value, WriteError> {
    check_writable(name, ctx)?;
    let inval = |_| WriteError::Inval;
    let value = match name {
        "run" => {
            let flags = kstrtouint(text).map_err(inval)?;
            if flags > 2 {
                return Err(WriteError::Inval);
            }
            Value::Run(flags)
        }
        "pages_to_scan" => {
            if ctx.advisor_on {
                return Err(WriteError::Inval);
            }
            Value::PagesToScan(kstrtouint(text).map_err(inval)?)
        }
        "sleep_millisecs" => Value::SleepMillisecs(kstrtouint(text).map_err(inval)?),
        "stable_node_chains_prune_millisecs" => Value::StableNodeChainsPruneMillisecs(kstrtouint(text).map_err(inval)?),
        "use_zero_pages" => Value::UseZeroPages(kstrtobool(text).map_err(inval)?),
        "smart_scan" => Value::SmartScan(kstrtobool(text).map_err(inval)?),
        "max_page_sharing" => {
            // kstrtoint's error is returned as is (ERANGE stays ERANGE).
            let knob = kstrtoint(text)?;
            if knob < 2 {
                return Err(WriteError::Inval);
            }
            let knob = knob.unsigned_abs();
            if knob != ctx.max_page_sharing && ctx.pages_shared > 0 {
                return Err(WriteError::Busy);
            }
            Value::MaxPageSharing(knob)
        }
        "merge_across_nodes" => {
            let knob = kstrtoul(text)?;
            if knob > 1 {
                return Err(WriteError::Inval);
            }
            let knob = knob as u32;
            if knob != ctx.merge_across_nodes && ctx.pages_shared > 0 {
                return Err(WriteError::Busy);
            }
            Value::MergeAcrossNodes(knob)
        }
        "advisor_mode" => {
            if sysfs_streq("scan-time", text) {
                Value::AdvisorMode(AdvisorMode::ScanTime)
            } else if sysfs_streq("none", text) {
                Value::AdvisorMode(AdvisorMode::None)
            } else {
                return Err(WriteError::Inval);
            }
        }
        // Parsed as unsigned long, stored in an unsigned int: truncated.
        "advisor_max_cpu" => Value::AdvisorMaxCpu(kstrtoul(text).map_err(inval)? as u32),
        "advisor_min_pages_to_scan" => Value::AdvisorMinPagesToScan(kstrtoul(text).map_err(inval)?),
        "advisor_max_pages_to_scan" => Value::AdvisorMaxPagesToScan(kstrtoul(text).map_err(inval)?),
        "advisor_target_scan_time" => {
            let v = kstrtoul(text).map_err(inval)?;
            if v < 1 {
                return Err(WriteError::Inval);
            }
            Value::AdvisorTargetScanTime(v)
        }
        // check_writable() accepted a writable attribute without a store rule.
        _ => return Err(WriteError::NoSuchAttr),
    };
    Ok(value)
}

fn check_writable(name: &str, ctx: &WriteContext) -> Result<(), WriteError> {
    match attrs::find(name) {
        None => Err(WriteError::NoSuchAttr),
        Some(a) if a.numa_only && !ctx.numa => Err(WriteError::NoSuchAttr),
        Some(a) if !a.writable => Err(WriteError::ReadOnly),
        Some(_) => Ok(()),
    }
}

/// Models one `write(2)` of `bytes` to attribute `name` (opened for writing
/// without `O_CREAT`), whole path included:
/// - a missing or read-only attribute fails first (at `open(2)`);
/// - a zero-length write never reaches the store function and succeeds
///   with nothing changed: `Ok(None)`;
/// - otherwise the store sees the first [`SYSFS_WRITE_MAX`] bytes, up to
///   the first NUL, and [`parse_write_bytes`] decides.
///
/// On success `write(2)` returns `min(bytes.len(), SYSFS_WRITE_MAX)`.
pub fn model_write(name: &str, bytes: &[u8], ctx: &WriteContext) -> Result<Option<Value>, WriteError> {
    check_writable(name, ctx)?;
    if bytes.is_empty() {
        return Ok(None);
    }
    let chunk = &bytes[..bytes.len().min(SYSFS_WRITE_MAX)];
    parse_write_bytes(name, chunk, ctx).map(Some)
}

/// The writable KSM settings, with the kernel's defaults, and the side
/// effects of an accepted write. An emulator keeps one of these and feeds
/// it the [`Value`]s that [`parse_write`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunables {
    /// `run` (default 0).
    pub run: u32,
    /// `pages_to_scan` (default 100).
    pub pages_to_scan: u32,
    /// `sleep_millisecs` (default 20).
    pub sleep_millisecs: u32,
    /// `use_zero_pages` (default false).
    pub use_zero_pages: bool,
    /// `max_page_sharing` (default 256).
    pub max_page_sharing: u32,
    /// `merge_across_nodes` (default 1).
    pub merge_across_nodes: u32,
    /// `smart_scan` (default true).
    pub smart_scan: bool,
    /// `stable_node_chains_prune_millisecs` (default 2000).
    pub stable_node_chains_prune_millisecs: u32,
    /// `advisor_mode` (default none).
    pub advisor_mode: AdvisorMode,
    /// `advisor_max_cpu` in percent (default 70).
    pub advisor_max_cpu: u32,
    /// `advisor_min_pages_to_scan` (default 500).
    pub advisor_min_pages_to_scan: u64,
    /// `advisor_max_pages_to_scan` (default 30000).
    pub advisor_max_pages_to_scan: u64,
    /// `advisor_target_scan_time` in seconds (default 200).
    pub advisor_target_scan_time: u64,
    /// Whether `merge_across_nodes` exists (`CONFIG_NUMA`; default true).
    pub numa: bool,
}

/// `pages_to_scan` after boot and after switching the advisor to `none`.
pub const DEFAULT_PAGES_TO_SCAN: u32 = 100;

impl Default for Tunables {
    fn default() -> Self {
        Tunables {
            run: 0,
            pages_to_scan: DEFAULT_PAGES_TO_SCAN,
            sleep_millisecs: 20,
            use_zero_pages: false,
            max_page_sharing: 256,
            merge_across_nodes: 1,
            smart_scan: true,
            stable_node_chains_prune_millisecs: 2000,
            advisor_mode: AdvisorMode::None,
            advisor_max_cpu: 70,
            advisor_min_pages_to_scan: 500,
            advisor_max_pages_to_scan: 30000,
            advisor_target_scan_time: 200,
            numa: true,
        }
    }
}

impl Tunables {
    /// The context for [`parse_write`], given the current `pages_shared`.
    pub fn context(&self, pages_shared: u64) -> WriteContext {
        WriteContext {
            pages_shared,
            advisor_on: self.advisor_mode != AdvisorMode::None,
            run: self.run,
            max_page_sharing: self.max_page_sharing,
            merge_across_nodes: self.merge_across_nodes,
            numa: self.numa,
        }
    }

    /// Stores an accepted value, with the kernel's side effects: switching
    /// `advisor_mode` to `scan-time` sets `pages_to_scan` to
    /// `advisor_min_pages_to_scan` (truncated to 32 bits); switching back to
    /// `none` resets it to 100. Writing the current mode changes nothing.
    pub fn apply(&mut self, value: Value) {
        match value {
            Value::Run(v) => self.run = v,
            Value::PagesToScan(v) => self.pages_to_scan = v,
            Value::SleepMillisecs(v) => self.sleep_millisecs = v,
            Value::UseZeroPages(v) => self.use_zero_pages = v,
            Value::MaxPageSharing(v) => self.max_page_sharing = v,
            Value::MergeAcrossNodes(v) => self.merge_across_nodes = v,
            Value::SmartScan(v) => self.smart_scan = v,
            Value::StableNodeChainsPruneMillisecs(v) => self.stable_node_chains_prune_millisecs = v,
            Value::AdvisorMode(m) => {
                if m != self.advisor_mode {
                    self.advisor_mode = m;
                    self.pages_to_scan = match m {
                        AdvisorMode::None => DEFAULT_PAGES_TO_SCAN,
                        AdvisorMode::ScanTime => self.advisor_min_pages_to_scan as u32,
                    };
                }
            }
            Value::AdvisorMaxCpu(v) => self.advisor_max_cpu = v,
            Value::AdvisorMinPagesToScan(v) => self.advisor_min_pages_to_scan = v,
            Value::AdvisorMaxPagesToScan(v) => self.advisor_max_pages_to_scan = v,
            Value::AdvisorTargetScanTime(v) => self.advisor_target_scan_time = v,
        }
    }

    /// [`parse_write`] then [`Tunables::apply`]: a whole store, as the kernel
    /// does it, given the current `pages_shared`.
    pub fn write(&mut self, name: &str, text: &str, pages_shared: u64) -> Result<Value, WriteError> {
        let v = parse_write(name, text, &self.context(pages_shared))?;
        self.apply(v);
        Ok(v)
    }

    /// All values, one per writable attribute (in [`crate::attrs::ATTRS`]
    /// order; no `merge_across_nodes` without NUMA).
    pub fn values(&self) -> Vec<Value> {
        let mut v = vec![
            Value::AdvisorMaxCpu(self.advisor_max_cpu),
            Value::AdvisorMaxPagesToScan(self.advisor_max_pages_to_scan),
            Value::AdvisorMinPagesToScan(self.advisor_min_pages_to_scan),
            Value::AdvisorMode(self.advisor_mode),
            Value::AdvisorTargetScanTime(self.advisor_target_scan_time),
            Value::MaxPageSharing(self.max_page_sharing),
        ];
        if self.numa {
            v.push(Value::MergeAcrossNodes(self.merge_across_nodes));
        }
        v.extend([
            Value::PagesToScan(self.pages_to_scan),
            Value::Run(self.run),
            Value::SleepMillisecs(self.sleep_millisecs),
            Value::SmartScan(self.smart_scan),
            Value::StableNodeChainsPruneMillisecs(self.stable_node_chains_prune_millisecs),
            Value::UseZeroPages(self.use_zero_pages),
        ]);
        v
    }

    /// What reading writable attribute `name` prints, without the newline;
    /// `None` for anything else.
    pub fn show(&self, name: &str) -> Option<String> {
        self.values().into_iter().find(|v| v.name() == name).map(|v| v.show())
    }

    /// Reads the settings back from `(name, text)` pairs as printed by the
    /// kernel (e.g. a [`crate::sysfs::Snapshot`]); attributes not given keep
    /// their defaults, and a missing `merge_across_nodes` means no NUMA.
    /// Fails with the name of the first attribute whose text does not parse.
    pub fn from_shown<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Tunables, String> {
        let mut t = Tunables { numa: false, ..Tunables::default() };
        for (name, text) in pairs {
            let text = text.trim();
            let bad = || name.to_string();
            let u32_ = || text.parse::<u32>().map_err(|_| bad());
            let u64_ = || text.parse::<u64>().map_err(|_| bad());
            let bool_ = || match text {
                "0" => Ok(false),
                "1" => Ok(true),
                _ => Err(bad()),
            };
            match name {
                "run" => t.run = u32_()?,
                "pages_to_scan" => t.pages_to_scan = u32_()?,
                "sleep_millisecs" => t.sleep_millisecs = u32_()?,
                "use_zero_pages" => t.use_zero_pages = bool_()?,
                "max_page_sharing" => t.max_page_sharing = u32_()?,
                "merge_across_nodes" => {
                    t.merge_across_nodes = u32_()?;
                    t.numa = true;
                }
                "smart_scan" => t.smart_scan = bool_()?,
                "stable_node_chains_prune_millisecs" => t.stable_node_chains_prune_millisecs = u32_()?,
                "advisor_mode" => t.advisor_mode = AdvisorMode::from_show(text).ok_or_else(bad)?,
                "advisor_max_cpu" => t.advisor_max_cpu = u32_()?,
                "advisor_min_pages_to_scan" => t.advisor_min_pages_to_scan = u64_()?,
                "advisor_max_pages_to_scan" => t.advisor_max_pages_to_scan = u64_()?,
                "advisor_target_scan_time" => t.advisor_target_scan_time = u64_()?,
                _ => {}
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use WriteError::*;

    fn ctx() -> WriteContext {
        WriteContext::default()
    }

    #[test]
    fn errnos() {
        for e in [Inval, Busy, ReadOnly, NoSuchAttr, Range] {
            assert_eq!(WriteError::from_errno(e.errno()), Some(e));
        }
        assert_eq!(Inval.name(), "EINVAL");
        assert_eq!(ReadOnly.errno(), 13);
        assert_eq!(WriteError::from_errno(5), None);
    }

    #[test]
    fn run_rules() {
        assert_eq!(parse_write("run", "0", &ctx()), Ok(Value::Run(0)));
        assert_eq!(parse_write("run", "2\n", &ctx()), Ok(Value::Run(2)));
        assert_eq!(parse_write("run", "+1", &ctx()), Ok(Value::Run(1)));
        assert_eq!(parse_write("run", "3", &ctx()), Err(Inval));
        assert_eq!(parse_write("run", "-1", &ctx()), Err(Inval));
        assert_eq!(parse_write("run", "99999999999999999999", &ctx()), Err(Inval));
        assert_eq!(parse_write("run", "", &ctx()), Err(Inval));
    }

    #[test]
    fn max_page_sharing_rules() {
        let mut c = ctx();
        assert_eq!(parse_write("max_page_sharing", "2", &c), Ok(Value::MaxPageSharing(2)));
        assert_eq!(parse_write("max_page_sharing", "1", &c), Err(Inval));
        assert_eq!(parse_write("max_page_sharing", "-1", &c), Err(Inval));
        assert_eq!(parse_write("max_page_sharing", "-2147483648", &c), Err(Inval));
        assert_eq!(parse_write("max_page_sharing", "2147483648", &c), Err(Range));
        assert_eq!(parse_write("max_page_sharing", "99999999999", &c), Err(Range));
        assert_eq!(parse_write("max_page_sharing", "abc", &c), Err(Inval));
        c.pages_shared = 1;
        assert_eq!(parse_write("max_page_sharing", "256", &c), Ok(Value::MaxPageSharing(256)));
        assert_eq!(parse_write("max_page_sharing", "+256\n", &c), Ok(Value::MaxPageSharing(256)));
        assert_eq!(parse_write("max_page_sharing", "300", &c), Err(Busy));
        assert_eq!(parse_write("max_page_sharing", "1", &c), Err(Inval));
    }

    #[test]
    fn merge_across_nodes_rules() {
        let mut c = ctx();
        assert_eq!(parse_write("merge_across_nodes", "0", &c), Ok(Value::MergeAcrossNodes(0)));
        assert_eq!(parse_write("merge_across_nodes", "2", &c), Err(Inval));
        assert_eq!(parse_write("merge_across_nodes", "-1", &c), Err(Inval));
        assert_eq!(parse_write("merge_across_nodes", "99999999999999999999", &c), Err(Range));
        c.pages_shared = 3;
        assert_eq!(parse_write("merge_across_nodes", "1", &c), Ok(Value::MergeAcrossNodes(1)));
        assert_eq!(parse_write("merge_across_nodes", "0", &c), Err(Busy));
        c.numa = false;
        assert_eq!(parse_write("merge_across_nodes", "1", &c), Err(NoSuchAttr));
    }

    #[test]
    fn advisor_rules() {
        let c = ctx();
        assert_eq!(parse_write("advisor_mode", "scan-time\n", &c), Ok(Value::AdvisorMode(AdvisorMode::ScanTime)));
        assert_eq!(parse_write("advisor_mode", "none", &c), Ok(Value::AdvisorMode(AdvisorMode::None)));
        assert_eq!(parse_write("advisor_mode", "scan_time", &c), Err(Inval));
        assert_eq!(parse_write("advisor_mode", "[none] scan-time", &c), Err(Inval));
        assert_eq!(parse_write("advisor_max_cpu", "4294967297", &c), Ok(Value::AdvisorMaxCpu(1)));
        assert_eq!(parse_write("advisor_max_cpu", "200", &c), Ok(Value::AdvisorMaxCpu(200)));
        assert_eq!(parse_write("advisor_target_scan_time", "0", &c), Err(Inval));
        assert_eq!(parse_write("advisor_target_scan_time", "18446744073709551615", &c), Ok(Value::AdvisorTargetScanTime(u64::MAX)));
        assert_eq!(parse_write("advisor_min_pages_to_scan", "0", &c), Ok(Value::AdvisorMinPagesToScan(0)));
        let on = WriteContext { advisor_on: true, ..c };
        assert_eq!(parse_write("pages_to_scan", "100", &on), Err(Inval));
        assert_eq!(parse_write("pages_to_scan", "100", &c), Ok(Value::PagesToScan(100)));
    }

    #[test]
    fn readonly_and_unknown() {
        assert_eq!(parse_write("pages_shared", "0", &ctx()), Err(ReadOnly));
        assert_eq!(parse_write("general_profit", "", &ctx()), Err(ReadOnly));
        assert_eq!(parse_write("nope", "0", &ctx()), Err(NoSuchAttr));
    }

    #[test]
    fn whole_write_path() {
        assert_eq!(model_write("sleep_millisecs", b"", &ctx()), Ok(None));
        assert_eq!(model_write("full_scans", b"", &ctx()), Err(ReadOnly));
        assert_eq!(model_write("sleep_millisecs", b"5\0junk", &ctx()), Ok(Some(Value::SleepMillisecs(5))));
        let mut long = vec![b'0'; 4096];
        long.push(b'7');
        assert_eq!(model_write("sleep_millisecs", &long, &ctx()), Ok(Some(Value::SleepMillisecs(0))));
        assert_eq!(model_write("sleep_millisecs", &long[1..], &ctx()), Ok(Some(Value::SleepMillisecs(7))));
    }

    #[test]
    fn tunables_side_effects() {
        let mut t = Tunables::default();
        assert_eq!(t.context(0), WriteContext::default());
        t.write("advisor_min_pages_to_scan", "777", 0).unwrap();
        t.write("advisor_mode", "scan-time", 0).unwrap();
        assert_eq!(t.pages_to_scan, 777);
        assert_eq!(t.write("pages_to_scan", "5", 0), Err(Inval));
        t.write("advisor_mode", "scan-time", 0).unwrap();
        assert_eq!(t.pages_to_scan, 777);
        t.write("advisor_mode", "none", 0).unwrap();
        assert_eq!(t.pages_to_scan, 100);
        assert_eq!(t.show("advisor_mode").unwrap(), "[none] scan-time");
        assert_eq!(t.show("use_zero_pages").unwrap(), "0");
        let shown: Vec<(String, String)> = t.values().iter().map(|v| (v.name().to_string(), v.show())).collect();
        let back = Tunables::from_shown(shown.iter().map(|(a, b)| (a.as_str(), b.as_str()))).unwrap();
        assert_eq!(back, t);
        for v in t.values() {
            assert_eq!(parse_write(v.name(), &v.to_write_text(), &t.context(0)), Ok(v));
        }
    }
}
