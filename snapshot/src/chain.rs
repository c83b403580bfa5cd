//! Incremental snapshots: after a full one, each next snapshot is a *layer* in the chunked
//! image format holding only the chunks written since the previous one (the rest inherited,
//! not rewritten).
//!
//! Between snapshots the memory is tracked with uffd-core's [`DirtyTracker`] (async
//! write-protect + `PAGEMAP_SCAN`): the kernel resolves each first write by itself, so the
//! workload never waits on us. Taking a layer pauses the workload (the embedder's
//! [`Quiesce`]: a VMM pauses its vCPUs) only while the written chunks are found — one
//! `PAGEMAP_SCAN` that also re-protects them — and copied out; the layer is hashed and
//! written after the workload resumed. The pause is what makes a layer consistent: an
//! async-protected page cannot hold a write, and a range belongs to one userfaultfd, so the
//! same memory cannot also be protected synchronously (see [`DirtyTracker`]).
//!
//! The chain starts from a [`LiveSnapshot`] taken with [`track_writes`]: the pages written
//! between its cut and the hand-over to the tracker are carried into the first layer.
//!
//! [`track_writes`]: crate::LiveSnapshotBuilder::track_writes

use std::time::{Duration, Instant};

use chunked::{ImageWriter, PushOptions, PushReport, StoreOptions};
use page_state::Bitmap;
use uffd_core::DirtyTracker;

use crate::error::{Error, Result};
use crate::live::{unregister, LiveSnapshot, SnapshotReport};
use crate::memory::Memory;
use crate::region::{Region, Regions};

/// An embedder's error from pausing or resuming its workload.
pub type QuiesceError = Box<dyn std::error::Error + Send + Sync>;

/// Pauses and resumes the workload writing the memory (a VMM pauses its vCPUs). `pause`
/// returns once nothing writes; a writer blocked in a live snapshot's write-protect fault is
/// served meanwhile, so it can reach its pause point.
pub trait Quiesce {
    /// Stops every writer.
    fn pause(&mut self) -> std::result::Result<(), QuiesceError>;
    /// Lets them go on.
    fn resume(&mut self) -> std::result::Result<(), QuiesceError>;
}

/// The [`Quiesce`] of memory nothing writes (its workload has stopped): pausing does
/// nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stopped;

impl Quiesce for Stopped {
    fn pause(&mut self) -> std::result::Result<(), QuiesceError> {
        Ok(())
    }

    fn resume(&mut self) -> std::result::Result<(), QuiesceError> {
        Ok(())
    }
}

/// Runs `f` with the workload paused; resumes it whatever `f` returns. Returns `f`'s
/// value and how long the workload was paused.
fn paused<T>(quiesce: &mut dyn Quiesce, f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let start = Instant::now();
    quiesce.pause().map_err(|source| Error::Quiesce {
        what: "pause",
        source,
    })?;
    let out = f();
    let resumed = quiesce.resume().map_err(|source| Error::Quiesce {
        what: "resume",
        source,
    });
    let took = start.elapsed();
    let out = out?;
    resumed?;
    Ok((out, took))
}

/// A chain of incremental snapshots of memory in this process (see the module docs).
#[derive(Debug)]
pub struct Chain {
    regions: Regions,
    /// One per region, in the order of `regions.list()`.
    trackers: Vec<DirtyTracker>,
    /// Pages written since the last snapshot that no tracker saw (a live base's writes
    /// before the hand-over), by page index.
    carried: Option<Bitmap>,
}

/// What taking a layer did.
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// 4 KiB pages written since the previous snapshot.
    pub dirty_pages: u64,
    /// Chunks holding them: the chunks copied.
    pub dirty_chunks: u64,
    /// Finding them (the scan that re-protects them), with the workload paused.
    pub find: Duration,
    /// Copying their chunks out, with the workload paused.
    pub copy: Duration,
    /// The whole pause, from asking for it to the workload running again.
    pub paused: Duration,
    /// Hashing and writing the layer, with the workload running.
    pub write: Duration,
    /// The layer as written.
    pub push: PushReport,
}

impl Chain {
    /// Starts tracking `regions` of this process now: their memory as of this call is the
    /// chain's starting point (the caller has saved it, with the writers paused).
    ///
    /// # Safety
    /// As for [`LiveSnapshotBuilder::start`](crate::LiveSnapshotBuilder::start): the regions
    /// are mapped, readable memory of this process that stays mapped while the chain lives,
    /// with no other userfaultfd registered on them.
    pub unsafe fn start(regions: &[Region]) -> Result<Chain> {
        let regions = Regions::new(regions)?;
        let trackers = track(&regions)?;
        Ok(Chain {
            regions,
            trackers,
            carried: None,
        })
    }

    /// Takes over from `live`, a snapshot of this process's memory started with
    /// [`track_writes`](crate::LiveSnapshotBuilder::track_writes): waits until it has saved
    /// every page, then, with the workload paused, hands the memory from its synchronous
    /// protection to the tracker. Returns the chain, the live snapshot's report, and how
    /// long the workload was paused.
    pub fn from_live(
        mut live: LiveSnapshot,
        quiesce: &mut dyn Quiesce,
    ) -> Result<(Chain, SnapshotReport, Duration)> {
        live.wait_saved(None)?;
        let ((chain, report), pause) = paused(quiesce, move || {
            let (engine, report) = live.into_engine()?;
            let carried = match (&engine.written, engine.memory) {
                (Some(w), Memory::ThisProcess) => {
                    Bitmap::from_words(w.len(), &w.to_words()).expect("a bitmap's own words fit it")
                }
                _ => {
                    engine.release_all();
                    unregister(&engine);
                    return Err(Error::Region {
                        index: 0,
                        reason: "a chain starts from a live snapshot of this process taken with track_writes",
                    });
                }
            };
            // Paused: nothing writes between giving up the synchronous protection and the
            // tracker's protection.
            unregister(&engine);
            let regions = Regions::new(
                &engine
                    .regions
                    .list()
                    .iter()
                    .map(|n| n.region)
                    .collect::<Vec<_>>(),
            )?;
            let trackers = track(&regions)?;
            Ok((
                Chain {
                    regions,
                    trackers,
                    carried: Some(carried),
                },
                report,
            ))
        })?;
        Ok((chain, report, pause))
    }

    /// The image length the regions need (what the chain's base must be).
    pub fn image_len(&self) -> u64 {
        self.regions.image_len()
    }

    /// Takes the next snapshot as layer `url` over `parent` (an image's name in the same
    /// store root: the previous snapshot, which holds this memory as it was then). Only
    /// the chunks written since are stored; the layer takes its parent's geometry, whose
    /// chunk size is therefore the granule of change (smaller chunks, smaller layers).
    pub fn layer(
        &mut self,
        url: &str,
        parent: &str,
        store: &StoreOptions,
        quiesce: &mut dyn Quiesce,
    ) -> Result<LayerReport> {
        let options = PushOptions {
            parent: Some(parent.to_owned()),
            store: store.clone(),
            ..PushOptions::default()
        };
        // Before the pause: opening the parent's chain reads manifests from the store.
        let mut writer = ImageWriter::create(url, self.image_len(), &options)?;
        let g = writer.geometry();
        if let Some(n) = self
            .regions
            .list()
            .iter()
            .find(|n| g.chunk_size as usize % n.region.page_size() != 0)
        {
            return Err(Error::ImageShape {
                url: url.to_owned(),
                reason: format!(
                    "chunks of {} bytes do not hold whole pages of {} bytes",
                    g.chunk_size,
                    n.region.page_size()
                ),
            });
        }
        let (((dirty_pages, find, copy), chunks), paused) = paused(quiesce, || {
            let t = Instant::now();
            let (dirty, pages) = self.find_dirty(&g)?;
            let find = t.elapsed();
            let chunks = self.copy_chunks(&g, &dirty)?;
            Ok(((pages, find, t.elapsed() - find), chunks))
        })?;
        let t = Instant::now();
        let dirty_chunks = chunks.len() as u64;
        for (c, data) in chunks {
            writer.write_chunk(c, &data)?;
        }
        let push = writer.finish()?;
        Ok(LayerReport {
            dirty_pages,
            dirty_chunks,
            find,
            copy,
            paused,
            write: t.elapsed(),
            push,
        })
    }

    /// The chunks written since the last snapshot (the trackers' scans, which protect them
    /// again, plus what was carried over), and the 4 KiB pages written.
    fn find_dirty(&mut self, g: &chunked::Geometry) -> Result<(Vec<bool>, u64)> {
        let mut dirty = vec![false; g.chunk_count() as usize];
        let mut mark = |start: u64, end: u64| {
            dirty[g.chunk_of(start)..=g.chunk_of(end - 1)].fill(true);
        };
        let mut pages = 0;
        for (t, n) in self.trackers.iter_mut().zip(self.regions.list()) {
            let off = n.region.offset;
            pages += t
                .collect_runs(|r| mark(off + r.start as u64, off + r.end as u64))
                .map_err(Error::uffd("find the written pages"))?;
        }
        if let Some(carried) = self.carried.take() {
            for run in carried.runs() {
                for index in run {
                    let p = self.regions.page_by_index(index);
                    mark(p.offset, p.offset + p.size as u64);
                    pages += (p.size / 4096) as u64;
                }
            }
        }
        Ok((dirty, pages))
    }

    /// Copies the dirty chunks out of memory (the parts no region covers read as zero).
    fn copy_chunks(&self, g: &chunked::Geometry, dirty: &[bool]) -> Result<Vec<(usize, Vec<u8>)>> {
        let mut out = Vec::new();
        for (c, _) in dirty.iter().enumerate().filter(|(_, d)| **d) {
            let range = g.chunk_range(c);
            let mut data = vec![0u8; (range.end - range.start) as usize];
            for n in self.regions.list() {
                let r = &n.region;
                let (start, end) = (
                    range.start.max(r.offset),
                    range.end.min(r.offset + r.len as u64),
                );
                if start < end {
                    let dst =
                        &mut data[(start - range.start) as usize..(end - range.start) as usize];
                    Memory::ThisProcess.read(r.addr + (start - r.offset) as usize, dst)?;
                }
            }
            out.push((c, data));
        }
        Ok(out)
    }
}

/// A tracker per region.
fn track(regions: &Regions) -> Result<Vec<DirtyTracker>> {
    regions
        .list()
        .iter()
        .map(|n| {
            DirtyTracker::start(n.region.addr, n.region.len)
                .map_err(Error::uffd("start tracking written pages"))
        })
        .collect()
}
