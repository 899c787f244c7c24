//! Every file of `/sys/kernel/mm/ksm` on Linux 6.18, as data: name, mode,
//! default, how it prints and how a write to it is parsed.
//!
//! Value formats (each file holds one value and a `'\n'`):
//! - unsigned decimal (`%u` or `%lu`) for almost everything;
//! - **signed** decimal (`%ld`) for `general_profit` (really can be
//!   negative: each `rmap_item` costs 64 bytes, so a process that marked
//!   memory mergeable but shares nothing has a negative profit),
//!   `ksm_zero_pages` (an `atomic_long_t`) and `pages_volatile` (computed
//!   as a difference; the kernel clamps it to 0 before printing, so it never
//!   shows a minus sign). See [`SIGNED_ATTRS`];
//! - booleans print as `0`/`1`;
//! - `advisor_mode` prints the choices with the current one in brackets,
//!   see [`format_advisor_mode`].

use crate::types::AdvisorMode;

/// How an attribute prints its value (the `sysfs_emit` format of its
/// `_show` function).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `%u` of an `unsigned int` (also `max_page_sharing`, an `int` that is
    /// always ≥ 2).
    U32,
    /// `%lu` of an `unsigned long` (64-bit).
    U64,
    /// `%ld` of a `long`: may print a minus sign.
    I64,
    /// `%u` of a `bool`: `0` or `1`.
    Bool,
    /// `"[none] scan-time"` / `"none [scan-time]"`.
    AdvisorMode,
}

/// How the store function of a writable attribute reads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parser {
    /// `kstrtouint(buf, 10, ..)`.
    Uint,
    /// `kstrtoul(buf, 10, ..)`.
    Ulong,
    /// `kstrtoint(buf, 10, ..)`.
    Int,
    /// `kstrtobool(buf, ..)`.
    Bool,
    /// `sysfs_streq()` against `"scan-time"` and `"none"`.
    AdvisorMode,
}

/// One file of `/sys/kernel/mm/ksm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attr {
    /// File name.
    pub name: &'static str,
    /// Mode 0644 (has a store function) rather than 0444.
    pub writable: bool,
    /// The kernel default (value after boot), as printed, without newline.
    pub default: &'static str,
    /// How the value prints.
    pub format: Format,
    /// How a write is parsed; `None` for read-only attributes.
    pub parser: Option<Parser>,
    /// A parse error reaches userspace unchanged (`ERANGE` stays `ERANGE`)
    /// instead of being turned into `EINVAL`: only `max_page_sharing` and
    /// `merge_across_nodes`.
    pub raw_parse_errors: bool,
    /// Exists only in kernels built with `CONFIG_NUMA` (`merge_across_nodes`).
    pub numa_only: bool,
    /// One-line meaning.
    pub doc: &'static str,
}

impl Attr {
    /// The file mode: `0o644` if writable, else `0o444`.
    pub fn mode(&self) -> u32 {
        if self.writable {
            0o644
        } else {
            0o444
        }
    }

    /// Prints a signed value (`%ld`), see [`SIGNED_ATTRS`].
    pub fn is_signed(&self) -> bool {
        self.format == Format::I64
    }

    /// Whether `text` (one line, newline optional) is in this attribute's
    /// print format.
    pub fn matches_format(&self, text: &str) -> bool {
        let t = text.strip_suffix('\n').unwrap_or(text);
        match self.format {
            Format::U32 => t.parse::<u32>().is_ok() && is_plain_decimal(t),
            Format::U64 => t.parse::<u64>().is_ok() && is_plain_decimal(t),
            Format::I64 => t.parse::<i64>().is_ok() && is_plain_decimal(t.strip_prefix('-').unwrap_or(t)) && t != "-0",
            Format::Bool => t == "0" || t == "1",
            Format::AdvisorMode => t == "[none] scan-time" || t == "none [scan-time]",
        }
    }
}

fn is_plain_decimal(t: &str) -> bool {
    !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) && (t == "0" || !t.starts_with('0'))
}

const fn ro(name: &'static str, format: Format, doc: &'static str) -> Attr {
    Attr { name, writable: false, default: "0", format, parser: None, raw_parse_errors: false, numa_only: false, doc }
}

const fn rw(name: &'static str, default: &'static str, format: Format, parser: Parser, doc: &'static str) -> Attr {
    Attr { name, writable: true, default, format, parser: Some(parser), raw_parse_errors: false, numa_only: false, doc }
}

/// All files of `/sys/kernel/mm/ksm` on Linux 6.18 (with `CONFIG_NUMA`),
/// sorted by name as `ls` lists them.
pub const ATTRS: &[Attr] = &[
    rw(
        "advisor_max_cpu",
        "70",
        Format::U32,
        Parser::Ulong,
        "CPU percent ksmd may use under the scan-time advisor; no range check, truncated to 32 bits",
    ),
    rw("advisor_max_pages_to_scan", "30000", Format::U64, Parser::Ulong, "upper bound the advisor gives pages_to_scan"),
    rw("advisor_min_pages_to_scan", "500", Format::U64, Parser::Ulong, "lower bound the advisor gives pages_to_scan; also its start value"),
    rw(
        "advisor_mode",
        "[none] scan-time",
        Format::AdvisorMode,
        Parser::AdvisorMode,
        "none, or scan-time: tune pages_to_scan to reach advisor_target_scan_time",
    ),
    rw("advisor_target_scan_time", "200", Format::U64, Parser::Ulong, "seconds a full scan should take under the advisor; at least 1"),
    ro("full_scans", Format::U64, "number of completed scans of all mergeable memory"),
    ro("general_profit", Format::I64, "bytes saved: (pages_sharing + ksm_zero_pages) * PAGE_SIZE - rmap_items * 64; can be negative"),
    ro("ksm_zero_pages", Format::I64, "empty pages merged with the kernel zero page (use_zero_pages)"),
    Attr {
        raw_parse_errors: true,
        ..rw(
            "max_page_sharing",
            "256",
            Format::U32,
            Parser::Int,
            "most page slots sharing one KSM page; at least 2; EBUSY to change while pages_shared > 0",
        )
    },
    Attr {
        raw_parse_errors: true,
        numa_only: true,
        ..rw(
            "merge_across_nodes",
            "1",
            Format::U32,
            Parser::Ulong,
            "merge pages of different NUMA nodes; 0 or 1; EBUSY to change while pages_shared > 0",
        )
    },
    ro("pages_scanned", Format::U64, "pages scanned since boot"),
    ro("pages_shared", Format::U64, "KSM pages in use (stable tree nodes)"),
    ro("pages_sharing", Format::U64, "additional page slots sharing them: the pages saved"),
    ro("pages_skipped", Format::U64, "pages skipped by smart_scan"),
    rw("pages_to_scan", "100", Format::U32, Parser::Uint, "pages to scan per batch; EINVAL while advisor_mode is scan-time"),
    ro("pages_unshared", Format::U64, "pages unique but repeatedly checked (unstable tree)"),
    ro("pages_volatile", Format::I64, "pages changing too fast to be placed in a tree (printed %ld, clamped at 0)"),
    rw("run", "0", Format::U64, Parser::Uint, "0 stop ksmd, 1 run ksmd, 2 stop and unmerge everything"),
    rw("sleep_millisecs", "20", Format::U32, Parser::Uint, "ksmd sleep between batches"),
    rw("smart_scan", "1", Format::Bool, Parser::Bool, "skip pages that failed to merge on earlier scans"),
    ro("stable_node_chains", Format::U64, "stable nodes that are chains of duplicates (max_page_sharing reached)"),
    rw("stable_node_chains_prune_millisecs", "2000", Format::U32, Parser::Uint, "how often stale duplicates are pruned from chains"),
    ro("stable_node_dups", Format::U64, "duplicate nodes linked into chains"),
    rw("use_zero_pages", "0", Format::Bool, Parser::Bool, "merge empty pages with the kernel zero page"),
];

/// The attributes that print signed values (`%ld`): `general_profit`
/// (negative when rmap_items cost more than the merged pages save),
/// `ksm_zero_pages` and `pages_volatile` (clamped at 0 by the kernel).
pub const SIGNED_ATTRS: &[&str] = &["general_profit", "ksm_zero_pages", "pages_volatile"];

/// The attribute called `name`, if the 6.18 kernel has one.
pub fn find(name: &str) -> Option<&'static Attr> {
    ATTRS.iter().find(|a| a.name == name)
}

/// The writable attributes.
pub fn writable() -> impl Iterator<Item = &'static Attr> {
    ATTRS.iter().filter(|a| a.writable)
}

/// What reading `advisor_mode` prints, without the newline:
/// `"[none] scan-time"` or `"none [scan-time]"`.
pub fn format_advisor_mode(mode: AdvisorMode) -> String {
    match mode {
        AdvisorMode::None => "[none] scan-time".to_string(),
        AdvisorMode::ScanTime => "none [scan-time]".to_string(),
    }
}

/// The whole file content for a value: the text and one `'\n'`.
pub fn render(text: &str) -> String {
    format!("{text}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_unique_and_complete() {
        let names: Vec<&str> = ATTRS.iter().map(|a| a.name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
        assert_eq!(names.len(), 24);
        assert_eq!(writable().count(), 13);
    }

    #[test]
    fn defaults_match_formats() {
        for a in ATTRS {
            assert!(a.matches_format(a.default), "{}", a.name);
            assert_eq!(a.writable, a.parser.is_some(), "{}", a.name);
        }
        let signed: Vec<&str> = ATTRS.iter().filter(|a| a.is_signed()).map(|a| a.name).collect();
        assert_eq!(signed, SIGNED_ATTRS);
    }

    #[test]
    fn defaults_match_tunables() {
        let t = crate::write::Tunables::default();
        for a in writable() {
            assert_eq!(t.show(a.name).as_deref(), Some(a.default), "{}", a.name);
        }
    }

    #[test]
    fn formats() {
        let gp = find("general_profit").unwrap();
        assert!(gp.matches_format("-4096\n"));
        assert!(!gp.matches_format("-0"));
        assert!(!find("pages_shared").unwrap().matches_format("-1"));
        assert!(!find("pages_shared").unwrap().matches_format("01"));
        assert_eq!(format_advisor_mode(AdvisorMode::ScanTime), "none [scan-time]");
        assert_eq!(render("5"), "5\n");
        assert!(find("nope").is_none());
        assert_eq!(find("run").unwrap().mode(), 0o644);
    }
}
