//! `uffdkit migrate dest`: receives the region and runs a workload from RUN on.

use super::*;

/// The destination's workload: one content-preserving write per 4 KiB page, in
/// the workload's order; returns how long it took to touch every page.
pub(super) fn touch_all(base: usize, len: usize, workload: Workload) -> Duration {
    let t = Instant::now();
    let pages = len / 4096;
    let order: Vec<usize> = match workload {
        Workload::Seq => (0..pages).collect(),
        Workload::Random => crate::workload::order(crate::workload::Pattern::Random, pages, 7),
        Workload::Hot => {
            let hot = (pages / 20).max(1);
            (0..hot).chain(hot..pages).collect()
        }
    };
    for p in order {
        // A volatile read then a volatile write of the same value: a write fault on a
        // missing page that changes nothing (this thread is the only writer).
        // SAFETY: the migrated region, mapped until the process exits (the report owns it).
        unsafe {
            let w = (base + p * 4096) as *mut u64;
            w.write_volatile(w.read_volatile());
        }
    }
    t.elapsed()
}

/// `--die-after-pages`: SIGKILLs this process once that many pages were placed.
fn die_after(control: Arc<postcopy::migrate::DestControl>, pages: u64) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(1));
        let arrived = control.received.placed.load(Ordering::Relaxed);
        if arrived >= pages {
            log::warn!("dest: fault injection: dying after {arrived} postcopy pages");
            let _ = nix::sys::signal::raise(Signal::SIGKILL);
        }
    });
}

pub(super) fn dest(a: &DestArgs) -> Result<()> {
    let security = a.security.security()?;
    let addr: Addr = a.listen.parse()?;
    let socket_file = crate::signals::remove_socket_on_termination(&addr)?;
    if let Some(pages) = a.reserve_hugepages {
        let free = crate::hugepages::reserve(pages);
        if free < pages {
            bail!("{pages} free 2 MiB huge pages are needed, {free} could be had");
        }
    }
    let opts = DestOptions {
        mode: a.mode.into(),
        timing: a.liveness.timing()?,
        huge_pages: a.huge_pages,
        ..DestOptions::default()
    };
    raise_open_files();
    let d = socket_file
        .bind(
            || Destination::bind(&addr, security, opts),
            Destination::socket_file,
        )
        .context("bind")?;
    println!("LISTEN {}", d.local_addr()?);
    std::io::stdout().flush()?;
    let control = d.control();
    if let Some(pages) = a.die_after_pages {
        die_after(control.clone(), pages);
    }
    let status = || {
        let r = &control.received;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let counters = format!(
            "precopy {} pages, postcopy {} pages, {} requested",
            get(&r.copied),
            get(&r.placed),
            get(&r.requested)
        );
        link_status(format!("{:?}", control.phase()), &control.link, counters)
    };
    let workload = a.workload;
    let touched: Arc<Mutex<Option<JoinHandle<Duration>>>> = Arc::default();
    let t = touched.clone();
    let resumed_at = Arc::new(AtomicU64::new(0));
    let resumed = resumed_at.clone();
    let result = progress::track(module_path!(), "dest", status, || {
        d.run(move |mem| {
            resumed.store(monotonic_ns(), Ordering::Relaxed);
            *t.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::thread::spawn(move || {
                touch_all(mem.base, mem.len, workload)
            }));
        })
    });
    let r = result.context("migration failed")?;
    let workload_ms = touched
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .and_then(|h| h.join().ok())
        .map(|d| d.as_secs_f64() * 1e3);
    let report = json!({
        "pages": r.pages,
        "page_size": r.page_size,
        "precopy_pages": r.precopy_pages,
        "discarded": r.discarded,
        "postcopy_pages": r.postcopy_pages,
        "requested": r.requested,
        "latency_buckets_log2_us": r.pager.latency.counts().to_vec(),
        "fault_p50_us": quantile_us(&r.pager.latency, 0.5),
        "fault_p99_us": quantile_us(&r.pager.latency, 0.99),
        "blocktime_ms": r.pager.blocktime.as_secs_f64() * 1e3,
        "postcopy_ms": r.postcopy.as_secs_f64() * 1e3,
        "switch": {
            "discard_ms": ms(r.switch.discard),
            "listen_ms": ms(r.switch.listen),
            "run_ms": ms(r.switch.run),
        },
        "workload_ms": workload_ms,
        "resumed_at_ns": resumed_at.load(Ordering::Relaxed),
        "reconnects": r.reconnects,
        "faults": r.pager.faults(),
        // What each fault needed: a wake (its page was placed already, e.g. arrived while
        // the fault was read), a request to the source, nothing new (its page was already
        // requested), or else a zero page placed here (the rest: the pager does not count
        // those apart from zero arrivals).
        "faults_by_kind": {
            "wake_only": r.pager.faults_wake_only,
            "requested": r.requested,
            "in_flight": r.pager.faults_duplicate,
            "zero_or_other": r.pager.faults().saturating_sub(
                r.pager.faults_wake_only + r.requested + r.pager.faults_duplicate
            ),
        },
        "verdict": r.verdict,
    });
    print_report(&report, a.json)?;
    if !a.json {
        for line in r.pager.latency.lines() {
            eprintln!("  {line}");
        }
    }
    // The workload may still hold the memory; exit without unmapping.
    std::mem::forget(r.memory);
    Ok(())
}

/// A quantile bound of fault latencies in µs (`None`: nothing faulted).
pub(super) fn quantile_us(latency: &pager::LatencyHistogram, q: f64) -> Option<u64> {
    latency.quantile(q).map(|d| d.as_micros() as u64)
}
