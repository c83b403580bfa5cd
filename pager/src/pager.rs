//! The running [`Pager`]: its delivery mode, what embedders read of it (counters, page
//! states, completion), and stopping it.

use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use page_state::PageState;
use uffd_core::Uffd;

use crate::error::Result;
use crate::placer::Placer;
use crate::record;
use crate::shared::Shared;
use crate::states::PageStates;
use crate::stats::StatsSnapshot;

/// How faults reach a handler.
///
/// Measured with `uffdkit bench` on a 2-vCPU nested VM (4 KiB pages, memory source, one
/// faulting thread, p50 of the median of 3 runs, pager ≈ raw uffd-core loop of the same
/// mode): one handler thread blocking in poll on the *other* CPU 82–95 µs (waking an idle
/// vCPU is what costs); busy-polling 18–21 µs (and a CPU burnt); one pinned handler per
/// CPU 11–12 µs whether or not the faulting thread is pinned (the fault is served on the
/// CPU that just went idle by blocking on it); SIGBUS in the faulting thread ~6 µs.
/// [`DeliveryMode::PerCpu`] is the default: the fastest mode that serves memory of another
/// process and does not burn a CPU. [`DeliveryMode::Sigbus`] is faster but in-process only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeliveryMode {
    /// One handler thread blocking in poll.
    Thread,
    /// One handler thread spinning on non-blocking reads (burns a CPU).
    BusyPoll,
    /// One handler thread per CPU, each pinned to its CPU, all polling the uffd.
    #[default]
    PerCpu,
    /// `UFFD_FEATURE_SIGBUS`: the faulting thread resolves its own fault in a signal
    /// handler (in-process memory, a signal-safe local source); an event thread reads
    /// the non-fault events.
    Sigbus,
}

impl DeliveryMode {
    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            DeliveryMode::Thread => "thread",
            DeliveryMode::BusyPoll => "poll",
            DeliveryMode::PerCpu => "percpu",
            DeliveryMode::Sigbus => "sigbus",
        }
    }

    /// Whether the mode can serve memory of another process (a uffd received from a VMM):
    /// every mode but SIGBUS.
    pub fn serves_other_processes(self) -> bool {
        self != DeliveryMode::Sigbus
    }
}

/// A running pager: handler threads serving faults on its regions from its source.
///
/// **Failures.** A fatal error (a source failure, a thread's panic, the uffd in error, a
/// placement the kernel refuses) stops the pager by itself, poisons every page not yet
/// placed (unless [`PagerBuilder::poison_on_fatal`](crate::PagerBuilder::poison_on_fatal)
/// says not to: a later touch raises SIGBUS instead of reading zeros), and is returned by
/// [`stop`](Self::stop). The embedder learns of it without polling: [`wait`](Self::wait)
/// blocks until the pager stops, and [`stopped_fd`](Self::stopped_fd) is an eventfd for
/// its own event loop.
///
/// **Stopping.** Dropping it, or [`stop`](Self::stop), stops the threads. Threads blocked
/// on faults the pager never served (a stop the embedder asked for, with pages left) are
/// released when the uffd is closed (with the `Pager`, if it holds the last reference):
/// the kernel then fills their pages with zeros — stop only once that is acceptable.
pub struct Pager {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    record: Option<PathBuf>,
    mode: DeliveryMode,
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager")
            .field("mode", &self.mode)
            .field("pages", &self.shared.states.len())
            .finish_non_exhaustive()
    }
}

impl Pager {
    pub(crate) fn new(
        shared: Arc<Shared>,
        threads: Vec<JoinHandle<()>>,
        record: Option<PathBuf>,
        mode: DeliveryMode,
    ) -> Self {
        Self {
            shared,
            threads,
            record,
            mode,
        }
    }

    pub(crate) fn push_thread(&mut self, thread: JoinHandle<()>) {
        self.threads.push(thread);
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// A handle for placing pages that arrive from a remote source.
    pub fn placer(&self) -> Placer {
        let engine: std::sync::Weak<Shared> = Arc::downgrade(&self.shared);
        Placer::new(engine)
    }

    /// The page states, read-only.
    pub fn states(&self) -> PageStates<'_> {
        PageStates {
            map: &self.shared.states,
        }
    }

    /// Whether the workload dropped page `page` (index in the state map) while the pager
    /// served it: a REMOVE event (`MADV_DONTNEED`, `MADV_REMOVE`, a balloon) reached it,
    /// so it reads zeros of the workload's own making, whatever the source holds. A page
    /// dropped before it was placed is never placed (it is Zero); a migration destination
    /// leaves such pages out of its verdict. `false` beyond the end.
    pub fn dropped(&self, page: usize) -> bool {
        self.shared.dropped.test(page)
    }

    /// The delivery mode in use.
    pub fn mode(&self) -> DeliveryMode {
        self.mode
    }

    /// The uffd being served.
    pub fn uffd(&self) -> &Uffd {
        &self.shared.uffd
    }

    /// Whether every page has been placed.
    pub fn is_complete(&self) -> bool {
        self.shared.complete()
    }

    /// Whether the faulting process has exited (a placement reported ESRCH).
    pub fn process_gone(&self) -> bool {
        self.shared.gone.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the pager stopped by itself (process gone, or a fatal error).
    pub fn has_stopped(&self) -> bool {
        self.shared.stopping()
    }

    /// Fails the pager on the embedder's behalf — a migration that cannot finish, a
    /// source the embedder gives up on — exactly as a fatal error of its own: it stops,
    /// poisons every page not yet placed (see
    /// [`PagerBuilder::poison_on_fatal`](crate::PagerBuilder::poison_on_fatal)), and
    /// [`stop`](Self::stop) returns `error`. Returns once that is done. Call it before
    /// dropping a pager whose missing pages must not read as zeros.
    pub fn fail(&self, error: crate::SourceError) {
        crate::stats::bump(&self.shared.stats.source_errors);
        self.shared.fail(error.into());
        self.wait(None);
    }

    /// An eventfd that becomes readable once the pager has stopped — by itself (a fatal
    /// error, its pages poisoned by then; the faulting process gone) or when asked — for
    /// an embedder's event loop (`poll`/`epoll` it; never read it). Then call
    /// [`stop`](Self::stop) for the error or the final counters.
    pub fn stopped_fd(&self) -> BorrowedFd<'_> {
        self.shared.stopped_fd()
    }

    /// Blocks until the pager has stopped by itself (see [`stopped_fd`](Self::stopped_fd)),
    /// or `timeout` passes (`None`: no limit). Returns whether it stopped.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.stopped_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, left) {
                Ok(n) if n > 0 => return true,
                Ok(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                    return self.shared.is_settled()
                }
                Ok(_) | Err(_) => {} // EINTR, or a timeout rounded down: look again
            }
        }
    }

    /// Takes the fatal error that stopped the pager, without joining its threads (`None`
    /// if there is none, or it was taken). For an embedder that cannot join them: one
    /// whose thread a SIGBUS-mode pager chained a poisoned page's SIGBUS to, and which
    /// never returns from that handler, so [`stop`](Self::stop) would wait for it. Then
    /// the embedder ends the process rather than stop or drop the pager.
    pub fn take_error(&self) -> Option<crate::Error> {
        self.shared.take_fatal()
    }

    /// Waits until every page is placed, the pager stops, or `timeout` passes. Returns
    /// whether every page is placed.
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.is_complete() {
            if self.has_stopped() || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Waits until page `page` (index in the state map) is present — placed (Received) or
    /// known zero — the pager stops, or `timeout` passes; returns its state then (`None`
    /// beyond the end).
    ///
    /// For an embedder that saw a touch of the page return (a vCPU read it, a thread's
    /// fault was resolved) and wants the pager's account of it: a placement's ioctl wakes
    /// the faulting thread before the pager publishes the page as Received (one ioctl, then
    /// the state; a whole batch's states after the batch's wake), so just after the touch
    /// the page may still read Requested, or Missing. A page nobody touched stays Missing
    /// and this waits out `timeout`.
    pub fn wait_placed(&self, page: usize, timeout: Duration) -> Option<PageState> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.states().get(page)?;
            let present = matches!(state, PageState::Received | PageState::Zero);
            if present || self.has_stopped() || Instant::now() >= deadline {
                return Some(state);
            }
            std::thread::yield_now();
        }
    }

    /// Stops and joins every thread (idempotent).
    pub(crate) fn join(&mut self) {
        self.shared.request_stop();
        if self.mode == crate::DeliveryMode::Sigbus {
            crate::sigbus::uninstall(&self.shared);
        }
        for t in self.threads.drain(..) {
            // A panic is caught in the thread and recorded as the fatal error (builder's
            // `spawn`); a join error can only be a panic while recording it.
            if t.join().is_err() {
                self.shared.fail(crate::Error::ThreadPanicked {
                    thread: "(unknown)".into(),
                    message: "panicked while reporting a failure".into(),
                });
            }
        }
        self.shared.settle();
    }

    /// Whether the served process has exited, probed now (for the fork service).
    pub(crate) fn process_exited(&self) -> bool {
        self.shared.probe_gone()
    }

    /// Fails the pager with `error` (for the fork service: a child engine whose parent
    /// stopped); [`join`](Self::join) then settles it.
    pub(crate) fn fail_engine(&self, error: crate::Error) {
        self.shared.fail(error);
    }

    /// The fatal error that stopped the pager, taken (for the fork service's reaping).
    pub(crate) fn take_fatal(&self) -> Option<crate::Error> {
        self.shared.take_fatal()
    }

    /// Stops every thread, writes the recorded working set if asked, and returns the
    /// final counters (every placement that had woken a thread counted), or the fatal
    /// error that stopped the pager early.
    pub fn stop(mut self) -> Result<StatsSnapshot> {
        self.join();
        // A remote source's own thread may still be inside a placement whose ioctl already
        // woke its waiters (the embedder saw the page): its counts land before it leaves
        // the gate, so the final counters wait for it (briefly: a placement is one ioctl).
        let until = Instant::now() + Duration::from_secs(1);
        while self.shared.gate.placing() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_micros(50));
        }
        let stats = self.stats();
        if self.process_gone() {
            log::info!("pager stopped: the faulting process exited");
        }
        log::debug!(
            "pager stopped after {} faults, {} pages placed ({} by fault, {} prefetched, {} zero, {} arrived)",
            stats.faults(),
            stats.placed(),
            stats.placed_fault,
            stats.placed_prefetch,
            stats.placed_zero,
            stats.placed_arrival
        );
        let saved = match (&self.record, &self.shared.recorder) {
            (Some(path), Some(rec)) => record::save(path, &rec.pages()),
            _ => Ok(()),
        };
        // The error that stopped the pager comes first; a recording that could not be
        // saved as well is logged, never returned in its place.
        match (self.shared.take_fatal(), saved) {
            (Some(fatal), Err(e)) => {
                log::error!("the working set could not be saved either: {e}");
                Err(fatal)
            }
            (Some(fatal), Ok(())) => Err(fatal),
            (None, Err(e)) => Err(e),
            (None, Ok(())) => Ok(stats),
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.join();
    }
}
