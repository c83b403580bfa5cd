//! `uffdkit demo`: the self-contained main job. Serves a 64 MiB anonymous region on demand
//! from a handler thread built directly on uffd-core, touches and verifies every page,
//! and reports what it measured against first-touch anonymous faults in the same run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use uffd_core::{
    CopyMode, Error, Event, EventBuffer, Mapping, MemoryKind, ReadStatus, RegisterMode, Uffd,
};

/// Options of `uffdkit demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Size of the served region in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: usize,
}

impl Default for Args {
    fn default() -> Self {
        Self { size_mib: 64 }
    }
}

/// The content of page `index` of the synthetic image: distinct per page and per word.
fn fill_page(page: &mut [u8], index: usize) {
    let seed = (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (word, chunk) in page.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed ^ word as u64).to_ne_bytes());
    }
}

/// What the handler thread counted.
#[derive(Default)]
struct HandlerStats {
    faults: u64,
    exists: u64,
}

fn handle(uffd: &Uffd, base: usize, len: usize, stop: &AtomicBool) -> Result<HandlerStats> {
    let page_size = uffd_core::page_size();
    let mut page = vec![0u8; page_size];
    let mut events = EventBuffer::new(64);
    let mut stats = HandlerStats::default();
    // Relaxed: the flag carries no data, only "stop polling"; join() orders the rest.
    while !stop.load(Ordering::Relaxed) {
        if !uffd.wait_readable(Some(Duration::from_millis(50)))? {
            continue;
        }
        if uffd.read_events(&mut events)? == ReadStatus::WouldBlock {
            continue;
        }
        for event in events.drain() {
            let Event::Pagefault { addr, .. } = event else {
                continue;
            };
            if !(base..base + len).contains(&addr) {
                bail!("fault at {addr:#x} outside the served region");
            }
            let page_addr = addr & !(page_size - 1);
            fill_page(&mut page, (page_addr - base) / page_size);
            stats.faults += 1;
            // SAFETY: page_addr is a missing page of the region registered with `uffd`,
            // which only the demo's verifier reads.
            match unsafe { uffd.copy(page_addr, &page, CopyMode::empty()) } {
                Ok(_) => {}
                Err(Error::Exists { .. }) => {
                    stats.exists += 1;
                    uffd.wake(page_addr, page_size)?;
                }
                Err(e) => return Err(e).context("placing a page"),
            }
        }
    }
    Ok(stats)
}

/// Reads every page of `region` once (one fault each) and checks its content. Returns
/// the elapsed time.
fn touch_and_verify(region: &Mapping, verify: bool) -> Result<Duration> {
    let page_size = region.page_size();
    let mut expected = vec![0u8; page_size];
    let start = Instant::now();
    for index in 0..region.pages() {
        let addr = region.page_addr(index);
        // SAFETY: addr is inside `region`, mapped readable; a fault there is served.
        let first = unsafe { std::ptr::read_volatile(addr as *const u8) };
        if verify {
            fill_page(&mut expected, index);
            // SAFETY: the page is now present and `page_size` bytes long.
            let actual = unsafe { std::slice::from_raw_parts(addr as *const u8, page_size) };
            if actual != expected.as_slice() || first != expected[0] {
                bail!("page {index} at {addr:#x} has wrong content");
            }
        }
    }
    Ok(start.elapsed())
}

/// Runs `uffdkit demo`.
pub fn run(args: &Args) -> Result<()> {
    let len = args.size_mib << 20;
    let uffd = Arc::new(
        Uffd::builder()
            .non_blocking(true)
            .open()
            .context("opening a userfaultfd")?,
    );
    let region = Mapping::new(MemoryKind::Anon, len)?;
    uffd.register(region.addr(), region.len(), RegisterMode::MISSING)
        .context("registering the region")?;
    println!(
        "uffdkit demo: serving a {} MiB anonymous region ({} pages of {} KiB) on demand",
        args.size_mib,
        region.pages(),
        region.page_size() / 1024
    );
    println!(
        "  fd via {:?}, handler: one thread blocking in poll, unpinned",
        uffd.open_path()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (uffd, stop) = (uffd.clone(), stop.clone());
        let (base, len) = (region.addr(), region.len());
        thread::spawn(move || {
            let result = handle(&uffd, base, len, &stop);
            if result.is_err() {
                // Release the workload: unregistered, its pending faults retry and read
                // zero pages, which verification then reports.
                let _ = uffd.unregister(base, len);
            }
            result
        })
    };

    // Touch-only pass first gives the per-fault figure; verification follows on the
    // now-present pages.
    let served = touch_and_verify(&region, false);
    let verified = served
        .as_ref()
        .ok()
        .map(|_| touch_and_verify(&region, true));
    // Relaxed: see `handle`; join() synchronises everything the handler did.
    stop.store(true, Ordering::Relaxed);
    let stats = handler.join().expect("handler thread panicked")?;
    let served = served?;
    verified.expect("verification ran")?;

    let baseline_region = Mapping::new(MemoryKind::Anon, len)?;
    let baseline = touch_and_verify(&baseline_region, false)?;

    let pages = region.pages() as f64;
    let us_per_fault = served.as_secs_f64() * 1e6 / stats.faults.max(1) as f64;
    let us_first_touch = baseline.as_secs_f64() * 1e6 / pages;
    println!(
        "  faults served: {} (EEXIST: {}), every page verified byte for byte",
        stats.faults, stats.exists
    );
    println!(
        "  {:.1} ms to fault in {} pages: {:.2} µs per fault",
        served.as_secs_f64() * 1e3,
        region.pages(),
        us_per_fault
    );
    println!(
        "  baseline, first-touch anonymous faults: {:.2} µs per fault; served faults cost {:.1}x",
        us_first_touch,
        us_per_fault / us_first_touch
    );
    if stats.faults != region.pages() as u64 {
        bail!(
            "expected one fault per page ({}), handler saw {}",
            region.pages(),
            stats.faults
        );
    }
    Ok(())
}
