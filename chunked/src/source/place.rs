//! Placing what arrives: a verified chunk's faulted pages first (each woken at once),
//! then the whole chunk with one placement; zero pages owed to requests that straddled a
//! zero chunk; and a chunk that cannot be had stops the source through the placer.

use std::sync::atomic::Ordering;
use std::time::Instant;

use pager::{Placed, SourceError};

use super::Shared;
use crate::error::Error;
use crate::fetch::Sink;

impl Shared {
    /// Places a verified chunk: its faulted pages first (each woken at once), then the
    /// whole chunk with one placement (pages already placed are skipped).
    fn place_chunk(&self, index: usize, data: &[u8]) {
        let Some(placer) = self.placer.get() else {
            return;
        };
        let g = self.geometry();
        let ps = g.page_size as usize;
        let start = g.chunk_range(index).start;
        let padded;
        let data = if data.len() % ps == 0 {
            data
        } else {
            padded = pad(data, ps);
            &padded[..]
        };
        let waiting = self.lock().waiting.remove(&index).unwrap_or_default();
        for off in waiting {
            let i = ((off - start) as usize) / ps;
            if let Some(page) = data.get(i * ps..(i + 1) * ps) {
                let _ = placer.place(off - off % ps as u64, Some(page));
            }
        }
        match placer.place_run(start, data) {
            Ok(Some(_)) => {}
            // Part of the chunk lies outside every region (or a region ends inside it):
            // place page by page, passing over what no region holds.
            Ok(None) if !self.stopped.load(Ordering::Relaxed) => {
                for (i, page) in data.chunks_exact(ps).enumerate() {
                    if matches!(
                        placer.place(start + (i * ps) as u64, Some(page)),
                        Ok(Placed::Stopped)
                    ) {
                        break;
                    }
                }
            }
            Ok(None) => {}
            // A region whose pages do not tile the chunk (2 MiB pages, smaller chunks):
            // nothing of it can ever be placed, so stop rather than strand its faults.
            Err(e) => {
                self.stopped.store(true, Ordering::Relaxed);
                placer.fail(SourceError {
                    what: "place chunk",
                    offset: start,
                    source: std::io::Error::other(e),
                });
                return;
            }
        }
        let _ = self.first_place.set(Instant::now());
        self.placed.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn place_zero_pages(&self) {
        let pages = std::mem::take(&mut self.lock().zero_pages);
        let (Some(placer), false) = (self.placer.get(), pages.is_empty()) else {
            return;
        };
        let ps = u64::from(self.geometry().page_size);
        for r in pages {
            for off in (r.start..r.end).step_by(ps as usize) {
                let _ = placer.place(off, None);
            }
        }
    }
}

fn pad(data: &[u8], ps: usize) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(data.len().next_multiple_of(ps), 0);
    v
}

impl Sink for Shared {
    fn deliver(&self, index: usize, data: &[u8]) {
        self.place_chunk(index, data);
    }

    fn fail(&self, index: usize, error: Error) {
        log::error!("chunk {index}: {error}");
        self.stopped.store(true, Ordering::Relaxed);
        let offset = self.geometry().chunk_range(index).start;
        if let Some(placer) = self.placer.get() {
            placer.fail(SourceError {
                what: "fetch chunk",
                offset,
                source: std::io::Error::other(error),
            });
        }
    }
}
