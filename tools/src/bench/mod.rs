//! `uffdkit bench`: fault-latency stress. For each delivery mode it measures the pager and
//! a minimal raw handler loop of the same mode built directly on uffd-core, and, once per
//! run, first-touch faults of the same memory kind without uffd (the floor) — all in the
//! same run, so the ratios compare like with like on a noisy machine. The floor's touches
//! are writes, which allocate a page as the uffd sides' reads of a missing page do (a read
//! of fresh anonymous memory would map the shared zero page: no allocation, no zeroing).
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
use pager::{pin_to_cpu, DeliveryMode, Pager, Source, ZeroSource};
use serde::Serialize;
use serde_json::json;
use uffd_core::{
    CopyMode, Error as UffdError, Event, EventBuffer, Features, Mapping, MemoryKind, ReadStatus,
    RegisterMode, Uffd, ZeropageMode,
};

use crate::cli_args::Mode;
use crate::sweep::{Curve, Point, Spread};
use crate::workload::{order, summarize, synthetic_image, timed_touch, Pattern, Summary, Touch};

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
    /// Fault these sizes in all (instead of `--pages` per thread; comma separated:
    /// 1G,2G,4G) and report time per GiB and the growth exponent of each mode.
    #[arg(long, value_delimiter = ',', value_parser = crate::sweep::size_arg)]
    sizes: Vec<u64>,
    /// Draw each mode's fault-latency CDF (pager and raw loop) and, with --sizes, the size
    /// sweep into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<std::path::PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

mod case;
mod raw;
mod report;

use case::{allowed_cpus, ratio, Case};
pub use case::{Resolving, Where};

/// The median run (by p50) of repeated runs, with the spread of their wall times.
#[derive(Clone)]
struct Median<T> {
    summary: Summary,
    /// The median run's latencies (ns), for the plot.
    lat: Vec<u32>,
    placed: T,
    wall: Spread,
}

/// Runs `f` `n` times and keeps the median run by p50.
fn median_of<T: Clone>(
    n: usize,
    mut f: impl FnMut() -> Result<(Summary, Vec<u32>, T)>,
) -> Result<Median<T>> {
    let mut runs = (0..n.max(1)).map(|_| f()).collect::<Result<Vec<_>>>()?;
    let walls: Vec<f64> = runs
        .iter()
        .map(|r| r.0.count as f64 / r.0.pages_per_s.max(1e-9))
        .collect();
    runs.sort_by(|a, b| a.0.p50_us.total_cmp(&b.0.p50_us));
    let (summary, lat, placed) = runs.swap_remove(runs.len() / 2);
    Ok(Median {
        summary,
        lat,
        placed,
        wall: Spread::of(&walls).expect("at least one run"),
    })
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
    /// Wall time of each side's runs (min, median, max).
    pager_wall: Spread,
    raw_wall: Spread,
    #[serde(skip)]
    pager_lat: Vec<u32>,
    #[serde(skip)]
    raw_lat: Vec<u32>,
}

/// One size's measurements.
struct Measured {
    /// Pages each thread faulted.
    pages: usize,
    first_touch: Summary,
    rows: Vec<Row>,
}

/// Measures every placement and mode with `pages` pages per thread.
fn measure(args: &Args, page_size: usize, pages: usize, cpus: &[usize]) -> Result<Measured> {
    let total = match args.pattern {
        Pattern::Shared => pages,
        _ => pages * args.threads,
    };
    let period = (total * page_size).min(raw::IMAGE_PERIOD.max(page_size)) / page_size;
    let image = Arc::new(synthetic_image(period, page_size, 0));
    let case = |placement| Case {
        args,
        placement,
        page_size,
        pages,
        image: image.clone(),
        cpus: cpus.to_vec(),
    };
    let first_touch = {
        let case = case(Placement::Unpinned);
        median_of(args.repeat, || {
            let (s, lat) = case.run_first_touch()?;
            Ok((s, lat, ()))
        })
        .context("first-touch baseline")?
        .summary
    };
    let mut rows = Vec::new();
    for &placement in &args.placement {
        let case = case(placement);
        for &mode in &args.modes {
            let raw = median_of(args.repeat, || case.run_raw(mode))
                .with_context(|| format!("raw {mode:?} loop"))?;
            let pager = median_of(args.repeat, || case.run_pager(mode))
                .with_context(|| format!("pager in {mode:?} mode"))?;
            let pager_vs_first_touch_p50 =
                floor_ratio(args, &pager.summary, &pager.placed, &first_touch);
            rows.push(Row {
                mode,
                placement,
                pager_vs_raw_p50: ratio(
                    (&pager.summary, &pager.placed),
                    (&raw.summary, &raw.placed),
                ),
                pager_vs_first_touch_p50,
                pager: pager.summary,
                raw: raw.summary,
                pager_placed: pager.placed,
                raw_placed: raw.placed,
                pager_wall: pager.wall,
                raw_wall: raw.wall,
                pager_lat: pager.lat,
                raw_lat: raw.lat,
            });
        }
    }
    Ok(Measured {
        pages,
        first_touch,
        rows,
    })
}

/// The pager's p50 over the floor's, only where both do alike: the floor is unpinned (so
/// nothing of the pager's may be pinned: not its faulting threads, nor its handlers, which
/// per-CPU mode pins one to each CPU under every placement) and allocates a page per
/// touch, which the pager does not for `--source zero` on anonymous memory (UFFDIO_ZEROPAGE
/// maps the shared zero page there).
fn floor_ratio(args: &Args, pager: &Summary, placed: &Where, floor: &Summary) -> Option<f64> {
    let zero_page = args.source == SourceKind::Zero && args.kind == Kind::Anon;
    let pinned = placed.faulting.is_some() || matches!(placed.resolving, Resolving::Cpus(_));
    (!pinned && !zero_page).then(|| pager.p50_us / floor.p50_us.max(1e-3))
}

/// Runs `uffdkit bench`.
pub fn run(args: &Args) -> Result<()> {
    if args.threads == 0 || args.pages == 0 {
        bail!("--threads and --pages must be at least 1");
    }
    let small_page = uffd_core::page_size();
    let page_size = match args.kind {
        Kind::Hugetlb => uffd_core::HUGE_PAGE_SIZE,
        _ => small_page,
    };
    // Pages per thread of each size (a shared pattern: all threads walk the same pages).
    let sharers = if args.pattern == Pattern::Shared {
        1
    } else {
        args.threads
    };
    let per_thread: Vec<usize> = if args.sizes.is_empty() {
        vec![args.pages]
    } else {
        let mut sizes = args.sizes.clone();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
            .iter()
            .map(|&bytes| (bytes as usize / page_size / sharers).max(1))
            .collect()
    };
    if args.kind == Kind::Hugetlb {
        let need = per_thread.iter().max().copied().unwrap_or(0) * args.threads.max(1);
        let free = crate::hugepages::reserve(need);
        if free < need {
            bail!("hugetlb: need {need} free 2 MiB pages, have {free} (run as root to reserve)");
        }
    }
    let cpus = allowed_cpus()?;
    if args.placement.contains(&Placement::Other) && cpus.len() < 2 {
        bail!(
            "placement \"other\" needs two CPUs; this process may run on {cpus:?} only (a \
             cpuset or taskset): ask for --placement unpinned,same"
        );
    }
    let measured = per_thread
        .iter()
        .map(|&pages| measure(args, page_size, pages, &cpus))
        .collect::<Result<Vec<_>>>()?;
    report::report(args, page_size, &cpus, &measured)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(p50_us: f64) -> Summary {
        let mut s = summarize(vec![1000], Duration::from_millis(1));
        s.p50_us = p50_us;
        s
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(extra: &[&str]) -> Args {
        <Cli as clap::Parser>::parse_from(std::iter::once("bench").chain(extra.iter().copied()))
            .args
    }

    /// Pages of `[addr, addr + len)` backed by a page of their own: present, and not the
    /// shared zero page (PAGEMAP_SCAN, exact to the range, unlike smaps' merged VMAs).
    fn allocated_pages(addr: usize, len: usize) -> usize {
        use uffd_core::{PageCategories, PageRegion, Pagemap, ScanFlags, ScanQuery};
        let query = ScanQuery {
            flags: ScanFlags::empty(),
            inverted: PageCategories::PFN_ZERO,
            mask: PageCategories::PRESENT | PageCategories::PFN_ZERO,
            any_of: PageCategories::empty(),
            report: PageCategories::PRESENT,
            max_pages: 0,
        };
        let mut out = vec![PageRegion::default(); len / uffd_core::page_size()];
        let pagemap = Pagemap::open().expect("open pagemap");
        let (n, end) = pagemap
            .scan(addr, addr + len, &query, &mut out)
            .expect("scan");
        assert_eq!(end, addr + len, "one scan covers the range");
        let bytes: u64 = out[..n].iter().map(|r| r.end - r.start).sum();
        bytes as usize / uffd_core::page_size()
    }

    #[test]
    fn the_first_touch_floor_allocates_every_page_it_touches() {
        let pages = 64;
        let args = args(&["--pages", "64"]);
        let case = Case {
            args: &args,
            placement: Placement::Unpinned,
            page_size: uffd_core::page_size(),
            pages,
            image: Arc::new(vec![0; uffd_core::page_size()]),
            cpus: allowed_cpus().expect("allowed CPUs"),
        };
        let region = case.map().expect("map");
        case.first_touch_on(&region).expect("first touch");
        assert_eq!(allocated_pages(region.addr(), region.len()), pages);
        // What the floor must not be, and that the scan tells them apart: a read of the
        // same fresh memory maps the shared zero page, allocating nothing.
        let read = case.map().expect("map");
        let order: Vec<usize> = (0..pages).collect();
        timed_touch(read.addr(), case.page_size, &order, Touch::Read);
        assert_eq!(allocated_pages(read.addr(), read.len()), 0);
    }

    #[test]
    fn no_floor_ratio_where_the_pager_maps_the_zero_page() {
        let unpinned = Where {
            faulting: None,
            resolving: Resolving::Unpinned,
        };
        let (pager, floor) = (summary(2.0), summary(1.0));
        let memory = args(&[]);
        assert_eq!(floor_ratio(&memory, &pager, &unpinned, &floor), Some(2.0));
        let zero = args(&["--source", "zero"]);
        assert_eq!(floor_ratio(&zero, &pager, &unpinned, &floor), None);
        let shmem_zero = args(&["--source", "zero", "--kind", "shmem"]);
        assert_eq!(
            floor_ratio(&shmem_zero, &pager, &unpinned, &floor),
            Some(2.0)
        );
    }

    #[test]
    fn no_floor_ratio_for_pinned_handlers_under_the_unpinned_placement() {
        let (pager, floor) = (summary(2.0), summary(1.0));
        // Per-CPU mode's placement under "unpinned": faulting threads free, handlers pinned.
        let percpu = Where {
            faulting: None,
            resolving: Resolving::Cpus(vec![0, 1]),
        };
        assert_eq!(floor_ratio(&args(&[]), &pager, &percpu, &floor), None);
        let sigbus = Where {
            faulting: None,
            resolving: Resolving::FaultingThread,
        };
        assert_eq!(floor_ratio(&args(&[]), &pager, &sigbus, &floor), Some(2.0));
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
