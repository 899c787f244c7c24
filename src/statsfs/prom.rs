//! Per-process and per-domain figures for Prometheus, as a node_exporter
//! textfile-collector file (`--collector.textfile.directory`): one series
//! per process, labelled by pid and by the name an operator knows it by (a
//! QEMU guest's `-name`), and one per twinpaged sharing domain (what its
//! store holds and how many pages map it). Host totals are node_exporter's
//! own ksmd collector, pointed at the tree.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use super::ProcessEntry;

/// `(metric, help, type, value of a process)`.
type Metric = (&'static str, &'static str, &'static str, fn(&ProcessEntry) -> i128);

fn counter(p: &ProcessEntry, name: &str) -> i128 {
    i128::from(p.counter(name))
}

const METRICS: &[Metric] = &[
    ("twinpage_process_merging_pages", "Pages of the process that map a merged page (its ksm_merging_pages).", "gauge", |p| {
        p.stat.map_or(0, |s| i128::from(s.ksm_merging_pages))
    }),
    (
        "twinpage_process_zero_pages",
        "Pages of the process dropped to the zero page and counted as such (its ksm_zero_pages).",
        "gauge",
        |p| p.stat.map_or(0, |s| i128::from(s.ksm_zero_pages)),
    ),
    (
        "twinpage_process_profit_bytes",
        "Bytes merging saves the process less twinpage's metadata for it (its ksm_process_profit).",
        "gauge",
        |p| p.stat.map_or(0, |s| i128::from(s.ksm_process_profit)),
    ),
    ("twinpage_process_registered_pages", "Pages of the process registered for merging.", "gauge", |p| {
        counter(p, "twinpage_pages_registered")
    }),
    (
        "twinpage_process_held_back_pages",
        "Pages vm.max_map_count kept from merging in the process's last full scan that held any back.",
        "gauge",
        |p| counter(p, "twinpage_pages_held_back"),
    ),
    ("twinpage_process_cow_breaks_total", "Merged pages of the process whose sharing a write broke.", "counter", |p| {
        counter(p, "twinpage_cow_breaks")
    }),
    (
        "twinpage_process_cow_in_place_total",
        "Of those, pages the kernel copied in place because a scan batch held their region for 200 ms: they never merge again.",
        "counter",
        |p| counter(p, "twinpage_cow_in_place"),
    ),
];

/// A label value in the exposition format's escaping.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `(metric, help, type, value of a domain)`.
/// What one sharing domain holds now (for twinpaged's per-domain metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainFigures {
    pub name: String,
    /// Agents connected in it.
    pub agents: u64,
    /// Its store pages in use, and the pages beyond the first mapping each
    /// (the kernel's `pages_shared`/`pages_sharing`, for this domain).
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub store_bytes: u64,
}

type DomainMetric = (&'static str, &'static str, &'static str, fn(&DomainFigures) -> u64);

const DOMAIN_METRICS: &[DomainMetric] = &[
    ("twinpage_domain_pages_shared", "Store pages of the sharing domain in use (its pages_shared).", "gauge", |d| d.pages_shared),
    (
        "twinpage_domain_pages_sharing",
        "Pages of the domain's processes that map one of its store pages, beyond the first (its pages_sharing).",
        "gauge",
        |d| d.pages_sharing,
    ),
    ("twinpage_domain_agents", "Processes merging in the sharing domain through twinpaged.", "gauge", |d| d.agents),
    ("twinpage_domain_store_bytes", "Bytes the sharing domain's store holds.", "gauge", |d| d.store_bytes),
];

/// The textfile for the live processes among `processes` and twinpaged's
/// sharing `domains`.
pub fn render(processes: &[ProcessEntry], domains: &[DomainFigures]) -> String {
    let live: Vec<&ProcessEntry> = processes.iter().filter(|p| p.live).collect();
    let mut out = String::new();
    for (name, help, kind, value) in METRICS {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in &live {
            let _ = writeln!(out, "{name}{{name=\"{}\",pid=\"{}\"}} {}", escape(&p.name), p.pid, value(p));
        }
    }
    for (name, help, kind, value) in DOMAIN_METRICS {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for d in domains {
            let _ = writeln!(out, "{name}{{domain=\"{}\"}} {}", escape(&d.name), value(d));
        }
    }
    out
}

/// Writes `content` as `dir/twinpage.prom`, atomically (a scrape never sees
/// half a file).
pub fn write(dir: &Path, content: &str) -> io::Result<()> {
    let tmp = dir.join(".twinpage.prom.tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, dir.join("twinpage.prom"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_labelled_and_escaped() {
        let mut p = ProcessEntry {
            pid: 42,
            comm: "qemu".into(),
            name: "web \"1\"\\a".into(),
            stat: None,
            live: true,
            stopped: false,
            counters: Default::default(),
            tunables: Vec::new(),
        };
        p.counters.insert("twinpage_pages_registered".into(), 65536);
        let dead = ProcessEntry { pid: 7, live: false, ..p.clone() };
        let d = DomainFigures { name: "uid:0".into(), agents: 2, pages_shared: 3, pages_sharing: 9, store_bytes: 12288 };
        let text = render(&[p, dead], &[d]);
        assert!(text.contains("twinpage_process_registered_pages{name=\"web \\\"1\\\"\\\\a\",pid=\"42\"} 65536"), "{text}");
        assert!(!text.contains("pid=\"7\""), "a dead process has no series");
        assert!(text.contains("twinpage_domain_pages_sharing{domain=\"uid:0\"} 9"), "{text}");
        assert!(text.contains("twinpage_domain_store_bytes{domain=\"uid:0\"} 12288"), "{text}");
        assert_eq!(text.matches("# TYPE").count(), METRICS.len() + DOMAIN_METRICS.len());
    }
}
