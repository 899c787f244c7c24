//! A seam for tests to act at one instant inside a merge that no outside
//! timing can hit reliably: between mapping a store stretch over a run and
//! protecting it (`merge::remap`). Unset, it costs one atomic load a remap.

use std::sync::atomic::{AtomicPtr, Ordering};

/// Called with a store stretch's `(addr, bytes)` right after it is mapped,
/// before its protection: what any thread of the program could do there.
pub type StretchMapped = fn(usize, usize);

static STRETCH_MAPPED: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// Installs (or with `None` removes) the hook for the whole process.
pub fn on_stretch_mapped(hook: Option<StretchMapped>) {
    STRETCH_MAPPED.store(hook.map_or(std::ptr::null_mut(), |f| f as *mut ()), Ordering::SeqCst);
}

pub(crate) fn stretch_mapped(addr: usize, bytes: usize) {
    let p = STRETCH_MAPPED.load(Ordering::Relaxed);
    if !p.is_null() {
        // SAFETY: only `on_stretch_mapped` stores here, and only a
        // `StretchMapped` function pointer cast to `*mut ()`.
        let f: StretchMapped = unsafe { std::mem::transmute::<*mut (), StretchMapped>(p) };
        f(addr, bytes);
    }
}
