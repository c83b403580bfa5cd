//! Counters and the fault-latency histogram: relaxed atomics, cheap enough to leave on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Histogram buckets: bucket 0 is < 1 µs, bucket k ≥ 1 is [2^(k-1), 2^k) µs.
pub const BUCKETS: usize = 32;

/// Live counters. Every field is a relaxed atomic: counters carry no data between
/// threads, and readers only need eventually-consistent totals.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) faults_missing: AtomicU64,
    pub(crate) faults_minor: AtomicU64,
    pub(crate) faults_wp: AtomicU64,
    pub(crate) faults_duplicate: AtomicU64,
    pub(crate) faults_wake_only: AtomicU64,
    pub(crate) faults_unknown: AtomicU64,
    pub(crate) placed_fault: AtomicU64,
    pub(crate) placed_prefetch: AtomicU64,
    pub(crate) placed_zero: AtomicU64,
    pub(crate) placed_arrival: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) exists: AtomicU64,
    pub(crate) again: AtomicU64,
    pub(crate) source_reads: AtomicU64,
    pub(crate) source_errors: AtomicU64,
    pub(crate) events_remove: AtomicU64,
    pub(crate) events_unmap: AtomicU64,
    pub(crate) events_remap: AtomicU64,
    pub(crate) events_fork: AtomicU64,
    pub(crate) blocktime_ns: AtomicU64,
    pub(crate) latency: [AtomicU64; BUCKETS],
}

#[inline]
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[inline]
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// The histogram bucket of a latency.
#[inline]
pub fn bucket(latency: Duration) -> usize {
    let us = latency.as_micros() as u64;
    if us == 0 {
        0
    } else {
        (64 - us.leading_zeros() as usize).min(BUCKETS - 1)
    }
}

impl Stats {
    /// Records one fault's latency (event read → page placed).
    #[inline]
    pub(crate) fn record_latency(&self, latency: Duration) {
        bump(&self.latency[bucket(latency)]);
        add(&self.blocktime_ns, latency.as_nanos() as u64);
    }

    /// A consistent-enough copy of every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut latency = [0; BUCKETS];
        for (out, c) in latency.iter_mut().zip(&self.latency) {
            *out = l(c);
        }
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
            bytes: l(&self.bytes),
            exists: l(&self.exists),
            again: l(&self.again),
            source_reads: l(&self.source_reads),
            source_errors: l(&self.source_errors),
            events_remove: l(&self.events_remove),
            events_unmap: l(&self.events_unmap),
            events_remap: l(&self.events_remap),
            events_fork: l(&self.events_fork),
            blocktime: Duration::from_nanos(l(&self.blocktime_ns)),
            latency,
        }
    }
}

/// A copy of the pager's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// Pages placed by the prefetcher.
    pub placed_prefetch: u64,
    /// Zero pages placed (fault or prefetch).
    pub placed_zero: u64,
    /// Pages placed on arrival from a remote source.
    pub placed_arrival: u64,
    /// Bytes of data placed.
    pub bytes: u64,
    /// Placements that found the page present (EEXIST).
    pub exists: u64,
    /// Placements refused while the address space changed (EAGAIN).
    pub again: u64,
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
    /// FORK events.
    pub events_fork: u64,
    /// Sum of fault latencies: the time faulting threads spent blocked after the pager
    /// saw their fault (the kernel does not say when a fault began).
    pub blocktime: Duration,
    /// Fault latency histogram, see [`BUCKETS`].
    pub latency: [u64; BUCKETS],
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

    /// The latency below which `q` (0..=1) of recorded faults fall, as a bucket's upper
    /// bound (log2 resolution).
    pub fn latency_quantile(&self, q: f64) -> Option<Duration> {
        latency_quantile(&self.latency, q)
    }

    /// The fault-latency histogram as text lines (see [`histogram_lines`]).
    pub fn histogram_lines(&self) -> Vec<String> {
        histogram_lines(&self.latency)
    }
}

/// The latency below which `q` (0..=1) of the counts in `latency` (log2-µs buckets, see
/// [`BUCKETS`]) fall, as a bucket's upper bound; `None` when nothing was recorded.
pub fn latency_quantile(latency: &[u64; BUCKETS], q: f64) -> Option<Duration> {
    let total: u64 = latency.iter().sum();
    if total == 0 {
        return None;
    }
    let want = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (k, n) in latency.iter().enumerate() {
        seen += n;
        if seen >= want {
            return Some(Duration::from_micros(1u64 << k));
        }
    }
    None
}

/// A log2-µs histogram as text lines `lo..hi µs  count  bar`, empty buckets left out.
pub fn histogram_lines(latency: &[u64; BUCKETS]) -> Vec<String> {
    let max = latency.iter().copied().max().unwrap_or(0).max(1);
    latency
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(k, &n)| {
            let (lo, hi) = if k == 0 {
                (0, 1)
            } else {
                (1u64 << (k - 1), 1u64 << k)
            };
            let bar = "#".repeat(((n * 40).div_ceil(max)) as usize);
            format!("{lo:>7}..{hi:<7} µs {n:>9}  {bar}")
        })
        .collect()
}
