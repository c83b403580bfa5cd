//! What a live snapshot does with each event it reads from the userfaultfd: a
//! write-protect fault is served ([`Engine`]), a REMOVE is checked against what is
//! captured ([`crate::discard`]), anything else is logged and let go.

use uffd_core::{Event, EventBuffer, FaultFlags, ReadStatus};

use crate::discard::pages_touched;
use crate::engine::{Engine, Scratch};
use crate::error::{Error, Result};

impl Engine {
    /// Reads pending events into `s.faults` (or `s.deferred`), handling REMOVE events on
    /// the way (see [`crate::discard`]). Returns whether any were read.
    pub(crate) fn read_events(&self, s: &mut Scratch, defer: bool) -> Result<bool> {
        self.discards.read_begins();
        let mut outcome = match self.uffd.read_events(&mut s.events) {
            Ok(ReadStatus::Events(_)) => Ok(true),
            Ok(ReadStatus::WouldBlock) => Ok(false),
            Err(e) => Err(Error::uffd("read write-protect faults")(e)),
        };
        let read = matches!(outcome, Ok(true));
        for event in s.events.drain().filter(|_| read) {
            let found = match event {
                Event::Remove { start, end } => {
                    if let Err(e) = self.discarded(start, end) {
                        outcome = outcome.and(Err(e)); // the first error stays
                    }
                    None
                }
                other => fault_addr(other),
            };
            match (found, defer) {
                (Some(addr), false) => s.faults.push(addr),
                (Some(addr), true) => s.deferred.push_back(addr),
                (None, _) => {}
            }
        }
        self.discards.read_ends();
        outcome
    }

    /// `[start, end)` is about to be discarded (a REMOVE event was just read): fine for
    /// pages already captured, the snapshot's end for any other.
    fn discarded(&self, start: usize, end: usize) -> Result<()> {
        let mut lost = false;
        for pages in pages_touched(&self.regions, start, end) {
            self.discards.mark(pages.clone());
            for i in pages {
                if let Some(w) = &self.written {
                    w.set(i); // its content changes: the chain's first layer must hold it
                }
                // Unclaimed: now no one's to capture. Claimed, not captured: its copy may
                // run into the zap.
                lost |= !self.claimed.set(i) || !self.captured.test(i);
            }
        }
        if lost {
            return Err(Error::Discarded {
                addr: start,
                len: end - start,
            });
        }
        log::debug!("live snapshot: {start:#x}..{end:#x} discarded after it was saved");
        Ok(())
    }

    /// Reads pending events and lets them go (the snapshot is over: releasing it).
    pub(crate) fn let_go_events(&self, events: &mut EventBuffer) {
        match self.uffd.read_events(events) {
            Ok(ReadStatus::Events(_)) => {
                for e in events.drain() {
                    log::debug!("live snapshot released: {e:?} let go");
                }
            }
            Ok(ReadStatus::WouldBlock) => std::thread::yield_now(),
            Err(e) => log::warn!("live snapshot released: reading events: {e}"),
        }
    }
}

/// The address of a write-protect fault; other events (REMOVE is handled before) are
/// logged and let go (a forked child's uffd is closed, releasing the child).
fn fault_addr(event: Event) -> Option<usize> {
    match event {
        Event::Pagefault { addr, flags, .. } if flags.contains(FaultFlags::WP) => Some(addr),
        Event::Pagefault { addr, flags, .. } => {
            log::warn!(
                "a {flags:?} fault at {addr:#x} is not a write-protect fault: not ours to serve"
            );
            None
        }
        other => {
            log::debug!("live snapshot: {other:?}");
            None
        }
    }
}
