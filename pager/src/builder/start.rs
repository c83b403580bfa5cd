//! [`PagerBuilder::start`]: registers the regions, builds the engine, and starts its
//! threads (handlers, prefetch, the fork service) in the chosen delivery mode, waiting
//! until they are in their loops.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use uffd_core::{Features, Ioctls, RegisterMode, Uffd};

use crate::cpu::{allowed_cpus, pin_to_cpu};
use crate::error::{Error, Result};
use crate::fork::{self, ChildPlan, ForkQueue};
use crate::pager::{DeliveryMode, Pager};
use crate::placer::Placer;
use crate::prefetch::{self, Prefetch};
use crate::region::{RegionSpec, RegionTable, Resolve};
use crate::shared::Shared;
use crate::source::Source;
use crate::thread::spawn;
use crate::worker::{Wait, Worker};

use super::PagerBuilder;

impl PagerBuilder {
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
        shared.silent_unmaps = self.silent_unmaps
            && !shared
                .uffd
                .features()
                .intersects(Features::EVENT_UNMAP | Features::EVENT_REMAP);
        shared.pending_is_fatal = self.child_shares_source;
        shared.parent = self.parent.take();
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
                Worker::new(shared.clone(), self.batch, forks.clone(), self.child_probe)?;
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
    regions: Vec<RegionSpec>,
    own: Option<Arc<dyn Source>>,
    parent: &Arc<Shared>,
) -> crate::Result<Pager> {
    log::debug!("starting a child engine for forked uffd {}", fd.as_raw_fd());
    let uffd = Uffd::from_fd(fd)?;
    let shares = own.is_none();
    let source = own.unwrap_or_else(|| plan.source.clone());
    let builder = Pager::builder(uffd, source);
    // SAFETY: the child's regions are its copies of the parent's, at the bases the parent's
    // region table holds now (`current_specs`), whose contract the parent's embedder gave
    // (or that the parent checked as mappings, kept alive in `plan.keep` with their
    // aliases); the child's uffd serves the child's address space.
    let builder = unsafe { builder.regions(regions) };
    builder
        .mode(DeliveryMode::Thread)
        .register(false)
        .batch(plan.batch)
        .poison_on_fatal(plan.poison_on_fatal)
        .check_seeded(false)
        .keep_alive(plan.keep.clone())
        .child_of_fork(CHILD_EXIT_PROBE, shares, parent.clone())
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
