//! userfaultfd, written by hand from `include/uapi/linux/userfaultfd.h`.
//!
//! twinpage uses write-protect mode: a page is protected while it is
//! compared with a store page and remapped, so any writer (a vCPU thread, KVM,
//! a syscall copying into it) blocks in the kernel until it is woken. Where the
//! kernel has `UFFDIO_MOVE` (6.8+), a merge of anonymous memory also moves the
//! old page out first: the kernel refuses to move a page pinned for DMA
//! (`O_DIRECT`, io_uring), which is twinpage's pin check; while the page is
//! out, the run is registered in missing mode too, so an access to the hole
//! blocks instead of faulting in a zero page.

use std::fs::OpenOptions;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{cvt, last_err};

const UFFDIO: u64 = 0xAA;
/// The API version this module speaks.
pub const UFFD_API: u64 = 0xAA;

const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `struct uffdio_move`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioMove {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Bytes moved, or a negative errno.
    pub moved: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    /// Bytes mapped, or a negative errno.
    pub zeropage: i64,
}

/// `struct uffd_msg`, with the pagefault member of its union spelled out (the
/// only event twinpage asks for).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    /// `arg.pagefault.flags`
    pub pf_flags: u64,
    /// `arg.pagefault.address`
    pub pf_address: u64,
    /// `arg.pagefault.feat.ptid` and padding of the union.
    pub pf_feat: u64,
}

impl UffdMsg {
    /// The thread that faulted (`UFFD_FEATURE_THREAD_ID`), if the kernel
    /// said: the `ptid` word, the first four bytes of `pf_feat`.
    pub fn thread(&self) -> Option<i32> {
        let b = self.pf_feat.to_ne_bytes();
        Some(i32::from_ne_bytes([b[0], b[1], b[2], b[3]])).filter(|&t| t > 0)
    }
}

const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRange>() == 16);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(size_of::<UffdMsg>() == 32);
const _: () = assert!(size_of::<UffdioMove>() == 40);
const _: () = assert!(size_of::<UffdioZeropage>() == 32);

pub const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, size_of::<UffdioApi>());
pub const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<UffdioRegister>());
pub const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, size_of::<UffdioRange>());
pub const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
pub const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<UffdioWriteprotect>());
pub const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<UffdioZeropage>());
pub const UFFDIO_MOVE: u64 = ioc(IOC_READ | IOC_WRITE, 0x05, size_of::<UffdioMove>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
pub const USERFAULTFD_IOC_NEW: u64 = ioc(IOC_NONE, 0x00, 0);

// Values from the uapi header, checked against it by hand; the ioctl numbers
// below are the ones strace prints on x86_64.
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
const _: () = assert!(UFFDIO_MOVE == 0xc028_aa05);

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;
/// Fault messages carry the faulting thread's id (`arg.pagefault.feat.ptid`).
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// Errors from the userfaultfd module.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd (need root or access to /dev/userfaultfd)")]
    Open(#[source] io::Error),
    #[error("UFFDIO_API handshake failed")]
    Api(#[source] io::Error),
    #[error("kernel lacks userfaultfd write-protect (UFFD_FEATURE_PAGEFAULT_FLAG_WP)")]
    NoWriteProtect,
}

/// An open, handshaken userfaultfd.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    features: u64,
}

impl Userfaultfd {
    /// Opens a non-blocking userfaultfd through `/dev/userfaultfd`, falling back
    /// to the `userfaultfd(2)` syscall, and performs the API handshake requiring
    /// write-protect faults. Write-protect of shmem (memfd, tmpfs) is asked for
    /// and reported by [`Userfaultfd::wp_shmem`].
    pub fn open() -> Result<Self, UffdError> {
        let fd = open_dev().or_else(|dev_err| open_syscall().map_err(|_| dev_err));
        let mut fd = fd.map_err(UffdError::Open)?;
        // An older kernel refuses features it does not know: step down, each
        // time on a fresh fd (a failed handshake leaves the fd unusable).
        let tries = [
            UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_MOVE | UFFD_FEATURE_THREAD_ID,
            UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_THREAD_ID,
            UFFD_FEATURE_PAGEFAULT_FLAG_WP,
        ];
        for (i, wanted) in tries.iter().enumerate() {
            if i > 0 {
                fd = open_dev().or_else(|_| open_syscall()).map_err(UffdError::Open)?;
            }
            let mut api = UffdioApi { api: UFFD_API, features: *wanted, ioctls: 0 };
            // SAFETY: `fd` is a userfaultfd and `api` is a valid uffdio_api the
            // kernel reads and writes for the duration of the call.
            let ret = unsafe { raw_ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut _ as usize) };
            match cvt(ret) {
                Ok(_) => return Self::checked(fd, api),
                Err(e) if i + 1 == tries.len() => return Err(UffdError::Api(e)),
                Err(_) => {}
            }
        }
        unreachable!("the last handshake returns")
    }

    fn checked(fd: OwnedFd, api: UffdioApi) -> Result<Self, UffdError> {
        if api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(UffdError::NoWriteProtect);
        }
        Ok(Self { fd, features: api.features })
    }

    /// Whether write-protect works on shmem-backed mappings (memfd, tmpfs).
    pub fn wp_shmem(&self) -> bool {
        self.features & UFFD_FEATURE_WP_HUGETLBFS_SHMEM != 0
    }

    /// Whether `UFFDIO_MOVE` is there (Linux 6.8+): the pin check.
    pub fn can_move(&self) -> bool {
        self.features & UFFD_FEATURE_MOVE != 0
    }

    /// Registers `[start, start+len)` in write-protect mode (only: a range
    /// registered in missing mode too goes back to write-protect only).
    pub fn register_wp(&self, start: usize, len: usize) -> io::Result<()> {
        self.register(start, len, UFFDIO_REGISTER_MODE_WP)
    }

    /// Registers `[start, start+len)` of anonymous memory in write-protect
    /// and missing mode: a fault on a hole there blocks until woken, where it
    /// would otherwise fault in a fresh zero page.
    pub fn register_wp_missing(&self, start: usize, len: usize) -> io::Result<()> {
        self.register(start, len, UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MISSING)
    }

    fn register(&self, start: usize, len: usize, mode: u64) -> io::Result<()> {
        let mut reg = UffdioRegister { range: UffdioRange { start: start as u64, len: len as u64 }, mode, ioctls: 0 };
        // SAFETY: `reg` is a valid uffdio_register for the call; registration
        // changes VMA flags only and touches no memory of ours.
        let ret = unsafe { raw_ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg as *mut _ as usize) };
        cvt(ret).map(drop)
    }

    /// Unregisters `[start, start+len)`; pending waiters there are woken.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let mut range = UffdioRange { start: start as u64, len: len as u64 };
        // SAFETY: `range` is a valid uffdio_range for the call.
        let ret = unsafe { raw_ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range as *mut _ as usize) };
        cvt(ret).map(drop)
    }

    /// Write-protects `[start, start+len)`; returns once every TLB is flushed,
    /// so no CPU can still write there.
    pub fn protect(&self, start: usize, len: usize) -> io::Result<()> {
        self.writeprotect(start, len, UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Removes write protection from `[start, start+len)` and wakes its waiters.
    pub fn unprotect(&self, start: usize, len: usize) -> io::Result<()> {
        self.writeprotect(start, len, 0)
    }

    /// Removes write protection from `[start, start+len)` without waking its
    /// waiters: they stay blocked until a later wake.
    pub fn unprotect_quietly(&self, start: usize, len: usize) -> io::Result<()> {
        self.writeprotect(start, len, UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
    }

    fn writeprotect(&self, start: usize, len: usize, mode: u64) -> io::Result<()> {
        let mut wp = UffdioWriteprotect { range: UffdioRange { start: start as u64, len: len as u64 }, mode };
        loop {
            // SAFETY: `wp` is a valid uffdio_writeprotect for the call.
            let ret = unsafe { raw_ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp as *mut _ as usize) };
            match cvt(ret) {
                Ok(_) => return Ok(()),
                // EAGAIN: the mm changed under us (mmap_changing); try again.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Wakes threads blocked on faults in `[start, start+len)`; they retry.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut range = UffdioRange { start: start as u64, len: len as u64 };
        // SAFETY: `range` is a valid uffdio_range for the call.
        let ret = unsafe { raw_ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range as *mut _ as usize) };
        cvt(ret).map(drop)
    }

    /// Moves the anonymous pages of `[src, src+len)` to the hole
    /// `[dst, dst+len)` (registered with this userfaultfd), without waking.
    /// `Ok(len)` when all moved; otherwise `Err((moved, error))`, where the
    /// page at `src + moved` is the one that did not: `EBUSY` when it is
    /// pinned (`O_DIRECT`, io_uring) or not exclusive to this process.
    ///
    /// # Safety
    /// Both ranges must belong to the caller, who must expect `src` to
    /// become a hole: whatever faults there meanwhile must be kept out
    /// (missing-mode registration) or be harmless.
    pub unsafe fn move_pages(&self, dst: usize, src: usize, len: usize) -> Result<usize, (usize, io::Error)> {
        let mut done = 0;
        while done < len {
            let mut mv = UffdioMove {
                dst: (dst + done) as u64,
                src: (src + done) as u64,
                len: (len - done) as u64,
                mode: UFFDIO_MOVE_MODE_DONTWAKE,
                moved: 0,
            };
            // SAFETY: `mv` is a valid uffdio_move for the call; the caller owns
            // both ranges.
            let ret = unsafe { raw_ioctl(self.fd.as_raw_fd(), UFFDIO_MOVE, &mut mv as *mut _ as usize) };
            if mv.moved > 0 {
                done += mv.moved as usize;
            }
            if ret == 0 {
                continue;
            }
            let e = last_err();
            // EAGAIN: the mm changed meanwhile (or a short move); go on from
            // where it stopped.
            if e.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            return Err((done, e));
        }
        Ok(done)
    }

    /// Maps the zero page at the hole `[start, start+len)` of anonymous
    /// memory and wakes its waiters; `EEXIST` when something is mapped there.
    pub fn zeropage(&self, start: usize, len: usize) -> io::Result<()> {
        let mut zp = UffdioZeropage { range: UffdioRange { start: start as u64, len: len as u64 }, mode: 0, zeropage: 0 };
        // SAFETY: `zp` is a valid uffdio_zeropage for the call; it fills only
        // a hole, so no content changes.
        let ret = unsafe { raw_ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut zp as *mut _ as usize) };
        cvt(ret).map(drop)
    }

    /// Reads pending fault messages without blocking; returns how many were read.
    pub fn read_events(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is valid for `bytes` bytes of writes, and UffdMsg is
        // plain old data for which any bit pattern is valid.
        let ret = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        if ret < 0 {
            let e = last_err();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(ret as usize / size_of::<UffdMsg>())
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn open_dev() -> io::Result<OwnedFd> {
    let dev = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/userfaultfd")?;
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: `dev` is an open /dev/userfaultfd; USERFAULTFD_IOC_NEW takes its
    // flags by value and returns a new fd or -1.
    let ret = unsafe { raw_ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags as usize) };
    let raw = cvt(ret)?;
    // SAFETY: the kernel just returned `raw` as a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn open_syscall() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes flags by value and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
    let raw = cvt(ret as libc::c_int)?;
    // SAFETY: the kernel just returned `raw` as a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Polls `fd` for readability for at most `timeout_ms`; true when readable.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if ret < 0 {
        let e = last_err();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(ret > 0 && pfd.revents & libc::POLLIN != 0)
}

/// `ioctl(2)` as a raw system call: inside the preloaded library, libc's
/// `ioctl` symbol is twinpage's own interposer.
///
/// # Safety
/// `arg` must be what request `req` expects (a valid pointer to the right
/// struct for the duration of the call, or a plain value).
unsafe fn raw_ioctl(fd: libc::c_int, req: u64, arg: usize) -> libc::c_int {
    // SAFETY: the caller guarantees `arg` matches `req`.
    unsafe { libc::syscall(libc::SYS_ioctl, fd as libc::c_long, req, arg) as libc::c_int }
}
