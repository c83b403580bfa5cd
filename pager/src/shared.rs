//! The engine's state, shared by every handler thread, the prefetcher, the SIGBUS handler
//! and the placement handle. Nothing in it is behind a lock on the fault path: the region
//! table, the page states, the removed-in-flight set, the gate and the counters are all
//! atomics. The only lock is the slot for the first fatal error, taken once, off the
//! SIGBUS path (which reports through atomics, see [`Shared::fail_in_signal`]).

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::eventfd::{EfdFlags, EventFd};
use page_state::{Bitmap, PageState, PageStateMap};
use uffd_core::{Features, Uffd};

use crate::error::{Error, Result, SourceError};
use crate::gate::Gate;
use crate::record::Recorder;
use crate::region::{PageRef, RegionTable, Resolve};
use crate::source::Source;
use crate::stats::Stats;

/// State shared by all the pager's threads.
pub(crate) struct Shared {
    pub uffd: Uffd,
    pub regions: RegionTable,
    pub states: PageStateMap,
    /// Pages a REMOVE hit while a claimant (or an arrival) was bringing them in: whoever
    /// places one next places zeros instead, and clears the bit.
    pub removed: Bitmap,
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
    /// Set once the source answers `Pending` (see `Shared::is_remote`).
    pub remote: AtomicBool,
    /// Zeros for placing zero pages where ZEROPAGE is unavailable (hugetlb, minor mode).
    pub zeros: Box<[u8]>,
    /// The first fatal error (a failing source); the pager stops on it.
    fatal: Mutex<Option<Error>>,
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
        let wakeup =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| Error::Io {
                    what: "eventfd",
                    source: e.into(),
                })?;
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
            zeros: zeros.into_boxed_slice(),
            fatal: Mutex::new(None),
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
    }

    /// Records a fatal error (the first one wins) and stops. Not for the SIGBUS path.
    pub fn fail(&self, error: Error) {
        log::error!("pager stopping: {error}");
        let mut fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        fatal.get_or_insert(error);
        drop(fatal);
        self.request_stop();
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
        self.request_stop();
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

    /// Whether every page has been placed, and no placement is still being counted.
    pub fn complete(&self) -> bool {
        self.states.count(PageState::Received) == self.states.len() && self.gate.placing() == 0
    }
}
