//! Reading /proc: CPU time of threads, PSS, MemAvailable, mapping counts.

use std::fs;

/// utime + stime in seconds from the text of a `/proc/.../stat` file.
pub fn stat_cpu(stat: &str) -> Option<f64> {
    twinpage::threads::stat_cpu_ns(stat).map(secs)
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn comm(path: &str) -> String {
    fs::read_to_string(path).map(|s| s.trim_end().to_string()).unwrap_or_default()
}

/// The pid of the kernel thread named `name` (e.g. `ksmd`).
pub fn kthread_pid(name: &str) -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        (comm(&format!("/proc/{pid}/comm")) == name).then_some(pid)
    })
}

/// CPU seconds of the kernel thread `name` so far (0 if not found).
pub fn kthread_cpu(name: &str) -> f64 {
    kthread_pid(name).and_then(|pid| stat_cpu(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)).unwrap_or(0.0)
}

/// CPU seconds of this process's threads whose names are in `names`.
pub fn own_threads_cpu(names: &[&str]) -> f64 {
    threads_cpu("self", names)
}

/// CPU seconds of process `pid`'s threads whose names are in `names`.
pub fn pid_threads_cpu(pid: u32, names: &[&str]) -> f64 {
    threads_cpu(&pid.to_string(), names)
}

fn threads_cpu(pid: &str, names: &[&str]) -> f64 {
    twinpage::threads::cpu_ns(pid, names).map_or(0.0, secs)
}

fn kb_field(text: &str, field: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(field).and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())).unwrap_or(0)
}

/// A field of `/proc/self/smaps_rollup`, in kB.
pub fn rollup_kb(field: &str) -> u64 {
    kb_field(&fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default(), field)
}

/// A field of `/proc/meminfo`, in kB.
pub fn meminfo_kb(field: &str) -> u64 {
    kb_field(&fs::read_to_string("/proc/meminfo").unwrap_or_default(), field)
}

/// Mappings of this process (lines of /proc/self/maps).
pub fn map_count() -> usize {
    fs::read_to_string("/proc/self/maps").map(|s| s.lines().count()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat() {
        let s = "42 (a b) S 2 0 0 0 -1 69238880 0 0 0 0 250 150 0 0 25 5 1 0 10 0 0";
        let c = stat_cpu(s).unwrap();
        let hz = twinpage::sys::clock_ticks_per_second() as f64;
        assert!((c - 400.0 / hz).abs() < 1e-9);
        assert!(own_threads_cpu(&["no-such-thread"]) == 0.0);
        assert!(map_count() > 0);
    }
}
