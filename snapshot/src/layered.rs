//! [`LayeredSource`]: a Firecracker diff-snapshot chain served directly, without
//! `rebase-snap`.
//!
//! Firecracker's diff snapshots (`snapshot_type: Diff`, with dirty-page tracking) write a
//! memory file the size of guest memory in which only the pages dirtied since the previous
//! snapshot hold data; the rest are holes. To restore, Firecracker's docs merge the chain
//! into the base with `rebase-snap` first, a copy of every diff. This source reads the chain
//! as it is: at open it walks each file's data with `SEEK_DATA` / `SEEK_HOLE` and folds the
//! chain into one sorted extent map (newest layer wins; a range where no layer has data,
//! holes of the base included, is zero) with a direct index per 64 KiB, so a fault costs
//! one lookup and a copy out of a read-only mapping of the layer that has the page, at any
//! depth — e2b's flattening of its diff chains, for Firecracker's own files. (The files
//! must not be truncated while served: reading a mapping past a file's end raises SIGBUS,
//! as with `pager::FileSource::mmap`.) [`LayeredSource::merge_into`] writes the merged
//! memory file when a single file is wanted.

use std::fs::File;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use pager::{Fetched, Source, SourceError};

use crate::error::{Error, Result};
use crate::sink::{FileSink, PageSink};

/// Granule of the extent map: data extents are widened to whole 4 KiB pages (Firecracker
/// writes whole pages; a file system with smaller blocks must not split one).
const GRANULE: u64 = 4096;

/// A range of the image served from one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    start: u64,
    end: u64,
    layer: usize,
}

/// A layer's file, mapped read-only. (The address as an integer: the mapping is plain
/// shared-readable memory, so the source stays `Send + Sync` without an `unsafe impl`.)
#[derive(Debug)]
struct Layer {
    path: PathBuf,
    addr: usize,
    len: usize,
    /// The file (its holes are read at open; kept open for the mapping).
    file: File,
}

impl Layer {
    fn open(path: &Path) -> Result<Layer> {
        // A regular file, opened without waiting on a FIFO planted at the path.
        let file = uffd_core::private_fs::open_regular(path, false).map_err(|e| match e {
            // A missing or unreadable file keeps its plain I/O error.
            uffd_core::private_fs::FsError::Io { source, .. } => Error::io("open", path)(source),
            source => Error::Private {
                what: "open a memory file",
                source,
            },
        })?;
        let len = file.metadata().map_err(Error::io("stat", path))?.len();
        let size = usize::try_from(len)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| {
                Error::io("open", path)(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "empty memory file",
                ))
            })?;
        // SAFETY: a fresh read-only private mapping of a file we hold open; nothing else
        // refers to its address range.
        let addr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ,
                MapFlags::MAP_PRIVATE,
                &file,
                0,
            )
        }
        .map_err(|e| Error::io("map", path)(e.into()))?;
        Ok(Layer {
            path: path.to_path_buf(),
            addr: addr.as_ptr() as usize,
            len: size.get(),
            file,
        })
    }

    /// Copies `buf.len()` bytes at `offset` (zero past the file's end).
    fn read(&self, offset: u64, buf: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.len);
        let have = (self.len - start).min(buf.len());
        // SAFETY: the mapping covers `len` readable bytes while `self` lives, and nothing
        // in this process writes it (read-only, private); `start + have <= len`.
        let bytes = unsafe { std::slice::from_raw_parts((self.addr + start) as *const u8, have) };
        buf[..have].copy_from_slice(bytes);
        buf[have..].fill(0);
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        if let Some(addr) = NonNull::new(self.addr as *mut libc::c_void) {
            // SAFETY: our own mapping; the borrows `read` made ended with their calls.
            let _ = unsafe { munmap(addr, self.len) };
        }
    }
}

/// Granule of the extent map's index: a fault looks up its block's first extent directly,
/// then steps over at most the few extents inside the block.
const INDEX_BLOCK: u64 = 64 << 10;

/// A diff-snapshot chain served as one image (see the module docs).
#[derive(Debug)]
pub struct LayeredSource {
    layers: Vec<Layer>,
    /// Sorted, disjoint; the gaps are zero.
    extents: Vec<Extent>,
    /// Per [`INDEX_BLOCK`] of the image: the first extent that ends after the block's start.
    index: Vec<u32>,
    len: u64,
}

/// What a merge wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeReport {
    /// The merged file's length.
    pub len: u64,
    /// Bytes copied from the layers (zero pages left as holes).
    pub data_bytes: u64,
    /// Extents in the flattened map.
    pub extents: usize,
}

impl LayeredSource {
    /// Opens `base` (a full memory file; its holes read as zero) and `diffs` (oldest
    /// first; their holes inherit from below). Every diff must be the base's length.
    pub fn open<P: AsRef<Path>>(base: impl AsRef<Path>, diffs: &[P]) -> Result<LayeredSource> {
        let base = Layer::open(base.as_ref())?;
        let len = base.len as u64;
        let mut extents =
            data_extents(&base.file, len, 0).map_err(Error::io("find the data of", &base.path))?;
        let mut layers = vec![base];
        for (i, diff) in diffs.iter().enumerate() {
            let layer = Layer::open(diff.as_ref())?;
            if layer.len as u64 != len {
                return Err(Error::LayerLength {
                    path: layer.path.clone(),
                    len: layer.len as u64,
                    base_len: len,
                });
            }
            let data = data_extents(&layer.file, len, i + 1)
                .map_err(Error::io("find the data of", &layer.path))?;
            extents = overlay(&extents, &data);
            layers.push(layer);
        }
        log::debug!(
            "layered source: {} layer(s) of {len} bytes folded into {} extents",
            layers.len(),
            extents.len()
        );
        let index = (0..len.div_ceil(INDEX_BLOCK))
            .map(|b| extents.partition_point(|e| e.end <= b * INDEX_BLOCK) as u32)
            .collect();
        Ok(LayeredSource {
            layers,
            extents,
            index,
            len,
        })
    }

    /// The files, base first.
    pub fn layers(&self) -> impl Iterator<Item = &Path> {
        self.layers.iter().map(|l| l.path.as_path())
    }

    /// The flattened map: each data range with the index of the layer serving it (0 is the
    /// base), in order. Ranges not listed are zero.
    pub fn extents(&self) -> impl Iterator<Item = (Range<u64>, usize)> + '_ {
        self.extents.iter().map(|e| (e.start..e.end, e.layer))
    }

    /// Writes the merged memory file to `out` (what `rebase-snap` makes of the chain; zero
    /// pages left as holes).
    pub fn merge_into(&self, out: &Path) -> Result<MergeReport> {
        let sink = FileSink::create(out, self.len)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut data_bytes = 0;
        for e in &self.extents {
            let mut at = e.start;
            while at < e.end {
                let n = (e.end - at).min(buf.len() as u64) as usize;
                self.layers[e.layer].read(at, &mut buf[..n]);
                sink.write(at, &buf[..n]).map_err(Error::io("write", out))?;
                at += n as u64;
                data_bytes += n as u64;
            }
        }
        sink.sync()?;
        Ok(MergeReport {
            len: self.len,
            data_bytes,
            extents: self.extents.len(),
        })
    }
}

/// The data of `file` in `[0, len)` as extents of `layer`, widened to whole pages.
fn data_extents(file: &File, len: u64, layer: usize) -> std::io::Result<Vec<Extent>> {
    let holes = chunked::holes(file, len)?;
    let mut out: Vec<Extent> = Vec::new();
    let mut at = 0;
    let mut push = |start: u64, end: u64| {
        let start = start / GRANULE * GRANULE;
        let end = end.next_multiple_of(GRANULE).min(len);
        match out.last_mut() {
            Some(last) if last.end >= start => last.end = last.end.max(end),
            _ => out.push(Extent { start, end, layer }),
        }
    };
    for h in holes {
        if h.start > at {
            push(at, h.start);
        }
        at = h.end;
    }
    if at < len {
        push(at, len);
    }
    Ok(out)
}

/// `below` with `above` laid over it: `above`'s ranges replace whatever `below` had there.
/// Both sorted and disjoint; so is the result.
fn overlay(below: &[Extent], above: &[Extent]) -> Vec<Extent> {
    let mut pieces = Vec::with_capacity(below.len() + above.len());
    for e in below {
        let mut start = e.start;
        let first = above.partition_point(|a| a.end <= e.start);
        for a in above[first..].iter().take_while(|a| a.start < e.end) {
            if a.start > start {
                pieces.push(Extent {
                    start,
                    end: a.start,
                    layer: e.layer,
                });
            }
            start = start.max(a.end);
        }
        if start < e.end {
            pieces.push(Extent {
                start,
                end: e.end,
                layer: e.layer,
            });
        }
    }
    let mut out = Vec::with_capacity(pieces.len() + above.len());
    let (mut i, mut j) = (0, 0);
    while i < pieces.len() || j < above.len() {
        let next = if j >= above.len() || (i < pieces.len() && pieces[i].start < above[j].start) {
            i += 1;
            pieces[i - 1]
        } else {
            j += 1;
            above[j - 1]
        };
        match out.last_mut() {
            Some(Extent { end, layer, .. }) if *end == next.start && *layer == next.layer => {
                *end = next.end
            }
            _ => out.push(next),
        }
    }
    out
}

impl Source for LayeredSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let end = offset + scratch.len() as u64;
        // One lookup in the index, then a step over the few extents before `offset` in its
        // block.
        let mut i = self
            .index
            .get((offset / INDEX_BLOCK) as usize)
            .map_or(self.extents.len(), |&i| i as usize);
        while self.extents.get(i).is_some_and(|e| e.end <= offset) {
            i += 1;
        }
        if self.extents.get(i).is_none_or(|e| e.start >= end) {
            return Ok(Fetched::Zero); // no layer has data here (or past the end)
        }
        let mut at = offset;
        while let Some(e) = self.extents.get(i).filter(|e| e.start < end) {
            let from = e.start.max(at);
            scratch[(at - offset) as usize..(from - offset) as usize].fill(0);
            let to = e.end.min(end);
            self.layers[e.layer].read(
                from,
                &mut scratch[(from - offset) as usize..(to - offset) as usize],
            );
            at = to;
            i += 1;
        }
        scratch[(at - offset) as usize..].fill(0);
        Ok(Fetched::Data(scratch))
    }

    fn signal_safe(&self) -> Option<pager::SignalSafe> {
        // SAFETY: an index lookup and a copy out of mappings: no lock, no allocation.
        Some(unsafe { pager::SignalSafe::promise() })
    }

    fn zero_ranges(&self) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut at = 0;
        for e in &self.extents {
            if e.start > at {
                out.push(at..e.start);
            }
            at = e.end;
        }
        if at < self.len {
            out.push(at..self.len);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u64, end: u64, layer: usize) -> Extent {
        Extent { start, end, layer }
    }

    #[test]
    fn the_newer_layer_wins_where_both_have_data() {
        let below = [ext(0, 100, 0), ext(200, 300, 0)];
        let above = [ext(50, 60, 1), ext(90, 210, 1), ext(400, 500, 1)];
        assert_eq!(
            overlay(&below, &above),
            vec![
                ext(0, 50, 0),
                ext(50, 60, 1),
                ext(60, 90, 0),
                ext(90, 210, 1),
                ext(210, 300, 0),
                ext(400, 500, 1)
            ]
        );
        assert_eq!(overlay(&[], &above), above.to_vec());
        assert_eq!(overlay(&below, &[]), below.to_vec());
        assert_eq!(
            overlay(&[ext(0, 10, 0)], &[ext(0, 10, 1)]),
            vec![ext(0, 10, 1)],
            "an exact cover replaces"
        );
    }
}
