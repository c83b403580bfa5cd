//! Latency histograms in log2-microsecond buckets: [`AtomicLatencyHistogram`] records from
//! many threads (and from a signal handler: relaxed atomics only), [`LatencyHistogram`] is
//! a copy to read quantiles and text from. Used by the pager's fault latency and by
//! postcopy's requested-page latency, so both print and compare alike.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket count: bucket 0 is < 1 µs, bucket k ≥ 1 is [2^(k-1), 2^k) µs, the last one
/// open-ended (≥ 2^30 µs ≈ 18 min).
const BUCKETS: usize = 32;

/// A latency histogram: counts in log2-µs buckets and the exact sum.
///
/// ```
/// use std::time::Duration;
/// use pager::LatencyHistogram;
///
/// let mut h = LatencyHistogram::default();
/// for us in [3, 5, 6, 7, 900] {
///     h.record(Duration::from_micros(us));
/// }
/// assert_eq!(h.count(), 5);
/// assert_eq!(h.quantile(0.5), Some(Duration::from_micros(8)));  // in [4, 8) µs
/// assert_eq!(h.quantile(1.0), Some(Duration::from_micros(1024)));
/// assert_eq!(h.sum(), Duration::from_micros(921));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: [u64; BUCKETS],
    sum: Duration,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
            sum: Duration::ZERO,
        }
    }
}

impl LatencyHistogram {
    /// Number of buckets.
    pub const BUCKETS: usize = BUCKETS;

    /// The bucket a latency falls in.
    #[inline]
    pub fn bucket(latency: Duration) -> usize {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if us == 0 {
            0
        } else {
            (64 - us.leading_zeros() as usize).min(BUCKETS - 1)
        }
    }

    /// A bucket's bounds `[low, high)`.
    pub fn bucket_bounds(k: usize) -> (Duration, Duration) {
        let us = |e: usize| Duration::from_micros(1u64 << e.min(63));
        match k {
            0 => (Duration::ZERO, us(0)),
            k => (us(k - 1), us(k)),
        }
    }

    /// A histogram from counts per bucket (at most [`LatencyHistogram::BUCKETS`], e.g.
    /// read back from JSON) and their sum; extra counts go to the last bucket.
    pub fn from_counts(counts: &[u64], sum: Duration) -> Self {
        let mut h = Self {
            sum,
            ..Self::default()
        };
        for (k, &n) in counts.iter().enumerate() {
            h.counts[k.min(BUCKETS - 1)] += n;
        }
        h
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        self.counts[Self::bucket(latency)] += 1;
        self.sum += latency;
    }

    /// Adds another histogram's counts and sum.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }

    /// Counts per bucket.
    pub fn counts(&self) -> &[u64; BUCKETS] {
        &self.counts
    }

    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum of the latencies recorded (for faults: the blocktime).
    pub fn sum(&self) -> Duration {
        self.sum
    }

    /// The latency below which `q` (0..=1) of the recorded ones fall, as the upper bound
    /// of its bucket (log2 resolution); `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        self.counts.iter().enumerate().find_map(|(k, &n)| {
            seen += n;
            (seen >= want).then(|| Self::bucket_bounds(k).1)
        })
    }

    /// The histogram as text lines `lo..hi µs  count  bar`, empty buckets left out.
    pub fn lines(&self) -> Vec<String> {
        let max = self.counts.iter().copied().max().unwrap_or(0).max(1);
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(k, &n)| {
                let (lo, hi) = Self::bucket_bounds(k);
                let bar = "#".repeat(((n * 40).div_ceil(max)) as usize);
                format!(
                    "{:>7}..{:<7} µs {n:>9}  {bar}",
                    lo.as_micros(),
                    hi.as_micros()
                )
            })
            .collect()
    }
}

/// A latency histogram many threads record into at once: relaxed atomics (counters carry
/// no data between threads; readers want eventually-consistent totals), no lock, no
/// allocation — safe to record from a signal handler.
#[derive(Debug)]
pub struct AtomicLatencyHistogram {
    counts: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for AtomicLatencyHistogram {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl AtomicLatencyHistogram {
    /// Records one latency.
    #[inline]
    pub fn record(&self, latency: Duration) {
        self.counts[LatencyHistogram::bucket(latency)].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// A copy of the counts now.
    pub fn snapshot(&self) -> LatencyHistogram {
        LatencyHistogram {
            counts: std::array::from_fn(|k| self.counts[k].load(Ordering::Relaxed)),
            sum: Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_microseconds() {
        let b = |us| LatencyHistogram::bucket(Duration::from_micros(us));
        assert_eq!(b(0), 0);
        assert_eq!(b(1), 1);
        assert_eq!((b(2), b(3), b(4)), (2, 2, 3));
        assert_eq!(b(u64::MAX), BUCKETS - 1);
        assert_eq!(
            LatencyHistogram::bucket_bounds(3),
            (Duration::from_micros(4), Duration::from_micros(8))
        );
    }

    #[test]
    fn quantiles_lines_and_merge() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        for _ in 0..99 {
            h.record(Duration::from_micros(10));
        }
        h.record(Duration::from_millis(5));
        assert_eq!(h.quantile(0.5), Some(Duration::from_micros(16)));
        assert_eq!(h.quantile(0.99), Some(Duration::from_micros(16)));
        assert_eq!(h.quantile(1.0), Some(Duration::from_micros(8192)));
        let lines = h.lines();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].contains("8..16") && lines[0].contains("99"),
            "{lines:?}"
        );
        let mut twice = h.clone();
        twice.merge(&h);
        assert_eq!(twice.count(), 200);
        assert_eq!(twice.sum(), h.sum() * 2);
        let back = LatencyHistogram::from_counts(h.counts(), h.sum());
        assert_eq!(back, h);
    }

    #[test]
    fn the_atomic_histogram_snapshots_what_threads_recorded() {
        let h = AtomicLatencyHistogram::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        h.record(Duration::from_micros(3));
                    }
                });
            }
        });
        let snap = h.snapshot();
        assert_eq!(snap.count(), 4000);
        assert_eq!(snap.counts()[2], 4000);
        assert_eq!(snap.sum(), Duration::from_micros(12_000));
    }
}
