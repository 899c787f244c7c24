//! The synchronisation primitives the merge and registry protocols use, behind
//! one shim so that `cfg(loom)` swaps in loom's model-checked versions
//! (`RUSTFLAGS="--cfg loom" cargo test --test loom --release`).

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(loom)]
pub use loom::sync::Arc;

#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(not(loom))]
pub use std::sync::Arc;

/// A mutex with parking_lot's panic-free interface.
#[derive(Debug, Default)]
pub struct Mutex<T> {
    #[cfg(loom)]
    inner: loom::sync::Mutex<T>,
    #[cfg(not(loom))]
    inner: parking_lot::Mutex<T>,
}

#[cfg(loom)]
pub type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;
#[cfg(not(loom))]
pub type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub fn new(value: T) -> Self {
        #[cfg(loom)]
        let inner = loom::sync::Mutex::new(value);
        #[cfg(not(loom))]
        let inner = parking_lot::Mutex::new(value);
        Self { inner }
    }

    pub fn lock(&self) -> MutexGuard<'_, T> {
        #[cfg(loom)]
        return self.inner.lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(not(loom))]
        return self.inner.lock();
    }
}

/// A reader-writer lock with parking_lot's panic-free interface.
#[derive(Debug, Default)]
pub struct RwLock<T> {
    #[cfg(loom)]
    inner: loom::sync::RwLock<T>,
    #[cfg(not(loom))]
    inner: parking_lot::RwLock<T>,
}

#[cfg(loom)]
pub type RwLockReadGuard<'a, T> = loom::sync::RwLockReadGuard<'a, T>;
#[cfg(loom)]
pub type RwLockWriteGuard<'a, T> = loom::sync::RwLockWriteGuard<'a, T>;
#[cfg(not(loom))]
pub type RwLockReadGuard<'a, T> = parking_lot::RwLockReadGuard<'a, T>;
#[cfg(not(loom))]
pub type RwLockWriteGuard<'a, T> = parking_lot::RwLockWriteGuard<'a, T>;

impl<T> RwLock<T> {
    pub fn new(value: T) -> Self {
        #[cfg(loom)]
        let inner = loom::sync::RwLock::new(value);
        #[cfg(not(loom))]
        let inner = parking_lot::RwLock::new(value);
        Self { inner }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        #[cfg(loom)]
        return self.inner.read().unwrap_or_else(|e| e.into_inner());
        #[cfg(not(loom))]
        return self.inner.read();
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        #[cfg(loom)]
        return self.inner.write().unwrap_or_else(|e| e.into_inner());
        #[cfg(not(loom))]
        return self.inner.write();
    }

    /// Takes the write lock only if nobody holds the lock now. The scanner uses
    /// it for a second region so that two region locks never wait on each other.
    pub fn try_write(&self) -> Option<RwLockWriteGuard<'_, T>> {
        #[cfg(loom)]
        return self.inner.try_write().ok();
        #[cfg(not(loom))]
        return self.inner.try_write();
    }
}
