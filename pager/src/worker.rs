//! Handler threads: read fault events in batches, resolve them through the engine, apply
//! address-space events, and retry faults the kernel refused while the space changed.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use uffd_core::{Event, EventBuffer, ReadStatus};

use crate::engine::{Content, FollowUp, Origin, Placement, Shared};
use crate::region::PageRef;

/// How a handler waits for events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// poll(2) on the uffd and the stop eventfd.
    Block,
    /// Non-blocking reads in a spin loop.
    Spin,
}

/// A fault refused with EAGAIN (retry once the pending events are read), or one waiting
/// on a page another party requested (wake it once the page leaves Requested).
struct Parked {
    page: PageRef,
    since: Instant,
    follow_up: FollowUp,
}

/// One handler thread's state.
pub(crate) struct Worker {
    shared: Arc<Shared>,
    events: EventBuffer,
    scratch: Vec<u8>,
    parked: Vec<Parked>,
    /// The faults of the batch being handled (reused: no allocation per batch).
    faults: Vec<(usize, uffd_core::FaultFlags)>,
    /// Uffds of forked children handed to the pager for new engines.
    pub forks: Vec<uffd_core::Uffd>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>, batch: usize, max_page: usize) -> Self {
        let scratch = vec![0u8; max_page * (shared.fault_around + 1).max(1)];
        Self {
            shared,
            events: EventBuffer::new(batch),
            scratch,
            parked: Vec::new(),
            faults: Vec::with_capacity(batch),
            forks: Vec::new(),
        }
    }

    /// Runs until the pager stops or the faulting process is gone.
    pub fn run(&mut self, wait: Wait, on_fork: &dyn Fn(uffd_core::Uffd)) {
        while !self.shared.stopping() {
            let ready = match wait {
                Wait::Block => self.poll(),
                Wait::Spin => true,
            };
            if ready {
                let got = self.drain();
                if got == 0 && wait == Wait::Spin {
                    std::hint::spin_loop();
                }
            }
            if !self.parked.is_empty() {
                self.retry_parked();
            }
            for uffd in self.forks.drain(..) {
                on_fork(uffd);
            }
        }
    }

    /// Blocks in poll until the uffd is readable, the pager stops, or (with parked
    /// faults) a short retry interval passes. Returns whether the uffd is readable.
    fn poll(&self) -> bool {
        let mut fds = [
            libc::pollfd {
                fd: self.shared.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.shared.wakeup.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = if self.parked.is_empty() { -1 } else { 1 };
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n < 0 {
            return false; // EINTR: loop and look at the stop flag
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            // POLLERR means a blocking or unnegotiated fd: a misuse the builder prevents;
            // stop rather than spin.
            self.shared.request_stop();
            return false;
        }
        fds[0].revents & libc::POLLIN != 0
    }

    /// Reads and handles events until none are pending. Returns how many were read.
    fn drain(&mut self) -> usize {
        let mut total = 0;
        loop {
            let n = match self.shared.uffd.read_events(&mut self.events) {
                Ok(ReadStatus::Events(n)) => n,
                Ok(ReadStatus::WouldBlock) => return total,
                Err(e) => {
                    self.shared.fail(e.into());
                    return total;
                }
            };
            total += n;
            self.handle_batch();
            if n < self.events.capacity() {
                return total;
            }
        }
    }

    /// Address-space events first (a REMOVE must reach the page states before any fault
    /// of the same batch is resolved), then the faults. A batch of several faults is
    /// placed unwoken, with one wake per page at the end.
    fn handle_batch(&mut self) {
        let now = Instant::now();
        self.faults.clear();
        for event in self.events.drain() {
            match event {
                Event::Pagefault { addr, flags, .. } => self.faults.push((addr, flags)),
                other => {
                    if let Some(child) = self.shared.on_event(other) {
                        self.forks.push(child);
                    }
                }
            }
        }
        let wake_each = self.faults.len() == 1;
        let shared = self.shared.clone();
        for i in 0..self.faults.len() {
            let (addr, flags) = self.faults[i];
            if let Some((page, follow_up)) =
                shared.on_fault(addr, flags, &mut self.scratch, wake_each)
            {
                self.parked.push(Parked {
                    page,
                    since: now,
                    follow_up,
                });
            } else if wake_each {
                shared.stats.record_latency(now.elapsed());
            }
        }
        if !wake_each {
            for &(addr, _) in &self.faults {
                // Waking a page that is not placed yet (remote, parked) is harmless: the
                // thread refaults and waits again on the still-missing page.
                if let Some(p) = shared.page_at(addr) {
                    let _ = shared.uffd.wake(p.addr, p.size);
                }
            }
            let latency = now.elapsed();
            for _ in 0..self.faults.len() {
                shared.stats.record_latency(latency);
            }
        }
    }

    /// Retries every parked fault: its page may be Zero now (REMOVE), placed by someone
    /// else, or still ours to fetch.
    fn retry_parked(&mut self) {
        let shared = self.shared.clone();
        let mut still = Vec::new();
        for parked in std::mem::take(&mut self.parked) {
            let p = parked.page;
            let state = shared.states.get(p.page);
            let placement = match (parked.follow_up, state) {
                // Still in someone else's hands: keep watching.
                (FollowUp::Watch, Ok(page_state::PageState::Requested)) => {
                    still.push(parked);
                    continue;
                }
                (FollowUp::Retry, Ok(page_state::PageState::Zero)) => {
                    shared.place(&p, 1, Content::Zero, true, Origin::Fault)
                }
                (FollowUp::Retry, Ok(page_state::PageState::Requested)) => {
                    shared.fetch_and_place(&p, 1, &mut self.scratch, true, Origin::Fault)
                }
                // Placed, zeroed, or given back: wake; a thread still missing its page
                // refaults and is handled afresh.
                _ => {
                    let _ = shared.uffd.wake(p.addr, p.size);
                    Placement::Done
                }
            };
            match placement {
                Placement::Again { .. } => still.push(parked),
                Placement::Done => shared.stats.record_latency(parked.since.elapsed()),
                Placement::Dropped => {}
            }
        }
        self.parked = still;
    }
}
