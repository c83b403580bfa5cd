//! Whether the migration gets anywhere, as the destination sees it: what its give-up
//! bound runs from — the mirror of the source's rule (`source/headway.rs`).
//!
//! A new pair is not progress: a source that keeps reconnecting through a path that
//! carries nothing after the greeting (frozen or reset right there) would otherwise keep
//! the destination waiting for as long as the source keeps trying, each break restarting
//! the bound. Progress is what lands here: pages copied in, placed or dropped by DISCARD,
//! and a step taken (LISTEN, RUN, the verdict). So is a pair that was up for two silence
//! deadlines after its greeting: the source had nothing to send on it for a while (a
//! demand-only postcopy whose workload touches nothing, a source stopping its workload),
//! which a pair frozen or cut right after its greeting never lives (a frozen one breaks
//! one deadline after its last byte). Progress on a pair is counted when it breaks.

use std::time::{Duration, Instant};

/// The last progress, and where the current pair began.
#[derive(Debug)]
pub(super) struct Headway {
    /// [`Timing::give_up_after`](crate::migrate::Timing::give_up_after).
    after: Duration,
    /// [`Timing::silence`](crate::migrate::Timing::silence).
    silence: Duration,
    /// When the migration last progressed.
    at: Instant,
    /// When the current pair was greeted, what had landed then, and the step.
    greeted: (Instant, u64, u64),
}

impl Headway {
    /// No progress yet: the bound runs from now.
    pub fn new(after: Duration, silence: Duration) -> Headway {
        Headway {
            after,
            silence,
            at: Instant::now(),
            greeted: (Instant::now(), 0, 0),
        }
    }

    /// A pair was greeted with `landed` pages landed so far (copied, placed, dropped) and
    /// the destination at `step`.
    pub fn greeted(&mut self, landed: u64, step: u64) {
        self.greeted = (Instant::now(), landed, step);
    }

    /// The current pair broke with `landed` pages landed and the destination at `step`:
    /// if it progressed, that counts now. Returns when the give-up bound passes.
    pub fn broke(&mut self, landed: u64, step: u64) -> Instant {
        let (at, was_landed, was_step) = self.greeted;
        if landed > was_landed || step > was_step || at.elapsed() >= 2 * self.silence {
            self.at = Instant::now();
        }
        self.at + self.after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_counts_as_progress_if_something_landed_a_step_was_taken_or_it_lived_long() {
        let (after, silence) = (Duration::from_secs(60), Duration::from_millis(20));
        let mut h = Headway::new(after, silence);
        let start = h.at;
        h.greeted(10, 0);
        assert_eq!(h.broke(10, 0), start + after, "nothing: the bound stands");
        h.greeted(10, 0);
        assert!(h.broke(11, 0) > start + after, "a page landed");
        let last = h.at;
        h.greeted(11, 0);
        assert!(h.broke(11, 1) > last + after, "a step");
        let last = h.at;
        h.greeted(11, 1);
        std::thread::sleep(2 * silence);
        assert!(h.broke(11, 1) > last + after, "up two silence deadlines");
    }
}
