//! The page digest and content tests: the digest is the key of both trees,
//! and (its low 32 bits) the checksum that must stay unchanged for a scan
//! before a page is proposed; [`is_zero`] tells a zero page from its bytes.

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

/// True when every byte of the page is zero.
pub fn is_zero(page: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of the slice.
        unsafe { page.align_to::<u64>() }
    };
    // OR-reducing 64-byte chunks vectorises; an early exit per word does not.
    pre.iter().all(|&b| b == 0) && post.iter().all(|&b| b == 0) && words.chunks(8).all(|c| c.iter().fold(0u64, |a, &w| a | w) == 0)
}
