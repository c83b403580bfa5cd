//! Counters: relaxed atomics, cheap enough to leave on, safe to bump from the SIGBUS
//! handler. [`StatsSnapshot`] is what embedders read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    pub events_fork: AtomicU64,
    pub forks_served: AtomicU64,
    pub forks_refused: AtomicU64,
    pub forks_failed: AtomicU64,
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
            events_fork: l(&self.events_fork),
            forks_served: l(&self.forks_served),
            forks_refused: l(&self.forks_refused),
            forks_failed: l(&self.forks_failed),
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
    /// FORK events.
    pub events_fork: u64,
    /// Forked children served by a child engine.
    pub forks_served: u64,
    /// Forked children refused (too many at once): their uffd was closed, so their
    /// missing pages read as zeros.
    pub forks_refused: u64,
    /// Forked children whose engine failed to start (logged; their uffd was closed).
    pub forks_failed: u64,
    /// Sum of fault latencies: the time faulting threads spent blocked after the pager
    /// saw their fault (the kernel does not say when a fault began).
    pub blocktime: Duration,
    /// Fault latency (event read → page placed).
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
