//! [`LiveSnapshot`]: a consistent snapshot of memory that keeps being written.
//!
//! Start it and every region is write-protected in one go — that instant (the *cut*) is
//! what the snapshot holds. The workload runs on; workers save the pages in the
//! background; a write to a page not yet saved blocks only the writing thread until a
//! worker has saved that page (write-protect fault → save → un-protect → wake), pages being
//! written first. This is QEMU's background snapshot, with several threads saving and
//! serving faults instead of one migration thread that also scans (whose author measured a
//! tail of 16–255 ms write stalls).
//!
//! The memory may be this process's, or another process's whose userfaultfd came over a
//! socket (read with `process_vm_readv(2)`).
//!
//! A discard after the cut (`madvise(2)` `MADV_DONTNEED`, `MADV_FREE`, `MADV_REMOVE`: glibc
//! trimming an arena, jemalloc purging, a balloon) is seen as a REMOVE event, which the
//! kernel sends before it discards anything (see `discard.rs`). Of pages already saved it
//! changes nothing; of a page not saved yet it fails the snapshot with
//! [`Error::Discarded`] naming the range — its content at the cut is gone (on anonymous
//! memory the zap also drops the write-protection, so later writes would go unseen) —
//! and every writer is released. The event does not say which advice
//! it was, so shmem fails alike, although `MADV_DONTNEED` keeps its content (and
//! markers): only `MADV_REMOVE` punches a hole. Not seen at all: a hole punched or a
//! truncation through the backing file itself (`fallocate(2)`, `ftruncate(2)` on a
//! memfd), which raises no event — a workload that does that cannot be snapshot live.
//! A discard pending while the cut is applied fails the start (`UFFDIO_WRITEPROTECT`
//! answers EAGAIN); taking it again is safe.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use pager::LatencyHistogram;
use uffd_core::{Features, MemoryKind, RegisterMode, Uffd, WriteProtectMode};

use crate::engine::{spawn_threads, Engine};
use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::region::{Region, Regions};
use crate::sink::PageSink;

/// The default background batch: large enough for few system calls, small enough that a
/// fault on a page a batch has claimed waits little for it.
pub const DEFAULT_BATCH: usize = 64 << 10;

/// The default [`LiveSnapshotBuilder::spin`].
pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);

/// How to take a live snapshot.
#[derive(Debug)]
pub struct LiveSnapshotBuilder {
    regions: Vec<Region>,
    uffd: Option<Uffd>,
    savers: usize,
    handlers: usize,
    saver_nice: Option<i32>,
    batch: usize,
    track_writes: bool,
    spin: Duration,
}

/// A live snapshot being taken (see the module docs). Dropping it before it finished
/// stops the workers and releases the memory (the snapshot is then incomplete).
pub struct LiveSnapshot {
    engine: Arc<Engine>,
    workers: Vec<JoinHandle<()>>,
    started: Instant,
    protect: Duration,
    /// When the last page was saved, once seen.
    saved_at: Option<Duration>,
    released: bool,
}

impl std::fmt::Debug for LiveSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSnapshot")
            .field("pages", &self.engine.regions.pages())
            .field("saved", &self.engine.saved_pages())
            .finish_non_exhaustive()
    }
}

/// What a live snapshot did.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    /// Pages saved.
    pub pages: u64,
    /// Bytes saved.
    pub bytes: u64,
    /// Pages saved by a worker serving a write to them.
    pub saved_by_fault: u64,
    /// Pages saved by background batches.
    pub saved_in_background: u64,
    /// Write-protect faults served (including first writes to pages already saved).
    pub faults: u64,
    /// Faults on a page a batch was copying, served once it was saved.
    pub waited_for_batch: u64,
    /// Per fault, from reading it to un-protecting its page (the handler's share of a
    /// writer's stall; the kernel's wake-up comes on top).
    pub fault_service: LatencyHistogram,
    /// Time to write-protect every region: the cut.
    pub protect: Duration,
    /// From the start to the last page saved.
    pub elapsed: Duration,
}

impl LiveSnapshotBuilder {
    /// Adds a region.
    pub fn region(mut self, region: Region) -> Self {
        self.regions.push(region);
        self
    }

    /// Uses `uffd` instead of opening one: a userfaultfd of another process, received over
    /// a socket (see [`LiveSnapshotBuilder::start_remote`]). It must have been negotiated
    /// without `WP_ASYNC`, with `EVENT_REMOVE` (a discard must not go unseen: see the
    /// module docs), `WP_UNPOPULATED` for anonymous memory and `WP_HUGETLBFS_SHMEM` for
    /// shmem or hugetlb; the snapshot registers the regions in WP
    /// mode on it (replacing any mode they had) and reads all its events while it runs.
    pub fn uffd(mut self, uffd: Uffd) -> Self {
        self.uffd = Some(uffd);
        self
    }

    /// Threads saving background batches (default: one per CPU this process may use but
    /// one, at least one — a CPU left for the writers and the fault handler: with a saver
    /// on every CPU, a woken writer queues behind one, and on 2 CPUs the p99 of blocked
    /// writes doubles).
    pub fn savers(mut self, n: usize) -> Self {
        self.savers = n.max(1);
        self
    }

    /// Threads serving write faults (default one; more help when many writers fault at
    /// once on many CPUs). A handler keeps polling for a while after a fault (a released
    /// writer often takes the next at once): two of them spinning on 2 CPUs took the
    /// writers' CPU and doubled the p99 of blocked writes.
    pub fn handlers(mut self, n: usize) -> Self {
        self.handlers = n.max(1);
        self
    }

    /// The savers' nice value (default 10; `None` leaves them at the caller's priority):
    /// below the workload's, so that a writer woken from a fault, and the handler that
    /// wakes it, preempt background saving instead of queueing behind it.
    pub fn saver_nice(mut self, nice: Option<i32>) -> Self {
        self.saver_nice = nice;
        self
    }

    /// How long a fault handler keeps polling after serving a fault before it sleeps
    /// (default [`DEFAULT_SPIN`]; zero: sleep at once). A writer released from one fault
    /// often faults again at once; a handler still looking saves it a wake-up.
    pub fn spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }

    /// Bytes a background batch saves at once (default [`DEFAULT_BATCH`]; at least a page).
    pub fn batch(mut self, bytes: usize) -> Self {
        self.batch = bytes;
        self
    }

    /// Keeps saved pages protected and records every page written after the cut, for an
    /// incremental chain to start from (see [`crate::Chain::from_live`]). Each page's first
    /// write after the cut then faults once even after it was saved (no save, only the
    /// record), until the chain takes over.
    pub fn track_writes(mut self, on: bool) -> Self {
        self.track_writes = on;
        self
    }

    /// Snapshots memory of this process into `sink`: returns once the cut is applied.
    ///
    /// # Safety
    /// The regions are mapped, readable memory of this process that stays mapped until the
    /// snapshot is finished or dropped, and no other userfaultfd is registered on them.
    /// (Writes by any thread are fine: that is the point.)
    pub unsafe fn start(self, sink: Arc<dyn PageSink>) -> Result<LiveSnapshot> {
        self.start_with(Memory::ThisProcess, sink)
    }

    /// Snapshots memory of process `pid` through the userfaultfd it handed over
    /// ([`LiveSnapshotBuilder::uffd`]). Its pages are read with `process_vm_readv(2)`:
    /// ranges it unmaps meanwhile fail the snapshot cleanly (and release the rest).
    pub fn start_remote(self, pid: u32, sink: Arc<dyn PageSink>) -> Result<LiveSnapshot> {
        if self.uffd.is_none() {
            return Err(Error::Region {
                index: 0,
                reason: "another process's memory needs its userfaultfd (builder.uffd)",
            });
        }
        self.start_with(Memory::Process(Pid::from_raw(pid as i32)), sink)
    }

    fn start_with(self, memory: Memory, sink: Arc<dyn PageSink>) -> Result<LiveSnapshot> {
        let regions = Regions::new(&self.regions)?;
        let needed = needed_features(&self.regions);
        let uffd = match self.uffd {
            Some(uffd) => {
                check_features(&uffd, needed)?;
                uffd.set_non_blocking(true)
                    .map_err(Error::uffd("make the userfaultfd non-blocking"))?;
                uffd
            }
            None => Uffd::builder()
                .non_blocking(true)
                .require(needed)
                .open()
                .map_err(|e| match e {
                    uffd_core::Error::Unsupported { missing, .. } => {
                        Error::MissingFeatures { missing }
                    }
                    e => Error::uffd("open a userfaultfd")(e),
                })?,
        };
        let engine = Arc::new(Engine::new(
            uffd,
            regions,
            memory,
            sink,
            self.batch,
            self.track_writes,
            self.spin,
        )?);
        let started = Instant::now();
        // From the first registration on, a failure must undo what was done: the engine's
        // release and unregister do (through `LiveSnapshot`'s drop once it exists).
        register_and_protect(&engine)?;
        let protect = started.elapsed();
        let workers = match spawn_threads(&engine, self.handlers, self.savers, self.saver_nice) {
            Ok(w) => w,
            Err(e) => {
                engine.request_stop(); // the threads that did start return
                engine.release_all();
                unregister(&engine);
                return Err(e);
            }
        };
        log::debug!(
            "live snapshot: {} pages write-protected in {protect:?}; {} fault handler(s), {} saver(s)",
            engine.regions.pages(),
            self.handlers,
            self.savers
        );
        Ok(LiveSnapshot {
            engine,
            workers,
            started,
            protect,
            saved_at: None,
            released: false,
        })
    }
}

/// The features the regions' memory needs: write-protect, and the REMOVE events that
/// tell of discards.
fn needed_features(regions: &[Region]) -> Features {
    let mut f = Features::EVENT_REMOVE;
    for r in regions {
        f |= match r.kind {
            MemoryKind::Anon => Features::WP_UNPOPULATED,
            _ => Features::WP_HUGETLBFS_SHMEM,
        };
    }
    f
}

fn check_features(uffd: &Uffd, needed: Features) -> Result<()> {
    if uffd.features().contains(Features::WP_ASYNC) {
        return Err(Error::AsyncWriteProtect);
    }
    let missing = needed - uffd.features();
    if !missing.is_empty() {
        return Err(Error::MissingFeatures { missing });
    }
    Ok(())
}

/// Registers every region in WP mode and protects it: the cut. Undone on failure.
fn register_and_protect(engine: &Engine) -> Result<()> {
    let list = engine.regions.list();
    for (i, n) in list.iter().enumerate() {
        if let Err(e) = engine
            .uffd
            .register(n.region.addr, n.region.len, RegisterMode::WP)
        {
            for m in &list[..i] {
                let _ = engine.uffd.unregister(m.region.addr, m.region.len);
            }
            return Err(Error::uffd("register for write-protect")(e));
        }
    }
    for n in list {
        if let Err(e) = engine
            .uffd
            .write_protect(n.region.addr, n.region.len, WriteProtectMode::WP)
        {
            engine.release_all();
            unregister(engine);
            return Err(Error::uffd("write-protect")(e));
        }
    }
    Ok(())
}

/// Unregisters every region (the memory is plain memory again).
pub(crate) fn unregister(engine: &Engine) {
    for n in engine.regions.list() {
        if let Err(e) = engine.uffd.unregister(n.region.addr, n.region.len) {
            log::warn!("unregister {:#x}+{:#x}: {e}", n.region.addr, n.region.len);
        }
    }
}

/// Default saver count: the CPUs this process may use but one, at least one.
fn default_savers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().saturating_sub(1))
        .max(1)
}

impl LiveSnapshot {
    /// A builder with no regions, [`DEFAULT_BATCH`], one fault handler and a saver per CPU
    /// but one.
    pub fn builder() -> LiveSnapshotBuilder {
        LiveSnapshotBuilder {
            regions: Vec::new(),
            uffd: None,
            savers: default_savers(),
            handlers: 1,
            saver_nice: Some(10),
            spin: DEFAULT_SPIN,
            batch: DEFAULT_BATCH,
            track_writes: false,
        }
    }

    /// Pages saved so far, and in all.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.engine.saved_pages() as u64,
            self.engine.regions.pages() as u64,
        )
    }

    /// Bytes the regions hold.
    pub fn bytes(&self) -> u64 {
        self.engine.regions.bytes()
    }

    /// The image length the regions need.
    pub fn image_len(&self) -> u64 {
        self.engine.regions.image_len()
    }

    /// Waits until every page is saved, at most `timeout` (`None`: as long as it takes).
    /// Returns whether all are; a worker's failure comes back as its error.
    pub fn wait_saved(&mut self, timeout: Option<Duration>) -> Result<bool> {
        let until = timeout.map(|t| Instant::now() + t);
        loop {
            if self.engine.failed() {
                return Err(self.stop_with_error());
            }
            if self.engine.all_saved() {
                self.saved_at.get_or_insert_with(|| self.started.elapsed());
                return Ok(true);
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                return Ok(false);
            }
            if self.workers.iter().all(JoinHandle::is_finished) {
                return Err(self.stop_with_error());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Waits until every page is saved, then stops the workers, releases and unregisters
    /// the memory, and reports.
    pub fn finish(mut self) -> Result<SnapshotReport> {
        self.wait_saved(None)?;
        self.stop()?;
        Ok(self.report())
    }

    /// Stops and joins the workers: the first error any of them met, if one did.
    fn join_workers(&mut self) -> Result<()> {
        self.engine.request_stop();
        let panicked = self
            .workers
            .drain(..)
            .map(JoinHandle::join)
            .any(|r| r.is_err());
        match self.engine.take_error() {
            Some(e) => Err(e),
            None if panicked => Err(Error::WorkerPanicked),
            None => Ok(()),
        }
    }

    /// Stops and joins the workers; releases and unregisters the memory.
    fn stop(&mut self) -> Result<()> {
        let joined = self.join_workers();
        if !self.released {
            self.released = true;
            self.engine.release_all();
            unregister(&self.engine);
        }
        joined
    }

    fn stop_with_error(&mut self) -> Error {
        match self.stop() {
            Err(e) => e,
            // Workers gone without an error: only a panic does that.
            Ok(()) => Error::WorkerPanicked,
        }
    }

    /// The report so far.
    pub fn report(&self) -> SnapshotReport {
        let c = &self.engine.counters;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        SnapshotReport {
            pages: self.engine.saved_pages() as u64,
            bytes: self.engine.regions.bytes(),
            saved_by_fault: l(&c.saved_by_fault),
            saved_in_background: l(&c.saved_in_background),
            faults: l(&c.faults),
            waited_for_batch: l(&c.waited_for_batch),
            fault_service: c.service.snapshot(),
            protect: self.protect,
            elapsed: self.saved_at.unwrap_or_else(|| self.started.elapsed()),
        }
    }

    /// For a chain taking over: stops the workers without releasing the memory (the
    /// caller has paused the workload), and hands over the engine.
    pub(crate) fn into_engine(mut self) -> Result<(Arc<Engine>, SnapshotReport)> {
        // On an error, drop releases and unregisters the memory.
        self.join_workers()?;
        let report = self.report();
        self.released = true; // the chain unregisters, under its pause
        Ok((self.engine.clone(), report))
    }
}

impl Drop for LiveSnapshot {
    fn drop(&mut self) {
        if !self.released || !self.workers.is_empty() {
            let _ = self.stop();
        }
    }
}
