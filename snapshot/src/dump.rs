//! A stop-the-world dump: every page saved while the workload is paused. What a live
//! snapshot is measured against (it is how Firecracker snapshots memory: the VM paused for
//! the whole dump), and a consistent full snapshot for a caller that can pause anyway.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::region::{Region, Regions};
use crate::sink::PageSink;

/// Reads a run of memory into `buf` and hands it to the sink.
fn save_run(
    memory: &Memory,
    sink: &dyn PageSink,
    addr: usize,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    memory.read(addr, buf)?;
    sink.write(offset, buf).map_err(|source| Error::Sink {
        offset,
        len: buf.len(),
        source,
    })
}

/// Bytes one thread copies at once.
const DUMP_BATCH: usize = 1 << 20;

/// What a dump did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpReport {
    /// Bytes saved.
    pub bytes: u64,
    /// How long it took (the workload's pause, if it was paused for the dump).
    pub elapsed: Duration,
}

/// Saves `regions` of this process into `sink` with `threads` threads.
///
/// # Safety
/// The regions are mapped, readable memory of this process, and nothing writes them until
/// this returns (the caller paused the workload).
pub unsafe fn dump(regions: &[Region], sink: &dyn PageSink, threads: usize) -> Result<DumpReport> {
    let regions = Regions::new(regions)?;
    let batches = regions.batches(DUMP_BATCH);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let buf_len = DUMP_BATCH.max(regions.max_page_size());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; buf_len];
                    // Relaxed: a ticket; each batch is handed out once.
                    while let Some(b) = batches.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let first = regions.page(b.region, b.start);
                        let len = first.size * b.count;
                        save_run(
                            &Memory::ThisProcess,
                            sink,
                            first.addr,
                            first.offset,
                            &mut buf[..len],
                        )?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(Err(Error::WorkerPanicked)))
            .collect::<Result<Vec<()>>>()
    })?;
    Ok(DumpReport {
        bytes: regions.bytes(),
        elapsed: started.elapsed(),
    })
}
