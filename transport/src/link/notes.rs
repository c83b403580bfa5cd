//! The gate's log lines about refusals: a flood of strangers must not flood the log, so
//! at most [`Notes::PER_WINDOW`] lines a window are told and the rest summed up.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Refusals' log lines: at most [`Notes::PER_WINDOW`] per window, the rest summed up.
pub(super) struct Notes {
    since: Instant,
    told: u32,
    held: u64,
}

impl Notes {
    const PER_WINDOW: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(10);

    pub(super) fn new() -> Notes {
        Notes {
            since: Instant::now(),
            told: 0,
            held: 0,
        }
    }

    pub(super) fn tell(&mut self, level: log::Level, line: &str) {
        if level == log::Level::Debug || self.told < Self::PER_WINDOW {
            self.told += u32::from(level != log::Level::Debug);
            log::log!(level, "{line}");
        } else {
            self.held += 1;
        }
    }

    /// At the end of a window, the lines held back, with the listener's totals.
    pub(super) fn summary(&mut self, stats: &super::AcceptStats) {
        if self.since.elapsed() < Self::WINDOW {
            return;
        }
        if self.held > 0 {
            let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            log::warn!(
                "{} more refusals in the last {:?} (so far: {} refused, {} at the handshake deadline, {} evicted, {} busy)",
                self.held,
                Self::WINDOW,
                get(&stats.refused),
                get(&stats.timed_out),
                get(&stats.evicted),
                get(&stats.busy)
            );
        }
        *self = Notes::new();
    }
}
