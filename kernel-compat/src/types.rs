//! The two types every part of the crate speaks in: why the kernel refuses a
//! write ([`WriteError`], with its errno) and the advisor's mode
//! ([`AdvisorMode`]). They live apart so that the attribute table, the
//! parsers and the write model each depend on them, not on one another.

use std::fmt;

/// Why a write to a KSM attribute is refused, with the errno the kernel
/// returns to `write(2)` (or `open(2)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WriteError {
    /// `EINVAL` (22): the text is not a value the store function accepts.
    #[error("EINVAL: invalid argument")]
    Inval,
    /// `EBUSY` (16): `max_page_sharing` or `merge_across_nodes` cannot change
    /// while KSM pages are shared (`pages_shared > 0`).
    #[error("EBUSY: KSM pages are shared")]
    Busy,
    /// `EACCES` (13): the attribute is read-only (mode 0444). Even root gets
    /// this: kernfs refuses to open a file without a `store` for writing,
    /// so the error comes from `open(2)`, not from `write(2)`. (A non-root
    /// writer gets the same `EACCES` from `open(2)` for every attribute.)
    #[error("EACCES: read-only attribute")]
    ReadOnly,
    /// `ENOENT` (2): there is no such attribute (opening it for writing
    /// without `O_CREAT`; with `O_CREAT` sysfs answers `EACCES`).
    #[error("ENOENT: no such attribute")]
    NoSuchAttr,
    /// `ERANGE` (34): the number does not fit the kernel variable. Only
    /// `max_page_sharing` and `merge_across_nodes` pass this through from
    /// `kstrtoint()`/`kstrtoul()`; every other store turns it into `EINVAL`.
    /// The [`crate::parse`] functions return it for any overflow.
    #[error("ERANGE: value out of range")]
    Range,
}

impl WriteError {
    /// The libc errno number (x86_64/generic Linux numbering).
    pub fn errno(self) -> i32 {
        match self {
            WriteError::Inval => 22,
            WriteError::Busy => 16,
            WriteError::ReadOnly => 13,
            WriteError::NoSuchAttr => 2,
            WriteError::Range => 34,
        }
    }

    /// The errno's symbolic name: `"EINVAL"`, `"EBUSY"`, `"EACCES"`,
    /// `"ENOENT"` or `"ERANGE"`.
    pub fn name(self) -> &'static str {
        match self {
            WriteError::Inval => "EINVAL",
            WriteError::Busy => "EBUSY",
            WriteError::ReadOnly => "EACCES",
            WriteError::NoSuchAttr => "ENOENT",
            WriteError::Range => "ERANGE",
        }
    }

    /// The error for an errno number, if it is one of the five above.
    pub fn from_errno(errno: i32) -> Option<WriteError> {
        match errno {
            22 => Some(WriteError::Inval),
            16 => Some(WriteError::Busy),
            13 => Some(WriteError::ReadOnly),
            2 => Some(WriteError::NoSuchAttr),
            34 => Some(WriteError::Range),
            _ => None,
        }
    }
}

/// The KSM advisor (`advisor_mode`), the kernel's `enum ksm_advisor_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AdvisorMode {
    /// `none`: `pages_to_scan` is set by the user (the default).
    #[default]
    None,
    /// `scan-time`: the advisor tunes `pages_to_scan` to reach
    /// `advisor_target_scan_time`; `pages_to_scan` is then not writable.
    ScanTime,
}

impl AdvisorMode {
    /// The word a user writes: `"none"` or `"scan-time"`.
    pub fn as_str(self) -> &'static str {
        match self {
            AdvisorMode::None => "none",
            AdvisorMode::ScanTime => "scan-time",
        }
    }

    /// Parses what reading `advisor_mode` prints (`"[none] scan-time"` or
    /// `"none [scan-time]"`, with or without the newline) or a bare word
    /// (`"none"`, `"scan-time"`).
    pub fn from_show(text: &str) -> Option<AdvisorMode> {
        match text.trim() {
            "[none] scan-time" | "none" => Some(AdvisorMode::None),
            "none [scan-time]" | "scan-time" => Some(AdvisorMode::ScanTime),
            _ => None,
        }
    }
}

impl fmt::Display for AdvisorMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
