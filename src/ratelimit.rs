//! Log lines a guest can trigger are printed once per key, then counted.

use std::collections::HashSet;
use std::sync::OnceLock;

use parking_lot::Mutex;

fn seen() -> &'static Mutex<HashSet<&'static str>> {
    static SEEN: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    SEEN.get_or_init(|| Mutex::new(HashSet::new()))
}

/// True the first time `key` is passed in this process.
pub fn first_time(key: &'static str) -> bool {
    seen().lock().insert(key)
}

/// Logs a warning once per key.
#[macro_export]
macro_rules! warn_once {
    ($key:expr, $($arg:tt)*) => {
        if $crate::ratelimit::first_time($key) {
            log::warn!($($arg)*);
        }
    };
}
