//! How a publisher waits between passes: for its period, for a message of
//! its own process (a kick, a stop), or for a reader that asks every
//! publisher of the tree for counters taken after its read began.
//!
//! A reader asks by writing a higher number into `twinpage/request`
//! ([`Tree::refresh`](super::Tree::refresh)); each publisher watches the
//! file with inotify, so the request reaches every process on the tree at
//! once, and costs nothing while nobody reads. A publisher answers with a
//! pass that starts by reading the number, and writes it into its
//! `proc/<pid>/served` after its counters.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// What a publisher's thread waits on.
pub(crate) struct Wake {
    /// Written by the publisher's own process (kick, stop).
    local: EventFd,
    /// Changes of `twinpage/request`; `None` when inotify is unavailable
    /// (out of instances or watches): readers then get counters as of the
    /// last period, and say so.
    request: Option<Inotify>,
}

impl std::fmt::Debug for Wake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wake").field("watching_requests", &self.request.is_some()).finish()
    }
}

impl Wake {
    /// Watches `request_file` (which must exist).
    pub(crate) fn new(request_file: &Path) -> io::Result<Wake> {
        let local = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let request = match Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .and_then(|i| i.add_watch(request_file, AddWatchFlags::IN_MODIFY).map(|_| i))
        {
            Ok(i) => Some(i),
            Err(e) => {
                log::warn!(
                    "twinpage: cannot watch {} ({e}): readers of twinpaged --sysfs get this process's counters as of its last pass",
                    request_file.display()
                );
                None
            }
        };
        Ok(Wake { local, request })
    }

    /// Ends the current (or next) [`wait`](Self::wait) now.
    pub(crate) fn notify(&self) {
        let _ = self.local.write(1);
    }

    /// Waits until [`notify`](Self::notify), a request, or `timeout`.
    pub(crate) fn wait(&self, timeout: Duration) {
        let mut fds = vec![PollFd::new(self.local.as_fd(), PollFlags::POLLIN)];
        if let Some(i) = &self.request {
            fds.push(PollFd::new(i.as_fd(), PollFlags::POLLIN));
        }
        let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        // EINTR or an error: the pass comes a little early, which is harmless.
        let _ = poll(&mut fds, t);
        // Both are non-blocking: EAGAIN when there was nothing.
        let _ = self.local.read();
        if let Some(i) = &self.request {
            while i.read_events().is_ok_and(|e| !e.is_empty()) {}
        }
    }
}
