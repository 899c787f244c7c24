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

/// Releases a write guard handing the lock straight to a thread waiting for
/// it, if any (loom: a plain release). A thread that takes the lock again at
/// once (the scanner, batch after batch) would otherwise win it back before
/// a woken waiter (the fault thread, serving a first write) runs.
pub fn unlock_fair<T>(guard: RwLockWriteGuard<'_, T>) {
    #[cfg(loom)]
    drop(guard);
    #[cfg(not(loom))]
    parking_lot::RwLockWriteGuard::unlock_fair(guard);
}

/// A reader-writer lock with parking_lot's panic-free interface.
///
/// Under `cfg(loom)` it is `loom_rwlock::RwLock` rather than loom's own
/// `RwLock`: in loom 0.7 a thread about to `try_write` is marked blocked when
/// another thread takes the lock, so loom reports deadlocks that cannot happen
/// (tokio-rs/loom#376), on exactly the `try_write` the scanner relies on.
#[derive(Debug, Default)]
pub struct RwLock<T> {
    #[cfg(loom)]
    inner: loom_rwlock::RwLock<T>,
    #[cfg(not(loom))]
    inner: parking_lot::RwLock<T>,
}

#[cfg(loom)]
pub type RwLockReadGuard<'a, T> = loom_rwlock::RwLockReadGuard<'a, T>;
#[cfg(loom)]
pub type RwLockWriteGuard<'a, T> = loom_rwlock::RwLockWriteGuard<'a, T>;
#[cfg(not(loom))]
pub type RwLockReadGuard<'a, T> = parking_lot::RwLockReadGuard<'a, T>;
#[cfg(not(loom))]
pub type RwLockWriteGuard<'a, T> = parking_lot::RwLockWriteGuard<'a, T>;

impl<T> RwLock<T> {
    pub fn new(value: T) -> Self {
        #[cfg(loom)]
        let inner = loom_rwlock::RwLock::new(value);
        #[cfg(not(loom))]
        let inner = parking_lot::RwLock::new(value);
        Self { inner }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        self.inner.read()
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.inner.write()
    }

    /// Takes the write lock only if nobody holds the lock now. The scanner uses
    /// it for a second region so that two region locks never wait on each other.
    pub fn try_write(&self) -> Option<RwLockWriteGuard<'_, T>> {
        self.inner.try_write()
    }

    /// Takes the write lock if it comes free within `wait` (loom: only if it
    /// is free now). The fault thread uses it: a writer it serves waits at
    /// most that long for a batch to end.
    pub fn try_write_for(&self, wait: std::time::Duration) -> Option<RwLockWriteGuard<'_, T>> {
        #[cfg(loom)]
        {
            let _ = wait;
            self.inner.try_write()
        }
        #[cfg(not(loom))]
        self.inner.try_write_for(wait)
    }
}

/// A reader-writer lock built from loom's `Mutex` and `Condvar`, whose blocking
/// and non-blocking paths loom models faithfully; the data sits in loom's
/// `UnsafeCell`, so loom also checks that the lock orders every access.
#[cfg(loom)]
pub mod loom_rwlock {
    use loom::cell::{ConstPtr, MutPtr, UnsafeCell};
    use loom::sync::{Condvar, Mutex, MutexGuard};

    #[derive(Debug, Default)]
    struct Holders {
        readers: usize,
        writer: bool,
    }

    pub struct RwLock<T> {
        holders: Mutex<Holders>,
        released: Condvar,
        data: UnsafeCell<T>,
    }

    // SAFETY: as std's RwLock: the lock hands out `&T` to many threads at once
    // (needs `Sync`) and `&mut T` to one at a time (needs `Send`).
    unsafe impl<T: Send> Send for RwLock<T> {}
    // SAFETY: as above.
    unsafe impl<T: Send + Sync> Sync for RwLock<T> {}

    impl<T> std::fmt::Debug for RwLock<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("RwLock { .. }")
        }
    }

    impl<T: Default> Default for RwLock<T> {
        fn default() -> Self {
            Self::new(T::default())
        }
    }

    impl<T> RwLock<T> {
        pub fn new(value: T) -> Self {
            Self { holders: Mutex::new(Holders::default()), released: Condvar::new(), data: UnsafeCell::new(value) }
        }

        fn holders(&self) -> MutexGuard<'_, Holders> {
            self.holders.lock().unwrap_or_else(|e| e.into_inner())
        }

        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            let mut h = self.holders();
            while h.writer {
                h = self.released.wait(h).unwrap_or_else(|e| e.into_inner());
            }
            h.readers += 1;
            drop(h);
            RwLockReadGuard { lock: self, ptr: Some(self.data.get()) }
        }

        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            let mut h = self.holders();
            while h.writer || h.readers > 0 {
                h = self.released.wait(h).unwrap_or_else(|e| e.into_inner());
            }
            h.writer = true;
            drop(h);
            RwLockWriteGuard { lock: self, ptr: Some(self.data.get_mut()) }
        }

        pub fn try_write(&self) -> Option<RwLockWriteGuard<'_, T>> {
            let mut h = self.holders();
            if h.writer || h.readers > 0 {
                return None;
            }
            h.writer = true;
            drop(h);
            Some(RwLockWriteGuard { lock: self, ptr: Some(self.data.get_mut()) })
        }
    }

    pub struct RwLockReadGuard<'a, T> {
        lock: &'a RwLock<T>,
        ptr: Option<ConstPtr<T>>,
    }

    pub struct RwLockWriteGuard<'a, T> {
        lock: &'a RwLock<T>,
        ptr: Option<MutPtr<T>>,
    }

    impl<T> std::ops::Deref for RwLockReadGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // SAFETY: a read guard exists only while `readers` counts it, when no
            // writer holds the lock; the pointer lives as long as the guard.
            unsafe { self.ptr.as_ref().expect("live guard").deref() }
        }
    }

    impl<T> std::ops::Deref for RwLockWriteGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // SAFETY: the write guard is the lock's only holder.
            unsafe { self.ptr.as_ref().expect("live guard").deref() }
        }
    }

    impl<T> std::ops::DerefMut for RwLockWriteGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: the write guard is the lock's only holder, and `&mut self`
            // makes this the only reference through it.
            unsafe { self.ptr.as_ref().expect("live guard").deref() }
        }
    }

    impl<T> Drop for RwLockReadGuard<'_, T> {
        fn drop(&mut self) {
            // End the tracked access before the lock lets anyone else in.
            self.ptr = None;
            let mut h = self.lock.holders();
            h.readers -= 1;
            if h.readers == 0 {
                self.lock.released.notify_all();
            }
        }
    }

    impl<T> Drop for RwLockWriteGuard<'_, T> {
        fn drop(&mut self) {
            self.ptr = None;
            let mut h = self.lock.holders();
            h.writer = false;
            self.lock.released.notify_all();
        }
    }
}
