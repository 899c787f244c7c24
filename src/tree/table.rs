//! An open-addressing hash table sized to what it holds: linear probing over
//! a bucket count that need not be a power of two (the home bucket is the
//! hash scaled onto the count), one tag byte a bucket in an array of its own
//! (a probe reads tags, and a slot only when its tag matches), and deletion
//! by shifting back (no tombstones). A SwissTable rounds its buckets up to a
//! power of two, which just past a boundary doubles the bytes per entry; this
//! one holds between 75% and 87.5% of its buckets full, always. Probes read
//! sixteen tags at a time (the first sixteen are mirrored past the end, so
//! a group never wraps).
//!
//! The caller gives the hash of every value it inserts and, for moves
//! (growth, deletion), a way to recompute it from a stored value.

/// Tag of an empty bucket; a full bucket's tag has its top bit set.
const EMPTY: u8 = 0;

fn tag(hash: u64) -> u8 {
    (hash >> 57) as u8 | 0x80
}

/// The home bucket of `hash` among `n`: its low 32 bits scaled onto `n` (the
/// tag comes from the top bits, so the two stay independent).
fn home(hash: u64, n: usize) -> usize {
    (((hash & 0xffff_ffff) * n as u64) >> 32) as usize
}

/// Tags read per probe step.
const GROUP: usize = 16;
const LOW7: u128 = 0x7f7f_7f7f_7f7f_7f7f_7f7f_7f7f_7f7f_7f7f;
const HIGH: u128 = 0x8080_8080_8080_8080_8080_8080_8080_8080;

/// The top bit of every byte of `g` equal to `t` (exact: no carry crosses
/// a byte).
fn matching(g: u128, t: u8) -> u128 {
    let x = g ^ (u128::from(t) * 0x0101_0101_0101_0101_0101_0101_0101_0101);
    !(((x & LOW7) + LOW7) | x) & HIGH
}

/// The top bit of every empty byte of `g` (full tags have theirs set).
fn empty(g: u128) -> u128 {
    !g & HIGH
}

/// Most buckets full before the table grows.
const MAX_LOAD: (usize, usize) = (7, 8);
/// Buckets full right after it grows, shrinks or is rebuilt.
const FRESH_LOAD: (usize, usize) = (3, 4);

fn buckets_for(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * FRESH_LOAD.1).div_ceil(FRESH_LOAD.0).max(GROUP)
    }
}

#[derive(Debug, Clone)]
pub struct SlimTable<T> {
    tags: Vec<u8>,
    slots: Vec<T>,
    len: usize,
}

impl<T> Default for SlimTable<T> {
    fn default() -> Self {
        Self { tags: Vec::new(), slots: Vec::new(), len: 0 }
    }
}

impl<T: Copy + Default> SlimTable<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes: a tag and a slot per bucket.
    pub fn heap_bytes(&self) -> u64 {
        (self.tags.capacity() + self.slots.capacity() * std::mem::size_of::<T>()) as u64
    }

    fn buckets(&self) -> usize {
        self.tags.len().saturating_sub(GROUP)
    }

    fn group(&self, at: usize) -> u128 {
        let mut g = [0u8; GROUP];
        g.copy_from_slice(&self.tags[at..at + GROUP]);
        u128::from_le_bytes(g)
    }

    fn set_tag(&mut self, i: usize, t: u8) {
        self.tags[i] = t;
        if i < GROUP {
            let n = self.buckets();
            self.tags[n + i] = t;
        }
    }

    fn find_pos(&self, hash: u64, mut eq: impl FnMut(&T) -> bool) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let n = self.buckets();
        let t = tag(hash);
        let mut at = home(hash, n);
        loop {
            let g = self.group(at);
            let stop = empty(g);
            // Only tags before the first empty bucket can be this value's.
            let mut m = matching(g, t) & stop.wrapping_sub(1) & !stop;
            while m != 0 {
                let mut i = at + m.trailing_zeros() as usize / 8;
                if i >= n {
                    i -= n;
                }
                if eq(&self.slots[i]) {
                    return Some(i);
                }
                m &= m - 1;
            }
            if stop != 0 {
                return None;
            }
            at += GROUP;
            if at >= n {
                at -= n;
            }
        }
    }

    pub fn find(&self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<&T> {
        self.find_pos(hash, eq).map(|i| &self.slots[i])
    }

    pub fn find_mut(&mut self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<&mut T> {
        self.find_pos(hash, eq).map(|i| &mut self.slots[i])
    }

    /// Inserts a value no other value equals (the caller looked first).
    pub fn insert_unique(&mut self, hash: u64, value: T, hasher: impl Fn(&T) -> u64) {
        if (self.len + 1) * MAX_LOAD.1 > self.buckets() * MAX_LOAD.0 {
            self.rebuild(buckets_for(self.len + 1), &hasher);
        }
        self.place(hash, value);
        self.len += 1;
    }

    fn place(&mut self, hash: u64, value: T) {
        let n = self.buckets();
        let mut at = home(hash, n);
        let i = loop {
            let stop = empty(self.group(at));
            if stop != 0 {
                let i = at + stop.trailing_zeros() as usize / 8;
                break if i >= n { i - n } else { i };
            }
            at += GROUP;
            if at >= n {
                at -= n;
            }
        };
        self.set_tag(i, tag(hash));
        self.slots[i] = value;
    }

    /// Removes the value `eq` picks; true when there was one.
    pub fn remove(&mut self, hash: u64, eq: impl FnMut(&T) -> bool, hasher: impl Fn(&T) -> u64) -> bool {
        let Some(mut hole) = self.find_pos(hash, eq) else { return false };
        let n = self.buckets();
        let mut j = hole;
        loop {
            j += 1;
            if j == n {
                j = 0;
            }
            if self.tags[j] == EMPTY {
                break;
            }
            // The value at j may fill the hole when its home is not between
            // the hole and j (cyclically): it would still be found from there.
            let h = home(hasher(&self.slots[j]), n);
            if (j + n - h) % n >= (j + n - hole) % n {
                self.set_tag(hole, self.tags[j]);
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.set_tag(hole, EMPTY);
        self.len -= 1;
        // Give back room once most of it is unused (a wave of unmerges).
        if self.len * 4 < n && n > 64 {
            self.rebuild(buckets_for(self.len), &hasher);
        }
        true
    }

    /// Empties the table, keeping room for `keep` values.
    pub fn clear_keeping(&mut self, keep: usize) {
        self.len = 0;
        let n = buckets_for(keep);
        if n == self.buckets() {
            self.tags.fill(EMPTY);
        } else {
            self.alloc(n);
        }
    }

    fn alloc(&mut self, n: usize) {
        self.tags = if n == 0 { Vec::new() } else { vec![EMPTY; n + GROUP] };
        self.slots = vec![T::default(); n];
    }

    fn rebuild(&mut self, n: usize, hasher: &impl Fn(&T) -> u64) {
        let old = self.buckets();
        let tags = std::mem::take(&mut self.tags);
        let slots = std::mem::take(&mut self.slots);
        self.alloc(n);
        for (&t, v) in tags[..old].iter().zip(slots) {
            if t != EMPTY {
                self.place(hasher(&v), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix(x: u32) -> u64 {
        u64::from(x).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    #[test]
    fn agrees_with_a_std_set_through_inserts_and_removes() {
        let mut t = SlimTable::<u32>::default();
        let mut model = std::collections::HashSet::new();
        let mut x = 1u32;
        for step in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = x % 5000;
            if step % 3 == 0 {
                assert_eq!(t.remove(mix(v), |&s| s == v, |&s| mix(s)), model.remove(&v));
            } else if t.find(mix(v), |&s| s == v).is_none() {
                t.insert_unique(mix(v), v, |&s| mix(s));
                assert!(model.insert(v));
            }
            assert_eq!(t.len(), model.len());
        }
        for v in 0..5000 {
            assert_eq!(t.find(mix(v), |&s| s == v).is_some(), model.contains(&v), "{v}");
        }
        // Removals gave room back.
        assert!(t.buckets() <= (t.len() * 4).max(64), "{} buckets for {}", t.buckets(), t.len());
    }

    #[test]
    fn stays_between_75_and_87_percent_full_while_growing() {
        let mut t = SlimTable::<u32>::default();
        for v in 0..100_000u32 {
            t.insert_unique(mix(v), v, |&s| mix(s));
            if v > 100 {
                let load = t.len() as f64 / t.buckets() as f64;
                assert!((0.74..=0.875).contains(&load), "load {load} at {v}");
            }
        }
        assert_eq!(t.heap_bytes(), t.buckets() as u64 * 5 + GROUP as u64);
        t.clear_keeping(10);
        assert!(t.is_empty() && t.buckets() == 16);
        assert!(t.find(mix(5), |&s| s == 5).is_none());
    }

    #[test]
    fn long_clusters_wrap_around_the_end_and_survive_removals() {
        // One home bucket for all, three quarters in (so the cluster wraps),
        // and five tags: probes cross many groups and meet many false tag
        // matches.
        let h = |v: u32| 0xc000_0000 | u64::from(v % 5) << 58;
        let mut t = SlimTable::<u32>::default();
        for v in 0..3000u32 {
            t.insert_unique(h(v), v, |&s| h(s));
        }
        for v in (0..3000u32).filter(|v| v % 3 == 0) {
            assert!(t.remove(h(v), |&s| s == v, |&s| h(s)));
        }
        for v in 0..3000u32 {
            assert_eq!(t.find(h(v), |&s| s == v).is_some(), v % 3 != 0, "{v}");
        }
        assert_eq!(t.len(), 2000);
        // The mirror of the first group agrees with the table.
        let n = t.buckets();
        assert_eq!(t.tags[..GROUP], t.tags[n..n + GROUP]);
    }
}
