//! Address-space events: REMOVE (`MADV_DONTNEED` / `MADV_REMOVE`: the range reads as
//! zeros from now on), UNMAP (the range is gone), REMAP (`mremap` moved it), FORK (a
//! child has its own copy, served by a child engine).
//!
//! They reach the page states *before* any fault read after them is resolved: a handler
//! applies the non-fault events of a batch while it still holds the [gate](crate::gate)
//! closed. Nothing here allocates or locks, so a handler reaches its next `read(2)` even
//! while another thread of the process is inside `fork()` (see `worker.rs`).
//!
//! Shared memory in MINOR mode: the page cache, not the event, says what a page placed
//! before holds after a REMOVE — the workload's bytes after a `MADV_DONTNEED` (the cache
//! keeps them), zeros after a `MADV_REMOVE` (the hole punched) — so such a page stays
//! Received and its next fault maps the cache as it is (zeros if it is gone: `place.rs`).
//! Only a page never placed becomes Zero: what its cache held was never the workload's.

use page_state::PageState;
use uffd_core::{Event, Uffd};

use crate::region::Resolve;
use crate::shared::Shared;
use crate::stats::bump;

impl Shared {
    /// Applies a non-fault event. A fork's uffd is returned to the caller, which hands it
    /// to the fork service (a child engine must be started, and that allocates).
    pub fn on_event(&self, event: Event) -> Option<Uffd> {
        match event {
            Event::Remove { start, end } => {
                bump(&self.stats.events_remove);
                self.regions
                    .for_each_page_range(start, end, |region, range| {
                        let cached = region.spec.resolve != Resolve::Copy;
                        self.drop_range(range, cached)
                    });
            }
            Event::Unmap { start, end } => {
                bump(&self.stats.events_unmap);
                self.regions.unmap(start, end);
            }
            Event::Remap { from, to, len } => {
                bump(&self.stats.events_remap);
                self.regions.remap(from, to, len);
            }
            Event::Fork { uffd } => {
                bump(&self.stats.events_fork);
                return Some(uffd);
            }
            _ => {}
        }
        None
    }

    /// After a REMOVE: the range must come back as zeros, never as image data. Missing and
    /// Received pages become Zero; a page someone is bringing in (Requested) gets its
    /// removed bit, so whoever places it next places zeros. The bit is set before the state
    /// is looked at, so a claim given back meanwhile (requested → missing) is caught
    /// either way: marked Zero here, or zeroed by its next placement. In a MINOR region
    /// (`cached`) a Received page stays so: its page cache decides (module docs).
    fn drop_range(&self, range: std::ops::Range<usize>, cached: bool) {
        // Before the states: whoever sees the page Zero sees it dropped. In range: the
        // region table gave it.
        let _ = self.dropped.set_range(range.clone());
        if !cached && self.states.mark_zero_range(range.start, range.end).is_ok() {
            return;
        }
        for page in range {
            match self.states.get(page) {
                Ok(PageState::Zero) => continue,
                Ok(PageState::Received) if cached => continue,
                _ => {}
            }
            self.removed.set(page);
            if self.states.get(page) == Ok(PageState::Missing) {
                let _ = self.states.mark_zero(page);
            }
        }
    }
}
