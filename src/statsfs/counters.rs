//! twinpage's counters by name, and how the counters of several processes
//! combine into the global ones under `kernel/mm/ksm` and `twinpage/stats`.

use std::collections::BTreeMap;

use crate::stats::KsmStats;

/// How the global value of a counter is made from the processes' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// A level (`pages_shared`): the sum over live processes.
    Sum,
    /// Cumulative since the process started (`pages_scanned`): the sum over
    /// live processes plus what exited processes had reached, so the global
    /// value never goes back, as the kernel's counters since boot.
    Cumulative,
    /// `full_scans`: rounds in which every process with registered memory
    /// completed a full scan (the kernel's meaning: a pass over all
    /// mergeable memory); it never goes back.
    Rounds,
    /// A property of one process (`twinpage_map_count`): the largest.
    Max,
}

/// Every counter of [`KsmStats`], in the order files list them.
pub const FIELDS: &[(&str, Combine)] = &[
    ("pages_shared", Combine::Sum),
    ("pages_sharing", Combine::Sum),
    ("pages_unshared", Combine::Sum),
    ("pages_volatile", Combine::Sum),
    ("pages_scanned", Combine::Cumulative),
    ("pages_skipped", Combine::Cumulative),
    ("full_scans", Combine::Rounds),
    ("ksm_zero_pages", Combine::Sum),
    ("stable_node_chains", Combine::Sum),
    ("stable_node_dups", Combine::Sum),
    ("general_profit", Combine::Sum),
    ("rmap_items", Combine::Sum),
    ("twinpage_metadata_bytes", Combine::Sum),
    ("twinpage_mappings_added", Combine::Sum),
    ("twinpage_map_count", Combine::Max),
    ("twinpage_map_limit", Combine::Max),
    ("twinpage_merges_held_back", Combine::Cumulative),
    ("twinpage_pages_held_back", Combine::Sum),
    ("twinpage_merge_runs", Combine::Cumulative),
    ("twinpage_cow_breaks", Combine::Cumulative),
    ("twinpage_cow_in_place", Combine::Cumulative),
    ("twinpage_merge_mismatches", Combine::Cumulative),
    ("twinpage_pinned_skipped", Combine::Cumulative),
    ("twinpage_merges_unchecked", Combine::Cumulative),
    ("twinpage_uncheckable_skipped", Combine::Cumulative),
    ("twinpage_pages_unmergeable", Combine::Sum),
    ("twinpage_pages_registered", Combine::Sum),
    ("twinpage_merging_pages", Combine::Sum),
    ("twinpage_daemon_merged", Combine::Sum),
    ("twinpage_daemon_agents", Combine::Sum),
    ("twinpage_daemon_proposals", Combine::Sum),
    ("twinpage_store_bytes", Combine::Sum),
    ("twinpage_store_full", Combine::Cumulative),
];

/// Counter values by name.
pub type Counters = BTreeMap<String, i128>;

/// The value of counter `name` in `s`.
pub fn get(s: &KsmStats, name: &str) -> Option<i128> {
    let v = match name {
        "pages_shared" => s.pages_shared,
        "pages_sharing" => s.pages_sharing,
        "pages_unshared" => s.pages_unshared,
        "pages_volatile" => s.pages_volatile,
        "pages_scanned" => s.pages_scanned,
        "pages_skipped" => s.pages_skipped,
        "full_scans" => s.full_scans,
        "ksm_zero_pages" => s.ksm_zero_pages,
        "stable_node_chains" => s.stable_node_chains,
        "stable_node_dups" => s.stable_node_dups,
        "general_profit" => return Some(i128::from(s.general_profit)),
        "rmap_items" => s.rmap_items,
        "twinpage_metadata_bytes" => s.twinpage_metadata_bytes,
        "twinpage_mappings_added" => s.twinpage_mappings_added,
        "twinpage_map_count" => s.twinpage_map_count,
        "twinpage_map_limit" => s.twinpage_map_limit,
        "twinpage_merges_held_back" => s.twinpage_merges_held_back,
        "twinpage_pages_held_back" => s.twinpage_pages_held_back,
        "twinpage_merge_runs" => s.twinpage_merge_runs,
        "twinpage_cow_breaks" => s.twinpage_cow_breaks,
        "twinpage_cow_in_place" => s.twinpage_cow_in_place,
        "twinpage_merge_mismatches" => s.twinpage_merge_mismatches,
        "twinpage_pinned_skipped" => s.twinpage_pinned_skipped,
        "twinpage_merges_unchecked" => s.twinpage_merges_unchecked,
        "twinpage_uncheckable_skipped" => s.twinpage_uncheckable_skipped,
        "twinpage_pages_unmergeable" => s.twinpage_pages_unmergeable,
        "twinpage_pages_registered" => s.twinpage_pages_registered,
        "twinpage_merging_pages" => s.twinpage_merging_pages,
        "twinpage_daemon_merged" => s.twinpage_daemon_merged,
        "twinpage_daemon_agents" => s.twinpage_daemon_agents,
        "twinpage_daemon_proposals" => s.twinpage_daemon_proposals,
        "twinpage_store_bytes" => s.twinpage_store_bytes,
        "twinpage_store_full" => s.twinpage_store_full,
        _ => return None,
    };
    Some(i128::from(v))
}

/// All counters of `s`.
pub fn of(s: &KsmStats) -> Counters {
    FIELDS.iter().filter_map(|&(n, _)| Some((n.to_string(), get(s, n)?))).collect()
}

/// `name value` lines.
pub fn render_lines<'a>(pairs: impl IntoIterator<Item = (&'a str, i128)>) -> String {
    let mut out = String::new();
    for (n, v) in pairs {
        out.push_str(n);
        out.push(' ');
        out.push_str(&v.to_string());
        out.push('\n');
    }
    out
}

/// Parses `name value` lines (other lines are ignored).
pub fn parse_lines(text: &str) -> Counters {
    text.lines()
        .filter_map(|l| {
            let (n, v) = l.split_once(' ')?;
            Some((n.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// How a counter of `kernel/mm/ksm` prints: `%ld` for the signed ones,
/// `%lu` for the others (never negative; `pages_volatile` is clamped at 0
/// as the kernel does).
pub fn show(attr: &kernel_compat::Attr, v: i128) -> String {
    if attr.is_signed() && attr.name != "pages_volatile" {
        v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)).to_string()
    } else {
        v.clamp(0, i128::from(u64::MAX)).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of KsmStats is in FIELDS (a new counter must be given a
    /// way to combine).
    #[test]
    fn fields_cover_ksm_stats() {
        let debug = format!("{:?}", KsmStats::default());
        let inner = debug.trim_start_matches("KsmStats {").trim_end_matches('}');
        let mut names: Vec<&str> = inner.split(',').filter_map(|f| f.split(':').next()).map(str::trim).filter(|s| !s.is_empty()).collect();
        names.sort_unstable();
        let mut ours: Vec<&str> = FIELDS.iter().map(|f| f.0).collect();
        ours.sort_unstable();
        assert_eq!(names, ours);
        let s = KsmStats { pages_sharing: 7, general_profit: -5, ..KsmStats::default() };
        let c = of(&s);
        assert_eq!(c["pages_sharing"], 7);
        assert_eq!(c["general_profit"], -5);
        assert_eq!(parse_lines(&render_lines(c.iter().map(|(k, v)| (k.as_str(), *v)))), c);
    }

    #[test]
    fn kernel_counters_are_fields() {
        for a in kernel_compat::ATTRS.iter().filter(|a| !a.writable) {
            assert!(FIELDS.iter().any(|f| f.0 == a.name), "{}", a.name);
        }
        let gp = kernel_compat::find("general_profit").unwrap();
        assert_eq!(show(gp, -4096), "-4096");
        assert_eq!(show(kernel_compat::find("pages_volatile").unwrap(), -3), "0");
        assert_eq!(show(kernel_compat::find("pages_shared").unwrap(), 12), "12");
    }
}
