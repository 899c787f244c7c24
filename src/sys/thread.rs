//! The calling thread's stack, which nix does not wrap.

/// This thread's stack, `[start, end)`, from glibc's record of it.
pub(crate) fn current_stack() -> Option<(usize, usize)> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: fills `attr` for the calling thread; destroyed below.
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) } != 0 {
        return None;
    }
    let (mut addr, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: `attr` was initialised by pthread_getattr_np.
    let r = unsafe { libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size) };
    // SAFETY: as above; destroyed once.
    unsafe { libc::pthread_attr_destroy(attr.as_mut_ptr()) };
    (r == 0 && size > 0).then(|| (addr as usize, addr as usize + size))
}
