//! The background filler: places pages no fault asked for. A replayed working set goes
//! first, at normal priority (it is what the workload is about to touch); then every
//! missing page of the regions still mapped, from a cursor that each fault moves to just
//! after itself, behind faults in priority.
//!
//! **Priority without priority changes.** The placing thread always runs at normal
//! priority: a placement holds the [gate](crate::gate), which every handler must wait for
//! before it reads events, so a placer preempted inside it by a busy workload would stall
//! every fault (priority inversion). What runs at `SCHED_IDLE` is a pacer: a thread that
//! does nothing but hand the placer one batch at a time, so a batch starts only when a CPU
//! had nothing better to do. A thread may always lower its own priority, but without
//! `CAP_SYS_NICE` (or an `RLIMIT_NICE` allowance) it can never raise it again — an
//! unprivileged VMM (Firecracker's jailer) cannot switch a `SCHED_IDLE` thread back for
//! the time it holds the gate. Pacing needs no way back.
//!
//! The eager plan places everything at full priority, unpaced.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use page_state::PageState;

use crate::bell::Bell;
use crate::error::Result;
use crate::pager::Pager;
use crate::place::{Content, GoneSince, Origin, Placement, Request};
use crate::shared::Shared;
use crate::thread::spawn;

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
/// How long the prefetcher sleeps on its bell before it looks at its run again anyway.
const ARRIVAL_BACKSTOP: Duration = Duration::from_millis(100);

/// Puts the calling thread under `SCHED_IDLE`: it runs only on a CPU nobody else wants.
/// (nix does not wrap sched_setscheduler(2).)
fn set_idle() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param; the call only
    // changes this thread's policy.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The placer's side of the pacer: one token per batch.
struct Paced {
    /// A token: the pacer ran (some CPU was idle), place one batch.
    go: Receiver<()>,
    /// The batch is done: the pacer may hand out the next token.
    done: SyncSender<()>,
}

impl Paced {
    /// Waits until the pacer hands out a batch; false once it is gone (the pager stops).
    fn wait_turn(&self) -> bool {
        self.done.send(()).is_ok() && self.go.recv().is_ok()
    }
}

/// Starts the pacer thread (SCHED_IDLE) and returns the placer's side of it.
fn start_pacer(shared: &Arc<Shared>, pager: &mut Pager) -> Result<Paced> {
    let (go_tx, go) = sync_channel::<()>(0);
    let (done, done_rx) = sync_channel::<()>(0);
    pager.push_thread(spawn(shared, "uffd-pacer".into(), move |shared| {
        if let Err(source) = set_idle() {
            // Not fatal: batches then start at normal priority, still one at a time.
            log::warn!("the prefetch pacer cannot run at SCHED_IDLE: {source}");
        }
        // One token per finished batch: receiving `done` and sending `go` both need
        // this thread on a CPU, which SCHED_IDLE grants only when one is idle.
        while !shared.stopping() && done_rx.recv().is_ok() {
            if go_tx.send(()).is_err() {
                break;
            }
        }
    })?);
    Ok(Paced { go, done })
}

/// Starts the prefetcher (with its pacer for the background plans).
pub(crate) fn start(
    shared: &Arc<Shared>,
    plan: Prefetch,
    after_first_fault: bool,
    pager: &mut Pager,
) -> Result<()> {
    let paced = match plan {
        Prefetch::None => return Ok(()),
        Prefetch::Eager => None,
        Prefetch::Sequential | Prefetch::Replay(_) => Some(start_pacer(shared, pager)?),
    };
    pager.push_thread(spawn(shared, "uffd-prefetch".into(), move |shared| {
        while after_first_fault && shared.stats.snapshot().placed() == 0 && !shared.stopping() {
            std::thread::sleep(Duration::from_millis(1));
        }
        run(shared, plan, paced)
    })?);
    Ok(())
}

/// Runs the prefetcher until every page of the mapped regions is placed or the pager
/// stops.
fn run(shared: &Shared, plan: Prefetch, paced: Option<Paced>) {
    let bell = Bell::of(shared)
        .inspect_err(|e| log::warn!("the prefetcher polls for a remote source's pages: {e}"))
        .ok();
    let bell = bell.as_ref();
    let max_page = shared.regions.max_page_size();
    let mut scratch = vec![0u8; BATCH_BYTES.max(max_page)];
    if let Prefetch::Replay(pages) = &plan {
        // The recorded working set is what the workload needs first: bring it in at
        // normal priority, unpaced, coalescing consecutive pages into one placement.
        let mut i = 0;
        while i < pages.len() && !shared.stopping() {
            let mut run = 1;
            while i + run < pages.len() && pages[i + run] == pages[i] + run as u64 {
                run += 1;
            }
            let bytes = run * shared.page(pages[i] as usize).map_or(max_page, |p| p.size);
            prefetch_run(shared, pages[i] as usize, bytes, &mut scratch, bell);
            i += run;
        }
    }
    let batch = if plan == Prefetch::Eager {
        EAGER_BATCH_BYTES
    } else {
        BATCH_BYTES
    };
    if scratch.len() < batch {
        scratch.resize(batch, 0);
    }
    while !shared.stopping() {
        if paced.as_ref().is_some_and(|p| !p.wait_turn()) {
            return;
        }
        // Relaxed: the cursor is a position hint; page states are the synchronisation.
        let from = shared.cursor.load(Ordering::Relaxed);
        let next = if let Some(page) = shared.next_servable(PageState::Missing, from) {
            prefetch_run(shared, page, batch, &mut scratch, bell)
        } else if let Some(page) = shared.next_servable(PageState::Zero, from) {
            zero_run(shared, page)
        } else {
            log::debug!("prefetch complete");
            return; // every page of the mapped regions placed: done
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
fn prefetch_run(
    shared: &Shared,
    page: usize,
    max_bytes: usize,
    scratch: &mut [u8],
    bell: Option<&Bell>,
) -> usize {
    let Some(size) = shared.page(page).map(|p| p.size) else {
        return page + 1;
    };
    let limit = (max_bytes / size).clamp(1, scratch.len() / size);
    let Some((first, count)) = shared.claim_run(page, limit, None) else {
        return page + 1;
    };
    let run = first.page..first.page + count;
    let _ = shared.background.set_range(run.clone());
    let placed = shared.place_claimed(&first, count, scratch, Origin::Prefetch, true);
    let _ = shared.background.clear_range(run);
    match placed {
        Ok(_) => wait_arrival(shared, first.page, bell),
        Err(failed) => shared.fail_placement(failed),
    }
    first.page + count
}

/// Waits until page `page`, asked of a remote source, has arrived (or its claim was given
/// back, or the pager stops): asleep until the engine's bell rings (bell.rs) — it polled
/// every 200 µs, 5 % of a CPU for as long as a run was in flight — or polling where the
/// prefetcher has no bell.
fn wait_arrival(shared: &Shared, page: usize, bell: Option<&Bell>) {
    let waiting = || shared.states.get(page) == Ok(PageState::Requested) && !shared.stopping();
    let Some(bell) = bell else {
        while waiting() {
            std::thread::sleep(Duration::from_micros(200));
        }
        return;
    };
    shared.watch(true);
    while waiting() {
        bell.wait(ARRIVAL_BACKSTOP);
    }
    shared.watch(false);
}

/// Places the run of known-zero pages at `page` with one zero-page placement (faults on
/// them race harmlessly: the loser sees EEXIST). Returns the page after the run.
fn zero_run(shared: &Shared, page: usize) -> usize {
    let Some(first) = shared.page(page) else {
        return page + 1;
    };
    let (mut last, mut count) = (first, 1);
    while count < BATCH_BYTES / first.size {
        match shared.page(page + count) {
            Some(next) if last.is_followed_by(&next) => last = next,
            _ => break,
        }
        if shared.states.get(page + count) != Ok(PageState::Zero) {
            break;
        }
        count += 1;
    }
    let mut gone = GoneSince::default();
    while !shared.stopping() {
        let placement = shared.place(Request {
            at: first,
            count,
            content: Content::Zero,
            wake: true,
            origin: Origin::Prefetch,
        });
        match placement.or_give_up(&mut gone) {
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
