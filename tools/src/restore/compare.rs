//! Fair comparisons: every run of every strategy starts from the same stated page-cache
//! state (warmed by a read pass of the image, or dropped), the order of the strategies
//! rotates from one round of `--repeat` to the next (nobody always runs first, after a
//! strategy that warmed or dirtied memory for it), and each strategy is reported as
//! min / median / max with the free memory each run started with. `--sizes` repeats it
//! all per size and states the growth.

use serde::Serialize;

use super::baselines::{run_eager, run_mmap};
use super::lazy::run_pager;
use super::*;
use crate::sweep::{Curve, Point, Spread};
use crate::workload::process_cpu;

/// What is compared: the pager in one delivery mode, or a baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    Pager(Mode),
    Eager,
    Mmap,
}

/// The page-cache state every run starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheState {
    /// The image was read once just before the run (its pages in the page cache, as far as
    /// memory allows).
    Warm,
    /// The page cache was dropped just before the run (`--drop-caches`).
    Dropped,
    /// Left as found: a chunked image in a store (the chunk cache is `--cache`'s and
    /// `--cold-cache`'s business).
    AsFound,
}

/// Free memory when a run started, from /proc/meminfo.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MemoryBefore {
    /// MemFree, KiB.
    pub free_kib: u64,
    /// MemAvailable (free plus what reclaim would give back), KiB.
    pub available_kib: u64,
}

fn memory_before() -> Result<MemoryBefore> {
    let text = std::fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(MemoryBefore {
        free_kib: field("MemFree"),
        available_kib: field("MemAvailable"),
    })
}

/// Brings the page cache to `state` for a run over the first `len` bytes of `image`.
fn prepare(state: CacheState, image: &Image, len: u64) -> Result<()> {
    match (state, image) {
        (CacheState::Dropped, _) => {
            nix::unistd::sync();
            std::fs::write("/proc/sys/vm/drop_caches", "3")
                .context("drop the page cache (needs root)")?;
        }
        (CacheState::Warm, Image::File(file, _)) => {
            // A read pass through the page cache, 1 MiB at a time.
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < len {
                let n = ((len - at) as usize).min(buf.len());
                file.read_exact_at(&mut buf[..n], at)
                    .context("read the image to warm the page cache")?;
                at += n as u64;
            }
        }
        _ => {}
    }
    Ok(())
}

/// One run: its place in its round's order, its memory at the start, its outcome.
pub(super) struct Run {
    position: usize,
    memory: MemoryBefore,
    pub outcome: Outcome,
}

/// Every run of one contender at one size.
pub(super) struct Measured {
    contender: Contender,
    pub name: String,
    pub runs: Vec<Run>,
}

impl Measured {
    pub fn spread(&self) -> Spread {
        let totals: Vec<f64> = self
            .runs
            .iter()
            .map(|r| r.outcome.total.as_secs_f64())
            .collect();
        Spread::of(&totals).expect("at least one run")
    }

    /// The run whose total is the median.
    pub fn median_run(&self) -> &Run {
        let median = self.spread().median_s;
        self.runs
            .iter()
            .find(|r| r.outcome.total.as_secs_f64() == median)
            .expect("the median is a run's total")
    }
}

fn contenders(args: &Args, modes: &[Mode], image: &Image) -> Result<Vec<Contender>> {
    let all = args.strategy == Strategy::All;
    let mut out = Vec::new();
    if all || args.strategy == Strategy::Pager {
        out.extend(modes.iter().map(|&m| Contender::Pager(m)));
    }
    if all || args.strategy == Strategy::Eager {
        out.push(Contender::Eager);
    }
    match image {
        Image::File(..) if all || args.strategy == Strategy::Mmap => out.push(Contender::Mmap),
        Image::Url(_) if args.strategy == Strategy::Mmap => {
            bail!("--strategy mmap needs a local image file")
        }
        _ => {}
    }
    Ok(out)
}

/// What every size runs: the contenders, over which image, from which cache state.
struct Plan<'a> {
    args: &'a Args,
    image: &'a Image,
    reference: Option<&'a std::fs::File>,
    contenders: Vec<Contender>,
    cache: CacheState,
    /// The pager runs in several modes: its name says which.
    several_modes: bool,
}

/// Runs every contender `--repeat` times over the first `len` bytes, rotating the order.
fn measure(plan: &Plan, len: u64, touched: &[usize]) -> Result<Vec<Measured>> {
    let Plan {
        args,
        image,
        reference,
        ref contenders,
        cache,
        several_modes,
    } = *plan;
    let mut measured: Vec<Measured> = contenders
        .iter()
        .map(|&c| Measured {
            contender: c,
            name: match c {
                Contender::Pager(m) if several_modes => format!("pager-{}", mode_name(m)),
                Contender::Pager(_) => "pager".into(),
                Contender::Eager if matches!(image, Image::Url(_)) => "download".into(),
                Contender::Eager => "eager".into(),
                Contender::Mmap => "mmap".into(),
            },
            runs: Vec::new(),
        })
        .collect();
    for round in 0..args.repeat.max(1) {
        for position in 0..contenders.len() {
            let i = (round + position) % contenders.len();
            prepare(cache, image, len)?;
            let memory = memory_before()?;
            let cpu_before = process_cpu().unwrap_or_default();
            let mut outcome = match measured[i].contender {
                Contender::Pager(mode) => run_pager(args, image, len, mode, touched, reference)?,
                Contender::Eager => run_eager(args, image, len, touched, reference)?,
                Contender::Mmap => match image {
                    Image::File(file, _) => run_mmap(args, len, touched, file)?,
                    Image::Url(_) => unreachable!("mmap is a contender of files only"),
                },
            };
            // Every thread of the process (workload, handlers, prefetcher) during the run.
            let cpu = process_cpu().unwrap_or_default().saturating_sub(cpu_before);
            merge(
                &mut outcome.detail,
                json!({ "process_cpu_s": cpu.as_secs_f64() }),
            );
            log::debug!(
                "{} MiB, round {round}: {} {:.1} ms",
                len >> 20,
                measured[i].name,
                outcome.total.as_secs_f64() * 1e3
            );
            measured[i].runs.push(Run {
                position,
                memory,
                outcome,
            });
        }
    }
    Ok(measured)
}

fn mode_name(mode: Mode) -> String {
    format!("{mode:?}").to_lowercase()
}

/// One size's report, as JSON.
fn size_json(
    args: &Args,
    len: u64,
    touched: usize,
    cache: CacheState,
    measured: &[Measured],
) -> serde_json::Value {
    let results: Vec<_> = measured
        .iter()
        .map(|m| {
            let spread = m.spread();
            let runs: Vec<_> = m
                .runs
                .iter()
                .map(|r| {
                    json!({
                        "total_s": r.outcome.total.as_secs_f64(), "position": r.position,
                        "memory_before": r.memory, "detail": r.outcome.detail,
                        "timeline": r.outcome.timeline,
                    })
                })
                .collect();
            json!({
                "strategy": m.runs[0].outcome.strategy, "name": m.name,
                "mode": match m.contender { Contender::Pager(mode) => Some(mode), _ => None },
                "total_s": spread.median_s, "min_s": spread.min_s, "median_s": spread.median_s,
                "max_s": spread.max_s, "detail": m.median_run().outcome.detail, "runs": runs,
            })
        })
        .collect();
    json!({
        "image_bytes": len, "touched_pages": touched, "pages": (len as usize).div_ceil(PS),
        "cache": cache, "repeat": args.repeat.max(1), "results": results,
    })
}

fn print_size(args: &Args, len: u64, touched: usize, cache: CacheState, measured: &[Measured]) {
    let first = measured
        .iter()
        .flat_map(|m| m.runs.iter())
        .find(|r| r.position == 0)
        .map(|r| r.memory)
        .unwrap_or_default();
    println!(
        "  {} restored, workload touches {touched} pages; every run starts {}; {} run(s) each, \
         order rotated; MemAvailable before the first run {} MiB (free {} MiB)",
        crate::units::bytes(len),
        match cache {
            CacheState::Warm => "warm (the image read once just before)",
            CacheState::Dropped => "cold (page cache dropped just before)",
            CacheState::AsFound => "with the cache as found",
        },
        args.repeat.max(1),
        first.available_kib >> 10,
        first.free_kib >> 10,
    );
    for m in measured {
        let mut detail = m.median_run().outcome.detail.clone();
        if let Some(d) = detail.as_object_mut() {
            d.remove("histogram");
        }
        println!("  {:<14} {}   {}", m.name, m.spread().text_ms(), detail);
    }
}

/// Runs `uffdkit restore`.
pub fn run(args: &Args) -> Result<()> {
    if !(0.0..=1.0).contains(&args.writes) {
        bail!("--writes must be within 0..=1");
    }
    let (image, len) = open(args)?;
    let reference = match (&image, &args.reference) {
        (Image::File(f, _), _) => Some(f.try_clone()?),
        (Image::Url(_), Some(path)) => Some(
            uffd_core::private_fs::open_regular(path, false)
                .with_context(|| format!("open {}", path.display()))?,
        ),
        (Image::Url(_), None) => None,
    };
    let is_chunked = matches!(image, Image::Url(_)) || args.source == SourceKind::Chunked;
    let modes = delivery_modes(&args.modes, is_chunked)?;
    let contenders = contenders(args, &modes, &image)?;
    let cache = match (&image, args.drop_caches) {
        (_, true) => CacheState::Dropped,
        (Image::File(..), false) => CacheState::Warm,
        (Image::Url(_), false) => CacheState::AsFound,
    };
    let sizes = if args.sizes.is_empty() {
        vec![len]
    } else {
        if matches!(image, Image::Url(_)) {
            bail!("--sizes needs a local image file (it restores the file's first SIZE bytes)");
        }
        if let Some(&big) = args.sizes.iter().find(|&&s| s > len) {
            bail!(
                "--sizes {}: the image is only {} bytes",
                crate::units::bytes(big),
                len
            );
        }
        let mut sizes = args.sizes.clone();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    };
    let verified = !args.no_verify && reference.is_some();
    let plan = Plan {
        args,
        image: &image,
        reference: reference.as_ref(),
        contenders,
        cache,
        several_modes: modes.len() > 1,
    };
    if !args.json {
        println!(
            "uffdkit restore: {} ({} MiB), {:?} pattern, {:.0} % of pages touched, {:.0} % writes{}",
            args.image,
            len >> 20,
            args.pattern,
            args.touch * 100.0,
            args.writes * 100.0,
            if verified {
                ", every touched page verified"
            } else {
                ""
            }
        );
    }
    let mut per_size = Vec::new();
    for &size in &sizes {
        let pages = (size as usize).div_ceil(PS);
        let touched = touched(args, pages)?;
        let measured = measure(&plan, size, &touched)?;
        if !args.json {
            print_size(args, size, touched.len(), cache, &measured);
        }
        per_size.push((size, touched.len(), measured));
    }
    let curves: Vec<Curve> = (0..plan.contenders.len())
        .map(|i| {
            let points = per_size
                .iter()
                .map(|(size, _, m)| Point::new(*size, m[i].spread()))
                .collect();
            Curve::new(per_size[0].2[i].name.clone(), points)
        })
        .collect();
    if let Some(path) = &args.plot {
        let (_, _, largest) = per_size.last().expect("at least one size");
        super::plots::write(path, largest, &curves, sizes.len() > 1)?;
    }
    if args.json {
        let (size, touched, measured) = per_size.last().expect("at least one size");
        let mut out = size_json(args, *size, *touched, cache, measured);
        merge(
            &mut out,
            json!({
                "image": args.image, "pattern": args.pattern, "writes": args.writes,
                "verified": verified, "cold_cache": args.drop_caches,
            }),
        );
        if sizes.len() > 1 {
            let each: Vec<_> = per_size
                .iter()
                .map(|(s, t, m)| size_json(args, *s, *t, cache, m))
                .collect();
            merge(&mut out, json!({ "sizes": each, "sweep": curves }));
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if sizes.len() > 1 {
        crate::sweep::print_table(
            "size sweep (median of each size's runs; growth exponent k of time ∝ sizeᵏ):",
            &curves,
        );
    }
    Ok(())
}

/// Opens the image and returns it with its length.
fn open(args: &Args) -> Result<(Image, u64)> {
    let (image, len) = if is_url(&args.image) {
        let img = chunked::Image::open(&args.image, &args.chunked.bound.store_options())
            .with_context(|| format!("open image {}", args.image))?;
        (
            Image::Url(args.image.clone()),
            img.manifest().geometry().len,
        )
    } else {
        let path = PathBuf::from(&args.image);
        let file = uffd_core::private_fs::open_regular(&path, false)
            .with_context(|| format!("open {}", path.display()))?;
        let len = file.metadata()?.len();
        (Image::File(file, path), len)
    };
    if len == 0 {
        bail!("{} is empty", args.image);
    }
    // Before any per-page table: a sparse file of a petabyte costs nothing to make.
    if len > args.chunked.bound.max_image as u64 {
        bail!(
            "{} is {len} bytes, more than --max-image {}: refusing to size tables for it",
            args.image,
            args.chunked.bound.max_image
        );
    }
    Ok((image, len))
}
