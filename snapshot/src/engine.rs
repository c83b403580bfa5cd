//! The threads of a live snapshot.
//!
//! - **Fault handlers** (normal priority, asleep in `poll(2)` on the userfaultfd and a stop
//!   eventfd) serve each write-protect fault as it comes: capture the page if no one has
//!   (claim it in `claimed`, copy it into the handler's buffer, mark it `captured`), or
//!   wait the few microseconds until whoever claimed it has; then un-protect it, which
//!   wakes the writer, and only then hand the copy to the sink (a sink write, which may
//!   wait on the file's lock behind a saver's, is never part of a writer's stall). A page
//!   is never un-protected before it is captured, so every page is saved as it was at the
//!   cut. Written pages first: a handler never does background work.
//! - **Savers** (at a lower priority, so that a woken writer or handler gets a CPU at once)
//!   take background batches of the regions in order: claim the pages no one has, capture
//!   each run of them with one copy, un-protect the run (unless writes are tracked for a
//!   chain: then captured pages stay protected, and their first write later faults once,
//!   costing no copy, to be recorded as written), and write it to the sink with one call.
//!   Handlers serve until the snapshot is finished: a REMOVE event (a discard, see
//!   [`crate::discard`]) holds the discarding thread until it is read.
//!
//! Nothing is un-protected until the whole cut has been applied (the threads start after
//! it), which is what makes the result a consistent cut across pages: a writer that
//! blocked on a page protected early cannot go on to write, unnoticed, a page protected
//! later.
//!
//! A discard of a page not yet captured fails the snapshot (its content at the cut is
//! gone); of a captured page it is only recorded as a write (for a chain).
//!
//! On any failure the engine releases everything at once (un-protect with wake over every
//! region), so no writer is ever left blocked on a snapshot that will not complete.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use page_state::Bitmap;
use pager::AtomicLatencyHistogram;
use uffd_core::{EventBuffer, Uffd, WriteProtectMode};

use crate::discard::{CopyCheck, Discards};
use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::region::{Batch, Page, Regions};
use crate::sink::PageSink;

/// Counters; Relaxed: statistics, read for reports only.
#[derive(Default)]
pub(crate) struct Counters {
    pub faults: AtomicU64,
    pub saved_by_fault: AtomicU64,
    pub saved_in_background: AtomicU64,
    /// Faults on a page a background batch was copying: served once it was saved.
    pub waited_for_batch: AtomicU64,
    /// Faults outside every region (a range of a received uffd that is not ours).
    pub foreign: AtomicU64,
    /// From reading a fault to un-protecting its page.
    pub service: AtomicLatencyHistogram,
}

/// What the workers share.
pub(crate) struct Engine {
    pub uffd: Uffd,
    pub regions: Regions,
    pub memory: Memory,
    pub sink: Arc<dyn PageSink>,
    /// A page someone is capturing or has captured: set once, by the one who captures it.
    pub(crate) claimed: Bitmap,
    /// A page whose content at the cut is copied out: only then may it be un-protected.
    pub(crate) captured: Bitmap,
    /// Pages written or discarded since the cut (chains only).
    pub written: Option<Bitmap>,
    /// Reads of REMOVE events against copies (see [`crate::discard`]).
    pub(crate) discards: Discards,
    batches: Vec<Batch>,
    batch_bytes: usize,
    max_page: usize,
    /// How long a handler keeps looking for faults after serving one.
    spin: Duration,
    next_batch: AtomicUsize,
    /// Pages written to the sink.
    stored_pages: AtomicUsize,
    stop: AtomicBool,
    wakeup: EventFd,
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
    pub counters: Counters,
}

/// One worker's scratch: preallocated, reused for every fault and batch.
pub(crate) struct Scratch {
    pub(crate) events: EventBuffer,
    /// The faults of the last read.
    pub(crate) faults: Vec<usize>,
    buf: Vec<u8>,
    /// Faults read while waiting out an EAGAIN, served next.
    pub(crate) deferred: VecDeque<usize>,
}

/// Events one read takes at most.
pub(crate) const EVENTS_PER_READ: usize = 64;

/// How often releasing a region reads pending events and tries again before giving up
/// (unregistering, which follows, releases the writers anyway).
const RELEASE_TRIES: usize = 1000;

/// How long a worker with nothing to do sleeps before looking at the stop flag again
/// (a stop also writes the eventfd, so this only bounds a lost wake-up).
const IDLE_TICK: Duration = Duration::from_millis(100);

impl Engine {
    pub fn new(
        uffd: Uffd,
        regions: Regions,
        memory: Memory,
        sink: Arc<dyn PageSink>,
        batch_bytes: usize,
        track_writes: bool,
        spin: Duration,
    ) -> Result<Engine> {
        let pages = regions.pages();
        let wakeup =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| Error::System {
                    what: "create the snapshot's wake-up eventfd",
                    source: e.into(),
                })?;
        Ok(Engine {
            batches: regions.batches(batch_bytes),
            batch_bytes: batch_bytes.max(regions.max_page_size()),
            max_page: regions.max_page_size(),
            spin,
            uffd,
            memory,
            sink,
            claimed: Bitmap::new(pages),
            captured: Bitmap::new(pages),
            written: track_writes.then(|| Bitmap::new(pages)),
            discards: Discards::new(pages),
            regions,
            next_batch: AtomicUsize::new(0),
            stored_pages: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            wakeup,
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            counters: Counters::default(),
        })
    }

    /// Pages saved (written to the sink) so far.
    pub fn saved_pages(&self) -> usize {
        // Acquire: pairs with the Release add after a sink write, for callers that then
        // read what was saved.
        self.stored_pages.load(Ordering::Acquire)
    }

    /// Whether every page is saved.
    pub fn all_saved(&self) -> bool {
        self.saved_pages() == self.regions.pages()
    }

    /// Whether a worker failed (the error is kept for [`Engine::take_error`]).
    pub fn failed(&self) -> bool {
        // Acquire: a worker that sees the failure also sees the release that went with it.
        self.failed.load(Ordering::Acquire)
    }

    /// The first error, once.
    pub fn take_error(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Asks the workers to return (they finish what they are doing first).
    pub fn request_stop(&self) {
        // Release: a worker seeing the flag sees everything done before the request.
        self.stop.store(true, Ordering::Release);
        let _ = self.wakeup.write(1);
    }

    /// Records the first error, releases every blocked writer and stops the workers.
    pub fn fail(&self, error: Error) {
        log::error!("live snapshot failed: {error}");
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(error);
        self.failed.store(true, Ordering::Release);
        self.release_all();
        self.request_stop();
    }

    /// Un-protects every region (waking whoever waits on one): the snapshot gives up its
    /// hold on the memory.
    ///
    /// A pending event (EAGAIN) is read and let go first: the snapshot is over, and its
    /// sender waits until it is read.
    pub fn release_all(&self) {
        let mut events = EventBuffer::new(EVENTS_PER_READ);
        for n in self.regions.list() {
            let (addr, len) = (n.region.addr, n.region.len);
            let mut tries = 0;
            loop {
                match self
                    .uffd
                    .write_protect(addr, len, WriteProtectMode::empty())
                {
                    Ok(()) => break,
                    Err(uffd_core::Error::Again { .. }) if tries < RELEASE_TRIES => {
                        tries += 1;
                        self.let_go_events(&mut events);
                    }
                    Err(e) => {
                        log::warn!("releasing {addr:#x}+{len:#x}: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// A fault handler: serves faults until stopped (or, unless writes are tracked, until
    /// every page is saved).
    pub fn run_handler(&self) {
        let mut s = Scratch {
            events: EventBuffer::new(EVENTS_PER_READ),
            faults: Vec::with_capacity(EVENTS_PER_READ),
            buf: vec![0; self.max_page],
            deferred: VecDeque::new(),
        };
        if let Err(e) = self.handle(&mut s) {
            self.fail(e);
        }
    }

    fn handle(&self, s: &mut Scratch) -> Result<()> {
        // When the last fault was served: for a while after it the handler keeps looking
        // instead of sleeping (a writer released from one fault often takes the next at
        // once, and a sleeping handler costs it a wake-up on top).
        let mut last = Instant::now();
        loop {
            while let Some(addr) = s.deferred.pop_front() {
                self.serve_fault(addr, s)?;
            }
            s.faults.clear();
            if self.read_events(s, false)? {
                for i in 0..s.faults.len() {
                    let addr = s.faults[i];
                    self.serve_fault(addr, s)?;
                }
                last = Instant::now();
                continue;
            }
            if last.elapsed() < self.spin {
                std::hint::spin_loop();
                continue;
            }
            // Acquire: pairs with request_stop.
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            self.sleep()?;
        }
    }

    /// A saver: saves background batches until none is left (or stopped).
    pub fn run_saver(&self, nice: Option<i32>) {
        if let Some(nice) = nice {
            lower_priority(nice);
        }
        let mut s = Scratch {
            events: EventBuffer::new(1), // unused: savers read no events
            faults: Vec::new(),
            buf: vec![0; self.batch_bytes],
            deferred: VecDeque::new(),
        };
        loop {
            // Acquire: pairs with request_stop.
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            match self.save_next_batch(&mut s) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return self.fail(e),
            }
        }
    }

    /// Waits in poll(2) for a fault or a stop.
    fn sleep(&self) -> Result<()> {
        let mut fds = [
            PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.wakeup.as_fd(), PollFlags::POLLIN),
        ];
        let tick = PollTimeout::try_from(IDLE_TICK).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, tick) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(Error::uffd("poll the userfaultfd")(uffd_core::Error::Os {
                op: uffd_core::Op::Poll,
                errno: e,
            })),
        }
    }

    /// Serves one write-protect fault (see the module docs).
    fn serve_fault(&self, addr: usize, s: &mut Scratch) -> Result<()> {
        let read = Instant::now();
        let c = &self.counters;
        let Some(page) = self.regions.page_at(addr) else {
            if c.foreign.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!("a fault at {addr:#x} outside every region: not ours to serve");
            }
            return Ok(());
        };
        c.faults.fetch_add(1, Ordering::Relaxed);
        let ours = !self.claimed.set(page.index);
        if ours {
            self.capture(page, 1, s)?;
            c.saved_by_fault.fetch_add(1, Ordering::Relaxed);
        } else if !self.captured.test(page.index) {
            c.waited_for_batch.fetch_add(1, Ordering::Relaxed);
            self.wait_captured(page.index);
        }
        if let Some(w) = &self.written {
            w.set(page.index);
        }
        self.unprotect(page.addr, page.size, Some(s))?;
        c.service.record(read.elapsed());
        if ours {
            self.store(page, 1, s)?; // the writer runs on meanwhile
        }
        Ok(())
    }

    /// Spins until the batch that claimed page `index` has captured it (a copy of one
    /// batch at most), or the snapshot failed (then everything is released anyway).
    fn wait_captured(&self, index: usize) {
        let mut spins = 0u32;
        while !self.captured.test(index) && !self.failed() {
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Copies `count` claimed pages of one region starting at `first` into the scratch
    /// buffer with one read, and marks them captured: from now on they may be released.
    /// A copy a discard may have reached fails the snapshot (see [`crate::discard`]).
    fn capture(&self, first: Page, count: usize, s: &mut Scratch) -> Result<()> {
        let len = first.size * count;
        let pages = first.index..first.index + count;
        let ticket = self.discards.before_copy();
        self.memory.read(first.addr, &mut s.buf[..len])?;
        let give_up = || self.failed() || self.stop.load(Ordering::Acquire);
        if self.discards.after_copy(ticket, pages.clone(), give_up) != CopyCheck::HoldsTheCut {
            return Err(Error::Discarded {
                addr: first.addr,
                len,
            });
        }
        for i in pages {
            self.captured.set(i);
        }
        Ok(())
    }

    /// Writes the pages [`Engine::capture`] copied to the sink.
    fn store(&self, first: Page, count: usize, s: &Scratch) -> Result<()> {
        let len = first.size * count;
        self.sink
            .write(first.offset, &s.buf[..len])
            .map_err(|source| Error::Sink {
                offset: first.offset,
                len,
                source,
            })?;
        // Release: whoever counts all pages saved also sees them in the sink.
        self.stored_pages.fetch_add(count, Ordering::Release);
        Ok(())
    }

    /// Claims and saves the next background batch's unclaimed pages. Returns false when no
    /// batch is left.
    fn save_next_batch(&self, s: &mut Scratch) -> Result<bool> {
        // Relaxed: a ticket; each batch is handed out once.
        let b = self.next_batch.fetch_add(1, Ordering::Relaxed);
        let Some(&batch) = self.batches.get(b) else {
            return Ok(false);
        };
        let end = batch.start + batch.count;
        let mut k = batch.start;
        while k < end {
            let first = self.regions.page(batch.region, k);
            if self.claimed.set(first.index) {
                k += 1; // a fault saved it already
                continue;
            }
            let mut n = 1;
            while k + n < end && !self.claimed.set(first.index + n) {
                n += 1;
            }
            self.capture(first, n, s)?;
            if self.written.is_none() {
                self.unprotect(first.addr, first.size * n, None)?;
            }
            self.store(first, n, s)?;
            self.counters
                .saved_in_background
                .fetch_add(n as u64, Ordering::Relaxed);
            // Page k + n (if inside the batch) was claimed by someone else: skip it too.
            k += n + 1;
        }
        Ok(true)
    }

    /// Un-protects `[addr, addr + len)` and wakes its writers. An EAGAIN (an address-space
    /// event such as a REMOVE is pending) is waited out: a handler
    /// (`events` given) reads the events itself and defers the faults among them; a saver
    /// yields until a handler has read them.
    fn unprotect(&self, addr: usize, len: usize, mut events: Option<&mut Scratch>) -> Result<()> {
        loop {
            match self
                .uffd
                .write_protect(addr, len, WriteProtectMode::empty())
            {
                Ok(()) => return Ok(()),
                Err(uffd_core::Error::Again { .. }) => {
                    if let Some(s) = events.as_deref_mut() {
                        self.read_events(s, true)?;
                    }
                    // Acquire: pairs with request_stop.
                    if self.stop.load(Ordering::Acquire) {
                        return Ok(()); // stopping releases everything anyway
                    }
                    std::thread::yield_now();
                }
                Err(e) => return Err(Error::uffd("un-protect a saved page")(e)),
            }
        }
    }
}

/// Lowers the calling thread's priority to `nice` (`setpriority(2)` on its thread id), so
/// that writers and fault handlers preempt it. Failure only costs latency: logged.
fn lower_priority(nice: i32) {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        log::debug!("saver priority: {}", std::io::Error::last_os_error());
    }
}

/// Spawns `handlers` fault handlers and `savers` savers (at `nice`) on `engine`.
pub(crate) fn spawn_threads(
    engine: &Arc<Engine>,
    handlers: usize,
    savers: usize,
    nice: Option<i32>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name)
            .spawn(f)
            .map_err(|source| Error::System {
                what: "start a snapshot thread",
                source,
            })
    };
    let mut threads = Vec::new();
    for i in 0..handlers.max(1) {
        let e = engine.clone();
        threads.push(spawn(
            format!("snap-fault-{i}"),
            Box::new(move || e.run_handler()),
        )?);
    }
    for i in 0..savers.max(1) {
        let e = engine.clone();
        threads.push(spawn(
            format!("snap-save-{i}"),
            Box::new(move || e.run_saver(nice)),
        )?);
    }
    Ok(threads)
}
