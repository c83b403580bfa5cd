//! One bench case: a CPU placement of faulting and handler threads, measured for the
//! pager, the raw loop and first-touch faults, each side recording where it ran.

use super::raw::{raw_sigbus, Raw};
use super::*;
use crate::stretched::Stretched;

/// How the pager and the raw loop touch: a read, which on a missing registered page is
/// served like a write (a page allocated and filled: copied, or zeroed on shmem/hugetlb).
pub(super) const UFFD_TOUCH: Touch = Touch::Read;

/// How the floor touches: a write, because a read of fresh anonymous memory maps the
/// shared zero page (nothing allocated) while the uffd sides' read allocates a page.
pub(super) const FLOOR_TOUCH: Touch = Touch::Write;

pub(super) struct Case<'a> {
    pub args: &'a Args,
    pub placement: Placement,
    pub page_size: usize,
    /// Pages each faulting thread touches (`--pages`, or a `--sizes` entry's share).
    pub pages: usize,
    /// The repeating image (see [`Stretched::repeated`]).
    pub image: Arc<Vec<u8>>,
    /// The CPUs this process may run on.
    pub cpus: Vec<usize>,
}

/// Where a side's threads ran: what a ratio between two sides must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Where {
    /// The faulting threads' CPU (`None`: unpinned).
    pub faulting: Option<usize>,
    /// Where faults were resolved.
    pub resolving: Resolving,
}

/// Where faults are resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolving {
    /// Handler threads, unpinned.
    Unpinned,
    /// Handler threads pinned to these CPUs (one each).
    Cpus(Vec<usize>),
    /// In the faulting thread (SIGBUS).
    FaultingThread,
}

/// `a / b`, only when both sides ran placed alike.
pub(super) fn ratio(a: (&Summary, &Where), b: (&Summary, &Where)) -> Option<f64> {
    (a.1 == b.1).then(|| a.0.p50_us / b.0.p50_us.max(1e-3))
}

/// The CPUs this process may run on, in order.
pub(super) fn allowed_cpus() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

impl Case<'_> {
    pub fn fault_cpu(&self) -> Option<usize> {
        (self.placement != Placement::Unpinned).then(|| self.cpus[0])
    }

    fn handler_cpu(&self) -> Option<usize> {
        match self.placement {
            Placement::Unpinned => None,
            Placement::Same => Some(self.cpus[0]),
            // `run` refuses this placement with fewer than two CPUs.
            Placement::Other => Some(self.cpus[1]),
        }
    }

    /// Where a run placed its threads, from the CPUs its handlers were pinned to (each
    /// pin that failed failed the run).
    fn placed(&self, handlers: Option<&[Option<usize>]>) -> Where {
        let resolving = match handlers {
            None => Resolving::FaultingThread,
            Some(cpus) if cpus.iter().all(Option::is_none) => Resolving::Unpinned,
            Some(cpus) => Resolving::Cpus(cpus.iter().flatten().copied().collect()),
        };
        Where {
            faulting: self.fault_cpu(),
            resolving,
        }
    }

    fn total_pages(&self) -> usize {
        match self.args.pattern {
            Pattern::Shared => self.pages,
            _ => self.pages * self.args.threads,
        }
    }

    pub(super) fn map(&self) -> Result<Mapping> {
        let kind = match self.args.kind {
            Kind::Anon => MemoryKind::Anon,
            Kind::Shmem => MemoryKind::Shmem,
            Kind::Hugetlb => MemoryKind::HugetlbPrivate,
        };
        Ok(Mapping::new(kind, self.total_pages() * self.page_size)?)
    }

    /// Runs the faulting threads over `region`, each touching its pages as `touch` says;
    /// summarises their latencies and returns them (ns, for the plot).
    fn fault(&self, region: &Mapping, touch: Touch) -> Result<(Summary, Vec<u32>)> {
        let threads = self.args.threads;
        let barrier = Arc::new(Barrier::new(threads + 1));
        let handles: Vec<JoinHandle<Result<Vec<u32>>>> = (0..threads)
            .map(|t| {
                let barrier = barrier.clone();
                let (ps, cpu) = (self.page_size, self.fault_cpu());
                let base = match self.args.pattern {
                    Pattern::Shared => region.addr(),
                    _ => region.addr() + t * self.pages * ps,
                };
                let pages = order(self.args.pattern, self.pages, 0x5EED + t as u64);
                std::thread::spawn(move || {
                    let pinned = cpu.map_or(Ok(()), pin_to_cpu);
                    barrier.wait(); // whatever happened, so that nobody waits forever
                    pinned.with_context(|| format!("pin a faulting thread to CPU {cpu:?}"))?;
                    Ok(timed_touch(base, ps, &pages, touch).0)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut all = Vec::with_capacity(threads * self.pages);
        let mut failed = None;
        for h in handles {
            match h.join() {
                Ok(Ok(ns)) => all.extend(ns),
                Ok(Err(e)) => failed = Some(e),
                Err(_) => failed = Some(anyhow::anyhow!("faulting thread panicked")),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok((summarize(all.clone(), start.elapsed()), all))
    }

    fn source(&self) -> Arc<dyn Source> {
        match self.args.source {
            SourceKind::Memory => Arc::new(Stretched::repeated(
                self.image.clone(),
                (self.total_pages() * self.page_size) as u64,
            )),
            SourceKind::Zero => Arc::new(ZeroSource::new(
                (self.total_pages() * self.page_size) as u64,
            )),
        }
    }

    fn uffd(&self, mode: Mode) -> Result<Uffd> {
        let mut b = Uffd::builder()
            .non_blocking(true)
            .require(Features::EVENT_REMOVE);
        if mode == Mode::Sigbus {
            b = b.require(Features::SIGBUS);
        }
        Ok(b.open()?)
    }

    pub fn run_pager(&self, mode: Mode) -> Result<(Summary, Vec<u32>, Where)> {
        let region = Arc::new(self.map()?);
        let delivery = DeliveryMode::from(mode);
        let builder = Pager::builder(self.uffd(mode)?, self.source())
            .mapping(region.clone(), 0)
            .mode(delivery);
        // Pinned as the raw loop is (`placed`): one handler per allowed CPU in per-CPU
        // mode, else the one handler thread (SIGBUS: its event thread).
        let (builder, handlers) = match mode {
            Mode::Percpu => {
                let cpus: Vec<_> = self.cpus.iter().copied().map(Some).collect();
                (builder.handler_cpus(self.cpus.iter().copied()), Some(cpus))
            }
            // The SIGBUS mode's event thread resolves no fault.
            Mode::Sigbus => (builder.handler_cpu(self.handler_cpu()), None),
            _ => (
                builder.handler_cpu(self.handler_cpu()),
                Some(vec![self.handler_cpu()]),
            ),
        };
        let pager = builder.start()?;
        let (summary, lat) = self.fault(&region, UFFD_TOUCH)?;
        let stats = pager.stop()?;
        if stats.placed() != self.total_pages() as u64 {
            bail!(
                "pager placed {} of {} pages",
                stats.placed(),
                self.total_pages()
            );
        }
        Ok((summary, lat, self.placed(handlers.as_deref())))
    }

    pub fn run_raw(&self, mode: Mode) -> Result<(Summary, Vec<u32>, Where)> {
        let region = self.map()?;
        let uffd = Arc::new(self.uffd(mode)?);
        uffd.register(region.addr(), region.len(), RegisterMode::MISSING)?;
        let raw = Raw {
            uffd: uffd.clone(),
            image: self.image.clone(),
            base: region.addr(),
            page_size: self.page_size,
            zero: self.args.source == SourceKind::Zero,
        };
        let mut handlers = None;
        let (summary, lat) = if mode == Mode::Sigbus {
            let guard = raw_sigbus::install(raw);
            let s = self.fault(&region, UFFD_TOUCH);
            drop(guard);
            s?
        } else {
            let stop = Arc::new(AtomicBool::new(false));
            let cpus: Vec<Option<usize>> = match mode {
                Mode::Percpu => self.cpus.iter().copied().map(Some).collect(),
                _ => vec![self.handler_cpu()],
            };
            let threads: Vec<_> = cpus
                .iter()
                .map(|&cpu| {
                    let (raw, stop) = (raw.clone(), stop.clone());
                    let spin = mode == Mode::Poll;
                    std::thread::spawn(move || raw.serve(cpu, spin, &stop))
                })
                .collect();
            let s = self.fault(&region, UFFD_TOUCH);
            stop.store(true, Ordering::Relaxed);
            for h in threads {
                h.join()
                    .map_err(|_| anyhow::anyhow!("raw handler panicked"))??;
            }
            handlers = Some(cpus);
            s?
        };
        Ok((summary, lat, self.placed(handlers.as_deref())))
    }

    /// The floor: first touches of fresh memory of the same kind, no uffd.
    pub fn run_first_touch(&self) -> Result<(Summary, Vec<u32>)> {
        self.first_touch_on(&self.map()?)
    }

    /// [`run_first_touch`](Self::run_first_touch) over `region` (fresh, of this case's
    /// size and kind), which the caller keeps to look at afterwards.
    pub(super) fn first_touch_on(&self, region: &Mapping) -> Result<(Summary, Vec<u32>)> {
        self.fault(region, FLOOR_TOUCH)
    }
}
