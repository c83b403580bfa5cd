//! The lazy restore: the pager serves the image while the workload runs, its counters
//! sampled over time.

use super::*;
use crate::stretched::Stretched;

pub(super) fn run_pager(
    args: &Args,
    image: &Image,
    len: u64,
    mode: Mode,
    pages: &[usize],
    reference: Option<&std::fs::File>,
) -> Result<Outcome> {
    let map_len = (len as usize).next_multiple_of(PS);
    // Before the image is opened: the download baseline's clock (`run_eager`) counts its
    // open too, and a remote image's open (manifest, first round trips) is restore time.
    let start = Instant::now();
    let chunked_source = match image {
        Image::Url(url) => Some(crate::image::open_source(
            url,
            &args.chunked,
            background(args, map_len / PS)?,
        )?),
        Image::File(..) => None,
    };
    let is_chunked = chunked_source.is_some() || args.source == SourceKind::Chunked;
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, map_len)?);
    let extra = if mode == Mode::Sigbus {
        Features::SIGBUS
    } else {
        Features::empty()
    };
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
    let padded: Arc<dyn Source> = Arc::new(Stretched::padded(source, map_len as u64));
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
    let progress = Arc::new(AtomicUsize::new(0));
    let counted = progress.clone();
    let (lat, timeline) = timeline::sampled(&pager, &progress, start, || {
        crate::progress::track(module_path!(), "restore", restored, || {
            crate::guarded::run(&pager, memory.clone(), move || {
                run_workload(base, &touches, writes, &counted)
            })
        })
    });
    let Some(work) = lat? else {
        return Err(crate::guarded::stopped(pager));
    };
    let wall = t.elapsed();
    let total = start.elapsed();
    // Before they end: the pager's threads were started for this run.
    let threads = thread_times();
    let stats = pager.stop()?;
    crate::guarded::disarm();
    if let (false, Some(file)) = (args.no_verify, reference) {
        verify(memory.addr(), file, pages, len, args.writes)?;
    }
    let mut detail = workload_detail(&work, wall);
    let stall = timeline::longest_stall(&timeline, pages.len() as u64);
    let extra = json!({
        "mode": mode,
        "faults": stats.faults(),
        "faults_duplicate": stats.faults_duplicate,
        "faults_wake_only": stats.faults_wake_only,
        "exists": stats.exists,
        "released": stats.released,
        "placed_fault": stats.placed_fault,
        "placed_prefetch": stats.placed_prefetch,
        "placed_arrival": stats.placed_arrival,
        "placed_zero": stats.placed_zero,
        "fault_p50_us": stats.latency.quantile(0.5).map(|d| d.as_micros()),
        "fault_p99_us": stats.latency.quantile(0.99).map(|d| d.as_micros()),
        "histogram": stats.latency.lines(),
        "blocktime_s": stats.blocktime.as_secs_f64(),
        "longest_stall_s": stall.map(|s| s.0),
        "longest_stall_at_s": stall.map(|s| s.1),
        "threads": threads,
    });
    merge(&mut detail, extra);
    if let Some(c) = &chunked_source {
        let s = c.stats();
        merge(
            &mut detail,
            json!({
                "bytes_fetched": s.fetch.bytes_fetched, "chunks_fetched": s.fetch.chunks_fetched,
                "reads": s.fetch.reads, "cache_hits": s.fetch.cache_hits, "peer_waits": s.fetch.peer_waits,
                "overtaken": s.fetch.overtaken,
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
        lat: work.lat,
        timeline,
    })
}

/// On-CPU and run-queue seconds of each of the pager's threads (by name, summed over
/// threads of one name), from their schedstats: who used the CPU, who waited for one.
fn thread_times() -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let Ok(tasks) = std::fs::read_dir("/proc/thread-self/../../task") else {
        return serde_json::Value::Object(out);
    };
    for task in tasks.flatten() {
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).ok();
        let (Some(comm), Some(stat)) = (read("comm"), read("schedstat")) else {
            continue;
        };
        let comm = comm.trim();
        if !comm.starts_with("uffd-") {
            continue;
        }
        let ns: Vec<f64> = stat
            .split_whitespace()
            .take(2)
            .filter_map(|f| f.parse::<f64>().ok())
            .collect();
        if let [on_cpu, run_queue] = ns[..] {
            let entry = out.entry(comm.to_string()).or_insert(json!([0.0, 0.0]));
            entry[0] = json!(entry[0].as_f64().unwrap_or(0.0) + on_cpu / 1e9);
            entry[1] = json!(entry[1].as_f64().unwrap_or(0.0) + run_queue / 1e9);
        }
    }
    serde_json::Value::Object(out)
}
