//! The page digest: the key of both trees, and (its low 32 bits) the
//! checksum that must stay unchanged for a scan before a page is proposed.

use xxhash_rust::xxh3::xxh3_64;

use crate::sys::PAGE_SIZE;

/// The content hash: stable-tree and unstable-tree key; its low 32 bits are
/// the checksum that must stay unchanged for a scan.
pub fn page_hash(page: &[u8]) -> u64 {
    xxh3_64(page)
}

/// Hash of an all-zero page.
pub fn zero_hash() -> u64 {
    static ZERO: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| page_hash(&[0u8; PAGE_SIZE]))
}
