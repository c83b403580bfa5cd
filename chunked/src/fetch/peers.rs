//! Chunks another process is fetching: taken from the cache as that process publishes
//! them, within a bounded wait, and fetched here when the peer gives up or stalls.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{bump, Fetcher, Sink};
use crate::cache::FetchLock;

impl Fetcher {
    /// Takes chunks `peers`, which other processes are fetching, from the cache as they
    /// publish them. The wait is bounded in total (the retry deadline, from the start of
    /// the wait, not per chunk), and peers that publish nothing for
    /// [`RetryPolicy::peer_patience`](super::RetryPolicy::peer_patience) (frozen, stalled) are overtaken: the chunks still
    /// missing are fetched here; later waits overtake at once until a peer is seen to
    /// move again. A chunk whose peer gave up is fetched at once.
    pub(super) async fn await_peers(&self, mut peers: Vec<usize>, sink: &dyn Sink) -> bool {
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
            bump(&self.counters.overtaken, peers.len() as u64);
            log::debug!(
                "{} chunk(s) another process is fetching made no progress for {:?}: fetching them here",
                peers.len(),
                progress.elapsed()
            );
        }
        self.fetch_runs(&peers, sink).await
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
            // A peer still holds it (past the deadline) or a new one took over: fetch
            // anyway, bounded as ever.
            FetchLock::Peer => {
                bump(&self.counters.overtaken, 1);
                None
            }
        };
        let ok = self.fetch_run(c..c + 1, sink).await;
        if let Some(slot) = slot {
            cache.unlock_fetch(slot);
        }
        ok
    }
}
