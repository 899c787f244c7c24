//! `/proc/<pid>/ksm_stat` and `/proc/<pid>/ksm_merging_pages` as Linux 6.18
//! prints them (`fs/proc/base.c`).
//!
//! Both files are mode 0400. For a task without an mm (a kernel thread)
//! both are empty; [`parse`] reports that as [`ParseStatError::Empty`].

use std::fmt::Write as _;

/// The content of `/proc/<pid>/ksm_stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KsmStat {
    /// `ksm_rmap_items %lu`: rmap items (pages KSM tracks) of the process.
    pub ksm_rmap_items: u64,
    /// `ksm_zero_pages %ld`: pages merged with the zero page; an
    /// `atomic_long_t` printed signed since Linux 6.10.
    pub ksm_zero_pages: i64,
    /// `ksm_merging_pages %lu`: pages of the process backed by a KSM page.
    pub ksm_merging_pages: u64,
    /// `ksm_process_profit %ld`: see [`process_profit`].
    pub ksm_process_profit: i64,
    /// `ksm_merge_any: yes|no`: `prctl(PR_SET_MEMORY_MERGE, 1)` is in force.
    pub ksm_merge_any: bool,
    /// `ksm_mergeable: yes|no`: some VMA of the process is `VM_MERGEABLE`.
    pub ksm_mergeable: bool,
}

/// Why a `ksm_stat` text did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseStatError {
    /// The file was empty: the task has no mm (kernel thread, or exiting).
    #[error("empty ksm_stat (task without mm)")]
    Empty,
    /// Line `line` (1-based) is not what 6.18 prints there.
    #[error("ksm_stat line {line}: expected `{expected}`, got {got:?}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The field expected on that line (with its separator).
        expected: &'static str,
        /// The line as found (empty if missing).
        got: String,
    },
    /// Text after the six lines, or a missing final newline.
    #[error("ksm_stat: unexpected trailing text {0:?}")]
    Trailing(String),
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl KsmStat {
    /// The file content, byte for byte as 6.18 prints it:
    ///
    /// ```text
    /// ksm_rmap_items 0
    /// ksm_zero_pages 0
    /// ksm_merging_pages 0
    /// ksm_process_profit 0
    /// ksm_merge_any: no
    /// ksm_mergeable: no
    /// ```
    ///
    /// (numbers are separated by a space, the two yes/no fields by `": "`).
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(128);
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "ksm_rmap_items {}\nksm_zero_pages {}\nksm_merging_pages {}\nksm_process_profit {}\nksm_merge_any: {}\nksm_mergeable: {}\n",
            self.ksm_rmap_items,
            self.ksm_zero_pages,
            self.ksm_merging_pages,
            self.ksm_process_profit,
            yes_no(self.ksm_merge_any),
            yes_no(self.ksm_mergeable),
        );
        s
    }

    /// Parses the 6.18 format strictly (six lines in this order, each ending
    /// in `'\n'`).
    pub fn parse(text: &str) -> Result<KsmStat, ParseStatError> {
        parse(text)
    }
}

/// Parses the 6.18 `ksm_stat` format strictly; see [`KsmStat::render`].
pub fn parse(text: &str) -> Result<KsmStat, ParseStatError> {
    if text.is_empty() {
        return Err(ParseStatError::Empty);
    }
    let body = text.strip_suffix('\n').ok_or_else(|| ParseStatError::Trailing(text.rsplit('\n').next().unwrap_or("").to_string()))?;
    let mut lines = body.split('\n');
    let mut n = 0usize;
    let mut field = |expected: &'static str| -> Result<String, ParseStatError> {
        n += 1;
        let got = lines.next().unwrap_or("");
        got.strip_prefix(expected).map(str::to_string).ok_or_else(|| ParseStatError::BadLine { line: n, expected, got: got.to_string() })
    };
    fn num<T: std::str::FromStr>(v: String, line: usize, expected: &'static str) -> Result<T, ParseStatError> {
        let ok = !v.is_empty() && !v.starts_with('+') && v.bytes().skip(usize::from(v.starts_with('-'))).all(|b| b.is_ascii_digit());
        match v.parse::<T>() {
            Ok(x) if ok => Ok(x),
            _ => Err(ParseStatError::BadLine { line, expected, got: format!("{expected}{v}") }),
        }
    }
    fn flag(v: String, line: usize, expected: &'static str) -> Result<bool, ParseStatError> {
        match v.as_str() {
            "yes" => Ok(true),
            "no" => Ok(false),
            _ => Err(ParseStatError::BadLine { line, expected, got: format!("{expected}{v}") }),
        }
    }
    let stat = KsmStat {
        ksm_rmap_items: num(field("ksm_rmap_items ")?, 1, "ksm_rmap_items ")?,
        ksm_zero_pages: num(field("ksm_zero_pages ")?, 2, "ksm_zero_pages ")?,
        ksm_merging_pages: num(field("ksm_merging_pages ")?, 3, "ksm_merging_pages ")?,
        ksm_process_profit: num(field("ksm_process_profit ")?, 4, "ksm_process_profit ")?,
        ksm_merge_any: flag(field("ksm_merge_any: ")?, 5, "ksm_merge_any: ")?,
        ksm_mergeable: flag(field("ksm_mergeable: ")?, 6, "ksm_mergeable: ")?,
    };
    let rest: Vec<&str> = lines.collect();
    if !rest.is_empty() {
        return Err(ParseStatError::Trailing(rest.join("\n")));
    }
    Ok(stat)
}

/// The content of `/proc/<pid>/ksm_merging_pages`: the number and a newline.
pub fn render_merging_pages(n: u64) -> String {
    format!("{n}\n")
}

/// `ksm_process_profit()` of 6.18:
/// `(merging_pages + zero_pages) * PAGE_SIZE - rmap_items * sizeof(struct ksm_rmap_item)`,
/// in the kernel's wrapping `unsigned long` arithmetic read back as `long`.
/// With 4 KiB pages and 64-byte rmap items (x86_64): 256 merged pages
/// tracked by 256 rmap items give 1032192 (measured on this machine).
pub fn process_profit(merging_pages: u64, zero_pages: i64, rmap_items: u64) -> i64 {
    merging_pages
        .wrapping_add(zero_pages as u64)
        .wrapping_mul(crate::abi::PAGE_SIZE)
        .wrapping_sub(rmap_items.wrapping_mul(crate::abi::KSM_RMAP_ITEM_SIZE)) as i64
}

/// The path of a process's `ksm_stat` under a proc root (`/proc` for the
/// kernel, `$TWINPAGE_DIR/proc` for twinpage).
pub fn ksm_stat_path(proc_root: &std::path::Path, pid: u32) -> std::path::PathBuf {
    proc_root.join(pid.to_string()).join("ksm_stat")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZERO: &str =
        "ksm_rmap_items 0\nksm_zero_pages 0\nksm_merging_pages 0\nksm_process_profit 0\nksm_merge_any: no\nksm_mergeable: no\n";

    #[test]
    fn render_matches_kernel_bytes() {
        assert_eq!(KsmStat::default().render(), ZERO);
        let s = KsmStat {
            ksm_rmap_items: 256,
            ksm_zero_pages: 0,
            ksm_merging_pages: 256,
            ksm_process_profit: 1032192,
            ksm_merge_any: false,
            ksm_mergeable: true,
        };
        assert_eq!(
            s.render(),
            "ksm_rmap_items 256\nksm_zero_pages 0\nksm_merging_pages 256\nksm_process_profit 1032192\nksm_merge_any: no\nksm_mergeable: yes\n"
        );
        assert_eq!(parse(&s.render()), Ok(s));
        let neg = KsmStat { ksm_rmap_items: 10, ksm_process_profit: -640, ksm_zero_pages: -1, ..KsmStat::default() };
        assert_eq!(KsmStat::parse(&neg.render()), Ok(neg));
    }

    #[test]
    fn parse_is_strict() {
        assert_eq!(parse(""), Err(ParseStatError::Empty));
        assert!(parse(ZERO.trim_end()).is_err());
        assert!(parse(&format!("{ZERO}extra\n")).is_err());
        assert!(parse(&ZERO.replace("ksm_merge_any: no", "ksm_merge_any no")).is_err());
        assert!(parse(&ZERO.replace("ksm_rmap_items 0", "ksm_rmap_items -1")).is_err());
        assert!(parse(&ZERO.replace("ksm_rmap_items 0", "ksm_rmap_items +1")).is_err());
        assert!(parse(&ZERO.replace("ksm_mergeable: no", "ksm_mergeable: maybe")).is_err());
        let e = parse(&ZERO.replace("ksm_zero_pages 0\n", "")).unwrap_err();
        assert!(matches!(e, ParseStatError::BadLine { line: 2, .. }), "{e}");
    }

    #[test]
    fn profit() {
        assert_eq!(process_profit(256, 0, 256), 1032192);
        assert_eq!(process_profit(0, 0, 10), -640);
        assert_eq!(render_merging_pages(256), "256\n");
    }
}
