//! Pushing an image: cut a raw memory file into chunks and hand them to an
//! [`ImageWriter`], which stores only the chunks the store does not have (zero chunks
//! nowhere, and for a layer none its parent has at the same place), then the manifest.
//!
//! A sparse file pushed as a layer is ambiguous: a Firecracker diff snapshot's holes mean
//! "unchanged since the parent", a full memory file copied sparse has holes that mean
//! zeros. Read as zeros, a diff's holes would silently wipe the parent's pages (the guest
//! crashes, or worse, runs on). So the caller says which ([`Holes`]); unsaid, it is refused.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::layout::holes;
use crate::options::{Holes, PushOptions, PushReport};
use crate::writer::{ImageWriter, Patch};

/// Pushes raw image `file` to `url` (see [`Store`](crate::Store) for the layout); with
/// `options.parent`, as a layer over that image.
pub fn push(file: &Path, url: &str, options: &PushOptions) -> Result<PushReport> {
    let shown = file.display().to_string();
    let f = File::open(file).map_err(Error::io("open", &shown))?;
    let len = f.metadata().map_err(Error::io("stat", &shown))?.len();
    let holes = holes(&f, len).map_err(Error::io("find the holes of", &shown))?;
    let hole_bytes: u64 = holes.iter().map(|h| h.end - h.start).sum();
    let inherit = match (options.holes, &options.parent) {
        (Holes::Inherit, None) => return Err(Error::InheritWithoutParent { file: shown }),
        (Holes::Refuse, Some(parent)) if hole_bytes > 0 => {
            return Err(Error::SparseLayer {
                file: shown,
                parent: parent.clone(),
                hole_bytes,
            })
        }
        (Holes::Inherit, Some(_)) => !holes.is_empty(),
        _ => false,
    };
    let mut writer = ImageWriter::create(url, len, options)?;
    if inherit {
        push_data_only(&f, &shown, &holes, &mut writer)?;
    } else {
        let geometry = writer.geometry();
        let mut buf = vec![0u8; geometry.chunk_size as usize];
        for i in 0..geometry.chunk_count() as usize {
            let r = geometry.chunk_range(i);
            let data = &mut buf[..(r.end - r.start) as usize];
            f.read_exact_at(data, r.start)
                .map_err(Error::io("read", &shown))?;
            writer.write_chunk(i, data)?;
        }
    }
    writer.finish()
}

/// A layer of `f`'s data only: chunks wholly in holes are never written (inherited), a
/// chunk partly in them becomes a patch over the parent's chunk (pieces: its data).
fn push_data_only(
    f: &File,
    shown: &str,
    holes: &[Range<u64>],
    writer: &mut ImageWriter,
) -> Result<()> {
    /// Partial chunks' data held before it is written (bounded memory).
    const BATCH: usize = 32 << 20;
    let geometry = writer.geometry();
    let mut batch: Vec<(usize, Pieces)> = Vec::new();
    let mut held = 0;
    for i in 0..geometry.chunk_count() as usize {
        let r = geometry.chunk_range(i);
        let data = data_spans(&r, holes);
        if data.is_empty() {
            continue; // all hole: the parent's
        }
        let mut pieces = Vec::with_capacity(data.len());
        for span in data {
            let mut bytes = vec![0u8; (span.end - span.start) as usize];
            f.read_exact_at(&mut bytes, span.start)
                .map_err(Error::io("read", shown))?;
            pieces.push(((span.start - r.start) as usize, bytes));
        }
        if let [(0, whole)] = pieces.as_slice() {
            if whole.len() as u64 == r.end - r.start {
                writer.write_chunk(i, whole)?;
                continue;
            }
        }
        held += pieces.iter().map(|(_, b)| b.len()).sum::<usize>();
        batch.push((i, pieces));
        if held >= BATCH {
            flush(&mut batch, writer)?;
            held = 0;
        }
    }
    flush(&mut batch, writer)
}

/// A chunk's data pieces: (offset in the chunk, bytes).
type Pieces = Vec<(usize, Vec<u8>)>;

/// Writes the held partial chunks as patches over the parent's, and forgets them.
fn flush(batch: &mut Vec<(usize, Pieces)>, writer: &mut ImageWriter) -> Result<()> {
    let patches: Vec<Patch<'_>> = batch
        .iter()
        .map(|(chunk, pieces)| Patch {
            chunk: *chunk,
            pieces: pieces.iter().map(|(at, b)| (*at, b.as_slice())).collect(),
        })
        .collect();
    writer.write_patches(&patches)?;
    batch.clear();
    Ok(())
}

/// The parts of `range` outside `holes` (sorted, disjoint).
fn data_spans(range: &Range<u64>, holes: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut spans = Vec::new();
    let mut at = range.start;
    let first = holes.partition_point(|h| h.end <= range.start);
    for h in &holes[first..] {
        if h.start >= range.end {
            break;
        }
        if h.start > at {
            spans.push(at..h.start);
        }
        at = at.max(h.end);
    }
    if at < range.end {
        spans.push(at..range.end);
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_spans_are_what_the_holes_leave() {
        let holes = [0..4096, 8192..12288, 20000..30000];
        assert_eq!(data_spans(&(0..16384), &holes), [4096..8192, 12288..16384]);
        assert_eq!(data_spans(&(0..4096), &holes), Vec::<Range<u64>>::new());
        assert_eq!(data_spans(&(16384..32768), &holes), [16384..20000, 30000..32768]);
        let untouched = data_spans(&(40000..50000), &holes);
        assert_eq!((untouched.len(), &untouched[0]), (1, &(40000..50000)));
    }
}
