//! Pages placed over time, by how they came (fault, prefetch, arrival), beside the
//! workload's own progress: the pager's counters sampled every [`EVERY`] while a restore
//! runs. A workload that waits shows as a flat `touched` line; who it waited for shows in
//! which placement line rose meanwhile (or none did).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pager::Pager;
use serde::Serialize;

/// How often the counters are sampled: 100 wakeups a second, nothing a restore notices.
pub const EVERY: Duration = Duration::from_millis(10);

/// One sample: seconds since the restore started and the counters then.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Sample {
    /// Seconds since the restore started.
    pub t: f64,
    /// Pages the workload has touched.
    pub touched: u64,
    /// Data pages placed to resolve a fault.
    pub fault: u64,
    /// Pages placed by the prefetcher (and fault-around / readahead).
    pub prefetch: u64,
    /// Pages placed on arrival from a remote source.
    pub arrival: u64,
    /// Zero pages placed.
    pub zero: u64,
    /// Sum of fault latencies so far (the pager's blocktime), seconds.
    pub blocktime: f64,
}

/// Runs `work` while a second thread samples `pager`'s counters and `touched` every
/// [`EVERY`]; returns what `work` returned and the samples (one at the end, however soon
/// it ends).
pub fn sampled<R>(
    pager: &Pager,
    touched: &AtomicUsize,
    start: Instant,
    work: impl FnOnce() -> R,
) -> (R, Vec<Sample>) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            // Relaxed: a stop flag; the scope's join synchronises the samples back.
            while !stop.load(Ordering::Relaxed) {
                samples.push(sample(pager, touched, start));
                std::thread::park_timeout(EVERY);
            }
            samples.push(sample(pager, touched, start));
            samples
        });
        // Stops the sampler even if `work` panics (the scope joins it either way).
        struct StopOnDrop<'a>(&'a AtomicBool, &'a std::thread::Thread);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
                self.1.unpark();
            }
        }
        let result = {
            let _stop = StopOnDrop(&stop, sampler.thread());
            work()
        };
        // The sampler only reads counters: it cannot panic short of a broken invariant.
        (result, sampler.join().unwrap_or_default())
    })
}

fn sample(pager: &Pager, touched: &AtomicUsize, start: Instant) -> Sample {
    let s = pager.stats();
    Sample {
        t: start.elapsed().as_secs_f64(),
        // Relaxed: a progress count read as a hint.
        touched: touched.load(Ordering::Relaxed) as u64,
        fault: s.placed_fault,
        prefetch: s.placed_prefetch,
        arrival: s.placed_arrival,
        zero: s.placed_zero,
        blocktime: s.blocktime.as_secs_f64(),
    }
}

/// The longest time the workload's touch count stood still while it had pages left, and
/// when that stall began (seconds since the start): the instrument for a stalled restore.
/// Exact to the sampling period ([`EVERY`]) only because the workload publishes its
/// count after every touch: a count published every n touches stands still for n touches'
/// time in a restore that never stalled.
pub fn longest_stall(samples: &[Sample], total_touches: u64) -> Option<(f64, f64)> {
    let mut best: Option<(f64, f64)> = None;
    let mut since: Option<&Sample> = None;
    for s in samples {
        match since {
            Some(first) if first.touched == s.touched && s.touched < total_touches => {
                let length = s.t - first.t;
                if best.is_none_or(|(b, _)| length > b) {
                    best = Some((length, first.t));
                }
            }
            _ => since = Some(s),
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: f64, touched: u64) -> Sample {
        Sample {
            t,
            touched,
            fault: 0,
            prefetch: 0,
            arrival: 0,
            zero: 0,
            blocktime: 0.0,
        }
    }

    #[test]
    fn the_longest_stall_is_where_touches_stood_still() {
        let s = [
            at(0.0, 0),
            at(0.1, 10),
            at(0.2, 10),
            at(0.5, 10),
            at(0.6, 20),
            at(0.7, 20),
            at(0.8, 30),
        ];
        let (length, from) = longest_stall(&s, 30).unwrap();
        assert!((length - 0.4).abs() < 1e-9 && (from - 0.1).abs() < 1e-9);
        // Done touching is not a stall.
        assert_eq!(longest_stall(&[at(0.0, 5), at(1.0, 5)], 5), None);
    }
}
