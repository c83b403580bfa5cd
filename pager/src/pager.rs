//! The `Pager`: builds the engine, registers regions, starts handler threads in the chosen
//! delivery mode and the prefetcher, and stops them all.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use page_state::PageStateMap;
use uffd_core::{Ioctls, RegisterMode, Uffd};

use crate::engine::{Placer, Shared};
use crate::error::{Error, Result};
use crate::prefetch::{self, Prefetch};
use crate::record;
use crate::region::{RegionSpec, RegionTable, Resolve};
use crate::source::Source;
use crate::stats::StatsSnapshot;
use crate::worker::{Wait, Worker};

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
}

/// Configures and starts a [`Pager`].
pub struct PagerBuilder {
    uffd: Uffd,
    source: Arc<dyn Source>,
    regions: Vec<RegionSpec>,
    mode: DeliveryMode,
    prefetch: Prefetch,
    fault_around: usize,
    record: Option<PathBuf>,
    register: bool,
    batch: usize,
    handler_cpu: Option<usize>,
    prefetch_after_first_fault: bool,
}

/// A running pager: handler threads serving faults on its regions from its source.
///
/// Dropping it stops the threads. Threads blocked on faults the pager never served are
/// released when the uffd is closed (with the `Pager`, if it holds the last reference):
/// the kernel then fills their pages with zeros.
pub struct Pager {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    record: Option<PathBuf>,
    children: Arc<Mutex<Vec<Pager>>>,
    mode: DeliveryMode,
}

/// CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the size matches the set.
    let ok = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads the set within its size.
        .filter(|&c| ok && unsafe { libc::CPU_ISSET(c, &set) })
        .collect();
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is valid; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn ensure_non_blocking(uffd: &Uffd) -> Result<()> {
    let fd = uffd.as_raw_fd();
    // SAFETY: fcntl on an fd we hold.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above; poll on a uffd needs O_NONBLOCK.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(Error::Io {
            what: "make the userfaultfd non-blocking",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl Pager {
    /// Starts configuring a pager for `uffd` (negotiated; opened here or received from
    /// the process whose memory it serves) with pages from `source`.
    pub fn builder(uffd: Uffd, source: Arc<dyn Source>) -> PagerBuilder {
        PagerBuilder {
            uffd,
            source,
            regions: Vec::new(),
            mode: DeliveryMode::default(),
            prefetch: Prefetch::None,
            fault_around: 0,
            record: None,
            register: true,
            batch: 64,
            handler_cpu: None,
            prefetch_after_first_fault: false,
        }
    }
}

impl PagerBuilder {
    /// Adds a region.
    pub fn region(mut self, spec: RegionSpec) -> Self {
        self.regions.push(spec);
        self
    }

    /// Adds regions.
    pub fn regions(mut self, specs: impl IntoIterator<Item = RegionSpec>) -> Self {
        self.regions.extend(specs);
        self
    }

    /// The delivery mode (default [`DeliveryMode::PerCpu`]).
    pub fn mode(mut self, mode: DeliveryMode) -> Self {
        self.mode = mode;
        self
    }

    /// The background prefetcher's plan (default none).
    pub fn prefetch(mut self, prefetch: Prefetch) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Holds the prefetcher back until the first fault has been served (a VMM restoring a
    /// snapshot touches memory first; default off).
    pub fn prefetch_after_first_fault(mut self, wait: bool) -> Self {
        self.prefetch_after_first_fault = wait;
        self
    }

    /// Loads a working-set file and replays it first, then prefetches sequentially.
    pub fn replay(mut self, path: impl Into<PathBuf>) -> Result<Self> {
        let pages = RegionTable::new(&self.regions)?.pages();
        self.prefetch = Prefetch::Replay(record::load(&path.into(), pages)?);
        Ok(self)
    }

    /// Places up to `pages` missing pages after each faulting page (default 0).
    pub fn fault_around(mut self, pages: usize) -> Self {
        self.fault_around = pages;
        self
    }

    /// Records the order of first faults, written to `path` when the pager stops.
    pub fn record(mut self, path: impl Into<PathBuf>) -> Self {
        self.record = Some(path.into());
        self
    }

    /// Whether the pager registers the regions (default) or they already are (a uffd
    /// received from a VMM that registered them).
    pub fn register(mut self, register: bool) -> Self {
        self.register = register;
        self
    }

    /// Pins the handler thread of the single-thread modes (thread, busy-poll, and the
    /// SIGBUS mode's event thread) to `cpu` (default: unpinned). Per-CPU handlers are
    /// always pinned one per CPU.
    pub fn handler_cpu(mut self, cpu: Option<usize>) -> Self {
        self.handler_cpu = cpu;
        self
    }

    /// Events read per `read(2)` (default 64).
    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.max(1);
        self
    }

    /// Validates, registers, marks known-zero pages, and starts the threads.
    pub fn start(self) -> Result<Pager> {
        let table = RegionTable::new(&self.regions)?;
        for r in table.regions() {
            let need = r.spec.image_offset + r.spec.len as u64;
            if need > self.source.len() {
                return Err(Error::ImageTooSmall {
                    need,
                    have: self.source.len(),
                });
            }
        }
        ensure_non_blocking(&self.uffd)?;
        if self.mode == DeliveryMode::Sigbus {
            if !self.uffd.features().contains(uffd_core::Features::SIGBUS) {
                return Err(Error::Mode {
                    mode: "sigbus",
                    reason: "the userfaultfd was not negotiated with the SIGBUS feature".into(),
                });
            }
            if !self.source.is_signal_safe() {
                return Err(Error::Mode {
                    mode: "sigbus",
                    reason: "the source cannot answer inside a signal handler (use a memory \
                             or mmap source)"
                        .into(),
                });
            }
        }
        if self.register {
            for r in table.regions() {
                let (mode, needed) = match r.spec.resolve {
                    Resolve::Copy => (RegisterMode::MISSING, Ioctls::COPY),
                    // MINOR alone never faults on pages absent from the page cache (they
                    // read as zero), so both kinds are registered; both are resolved by
                    // staging the page in the cache and CONTINUE.
                    Resolve::Continue { .. } => (
                        RegisterMode::MISSING | RegisterMode::MINOR,
                        Ioctls::CONTINUE,
                    ),
                };
                let ioctls = self.uffd.register(r.spec.base, r.spec.len, mode)?;
                if !ioctls.contains(needed) {
                    return Err(Error::BadRegion {
                        base: r.spec.base,
                        len: r.spec.len,
                        reason: "the kernel does not allow the placement ioctl on this range",
                    });
                }
            }
        }
        let max_page = table
            .regions()
            .iter()
            .map(|r| r.spec.page_size)
            .max()
            .unwrap_or(4096);
        let source = self.source.clone();
        let shared = Arc::new(Shared::new(
            self.uffd,
            table,
            self.source,
            self.record.is_some(),
            self.fault_around,
        )?);
        shared.mark_known_zero();
        let placer = Placer {
            shared: Arc::downgrade(&shared),
        };
        source.attach(placer);

        let children: Arc<Mutex<Vec<Pager>>> = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        let spawn_worker = |cpu: Option<usize>, wait: Wait, name: String| {
            let shared = shared.clone();
            let children = children.clone();
            let specs = self.regions.clone();
            let (batch, source) = (self.batch, source.clone());
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        let _ = pin_to_cpu(cpu);
                    }
                    let on_fork = |child: Uffd| {
                        // A forked child's copy of the regions: serve it with its own
                        // engine (same source, one handler thread).
                        let child = Pager::builder(child, source.clone())
                            .regions(specs.iter().copied())
                            .mode(DeliveryMode::Thread)
                            .register(false)
                            .start();
                        if let Ok(child) = child {
                            children
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(child);
                        }
                    };
                    Worker::new(shared, batch, max_page).run(wait, &on_fork);
                })
                .map_err(|source| Error::Io {
                    what: "spawn handler thread",
                    source,
                })
        };
        match self.mode {
            DeliveryMode::Thread => threads.push(spawn_worker(
                self.handler_cpu,
                Wait::Block,
                "uffd-handler".into(),
            )?),
            DeliveryMode::BusyPoll => threads.push(spawn_worker(
                self.handler_cpu,
                Wait::Spin,
                "uffd-busypoll".into(),
            )?),
            DeliveryMode::PerCpu => {
                for cpu in allowed_cpus() {
                    threads.push(spawn_worker(
                        Some(cpu),
                        Wait::Block,
                        format!("uffd-cpu{cpu}"),
                    )?);
                }
            }
            DeliveryMode::Sigbus => {
                crate::sigbus::install(shared.clone(), 2 * allowed_cpus().len(), max_page)?;
                threads.push(spawn_worker(
                    self.handler_cpu,
                    Wait::Block,
                    "uffd-events".into(),
                )?);
            }
        }
        if self.prefetch != Prefetch::None {
            let (shared, plan) = (shared.clone(), self.prefetch);
            let after_first_fault = self.prefetch_after_first_fault;
            threads.push(
                std::thread::Builder::new()
                    .name("uffd-prefetch".into())
                    .spawn(move || {
                        while after_first_fault
                            && shared.stats.snapshot().placed() == 0
                            && !shared.stopping()
                        {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        prefetch::run(shared, plan, max_page)
                    })
                    .map_err(|source| Error::Io {
                        what: "spawn prefetcher",
                        source,
                    })?,
            );
        }
        Ok(Pager {
            shared,
            threads,
            record: self.record,
            children,
            mode: self.mode,
        })
    }
}

impl Pager {
    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// A handle for placing pages that arrive from a remote source.
    pub fn placer(&self) -> Placer {
        Placer {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// The page state map.
    pub fn states(&self) -> &PageStateMap {
        &self.shared.states
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

    /// Whether the pager stopped by itself (process gone, or a fatal source error).
    pub fn has_stopped(&self) -> bool {
        self.shared.stopping()
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

    fn join(&mut self) {
        self.shared.request_stop();
        if self.mode == DeliveryMode::Sigbus {
            crate::sigbus::uninstall();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for child in self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            child.join();
        }
    }

    /// Stops every thread, writes the recorded working set if asked, and returns the
    /// final counters, or the fatal error that stopped the pager early.
    pub fn stop(mut self) -> Result<StatsSnapshot> {
        self.join();
        if let Some(path) = &self.record {
            if let Some(rec) = &self.shared.recorder {
                record::save(path, &rec.pages())?;
            }
        }
        let fatal = self
            .shared
            .fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match fatal {
            Some(e) => Err(e),
            None => Ok(self.stats()),
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.join();
    }
}
