//! Fetching chunks: from the host cache when it has them, else with one ranged read per
//! run of storage-adjacent chunks, each chunk verified against its digest before anyone
//! sees it, published to the cache, and retried within a bounded policy.
//!
//! Here the [`Fetcher`] and its entry point; `read.rs` the ranged reads and their retries,
//! `peers.rs` the chunks another process is fetching, `retry.rs` the policy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::cache::{ChunkCache, FetchLock};
use crate::error::Error;
use crate::hash::Digest;
use crate::layout::{Layout, Slot};

mod peers;
mod read;
mod retry;

pub use retry::RetryPolicy;

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
    /// Chunks fetched here while another process held their fetch lock: a peer that
    /// published nothing for the [patience](RetryPolicy::peer_patience) (frozen,
    /// stalled, starved of CPU) or not within the deadline. Only these may be fetched
    /// twice on one host: every other chunk is fetched by the one process holding its lock.
    pub overtaken: u64,
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
    overtaken: AtomicU64,
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
            overtaken: l(&c.overtaken),
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
}
