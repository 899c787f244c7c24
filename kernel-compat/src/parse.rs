//! The kernel's string-to-number conversions (`lib/kstrtox.c`) and
//! `sysfs_streq()`, with Linux 6.18 semantics, as the KSM sysfs store
//! functions use them.
//!
//! All functions take `&str` or `&[u8]` (anything `AsRef<[u8]>`). The kernel
//! sees a NUL-terminated C string, so the input ends at its first NUL byte:
//! `"5\0junk"` parses as `"5"`.
//!
//! Integer rules (base 10, the only base the KSM stores pass):
//! - one optional leading `+` (and, for the signed conversions, one optional
//!   leading `-` instead);
//! - at least one decimal digit; leading zeros are fine (`"010"` is ten);
//! - optionally one `'\n'` right after the digits, then the end;
//! - nothing else: no spaces, no `0x` prefix, no second newline.
//!
//! Errors are [`WriteError::Inval`] (`-EINVAL`, not a number) or
//! [`WriteError::Range`] (`-ERANGE`, a number that does not fit). An
//! overflow is reported even if garbage follows the digits
//! (`"99999999999999999999x"` is `ERANGE`), exactly as the kernel does.
//! Most KSM store functions turn any conversion error into `-EINVAL`; see
//! [`crate::write::parse_write`] for which ones pass `ERANGE` through.

use crate::types::WriteError;

/// The input as the kernel sees it: everything before the first NUL byte.
fn c_str(s: &[u8]) -> &[u8] {
    match s.iter().position(|&b| b == 0) {
        Some(i) => &s[..i],
        None => s,
    }
}

/// `_kstrtoull()` in base 10: no sign handling.
fn kstrtoull_unsigned(s: &[u8]) -> Result<u64, WriteError> {
    let mut res: u64 = 0;
    let mut overflow = false;
    let mut consumed = 0usize;
    for &c in s {
        if !c.is_ascii_digit() {
            break;
        }
        let digit = u64::from(c - b'0');
        match res.checked_mul(10).and_then(|r| r.checked_add(digit)) {
            Some(r) => res = r,
            None => {
                overflow = true;
                res = res.wrapping_mul(10).wrapping_add(digit);
            }
        }
        consumed += 1;
    }
    if overflow {
        return Err(WriteError::Range);
    }
    if consumed == 0 {
        return Err(WriteError::Inval);
    }
    let mut rest = &s[consumed..];
    if let [b'\n', tail @ ..] = rest {
        rest = tail;
    }
    if rest.is_empty() {
        Ok(res)
    } else {
        Err(WriteError::Inval)
    }
}

/// `kstrtoull(s, 10, ..)`: unsigned 64-bit, optional leading `+`.
pub fn kstrtoull(s: impl AsRef<[u8]>) -> Result<u64, WriteError> {
    let s = c_str(s.as_ref());
    let s = s.strip_prefix(b"+").unwrap_or(s);
    kstrtoull_unsigned(s)
}

/// `kstrtoul(s, 10, ..)`: `unsigned long`, which is 64 bits on the 64-bit
/// kernels twinpage runs on, so this is [`kstrtoull`].
pub fn kstrtoul(s: impl AsRef<[u8]>) -> Result<u64, WriteError> {
    kstrtoull(s)
}

/// `kstrtouint(s, 10, ..)`: unsigned 32-bit; a value above `u32::MAX` is
/// [`WriteError::Range`].
pub fn kstrtouint(s: impl AsRef<[u8]>) -> Result<u32, WriteError> {
    let v = kstrtoull(s)?;
    u32::try_from(v).map_err(|_| WriteError::Range)
}

/// `kstrtoll(s, 10, ..)`: signed 64-bit, optional leading `+` or `-`
/// (not both).
pub fn kstrtoll(s: impl AsRef<[u8]>) -> Result<i64, WriteError> {
    let s = c_str(s.as_ref());
    if let Some(digits) = s.strip_prefix(b"-") {
        let magnitude = kstrtoull_unsigned(digits)?;
        // The kernel negates in unsigned arithmetic and refuses a result
        // that comes out positive: everything up to 2^63 fits.
        let negated = magnitude.wrapping_neg() as i64;
        if negated > 0 {
            return Err(WriteError::Range);
        }
        Ok(negated)
    } else {
        let v = kstrtoull(s)?;
        i64::try_from(v).map_err(|_| WriteError::Range)
    }
}

/// `kstrtoint(s, 10, ..)`: signed 32-bit (used by `max_page_sharing`).
pub fn kstrtoint(s: impl AsRef<[u8]>) -> Result<i32, WriteError> {
    let v = kstrtoll(s)?;
    i32::try_from(v).map_err(|_| WriteError::Range)
}

/// `kstrtobool()` as in Linux 6.18: only the first one or two bytes count.
///
/// - first byte `y Y t T e E 1` → `true` (so `"yes"`, `"true"`,
///   `"enable"`, `"Yesterday"` are all true);
/// - first byte `n N f F d D 0` → `false` (`"no"`, `"false"`,
///   `"disable"`, `"nonsense"`);
/// - `o`/`O` followed by `n`/`N` → `true` (`"on"`), by `f`/`F` → `false`
///   (`"off"`, `"of"`);
/// - anything else (`""`, `"\n"`, `"2"`, `"o"`, `" y"`) → `EINVAL`.
///
/// Checked byte by byte against the running 6.18 kernel; older kernels
/// (before 6.0) did not accept `t`/`f`/`e`/`d`.
pub fn kstrtobool(s: impl AsRef<[u8]>) -> Result<bool, WriteError> {
    let s = c_str(s.as_ref());
    match s.first() {
        Some(b'y' | b'Y' | b't' | b'T' | b'e' | b'E' | b'1') => Ok(true),
        Some(b'n' | b'N' | b'f' | b'F' | b'd' | b'D' | b'0') => Ok(false),
        Some(b'o' | b'O') => match s.get(1) {
            Some(b'n' | b'N') => Ok(true),
            Some(b'f' | b'F') => Ok(false),
            _ => Err(WriteError::Inval),
        },
        _ => Err(WriteError::Inval),
    }
}

/// `sysfs_streq(expected, input)`: equal, except that either string may end
/// with one `'\n'` the other lacks. `"none\n"` matches `"none"`;
/// `" none"`, `"None"` and `"none\n\n"` do not.
pub fn sysfs_streq(a: impl AsRef<[u8]>, b: impl AsRef<[u8]>) -> bool {
    let a = c_str(a.as_ref());
    let b = c_str(b.as_ref());
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    matches!((&a[common..], &b[common..]), ([], []) | ([], [b'\n']) | ([b'\n'], []))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::WriteError::{Inval, Range};

    #[test]
    fn uint_accepts_kernel_forms() {
        assert_eq!(kstrtouint("5"), Ok(5));
        assert_eq!(kstrtouint("5\n"), Ok(5));
        assert_eq!(kstrtouint("+5"), Ok(5));
        assert_eq!(kstrtouint("+5\n"), Ok(5));
        assert_eq!(kstrtouint("010"), Ok(10));
        assert_eq!(kstrtouint("00000000000000000000000000000007"), Ok(7));
        assert_eq!(kstrtouint("4294967295"), Ok(u32::MAX));
        assert_eq!(kstrtouint("5\0abc"), Ok(5));
        assert_eq!(kstrtouint(b"7\n\0\n"), Ok(7));
    }

    #[test]
    fn uint_refuses() {
        for bad in ["", "\n", "abc", "-1", "-0", "0x10", " 5", "5 ", "5\n\n", "+", "+-5", "-+5", "++5", "1a", "\x005", "5\r\n", "５"] {
            assert_eq!(kstrtouint(bad), Err(Inval), "{bad:?}");
        }
        assert_eq!(kstrtouint("4294967296"), Err(Range));
        assert_eq!(kstrtouint("99999999999999999999"), Err(Range));
        // Overflow wins over trailing garbage, as in _kstrtoull().
        assert_eq!(kstrtouint("99999999999999999999abc"), Err(Range));
    }

    #[test]
    fn ull_limits() {
        assert_eq!(kstrtoull("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(kstrtoull("18446744073709551616"), Err(Range));
        assert_eq!(kstrtoul("18446744073709551615\n"), Ok(u64::MAX));
        assert_eq!(kstrtoull("0"), Ok(0));
    }

    #[test]
    fn signed() {
        assert_eq!(kstrtoint("-1"), Ok(-1));
        assert_eq!(kstrtoint("-0"), Ok(0));
        assert_eq!(kstrtoint("+7\n"), Ok(7));
        assert_eq!(kstrtoint("2147483647"), Ok(i32::MAX));
        assert_eq!(kstrtoint("2147483648"), Err(Range));
        assert_eq!(kstrtoint("-2147483648"), Ok(i32::MIN));
        assert_eq!(kstrtoint("-2147483649"), Err(Range));
        assert_eq!(kstrtoint("99999999999"), Err(Range));
        assert_eq!(kstrtoint("-+5"), Err(Inval));
        assert_eq!(kstrtoint("+-5"), Err(Inval));
        assert_eq!(kstrtoint("--5"), Err(Inval));
        assert_eq!(kstrtoint("-"), Err(Inval));
        assert_eq!(kstrtoll("-9223372036854775808"), Ok(i64::MIN));
        assert_eq!(kstrtoll("-9223372036854775809"), Err(Range));
        assert_eq!(kstrtoll("9223372036854775807"), Ok(i64::MAX));
        assert_eq!(kstrtoll("9223372036854775808"), Err(Range));
        assert_eq!(kstrtoll("-18446744073709551616"), Err(Range));
    }

    #[test]
    fn bools() {
        for t in ["y", "Y", "yes", "1", "on", "ON", "oN", "t", "true", "e", "enable", "y\n", "Yesterday", "10"] {
            assert_eq!(kstrtobool(t), Ok(true), "{t:?}");
        }
        for f in ["n", "N", "no", "0", "off", "OFF", "of", "oF", "f", "false", "d", "disable", "nonsense", "0\n\n"] {
            assert_eq!(kstrtobool(f), Ok(false), "{f:?}");
        }
        for bad in ["", "\n", "2", "o", "ox", "o\0n", " y", "\0", "a", "x", "-1"] {
            assert_eq!(kstrtobool(bad), Err(Inval), "{bad:?}");
        }
    }

    #[test]
    fn streq() {
        assert!(sysfs_streq("none", "none"));
        assert!(sysfs_streq("none", "none\n"));
        assert!(sysfs_streq("none\n", "none"));
        assert!(sysfs_streq("none", "none\0junk"));
        assert!(sysfs_streq("none", "none\n\0junk"));
        assert!(!sysfs_streq("none", "none\n\n"));
        assert!(!sysfs_streq("none", " none"));
        assert!(!sysfs_streq("none", "None"));
        assert!(!sysfs_streq("none", "non"));
        assert!(!sysfs_streq("none", "nonee"));
        assert!(!sysfs_streq("none", ""));
        assert!(!sysfs_streq("", "\n\n"));
        assert!(sysfs_streq("", "\n"));
    }
}
