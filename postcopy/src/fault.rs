//! Fault injection for tests and recovery drills (cargo feature `fault-injection`): a
//! sender that cuts its connections, or writes half a frame and cuts, once so many pages
//! went out; a receiver that stops reading for a while once so many pages came in.
//! Faults from outside the process (resets, silent freezes) are what testkit's proxy is
//! for; these reach the points a proxy cannot time. An observer hears the source's
//! protocol [`Event`]s as they happen, so a test can make its proxy cut at an event (the
//! third page frame of round two, the switch, DISCARD sent…) rather than at a byte offset
//! that timing may or may not reach.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::wire::Channel;

/// A protocol event of the migration source, reported on the thread that makes it, just
/// after it happened (a frame reported as sent is in the socket's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Precopy round `n` (1-based) begins, or goes on after a resume.
    Round(u32),
    /// The workload was stopped and its last writes collected: the switch begins.
    Stopped,
    /// The source's phase logic sent this message on main (DISCARD, LISTEN, RUN, SHUT).
    Sent(&'static str),
    /// Postcopy begins on a pair (again after every resume).
    Postcopy,
    /// A frame of pages (PAGES or ZERO_RUN) went out on `channel`.
    PageFrame(Channel),
    /// The first DIGESTS of a pair arrived: the final exchange begins.
    Digests,
    /// A new pair is up after a break.
    Resumed,
}

/// Hears [`Event`]s; runs on the protocol's own threads, so it must not block for long.
pub type Observer = Arc<dyn Fn(Event) + Send + Sync>;

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

/// Faults planned at page counts, each fired once, and the observer of events.
#[derive(Default)]
pub struct Faults(Mutex<Vec<(u64, Fault)>>, Mutex<Option<Observer>>);

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Faults")
            .field(&self.0)
            .finish_non_exhaustive()
    }
}

impl Faults {
    /// Reports every later event to `observer` (replacing any earlier one).
    pub fn observe(&self, observer: Observer) {
        *self.1.lock().unwrap_or_else(|p| p.into_inner()) = Some(observer);
    }

    /// Reports `event` to the observer, if any (called outside the lock: an observer may
    /// take a while, e.g. cut a proxy's connections).
    pub(crate) fn event(&self, event: Event) {
        let observer = self.1.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(o) = observer {
            o(event);
        }
    }

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
