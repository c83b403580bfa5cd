//! Counters: relaxed atomics, cheap enough to leave on, safe to bump from the SIGBUS
//! handler. [`StatsSnapshot`] is what embedders read.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::histogram::{AtomicLatencyHistogram, LatencyHistogram};

/// Live counters. Every field is a relaxed atomic: counters carry no data between
/// threads, and readers only need eventually-consistent totals.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub faults_missing: AtomicU64,
    pub faults_minor: AtomicU64,
    pub faults_wp: AtomicU64,
    pub faults_duplicate: AtomicU64,
    pub faults_wake_only: AtomicU64,
    pub faults_unknown: AtomicU64,
    pub placed_fault: AtomicU64,
    pub placed_prefetch: AtomicU64,
    pub placed_zero: AtomicU64,
    pub placed_arrival: AtomicU64,
    pub placed_moved: AtomicU64,
    pub move_refused: AtomicU64,
    pub bytes: AtomicU64,
    pub exists: AtomicU64,
    pub again: AtomicU64,
    pub released: AtomicU64,
    pub removed_in_flight: AtomicU64,
    pub source_reads: AtomicU64,
    pub source_errors: AtomicU64,
    pub events_remove: AtomicU64,
    pub events_unmap: AtomicU64,
    pub events_remap: AtomicU64,
    pub gone_silently: AtomicU64,
    pub events_fork: AtomicU64,
    pub forks_served: AtomicU64,
    pub forks_refused: AtomicU64,
    pub forks_failed: AtomicU64,
    pub poisoned: AtomicU64,
    pub latency: AtomicLatencyHistogram,
}

#[inline]
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[inline]
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    /// Records one fault's latency (event read → page placed).
    #[inline]
    pub fn record_latency(&self, latency: Duration) {
        self.latency.record(latency);
    }

    /// A consistent-enough copy of every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let latency = self.latency.snapshot();
        StatsSnapshot {
            faults_missing: l(&self.faults_missing),
            faults_minor: l(&self.faults_minor),
            faults_wp: l(&self.faults_wp),
            faults_duplicate: l(&self.faults_duplicate),
            faults_wake_only: l(&self.faults_wake_only),
            faults_unknown: l(&self.faults_unknown),
            placed_fault: l(&self.placed_fault),
            placed_prefetch: l(&self.placed_prefetch),
            placed_zero: l(&self.placed_zero),
            placed_arrival: l(&self.placed_arrival),
            placed_moved: l(&self.placed_moved),
            move_refused: l(&self.move_refused),
            bytes: l(&self.bytes),
            exists: l(&self.exists),
            again: l(&self.again),
            released: l(&self.released),
            removed_in_flight: l(&self.removed_in_flight),
            source_reads: l(&self.source_reads),
            source_errors: l(&self.source_errors),
            events_remove: l(&self.events_remove),
            events_unmap: l(&self.events_unmap),
            events_remap: l(&self.events_remap),
            gone_silently: l(&self.gone_silently),
            events_fork: l(&self.events_fork),
            forks_served: l(&self.forks_served),
            forks_refused: l(&self.forks_refused),
            forks_failed: l(&self.forks_failed),
            poisoned: l(&self.poisoned),
            blocktime: latency.sum(),
            latency,
        }
    }
}

/// A copy of the pager's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// MISSING faults read.
    pub faults_missing: u64,
    /// MINOR faults read.
    pub faults_minor: u64,
    /// Write-protect faults read.
    pub faults_wp: u64,
    /// Faults on pages already requested (nothing asked again).
    pub faults_duplicate: u64,
    /// Faults on pages already placed (only woken).
    pub faults_wake_only: u64,
    /// Faults outside every region.
    pub faults_unknown: u64,
    /// Data pages placed to resolve a fault.
    pub placed_fault: u64,
    /// Pages placed by the prefetcher (and fault-around).
    pub placed_prefetch: u64,
    /// Zero pages placed (fault or prefetch).
    pub placed_zero: u64,
    /// Pages placed on arrival from a remote source.
    pub placed_arrival: u64,
    /// Of `placed_arrival`: pages moved into place rather than copied
    /// ([`Placer::place_run_moving`](crate::Placer::place_run_moving)).
    pub placed_moved: u64,
    /// Moves the kernel refused (a source page shared with a forked child, a hole in the
    /// source…): those pages were copied instead.
    pub move_refused: u64,
    /// Bytes of data placed.
    pub bytes: u64,
    /// Placements that found the page present (EEXIST).
    pub exists: u64,
    /// Placements refused while the address space changed (EAGAIN).
    pub again: u64,
    /// Claims given back (requested → missing) because a placement could not be made now.
    pub released: u64,
    /// Pages a REMOVE dropped while their fetch was in flight (placed as zeros).
    pub removed_in_flight: u64,
    /// Pages read from the source.
    pub source_reads: u64,
    /// Source failures.
    pub source_errors: u64,
    /// REMOVE events.
    pub events_remove: u64,
    /// UNMAP events.
    pub events_unmap: u64,
    /// REMAP events.
    pub events_remap: u64,
    /// Pages whose range the process unmapped or mapped over without an event, found
    /// when a placement met ENOENT ([`PagerBuilder::silent_unmaps`](crate::PagerBuilder::silent_unmaps)):
    /// left to the process, not placed.
    pub gone_silently: u64,
    /// FORK events.
    pub events_fork: u64,
    /// Forked children served by a child engine.
    pub forks_served: u64,
    /// Forked children refused (too many at once, or a source that cannot serve a child,
    /// see [`Source::child`](crate::Source::child)): logged, their missing pages poisoned
    /// (a touch raises SIGBUS) and their uffd closed.
    pub forks_refused: u64,
    /// Forked children whose engine failed to start (logged; their missing pages were
    /// poisoned and their uffd closed).
    pub forks_failed: u64,
    /// Pages poisoned after a fatal error (a touch raises SIGBUS), or in a refused child.
    pub poisoned: u64,
    /// Sum of fault latencies: the time faulting threads spent blocked after the pager
    /// saw their fault (the kernel does not say when a fault began).
    pub blocktime: Duration,
    /// Fault latency (event read → page placed), faults a remote source answered later
    /// included (counted when their page arrives).
    pub latency: LatencyHistogram,
}

impl StatsSnapshot {
    /// Faults read, all kinds.
    pub fn faults(&self) -> u64 {
        self.faults_missing + self.faults_minor + self.faults_wp
    }

    /// Pages placed, all origins.
    pub fn placed(&self) -> u64 {
        self.placed_fault + self.placed_prefetch + self.placed_zero + self.placed_arrival
    }
}

/// Slots of the pending-fault table: faults outstanding at once on a remote source (one
/// per blocked thread); a fault that finds no free slot near its hash is not timed.
const PENDING_SLOTS: usize = 1024;
/// Slots probed from a page's hash.
const PENDING_PROBE: usize = 16;
/// A slot being filled in.
const RESERVED: usize = usize::MAX;

/// Faults a remote source answers later (`Pending`): when each was read, so that its
/// latency is counted when its page is placed, by whichever thread places it. A fixed
/// open-addressed table of atomics: no allocation or lock after creation.
pub(crate) struct PendingFaults {
    /// Page + 1 (0: free; `RESERVED`: being filled in).
    keys: Box<[AtomicUsize]>,
    /// Nanoseconds since `epoch` when the fault was read.
    times: Box<[AtomicU64]>,
    /// Entries in the table: placements skip the lookup while it is zero.
    count: AtomicUsize,
    epoch: Instant,
}

impl Default for PendingFaults {
    fn default() -> Self {
        Self {
            keys: (0..PENDING_SLOTS).map(|_| AtomicUsize::new(0)).collect(),
            times: (0..PENDING_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }
}

impl std::fmt::Debug for PendingFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingFaults")
            .field("count", &self.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn slot_of(page: usize, probe: usize) -> usize {
    (page.wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as usize) >> 7).wrapping_add(probe) % PENDING_SLOTS
}

impl PendingFaults {
    /// A fault on `page`, read at `at`, was answered `Pending`. A page already waited on
    /// keeps its earliest fault.
    pub fn asked(&self, page: usize, at: Instant) {
        let key = page + 1;
        let nanos = at.saturating_duration_since(self.epoch).as_nanos() as u64;
        for probe in 0..PENDING_PROBE {
            let i = slot_of(page, probe);
            // Acquire on failure: a key seen equal to ours is a complete entry.
            match self.keys[i].compare_exchange(0, RESERVED, Ordering::Acquire, Ordering::Acquire) {
                Ok(_) => {
                    self.times[i].store(nanos, Ordering::Relaxed);
                    // Release: the time is written before the key that names it.
                    self.keys[i].store(key, Ordering::Release);
                    self.count.fetch_add(1, Ordering::Release);
                    // SeqCst fence: the caller reads the page's state next, while a placer
                    // publishes the state and then reads `count` (store buffering, see
                    // `placed`): one of the two sees the other's write.
                    std::sync::atomic::fence(Ordering::SeqCst);
                    return;
                }
                Err(k) if k == key => return,
                Err(_) => {}
            }
        }
    }

    /// Pages `page..page + count` were placed: counts the latency of the faults waiting
    /// on them into `stats`.
    #[inline]
    pub fn placed(&self, page: usize, count: usize, stats: &Stats) {
        // SeqCst fence: pairs with the one in `asked` — the page's state was published
        // before this load, an entry's count before its state is read, so either we see
        // the entry here or `asked` sees the page placed and counts it itself.
        std::sync::atomic::fence(Ordering::SeqCst);
        // Acquire: pairs with `asked`'s Release, so an entry made before is seen.
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        for p in page..page + count {
            let key = p + 1;
            for probe in 0..PENDING_PROBE {
                let i = slot_of(p, probe);
                // Acquire: pairs with the Release store of the key (the time is written).
                if self.keys[i].load(Ordering::Acquire) != key {
                    continue;
                }
                let nanos = self.times[i].load(Ordering::Relaxed);
                // The CAS decides which placer counts it (a duplicate placement may race).
                if self.keys[i]
                    .compare_exchange(key, 0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                    let now = Instant::now().saturating_duration_since(self.epoch);
                    stats.record_latency(now.saturating_sub(Duration::from_nanos(nanos)));
                }
                break;
            }
        }
    }
}
