//! [`PagerBuilder`]: validates the configuration, registers the regions, builds the engine
//! and starts its threads in the chosen delivery mode.
//!
//! The builder's settings are here; `check.rs` holds what it refuses (and the aliases and
//! seeded map it prepares) before anything starts, `start.rs` how it starts the engine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use page_state::PageStateMap;
use uffd_core::{Mapping, Uffd};

use crate::error::Result;
use crate::pager::{DeliveryMode, Pager};
use crate::prefetch::Prefetch;
use crate::record;
use crate::region::{RegionSpec, RegionTable};
use crate::shared::Shared;
use crate::source::Source;

mod check;
mod start;

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
    silent_unmaps: bool,
    check_seeded: bool,
    /// A forked child's engine: probe for the child's exit this often while idle.
    child_probe: Option<Duration>,
    /// A forked child's engine serving from its parent's source (not attached again).
    child_shares_source: bool,
    /// Memory kept alive for a forked child's engine (its parent's mappings).
    keep_alive: Vec<Arc<Mapping>>,
    /// A forked child's engine: its parent's engine (see `Shared::parent`).
    parent: Option<Arc<Shared>>,
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
            silent_unmaps: false,
            check_seeded: cfg!(debug_assertions),
            child_probe: None,
            child_shares_source: false,
            keep_alive: Vec::new(),
            parent: None,
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
    /// pages into it, and a [`Mapping`] hands out no references to its bytes. The
    /// userfaultfd must be one opened in this process: `start` refuses an adopted one
    /// ([`Uffd::from_fd`]), which may serve another process (name that process's memory
    /// with [`region`](Self::region)).
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
    /// pages in. `start` refuses memory that is not shared, and an adopted userfaultfd
    /// (as for [`mapping`](Self::mapping)).
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
    /// memory); copy regions only. Refused with [`Error::SeededNotPresent`](crate::Error::SeededNotPresent).
    pub fn check_seeded(mut self, check: bool) -> Self {
        self.check_seeded = check;
        self
    }

    /// Forked children served at once (with `EVENT_FORK`; default 64). A child forked
    /// while that many are served is refused, as is one whose source cannot serve it
    /// ([`Source::child`]): logged, counted
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

    pub(crate) fn child_of_fork(
        mut self,
        probe: Duration,
        shares_source: bool,
        parent: Arc<Shared>,
    ) -> Self {
        self.child_probe = Some(probe);
        self.child_shares_source = shares_source;
        self.parent = Some(parent);
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

    /// Whether the served process may unmap parts of its regions, or map other memory
    /// over them, without telling (default: no). With it, a page the kernel calls gone
    /// (ENOENT: its range is no longer under this userfaultfd) is left to the process —
    /// counted in [`StatsSnapshot::gone_silently`](crate::StatsSnapshot::gone_silently),
    /// never placed — instead of failing the pager after a grace. Firecracker 1.1 to 1.10
    /// does this after a UFFD restore: its balloon maps fresh anonymous memory over the
    /// pages it takes back (`MAP_FIXED`), and no event tells the handler. Applies only to
    /// a userfaultfd without UNMAP and REMAP events, where no event can ever explain an
    /// ENOENT; with them, an ENOENT is waited out until its event is read, as without
    /// this setting.
    pub fn silent_unmaps(mut self, on: bool) -> Self {
        self.silent_unmaps = on;
        self
    }
}
