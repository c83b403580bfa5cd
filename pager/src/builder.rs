//! [`PagerBuilder`]: validates the configuration, registers the regions, builds the engine
//! and starts its threads in the chosen delivery mode.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use page_state::{PageState, PageStateMap};
use uffd_core::{Features, Ioctls, Mapping, RegisterMode, Uffd};

use crate::cpu::{allowed_cpus, pin_to_cpu};
use crate::error::{Error, Result};
use crate::fork::{self, ChildPlan, ForkQueue};
use crate::pager::{DeliveryMode, Pager};
use crate::placer::Placer;
use crate::prefetch::{self, Prefetch};
use crate::record;
use crate::region::{RegionSpec, RegionTable, Resolve};
use crate::shared::Shared;
use crate::source::Source;
use crate::thread::spawn;
use crate::worker::{Wait, Worker};

/// Child engines alive at once by default; further forked children are refused.
const MAX_FORK_CHILDREN: usize = 64;

/// A region the pager checked and keeps alive: memory it was given as a [`Mapping`].
struct Owned {
    /// Its index in the builder's regions.
    region: usize,
    memory: Arc<Mapping>,
    /// Resolved in MINOR mode through an alias the pager makes.
    minor: bool,
}

/// Configures and starts a [`Pager`].
pub struct PagerBuilder {
    uffd: Uffd,
    source: Arc<dyn Source>,
    regions: Vec<RegionSpec>,
    owned: Vec<Owned>,
    mode: DeliveryMode,
    prefetch: Prefetch,
    fault_around: usize,
    readahead: bool,
    record: Option<PathBuf>,
    register: bool,
    batch: usize,
    handler_cpu: Option<usize>,
    handler_cpus: Option<Vec<usize>>,
    prefetch_after_first_fault: bool,
    states: Option<PageStateMap>,
    max_fork_children: usize,
    poison_on_fatal: bool,
    check_seeded: bool,
    /// A forked child's engine: probe for the child's exit this often while idle.
    child_probe: Option<Duration>,
    /// A forked child's engine serving from its parent's source (not attached again).
    child_shares_source: bool,
    /// Memory kept alive for a forked child's engine (its parent's mappings).
    keep_alive: Vec<Arc<Mapping>>,
}

impl std::fmt::Debug for PagerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagerBuilder")
            .field("regions", &self.regions)
            .field("mode", &self.mode)
            .field("prefetch", &self.prefetch)
            .field("fault_around", &self.fault_around)
            .finish_non_exhaustive()
    }
}

impl Pager {
    /// Starts configuring a pager for `uffd` (negotiated; opened here or received from
    /// the process whose memory it serves) with pages from `source`.
    pub fn builder(uffd: Uffd, source: Arc<dyn Source>) -> PagerBuilder {
        PagerBuilder {
            uffd,
            source,
            regions: Vec::new(),
            owned: Vec::new(),
            mode: DeliveryMode::default(),
            prefetch: Prefetch::None,
            fault_around: 0,
            readahead: false,
            record: None,
            register: true,
            batch: 64,
            handler_cpu: None,
            handler_cpus: None,
            prefetch_after_first_fault: false,
            states: None,
            max_fork_children: MAX_FORK_CHILDREN,
            poison_on_fatal: true,
            check_seeded: cfg!(debug_assertions),
            child_probe: None,
            child_shares_source: false,
            keep_alive: Vec::new(),
        }
    }
}

impl PagerBuilder {
    /// Adds a region named by address: the pager will write pages into it (and, for a
    /// MINOR region, into its alias).
    ///
    /// # Safety
    ///
    /// The [crate's one contract](crate#safety-what-an-embedder-promises) for `spec`:
    /// until the pager, its placers and its forked children's engines are gone, the
    /// region's range in the address space the userfaultfd serves is memory whose
    /// content the pager decides, and a MINOR region's alias is a shared mapping of the
    /// region's own file, in this process, that nothing else relies on. Where the pager can
    /// check the memory itself, use [`mapping`](Self::mapping) instead.
    pub unsafe fn region(mut self, spec: RegionSpec) -> Self {
        self.regions.push(spec);
        self
    }

    /// Adds regions named by address.
    ///
    /// # Safety
    ///
    /// As [`region`](Self::region), for each of them.
    pub unsafe fn regions(mut self, specs: impl IntoIterator<Item = RegionSpec>) -> Self {
        self.regions.extend(specs);
        self
    }

    /// Adds the whole of `memory` as a region resolved by copy, at `image_offset` in the
    /// image. Safe: the pager keeps the mapping alive while it (or a placer) may place
    /// pages into it, and a [`Mapping`] hands out no references to its bytes.
    pub fn mapping(mut self, memory: Arc<Mapping>, image_offset: u64) -> Self {
        self.regions.push(RegionSpec::new(
            memory.addr(),
            memory.len(),
            memory.kind(),
            image_offset,
        ));
        self.owned.push(Owned {
            region: self.regions.len() - 1,
            memory,
            minor: false,
        });
        self
    }

    /// Adds the whole of a shared `memory` (shmem or hugetlb) as a region resolved in
    /// MINOR mode (`UFFDIO_CONTINUE`); the pager maps its own alias of the file to stage
    /// pages in. `start` refuses memory that is not shared.
    pub fn mapping_minor(mut self, memory: Arc<Mapping>, image_offset: u64) -> Self {
        // The alias is made at start, where its failure can be returned.
        self.regions.push(RegionSpec::new(
            memory.addr(),
            memory.len(),
            memory.kind(),
            image_offset,
        ));
        self.owned.push(Owned {
            region: self.regions.len() - 1,
            memory,
            minor: true,
        });
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
    /// The regions must be added first (the file is checked against their pages).
    pub fn replay(mut self, path: impl Into<PathBuf>) -> Result<Self> {
        let pages = RegionTable::new(&self.regions)?.pages();
        self.prefetch = Prefetch::Replay(record::load(&path.into(), pages)?);
        Ok(self)
    }

    /// Places up to `pages` missing pages after each faulting page, with the same fetch
    /// and one ioctl (default 0).
    pub fn fault_around(mut self, pages: usize) -> Self {
        self.fault_around = pages;
        self
    }

    /// Sequential readahead (default off): a fault right after the previous fault-around
    /// run doubles the run, up to 2 MiB, as the kernel's readahead does for files; any
    /// other fault starts again from [`fault_around`](Self::fault_around). A sequential
    /// fault stream then becomes 2 MiB placements, and a random one costs nothing extra.
    pub fn readahead(mut self, on: bool) -> Self {
        self.readahead = on;
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
    /// SIGBUS mode's event thread) to `cpu` (default: unpinned). `start` refuses a CPU
    /// this process may not run on, and per-CPU mode (which takes
    /// [`handler_cpus`](Self::handler_cpus)); a pin that fails fails `start`.
    pub fn handler_cpu(mut self, cpu: Option<usize>) -> Self {
        self.handler_cpu = cpu;
        self
    }

    /// The CPUs per-CPU handlers run on, one pinned handler each (default: every CPU this
    /// process may run on). A VMM gives its own CPU set here. `start` refuses it in any
    /// other mode, and CPUs this process may not run on.
    pub fn handler_cpus(mut self, cpus: impl IntoIterator<Item = usize>) -> Self {
        let mut cpus: Vec<usize> = cpus.into_iter().collect();
        cpus.sort_unstable();
        cpus.dedup();
        self.handler_cpus = Some(cpus);
        self
    }

    /// Events read per `read(2)` (default 64).
    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.max(1);
        self
    }

    /// Seeds the page-state map: pages already in memory (Received) or known zero (Zero)
    /// before the pager starts — e.g. what a migration's precopy placed. The map must
    /// have exactly as many pages as the regions, in region order, and hold only Missing,
    /// Received and Zero pages. The pager owns it from then on; read it through
    /// [`Pager::states`].
    pub fn states(mut self, map: PageStateMap) -> Self {
        self.states = Some(map);
        self
    }

    /// Checks at start that every page seeded Received ([`states`](Self::states)) is in
    /// memory (default: on in debug builds; with `PAGEMAP_SCAN`, Linux 6.7). A page marked
    /// Received that was never written reads as zeros forever: the pager never serves it.
    /// Made only when the pager registers the regions (they are then this process's
    /// memory); copy regions only. Refused with [`Error::SeededNotPresent`].
    pub fn check_seeded(mut self, check: bool) -> Self {
        self.check_seeded = check;
        self
    }

    /// Forked children served at once (with `EVENT_FORK`; default 64). A child forked
    /// while that many are served is refused, as is one whose source cannot serve it
    /// ([`Source::child`](crate::Source::child)): logged, counted
    /// ([`StatsSnapshot::forks_refused`](crate::StatsSnapshot)), its missing pages
    /// poisoned (a touch raises SIGBUS) and its uffd closed.
    pub fn max_fork_children(mut self, children: usize) -> Self {
        self.max_fork_children = children;
        self
    }

    /// Marks this pager as a forked child's engine, probing for the child's exit.
    /// Keeps `memory` mapped while the pager lives.
    pub(crate) fn keep_alive(mut self, memory: Vec<Arc<Mapping>>) -> Self {
        self.keep_alive = memory;
        self
    }

    pub(crate) fn child_of_fork(mut self, probe: Duration, shares_source: bool) -> Self {
        self.child_probe = Some(probe);
        self.child_shares_source = shares_source;
        self
    }

    /// Whether a fatal error poisons every page not yet placed (default: yes). Poisoned
    /// pages raise SIGBUS when touched, even after the uffd is closed; unpoisoned ones
    /// read as zeros once it is, which is memory that is not the guest's. Turn it off
    /// only where the embedder ends the faulting process itself.
    pub fn poison_on_fatal(mut self, poison: bool) -> Self {
        self.poison_on_fatal = poison;
        self
    }

    /// Validates, registers, marks known-zero pages, and starts the threads.
    ///
    /// The uffd is made non-blocking (`O_NONBLOCK`) if it is not: `poll(2)` on a blocking
    /// uffd reports POLLERR. The flag belongs to the open file description, which an
    /// embedder that passed the fd on shares: clearing it again while the pager runs is a
    /// fatal error ([`Error::UffdPoll`]).
    pub fn start(mut self) -> Result<Pager> {
        let keep = self.make_aliases()?;
        let table = RegionTable::new(&self.regions)?;
        self.check(&table)?;
        let seeded = self.states.is_some();
        let states = self.seeded_states(table.pages())?;
        make_non_blocking(&self.uffd)?;
        if self.register {
            self.register_regions(&table)?;
        }
        let mut shared = Shared::new(
            self.uffd,
            table,
            states,
            self.source.clone(),
            self.record.is_some(),
            self.fault_around,
            self.readahead,
        )?;
        shared.keep = keep.clone();
        shared.poison_on_fatal = self.poison_on_fatal;
        shared.pending_is_fatal = self.child_shares_source;
        let shared = Arc::new(shared);
        shared.mark_known_zero();
        if self.check_seeded && seeded && self.register {
            crate::seeded::check_received(&shared)?;
        }
        if !self.child_shares_source {
            // A child's engine that serves from its parent's source does not attach it
            // again (its placer is the parent's).
            let engine: std::sync::Weak<Shared> = Arc::downgrade(&shared);
            self.source.attach(Placer::new(engine));
        }
        // Threads join through the pager: an error past this point stops what started.
        let mut pager = Pager::new(shared.clone(), Vec::new(), self.record.take(), self.mode);
        let forks = if self.child_probe.is_none() {
            let plan = ChildPlan {
                source: self.source.clone(),
                regions: self.regions.clone(),
                keep,
                batch: self.batch,
                max_children: self.max_fork_children,
                poison_on_fatal: self.poison_on_fatal,
            };
            start_fork_service(&shared, plan, &mut pager)?
        } else {
            None // a child's engine: its own children are not served
        };
        let mut workers = 0;
        let mut start_worker = |cpu: Option<usize>, wait: Wait, name: String| {
            let mut worker =
                Worker::new(shared.clone(), self.batch, forks.clone(), self.child_probe);
            let thread = spawn(&shared, name, move |shared| {
                if let Some(cpu) = cpu {
                    if let Err(source) = pin_to_cpu(cpu) {
                        shared.fail(Error::Pin { cpu, source });
                        return;
                    }
                }
                worker.run(wait);
            })?;
            pager.push_thread(thread);
            workers += 1;
            Ok::<_, Error>(())
        };
        match self.mode {
            DeliveryMode::Thread => {
                start_worker(self.handler_cpu, Wait::Block, "uffd-handler".into())?
            }
            DeliveryMode::BusyPoll => {
                start_worker(self.handler_cpu, Wait::Spin, "uffd-busypoll".into())?
            }
            DeliveryMode::PerCpu => {
                for &cpu in self.handler_cpus.as_deref().unwrap_or(&allowed_cpus()) {
                    start_worker(Some(cpu), Wait::Block, format!("uffd-cpu{cpu}"))?;
                }
            }
            DeliveryMode::Sigbus => {
                crate::sigbus::install(shared.clone(), 2 * allowed_cpus().len())?;
                start_worker(self.handler_cpu, Wait::Block, "uffd-events".into())?;
            }
        }
        if let Err(e) = wait_until_running(&shared, workers) {
            drop(pager); // joins what started
            return Err(e);
        }
        if self.prefetch != Prefetch::None {
            prefetch::start(
                &shared,
                self.prefetch,
                self.prefetch_after_first_fault,
                &mut pager,
            )?;
        }
        shared
            .serving
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // A thread that failed while the pager was starting settled without poisoning.
        shared.settle();
        log::debug!(
            "pager started: {} pages in {} region(s), {} mode",
            shared.regions.pages(),
            shared.regions.regions().len(),
            self.mode.name()
        );
        Ok(pager)
    }

    /// Makes the aliases of the MINOR regions given as mappings; returns what the pager
    /// keeps alive (the mappings and the aliases).
    fn make_aliases(&mut self) -> Result<Vec<Arc<Mapping>>> {
        let mut keep = std::mem::take(&mut self.keep_alive);
        for owned in &self.owned {
            keep.push(owned.memory.clone());
            if !owned.minor {
                continue;
            }
            let alias = owned.memory.alias().map_err(|source| Error::Io {
                what: "map an alias of a MINOR region's memory (shared memory only)",
                source,
            })?;
            self.regions[owned.region] = self.regions[owned.region].minor(alias.addr());
            keep.push(Arc::new(alias));
        }
        Ok(keep)
    }

    /// Refuses what cannot be served: regions beyond the image, a SIGBUS mode without the
    /// feature or a signal-safe source, handler CPUs this process may not use or that the
    /// mode does not use, a MINOR region whose alias is not its file's shared mapping.
    fn check(&self, table: &RegionTable) -> Result<()> {
        for r in table.regions() {
            let need = r.spec.image_offset + r.spec.len as u64;
            if need > self.source.len() {
                return Err(Error::ImageTooSmall {
                    need,
                    have: self.source.len(),
                });
            }
            if let Resolve::Continue { alias } = r.spec.resolve {
                crate::maps::check_alias(&r.spec, alias, table)?;
            }
        }
        if self.mode == DeliveryMode::Sigbus {
            if !self.uffd.features().contains(Features::SIGBUS) {
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
        let mode = self.mode.name();
        let allowed = allowed_cpus();
        if let Some(cpus) = &self.handler_cpus {
            if self.mode != DeliveryMode::PerCpu {
                return Err(Error::Mode {
                    mode,
                    reason: "handler_cpus sets per-CPU handlers; this mode has one handler \
                             thread (use handler_cpu)"
                        .into(),
                });
            }
            if cpus.is_empty() {
                return Err(Error::Mode {
                    mode,
                    reason: "an empty set of handler CPUs".into(),
                });
            }
            if let Some(cpu) = cpus.iter().find(|c| !allowed.contains(c)) {
                return Err(Error::Mode {
                    mode,
                    reason: format!("CPU {cpu} is not in this process's allowed set {allowed:?}"),
                });
            }
        }
        if let Some(cpu) = self.handler_cpu {
            if self.mode == DeliveryMode::PerCpu {
                return Err(Error::Mode {
                    mode,
                    reason: "handler_cpu pins the one handler thread of the other modes; \
                             per-CPU handlers take handler_cpus"
                        .into(),
                });
            }
            if !allowed.contains(&cpu) {
                return Err(Error::Mode {
                    mode,
                    reason: format!(
                        "handler CPU {cpu} is not in this process's allowed set {allowed:?}"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The seeded map, checked, or a fresh one.
    fn seeded_states(&mut self, pages: usize) -> Result<PageStateMap> {
        let Some(map) = self.states.take() else {
            return Ok(PageStateMap::new(pages));
        };
        if map.len() != pages {
            return Err(Error::StatesSize {
                pages: map.len(),
                want: pages,
            });
        }
        if let Some(page) = map.next_in_state_wrapping(PageState::Requested, 0) {
            return Err(Error::SeededState {
                page,
                state: PageState::Requested,
            });
        }
        Ok(map)
    }

    fn register_regions(&self, table: &RegionTable) -> Result<()> {
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
        Ok(())
    }
}

/// With fork events on, starts the thread that serves forked children, and returns the
/// queue handlers hand them to.
fn start_fork_service(
    shared: &Arc<Shared>,
    plan: ChildPlan,
    pager: &mut Pager,
) -> Result<Option<Arc<ForkQueue>>> {
    if !shared.uffd.features().contains(Features::EVENT_FORK) {
        return Ok(None);
    }
    let queue = Arc::new(
        ForkQueue::new(shared.clone(), plan.max_children).map_err(|e| Error::Io {
            what: "create the fork hand-off eventfd",
            source: e,
        })?,
    );
    let q = queue.clone();
    pager.push_thread(spawn(shared, "uffd-forks".into(), move |shared| {
        fork::serve(shared.clone(), q, plan, start_child)
    })?);
    Ok(Some(queue))
}

/// How often an idle child engine checks whether its process has exited (one cheap
/// ioctl); exited children are reaped within about this long.
const CHILD_EXIT_PROBE: Duration = Duration::from_millis(20);

/// Starts a child engine for forked uffd `fd` (see [`fork::StartChild`]).
fn start_child(
    fd: OwnedFd,
    plan: &ChildPlan,
    own: Option<Arc<dyn Source>>,
) -> crate::Result<Pager> {
    log::debug!("starting a child engine for forked uffd {}", fd.as_raw_fd());
    let uffd = Uffd::from_fd(fd)?;
    let shares = own.is_none();
    let source = own.unwrap_or_else(|| plan.source.clone());
    let builder = Pager::builder(uffd, source);
    // SAFETY: the child's regions are its copies of the parent's, whose contract the
    // parent's embedder gave (or that the parent checked as mappings, kept alive in
    // `plan.keep` with their aliases); the child's uffd serves the child's address space.
    let builder = unsafe { builder.regions(plan.regions.iter().copied()) };
    builder
        .mode(DeliveryMode::Thread)
        .register(false)
        .batch(plan.batch)
        .poison_on_fatal(plan.poison_on_fatal)
        .check_seeded(false)
        .keep_alive(plan.keep.clone())
        .child_of_fork(CHILD_EXIT_PROBE, shares)
        .start()
}

/// How long handler threads may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until `workers` handler threads are in their loops. A new thread frees memory
/// as it starts (the standard library's start-up), so a `fork()` in the embedding
/// process right after `start` returned — glibc holding the malloc locks until a handler
/// reads the FORK event — would otherwise find no handler able to read it. A thread that
/// failed to start (its CPU could not be pinned, it panicked) fails the start with its
/// error.
fn wait_until_running(shared: &Shared, workers: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    while shared.running() < workers {
        if shared.stopping() {
            return Err(shared.take_fatal().unwrap_or(Error::Io {
                what: "start the handler threads",
                source: std::io::ErrorKind::Interrupted.into(),
            }));
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Io {
                what: "start the handler threads",
                source: std::io::ErrorKind::TimedOut.into(),
            });
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

/// poll(2) on a uffd needs O_NONBLOCK.
fn make_non_blocking(uffd: &Uffd) -> Result<()> {
    let io = |e: nix::Error| Error::Io {
        what: "make the userfaultfd non-blocking",
        source: e.into(),
    };
    let flags = OFlag::from_bits_retain(fcntl(uffd.as_fd(), FcntlArg::F_GETFL).map_err(io)?);
    if !flags.contains(OFlag::O_NONBLOCK) {
        log::info!(
            "the userfaultfd was blocking: setting O_NONBLOCK on its open file description \
             (shared with every holder of the fd)"
        );
        fcntl(uffd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io)?;
    }
    Ok(())
}
