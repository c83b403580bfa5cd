//! `uffdkit snapshot`: snapshots of a memory region that writer threads keep writing.
//!
//! `live` takes one live consistent snapshot (userfaultfd write-protect; writes wait only
//! for their own page) and, in the same run, a stop-the-world dump of the same memory, and
//! reports what each cost the workload. `chain` takes a live base and then incremental
//! layers in the chunked image format, and the same memory as one full image to compare.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use snapshot::workload::{fill_initial, Stall, WriterOptions, Writers};
use snapshot::{
    Chain, FileSink, LayerReport, LiveSnapshot, Quiesce, Region, SnapshotReport, Stopped,
};
use uffd_core::{Mapping, MemoryKind, HUGE_PAGE_SIZE};

use crate::migrate::parse_size;
use crate::partial::PartialOutput;
use crate::progress::{self, Status};
use crate::units;

mod chain;
use chain::chain;

/// `uffdkit snapshot` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Args {
    /// A live snapshot of a region being written, and a stop-the-world dump of the same
    /// memory in the same run.
    Live(LiveArgs),
    /// A live base, then incremental layers (chunked images naming their parent), and the
    /// same memory as one full image.
    Chain(ChainArgs),
}

/// The region and its writers.
#[derive(clap::Args, Debug, Clone)]
pub struct Workload {
    /// Region size (K, M, G suffixes).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: usize,
    /// Pages of the region: 4k; thp (anonymous memory with MADV_HUGEPAGE: the kernel maps
    /// 2 MiB where it can, as QEMU's guest memory); or 2m (hugetlb; the pool is grown if
    /// root).
    #[arg(long, default_value = "4k", value_parser = ["4k", "thp", "2m"])]
    page_size: String,
    /// Writer threads.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// 4 KiB pages the writers dirty per second, in MiB/s (0: as fast as they can).
    #[arg(long, default_value_t = 64)]
    dirty_rate: u64,
    /// Where the writes go: random (uniform over the region) or hot (90 % to a hot 5 %).
    #[arg(long, default_value = "random", value_parser = ["random", "hot"])]
    workload: String,
}

/// Options of `uffdkit snapshot live`.
#[derive(clap::Args, Debug)]
pub struct LiveArgs {
    #[command(flatten)]
    workload: Workload,
    /// Threads saving in the background (default: one per CPU but one, at least one).
    #[arg(long)]
    savers: Option<usize>,
    /// Threads serving write faults.
    #[arg(long, default_value_t = 1)]
    handlers: usize,
    /// Background batch, KiB.
    #[arg(long, default_value_t = (snapshot::DEFAULT_BATCH / 1024) as u64)]
    batch_kib: u64,
    /// Where the snapshot goes (a sparse raw memory file).
    #[arg(long)]
    out: PathBuf,
    /// Seconds the writers run before the snapshot (the same span is the no-snapshot
    /// baseline of blocked writes).
    #[arg(long, default_value_t = 2.0)]
    warm_up: f64,
    /// Skip the stop-the-world dump.
    #[arg(long)]
    no_baseline: bool,
    /// Log every write and check that the snapshot is the memory at one instant (needs
    /// twice the region in memory, and 4 bytes per write).
    #[arg(long)]
    verify: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Options of `uffdkit snapshot chain`.
#[derive(clap::Args, Debug)]
pub struct ChainArgs {
    #[command(flatten)]
    workload: Workload,
    /// The base image's URL (file:///dir/NAME, s3://…); layer k is NAME.k beside it.
    #[arg(long)]
    url: String,
    /// Layers after the base (at least one: the writers stop before the last).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    layers: u32,
    /// Of those, the last N are taken with the writers stopped (at least 1, so that the
    /// reference and the full image hold exactly the last layer's memory). The first of
    /// them holds what was written since the layer before; the later ones find nothing
    /// written and inherit every chunk.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    still_layers: u32,
    /// Seconds between snapshots.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Chunk size in KiB: the granule of change of the layers.
    #[arg(long, default_value_t = 64)]
    chunk_kib: u32,
    /// Directory for the base's raw file while it is pushed (and the reference).
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// Keep the memory at the last layer as a raw file here (to verify a restore with
    /// `uffdkit restore --image URL.N --reference FILE`).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `uffdkit snapshot …`.
pub fn run(args: &Args) -> Result<()> {
    match args {
        Args::Live(a) => live(a),
        Args::Chain(a) => chain(a),
    }
}

impl Workload {
    fn kind(&self) -> MemoryKind {
        if self.page_size == "2m" {
            MemoryKind::HugetlbPrivate
        } else {
            MemoryKind::Anon
        }
    }

    /// The region, filled with the workload's initial content.
    fn region(&self) -> Result<Mapping> {
        let kind = self.kind();
        if kind.is_hugetlb() {
            let want = self.size.div_ceil(HUGE_PAGE_SIZE);
            let free = crate::hugepages::reserve(want);
            if free < want {
                bail!("{want} free 2 MiB pages needed, {free} available");
            }
        }
        let map = if self.page_size == "thp" {
            let map = Mapping::anon_aligned(self.size, HUGE_PAGE_SIZE).context("map the region")?;
            map.madvise(0, map.len(), libc::MADV_HUGEPAGE)
                .context("madvise(MADV_HUGEPAGE)")?;
            map
        } else {
            Mapping::new(kind, self.size).context("map the region")?
        };
        // SAFETY: a fresh mapping of ours; nothing else uses it yet.
        fill_initial(unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), map.len()) });
        Ok(map)
    }

    fn writers(&self, map: &Mapping, log: bool) -> Writers {
        let options = WriterOptions {
            threads: self.writers.max(1),
            rate_mib: self.dirty_rate,
            hot: self.workload == "hot",
            // Enough for minutes at any rate this machine reaches with a snapshot running.
            log_capacity: if log { 256 << 20 } else { 0 },
            ..WriterOptions::default()
        };
        // SAFETY: the mapping outlives the writers (they are stopped before it goes).
        unsafe { Writers::start(map.addr(), map.len(), &options) }
    }

    fn describe(&self) -> String {
        let rate = if self.dirty_rate == 0 {
            "unthrottled".to_owned()
        } else {
            format!("dirtying {} MiB/s", self.dirty_rate)
        };
        format!(
            "{} of {} pages, {} {} writer(s) {rate}",
            units::bytes(self.size as u64),
            match self.page_size.as_str() {
                "2m" => "2 MiB hugetlb",
                "thp" => "transparent huge",
                _ => "4 KiB",
            },
            self.writers,
            self.workload
        )
    }
}

/// Blocked writes that ended in a window of the writers' run (and began after `began`).
fn stalls_in(stalls: &[Stall], from: Duration, to: Duration, began: Duration) -> serde_json::Value {
    let mut took: Vec<Duration> = stalls
        .iter()
        .filter(|s| s.at >= from && s.at <= to && s.at.saturating_sub(s.took) > began)
        .map(|s| s.took)
        .collect();
    took.sort_unstable();
    let q = |p: f64| {
        took.get(((took.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    json!({
        "count": took.len(),
        "p50_us": q(0.5), "p99_us": q(0.99), "max_us": q(1.0),
        "total_ms": took.iter().sum::<Duration>().as_secs_f64() * 1e3,
    })
}

fn describe_stalls(v: &serde_json::Value) -> String {
    format!(
        "{} blocked writes, p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs, {:.1} ms blocked in all",
        v["count"],
        v["p50_us"].as_f64().unwrap_or(0.0),
        v["p99_us"].as_f64().unwrap_or(0.0),
        v["max_us"].as_f64().unwrap_or(0.0),
        v["total_ms"].as_f64().unwrap_or(0.0)
    )
}

fn region_of(map: &Mapping) -> Region {
    Region::new(map.addr(), map.len(), map.kind(), 0)
}

/// Takes a live snapshot with a progress display.
fn take_live(
    map: &Mapping,
    sink: Arc<FileSink>,
    savers: Option<usize>,
    handlers: usize,
    batch: usize,
    track_writes: bool,
) -> Result<LiveSnapshot> {
    let mut builder = LiveSnapshot::builder()
        .region(region_of(map))
        .batch(batch)
        .handlers(handlers)
        .track_writes(track_writes);
    if let Some(n) = savers {
        builder = builder.savers(n);
    }
    // SAFETY: the mapping outlives the snapshot (finished or dropped before it goes), and
    // no other userfaultfd is registered on it.
    let mut live = unsafe { builder.start(sink) }.context("start the live snapshot")?;
    let total = live.progress().1;
    let status = std::sync::Mutex::new((0u64, total));
    progress::track(
        "uffdkit::snapshot",
        "live snapshot",
        || {
            let (saved, total) = *status.lock().unwrap_or_else(|p| p.into_inner());
            Status {
                phase: String::new(),
                fraction: Some((saved, total)),
                text: format!("{saved} of {total} pages saved"),
            }
        },
        || -> Result<()> {
            while !live.wait_saved(Some(Duration::from_millis(50)))? {
                *status.lock().unwrap_or_else(|p| p.into_inner()) = live.progress();
            }
            Ok(())
        },
    )?;
    Ok(live)
}

fn snapshot_json(r: &SnapshotReport) -> serde_json::Value {
    json!({
        "elapsed_ms": r.elapsed.as_secs_f64() * 1e3,
        "cut_ms": r.protect.as_secs_f64() * 1e3,
        "pages": r.pages, "saved_by_fault": r.saved_by_fault,
        "saved_in_background": r.saved_in_background, "faults": r.faults,
        "waited_for_batch": r.waited_for_batch,
        "fault_service_p50_us": r.fault_service.quantile(0.5).map(|d| d.as_secs_f64() * 1e6),
        "fault_service_p99_us": r.fault_service.quantile(0.99).map(|d| d.as_secs_f64() * 1e6),
    })
}

fn live(args: &LiveArgs) -> Result<()> {
    // Before any thread: an interrupted snapshot leaves no file that looks whole.
    crate::partial::remove_on_termination()?;
    let w = &args.workload;
    let map = w.region()?;
    // The output first (a full-length sparse file under a temporary name), so that
    // nothing is run for an output that cannot be written.
    let (file, out) = PartialOutput::create(&args.out)?;
    let sink = Arc::new(FileSink::from_file(
        file,
        out.temp_path().to_owned(),
        map.len() as u64,
    )?);
    let mut writers = w.writers(&map, args.verify);
    let warm = Duration::from_secs_f64(args.warm_up.max(0.1));
    std::thread::sleep(warm);
    let from = writers.started().elapsed();
    let writes_before = writers.writes();
    let live = take_live(
        &map,
        sink.clone(),
        args.savers,
        args.handlers,
        (args.batch_kib as usize) << 10,
        false,
    )?;
    let report = live.finish().context("live snapshot")?;
    // Every page saved: the snapshot is whole, and takes its name.
    out.commit()?;
    let to = writers.started().elapsed();
    let writes_during = writers.writes() - writes_before;
    let span = to - from;
    std::thread::sleep(Duration::from_millis(200));
    let baseline = if args.no_baseline {
        None
    } else {
        // Never kept: dropped (removed) at the end of this block.
        let (file, stw) = PartialOutput::create(&args.out.with_extension("stw"))?;
        let sink = FileSink::from_file(file, stw.temp_path().to_owned(), map.len() as u64)?;
        let paused = Instant::now();
        writers
            .pause()
            .map_err(|e| anyhow::anyhow!("pause the writers: {e}"))?;
        // SAFETY: the writers are paused; the mapping is ours.
        let dump = unsafe { snapshot::dump(&[region_of(&map)], &sink, args.savers.unwrap_or(2)) };
        writers
            .resume()
            .map_err(|e| anyhow::anyhow!("resume the writers: {e}"))?;
        let paused = paused.elapsed();
        drop(stw);
        Some((dump.context("stop-the-world dump")?, paused))
    };
    let log = writers.stop();
    let stalls = log.stalls();
    let during = stalls_in(&stalls, from, to, Duration::ZERO);
    // Writes that began once every page was protected: what serving a fault costs, without
    // the writes held while the cut was still being applied (consistency holds those until
    // it is complete).
    let after_cut = stalls_in(&stalls, from, to, from + report.protect);
    let before = stalls_in(
        &stalls,
        from.saturating_sub(span.min(warm)),
        from,
        Duration::ZERO,
    );
    let verified = if args.verify {
        let mut expected = vec![0u8; map.len()];
        fill_initial(&mut expected);
        let got =
            std::fs::read(&args.out).with_context(|| format!("read {}", args.out.display()))?;
        let cut = log
            .check_cut(&mut expected, &got)
            .map_err(|e| anyhow::anyhow!("the snapshot is not one instant of the run: {e}"))?;
        Some(cut.included)
    } else {
        None
    };
    let v = json!({
        "region_bytes": map.len(), "page_size": map.page_size(), "writers": w.writers,
        "dirty_rate_mib": w.dirty_rate, "workload": w.workload,
        "live": snapshot_json(&report),
        "live_stalls": during, "live_stalls_after_cut": after_cut, "no_snapshot_stalls": before,
        "writes_during_snapshot": writes_during,
        "stop_the_world": baseline.map(|(d, p)| json!({
            "dump_ms": d.elapsed.as_secs_f64() * 1e3, "paused_ms": p.as_secs_f64() * 1e3,
        })),
        "verified_cut": verified,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "live snapshot of {} to {}:",
        w.describe(),
        args.out.display()
    );
    println!(
        "  cut (write-protect everything) {:.1} ms; all {} pages saved after {:.0} ms ({} by a write's fault, {} in the background)",
        report.protect.as_secs_f64() * 1e3,
        report.pages,
        report.elapsed.as_secs_f64() * 1e3,
        report.saved_by_fault,
        report.saved_in_background
    );
    println!("  workload meanwhile: {}", describe_stalls(&during));
    println!(
        "  of which begun after the cut: {}",
        describe_stalls(&after_cut)
    );
    println!(
        "  same span before, no snapshot: {}",
        describe_stalls(&before)
    );
    if let Some((d, p)) = baseline {
        println!(
            "stop-the-world dump of the same memory: {:.0} ms; the workload paused {:.0} ms",
            d.elapsed.as_secs_f64() * 1e3,
            p.as_secs_f64() * 1e3
        );
    }
    if let Some(cut) = v["verified_cut"].as_array() {
        println!("verified: the snapshot is the memory at one instant of the run (writes included per writer, of those logged: {cut:?})");
    }
    Ok(())
}

/// `fc-handler --diff`'s source: Firecracker's memory file `base` with its diff snapshots
/// over it (oldest first), served as one memory file without `rebase-snap`.
pub fn diff_chain_source(base: &Path, diffs: &[PathBuf]) -> Result<Arc<dyn pager::Source>> {
    let source = snapshot::LayeredSource::open(base, diffs).with_context(|| {
        format!(
            "the diff-snapshot chain of {} ({} diff(s))",
            base.display(),
            diffs.len()
        )
    })?;
    Ok(Arc::new(source))
}
