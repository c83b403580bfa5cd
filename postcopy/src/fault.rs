//! Fault injection for tests and recovery drills (cargo feature `fault-injection`): a
//! sender that cuts its connections, or writes half a frame and cuts, once so many pages
//! went out; a receiver that stops reading for a while once so many pages came in.
//! Faults from outside the process (resets, silent freezes) are what testkit's proxy is
//! for; these reach the points a proxy cannot time.

use std::sync::Mutex;
use std::time::Duration;

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The sender cuts both connections.
    Cut,
    /// The sender writes half of a PAGES frame, then cuts.
    HalfFrame,
    /// The receiver stops reading for this long (a peer that stops reading).
    Stall(Duration),
}

/// Faults planned at page counts, each fired once.
#[derive(Debug, Default)]
pub struct Faults(Mutex<Vec<(u64, Fault)>>);

impl Faults {
    /// Plans `fault` for when `after_pages` pages went out (sender) or came in (receiver).
    pub fn inject(&self, fault: Fault, after_pages: u64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((after_pages, fault));
    }

    /// The first planned fault due at `pages`, removed from the plan.
    pub(crate) fn due(&self, pages: u64) -> Option<Fault> {
        let mut plan = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let i = plan.iter().position(|&(after, _)| pages >= after)?;
        Some(plan.remove(i).1)
    }
}
