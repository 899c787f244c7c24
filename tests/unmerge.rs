//! Unmerging (run=2, unregister), refusal of shared memory, scan-only regions.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn run_2_unmerges_everything_and_keeps_every_byte() {
    let Some(e) = engine() else { return };
    flat_out(&e);
    let a = Mem::anon(64);
    let f = Mem::memfd_private(64);
    for i in 0..64 {
        a.fill(i, (i % 8) as u64);
        f.fill(i, (i % 8) as u64);
    }
    e.register(a.addr, a.len).unwrap();
    e.register(f.addr, f.len).unwrap();
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| s.pages_shared + s.pages_sharing == 128);
    assert!(ok, "{s:?}");
    // Merged pages map the store: once read, a page-cache page, not anonymous.
    for i in 0..64 {
        assert!(a.page_matches(i, (i % 8) as u64));
        assert_eq!(pagemap_flags(a.addr + i * PAGE), (true, true), "page {i} does not map the store");
    }

    e.set_run(2).unwrap();
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| s.pages_shared == 0 && s.pages_sharing == 0);
    assert!(ok, "{s:?}");
    for m in [&a, &f] {
        for i in 0..64 {
            let (present, file) = pagemap_flags(m.addr + i * PAGE);
            assert!(present && !file, "page {i} still maps the store");
            assert!(m.page_matches(i, (i % 8) as u64), "page {i} changed");
        }
    }
    assert_eq!(e.store_allocated_bytes(), 0);
    // run=2 stays unmerged: nothing merges again until run=1.
    assert!(!e.wait_full_scans(1, Duration::from_millis(300)));
    assert_eq!(e.stats().pages_sharing, 0);
    e.set_run(1).unwrap();
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| s.pages_shared + s.pages_sharing == 128);
    assert!(ok, "merging resumes after run=1: {s:?}");
    a.unmap(&e);
    f.unmap(&e);
}

#[test]
fn unregister_unmerges_the_range_only() {
    let Some(e) = engine() else { return };
    flat_out(&e);
    let m = Mem::anon(32);
    for i in 0..32 {
        m.fill(i, 5);
    }
    e.register(m.addr, m.len).unwrap();
    let (ok, s) = wait_for(&e, Duration::from_secs(10), |s| s.pages_sharing == 31);
    assert!(ok, "{s:?}");
    // MADV_UNMERGEABLE on the first half.
    e.unregister(m.addr, 16 * PAGE).unwrap();
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 15), "{s:?}");
    assert_eq!(s.twinpage_pages_registered, 16);
    for i in 0..16 {
        let (present, file) = pagemap_flags(m.addr + i * PAGE);
        assert!(present && !file);
        assert!(m.page_matches(i, 5));
    }
    // The unregistered half is never merged again.
    assert!(e.wait_full_scans(2, Duration::from_secs(10)));
    assert_eq!(e.stats().pages_sharing, 15);
    m.unmap(&e);
    assert_eq!(e.stats().pages_shared, 0);
}

#[test]
fn shared_mappings_are_refused() {
    let Some(e) = engine() else { return };
    let len = 16 * PAGE;
    // SAFETY: a fresh shared anonymous mapping.
    let p =
        unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED);
    let r = e.register(p as usize, len);
    assert!(matches!(r, Err(twinpage::EngineError::Shared)), "{r:?}");
    assert_eq!(e.stats().twinpage_pages_registered, 0);
    // SAFETY: our own mapping, never registered.
    unsafe { libc::munmap(p, len) };
}

#[test]
fn private_disk_file_mappings_are_scanned_never_merged() {
    let Some(e) = engine() else { return };
    flat_out(&e);
    use std::os::fd::AsRawFd;
    let dir = std::env::temp_dir().join(format!("twinpage-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("file");
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(16 * PAGE as u64).unwrap();
    let fs = nix_fs_type(&dir);
    if !require(fs != 0x0102_1994, "temp dir is tmpfs; this test needs a disk file system") {
        return;
    }
    let len = 16 * PAGE;
    // SAFETY: a fresh private mapping of our own file.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE, file.as_raw_fd(), 0) };
    assert_ne!(p, libc::MAP_FAILED);
    let m = Mem { addr: p as usize, len };
    for i in 0..16 {
        m.fill(i, 3);
    }
    e.register(m.addr, m.len).unwrap();
    assert!(e.wait_full_scans(3, Duration::from_secs(10)));
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.twinpage_pages_unmergeable), (0, 0, 16), "{s:?}");
    m.unmap(&e);
    let _ = std::fs::remove_dir_all(&dir);
}

fn nix_fs_type(path: &std::path::Path) -> i64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid path and out-pointer.
    let r = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    assert_eq!(r, 0);
    // SAFETY: statfs succeeded.
    unsafe { st.assume_init() }.f_type
}
