//! The background filler: places pages no fault asked for. A replayed working set goes
//! first, at normal priority (it is what the workload is about to touch); then every
//! missing page from a cursor that each fault moves to just after itself, behind faults
//! in priority (the thread switches to `SCHED_IDLE`, so it only gets a CPU nobody else
//! wants — except while it holds the placement gate, where it runs at normal priority so
//! that a busy workload cannot preempt it there and stall every handler behind it).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use page_state::PageState;

use crate::place::{Content, Origin, Placement};
use crate::shared::Shared;

/// What the prefetcher does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Prefetch {
    /// Nothing: pages arrive only on faults.
    #[default]
    None,
    /// Every missing page, from a cursor that jumps to just after each fault.
    Sequential,
    /// These pages (a recorded working set, in fault order) first, then sequential.
    Replay(Vec<u64>),
    /// Every page at full priority in 2 MiB batches, from the start: an eager copy that
    /// still serves faults first (the baseline "copy everything at once" restore).
    Eager,
}

/// Pages placed per ioctl: contiguous missing pages in one region, up to this many.
const BATCH_BYTES: usize = 256 << 10;
/// The eager plan's batch.
const EAGER_BATCH_BYTES: usize = 2 << 20;

/// Sets the calling thread's scheduling policy: `SCHED_IDLE` so faults (and the workload)
/// always win, or back to `SCHED_OTHER`. (nix does not wrap sched_setscheduler(2).)
fn set_idle(idle: bool) {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param; the call only
    // changes this thread's policy.
    unsafe { libc::sched_setscheduler(0, policy, &param) };
}

thread_local! {
    static IDLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a placement at normal priority: a placement holds the gate, which handler threads
/// must wait for before they read events, and a `SCHED_IDLE` thread preempted inside it
/// by a busy workload would stall every fault (priority inversion). Priority inheritance
/// by hand, as a lock with PI would do.
fn at_normal_priority<T>(f: impl FnOnce() -> T) -> T {
    let idle = IDLE.with(|i| i.get());
    if idle {
        set_idle(false);
    }
    let out = f();
    if idle {
        set_idle(true);
    }
    out
}

/// Runs the prefetcher until every page is placed or the pager stops.
pub(crate) fn run(shared: Arc<Shared>, plan: Prefetch) {
    let max_page = shared.regions.max_page_size();
    let mut scratch = vec![0u8; BATCH_BYTES.max(max_page)];
    if let Prefetch::Replay(pages) = &plan {
        // The recorded working set is what the workload needs first: bring it in at
        // normal priority, coalescing consecutive pages into one fetch and placement.
        let mut i = 0;
        while i < pages.len() && !shared.stopping() {
            let mut run = 1;
            while i + run < pages.len() && pages[i + run] == pages[i] + run as u64 {
                run += 1;
            }
            let bytes = run * shared.page(pages[i] as usize).map_or(max_page, |p| p.size);
            prefetch_run(&shared, pages[i] as usize, bytes, &mut scratch);
            i += run;
        }
    }
    let batch = if plan == Prefetch::Eager {
        EAGER_BATCH_BYTES
    } else {
        set_idle(true);
        IDLE.with(|i| i.set(true));
        BATCH_BYTES
    };
    if plan == Prefetch::None {
        return;
    }
    if scratch.len() < batch {
        scratch.resize(batch, 0);
    }
    while !shared.stopping() {
        // Relaxed: the cursor is a position hint; page states are the synchronisation.
        let from = shared.cursor.load(Ordering::Relaxed);
        let next = if let Some(page) = shared.states.next_missing_wrapping(from) {
            prefetch_run(&shared, page, batch, &mut scratch)
        } else if let Some(page) = shared.states.next_in_state_wrapping(PageState::Zero, from) {
            zero_run(&shared, page)
        } else {
            return; // every page placed: done
        };
        // Move on unless a fault moved the cursor meanwhile.
        let _ = shared
            .cursor
            .compare_exchange(from, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Claims up to `max_bytes` of contiguous missing pages at `page` and places them with
/// one fetch and one placement, retrying through EAGAIN. Returns the page after the run.
///
/// A remote source (it answers `Pending`) is asked one run at a time: the prefetcher waits
/// until the run's first page has arrived before it claims the next, instead of asking
/// for the whole image at once; faults on pages it asked for jump the queue
/// (`Source::prioritize`).
fn prefetch_run(shared: &Shared, page: usize, max_bytes: usize, scratch: &mut [u8]) -> usize {
    let Some(size) = shared.page(page).map(|p| p.size) else {
        return page + 1;
    };
    let limit = (max_bytes / size).clamp(1, scratch.len() / size);
    let Some((first, count)) = shared.claim_run(page, limit, None) else {
        return page + 1;
    };
    let run = first.page..first.page + count;
    let _ = shared.background.set_range(run.clone());
    let placed =
        at_normal_priority(|| shared.place_claimed(&first, count, scratch, Origin::Prefetch, true));
    let _ = shared.background.clear_range(run);
    match placed {
        Ok(_) => {
            while shared.states.get(first.page) == Ok(PageState::Requested) && !shared.stopping() {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Err(failed) => shared.fail_placement(failed),
    }
    first.page + count
}

/// Places the run of known-zero pages at `page` with one zero-page placement (faults on
/// them race harmlessly: the loser sees EEXIST). Returns the page after the run.
fn zero_run(shared: &Shared, page: usize) -> usize {
    let Some(first) = shared.page(page) else {
        return page + 1;
    };
    let mut count = 1;
    while count < BATCH_BYTES / first.size {
        match shared.page(page + count) {
            Some(next) if next.addr == first.addr + count * first.size => {}
            _ => break,
        }
        if shared.states.get(page + count) != Ok(PageState::Zero) {
            break;
        }
        count += 1;
    }
    while !shared.stopping() {
        match at_normal_priority(|| {
            shared.place(&first, count, Content::Zero, true, Origin::Prefetch)
        }) {
            Placement::Again { .. } => std::thread::sleep(Duration::from_micros(200)),
            Placement::Done | Placement::Asked | Placement::Dropped => break,
            failed => {
                shared.fail_placement(failed);
                break;
            }
        }
    }
    page + count
}
