//! Incremental snapshots: after a full one, each next snapshot is a *layer* in the chunked
//! image format holding only the chunks written since the previous one (the rest inherited,
//! not rewritten).
//!
//! Between snapshots the memory is tracked with uffd-core's [`DirtyTracker`] (async
//! write-protect + `PAGEMAP_SCAN`): the kernel resolves each first write by itself, so the
//! workload never waits on us. Taking a layer pauses the workload (the embedder's
//! [`Quiesce`]: a VMM pauses its vCPUs) only while the written pages are found — one
//! `PAGEMAP_SCAN` that also re-protects them — and copied out; after the workload resumed,
//! each chunk holding written pages is completed from the parent (read from the store and
//! verified), hashed and stored. The pause is what makes a layer consistent: an
//! async-protected page cannot hold a write, and a range belongs to one userfaultfd, so the
//! same memory cannot also be protected synchronously (see [`DirtyTracker`]).
//!
//! The chain starts from a [`LiveSnapshot`] taken with [`track_writes`]: the pages written
//! between its cut and the hand-over to the tracker are carried into the first layer.
//!
//! [`track_writes`]: crate::LiveSnapshotBuilder::track_writes

use std::time::{Duration, Instant};

use std::ops::Range;

use chunked::{ImageWriter, Patch, PushOptions, PushReport, StoreOptions};
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

/// Written ranges: (region position, image offsets), in order.
type Written = Vec<(usize, Range<u64>)>;

/// A chain of incremental snapshots of memory in this process (see the module docs).
pub struct Chain {
    regions: Regions,
    /// One per region, in the order of `regions.list()`.
    trackers: Vec<DirtyTracker>,
    /// Pages written since the last snapshot that no tracker saw (a live base's writes
    /// before the hand-over), by page index.
    carried: Option<Bitmap>,
    /// What a layer that failed had found written (its scans protected those pages again,
    /// so no tracker reports them any more): the next layer takes them.
    unsaved: Written,
    /// Where a layer's written pages are copied in its pause (reused: see `copy_ranges`).
    buf: Vec<u8>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("regions", &self.regions)
            .field("trackers", &self.trackers)
            .finish_non_exhaustive()
    }
}

/// What taking a layer did.
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// 4 KiB pages written since the previous snapshot.
    pub dirty_pages: u64,
    /// Chunks holding them: the chunks the layer stores (unless a chunk's new content is
    /// its old).
    pub dirty_chunks: u64,
    /// Finding them (the scan that re-protects them), with the workload paused.
    pub find: Duration,
    /// Copying them out, with the workload paused.
    pub copy: Duration,
    /// The whole pause, from asking for it to the workload running again.
    pub paused: Duration,
    /// Completing their chunks from the parent, hashing and writing the layer, with the
    /// workload running.
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
            unsaved: Vec::new(),
            buf: Vec::new(),
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
                    unsaved: Vec::new(),
                    buf: Vec::new(),
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
    ///
    /// A layer that fails (the store refuses, a parent cannot be read) loses nothing: what
    /// it found written is taken by the next layer, which may be retried with the same
    /// arguments.
    pub fn layer(
        &mut self,
        url: &str,
        parent: &str,
        store: &StoreOptions,
        quiesce: &mut dyn Quiesce,
    ) -> Result<LayerReport> {
        let mut found = std::mem::take(&mut self.unsaved);
        let layer = self.take_layer(url, parent, store, quiesce, &mut found);
        if layer.is_err() {
            self.unsaved = found;
        }
        layer
    }

    /// [`layer`](Self::layer), adding to `found` what it finds written (from the scans
    /// on, which protect those pages again).
    fn take_layer(
        &mut self,
        url: &str,
        parent: &str,
        store: &StoreOptions,
        quiesce: &mut dyn Quiesce,
        found: &mut Written,
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
        let (((dirty_pages, find, copy), written), paused) = paused(quiesce, || {
            let t = Instant::now();
            let pages = self.find_written(found)?;
            let find = t.elapsed();
            let written = self.copy_ranges(found)?;
            Ok(((pages, find, t.elapsed() - find), written))
        })?;
        let t = Instant::now();
        let patches = patches(&g, &written, &self.buf);
        let dirty_chunks = patches.len() as u64;
        writer.write_patches(&patches)?;
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

    /// Adds to `found` what was written since the last snapshot, as (region, range of image
    /// offsets), merged and in order: the trackers' scans (which protect those pages
    /// again) and what was carried over, with what `found` held (a failed layer's).
    /// Returns the 4 KiB pages written (counted once merged: a page a failed layer found
    /// and written again since is one page).
    fn find_written(&mut self, found: &mut Written) -> Result<u64> {
        for (i, (t, n)) in self
            .trackers
            .iter_mut()
            .zip(self.regions.list())
            .enumerate()
        {
            let off = n.region.offset;
            t.collect_runs(|r| found.push((i, off + r.start as u64..off + r.end as u64)))
                .map_err(Error::uffd("find the written pages"))?;
        }
        if let Some(carried) = self.carried.take() {
            for run in carried.runs() {
                for index in run {
                    let (i, p) = self.regions.locate(index);
                    found.push((i, p.offset..p.offset + p.size as u64));
                }
            }
        }
        // Ranges of one region merged: a page reported twice is copied once.
        found.sort_by_key(|(i, r)| (*i, r.start));
        let mut merged: Written = Vec::with_capacity(found.len());
        for (i, r) in found.drain(..) {
            match merged.last_mut() {
                Some((j, last)) if *j == i && last.end >= r.start => last.end = last.end.max(r.end),
                _ => merged.push((i, r)),
            }
        }
        *found = merged;
        Ok(found.iter().map(|(_, r)| (r.end - r.start) / 4096).sum())
    }

    /// Copies the written ranges out of memory (with the workload paused) into the chain's
    /// buffer, back to back (kept across layers: its pages are already faulted in, so the
    /// pause does not pay for them again). Returns each range's image offset and length.
    fn copy_ranges(&mut self, ranges: &[(usize, Range<u64>)]) -> Result<Vec<(u64, usize)>> {
        let total: u64 = ranges.iter().map(|(_, r)| r.end - r.start).sum();
        self.buf.clear();
        self.buf.resize(total as usize, 0);
        let mut at = 0;
        let mut out = Vec::with_capacity(ranges.len());
        for (i, r) in ranges {
            let region = &self.regions.list()[*i].region;
            let len = (r.end - r.start) as usize;
            Memory::ThisProcess.read(
                region.addr + (r.start - region.offset) as usize,
                &mut self.buf[at..at + len],
            )?;
            out.push((r.start, len));
            at += len;
        }
        Ok(out)
    }
}

/// The written bytes (`written` ranges, back to back in `buf`) cut at chunk boundaries, as
/// one patch per chunk, in chunk order.
fn patches<'a>(g: &chunked::Geometry, written: &[(u64, usize)], buf: &'a [u8]) -> Vec<Patch<'a>> {
    let mut out: Vec<Patch<'a>> = Vec::new();
    let mut from = 0usize;
    let mut ranges: Vec<(u64, usize, usize)> = written
        .iter()
        .map(|&(start, len)| {
            let r = (start, len, from);
            from += len;
            r
        })
        .collect();
    ranges.sort_by_key(|r| r.0);
    for (start, len, from) in ranges {
        let end = start + len as u64;
        let mut at = start;
        while at < end {
            let chunk = g.chunk_of(at);
            let range = g.chunk_range(chunk);
            let stop = range.end.min(end);
            let piece = &buf[from + (at - start) as usize..from + (stop - start) as usize];
            let offset = (at - range.start) as usize;
            match out.last_mut() {
                Some(p) if p.chunk == chunk => p.pieces.push((offset, piece)),
                _ => out.push(Patch {
                    chunk,
                    pieces: vec![(offset, piece)],
                }),
            }
            at = stop;
        }
    }
    out
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
