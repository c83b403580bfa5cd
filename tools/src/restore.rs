//! `uffdkit restore`: run a workload over memory restored lazily from an image file, and
//! the same workload over the two alternatives measured the same way: eager (read the
//! whole file, then run) and `mmap(MAP_PRIVATE)` of the file (the kernel's lazy loading).

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pager::{DeliveryMode, FileSource, Pager, RegionSpec, Source};
use serde_json::json;
use uffd_core::{Features, Mapping, MemoryKind, Uffd};

use crate::cli_args::{Mode, PrefetchArgs};
use crate::workload::{order, Pattern};

/// How the image file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// pread(2) per page.
    Pread,
    /// Copies out of a read-only mapping.
    Mmap,
    /// pread(2), with the file's holes known as zero.
    Sparse,
}

/// What to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// The pager (lazy, with the chosen prefetch).
    Pager,
    /// Read the whole file into anonymous memory, then run.
    Eager,
    /// mmap(MAP_PRIVATE) the file and run.
    Mmap,
    /// All three, one after the other.
    All,
}

/// Options of `uffdkit restore`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The memory image.
    #[arg(long)]
    image: PathBuf,
    /// Delivery mode (SIGBUS is fastest for in-process memory, see `uffdkit bench`).
    #[arg(long, value_enum, default_value_t = Mode::Sigbus)]
    mode: Mode,
    /// How the pager reads the image (mmap lets the kernel's readahead batch a cold read).
    #[arg(long, value_enum, default_value_t = SourceKind::Mmap)]
    source: SourceKind,
    #[command(flatten)]
    prefetch: PrefetchArgs,
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
    let all = order(args.pattern, pages, 0xC0FFEE);
    let n = ((pages as f64) * args.touch).round() as usize;
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

/// Reads one byte of each touched page; returns the elapsed time.
fn run_workload(base: usize, pages: &[usize]) -> u64 {
    let mut sum = 0u64;
    for &p in pages {
        // SAFETY: callers map every page of the image at `base`.
        sum = sum.wrapping_add(u64::from(unsafe {
            std::ptr::read_volatile((base + p * PS) as *const u8)
        }));
    }
    sum
}

fn verify(base: usize, file: &std::fs::File, pages: &[usize], len: u64) -> Result<()> {
    let mut want = vec![0u8; PS];
    for &p in pages {
        let off = (p * PS) as u64;
        let n = (len - off).min(PS as u64) as usize;
        want.fill(0);
        file.read_exact_at(&mut want[..n], off)
            .context("read image for verification")?;
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

fn run_pager(args: &Args, len: u64, pages: &[usize], file: &std::fs::File) -> Result<Outcome> {
    let source: Arc<dyn Source> = match args.source {
        SourceKind::Pread => Arc::new(FileSource::pread(&args.image)?),
        SourceKind::Mmap => Arc::new(FileSource::mmap(&args.image)?),
        SourceKind::Sparse => Arc::new(FileSource::sparse(&args.image)?),
    };
    let map_len = (len as usize).next_multiple_of(PS);
    let memory = Mapping::new(MemoryKind::Anon, map_len)?;
    let extra = if args.mode == Mode::Sigbus {
        Features::SIGBUS
    } else {
        Features::empty()
    };
    let start = Instant::now();
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
        .region(RegionSpec::new(
            memory.addr(),
            memory.len(),
            MemoryKind::Anon,
            0,
        ))
        .mode(DeliveryMode::from(args.mode));
    let pager = args.prefetch.apply(builder, map_len / PS)?.start()?;
    let t = Instant::now();
    let restored = || {
        let s = pager.stats();
        let placed = s.placed_fault + s.placed_prefetch + s.placed_zero;
        crate::progress::Status {
            phase: String::new(),
            fraction: Some((placed, (map_len / PS) as u64)),
            text: format!("{placed} pages in, {} faults", s.faults()),
        }
    };
    crate::progress::track(module_path!(), "restore", restored, || {
        run_workload(memory.addr(), pages)
    });
    let workload = t.elapsed();
    let total = start.elapsed();
    let stats = pager.stop()?;
    if !args.no_verify {
        verify(memory.addr(), file, pages, len)?;
    }
    Ok(Outcome {
        strategy: "pager",
        total,
        detail: json!({
            "workload_s": workload.as_secs_f64(),
            "faults": stats.faults(),
            "placed_fault": stats.placed_fault,
            "placed_prefetch": stats.placed_prefetch,
            "placed_zero": stats.placed_zero,
            "p50_us": stats.latency.quantile(0.5).map(|d| d.as_micros()),
            "p99_us": stats.latency.quantile(0.99).map(|d| d.as_micros()),
            "blocktime_s": stats.blocktime.as_secs_f64(),
            "histogram": stats.latency.lines(),
        }),
    })
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
    fn is_signal_safe(&self) -> bool {
        self.inner.is_signal_safe()
    }
}

fn run_eager(args: &Args, len: u64, pages: &[usize], file: &std::fs::File) -> Result<Outcome> {
    let start = Instant::now();
    let memory = Mapping::new(MemoryKind::Anon, (len as usize).next_multiple_of(PS))?;
    // SAFETY: our fresh mapping of at least `len` bytes.
    let dst = unsafe { std::slice::from_raw_parts_mut(memory.as_ptr(), len as usize) };
    file.read_exact_at(dst, 0).context("read the image")?;
    let loaded = start.elapsed();
    run_workload(memory.addr(), pages);
    let total = start.elapsed();
    if !args.no_verify {
        verify(memory.addr(), file, pages, len)?;
    }
    Ok(Outcome {
        strategy: "eager",
        total,
        detail: json!({ "load_s": loaded.as_secs_f64() }),
    })
}

fn run_mmap(args: &Args, len: u64, pages: &[usize], file: &std::fs::File) -> Result<Outcome> {
    let start = Instant::now();
    // SAFETY: a fresh private read-only mapping of the open file.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    run_workload(addr as usize, pages);
    let total = start.elapsed();
    let checked = if args.no_verify {
        Ok(())
    } else {
        verify(addr as usize, file, pages, len)
    };
    // SAFETY: our mapping, no longer used.
    unsafe { libc::munmap(addr, len as usize) };
    checked?;
    Ok(Outcome {
        strategy: "mmap",
        total,
        detail: json!({}),
    })
}

/// Runs `uffdkit restore`.
pub fn run(args: &Args) -> Result<()> {
    let file = std::fs::File::open(&args.image)
        .with_context(|| format!("open {}", args.image.display()))?;
    let len = file.metadata()?.len();
    if len == 0 {
        bail!("{} is empty", args.image.display());
    }
    let pages = (len as usize).div_ceil(PS);
    let touched = touched(args, pages)?;
    let mut outcomes = Vec::new();
    let all = args.strategy == Strategy::All;
    let cold = || -> Result<()> {
        if args.drop_caches {
            // SAFETY: sync(2) has no preconditions.
            unsafe { libc::sync() };
            std::fs::write("/proc/sys/vm/drop_caches", "3")
                .context("drop the page cache (needs root)")?;
        }
        Ok(())
    };
    if all || args.strategy == Strategy::Pager {
        cold()?;
        outcomes.push(run_pager(args, len, &touched, &file)?);
    }
    if all || args.strategy == Strategy::Eager {
        cold()?;
        outcomes.push(run_eager(args, len, &touched, &file)?);
    }
    if all || args.strategy == Strategy::Mmap {
        cold()?;
        outcomes.push(run_mmap(args, len, &touched, &file)?);
    }
    if args.json {
        let out: Vec<_> = outcomes
            .iter()
            .map(|o| json!({ "strategy": o.strategy, "total_s": o.total.as_secs_f64(), "detail": o.detail }))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "image_bytes": len, "touched_pages": touched.len(), "pages": pages,
                "pattern": args.pattern, "verified": !args.no_verify, "cold_cache": args.drop_caches,
            "results": out,
            }))?
        );
        return Ok(());
    }
    println!(
        "uffdkit restore: {} ({} MiB), workload touches {} of {} pages ({:?}){}",
        args.image.display(),
        len >> 20,
        touched.len(),
        pages,
        args.pattern,
        if args.no_verify {
            ""
        } else {
            ", every touched page verified"
        }
    );
    for o in &outcomes {
        println!(
            "  {:<6} {:>9.1} ms   {}",
            o.strategy,
            o.total.as_secs_f64() * 1e3,
            o.detail
        );
    }
    Ok(())
}
