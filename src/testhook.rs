//! Seams for tests to act at an instant no outside timing can hit reliably:
//! inside a merge, between mapping a store stretch over a run and protecting
//! it (`merge::remap`); in the scanner, between reading a `run` other than 1
//! and its nap; in the fault thread, between giving a first write its copy
//! and waking the writer. Unset, each costs one atomic load where it sits.

use std::sync::atomic::{AtomicPtr, Ordering};

/// Called with a store stretch's `(addr, bytes)` right after it is mapped,
/// before its protection: what any thread of the program could do there.
pub type StretchMapped = fn(usize, usize);

/// Called on the scanner thread after it read `run` (not 1) and did what
/// that asks, right before it naps: where a write of `run=1` from another
/// thread may land.
pub type ScannerNaps = fn();

/// Called on the fault thread with a merged page's address once its first
/// write has its copy, before the writer is woken: for as long as it runs,
/// the writer has not run again.
pub type FirstWriteCopied = fn(usize);

static STRETCH_MAPPED: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());
static FIRST_WRITE_COPIED: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());
static SCANNER_NAPS: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// Installs (or with `None` removes) the hook for the whole process.
pub fn on_stretch_mapped(hook: Option<StretchMapped>) {
    STRETCH_MAPPED.store(hook.map_or(std::ptr::null_mut(), |f| f as *mut ()), Ordering::SeqCst);
}

/// Installs (or with `None` removes) the hook for the whole process.
pub fn on_scanner_naps(hook: Option<ScannerNaps>) {
    SCANNER_NAPS.store(hook.map_or(std::ptr::null_mut(), |f| f as *mut ()), Ordering::SeqCst);
}

/// Installs (or with `None` removes) the hook for the whole process.
pub fn on_first_write_copied(hook: Option<FirstWriteCopied>) {
    FIRST_WRITE_COPIED.store(hook.map_or(std::ptr::null_mut(), |f| f as *mut ()), Ordering::SeqCst);
}

fn installed(slot: &AtomicPtr<()>) -> Option<*mut ()> {
    Some(slot.load(Ordering::Relaxed)).filter(|p| !p.is_null())
}

pub(crate) fn stretch_mapped(addr: usize, bytes: usize) {
    if let Some(p) = installed(&STRETCH_MAPPED) {
        // SAFETY: only `on_stretch_mapped` stores here, and only a
        // `StretchMapped` function pointer cast to `*mut ()`.
        let f: StretchMapped = unsafe { std::mem::transmute::<*mut (), StretchMapped>(p) };
        f(addr, bytes);
    }
}

pub(crate) fn scanner_naps() {
    if let Some(p) = installed(&SCANNER_NAPS) {
        // SAFETY: only `on_scanner_naps` stores here, and only a
        // `ScannerNaps` function pointer cast to `*mut ()`.
        let f: ScannerNaps = unsafe { std::mem::transmute::<*mut (), ScannerNaps>(p) };
        f();
    }
}

pub(crate) fn first_write_copied(page: usize) {
    if let Some(p) = installed(&FIRST_WRITE_COPIED) {
        // SAFETY: only `on_first_write_copied` stores here, and only a
        // `FirstWriteCopied` function pointer cast to `*mut ()`.
        let f: FirstWriteCopied = unsafe { std::mem::transmute::<*mut (), FirstWriteCopied>(p) };
        f(page);
    }
}
