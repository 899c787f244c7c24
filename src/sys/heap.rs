//! The C allocator's policy in twinpaged, which serves each agent on a
//! thread of its own. glibc gives each such thread an arena of its own and
//! keeps what it freed there; `malloc_trim` never trims a thread arena's
//! free top. Not used in the preload: QEMU's allocator is QEMU's.

/// One arena for the whole daemon: its threads serialise on the broker's
/// lock anyway, and the main arena's free top is what `malloc_trim` gives
/// back (`release_free`, when an agent leaves).
pub fn keep_heap_small() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt changes the allocator's parameters under its own lock;
    // any value of M_ARENA_MAX is valid at any time.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Gives the allocator's free memory back to the kernel (free pages inside
/// every arena, and the main heap's top): called when an agent's thread ends.
pub(crate) fn release_free() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes the allocator's own locks and has no
    // preconditions beyond a glibc malloc, which a gnu target links.
    unsafe {
        libc::malloc_trim(0);
    }
}
