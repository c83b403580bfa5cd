//! `uffdkit restore`: run a workload over memory restored lazily from an image — a local
//! file, or a chunked image in an object store (`--image s3://…`) — and the same workload
//! over the alternatives measured the same way: eager (read the whole file, or download
//! the whole image, then run) and `mmap(MAP_PRIVATE)` of the file (the kernel's lazy
//! loading). `--writes F` makes that share of touches writes, so every strategy pays what
//! a guest pays: `mmap` its copy-on-write, the others nothing more.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
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
mod compare;
mod lazy;
mod plots;
mod timeline;

pub use compare::run;

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
    /// Delivery mode, or several (comma separated: the pager runs once in each). Default:
    /// sigbus for a file (fastest for in-process memory, see `uffdkit bench`), percpu for
    /// a chunked source (it answers faults later, which sigbus cannot wait for).
    #[arg(long = "mode", value_enum, value_delimiter = ',')]
    modes: Vec<Mode>,
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
    /// Drop the page cache before each run (root), so each starts cold as a snapshot
    /// restore on a fresh host does. Without it every run of a local image starts warm:
    /// the image is read once first.
    #[arg(long)]
    drop_caches: bool,
    /// Runs of each strategy (and mode), their order rotated from one round to the next;
    /// min, median and max are reported.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Restore these sizes of the image (its first SIZE bytes; comma separated: 1G,2G,4G)
    /// and report time per GiB and the growth exponent.
    #[arg(long, value_delimiter = ',', value_parser = crate::sweep::size_arg)]
    sizes: Vec<u64>,
    /// Draw the pages placed over time, the touch-latency CDF of each strategy and (with
    /// --sizes) the size sweep into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
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
/// a store to it), timing every touch, and counts its touches into `progress` after each
/// one. Returns the touch latencies in nanoseconds.
fn run_workload(base: usize, pages: &[usize], writes: f64, progress: &AtomicUsize) -> Workload {
    let before = ThreadTimes::now();
    let mut lat = Vec::with_capacity(pages.len());
    let mut sum = 0u64;
    for (i, &p) in pages.iter().enumerate() {
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
        // Every touch, not every n-th: the sampler reads a count that stood still for a
        // stall, and a count published in batches stands still between them. Relaxed: a
        // count sampled as a hint; an uncontended store costs next to nothing beside a touch.
        progress.store(i + 1, Ordering::Relaxed);
    }
    std::hint::black_box(sum);
    Workload {
        lat,
        times: ThreadTimes::since(ThreadTimes::now(), before),
    }
}

/// What the workload measured: each touch's latency (ns) and where its time went.
struct Workload {
    lat: Vec<u32>,
    times: Option<ThreadTimes>,
}

/// The calling thread's time on a CPU and waiting on a run queue for one
/// (`/proc/thread-self/schedstat`, kernel schedstats): of a workload's wall time, what is
/// neither was spent blocked — waiting on a handler or a prefetcher, never on the machine.
#[derive(Debug, Clone, Copy)]
struct ThreadTimes {
    on_cpu: Duration,
    run_queue: Duration,
}

impl ThreadTimes {
    fn now() -> Option<ThreadTimes> {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
        Some(ThreadTimes {
            on_cpu: Duration::from_nanos(fields.next()??),
            run_queue: Duration::from_nanos(fields.next()??),
        })
    }

    /// The times from `before` to `now`.
    fn since(now: Option<Self>, before: Option<Self>) -> Option<ThreadTimes> {
        let (now, before) = (now?, before?);
        Some(ThreadTimes {
            on_cpu: now.on_cpu.saturating_sub(before.on_cpu),
            run_queue: now.run_queue.saturating_sub(before.run_queue),
        })
    }

    fn json(times: Option<ThreadTimes>, wall: Duration) -> serde_json::Value {
        match times {
            Some(t) => json!({
                "workload_on_cpu_s": t.on_cpu.as_secs_f64(),
                "workload_run_queue_s": t.run_queue.as_secs_f64(),
                "workload_blocked_s": wall.saturating_sub(t.on_cpu + t.run_queue).as_secs_f64(),
            }),
            None => json!({}),
        }
    }
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

/// One timed run of one strategy.
struct Outcome {
    strategy: &'static str,
    total: Duration,
    detail: serde_json::Value,
    /// Touch latencies (ns), for the plot.
    lat: Vec<u32>,
    /// The pager's counters over time (the pager only).
    timeline: Vec<timeline::Sample>,
}

/// The common report of a timed workload.
fn workload_detail(w: &Workload, wall: Duration) -> serde_json::Value {
    let first_us = w.lat.first().map(|&ns| f64::from(ns) / 1e3);
    let s = summarize(w.lat.clone(), wall);
    let mut detail = json!({
        "workload_s": wall.as_secs_f64(),
        "touch_p50_us": s.p50_us, "touch_p99_us": s.p99_us, "touch_max_us": s.max_us,
        "first_touch_us": first_us,
    });
    merge(&mut detail, ThreadTimes::json(w.times, wall));
    detail
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

/// The delivery modes: those asked for, or the fastest that can serve the source.
fn delivery_modes(asked: &[Mode], chunked: bool) -> Result<Vec<Mode>> {
    if chunked && asked.contains(&Mode::Sigbus) {
        return Err(crate::exit::usage(
            "--mode sigbus cannot serve a chunked source (--image URL or --source chunked): \
             it answers faults later; use --mode thread, poll or percpu (the default for one)",
        ));
    }
    let mut modes = asked.to_vec();
    modes.dedup();
    if modes.is_empty() {
        modes.push(if chunked { Mode::Percpu } else { Mode::Sigbus });
    }
    Ok(modes)
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pager::{Fetched, SourceError};
    use std::sync::Mutex;

    /// A source that notes, for each page it is asked for, the workload's progress count
    /// then: the touch that faulted is blocked, so the count is what it published before.
    struct Noting {
        len: u64,
        progress: Arc<AtomicUsize>,
        asked: Mutex<Vec<(usize, usize)>>,
    }

    impl Source for Noting {
        fn len(&self) -> u64 {
            self.len
        }

        fn fetch<'a>(
            &'a self,
            offset: u64,
            scratch: &'a mut [u8],
        ) -> Result<Fetched<'a>, SourceError> {
            let seen = self.progress.load(Ordering::Relaxed);
            self.asked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((offset as usize / PS, seen));
            scratch.fill(0x5a);
            Ok(Fetched::Data(scratch))
        }
    }

    #[test]
    fn the_workload_has_published_every_earlier_touch_when_a_touch_faults() {
        let pages = 600;
        let progress = Arc::new(AtomicUsize::new(0));
        let source = Arc::new(Noting {
            len: (pages * PS) as u64,
            progress: progress.clone(),
            asked: Mutex::new(Vec::new()),
        });
        let memory = Arc::new(Mapping::new(MemoryKind::Anon, pages * PS).expect("map"));
        let uffd = Uffd::builder().non_blocking(true).open().expect("uffd");
        let pager = Pager::builder(uffd, source.clone())
            .mapping(memory.clone(), 0)
            .start()
            .expect("pager");
        let order = order(Pattern::Random, pages, 7);
        run_workload(memory.addr(), &order, 0.0, &progress);
        pager.stop().expect("stop");
        let asked = source.asked.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(asked.len(), pages, "each touch faulted once");
        for &(page, seen) in asked.iter() {
            let touch = order
                .iter()
                .position(|&p| p == page)
                .expect("a touched page");
            assert_eq!(seen, touch, "page {page}, touch {touch}");
        }
        assert_eq!(progress.load(Ordering::Relaxed), pages);
    }
}
