//! `uffdkit bench`: fault-latency stress. For each delivery mode it measures the pager and
//! a minimal raw handler loop of the same mode built directly on uffd-core, and, once per
//! run, first-touch anonymous faults (the floor) — all in the same run, so the ratios
//! compare like with like on a noisy machine.
//!
//! Like with like is checked, not assumed: CPUs are picked from the set this process may
//! run on (a cpuset, `taskset`), every pin that fails is an error, each side records
//! where its faulting and resolving threads ran, and a ratio of two sides placed
//! differently is refused (`n/a`, `null` in JSON) rather than printed.

use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sched::{sched_getaffinity, CpuSet};
use nix::unistd::Pid;
use pager::{pin_to_cpu, DeliveryMode, MemorySource, Pager, Source, ZeroSource};
use serde::Serialize;
use serde_json::json;
use uffd_core::{
    CopyMode, Error as UffdError, Event, EventBuffer, Features, Mapping, MemoryKind, ReadStatus,
    RegisterMode, Uffd, ZeropageMode,
};

use crate::cli_args::Mode;
use crate::workload::{order, summarize, synthetic_image, timed_touch, Pattern, Summary};

/// Memory kinds the bench can fault on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Private anonymous, 4 KiB.
    Anon,
    /// memfd shmem, 4 KiB.
    Shmem,
    /// Private hugetlb, 2 MiB.
    Hugetlb,
}

/// Where the faulting and handler threads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Nothing pinned.
    Unpinned,
    /// Faulting threads and the handler pinned to the first CPU this process may use.
    Same,
    /// Faulting threads on the first CPU this process may use, the handler on the second.
    Other,
}

/// What the pages hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A synthetic image in memory (UFFDIO_COPY).
    Memory,
    /// All zero (UFFDIO_ZEROPAGE).
    Zero,
}

/// Options of `uffdkit bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Faulting threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Pages each thread faults (hugetlb: 2 MiB pages).
    #[arg(long, default_value_t = 20_000)]
    pages: usize,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Seq)]
    pattern: Pattern,
    /// Memory kind.
    #[arg(long, value_enum, default_value_t = Kind::Anon)]
    kind: Kind,
    /// Delivery modes to measure (comma separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Mode::Thread, Mode::Poll, Mode::Percpu, Mode::Sigbus])]
    modes: Vec<Mode>,
    /// Page source.
    #[arg(long, value_enum, default_value_t = SourceKind::Memory)]
    source: SourceKind,
    /// CPU placement of faulting and handler threads (comma separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Placement::Unpinned, Placement::Same, Placement::Other])]
    placement: Vec<Placement>,
    /// Repetitions of each case; the median run (by p50) is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

struct Case<'a> {
    args: &'a Args,
    placement: Placement,
    page_size: usize,
    image: Arc<Vec<u8>>,
    /// The CPUs this process may run on.
    cpus: Vec<usize>,
}

/// Where a side's threads ran: what a ratio between two sides must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Where {
    /// The faulting threads' CPU (`None`: unpinned).
    faulting: Option<usize>,
    /// Where faults were resolved.
    resolving: Resolving,
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
fn ratio(a: (&Summary, &Where), b: (&Summary, &Where)) -> Option<f64> {
    (a.1 == b.1).then(|| a.0.p50_us / b.0.p50_us.max(1e-3))
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

impl Case<'_> {
    fn fault_cpu(&self) -> Option<usize> {
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
            Pattern::Shared => self.args.pages,
            _ => self.args.pages * self.args.threads,
        }
    }

    fn map(&self) -> Result<Mapping> {
        let kind = match self.args.kind {
            Kind::Anon => MemoryKind::Anon,
            Kind::Shmem => MemoryKind::Shmem,
            Kind::Hugetlb => MemoryKind::HugetlbPrivate,
        };
        Ok(Mapping::new(kind, self.total_pages() * self.page_size)?)
    }

    /// Runs the faulting threads over `region` and summarises their latencies.
    fn fault(&self, region: &Mapping) -> Result<Summary> {
        let threads = self.args.threads;
        let barrier = Arc::new(Barrier::new(threads + 1));
        let handles: Vec<JoinHandle<Result<Vec<u32>>>> = (0..threads)
            .map(|t| {
                let barrier = barrier.clone();
                let (ps, cpu) = (self.page_size, self.fault_cpu());
                let base = match self.args.pattern {
                    Pattern::Shared => region.addr(),
                    _ => region.addr() + t * self.args.pages * ps,
                };
                let pages = order(self.args.pattern, self.args.pages, 0x5EED + t as u64);
                std::thread::spawn(move || {
                    let pinned = cpu.map_or(Ok(()), pin_to_cpu);
                    barrier.wait(); // whatever happened, so that nobody waits forever
                    pinned.with_context(|| format!("pin a faulting thread to CPU {cpu:?}"))?;
                    Ok(timed_touch(base, ps, &pages).0)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut all = Vec::with_capacity(threads * self.args.pages);
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
        Ok(summarize(all, start.elapsed()))
    }

    fn source(&self) -> Arc<dyn Source> {
        match self.args.source {
            SourceKind::Memory => Arc::new(MemorySource::new(self.image.as_slice().to_vec())),
            SourceKind::Zero => Arc::new(ZeroSource::new(self.image.len() as u64)),
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

    fn run_pager(&self, mode: Mode) -> Result<(Summary, Where)> {
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
        let summary = self.fault(&region)?;
        let stats = pager.stop()?;
        if stats.placed() != self.total_pages() as u64 {
            bail!(
                "pager placed {} of {} pages",
                stats.placed(),
                self.total_pages()
            );
        }
        Ok((summary, self.placed(handlers.as_deref())))
    }

    fn run_raw(&self, mode: Mode) -> Result<(Summary, Where)> {
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
        let summary = if mode == Mode::Sigbus {
            let guard = raw_sigbus::install(raw);
            let s = self.fault(&region);
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
            let s = self.fault(&region);
            stop.store(true, Ordering::Relaxed);
            for h in threads {
                h.join()
                    .map_err(|_| anyhow::anyhow!("raw handler panicked"))??;
            }
            handlers = Some(cpus);
            s?
        };
        Ok((summary, self.placed(handlers.as_deref())))
    }

    fn run_first_touch(&self) -> Result<Summary> {
        let region = self.map()?;
        self.fault(&region)
    }
}

/// The minimal raw handler: read events, copy (or zero) the page, wake on EEXIST.
#[derive(Clone)]
struct Raw {
    uffd: Arc<Uffd>,
    image: Arc<Vec<u8>>,
    base: usize,
    page_size: usize,
    zero: bool,
}

impl Raw {
    fn place(&self, addr: usize) -> Result<(), UffdError> {
        let page = addr & !(self.page_size - 1);
        let at = page - self.base;
        let r = if self.zero {
            self.uffd
                .zeropage(page, self.page_size, ZeropageMode::empty())
        } else {
            // SAFETY: `page` is a missing page of the bench's registered region.
            unsafe {
                self.uffd.copy(
                    page,
                    &self.image[at..at + self.page_size],
                    CopyMode::empty(),
                )
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(UffdError::Exists { .. }) => self.uffd.wake(page, self.page_size),
            Err(e) => Err(e),
        }
    }

    fn serve(&self, cpu: Option<usize>, spin: bool, stop: &AtomicBool) -> Result<()> {
        if let Some(cpu) = cpu {
            pin_to_cpu(cpu).with_context(|| format!("pin the raw handler to CPU {cpu}"))?;
        }
        let mut buf = EventBuffer::new(64);
        // Relaxed: a stop flag only; join() synchronises.
        while !stop.load(Ordering::Relaxed) {
            if !spin && !self.uffd.wait_readable(Some(Duration::from_millis(20)))? {
                continue;
            }
            if self.uffd.read_events(&mut buf)? == ReadStatus::WouldBlock {
                continue;
            }
            for event in buf.drain() {
                if let Event::Pagefault { addr, .. } = event {
                    self.place(addr)?;
                }
            }
        }
        Ok(())
    }
}

/// The raw SIGBUS baseline: a process-wide handler that places the page itself.
mod raw_sigbus {
    use super::*;
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

    static RAW: AtomicPtr<Raw> = AtomicPtr::new(std::ptr::null_mut());

    extern "C" fn on_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        let raw = RAW.load(Ordering::Acquire);
        if raw.is_null() {
            return;
        }
        // SAFETY: the kernel's siginfo; `raw` lives until the guard is dropped, after the
        // faulting threads are joined.
        unsafe {
            let _ = (*raw).place((*info).si_addr() as usize);
        }
    }

    /// Restores the previous disposition on drop.
    pub struct Guard {
        previous: SigAction,
        raw: *mut Raw,
    }

    pub fn install(raw: Raw) -> Guard {
        let raw = Box::into_raw(Box::new(raw));
        RAW.store(raw, Ordering::Release);
        let action = SigAction::new(
            SigHandler::SigAction(on_sigbus),
            SaFlags::SA_SIGINFO,
            SigSet::empty(),
        );
        // SAFETY: the handler does one placement ioctl (async-signal-safe) on a `Raw` that
        // lives until the guard is dropped.
        let previous = unsafe { sigaction(Signal::SIGBUS, &action) }.expect("sigaction(SIGBUS)");
        Guard { previous, raw }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            RAW.store(std::ptr::null_mut(), Ordering::Release);
            // SAFETY: restores the saved disposition.
            let _ = unsafe { sigaction(Signal::SIGBUS, &self.previous) };
            // SAFETY: no fault is in flight (the faulting threads were joined) and the
            // handler is gone, so nothing uses `raw` any more.
            drop(unsafe { Box::from_raw(self.raw) });
        }
    }
}

/// Runs `f` `n` times and keeps the median run by p50.
fn median_of<T: Clone>(
    n: usize,
    mut f: impl FnMut() -> Result<(Summary, T)>,
) -> Result<(Summary, T)> {
    let mut runs = (0..n.max(1)).map(|_| f()).collect::<Result<Vec<_>>>()?;
    runs.sort_by(|a, b| a.0.p50_us.total_cmp(&b.0.p50_us));
    Ok(runs[runs.len() / 2].clone())
}

#[derive(Serialize)]
struct Row {
    mode: Mode,
    placement: Placement,
    pager: Summary,
    raw: Summary,
    /// Where each side ran.
    pager_placed: Where,
    raw_placed: Where,
    /// `None` (JSON `null`) when the two sides ran placed differently: no ratio is made
    /// of unlike placements.
    pager_vs_raw_p50: Option<f64>,
    pager_vs_first_touch_p50: Option<f64>,
}

/// Runs `uffdkit bench`.
pub fn run(args: &Args) -> Result<()> {
    let page_size = match args.kind {
        Kind::Hugetlb => {
            let need = args.pages * args.threads.max(1);
            let free = crate::hugepages::reserve(need);
            if free < need {
                bail!(
                    "hugetlb: need {need} free 2 MiB pages, have {free} (run as root to reserve)"
                );
            }
            uffd_core::HUGE_PAGE_SIZE
        }
        _ => uffd_core::page_size(),
    };
    if args.threads == 0 || args.pages == 0 {
        bail!("--threads and --pages must be at least 1");
    }
    let cpus = allowed_cpus()?;
    if args.placement.contains(&Placement::Other) && cpus.len() < 2 {
        bail!(
            "placement \"other\" needs two CPUs; this process may run on {cpus:?} only (a \
             cpuset or taskset): ask for --placement unpinned,same"
        );
    }
    let total = match args.pattern {
        Pattern::Shared => args.pages,
        _ => args.pages * args.threads,
    };
    let image = Arc::new(synthetic_image(total, page_size, 0));
    let first_touch = {
        let case = Case {
            args,
            placement: Placement::Unpinned,
            page_size,
            image: image.clone(),
            cpus: cpus.clone(),
        };
        median_of(args.repeat, || Ok((case.run_first_touch()?, ())))
            .context("first-touch baseline")?
            .0
    };
    let first_touch_placed = Where {
        faulting: None,
        resolving: Resolving::FaultingThread,
    };
    let mut rows = Vec::new();
    for &placement in &args.placement {
        let case = Case {
            args,
            placement,
            page_size,
            image: image.clone(),
            cpus: cpus.clone(),
        };
        for &mode in &args.modes {
            let (raw, raw_placed) = median_of(args.repeat, || case.run_raw(mode))
                .with_context(|| format!("raw {mode:?} loop"))?;
            let (pager, pager_placed) = median_of(args.repeat, || case.run_pager(mode))
                .with_context(|| format!("pager in {mode:?} mode"))?;
            // The floor is unpinned: a ratio against it only for an unpinned pager.
            let pager_vs_first_touch_p50 = (pager_placed.faulting.is_none())
                .then(|| pager.p50_us / first_touch.p50_us.max(1e-3));
            rows.push(Row {
                mode,
                placement,
                pager_vs_raw_p50: ratio((&pager, &pager_placed), (&raw, &raw_placed)),
                pager_vs_first_touch_p50,
                pager,
                raw,
                pager_placed,
                raw_placed,
            });
        }
    }
    if args.json {
        let out = json!({
            "config": {
                "threads": args.threads, "pages_per_thread": args.pages, "pattern": args.pattern,
                "kind": args.kind, "source": args.source, "page_size": page_size,
                "repeat": args.repeat, "cpus": cpus,
            },
            "first_touch": first_touch,
            "first_touch_placed": first_touch_placed,
            "results": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "uffdkit bench: {} thread(s) × {} pages of {} KiB, {:?} pattern, {:?} memory, {:?} source, median of {} run(s), {} CPUs",
        args.threads, args.pages, page_size / 1024, args.pattern, args.kind, args.source, args.repeat, cpus.len()
    );
    println!(
        "first-touch faults on the same memory kind, no uffd, unpinned: p50 {:.2} µs, p99 {:.2} µs, {:.0} pages/s",
        first_touch.p50_us, first_touch.p99_us, first_touch.pages_per_s
    );
    println!(
        "{:<8} {:<9} {:<6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>11} {:>8} {:>9}",
        "mode",
        "placement",
        "who",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "pages/s",
        "vs raw",
        "vs touch"
    );
    for r in &rows {
        for (who, s) in [("raw", &r.raw), ("pager", &r.pager)] {
            let shown = |ratio: Option<f64>, width: usize, digits: usize| match ratio {
                Some(x) => format!("{x:>width$.digits$}x"),
                None => format!("{:>w$}", "n/a", w = width + 1),
            };
            let ratios = if who == "pager" {
                format!(
                    "{} {}",
                    shown(r.pager_vs_raw_p50, 7, 2),
                    shown(r.pager_vs_first_touch_p50, 8, 1)
                )
            } else {
                String::new()
            };
            println!(
                "{:<8} {:<9} {:<6} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>11.0} {}",
                format!("{:?}", r.mode).to_lowercase(),
                format!("{:?}", r.placement).to_lowercase(),
                who,
                s.p50_us,
                s.p90_us,
                s.p99_us,
                s.p999_us,
                s.max_us,
                s.pages_per_s,
                ratios
            );
        }
    }
    println!(
        "placement: unpinned = nothing pinned; same = faulting threads and handler on CPU {}; \
         other = faulting on CPU {}, handler on CPU {} (per-CPU handlers: one on each of {:?}); \
         n/a = no ratio of unlike placements (vs touch: the floor is unpinned)",
        cpus[0],
        cpus[0],
        cpus.get(1).map_or("-".to_string(), |c| c.to_string()),
        cpus
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(p50_us: f64) -> Summary {
        let mut s = summarize(vec![1000], Duration::from_millis(1));
        s.p50_us = p50_us;
        s
    }

    #[test]
    fn a_ratio_of_unlike_placements_is_refused() {
        let pinned = Where {
            faulting: Some(0),
            resolving: Resolving::Cpus(vec![1]),
        };
        let unpinned = Where {
            faulting: None,
            resolving: Resolving::Unpinned,
        };
        let (a, b) = (summary(20.0), summary(10.0));
        assert_eq!(ratio((&a, &pinned), (&b, &pinned)), Some(2.0));
        assert_eq!(ratio((&a, &pinned), (&b, &unpinned)), None);
        let elsewhere = Where {
            faulting: Some(0),
            resolving: Resolving::Cpus(vec![0]),
        };
        assert_eq!(ratio((&a, &pinned), (&b, &elsewhere)), None);
    }
}
