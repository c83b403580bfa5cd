//! Forked children: each gets a child engine serving its copy of the regions.
//!
//! A FORK event is the one event whose *reading* a process waits for while it holds locks
//! of its own: glibc's `fork()` keeps the malloc arenas (and stdio) locked until the kernel
//! returns, and the kernel returns only once a handler has read the FORK event. A handler
//! that allocated or took such a lock between two reads would wait for the forking thread,
//! which waits for the handler: a deadlock. So the handler does nothing with a child's
//! uffd but push its fd into a fixed array of atomic slots and write an eventfd; this
//! service thread, which may allocate, starts the child engine. A full array refuses the
//! child (its uffd is closed: its missing pages read as zeros) rather than block a handler.
//!
//! A child engine stops when its process exits (its handler probes for that while idle)
//! and is reaped here; a child engine that fails to start is counted and logged, never
//! dropped silently.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use uffd_core::Uffd;

use crate::pager::{DeliveryMode, Pager};
use crate::region::RegionSpec;
use crate::shared::Shared;
use crate::source::Source;
use crate::stats::bump;

/// An empty slot.
const EMPTY: i32 = -1;

/// How often an idle child engine checks whether its process has exited (one cheap
/// ioctl); exited children are reaped within about this long.
const CHILD_EXIT_PROBE: Duration = Duration::from_millis(20);

/// The lock-free hand-off from handlers to the service: fds of children's uffds.
pub(crate) struct ForkQueue {
    slots: Box<[AtomicI32]>,
    ready: EventFd,
    /// For counting the children still queued when the pager stops (refused).
    shared: Arc<Shared>,
}

impl ForkQueue {
    pub fn new(shared: Arc<Shared>, capacity: usize) -> std::io::Result<Self> {
        Ok(Self {
            shared,
            slots: (0..capacity.max(1))
                .map(|_| AtomicI32::new(EMPTY))
                .collect(),
            ready: EventFd::from_value_and_flags(
                0,
                EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
            )?,
        })
    }

    /// Hands `uffd` to the service; gives it back when every slot is taken. No allocation,
    /// no lock: a CAS per slot tried and one `write(2)`.
    pub fn push(&self, uffd: Uffd) -> Result<(), Uffd> {
        let fd = uffd.as_raw_fd();
        for slot in self.slots.iter() {
            // Release: the fd is ours to give; the service's Acquire swap takes it.
            if slot
                .compare_exchange(EMPTY, fd, Ordering::Release, Ordering::Relaxed)
                .is_ok()
            {
                // The slot owns the fd now: give up ours without closing it.
                let _ = uffd.into_fd().into_raw_fd();
                let _ = self.ready.write(1);
                return Ok(());
            }
        }
        Err(uffd)
    }

    /// Takes every queued fd.
    fn drain(&self, mut f: impl FnMut(OwnedFd)) {
        let _ = self.ready.read();
        for slot in self.slots.iter() {
            // Acquire: pairs with `push`'s Release.
            let fd = slot.swap(EMPTY, Ordering::Acquire);
            if fd != EMPTY {
                // SAFETY: `push` stored an fd it owned and gave up; the swap made it ours.
                f(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
}

impl Drop for ForkQueue {
    fn drop(&mut self) {
        // Children queued when the pager stopped are refused: their uffds close here.
        let shared = self.shared.clone();
        self.drain(|fd| {
            bump(&shared.stats.forks_refused);
            drop(fd);
        });
    }
}

/// How a child engine is built: what the parent's engine was built from.
pub(crate) struct ChildPlan {
    pub source: Arc<dyn Source>,
    pub regions: Vec<RegionSpec>,
    pub batch: usize,
    /// Child engines alive at once; more children are refused.
    pub max_children: usize,
}

/// Runs the fork service until the parent's engine stops: starts child engines for the
/// queued uffds, reaps those whose process has exited, stops the rest at the end.
pub(crate) fn serve(shared: Arc<Shared>, queue: Arc<ForkQueue>, plan: ChildPlan) {
    let mut children: Vec<Pager> = Vec::new();
    while !shared.stopping() {
        let mut fds = [
            PollFd::new(queue.ready.as_fd(), PollFlags::POLLIN),
            PollFd::new(shared.wakeup.as_fd(), PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, PollTimeout::from(20u8));
        children.retain_mut(|child| {
            let done = child.has_stopped();
            if done {
                child.join();
            }
            !done
        });
        queue.drain(|fd| {
            if children.len() >= plan.max_children {
                bump(&shared.stats.forks_refused);
                log::warn!(
                    "refusing a forked child: {} child engines already running",
                    children.len()
                );
                return; // `fd` closes here
            }
            match start_child(fd, &plan) {
                Ok(child) => {
                    bump(&shared.stats.forks_served);
                    children.push(child);
                }
                Err(e) => {
                    bump(&shared.stats.forks_failed);
                    log::error!("cannot serve a forked child (its uffd is closed): {e}");
                }
            }
        });
    }
    for mut child in children {
        child.join();
    }
}

fn start_child(fd: OwnedFd, plan: &ChildPlan) -> crate::Result<Pager> {
    log::debug!("starting a child engine for forked uffd {}", fd.as_raw_fd());
    let uffd = Uffd::from_fd(fd)?;
    Pager::builder(uffd, plan.source.clone())
        .regions(plan.regions.iter().copied())
        .mode(DeliveryMode::Thread)
        .register(false)
        .batch(plan.batch)
        .child_of_fork(CHILD_EXIT_PROBE)
        .start()
}
