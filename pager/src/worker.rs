//! Handler threads: wait for events, read them in batches, apply the address-space events
//! with the [gate](crate::gate) closed, resolve the faults, and retry the faults the
//! kernel refused while the address space changed.
//!
//! **Fork-safe.** From one `read(2)` to the next a handler allocates nothing and takes no
//! lock that another thread could hold across `fork()` (glibc's malloc and stdio locks):
//! the event buffer, the scratch buffer and the parked list are allocated up front, a
//! forked child's uffd goes to the fork service through a lock-free slot array, and
//! nothing here logs. Sources are called on this path: a source used with fork events on
//! must not allocate in `fetch` either (the pager's own sources do not).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use uffd_core::{Event, EventBuffer, FaultFlags, ReadStatus};

use crate::bell::Bell;
use crate::error::Result;
use crate::fault::{FaultOutcome, FollowUp, MAX_AROUND_BYTES, TAKE_OVER_AFTER};
use crate::fork::ForkQueue;
use crate::place::{GoneSince, Placement};
use crate::region::PageRef;
use crate::shared::Shared;

/// How a handler waits for events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// poll(2) on the uffd and the stop eventfd.
    Block,
    /// Non-blocking polls in a spin loop (burns a CPU).
    Spin,
}

/// A fault refused with EAGAIN (retry once the pending events are read), or one waiting
/// on a page another party requested (wake it once the page leaves Requested), or a
/// forked child's fault waiting on its parent's page (`parent.rs`).
struct Parked {
    page: PageRef,
    since: Instant,
    /// When its retries first met ENOENT.
    gone: GoneSince,
    follow_up: FollowUp,
}

/// Parked faults a handler holds without allocating. A faulting thread has one fault
/// outstanding, so this bounds the threads blocked on one handler's refused faults; past
/// it the list grows (an allocation, off the common path).
const PARKED: usize = 1024;

/// One handler thread's state.
pub(crate) struct Worker {
    shared: Arc<Shared>,
    events: EventBuffer,
    scratch: Vec<u8>,
    parked: Vec<Parked>,
    /// The faults of the batch being handled, and whether each was resolved (reused: no
    /// allocation per batch).
    faults: Vec<(usize, FaultFlags, bool)>,
    /// Where forked children's uffds go; `None` in a child engine or without fork events.
    forks: Option<Arc<ForkQueue>>,
    /// A child engine's process may exit without telling us: probe for it this often
    /// while idle.
    probe_exit: Option<Duration>,
    /// A child engine's: rung by its parent's engine when a page leaves Requested.
    bell: Option<Bell>,
    /// Whether this (child's) handler is counted among its parent's watchers: while it has
    /// faults parked on the parent's pages.
    watching: bool,
}

impl Worker {
    pub fn new(
        shared: Arc<Shared>,
        batch: usize,
        forks: Option<Arc<ForkQueue>>,
        probe_exit: Option<Duration>,
    ) -> Result<Self> {
        let max_page = shared.regions.max_page_size();
        let around = if shared.fault_around > 0 || shared.readahead {
            MAX_AROUND_BYTES
        } else {
            0
        };
        let scratch = vec![0u8; max_page.max(around)];
        Ok(Self {
            bell: shared.parent.as_deref().map(Bell::of).transpose()?,
            shared,
            events: EventBuffer::new(batch),
            scratch,
            parked: Vec::with_capacity(PARKED),
            faults: Vec::with_capacity(batch),
            forks,
            probe_exit,
            watching: false,
        })
    }

    /// Runs until the pager stops or the faulting process is gone.
    pub fn run(&mut self, wait: Wait) {
        self.shared.handler_running();
        while !self.shared.stopping() {
            let readable = match wait {
                Wait::Block => self.poll(),
                Wait::Spin => self.ready_now(),
            };
            if readable {
                self.drain();
            } else if wait == Wait::Spin {
                std::hint::spin_loop();
            }
            if !self.parked.is_empty() {
                self.retry_parked();
            }
        }
    }

    /// Blocks in poll until the uffd is readable, the pager stops, the parent rings (a
    /// child engine's), or (with parked faults to retry or an exit probe) a short interval
    /// passes. Returns whether the uffd is readable.
    fn poll(&mut self) -> bool {
        let timeout = if self.needs_tick() {
            PollTimeout::from(1u8)
        } else if let Some(every) = self.probe_exit {
            PollTimeout::try_from(every).unwrap_or(PollTimeout::MAX)
        } else {
            PollTimeout::NONE
        };
        let (uffd_events, _) = {
            let shared = &*self.shared;
            let mut fds = [
                PollFd::new(shared.uffd.as_fd(), PollFlags::POLLIN),
                PollFd::new(shared.wakeup.as_fd(), PollFlags::POLLIN),
                // Without a bell, the wakeup again (readable only when stopping).
                PollFd::new(
                    self.bell.as_ref().map_or(shared.wakeup.as_fd(), Bell::fd),
                    PollFlags::POLLIN,
                ),
            ];
            match poll(&mut fds, timeout) {
                Ok(0) => {
                    self.probe_process();
                    return false;
                }
                Ok(_) => {
                    if let (Some(bell), Some(PollFlags::POLLIN)) = (&self.bell, fds[2].revents()) {
                        bell.clear(); // the parked faults are retried next
                    }
                    (fds[0].revents().unwrap_or(PollFlags::empty()), ())
                }
                Err(_) => return false, // EINTR: loop and look at the stop flag
            }
        };
        let broken = [
            (
                PollFlags::POLLERR,
                "POLLERR (made blocking again, or not negotiated)",
            ),
            (PollFlags::POLLHUP, "POLLHUP"),
            (PollFlags::POLLNVAL, "POLLNVAL (not an open fd)"),
        ];
        if let Some(&(_, what)) = broken.iter().find(|(f, _)| uffd_events.contains(*f)) {
            // Nothing more can be read: a fatal error (pages not placed are poisoned),
            // never a quiet stop.
            self.shared.fail(crate::Error::UffdPoll {
                what,
                revents: uffd_events.bits(),
            });
            return false;
        }
        uffd_events.contains(PollFlags::POLLIN)
    }

    /// Whether a parked fault needs retrying on a timer: one refused with EAGAIN (nothing
    /// tells when the events are read), one watching a page of this engine, or a child's
    /// waiting on a page its parent's starved prefetcher holds (taken over after
    /// [`TAKE_OVER_AFTER`]). A child's fault waiting on its parent's remote source or
    /// handler waits for the parent's bell.
    fn needs_tick(&self) -> bool {
        let parent = self
            .shared
            .parent
            .as_deref()
            .filter(|_| self.bell.is_some());
        self.parked.iter().any(|e| match (e.follow_up, parent) {
            (FollowUp::Parent { retry: false }, Some(parent)) => {
                parent.may_take_over(e.page.page, TAKE_OVER_AFTER)
            }
            _ => true,
        })
    }

    /// Whether the uffd is readable right now (a zero-timeout poll: the gate is closed
    /// only around reads that will find something).
    fn ready_now(&self) -> bool {
        let mut fds = [PollFd::new(self.shared.uffd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// A child engine's process may have exited: stop if it has.
    fn probe_process(&self) {
        if self.probe_exit.is_some() && self.shared.probe_gone() {
            self.shared.request_stop();
        }
    }

    /// Reads and handles events until none are pending.
    fn drain(&mut self) {
        loop {
            let n = {
                // No placement runs while a batch is read and its REMOVEs applied.
                let shared = &*self.shared;
                let Some(_closed) = shared.gate.try_close() else {
                    // Another handler is reading: it takes what is pending. Poll again
                    // once it has (the uffd stays readable if anything is left): polling
                    // at once would find the uffd readable and spin (poll, yield) for as
                    // long as the reader waits for in-flight placements.
                    shared.gate.wait_open();
                    return;
                };
                let n = match shared.uffd.read_events(&mut self.events) {
                    Ok(ReadStatus::Events(n)) => n,
                    Ok(ReadStatus::WouldBlock) => return,
                    Err(e) => {
                        drop(_closed);
                        shared.fail(e.into());
                        return;
                    }
                };
                take_events(
                    shared,
                    &mut self.events,
                    &mut self.faults,
                    self.forks.as_deref(),
                );
                n
            };
            self.resolve_faults();
            if n < self.events.capacity() {
                return;
            }
        }
    }

    /// Resolves the batch's faults. A batch of several faults is placed unwoken, with one
    /// wake per resolved page at the end (a fault left to a remote source or parked is
    /// woken by whoever places its page: waking it now would only make it fault again).
    fn resolve_faults(&mut self) {
        let now = Instant::now();
        let wake_each = self.faults.len() == 1;
        let shared = &*self.shared;
        for fault in self.faults.iter_mut() {
            let (addr, flags, _) = *fault;
            let mut gone = GoneSince::default();
            let outcome = shared.on_fault(addr, flags, &mut self.scratch, wake_each, &mut gone);
            fault.2 = matches!(outcome, FaultOutcome::Resolved);
            match outcome {
                FaultOutcome::Resolved if wake_each => shared.stats.record_latency(now.elapsed()),
                FaultOutcome::Resolved => {}
                // Timed from now until its page arrives (placed by the source's thread).
                FaultOutcome::Asked => shared.asked(addr, now),
                FaultOutcome::FollowUp(page, follow_up) => park(
                    &mut self.parked,
                    Parked {
                        page,
                        since: now,
                        gone,
                        follow_up,
                    },
                ),
                FaultOutcome::Failed(placement) => shared.fail_placement(placement),
            }
        }
        if !wake_each {
            let mut resolved = 0;
            for &(addr, _, done) in &self.faults {
                if let (true, Some(p)) = (done, shared.page_at(addr)) {
                    shared.fail_placement(shared.wake(p.addr, p.size));
                    resolved += 1;
                }
            }
            let latency = now.elapsed();
            for _ in 0..resolved {
                shared.stats.record_latency(latency);
            }
        }
    }

    /// Retries every parked fault in place: its page may be Zero now (REMOVE), placed by
    /// someone else, or still ours to fetch; a child's fault on shared memory follows its
    /// parent's page (`parent.rs`).
    fn retry_parked(&mut self) {
        let shared = &*self.shared;
        let parent = shared.parent.as_deref();
        // Counted before the parent's states are read (`parent.rs`: the parent rings).
        self.watching = watch(parent, self.watching, &self.parked);
        let scratch = &mut self.scratch;
        self.parked.retain_mut(|parked| {
            let p = &parked.page;
            let waited = parked.since.elapsed();
            let placement = match (parked.follow_up, parent) {
                (FollowUp::Parent { .. }, Some(parent)) => {
                    shared.retry_shared(parent, p, &mut parked.follow_up, waited, scratch)
                }
                (follow_up, _) => shared.retry_fault(p, follow_up, waited, scratch),
            };
            let Some(placement) = placement else {
                return true; // still in someone else's hands
            };
            match placement.or_give_up(&mut parked.gone) {
                Placement::Again { .. } => true,
                Placement::Done => {
                    shared.stats.record_latency(parked.since.elapsed());
                    false
                }
                Placement::Asked | Placement::Dropped => false,
                failed => {
                    shared.fail_placement(failed);
                    false
                }
            }
        });
        self.watching = watch(parent, self.watching, &self.parked);
    }
}

impl Drop for Worker {
    /// A child's handler that stops with faults parked on its parent's pages stops
    /// counting among its watchers, and gives back the parent's claims it held (a
    /// placement it retried: `parent.rs`), so the parent's own faults fetch them.
    fn drop(&mut self) {
        let Some(parent) = self.shared.parent.as_deref() else {
            return;
        };
        for parked in &self.parked {
            if parked.follow_up == (FollowUp::Parent { retry: true }) {
                parent.release(parked.page.page);
            }
        }
        watch(Some(parent), self.watching, &[]);
    }
}

/// Counts a child's handler among its parent's watchers while it has faults parked on
/// the parent's pages (`parent.rs`); returns whether it is.
fn watch(parent: Option<&Shared>, watching: bool, parked: &[Parked]) -> bool {
    let Some(parent) = parent else {
        return false;
    };
    let now = parked
        .iter()
        .any(|e| matches!(e.follow_up, FollowUp::Parent { .. }));
    if now != watching {
        parent.watch(now);
    }
    now
}

/// Applies the batch's address-space events (the gate is closed) and keeps its faults.
fn take_events(
    shared: &Shared,
    events: &mut EventBuffer,
    faults: &mut Vec<(usize, FaultFlags, bool)>,
    forks: Option<&ForkQueue>,
) {
    faults.clear();
    for event in events.drain() {
        match event {
            Event::Pagefault { addr, flags, .. } => faults.push((addr, flags, false)),
            other => {
                if let Some(child) = shared.on_event(other) {
                    let refused = match forks {
                        Some(queue) => queue.push(child).err(),
                        None => Some(child),
                    };
                    if let Some(child) = refused {
                        // Poisoned, then closed: the child's faults raise SIGBUS.
                        crate::fork::refuse_quietly(shared, &child);
                    }
                }
            }
        }
    }
}

/// Parks a fault, once per page: a thread woken early refaults, and its page is already
/// being watched or retried.
fn park(parked: &mut Vec<Parked>, new: Parked) {
    if let Some(old) = parked.iter_mut().find(|p| p.page.page == new.page.page) {
        if new.follow_up.retries() {
            old.follow_up = new.follow_up;
        }
        return;
    }
    parked.push(new);
}
