//! Fetching chunks: from the host cache when it has them, else with one ranged read per
//! run of storage-adjacent chunks, each chunk verified against its digest before anyone
//! sees it, published to the cache, and retried within a bounded policy.

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::{GetOptions, GetRange};

use crate::cache::{ChunkCache, FetchLock};
use crate::error::{Error, Result};
use crate::hash::Digest;
use crate::layout::{Backend, Layout, Slot};

/// How hard a fetch tries before it reports failure.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per read, the first included.
    pub attempts: u32,
    /// Give up once this much time has passed since a read's first attempt.
    pub deadline: Duration,
    /// First wait between attempts; doubles each time.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// Fetches of a chunk that failed verification before it is reported corrupt.
    pub corrupt_refetches: u32,
    /// How long chunks other processes are fetching may see none published before the
    /// rest are fetched here (a frozen or stalled peer is overtaken).
    pub peer_patience: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::within(Duration::from_secs(60))
    }
}

impl RetryPolicy {
    /// Retries of a read for up to `deadline`, the one bound: as many attempts as the
    /// backoff fits in it (so the count never ends the retries before the time does).
    pub fn within(deadline: Duration) -> Self {
        let mut policy = Self {
            attempts: 1,
            deadline,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            corrupt_refetches: 1,
            peer_patience: Duration::from_secs(1),
        };
        policy.attempts = policy.attempts_within();
        policy
    }

    /// Attempts whose waits alone fit in the deadline, the first included (each attempt
    /// takes time too: the deadline comes first).
    fn attempts_within(&self) -> u32 {
        let mut waited = Duration::ZERO;
        let mut attempts = 1u32;
        while waited < self.deadline && attempts < u32::MAX {
            waited += self.backoff(attempts - 1);
            attempts += 1;
        }
        attempts
    }

    fn backoff(&self, attempt: u32) -> Duration {
        self.initial_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff)
    }
}

/// What a fetch did, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Chunks read from the store or file.
    pub chunks_fetched: u64,
    /// Bytes read from the store or file.
    pub bytes_fetched: u64,
    /// Ranged reads issued (each covers one or more adjacent chunks).
    pub reads: u64,
    /// Chunks served from the host cache.
    pub cache_hits: u64,
    /// Chunks another process was fetching, waited for and then read from the cache.
    pub peer_waits: u64,
    /// Reads retried after a transient failure.
    pub retries: u64,
    /// Chunks that failed verification (each refetched or reported).
    pub corrupt: u64,
}

#[derive(Default)]
struct Counters {
    chunks_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    reads: AtomicU64,
    cache_hits: AtomicU64,
    peer_waits: AtomicU64,
    retries: AtomicU64,
    corrupt: AtomicU64,
}

/// Relaxed: statistics, read for reports only.
fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Where fetched chunks go.
pub(crate) trait Sink: Send + Sync {
    /// A verified chunk.
    fn deliver(&self, index: usize, data: &[u8]);
    /// A chunk that cannot be had (after the retry policy); the fetch stops here.
    fn fail(&self, index: usize, error: Error);
}

/// Fetches chunks of one image.
pub(crate) struct Fetcher {
    pub layout: Layout,
    pub cache: Option<Arc<ChunkCache>>,
    pub retry: RetryPolicy,
    /// Most bytes one ranged read covers.
    pub max_read: u64,
    counters: Counters,
    /// Whether a wait of this fetcher overtook peers that made no progress, none seen
    /// since: later waits overtake at once, so a frozen peer costs one patience, not one
    /// per chunk it holds. Relaxed: a hint; a stale read costs one wait or one duplicate
    /// fetch.
    peer_stalled: std::sync::atomic::AtomicBool,
}

/// Why a read stopped: the chunks before `next` were delivered.
struct Stopped {
    next: usize,
    error: Error,
}

impl Fetcher {
    pub fn new(
        layout: Layout,
        cache: Option<Arc<ChunkCache>>,
        retry: RetryPolicy,
        max_read: u64,
    ) -> Self {
        Self {
            layout,
            cache,
            retry,
            max_read,
            counters: Counters::default(),
            peer_stalled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn stats(&self) -> FetchStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FetchStats {
            chunks_fetched: l(&c.chunks_fetched),
            bytes_fetched: l(&c.bytes_fetched),
            reads: l(&c.reads),
            cache_hits: l(&c.cache_hits),
            peer_waits: l(&c.peer_waits),
            retries: l(&c.retries),
            corrupt: l(&c.corrupt),
        }
    }

    fn digest(&self, index: usize) -> Option<Digest> {
        match self.layout.slots.get(index) {
            Some(Slot::Data { digest, .. }) => *digest,
            _ => None,
        }
    }

    fn cached(&self, index: usize) -> Option<Vec<u8>> {
        let cache = self.cache.as_ref()?;
        let data = cache.get(&self.digest(index)?, self.layout.chunk_len(index))?;
        bump(&self.counters.cache_hits, 1);
        Some(data)
    }

    /// Fetches data chunks `chunks` (ascending; zero chunks are skipped) into `sink`:
    /// cached ones first, then the rest in runs of storage-adjacent chunks, one ranged read
    /// each. Returns false if a chunk failed for good (already reported to `sink`).
    pub async fn fetch(&self, chunks: &[usize], sink: &dyn Sink) -> bool {
        let mut ours = Vec::new();
        let mut peers = Vec::new();
        let mut locks = Vec::new();
        for &c in chunks {
            if !matches!(self.layout.slots.get(c), Some(Slot::Data { .. })) {
                continue;
            }
            if let Some(data) = self.cached(c) {
                sink.deliver(c, &data);
                continue;
            }
            match (&self.cache, self.digest(c)) {
                (Some(cache), Some(d)) => match cache.try_lock_fetch(&d) {
                    FetchLock::Ours(slot) => {
                        locks.push(slot);
                        // Published by a peer between our look-up and the lock?
                        match self.cached(c) {
                            Some(data) => sink.deliver(c, &data),
                            None => ours.push(c),
                        }
                    }
                    FetchLock::Peer => peers.push(c),
                },
                _ => ours.push(c),
            }
        }
        let mut ok = true;
        for run in self.runs(&ours) {
            if !self.fetch_run(run, sink).await {
                ok = false;
                break;
            }
        }
        if let Some(cache) = &self.cache {
            for slot in locks {
                cache.unlock_fetch(slot);
            }
        }
        ok && self.await_peers(peers, sink).await
    }

    /// Takes chunks `peers`, which other processes are fetching, from the cache as they
    /// publish them. The wait is bounded in total (the retry deadline, from the start of
    /// the wait, not per chunk), and peers that publish nothing for
    /// [`RetryPolicy::peer_patience`] (frozen, stalled) are overtaken: the chunks still
    /// missing are fetched here; later waits overtake at once until a peer is seen to
    /// move again. A chunk whose peer gave up is fetched at once.
    async fn await_peers(&self, mut peers: Vec<usize>, sink: &dyn Sink) -> bool {
        let Some(cache) = &self.cache else {
            return self.fetch_runs(&peers, sink).await;
        };
        let started = Instant::now();
        let patience = self.retry.peer_patience;
        // A peer this fetcher already overtook, and has not seen move since, gets none.
        let mut progress = if self.peer_stalled.load(Ordering::Relaxed) {
            started.checked_sub(patience).unwrap_or(started)
        } else {
            started
        };
        // At least one look at the cache, then until the peers are done or out of time.
        loop {
            let mut abandoned = Vec::new();
            let before = peers.len();
            peers.retain(|&c| {
                let Some(d) = self.digest(c) else {
                    return false;
                };
                if let Some(data) = self.cached(c) {
                    bump(&self.counters.peer_waits, 1);
                    sink.deliver(c, &data);
                    return false;
                }
                if !cache.peer_fetching(&d) {
                    abandoned.push(c);
                    return false;
                }
                true
            });
            if peers.len() + abandoned.len() < before {
                progress = Instant::now();
                self.peer_stalled.store(false, Ordering::Relaxed);
            }
            for c in abandoned {
                if !self.await_peer(c, sink).await {
                    return false;
                }
            }
            if peers.is_empty()
                || started.elapsed() >= self.retry.deadline
                || progress.elapsed() >= patience
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if !peers.is_empty() {
            self.peer_stalled.store(true, Ordering::Relaxed);
            log::debug!(
                "{} chunk(s) another process is fetching made no progress for {:?}: fetching them here",
                peers.len(),
                progress.elapsed()
            );
        }
        self.fetch_runs(&peers, sink).await
    }

    /// Fetches `chunks` (ascending) in runs; false once one failed for good.
    async fn fetch_runs(&self, chunks: &[usize], sink: &dyn Sink) -> bool {
        for run in self.runs(chunks) {
            if !self.fetch_run(run, sink).await {
                return false;
            }
        }
        true
    }

    /// Splits ascending chunks into runs one ranged read can cover.
    fn runs(&self, chunks: &[usize]) -> Vec<Range<usize>> {
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

    /// Waits for another process to publish chunk `c`, then takes it from the cache; if
    /// the peer gives up (its lock goes, no chunk appears), fetches it here.
    async fn await_peer(&self, c: usize, sink: &dyn Sink) -> bool {
        let (Some(cache), Some(d)) = (&self.cache, self.digest(c)) else {
            return self.fetch_run(c..c + 1, sink).await;
        };
        let started = Instant::now();
        while cache.peer_fetching(&d) && started.elapsed() < self.retry.deadline {
            if cache.contains(&d) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if let Some(data) = self.cached(c) {
            bump(&self.counters.peer_waits, 1);
            sink.deliver(c, &data);
            return true;
        }
        let slot = match cache.try_lock_fetch(&d) {
            FetchLock::Ours(slot) => Some(slot),
            FetchLock::Peer => None, // a new peer took over; fetch anyway, bounded as ever
        };
        let ok = self.fetch_run(c..c + 1, sink).await;
        if let Some(slot) = slot {
            cache.unlock_fetch(slot);
        }
        ok
    }

    /// Reads `run` with retries. Transient failures are retried from the first chunk not
    /// yet delivered; a chunk failing verification is refetched, then reported.
    async fn fetch_run(&self, run: Range<usize>, sink: &dyn Sink) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The waits between the attempts a policy allows, all added up.
    fn waits(policy: &RetryPolicy) -> Duration {
        (0..policy.attempts.saturating_sub(1))
            .map(|a| policy.backoff(a))
            .sum()
    }

    #[test]
    fn retries_within_a_deadline_are_bounded_by_the_time_not_the_count() {
        for secs in [1, 10, 29, 35, 60, 600] {
            let policy = RetryPolicy::within(Duration::from_secs(secs));
            assert!(
                waits(&policy) >= policy.deadline,
                "{secs} s: {} attempts wait only {:?}",
                policy.attempts,
                waits(&policy)
            );
        }
        assert_eq!(
            RetryPolicy::default().deadline,
            Duration::from_secs(60),
            "the default bound"
        );
    }
}
