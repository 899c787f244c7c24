//! State the publishers of one tree share, kept in files under
//! `twinpage/` and only read or written under the tree's lock.
//!
//! - `twinpage/tunables`: one line per writable attribute,
//!   `name seq mtime_ns value`: the value every publisher applies to its
//!   engine, the sequence number of the change that set it (publishers apply
//!   changes they have not seen yet in that order), and the modification
//!   time the attribute file had when a publisher last wrote it (a different
//!   time, or different content, means a user wrote the file).
//! - `twinpage/state`: `full_scans N` (the global round count),
//!   `mark PID STARTTIME N` (rounds counted for each live process),
//!   `retired NAME N` (cumulative counters of processes that exited) and
//!   `errors N` (refused writes so far).

use std::collections::BTreeMap;

/// One writable attribute's shared value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SharedTunable {
    pub seq: u64,
    pub mtime: i128,
    pub value: String,
}

/// The `twinpage/tunables` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SharedTunables {
    pub map: BTreeMap<String, SharedTunable>,
}

impl SharedTunables {
    pub(crate) fn parse(text: &str) -> Self {
        let mut map = BTreeMap::new();
        for line in text.lines() {
            let mut it = line.splitn(4, ' ');
            let (Some(name), Some(seq), Some(mtime), Some(value)) = (it.next(), it.next(), it.next(), it.next()) else {
                continue;
            };
            let (Ok(seq), Ok(mtime)) = (seq.parse(), mtime.parse()) else {
                continue;
            };
            map.insert(name.to_string(), SharedTunable { seq, mtime, value: value.to_string() });
        }
        Self { map }
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        for (name, t) in &self.map {
            out.push_str(&format!("{name} {} {} {}\n", t.seq, t.mtime, t.value));
        }
        out
    }

    pub(crate) fn get(&self, name: &str) -> Option<&SharedTunable> {
        self.map.get(name)
    }

    pub(crate) fn value(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(|t| t.value.as_str())
    }

    fn next_seq(&self) -> u64 {
        self.map.values().map(|t| t.seq).max().unwrap_or(0) + 1
    }

    /// Records a change of `name` to `value`; returns its sequence number.
    pub(crate) fn change(&mut self, name: &str, value: String) -> u64 {
        let seq = self.next_seq();
        let mtime = self.map.get(name).map_or(0, |t| t.mtime);
        self.map.insert(name.to_string(), SharedTunable { seq, mtime, value });
        seq
    }

    pub(crate) fn set_mtime(&mut self, name: &str, mtime: i128) {
        if let Some(t) = self.map.get_mut(name) {
            t.mtime = mtime;
        }
    }
}

/// Rounds counted for one live process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    pub starttime: u64,
    pub rounds: u64,
}

/// The `twinpage/state` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct State {
    pub full_scans: u64,
    pub marks: BTreeMap<u32, Mark>,
    pub retired: BTreeMap<String, i128>,
    pub errors: u64,
}

impl State {
    pub(crate) fn parse(text: &str) -> Self {
        let mut s = Self::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            match f.as_slice() {
                ["full_scans", n] => s.full_scans = n.parse().unwrap_or(0),
                ["errors", n] => s.errors = n.parse().unwrap_or(0),
                ["mark", pid, start, n] => {
                    if let (Ok(pid), Ok(starttime), Ok(rounds)) = (pid.parse(), start.parse(), n.parse()) {
                        s.marks.insert(pid, Mark { starttime, rounds });
                    }
                }
                ["retired", name, n] => {
                    if let Ok(v) = n.parse() {
                        s.retired.insert(name.to_string(), v);
                    }
                }
                _ => {}
            }
        }
        s
    }

    pub(crate) fn render(&self) -> String {
        let mut out = format!("full_scans {}\nerrors {}\n", self.full_scans, self.errors);
        for (pid, m) in &self.marks {
            out.push_str(&format!("mark {pid} {} {}\n", m.starttime, m.rounds));
        }
        for (name, v) in &self.retired {
            out.push_str(&format!("retired {name} {v}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut t = SharedTunables::default();
        assert_eq!(t.change("advisor_mode", "[none] scan-time".into()), 1);
        assert_eq!(t.change("run", "1".into()), 2);
        t.set_mtime("run", 1_700_000_000_123_456_789);
        assert_eq!(SharedTunables::parse(&t.render()), t);
        assert_eq!(t.value("advisor_mode"), Some("[none] scan-time"));
        let mut s = State { full_scans: 3, errors: 2, ..State::default() };
        s.marks.insert(42, Mark { starttime: 99, rounds: 3 });
        s.retired.insert("pages_scanned".into(), 1000);
        assert_eq!(State::parse(&s.render()), s);
    }
}
