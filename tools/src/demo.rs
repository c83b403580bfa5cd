//! `uffdkit demo`: the self-contained main job. Builds a synthetic 512 MiB image of data
//! and zero pages, restores it lazily into this process through the pager (per-CPU
//! handlers, background prefetch), runs a workload that reads and verifies every page,
//! and reports what it measured.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pager::{DeliveryMode, MemorySource, Pager, Prefetch};
use uffd_core::{Features, Mapping, MemoryKind, Uffd};

use crate::workload::{fill_page, synthetic_image};

/// Options of `uffdkit demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Size of the restored image in MiB.
    #[arg(long, default_value_t = 512)]
    size_mib: usize,
    /// Every n-th page of the image is zero.
    #[arg(long, default_value_t = 4)]
    zero_every: usize,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            size_mib: 512,
            zero_every: 4,
        }
    }
}

/// Reads every page of `base..` in a strided order (so faults and prefetch interleave)
/// and checks it against the image generator. Returns pages checked.
fn verify_all(
    base: usize,
    pages: usize,
    ps: usize,
    zero_every: usize,
    lane: usize,
    lanes: usize,
) -> Result<usize> {
    let mut expected = vec![0u8; ps];
    let mut checked = 0;
    // Lanes take interleaved 1 MiB chunks; odd lanes walk theirs from the far end.
    let chunk = (1 << 20) / ps;
    let chunks = pages.div_ceil(chunk);
    let mine: Vec<usize> = (lane..chunks).step_by(lanes).collect();
    let ordered: Box<dyn Iterator<Item = &usize>> = if lane % 2 == 1 {
        Box::new(mine.iter().rev())
    } else {
        Box::new(mine.iter())
    };
    for &c in ordered {
        for page in c * chunk..((c + 1) * chunk).min(pages) {
            fill_page(&mut expected, page, zero_every);
            // SAFETY: inside the mapping restored by the pager.
            let got = unsafe { std::slice::from_raw_parts((base + page * ps) as *const u8, ps) };
            if got != expected.as_slice() {
                bail!("page {page} has wrong content");
            }
            checked += 1;
        }
    }
    Ok(checked)
}

/// Runs `uffdkit demo`.
pub fn run(args: &Args) -> Result<()> {
    let ps = uffd_core::page_size();
    let len = args.size_mib << 20;
    let pages = len / ps;
    println!(
        "uffdkit demo: lazy restore of a {} MiB synthetic image ({} pages, every {}th zero) into this process",
        args.size_mib, pages, args.zero_every
    );
    let t = Instant::now();
    let image = synthetic_image(pages, ps, args.zero_every);
    let source = MemorySource::new(image).with_zero_scan(ps);
    println!("  image built in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);

    let memory = Arc::new(Mapping::new(MemoryKind::Anon, len)?);
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE | Features::EVENT_UNMAP | Features::EVENT_REMAP)
        .open()
        .context("open a userfaultfd")?;
    let start = Instant::now();
    // A page the pager can no longer serve parks its toucher; the pager's error is reported.
    crate::guarded::install(&memory)?;
    let pager = Pager::builder(uffd, Arc::new(source))
        .mapping(memory.clone(), 0)
        .mode(DeliveryMode::PerCpu)
        .prefetch(Prefetch::Sequential)
        .start()
        .context("start the pager")?;
    println!(
        "  pager: {} handlers (one pinned per CPU), background prefetch behind faults",
        DeliveryMode::PerCpu.name()
    );

    let base = memory.addr();
    let lanes = 2;
    let zero_every = args.zero_every;
    let workload = crate::guarded::run(&pager, memory.clone(), move || -> Result<usize> {
        let workers: Vec<_> = (0..lanes)
            .map(|lane| {
                std::thread::spawn(move || verify_all(base, pages, ps, zero_every, lane, lanes))
            })
            .collect();
        let mut checked = 0;
        for w in workers {
            checked += w
                .join()
                .map_err(|_| anyhow::anyhow!("workload thread panicked"))??;
        }
        Ok(checked)
    })?;
    let Some(checked) = workload else {
        return Err(crate::guarded::stopped(pager));
    };
    let checked = checked?;
    let workload = start.elapsed();
    let complete = pager.wait_complete(std::time::Duration::from_secs(30));
    let stats = pager.stop()?;
    crate::guarded::disarm();
    if checked != pages {
        bail!("checked {checked} of {pages} pages");
    }
    if !complete {
        bail!("not every page was placed");
    }
    println!(
        "  workload: 2 threads read and verified all {} pages in {:.0} ms ({:.2} GiB/s)",
        pages,
        workload.as_secs_f64() * 1e3,
        len as f64 / (1u64 << 30) as f64 / workload.as_secs_f64()
    );
    println!(
        "  faults: {} (missing pages {}, already requested {}, wake-only {})",
        stats.faults(),
        stats.faults_missing,
        stats.faults_duplicate,
        stats.faults_wake_only
    );
    println!(
        "  pages placed: {} on fault, {} by prefetch, {} zero pages (never transferred); {} MiB copied",
        stats.placed_fault,
        stats.placed_prefetch,
        stats.placed_zero,
        stats.bytes >> 20
    );
    println!(
        "  EEXIST {}, EAGAIN {}; fault latency (event read → placed): p50 ≤ {} µs, p99 ≤ {} µs; blocktime {:.1} ms",
        stats.exists,
        stats.again,
        stats.latency.quantile(0.5).map_or(0, |d| d.as_micros()),
        stats.latency.quantile(0.99).map_or(0, |d| d.as_micros()),
        stats.blocktime.as_secs_f64() * 1e3
    );
    println!("  latency histogram (log2 µs buckets):");
    for line in stats.latency.lines() {
        println!("    {line}");
    }
    println!("  every page verified byte for byte");
    Ok(())
}
