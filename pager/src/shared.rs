//! The engine's state, shared by every handler thread, the prefetcher, the SIGBUS handler
//! and the placement handle. Nothing in it is behind a lock on the fault path: the region
//! table, the page states, the removed-in-flight set, the gate and the counters are all
//! atomics. The only lock is the slot for the first fatal error, taken once, off the
//! SIGBUS path (which reports through atomics, see [`Shared::fail_in_signal`]).

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::eventfd::{EfdFlags, EventFd};
use page_state::{Bitmap, PageState, PageStateMap};
use uffd_core::{Features, Mapping, Uffd};

use crate::error::{Error, Result, SourceError};
use crate::gate::Gate;
use crate::record::Recorder;
use crate::region::{PageRef, RegionTable, Resolve};
use crate::source::Source;
use crate::stats::{PendingFaults, Stats};

/// State shared by all the pager's threads.
pub(crate) struct Shared {
    pub uffd: Uffd,
    pub regions: RegionTable,
    pub states: PageStateMap,
    /// Pages a REMOVE hit while a claimant (or an arrival) was bringing them in: whoever
    /// places one next places zeros instead, and clears the bit.
    pub removed: Bitmap,
    /// Pages a REMOVE reached at any time: the workload's own zeros from then on
    /// ([`Pager::dropped`](crate::Pager::dropped)).
    pub dropped: Bitmap,
    /// Pages the background prefetcher holds claimed (Requested): a fault waiting on one
    /// of them for long places it itself (the prefetcher runs at SCHED_IDLE).
    pub background: Bitmap,
    /// Orders placements against the reading of REMOVE events.
    pub gate: Gate,
    pub source: Arc<dyn Source>,
    pub stats: Stats,
    /// Set to stop every thread; `wakeup` makes blocked pollers notice.
    stop: AtomicBool,
    pub wakeup: EventFd,
    /// The faulting process exited (ESRCH): nothing more can be served.
    pub gone: AtomicBool,
    /// Handler threads in their loops (past the start-up of their thread).
    running: AtomicUsize,
    /// The prefetcher's next page; each fault moves it to just after the faulting page.
    pub cursor: AtomicUsize,
    /// Fault order of first touches, when recording a working set.
    pub recorder: Option<Recorder>,
    /// Pages placed after each faulting page (spatial locality): the starting window.
    pub fault_around: usize,
    /// The page after the last fault-around run, and the window it used: a fault there
    /// is sequential and doubles the window (fault.rs).
    pub around_next: AtomicUsize,
    pub around_window: AtomicUsize,
    /// Whether sequential faults grow the fault-around window (readahead).
    pub readahead: bool,
    /// A forked child's engine serving from its parent's source, which must answer at
    /// once: `Pending` there is a fatal error (see `Source::child`).
    pub pending_is_fatal: bool,
    /// A forked child's engine: its parent's, which decides the pages of MINOR regions
    /// (one page cache for both: see `parent.rs`).
    pub parent: Option<Arc<Shared>>,
    /// Rung when a page leaves Requested while `watched` waiters wait on one (`bell.rs`).
    pub bell: EventFd,
    pub watched: AtomicUsize,
    /// Set once the source answers `Pending` (see `Shared::is_remote`).
    pub remote: AtomicBool,
    /// Zeros for placing zero pages where ZEROPAGE is unavailable (hugetlb, minor mode).
    pub zeros: Box<[u8]>,
    /// The first fatal error (a failing source); the pager stops on it.
    fatal: Mutex<Option<Error>>,
    /// Whether a fatal error was recorded (by `fail` or `fail_in_signal`), read without
    /// locking.
    failed: AtomicBool,
    /// Forked children a handler refused (it may not log): the fork service logs them.
    pub refused_unlogged: AtomicU64,
    /// Set once `start` has returned the pager: a start that fails poisons nothing (the
    /// embedder gets the error, and the memory as it was).
    pub serving: AtomicBool,
    /// Poison every page not yet placed on a fatal error (the default).
    pub poison_on_fatal: bool,
    /// An ENOENT for a page of a mapped region means the process took the range back
    /// without an event (`PagerBuilder::silent_unmaps`, on a uffd without UNMAP and REMAP
    /// events): the page is left to it.
    pub silent_unmaps: bool,
    /// Written once the pager has stopped and settled (pages poisoned after a fatal
    /// error): what an embedder polls or waits on.
    stopped: EventFd,
    /// Taken by whoever settles the stop; true once done.
    settled: Mutex<bool>,
    /// Memory the pager was given as mappings (and the aliases it made): kept mapped while
    /// anything may place pages into it.
    pub keep: Vec<Arc<Mapping>>,
    /// When each fault answered `Pending` arrived, so its latency is counted when its page
    /// is placed (see `PendingFaults`).
    pub pending: PendingFaults,
    /// A failure inside the SIGBUS handler, which may not lock: errno and image offset.
    signal_errno: AtomicI32,
    signal_offset: AtomicU64,
}

impl Shared {
    pub fn new(
        uffd: Uffd,
        regions: RegionTable,
        states: PageStateMap,
        source: Arc<dyn Source>,
        record: bool,
        fault_around: usize,
        readahead: bool,
    ) -> Result<Self> {
        let needs_zeros = regions
            .regions()
            .iter()
            .any(|r| r.spec.kind.is_hugetlb() || r.spec.resolve != Resolve::Copy);
        let eventfd = || {
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| Error::Io {
                    what: "eventfd",
                    source: e.into(),
                })
        };
        let (wakeup, stopped, bell) = (eventfd()?, eventfd()?, eventfd()?);
        let pages = regions.pages();
        let zeros = vec![
            0u8;
            if needs_zeros {
                regions.max_page_size()
            } else {
                0
            }
        ];
        Ok(Self {
            gate: Gate::new(uffd.features().contains(Features::EVENT_REMOVE)),
            uffd,
            states,
            removed: Bitmap::new(pages),
            dropped: Bitmap::new(pages),
            background: Bitmap::new(pages),
            source,
            stats: Stats::default(),
            stop: AtomicBool::new(false),
            wakeup,
            gone: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            cursor: AtomicUsize::new(0),
            recorder: record.then(|| Recorder::new(pages)),
            fault_around,
            around_next: AtomicUsize::new(usize::MAX),
            around_window: AtomicUsize::new(fault_around),
            readahead,
            remote: AtomicBool::new(false),
            pending_is_fatal: false,
            parent: None,
            bell,
            watched: AtomicUsize::new(0),
            zeros: zeros.into_boxed_slice(),
            fatal: Mutex::new(None),
            failed: AtomicBool::new(false),
            serving: AtomicBool::new(false),
            refused_unlogged: AtomicU64::new(0),
            poison_on_fatal: true,
            silent_unmaps: false,
            stopped,
            settled: Mutex::new(false),
            keep: Vec::new(),
            pending: PendingFaults::default(),
            signal_errno: AtomicI32::new(0),
            signal_offset: AtomicU64::new(0),
            regions,
        })
    }

    /// A handler thread entered its loop. Release: pairs with `running`'s Acquire.
    pub fn handler_running(&self) {
        self.running.fetch_add(1, Ordering::Release);
    }

    /// Handler threads in their loops.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Whether threads should stop. Relaxed: the flag carries no data; joins synchronise.
    #[inline]
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Asks every thread to stop and wakes the blocked pollers. Async-signal-safe (an
    /// atomic store and `write(2)` to the eventfd).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wakeup.write(1);
        let _ = self.bell.write(1); // waiters on pages look at the stop too
    }

    /// Records a fatal error (the first one wins) and stops. Not for the SIGBUS path.
    pub fn fail(&self, error: Error) {
        log::error!("pager stopping: {error}");
        let mut fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        fatal.get_or_insert(error);
        drop(fatal);
        // Relaxed: the error itself is published by the mutex; this is a lock-free hint.
        self.failed.store(true, Ordering::Relaxed);
        self.request_stop();
    }

    /// Whether a fatal error was recorded.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// [`fail`](Self::fail) for the SIGBUS handler: no lock, no allocation, only atomics;
    /// the error is built when the pager stops.
    pub fn fail_in_signal(&self, offset: u64, errno: i32) {
        self.signal_offset.store(offset, Ordering::Relaxed);
        // Release: publishes the offset with the errno that `take_fatal` reads first.
        let _ = self.signal_errno.compare_exchange(
            0,
            errno.max(1),
            Ordering::Release,
            Ordering::Relaxed,
        );
        self.failed.store(true, Ordering::Relaxed);
        self.request_stop();
    }

    /// Settles a stop, once, after the threads that serve faults have left their loops (or
    /// as they do): after a fatal error, poisons every page not yet placed so that a
    /// touch raises SIGBUS instead of reading zeros once the uffd is closed; then writes
    /// the `stopped` eventfd. Not for the SIGBUS handler (it locks).
    pub fn settle(&self) {
        if !self.stopping() {
            return;
        }
        let mut settled = self.settled.lock().unwrap_or_else(|p| p.into_inner());
        if *settled {
            return;
        }
        // Relaxed: `start` sets it, then settles again if the pager stopped meanwhile.
        let serving = self.serving.load(Ordering::Relaxed);
        if !serving {
            // A start that fails poisons nothing; one that stopped while starting is
            // settled again by `start` once serving.
            let _ = self.stopped.write(1);
            return;
        }
        if self.failed() && !self.gone.load(Ordering::Relaxed) {
            if self.poison_on_fatal {
                let (poisoned, left) = self.poison_unplaced();
                if left == 0 {
                    self.let_go();
                }
                log::error!(
                    "pager failed: {poisoned} page(s) not yet placed were poisoned (a touch \
                     raises SIGBUS){}",
                    if left > 0 {
                        format!("; {left} could not be poisoned")
                    } else {
                        String::new()
                    }
                );
            } else {
                log::warn!("pager failed; pages not yet placed are left unpoisoned (they will read as zeros once the userfaultfd closes)");
            }
        }
        *settled = true;
        let _ = self.stopped.write(1);
    }

    /// The eventfd that becomes readable once the pager has stopped and settled.
    pub fn stopped_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.stopped.as_fd()
    }

    /// Whether the stop has been settled.
    pub fn is_settled(&self) -> bool {
        *self.settled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fatal error that stopped the pager, if any.
    pub fn take_fatal(&self) -> Option<Error> {
        let fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner()).take();
        fatal.or_else(|| {
            // Acquire: pairs with `fail_in_signal`.
            let errno = self.signal_errno.load(Ordering::Acquire);
            (errno != 0).then(|| {
                Error::Source(SourceError {
                    what: "read image in the SIGBUS handler",
                    offset: self.signal_offset.load(Ordering::Relaxed),
                    source: std::io::Error::from_raw_os_error(errno),
                })
            })
        })
    }

    /// Page `page` of the state map, if its region is still mapped.
    #[inline]
    pub fn page(&self, page: usize) -> Option<PageRef> {
        self.regions.by_page(page)
    }

    /// The page holding `addr`, if a mapped region holds it.
    #[inline]
    pub fn page_at(&self, addr: usize) -> Option<PageRef> {
        self.regions.by_addr(addr)
    }

    /// Marks the image's known-zero ranges Zero for pages still Missing (a seeded page
    /// already Received stays so).
    pub fn mark_known_zero(&self) {
        let zero = self.source.zero_ranges();
        for r in self.regions.regions() {
            let (lo, hi) = (r.spec.image_offset, r.spec.image_offset + r.spec.len as u64);
            let ps = r.spec.page_size as u64;
            for z in &zero {
                let (a, b) = (z.start.max(lo), z.end.min(hi));
                if a >= b {
                    continue;
                }
                // Whole pages only.
                let first = r.first_page + (a - lo).div_ceil(ps) as usize;
                let last = r.first_page + ((b - lo) / ps) as usize;
                for page in first..last {
                    if self.states.get(page) == Ok(PageState::Missing) {
                        let _ = self.states.mark_zero(page);
                    }
                }
            }
        }
    }

    /// Whether every page of the regions still mapped has been placed, and no placement
    /// is still being counted. (An unmapped region's pages are never served again.)
    pub fn complete(&self) -> bool {
        let gone: usize = self
            .regions
            .unmapped()
            .map(|r| {
                let received = self
                    .states
                    .count_range(PageState::Received, r.start, r.end)
                    .unwrap_or(0);
                r.len() - received
            })
            .sum();
        self.states.count(PageState::Received) + gone == self.states.len()
            && self.gate.placing() == 0
    }

    /// The next page in `state` from `from` (wrapping) in a region still mapped: pages of
    /// unmapped regions stay as they were forever, and are skipped.
    pub fn next_servable(&self, state: PageState, from: usize) -> Option<usize> {
        let mut from = from;
        // Each unmapped region is skipped at most once per lap.
        for _ in 0..=self.regions.regions().len() {
            let page = self.states.next_in_state_wrapping(state, from)?;
            if self.page(page).is_some() {
                return Some(page);
            }
            let region = self.regions.pages_of_region(page)?;
            from = if region.end >= self.states.len() {
                0
            } else {
                region.end
            };
        }
        None
    }
}
