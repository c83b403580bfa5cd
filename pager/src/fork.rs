//! Forked children: each gets a child engine serving its copy of the regions.
//!
//! A FORK event is the one event whose *reading* a process waits for while it holds locks
//! of its own: glibc's `fork()` keeps the malloc arenas (and stdio) locked until the kernel
//! returns, and the kernel returns only once a handler has read the FORK event. A handler
//! that allocated or took such a lock between two reads would wait for the forking thread,
//! which waits for the handler: a deadlock. So the handler does nothing with a child's
//! uffd but push its fd into a fixed array of atomic slots and write an eventfd; this
//! service thread, which may allocate, starts the child engine. A full array refuses the
//! child rather than block a handler.
//!
//! The source says how a child is served ([`Source::child`]): from the parent's own
//! source (a local one), from a source of the child's own, or not at all. A child that is
//! not served — refused by its source, beyond the limit of children, or whose engine
//! failed to start — is counted and logged, and its missing pages are poisoned before its
//! uffd is closed: a touch raises SIGBUS, never reads zeros, and never blocks.
//!
//! A MINOR region is shared memory: the child's copy is its parent's page cache (fork
//! copies no page table entries there, so the child faults on every page). The parent's
//! engine decides those pages and the child's engine only maps the cache (`parent.rs`).
//!
//! A child engine stops when its process exits (its handler probes for that while idle)
//! and is reaped here. One still running when the parent's pager stops — asked to or
//! failed — is failed ([`Error::ParentStopped`](crate::Error::ParentStopped)): its pages
//! not placed yet are poisoned, counted as `forks_failed`, never left to read zeros.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use uffd_core::{Mapping, Uffd, WriteProtectMode};

use crate::pager::Pager;
use crate::poison::Poison;
use crate::shared::Shared;
use crate::source::{ChildSource, Source};
use crate::stats::bump;

/// An empty slot.
const EMPTY: i32 = -1;

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
        // Children queued when the pager stopped are refused.
        let shared = self.shared.clone();
        self.drain(|fd| refuse(&shared, fd, "the pager stopped before serving it"));
    }
}

/// Refuses a forked child that will not be served: counts it, poisons its missing pages
/// through its uffd (a touch raises SIGBUS rather than reading zeros once the uffd is
/// closed), and closes the uffd. Allocates nothing and does not log (a handler may call
/// it between two reads, see `worker.rs`): `refuse` logs.
pub(crate) fn refuse_quietly(shared: &Shared, uffd: &Uffd) {
    bump(&shared.stats.forks_refused);
    bump(&shared.refused_unlogged);
    let _ = shared.poison_in(uffd, Poison::Child);
}

/// [`refuse_quietly`], logged, for a child's uffd `fd`.
fn refuse(shared: &Shared, fd: OwnedFd, why: &str) {
    match Uffd::from_fd(fd) {
        Ok(uffd) => {
            bump(&shared.stats.forks_refused);
            let _ = shared.poison_in(&uffd, Poison::Child);
            log::warn!("refusing a forked child ({why}): its missing pages are poisoned");
        }
        Err(e) => {
            bump(&shared.stats.forks_refused);
            log::error!(
                "refusing a forked child ({why}); its uffd cannot be used to poison its pages: {e}"
            );
        }
    }
}

/// How a child engine is built: what the parent's engine was built from. The regions are
/// not part of it: a child gets the parent's regions as they are when it is served (moved
/// by REMAP, gone by UNMAP), not as they were at start.
pub(crate) struct ChildPlan {
    pub source: Arc<dyn Source>,
    /// The memory the parent keeps alive (a MINOR region's alias is written for the
    /// child too).
    pub keep: Vec<Arc<Mapping>>,
    pub batch: usize,
    /// Child engines alive at once; more children are refused.
    pub max_children: usize,
    pub poison_on_fatal: bool,
}

/// Builds and starts a child engine for a forked child's uffd, from the parent's plan and
/// regions, with the child's own source if it has one (the builder's job: see
/// `builder::start_child`; passed in, so this file never names the builder).
pub(crate) type StartChild = fn(
    OwnedFd,
    &ChildPlan,
    Vec<crate::region::RegionSpec>,
    Option<Arc<dyn Source>>,
    &Arc<Shared>,
) -> crate::Result<Pager>;

/// Runs the fork service until the parent's engine stops: starts child engines for the
/// queued uffds (with `start_child`), reaps those whose process has exited, stops the
/// rest at the end.
pub(crate) fn serve(
    shared: Arc<Shared>,
    queue: Arc<ForkQueue>,
    plan: ChildPlan,
    start_child: StartChild,
) {
    let mut children: Vec<Pager> = Vec::new();
    // Refusals counted so far: a handler refuses a child when every slot is taken, and
    // may not log (see `worker.rs`): the service logs them for it.
    let mut refused = 0;
    while !shared.stopping() {
        let mut fds = [
            PollFd::new(queue.ready.as_fd(), PollFlags::POLLIN),
            PollFd::new(shared.wakeup.as_fd(), PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, PollTimeout::from(20u8));
        // Relaxed: a counter read for a log line.
        let now = shared.refused_unlogged.load(Ordering::Relaxed);
        if now > refused {
            log::warn!(
                "{} forked child(ren) refused by a handler, every slot of the hand-off taken \
                 (their missing pages poisoned)",
                now - refused
            );
            refused = now;
        }
        children.retain_mut(|child| {
            let done = child.has_stopped();
            if done {
                reap(&shared, child);
            }
            !done
        });
        queue.drain(|fd| {
            if children.len() >= plan.max_children {
                let why = format!("{} child engines already running", children.len());
                return refuse(&shared, fd, &why);
            }
            let source = match plan.source.child() {
                ChildSource::Shared => None,
                ChildSource::Own(source) => Some(source),
                ChildSource::Refuse(why) => return refuse(&shared, fd, why),
            };
            // A spare descriptor, to poison the child's pages through if its engine fails.
            let spare = fd.as_fd().try_clone_to_owned();
            // The parent's regions now. A REMAP or UNMAP the parent made after the fork and
            // the service applied before this read is the child's too (a race left open:
            // the handler that reads the FORK event may not allocate a copy).
            let regions = shared.regions.current_specs();
            match start_child(fd, &plan, regions, source, &shared) {
                Ok(child) => {
                    bump(&shared.stats.forks_served);
                    children.push(child);
                }
                Err(e) => {
                    bump(&shared.stats.forks_failed);
                    if let Some(uffd) = spare.ok().and_then(|fd| Uffd::from_fd(fd).ok()) {
                        let _ = shared.poison_in(&uffd, Poison::Child);
                    }
                    log::error!(
                        "cannot serve a forked child (its missing pages are poisoned): {e}"
                    );
                }
            }
        });
    }
    // The children still running are served no more. Each engine is failed, so the pages
    // it has not placed are poisoned (a touch raises SIGBUS) before its uffd is closed,
    // which would hand them zeros; one whose process has exited is only reaped.
    for mut child in children {
        if !child.has_stopped() && !child.process_exited() {
            child.fail_engine(crate::Error::ParentStopped);
        }
        reap(&shared, &mut child);
    }
}

/// Joins a stopped child engine; one that failed (its pages poisoned by then) is counted
/// and logged.
fn reap(shared: &Shared, child: &mut Pager) {
    child.join();
    if let Some(e) = child.take_fatal() {
        bump(&shared.stats.forks_failed);
        log::error!("a forked child's engine failed (its missing pages are poisoned): {e}");
    }
}

impl Shared {
    /// Whether the process this engine serves has exited (then recorded in `gone`):
    /// `UFFDIO_WRITEPROTECT` un-protecting one page of a region not registered for
    /// write-protection changes nothing and answers ENOENT while the process lives, ESRCH
    /// once it is gone. For a child engine's idle probe and the fork service's end.
    pub(crate) fn probe_gone(&self) -> bool {
        let Some(p) = self.page(0) else {
            return false;
        };
        let probe = self
            .uffd
            .write_protect(p.addr, p.size, WriteProtectMode::DONTWAKE);
        let gone = matches!(probe, Err(uffd_core::Error::ProcessGone { .. }));
        if gone {
            self.gone.store(true, Ordering::Relaxed);
        }
        gone
    }
}
