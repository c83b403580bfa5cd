//! `uffdkit restore`: run a workload over memory restored lazily from an image — a local
//! file, or a chunked image in an object store (`--image s3://…`) — and the same workload
//! over the alternatives measured the same way: eager (read the whole file, or download
//! the whole image, then run) and `mmap(MAP_PRIVATE)` of the file (the kernel's lazy
//! loading). `--writes F` makes that share of touches writes, so every strategy pays what
//! a guest pays: `mmap` its copy-on-write, the others nothing more.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pager::{DeliveryMode, FileSource, Pager, Source};
use serde_json::json;
use uffd_core::{Features, Mapping, MemoryKind, Uffd};

use crate::cli_args::{Mode, PrefetchArgs};
use crate::image::{is_url, SourceArgs};
use crate::workload::{clustered, order, summarize, Pattern};

mod baselines;
use baselines::{run_eager, run_mmap};

/// How the image file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// pread(2) per page.
    Pread,
    /// Copies out of a read-only mapping.
    Mmap,
    /// pread(2), with the file's holes known as zero.
    Sparse,
    /// The chunked read path: large reads (`--chunk-kib`), many in flight, placed a chunk
    /// at a time; holes known as zero.
    Chunked,
}

/// What to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// The pager (lazy, with the chosen prefetch).
    Pager,
    /// Read the whole file into anonymous memory (for a URL: download the whole image
    /// first), then run.
    Eager,
    /// mmap(MAP_PRIVATE) the file and run.
    Mmap,
    /// All three, one after the other.
    All,
}

/// Options of `uffdkit restore`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The memory image: a raw file, or a chunked image's URL (s3://…, file:///…).
    #[arg(long)]
    image: String,
    /// For a URL image: the raw file it was pushed from, to verify touched pages against
    /// (chunks are verified by digest regardless).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Delivery mode. Default: sigbus for a file (fastest for in-process memory, see
    /// `uffdkit bench`), percpu for a chunked source (it answers faults later, which
    /// sigbus cannot wait for).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// How the pager reads the image (mmap lets the kernel's readahead batch a cold read).
    #[arg(long, value_enum, default_value_t = SourceKind::Mmap)]
    source: SourceKind,
    #[command(flatten)]
    prefetch: PrefetchArgs,
    /// Chunk size of `--source chunked`, in KiB.
    #[arg(long, default_value_t = chunked::DEFAULT_CHUNK_SIZE / 1024)]
    chunk_kib: u32,
    #[command(flatten)]
    chunked: SourceArgs,
    /// Share of touches that are writes (0..=1).
    #[arg(long, default_value_t = 0.0)]
    writes: f64,
    /// Fraction of pages the workload touches.
    #[arg(long, default_value_t = 1.0)]
    touch: f64,
    /// Order of the workload's touches.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pattern: Pattern,
    /// Which restore strategy to run.
    #[arg(long, value_enum, default_value_t = Strategy::Pager)]
    strategy: Strategy,
    /// Skip checking touched pages against the file afterwards.
    #[arg(long)]
    no_verify: bool,
    /// Drop the page cache before each strategy (root), so each starts cold as a
    /// snapshot restore on a fresh host does.
    #[arg(long)]
    drop_caches: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

const PS: usize = 4096;

/// The pages the workload touches, in order.
fn touched(args: &Args, pages: usize) -> Result<Vec<usize>> {
    if !(0.0..=1.0).contains(&args.touch) {
        bail!("--touch must be within 0..=1");
    }
    let n = ((pages as f64) * args.touch).round() as usize;
    if args.pattern == Pattern::Clustered {
        return Ok(clustered(pages, n, 0xC0FFEE));
    }
    let all = order(args.pattern, pages, 0xC0FFEE);
    Ok(match args.pattern {
        // A random fraction: the first n of a random permutation.
        Pattern::Random => all[..n].to_vec(),
        // Otherwise spread the fraction over the image.
        _ => all
            .into_iter()
            .filter(|&p| n > 0 && (p * n) / pages != ((p + 1) * n) / pages)
            .collect(),
    })
}

/// Whether the touch of `page` is a write, for a write share `share` (deterministic).
fn is_write(page: usize, share: f64) -> bool {
    let h = (page as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    (h as f64) < share * (1u64 << 24) as f64
}

/// What a write touch stores in byte 0 of its page.
fn written_byte(page: usize) -> u8 {
    (page as u8) ^ 0xA5
}

/// The workload: touches each page once (a read of byte 0, or for a write share of them
/// a store to it), timing every touch. Returns the touch latencies in nanoseconds.
fn run_workload(base: usize, pages: &[usize], writes: f64) -> Vec<u32> {
    let mut lat = Vec::with_capacity(pages.len());
    let mut sum = 0u64;
    for &p in pages {
        let addr = (base + p * PS) as *mut u8;
        let t = Instant::now();
        if is_write(p, writes) {
            // SAFETY: callers map every page of the image at `base`, writable.
            unsafe { std::ptr::write_volatile(addr, written_byte(p)) };
        } else {
            // SAFETY: as above.
            sum = sum.wrapping_add(u64::from(unsafe { std::ptr::read_volatile(addr) }));
        }
        lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
    }
    std::hint::black_box(sum);
    lat
}

fn verify(base: usize, file: &std::fs::File, pages: &[usize], len: u64, writes: f64) -> Result<()> {
    let mut want = vec![0u8; PS];
    for &p in pages {
        let off = (p * PS) as u64;
        let n = (len - off).min(PS as u64) as usize;
        want.fill(0);
        file.read_exact_at(&mut want[..n], off)
            .context("read image for verification")?;
        if is_write(p, writes) {
            want[0] = written_byte(p);
        }
        // SAFETY: the page is mapped (the workload touched it).
        let got = unsafe { std::slice::from_raw_parts((base + p * PS) as *const u8, PS) };
        if got != want.as_slice() {
            bail!("page {p} differs from the image");
        }
    }
    Ok(())
}

struct Outcome {
    strategy: &'static str,
    total: Duration,
    detail: serde_json::Value,
}

/// The common report of a timed workload.
fn workload_detail(lat: Vec<u32>, wall: Duration) -> serde_json::Value {
    let first_us = lat.first().map(|&ns| f64::from(ns) / 1e3);
    let s = summarize(lat, wall);
    json!({
        "workload_s": wall.as_secs_f64(),
        "touch_p50_us": s.p50_us, "touch_p99_us": s.p99_us, "touch_max_us": s.max_us,
        "first_touch_us": first_us,
    })
}

/// Where the image is.
enum Image {
    File(std::fs::File, PathBuf),
    Url(String),
}

fn file_source(args: &Args, path: &std::path::Path) -> Result<Arc<dyn Source>> {
    Ok(match args.source {
        SourceKind::Pread => Arc::new(FileSource::pread(path)?),
        SourceKind::Mmap => Arc::new(FileSource::mmap(path)?),
        SourceKind::Sparse => Arc::new(FileSource::sparse(path)?),
        SourceKind::Chunked => Arc::new(chunked::file_source(
            path,
            PS as u32,
            args.chunk_kib * 1024,
            args.chunked.options(background(args, path_pages(path)?)?),
        )?),
    })
}

fn path_pages(path: &std::path::Path) -> Result<usize> {
    Ok((std::fs::metadata(path)?.len() as usize).div_ceil(PS))
}

/// The chunked sources' own prefetch plan, from `--prefetch` / `--replay`.
fn background(args: &Args, pages: usize) -> Result<chunked::Background> {
    Ok(match args.prefetch.plan(pages)? {
        pager::Prefetch::None => chunked::Background::None,
        pager::Prefetch::Replay(pages) => {
            chunked::Background::Replay(pages.iter().map(|&p| p * PS as u64).collect())
        }
        _ => chunked::Background::Sequential,
    })
}

fn run_pager(
    args: &Args,
    image: &Image,
    len: u64,
    pages: &[usize],
    reference: Option<&std::fs::File>,
) -> Result<Outcome> {
    let map_len = (len as usize).next_multiple_of(PS);
    let chunked_source = match image {
        Image::Url(url) => Some(crate::image::open_source(
            url,
            &args.chunked,
            background(args, map_len / PS)?,
        )?),
        Image::File(..) => None,
    };
    let is_chunked = chunked_source.is_some() || args.source == SourceKind::Chunked;
    let mode = delivery_mode(args.mode, is_chunked)?;
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, map_len)?);
    let extra = if mode == Mode::Sigbus {
        Features::SIGBUS
    } else {
        Features::empty()
    };
    let start = Instant::now();
    let source: Arc<dyn Source> = match (&chunked_source, image) {
        (Some(c), _) => c.clone(),
        (None, Image::File(_, path)) => file_source(args, path)?,
        (None, Image::Url(_)) => unreachable!("a URL image has a chunked source"),
    };
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE | extra)
        .open()?;
    // The image may end in a partial page: serve whole pages, zero-padded.
    let padded: Arc<dyn Source> = Arc::new(Padded {
        inner: source,
        len: map_len as u64,
    });
    let builder = Pager::builder(uffd, padded)
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::from(mode));
    let builder = args.prefetch.apply(builder, map_len / PS)?;
    // A chunked source prefetches itself (it knows which chunks are on their way).
    let builder = if is_chunked {
        builder.prefetch(pager::Prefetch::None)
    } else {
        builder
    };
    // Before the pager starts (a SIGBUS-mode pager chains to it): a page the pager can no
    // longer serve parks the workload, and the pager's error is reported.
    crate::guarded::install(&memory)?;
    let pager = builder.start()?;
    let t = Instant::now();
    let restored = || {
        let s = pager.stats();
        let placed = s.placed();
        crate::progress::Status {
            phase: String::new(),
            fraction: Some((placed, (map_len / PS) as u64)),
            text: format!("{placed} pages in, {} faults", s.faults()),
        }
    };
    let (base, touches, writes) = (memory.addr(), pages.to_vec(), args.writes);
    let lat = crate::progress::track(module_path!(), "restore", restored, || {
        crate::guarded::run(&pager, memory.clone(), move || {
            run_workload(base, &touches, writes)
        })
    })?;
    let Some(lat) = lat else {
        return Err(crate::guarded::stopped(pager));
    };
    let workload = t.elapsed();
    let total = start.elapsed();
    let stats = pager.stop()?;
    crate::guarded::disarm();
    if let (false, Some(file)) = (args.no_verify, reference) {
        verify(memory.addr(), file, pages, len, args.writes)?;
    }
    let mut detail = workload_detail(lat, workload);
    let extra = json!({
        "mode": mode,
        "faults": stats.faults(),
        "placed_fault": stats.placed_fault,
        "placed_prefetch": stats.placed_prefetch,
        "placed_arrival": stats.placed_arrival,
        "placed_zero": stats.placed_zero,
        "fault_p50_us": stats.latency.quantile(0.5).map(|d| d.as_micros()),
        "fault_p99_us": stats.latency.quantile(0.99).map(|d| d.as_micros()),
        "histogram": stats.latency.lines(),
        "blocktime_s": stats.blocktime.as_secs_f64(),
    });
    merge(&mut detail, extra);
    if let Some(c) = &chunked_source {
        let s = c.stats();
        merge(
            &mut detail,
            json!({
                "bytes_fetched": s.fetch.bytes_fetched, "chunks_fetched": s.fetch.chunks_fetched,
                "reads": s.fetch.reads, "cache_hits": s.fetch.cache_hits, "peer_waits": s.fetch.peer_waits,
                "retries": s.fetch.retries, "chunks_faulted": s.chunks_faulted,
                "chunks_background": s.chunks_background,
                "first_fault_to_place_us": s.first_fault_to_place.map(|d| d.as_micros()),
            }),
        );
    }
    Ok(Outcome {
        strategy: "pager",
        total,
        detail,
    })
}

/// The delivery mode: the one asked for, or the fastest that can serve the source.
fn delivery_mode(asked: Option<Mode>, chunked: bool) -> Result<Mode> {
    match (asked, chunked) {
        (Some(Mode::Sigbus), true) => Err(crate::exit::usage(
            "--mode sigbus cannot serve a chunked source (--image URL or --source chunked): \
             it answers faults later; use --mode thread, poll or percpu (the default for one)",
        )),
        (Some(mode), _) => Ok(mode),
        (None, true) => Ok(Mode::Percpu),
        (None, false) => Ok(Mode::Sigbus),
    }
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// A source of whole pages over an image whose last page may be partial.
struct Padded {
    inner: Arc<dyn Source>,
    len: u64,
}

impl Source for Padded {
    fn len(&self) -> u64 {
        self.len
    }
    fn fetch<'a>(
        &'a self,
        offset: u64,
        scratch: &'a mut [u8],
    ) -> Result<pager::Fetched<'a>, pager::SourceError> {
        self.inner.fetch(offset, scratch)
    }
    fn zero_ranges(&self) -> Vec<std::ops::Range<u64>> {
        self.inner.zero_ranges()
    }
    fn attach(&self, placer: pager::Placer) {
        self.inner.attach(placer)
    }
    fn child(&self) -> pager::ChildSource {
        match self.inner.child() {
            pager::ChildSource::Own(inner) => pager::ChildSource::Own(Arc::new(Padded {
                inner,
                len: self.len,
            })),
            other => other,
        }
    }
    fn is_signal_safe(&self) -> bool {
        self.inner.is_signal_safe()
    }
}

/// Runs `uffdkit restore`.
pub fn run(args: &Args) -> Result<()> {
    if !(0.0..=1.0).contains(&args.writes) {
        bail!("--writes must be within 0..=1");
    }
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
    let reference = match (&image, &args.reference) {
        (Image::File(f, _), _) => Some(f.try_clone()?),
        (Image::Url(_), Some(path)) => Some(
            uffd_core::private_fs::open_regular(path, false)
                .with_context(|| format!("open {}", path.display()))?,
        ),
        (Image::Url(_), None) => None,
    };
    let pages = (len as usize).div_ceil(PS);
    let touched = touched(args, pages)?;
    let mut outcomes = Vec::new();
    let all = args.strategy == Strategy::All;
    let cold = || -> Result<()> {
        if args.drop_caches {
            nix::unistd::sync();
            std::fs::write("/proc/sys/vm/drop_caches", "3")
                .context("drop the page cache (needs root)")?;
        }
        Ok(())
    };
    if all || args.strategy == Strategy::Pager {
        cold()?;
        outcomes.push(run_pager(args, &image, len, &touched, reference.as_ref())?);
    }
    if all || args.strategy == Strategy::Eager {
        cold()?;
        outcomes.push(run_eager(args, &image, len, &touched, reference.as_ref())?);
    }
    if let (true, Image::File(file, _)) = (all || args.strategy == Strategy::Mmap, &image) {
        cold()?;
        outcomes.push(run_mmap(args, len, &touched, file)?);
    } else if args.strategy == Strategy::Mmap {
        bail!("--strategy mmap needs a local image file");
    }
    let verified = !args.no_verify && reference.is_some();
    if args.json {
        let out: Vec<_> = outcomes
            .iter()
            .map(|o| json!({ "strategy": o.strategy, "total_s": o.total.as_secs_f64(), "detail": o.detail }))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "image": args.image, "image_bytes": len, "touched_pages": touched.len(), "pages": pages,
                "pattern": args.pattern, "writes": args.writes, "verified": verified,
                "cold_cache": args.drop_caches, "results": out,
            }))?
        );
        return Ok(());
    }
    println!(
        "uffdkit restore: {} ({} MiB), workload touches {} of {} pages ({:?}, {:.0} % writes){}",
        args.image,
        len >> 20,
        touched.len(),
        pages,
        args.pattern,
        args.writes * 100.0,
        if verified {
            ", every touched page verified"
        } else {
            ""
        }
    );
    for o in &outcomes {
        println!(
            "  {:<8} {:>9.1} ms   {}",
            o.strategy,
            o.total.as_secs_f64() * 1e3,
            o.detail
        );
    }
    Ok(())
}
