//! A driver for a KSM attribute directory: the kernel's
//! `/sys/kernel/mm/ksm`, or any directory with the same layout (twinpage's
//! `$TWINPAGE_DIR/kernel/mm/ksm`).
//!
//! Used by benchmarks (set up kernel KSM, read its counters) and by the
//! conformance tests. [`SavedKsm`] snapshots the writable settings and puts
//! them back when dropped, so an experiment never leaves the machine changed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::ops::Deref;
use std::path::{Path, PathBuf};

use crate::attrs;
use crate::write::{AdvisorMode, Tunables, Value, WriteContext, WriteError};

/// A KSM attribute directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KsmSysfs {
    root: PathBuf,
}

/// A write that failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteOutcomeError {
    /// The kernel (or emulator) refused with one of the errnos of
    /// [`WriteError`].
    #[error("write {value:?} to {}: {kind}", path.display())]
    Refused {
        /// The attribute file.
        path: PathBuf,
        /// What was written (lossy UTF-8).
        value: String,
        /// The errno, as a [`WriteError`].
        kind: WriteError,
    },
    /// Any other I/O error.
    #[error("write {value:?} to {}: {source}", path.display())]
    Io {
        /// The attribute file.
        path: PathBuf,
        /// What was written (lossy UTF-8).
        value: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl WriteOutcomeError {
    /// The refusal, if the errno was one [`WriteError`] knows.
    pub fn kind(&self) -> Option<WriteError> {
        match self {
            WriteOutcomeError::Refused { kind, .. } => Some(*kind),
            WriteOutcomeError::Io { .. } => None,
        }
    }

    /// The raw errno, if there was one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            WriteOutcomeError::Refused { kind, .. } => Some(kind.errno()),
            WriteOutcomeError::Io { source, .. } => source.raw_os_error(),
        }
    }
}

/// The writable settings of a KSM directory, as text read from it
/// (trimmed), keyed by attribute name. Only attributes that exist are
/// present.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Attribute name → value as read (e.g. `"advisor_mode"` →
    /// `"[none] scan-time"`).
    pub values: BTreeMap<String, String>,
}

impl Snapshot {
    /// The saved text of one attribute.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The saved settings as [`Tunables`].
    pub fn tunables(&self) -> Result<Tunables, String> {
        Tunables::from_shown(self.values.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

/// Some writes of a [`KsmSysfs::restore`] failed (the others were done).
#[derive(Debug, thiserror::Error)]
#[error("restore failed for {} attribute(s): {}", failures.len(), failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; "))]
pub struct RestoreError {
    /// Each failed write.
    pub failures: Vec<WriteOutcomeError>,
}

/// Restore order: stop ksmd; advisor bounds before the mode (switching to
/// scan-time copies `advisor_min_pages_to_scan` into `pages_to_scan`); the
/// mode before `pages_to_scan` (which refuses writes under scan-time, and is
/// reset to 100 when the mode goes back to none). `run` is not listed:
/// [`KsmSysfs::restore`] sets it to 0 before and writes it back last.
pub const RESTORE_ORDER: &[&str] = &[
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_max_cpu",
    "advisor_target_scan_time",
    "advisor_mode",
    "pages_to_scan",
    "sleep_millisecs",
    "use_zero_pages",
    "smart_scan",
    "stable_node_chains_prune_millisecs",
    "max_page_sharing",
    "merge_across_nodes",
];

fn invalid_data(path: &Path, text: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: unexpected value {text:?}", path.display()))
}

impl KsmSysfs {
    /// The kernel's `/sys/kernel/mm/ksm`.
    pub fn kernel() -> KsmSysfs {
        KsmSysfs::at(crate::abi::KSM_SYSFS_DIR)
    }

    /// Any directory with the same layout, e.g.
    /// `$TWINPAGE_DIR/kernel/mm/ksm`.
    pub fn at(path: impl Into<PathBuf>) -> KsmSysfs {
        KsmSysfs { root: path.into() }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of attribute `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The directory exists.
    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }

    /// `run` can be opened for writing (root, writable sysfs). Opening
    /// changes nothing.
    pub fn is_writable(&self) -> bool {
        OpenOptions::new().write(true).open(self.path("run")).is_ok()
    }

    /// The file's content as is (with its newline).
    pub fn read_raw(&self, name: &str) -> io::Result<String> {
        fs::read_to_string(self.path(name))
    }

    /// The value, whitespace-trimmed (`"[none] scan-time"`, `"100"`).
    pub fn read(&self, name: &str) -> io::Result<String> {
        Ok(self.read_raw(name)?.trim().to_string())
    }

    /// An unsigned value.
    pub fn read_u64(&self, name: &str) -> io::Result<u64> {
        let t = self.read(name)?;
        t.parse().map_err(|_| invalid_data(&self.path(name), &t))
    }

    /// A signed value (`general_profit`, `ksm_zero_pages`, ...).
    pub fn read_i64(&self, name: &str) -> io::Result<i64> {
        let t = self.read(name)?;
        t.parse().map_err(|_| invalid_data(&self.path(name), &t))
    }

    /// `advisor_mode`.
    pub fn read_advisor_mode(&self) -> io::Result<AdvisorMode> {
        let t = self.read("advisor_mode")?;
        AdvisorMode::from_show(&t).ok_or_else(|| invalid_data(&self.path("advisor_mode"), &t))
    }

    /// Writes `value` exactly as given (no newline added) like
    /// `echo -n value > file`: open for writing with `O_TRUNC` (harmless on
    /// sysfs, needed for a regular-file emulation), then write all bytes.
    /// An empty value opens the file and writes nothing, which the kernel
    /// accepts as a no-op. The errno is reported as [`WriteError`] where it
    /// is one of those (`EACCES` from `open` for a read-only attribute,
    /// `ENOENT` for a missing one, `EINVAL`/`EBUSY`/`ERANGE` from `write`).
    pub fn write(&self, name: &str, value: impl AsRef<[u8]>) -> Result<(), WriteOutcomeError> {
        let path = self.path(name);
        let bytes = value.as_ref();
        let result = OpenOptions::new().write(true).truncate(true).open(&path).and_then(|mut f| f.write_all(bytes));
        result.map_err(|source| {
            let value = String::from_utf8_lossy(bytes).into_owned();
            match source.raw_os_error().and_then(WriteError::from_errno) {
                Some(kind) => WriteOutcomeError::Refused { path, value, kind },
                None => WriteOutcomeError::Io { path, value, source },
            }
        })
    }

    /// Writes a typed value with its canonical text.
    pub fn write_value(&self, value: &Value) -> Result<(), WriteOutcomeError> {
        self.write(value.name(), value.to_write_text())
    }

    /// The file names in the directory.
    pub fn names(&self) -> io::Result<BTreeSet<String>> {
        let mut names = BTreeSet::new();
        for entry in fs::read_dir(&self.root)? {
            names.insert(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    /// The state the store functions consult, read from the directory.
    pub fn write_context(&self) -> io::Result<WriteContext> {
        let merge = match self.read_u64("merge_across_nodes") {
            Ok(v) => Some(v as u32),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(WriteContext {
            pages_shared: self.read_u64("pages_shared")?,
            advisor_on: self.read_advisor_mode()? != AdvisorMode::None,
            run: self.read_u64("run")? as u32,
            max_page_sharing: self.read_u64("max_page_sharing")? as u32,
            merge_across_nodes: merge.unwrap_or(1),
            numa: merge.is_some(),
        })
    }

    /// The writable settings as [`Tunables`].
    pub fn tunables(&self) -> io::Result<Tunables> {
        let snap = self.snapshot()?;
        snap.tunables().map_err(|name| invalid_data(&self.path(&name), snap.get(&name).unwrap_or("")))
    }

    /// Reads every writable attribute of [`attrs::ATTRS`] that exists.
    pub fn snapshot(&self) -> io::Result<Snapshot> {
        let mut values = BTreeMap::new();
        for a in attrs::writable() {
            match self.read(a.name) {
                Ok(v) => {
                    values.insert(a.name.to_string(), v);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Snapshot { values })
    }

    /// Writes a snapshot back, in an order the kernel accepts: `run=0`
    /// first (if it is not 0), then the advisor bounds, `advisor_mode`,
    /// `pages_to_scan` (skipped if the saved mode is scan-time: the advisor
    /// owns it then), the other knobs, `max_page_sharing` and
    /// `merge_across_nodes`, and the saved `run` last.
    ///
    /// Every write is attempted even if one fails. `max_page_sharing` and
    /// `merge_across_nodes` are only written if they differ from the
    /// current value; if pages are shared meanwhile that write is `EBUSY`
    /// and reported — this never unmerges (`run=2`) on its own.
    pub fn restore(&self, snapshot: &Snapshot) -> Result<(), RestoreError> {
        let mut failures = Vec::new();
        let mut note = |r: Result<(), WriteOutcomeError>| {
            if let Err(e) = r {
                failures.push(e);
            }
        };
        let run_now = self.read("run").ok();
        if snapshot.get("run").is_some() && run_now.as_deref() != Some("0") {
            note(self.write("run", "0"));
        }
        let scan_time = snapshot.get("advisor_mode").and_then(AdvisorMode::from_show) == Some(AdvisorMode::ScanTime);
        for &name in RESTORE_ORDER {
            let Some(saved) = snapshot.get(name) else {
                continue;
            };
            match name {
                "advisor_mode" => {
                    let word = AdvisorMode::from_show(saved).map(AdvisorMode::as_str).unwrap_or(saved);
                    note(self.write(name, word));
                }
                "pages_to_scan" if scan_time => {}
                "max_page_sharing" | "merge_across_nodes" => {
                    if self.read(name).ok().as_deref() != Some(saved) {
                        note(self.write(name, saved));
                    }
                }
                _ => note(self.write(name, saved)),
            }
        }
        if let Some(run) = snapshot.get("run") {
            if self.read("run").ok().as_deref() != Some(run) {
                note(self.write("run", run));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(RestoreError { failures })
        }
    }

    /// Snapshots now and returns a guard that restores on drop.
    pub fn save(&self) -> io::Result<SavedKsm> {
        SavedKsm::new(self.clone())
    }
}

/// Snapshots a KSM directory's writable settings on creation and restores
/// them when dropped (errors on drop are printed to stderr; call
/// [`SavedKsm::finish`] to see them instead).
#[derive(Debug)]
pub struct SavedKsm {
    sysfs: KsmSysfs,
    snapshot: Snapshot,
    armed: bool,
}

impl SavedKsm {
    /// Takes the snapshot.
    pub fn new(sysfs: KsmSysfs) -> io::Result<SavedKsm> {
        let snapshot = sysfs.snapshot()?;
        Ok(SavedKsm { sysfs, snapshot, armed: true })
    }

    /// The saved values.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The directory.
    pub fn sysfs(&self) -> &KsmSysfs {
        &self.sysfs
    }

    /// Restores now; the guard stays armed and restores again on drop.
    pub fn restore(&self) -> Result<(), RestoreError> {
        self.sysfs.restore(&self.snapshot)
    }

    /// Restores now and disarms the guard, returning the outcome.
    pub fn finish(mut self) -> Result<(), RestoreError> {
        self.armed = false;
        self.sysfs.restore(&self.snapshot)
    }
}

impl Deref for SavedKsm {
    type Target = KsmSysfs;
    fn deref(&self) -> &KsmSysfs {
        &self.sysfs
    }
}

impl Drop for SavedKsm {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.sysfs.restore(&self.snapshot) {
                eprintln!("kernel-compat: could not restore {}: {e}", self.sysfs.root.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake KSM directory of regular files holding the kernel defaults.
    fn fake_dir(tag: &str) -> (PathBuf, KsmSysfs) {
        let dir = std::env::temp_dir().join(format!("kernel-compat-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for a in attrs::ATTRS {
            fs::write(dir.join(a.name), attrs::render(a.default)).unwrap();
        }
        (dir.clone(), KsmSysfs::at(dir))
    }

    #[test]
    fn driver_on_regular_files() {
        let (dir, k) = fake_dir("driver");
        let expected: BTreeSet<String> = attrs::ATTRS.iter().map(|a| a.name.to_string()).collect();
        assert_eq!(k.names().unwrap(), expected);
        assert_eq!(k.read("advisor_mode").unwrap(), "[none] scan-time");
        assert_eq!(k.read_u64("pages_to_scan").unwrap(), 100);
        assert_eq!(k.read_i64("general_profit").unwrap(), 0);
        assert_eq!(k.write_context().unwrap(), WriteContext::default());
        assert_eq!(k.tunables().unwrap(), Tunables::default());
        {
            let saved = k.save().unwrap();
            saved.write("pages_to_scan", "5").unwrap();
            saved.write("advisor_mode", "scan-time").unwrap();
            saved.write("run", "1").unwrap();
            saved.write("max_page_sharing", "300").unwrap();
            assert_eq!(k.read("pages_to_scan").unwrap(), "5");
        }
        assert_eq!(k.tunables().unwrap(), Tunables::default());
        let err = k.write("nope", "1").unwrap_err();
        assert_eq!(err.kind(), Some(WriteError::NoSuchAttr));
        assert_eq!(err.errno(), Some(2));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn restore_skips_pages_to_scan_under_advisor() {
        let (dir, k) = fake_dir("advisor");
        k.write("advisor_mode", "none [scan-time]").unwrap();
        let snap = k.snapshot().unwrap();
        k.write("pages_to_scan", "42").unwrap();
        k.restore(&snap).unwrap();
        assert_eq!(k.read("pages_to_scan").unwrap(), "42");
        assert_eq!(k.read("advisor_mode").unwrap(), "scan-time");
        fs::remove_dir_all(dir).unwrap();
    }
}
