//! `uffdkit migrate source`: the region, its writer workload, the operator's signals.

use super::*;
use uffd_core::pagemap::Pagemap;

/// The source's region, unfilled: anonymous memory, 2 MiB aligned and THP-advised unless
/// `--source-memory 4k`.
fn region(shape: &Shape, size: usize) -> Result<Mapping> {
    if shape.source_memory == "4k" {
        return Mapping::new(MemoryKind::Anon, size).context("map the region");
    }
    let memory = Mapping::anon_aligned(size, HUGE_PAGE_SIZE).context("map the region")?;
    memory
        .madvise(0, size, libc::MADV_HUGEPAGE)
        .context("madvise(MADV_HUGEPAGE) on the region")?;
    Ok(memory)
}

/// Bytes of `memory` the kernel maps with huge pages now (`PAGEMAP_SCAN`'s `PAGE_IS_HUGE`).
fn huge_mapped(memory: &Mapping) -> Result<u64> {
    let end = memory.addr() + memory.len();
    Ok(Pagemap::open()?.huge_bytes(memory.addr(), end)?)
}

/// The source's writer: dirties pages until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl Writer {
    fn start(base: usize, len: usize, workload: Workload, rate_mib: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let pages = (len / 4096) as u64;
            let hot = (pages / 20).max(1);
            let per_s = rate_mib * 256; // 4 KiB pages per second
            let check_every = (per_s / 1000).max(1); // about once a millisecond
            let started = Instant::now();
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = match workload {
                    Workload::Random => x % pages,
                    Workload::Seq => i % pages,
                    Workload::Hot if x % 10 != 0 => (x >> 8) % hot,
                    Workload::Hot => x % pages,
                };
                // SAFETY: inside the region, which outlives this thread (joined at the
                // switch, before the region can go).
                unsafe {
                    let w = ((base + p as usize * 4096) as *mut u64).add((i % 512) as usize);
                    w.write_volatile(w.read_volatile().wrapping_add(x | 1));
                }
                i += 1;
                if per_s > 0 && i % check_every == 0 {
                    // Throttle: i writes should take i / per_s seconds.
                    let due = Duration::from_nanos(i * 1_000_000_000 / per_s);
                    if let Some(ahead) = due.checked_sub(started.elapsed()) {
                        // Parked, not asleep: `stop` unparks it, so the stop (downtime)
                        // does not wait out the throttle.
                        std::thread::park_timeout(ahead);
                    }
                }
            }
            i
        });
        Writer { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.thread().unpark();
        self.thread.join().unwrap_or(0)
    }
}

/// Takes SIGUSR1 (resume) and SIGUSR2 (switch to postcopy) for a migration, on a thread
/// of its own with `sigwait(2)`. Call before starting any other thread.
fn operator_signals(control: Arc<SourceControl>) -> Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    set.add(Signal::SIGUSR2);
    set.thread_block().context("block SIGUSR1 and SIGUSR2")?;
    std::thread::Builder::new()
        .name("operator".into())
        .spawn(move || {
            while let Ok(signal) = set.wait() {
                if signal == Signal::SIGUSR1 {
                    log::info!("SIGUSR1: resume");
                    control.resume();
                } else {
                    log::info!("SIGUSR2: switch to postcopy after this round");
                    control.switch_to_postcopy();
                }
            }
        })
        .context("start the operator thread")?;
    Ok(())
}

pub(super) fn source(a: &SourceArgs) -> Result<()> {
    let security = a.security.security()?;
    let addr: Addr = a.connect.parse()?;
    let ps = a.shape.page_size();
    let size = a.shape.size.div_ceil(ps) * ps;
    let opts = SourceOptions {
        page_size: ps,
        max_rounds: a.shape.precopy_rounds,
        auto_resume: !a.no_auto_resume,
        timing: a.shape.liveness.timing()?,
        ..SourceOptions::default()
    };
    let memory = region(&a.shape, size)?;
    for p in 0..size / 4096 {
        // SAFETY: our fresh mapping; no other thread yet.
        let page =
            unsafe { std::slice::from_raw_parts_mut((memory.addr() + p * 4096) as *mut u8, 4096) };
        fill_page(page, p, 7);
    }
    // SAFETY: `memory` is ours and outlives `run`; only the writer writes it, and the
    // callback stops it.
    let migration = unsafe { Migration::new(addr, security, memory.addr(), size, opts)? };
    let control = migration.control();
    operator_signals(control.clone())?;
    let writer = Arc::new(Mutex::new(Some(Writer::start(
        memory.addr(),
        size,
        a.shape.workload,
        a.shape.dirty_rate,
    ))));
    let status = || {
        let p = &control.progress;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let phase = p.phase();
        let post = &p.postcopy;
        let counters = match phase {
            postcopy::migrate::Phase::Precopy => format!(
                "round {}, precopy {:.0} MiB",
                get(&p.round),
                mib(get(&p.precopy_bytes))
            ),
            _ => format!(
                "precopy {:.0} MiB, postcopy {:.0} MiB: stream {} urgent {} pages, {} requests",
                mib(get(&p.precopy_bytes)),
                mib(get(&post.bytes)),
                get(&post.stream_pages),
                get(&post.urgent_pages),
                get(&post.requests)
            ),
        };
        link_status(format!("{phase:?}"), &p.link, counters)
    };
    let stopper = writer.clone();
    let stopped_at = Arc::new(AtomicU64::new(0));
    let stopped = stopped_at.clone();
    let result = progress::track(module_path!(), "source", status, || {
        migration.run(move || {
            stopped.store(monotonic_ns(), Ordering::Relaxed);
            if let Some(w) = stopper.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let writes = w.stop();
                log::info!("source: workload stopped after {writes} writes");
            }
        })
    });
    if let Some(w) = writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
        w.stop();
    }
    let r = result.context("migration failed")?;
    // Nothing writes the region any more: what is mapped huge now was so at the stop.
    let huge = huge_mapped(&memory).context("scan the region for huge pages")?;
    let report = json!({
        "source_memory": a.shape.source_memory,
        "huge_mapped_at_stop": huge,
        "pages": r.pages,
        "page_size": r.page_size,
        "rounds": r.rounds.iter().map(|x| json!({
            "pages": x.pages, "bytes": x.bytes, "dirty_after": x.dirty_after,
            "ms": x.took.as_secs_f64() * 1e3,
        })).collect::<Vec<_>>(),
        "switch_reason": format!("{:?}", r.switch_reason),
        "precopy_bytes": r.precopy_bytes,
        "postcopy_bytes": r.postcopy_bytes,
        "discarded": r.discarded,
        "needed_at_switch": r.needed_at_switch,
        "stream_pages": r.stream_pages,
        "urgent_pages": r.urgent_pages,
        "requests": r.requests,
        "already_sent": r.already_sent,
        "resent": r.resent,
        "downtime_ms": r.downtime.as_secs_f64() * 1e3,
        "stopped_at_ns": stopped_at.load(Ordering::Relaxed),
        "switch": {
            "early_discard_ms": ms(r.switch.early_discard),
            "stop_ms": ms(r.switch.stop),
            "scan_ms": ms(r.switch.scan),
            "discard_ms": ms(r.switch.discard),
            "listen_ms": ms(r.switch.listen),
            "run_ms": ms(r.switch.run),
        },
        "postcopy_ms": r.postcopy.as_secs_f64() * 1e3,
        "total_ms": r.total.as_secs_f64() * 1e3,
        "reconnects": r.reconnects,
        "verified": r.verified,
        "dropped_at_destination": r.dropped_at_destination,
    });
    print_report(&report, a.json)
}
