//! Reading chunks from the store: ascending chunks split into runs one ranged read can
//! cover, each run read with retries and every chunk verified before it is delivered.

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::{GetOptions, GetRange};

use super::{bump, Fetcher, Sink};
use crate::error::{Error, Result};
use crate::hash::Digest;
use crate::layout::{Backend, Slot};

/// Why a read stopped: the chunks before `next` were delivered.
struct Stopped {
    next: usize,
    error: Error,
}

impl Fetcher {
    /// Fetches `chunks` (ascending) in runs; false once one failed for good.
    pub(super) async fn fetch_runs(&self, chunks: &[usize], sink: &dyn Sink) -> bool {
        for run in self.runs(chunks) {
            if !self.fetch_run(run, sink).await {
                return false;
            }
        }
        true
    }

    /// Splits ascending chunks into runs one ranged read can cover.
    pub(super) fn runs(&self, chunks: &[usize]) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for &c in chunks {
            match runs.last_mut() {
                Some(r)
                    if self.layout.follows(r.end - 1, c)
                        && ((r.end - r.start + 1) * self.layout.geometry.chunk_size as usize)
                            as u64
                            <= self.max_read =>
                {
                    r.end = c + 1
                }
                _ => runs.push(c..c + 1),
            }
        }
        runs
    }

    /// Reads `run` with retries. Transient failures are retried from the first chunk not
    /// yet delivered; a chunk failing verification is refetched, then reported.
    pub(super) async fn fetch_run(&self, run: Range<usize>, sink: &dyn Sink) -> bool {
        let started = Instant::now();
        let mut next = run.start;
        let mut attempts = 0u32;
        let mut corrupt_seen = 0u32;
        while next < run.end {
            attempts += 1;
            // No attempt outlives the bound: a store that accepts and never answers would
            // otherwise hold the last one for its whole request timeout.
            let left = self
                .retry
                .deadline
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1));
            let stopped = match tokio::time::timeout(left, self.read_once(next..run.end, sink))
                .await
            {
                Ok(Ok(())) => return true,
                Ok(Err(stopped)) => stopped,
                Err(_) => Stopped {
                    next,
                    error: Error::Io {
                        what: "read",
                        path: format!("chunk {next}"),
                        source: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "no answer within the retry bound ({} s)",
                                self.retry.deadline.as_secs_f64()
                            ),
                        ),
                    },
                },
            };
            next = stopped.next;
            let error = stopped.error;
            let retry = if let Error::Corrupt { .. } = error {
                bump(&self.counters.corrupt, 1);
                corrupt_seen += 1;
                corrupt_seen <= self.retry.corrupt_refetches
            } else {
                error.is_transient()
                    && attempts < self.retry.attempts
                    && started.elapsed() < self.retry.deadline
            };
            if !retry {
                let error = match error {
                    e @ Error::Corrupt { .. } => e,
                    e if !e.is_transient() => e,
                    e => Error::GaveUp {
                        chunk: next,
                        attempts,
                        elapsed_ms: started.elapsed().as_millis() as u64,
                        last: Box::new(e),
                    },
                };
                sink.fail(next, error);
                return false;
            }
            bump(&self.counters.retries, 1);
            log::debug!("chunk {next}: retrying after {error}");
            let wait = self.retry.backoff(attempts - 1);
            let left = self.retry.deadline.saturating_sub(started.elapsed());
            tokio::time::sleep(wait.min(left)).await;
        }
        true
    }

    /// The error of a failed ranged read that ends at `end`: a pack the store reports as
    /// shorter than that is truncated ([`Error::PackTooShort`], permanent) — the store
    /// says so only as a generic error (HTTP 416, a local "invalid range"), which would
    /// otherwise be retried as transient.
    async fn read_error(
        &self,
        path: &object_store::path::Path,
        end: u64,
        error: object_store::Error,
    ) -> Error {
        if let object_store::Error::Generic { .. } = &error {
            if let Some(size) = self.pack_shorter_than(path, end).await {
                return Error::PackTooShort {
                    path: path.to_string(),
                    size,
                    want: end,
                    source: Some(error),
                };
            }
        }
        Error::store("read pack", path)(error)
    }

    /// The size of the pack at `path`, if the store reports it shorter than `end`.
    async fn pack_shorter_than(&self, path: &object_store::path::Path, end: u64) -> Option<u64> {
        let Backend::Store { store, .. } = &self.layout.backend else {
            return None;
        };
        let meta = object_store::ObjectStoreExt::head(store.objects(), path)
            .await
            .ok()?;
        (meta.size < end).then_some(meta.size)
    }

    /// One ranged read of `run`, delivering each chunk as soon as its bytes are in.
    async fn read_once(&self, run: Range<usize>, sink: &dyn Sink) -> Result<(), Stopped> {
        let first = run.start;
        let Some(Slot::Data { object, offset, .. }) = self.layout.slots.get(first).copied() else {
            return Ok(());
        };
        let bytes: u64 = run.clone().map(|c| self.layout.chunk_len(c) as u64).sum();
        let range = offset..offset + bytes;
        bump(&self.counters.reads, 1);
        let mut next = first;
        let stop = |next: usize| move |error: Error| Stopped { next, error };
        match &self.layout.backend {
            Backend::Store { store, packs } => {
                let pack = packs[object as usize];
                let path = store.pack_path(&pack);
                let options = GetOptions {
                    range: Some(GetRange::Bounded(range.clone())),
                    ..GetOptions::default()
                };
                let result = match store.objects().get_opts(&path, options).await {
                    Ok(result) => result,
                    Err(e) => return Err(stop(next)(self.read_error(&path, range.end, e).await)),
                };
                let mut stream = result.into_stream();
                let mut buf = BytesMut::new();
                while let Some(piece) = stream.next().await {
                    let piece = piece
                        .map_err(Error::store("read pack", &path))
                        .map_err(stop(next))?;
                    buf.extend_from_slice(&piece);
                    while next < run.end && buf.len() >= self.layout.chunk_len(next) {
                        let chunk = buf.split_to(self.layout.chunk_len(next)).freeze();
                        self.accept(next, chunk, sink).map_err(stop(next))?;
                        next += 1;
                    }
                }
                if next < run.end {
                    // A pack shorter than the manifest says answers short every time.
                    if let Some(size) = self.pack_shorter_than(&path, range.end).await {
                        return Err(stop(next)(Error::PackTooShort {
                            path: path.to_string(),
                            size,
                            want: range.end,
                            source: None,
                        }));
                    }
                    let want = self.layout.chunk_len(next) as u64;
                    return Err(stop(next)(Error::ShortRead {
                        chunk: next,
                        want,
                        got: buf.len() as u64,
                    }));
                }
            }
            Backend::File { file, path } => {
                let file = file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut data = vec![0u8; bytes as usize];
                    file.read_exact_at(&mut data, range.start).map(|_| data)
                })
                .await
                .map_err(|e| Error::io("read", path)(std::io::Error::other(e)))
                .and_then(|r| r.map_err(Error::io("read", path)))
                .map_err(stop(next))?;
                let mut data = Bytes::from(read);
                while next < run.end {
                    let chunk = data.split_to(self.layout.chunk_len(next));
                    self.accept(next, chunk, sink).map_err(stop(next))?;
                    next += 1;
                }
            }
        }
        Ok(())
    }

    /// Verifies chunk `index`, publishes it to the cache and hands it to the sink.
    fn accept(&self, index: usize, data: Bytes, sink: &dyn Sink) -> Result<()> {
        bump(&self.counters.chunks_fetched, 1);
        bump(&self.counters.bytes_fetched, data.len() as u64);
        if let Some(expected) = self.digest(index) {
            let actual = Digest::of(&data);
            if actual != expected {
                return Err(Error::Corrupt {
                    chunk: index,
                    expected,
                    actual,
                });
            }
            if let Some(cache) = &self.cache {
                if let Err(e) = cache.put(&expected, &data) {
                    log::warn!("chunk cache: {e}");
                }
            }
        }
        sink.deliver(index, &data);
        Ok(())
    }
}
