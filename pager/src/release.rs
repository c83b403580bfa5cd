//! After a fatal error, once every page a fault would wait on is poisoned, the pager lets
//! go of its regions: it unregisters them from the uffd and reads the events already
//! queued. The kernel holds a thread that changes the address space (`MADV_DONTNEED`,
//! `munmap`, `mremap`, `fork`) until its event is read, and the stopped pager reads none:
//! without this the workload waited on it until the embedder dropped the pager, and an
//! embedder that joins its workload first never does. What stays is the poison: a page
//! the pager never placed raises SIGBUS, registered or not.
//!
//! Only after a complete poison: a page left unpoisoned (or every one, with
//! [`PagerBuilder::poison_on_fatal`](crate::PagerBuilder::poison_on_fatal) off) would read
//! zeros at once, not when the uffd is closed.

use std::os::fd::AsFd;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use uffd_core::{EventBuffer, ReadStatus};

use crate::shared::Shared;

/// Events read per `read(2)` while letting go.
const BATCH: usize = 64;

impl Shared {
    /// Unregisters the regions still mapped and reads what is queued (see the module
    /// docs): a pending REMOVE, UNMAP or REMAP is applied to the states, a forked child
    /// refused (its pages poisoned, its uffd closed). Faults waiting in the ranges are
    /// woken by the unregistration: they fault again on their poisoned page.
    pub(crate) fn let_go(&self) {
        for r in self.regions.current_specs() {
            if let Err(e) = self.uffd.unregister(r.base, r.len) {
                log::warn!(
                    "after the failure, region {:#x}+{:#x} stays registered: {e}",
                    r.base,
                    r.len
                );
            }
        }
        self.read_queued();
    }

    /// Reads the events queued now and applies them, with the gate closed as a handler
    /// does (a late placement of another thread never lands image bytes on a page a
    /// REMOVE read here dropped), a forked child refused. For a stopped pager, whose
    /// handlers read no more: while a REMOVE is queued the kernel refuses every placement
    /// and poison (EAGAIN) and holds the `madvise` until the event is read, so the poison
    /// of a failed pager reads them as it goes (`Shared::poison_run`), and so does the
    /// let-go. If a handler still reading holds the gate, it takes them: this waits for it,
    /// and reads what it left.
    pub(crate) fn read_queued(&self) {
        let _closed = loop {
            match self.gate.try_close() {
                Some(closed) => break closed,
                None => self.gate.wait_open(),
            }
            if !self.readable_now() {
                return;
            }
        };
        let mut events = EventBuffer::new(BATCH);
        while self.readable_now() {
            let Ok(ReadStatus::Events(_)) = self.uffd.read_events(&mut events) else {
                break;
            };
            for event in events.drain() {
                if let Some(child) = self.on_event(event) {
                    crate::fork::refuse_quietly(self, &child);
                    log::warn!("refusing a child forked as the pager failed: its missing pages are poisoned");
                }
            }
        }
    }

    /// Whether a read finds an event now. Never a read that could block: a uffd made
    /// blocking again (the POLLERR failure) reports POLLERR and is not read.
    fn readable_now(&self) -> bool {
        let mut fds = [PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
            && fds[0].revents() == Some(PollFlags::POLLIN)
    }
}
