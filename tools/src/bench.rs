//! `uffdkit bench`: fault-latency stress. For each delivery mode it measures the pager and
//! a minimal raw handler loop of the same mode built directly on uffd-core, and, once per
//! run, first-touch anonymous faults (the floor) — all in the same run, so the ratios
//! compare like with like on a noisy machine.

use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pager::{pin_to_cpu, DeliveryMode, MemorySource, Pager, RegionSpec, Source, ZeroSource};
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
    /// Faulting threads and the handler pinned to CPU 0.
    Same,
    /// Faulting threads on CPU 0, the handler on CPU 1.
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
}

impl Case<'_> {
    fn fault_cpu(&self) -> Option<usize> {
        (self.placement != Placement::Unpinned).then_some(0)
    }

    fn handler_cpu(&self) -> Option<usize> {
        match self.placement {
            Placement::Unpinned => None,
            Placement::Same => Some(0),
            Placement::Other => Some(1 % cpus()),
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
        let handles: Vec<JoinHandle<Vec<u32>>> = (0..threads)
            .map(|t| {
                let barrier = barrier.clone();
                let (ps, cpu) = (self.page_size, self.fault_cpu());
                let base = match self.args.pattern {
                    Pattern::Shared => region.addr(),
                    _ => region.addr() + t * self.args.pages * ps,
                };
                let pages = order(self.args.pattern, self.args.pages, 0x5EED + t as u64);
                std::thread::spawn(move || {
                    if let Some(cpu) = cpu {
                        let _ = pin_to_cpu(cpu);
                    }
                    barrier.wait();
                    timed_touch(base, ps, &pages).0
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut all = Vec::with_capacity(threads * self.args.pages);
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("faulting thread panicked"))?,
            );
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

    fn run_pager(&self, mode: Mode) -> Result<Summary> {
        let region = self.map()?;
        let delivery = DeliveryMode::from(mode);
        let pager = Pager::builder(self.uffd(mode)?, self.source())
            .region(RegionSpec::new(
                region.addr(),
                region.len(),
                region.kind(),
                0,
            ))
            .mode(delivery)
            .handler_cpu(self.handler_cpu())
            .start()?;
        let summary = self.fault(&region)?;
        let stats = pager.stop()?;
        if stats.placed() != self.total_pages() as u64 {
            bail!(
                "pager placed {} of {} pages",
                stats.placed(),
                self.total_pages()
            );
        }
        Ok(summary)
    }

    fn run_raw(&self, mode: Mode) -> Result<Summary> {
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
        let summary = if mode == Mode::Sigbus {
            let guard = raw_sigbus::install(raw);
            let s = self.fault(&region);
            drop(guard);
            s?
        } else {
            let stop = Arc::new(AtomicBool::new(false));
            let cpus: Vec<Option<usize>> = match mode {
                Mode::Percpu => (0..cpus()).map(Some).collect(),
                _ => vec![self.handler_cpu()],
            };
            let handlers: Vec<_> = cpus
                .into_iter()
                .map(|cpu| {
                    let (raw, stop) = (raw.clone(), stop.clone());
                    let spin = mode == Mode::Poll;
                    std::thread::spawn(move || raw.serve(cpu, spin, &stop))
                })
                .collect();
            let s = self.fault(&region);
            stop.store(true, Ordering::Relaxed);
            for h in handlers {
                h.join()
                    .map_err(|_| anyhow::anyhow!("raw handler panicked"))??;
            }
            s?
        };
        Ok(summary)
    }

    fn run_first_touch(&self) -> Result<Summary> {
        let region = self.map()?;
        self.fault(&region)
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
            let _ = pin_to_cpu(cpu);
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
fn median_of(n: usize, mut f: impl FnMut() -> Result<Summary>) -> Result<Summary> {
    let mut runs = (0..n.max(1)).map(|_| f()).collect::<Result<Vec<_>>>()?;
    runs.sort_by(|a, b| a.p50_us.total_cmp(&b.p50_us));
    Ok(runs[runs.len() / 2])
}

#[derive(Serialize)]
struct Row {
    mode: Mode,
    placement: Placement,
    pager: Summary,
    raw: Summary,
    pager_vs_raw_p50: f64,
    pager_vs_first_touch_p50: f64,
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
        };
        median_of(args.repeat, || case.run_first_touch()).context("first-touch baseline")?
    };
    let mut rows = Vec::new();
    for &placement in &args.placement {
        let case = Case {
            args,
            placement,
            page_size,
            image: image.clone(),
        };
        for &mode in &args.modes {
            let raw = median_of(args.repeat, || case.run_raw(mode))
                .with_context(|| format!("raw {mode:?} loop"))?;
            let pager = median_of(args.repeat, || case.run_pager(mode))
                .with_context(|| format!("pager in {mode:?} mode"))?;
            rows.push(Row {
                mode,
                placement,
                pager_vs_raw_p50: pager.p50_us / raw.p50_us.max(1e-3),
                pager_vs_first_touch_p50: pager.p50_us / first_touch.p50_us.max(1e-3),
                pager,
                raw,
            });
        }
    }
    if args.json {
        let out = json!({
            "config": {
                "threads": args.threads, "pages_per_thread": args.pages, "pattern": args.pattern,
                "kind": args.kind, "source": args.source, "page_size": page_size,
                "repeat": args.repeat, "cpus": cpus(),
            },
            "first_touch": first_touch,
            "results": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "uffdkit bench: {} thread(s) × {} pages of {} KiB, {:?} pattern, {:?} memory, {:?} source, median of {} run(s), {} CPUs",
        args.threads, args.pages, page_size / 1024, args.pattern, args.kind, args.source, args.repeat, cpus()
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
            let ratios = if who == "pager" {
                format!(
                    "{:>7.2}x {:>8.1}x",
                    r.pager_vs_raw_p50, r.pager_vs_first_touch_p50
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
    println!("placement: unpinned = nothing pinned; same = faulting threads and handler on CPU 0; other = faulting on CPU 0, handler on CPU 1 (per-CPU handlers are always one per CPU)");
    Ok(())
}
