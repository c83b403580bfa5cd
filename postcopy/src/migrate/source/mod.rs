//! The migration source: owns the memory and its writing workload; runs the precopy
//! rounds, the switch and postcopy, each its own function, and re-plans from what the
//! destination reports after every reconnection.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use page_state::Bitmap;

use transport::Addr;

use super::{copy_raw, digest, first_cause, step, BoxError, LinkStatus, Timing};
use crate::endpoint::sender::{Pages, Sender};
use crate::endpoint::SendStats;
use crate::error::{unexpected, LinkError, Refusal};
use crate::link::{self, Dialer, Messages, Pair};
use crate::net::SendMessage;
use crate::wire::{
    Advise, Features, Message, PageRange, Role, ShutReason, WireRegion, MAX_DEVICE_STATE,
    MAX_RANGES, PROTOCOL,
};
use crate::Error;
use crate::Security;
use uffd_core::DirtyTracker;

/// Reports a protocol event to the test observer (`fault-injection` only; nothing
/// otherwise, not even the event's construction).
macro_rules! event {
    ($control:expr, $event:ident $(($($arg:expr),*))?) => {
        #[cfg(feature = "fault-injection")]
        $control.faults.event(crate::fault::Event::$event $(($($arg),*))?);
    };
}

mod confirm;
mod headway;
mod run;
use run::Run;

/// How the source migrates.
#[derive(Debug, Clone, Copy)]
pub struct SourceOptions {
    /// Page size on the wire and at the destination: 4096 or 2 MiB.
    pub page_size: usize,
    /// Precopy rounds before the switch, the first being the full pass; 0 = pure postcopy.
    pub max_rounds: u32,
    /// Switch as soon as a round leaves at most this many bytes of dirty pages.
    pub switch_below_bytes: u64,
    /// A round that leaves more than this fraction of what it set out to send (the
    /// previous round's dirty pages; for the first round, every page) is not
    /// converging: switch at once — another round would send as much again.
    pub converge_ratio: f64,
    /// Push the pages nobody asked for in the background (the normal case). Without it,
    /// postcopy moves pages only on request and ends when the destination has asked for
    /// all of them: a measuring mode for demand-only latency.
    pub background: bool,
    /// Reconnect by itself after a broken connection (else wait for
    /// [`SourceControl::resume`]).
    pub auto_resume: bool,
    /// Liveness, backoff and the give-up bound.
    pub timing: Timing,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            page_size: 4096,
            max_rounds: 5,
            switch_below_bytes: 1 << 20,
            converge_ratio: 0.9,
            background: true,
            auto_resume: true,
            timing: Timing::default(),
        }
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Connecting.
    #[default]
    Connecting,
    /// Iterative precopy.
    Precopy,
    /// Workload stopped; discard, listen, run.
    Switching,
    /// Destination running; pages streamed and requested.
    Postcopy,
    /// Every page sent; checking the destination's digests.
    Verifying,
    /// Done.
    Done,
}

/// Why precopy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchReason {
    /// No precopy rounds were asked for.
    PurePostcopy,
    /// [`SourceControl::switch_to_postcopy`].
    Operator,
    /// [`SourceOptions::max_rounds`] reached.
    RoundLimit,
    /// A round left at most [`SourceOptions::switch_below_bytes`] dirty.
    Converged,
    /// A round left more than [`SourceOptions::converge_ratio`] of what it set out to send.
    NotConverging,
}

/// Live counters of a running migration, for progress displays.
#[derive(Debug, Default)]
pub struct Progress {
    phase: Mutex<Phase>,
    /// Current precopy round (1-based).
    pub round: AtomicU64,
    /// Pages in the migration.
    pub pages: AtomicU64,
    /// Page data bytes sent in precopy.
    pub precopy_bytes: AtomicU64,
    /// What postcopy sent (stream and requests).
    pub postcopy: Arc<SendStats>,
    /// Pages the destination still needed when the current postcopy pair began.
    pub needed: AtomicU64,
    /// Paused or not, and reconnections.
    pub link: LinkStatus,
}

impl Progress {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, p: Phase) {
        let was = std::mem::replace(
            &mut *self.phase.lock().unwrap_or_else(|p| p.into_inner()),
            p,
        );
        if was != p {
            log::debug!("source: {p:?}");
        }
    }
}

/// Operator commands to a running migration, and its progress.
#[derive(Debug, Default)]
pub struct SourceControl {
    switch_now: AtomicBool,
    resume: Mutex<u64>,
    resumed: Condvar,
    /// Live counters.
    pub progress: Progress,
    #[cfg(feature = "fault-injection")]
    faults: Arc<crate::fault::Faults>,
}

impl SourceControl {
    /// Ends precopy after the current round and switches to postcopy.
    pub fn switch_to_postcopy(&self) {
        self.switch_now.store(true, Ordering::Relaxed);
    }

    /// Reconnects now if paused (skips the rest of the backoff; required when automatic
    /// resume is off).
    pub fn resume(&self) {
        *self.resume.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.resumed.notify_all();
    }

    /// Plans `fault` once `after_pages` pages were sent in postcopy.
    #[cfg(feature = "fault-injection")]
    pub fn inject(&self, fault: crate::fault::Fault, after_pages: u64) {
        self.faults.inject(fault, after_pages);
    }

    /// Reports the source's protocol events to `observer` (tests: faults at events).
    #[cfg(feature = "fault-injection")]
    pub fn observe(&self, observer: crate::fault::Observer) {
        self.faults.observe(observer);
    }

    /// Waits up to `timeout` for a resume command after the `seen`th; true if one came.
    fn wait_resume(&self, seen: &mut u64, timeout: Duration) -> bool {
        let guard = self.resume.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .resumed
            .wait_timeout_while(guard, timeout, |n| *n == *seen)
            .unwrap_or_else(|p| p.into_inner());
        let came = *guard != *seen;
        *seen = *guard;
        came
    }
}

/// One precopy round.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// Pages sent.
    pub pages: u64,
    /// Data bytes sent (zero runs cost none).
    pub bytes: u64,
    /// Pages found dirty after the round (sent again next round or discarded).
    pub dirty_after: u64,
    /// How long it took.
    pub took: Duration,
}

/// Where the switch's time went, step by step, as the source saw it (the last attempt's,
/// if a break made it repeat a step; zero for a step the destination acknowledged only in
/// a later pair's greeting, its ACK lost with a broken pair — the downtime then counts
/// the reconnection). Everything from `stop` on is downtime.
#[derive(Debug, Clone, Copy, Default)]
pub struct SwitchSteps {
    /// Before the stop, not downtime: DISCARD of the pages the last round found written,
    /// sent while the workload still runs, until the destination confirms it applied it
    /// and landed every page sent before it.
    pub early_discard: Duration,
    /// The embedder's callback: the workload stopped, its device state taken.
    pub stop: Duration,
    /// The last dirty scan.
    pub scan: Duration,
    /// Working out what is needed and what to discard; DISCARD encoded and sent.
    pub discard: Duration,
    /// LISTEN sent → acknowledged: the destination applied DISCARD and handled LISTEN
    /// (its own figures: [`DestReport::switch`](super::DestReport::switch)).
    pub listen: Duration,
    /// RUN sent → acknowledged: the destination's embedder took the device state and
    /// resumed the workload.
    pub run: Duration,
}

/// What a finished migration did.
#[derive(Debug, Clone)]
pub struct SourceReport {
    /// Pages migrated.
    pub pages: u64,
    /// Their size.
    pub page_size: usize,
    /// The precopy rounds.
    pub rounds: Vec<Round>,
    /// Why precopy ended.
    pub switch_reason: SwitchReason,
    /// Page data bytes sent in precopy.
    pub precopy_bytes: u64,
    /// Page data bytes sent in postcopy.
    pub postcopy_bytes: u64,
    /// Pages discarded at the switch (sent, then dirtied).
    pub discarded: u64,
    /// Pages the destination still needed at the switch.
    pub needed_at_switch: u64,
    /// Pages sent by the postcopy stream.
    pub stream_pages: u64,
    /// Pages sent on request.
    pub urgent_pages: u64,
    /// REQ_PAGES messages answered.
    pub requests: u64,
    /// Requested pages not sent again: answered before on the same pair.
    pub already_sent: u64,
    /// Requested pages answered that were no longer needed ([`SendStats::resent`]): nearly
    /// always the stream had sent them on the same pair, its copy possibly megabytes behind
    /// on the main connection (the destination drops whichever lands second).
    pub resent: u64,
    /// Workload stopped → the destination acknowledged RUN.
    pub downtime: Duration,
    /// The downtime (and what was moved out of it), step by step.
    pub switch: SwitchSteps,
    /// From RUN to the last page sent.
    pub postcopy: Duration,
    /// From start to verified.
    pub total: Duration,
    /// Reconnections after broken connections.
    pub reconnects: u64,
    /// Pages whose destination digest matched.
    pub verified: u64,
    /// Pages the destination's workload dropped before they landed
    /// ([`DROPPED`](crate::wire::DROPPED)): its own zeros, left out of the verdict.
    pub dropped_at_destination: u64,
}

/// A migration of `[base, base + len)` of this process to a destination.
pub struct Migration {
    addr: Addr,
    security: Security,
    base: usize,
    len: usize,
    opts: SourceOptions,
    control: Arc<SourceControl>,
}

/// The migrated memory as a sender's pages: copied with volatile loads while the
/// workload runs, sent in place once it is stopped (`frozen`).
struct Memory {
    base: usize,
    ps: usize,
    pages: u64,
    frozen: AtomicBool,
}

impl Memory {
    fn page_ptr(&self, p: u64) -> *const u8 {
        (self.base + p as usize * self.ps) as *const u8
    }

    /// Page `p`'s digest; only once frozen (the verdict comes after the stop).
    fn digest(&self, p: u64) -> u64 {
        // Acquire: pairs with the Release store at the switch, after the workload stopped.
        assert!(
            self.frozen.load(Ordering::Acquire),
            "digest of a page still written"
        );
        // SAFETY: in the region `Migration::new`'s caller keeps mapped; frozen, so nothing
        // writes it any more and a shared slice over the page is sound (as in `read`).
        digest(unsafe { std::slice::from_raw_parts(self.page_ptr(p), self.ps) })
    }
}

impl Pages for Memory {
    fn geometry(&self) -> (usize, u64) {
        (self.ps, self.pages)
    }
    fn read<'a>(
        &'a self,
        first: u64,
        count: u64,
        scratch: &'a mut [u8],
    ) -> Result<Option<&'a [u8]>, Error> {
        let len = count as usize * self.ps;
        // Acquire: pairs with the Release store at the switch, after the workload stopped.
        if self.frozen.load(Ordering::Acquire) {
            // SAFETY: pages first..first + count lie in the region (`Sender` checks against
            // `page_count`), which `Migration::new`'s caller keeps mapped and readable until
            // `run` returns; frozen means the workload was stopped and nothing writes the
            // region any more, so a shared slice over it is sound.
            return Ok(Some(unsafe {
                std::slice::from_raw_parts(self.page_ptr(first), len)
            }));
        }
        let out = &mut scratch[..len];
        // SAFETY: readable and page-aligned as above; the workload may be writing it, so
        // it is copied with volatile loads, never through a slice.
        unsafe { copy_raw(self.page_ptr(first), out) };
        Ok(Some(out))
    }
}

impl Migration {
    /// Prepares the migration of `[base, base + len)` to the destination at `addr`.
    ///
    /// # Safety
    /// The range must be mapped, readable, private anonymous memory of this process that
    /// stays mapped until [`run`](Migration::run) returns, and nothing but the workload
    /// stopped by `run`'s callback may write it.
    pub unsafe fn new(
        addr: Addr,
        security: impl Into<Security>,
        base: usize,
        len: usize,
        opts: SourceOptions,
    ) -> Result<Migration, Error> {
        let ps = opts.page_size;
        if ps != 4096 && ps != uffd_core::HUGE_PAGE_SIZE {
            return Err(Error::Invalid {
                what: "the page size must be 4 KiB or 2 MiB",
                value: ps.to_string(),
            });
        }
        if len == 0 || len % ps != 0 || base % 4096 != 0 {
            return Err(Error::Invalid {
                what: "the region is empty or not a whole number of pages",
                value: format!("{base:#x}+{len:#x}"),
            });
        }
        Ok(Migration {
            addr,
            security: security.into(),
            base,
            len,
            opts,
            control: Arc::new(SourceControl::default()),
        })
    }

    /// Commands and progress of this migration (clone it before `run`).
    pub fn control(&self) -> Arc<SourceControl> {
        self.control.clone()
    }

    /// Runs the migration of a workload without device state: `stop_workload` is called
    /// at the switch and must return only when nothing writes the memory any more. See
    /// [`run_with_state`](Self::run_with_state).
    pub fn run(self, stop_workload: impl FnOnce()) -> Result<SourceReport, Error> {
        self.run_with_state(|| {
            stop_workload();
            Ok::<_, std::convert::Infallible>(Vec::new())
        })
    }

    /// Runs the migration. `stop_workload` is called once, at the switch, and must return
    /// only when nothing writes the memory any more, with the workload's device state
    /// (opaque bytes, at most [`MAX_DEVICE_STATE`]: a VMM's vCPU registers and device
    /// models). RUN carries them, and the destination hands them to its embedder before it
    /// resumes the workload ([`Destination::run_with_state`]). An error (or a state too
    /// large) ends the migration before RUN with [`Error::DeviceState`]; the destination
    /// is told. Returns once the destination's digests of every page matched the final
    /// content.
    ///
    /// [`Destination::run_with_state`]: super::Destination::run_with_state
    ///
    /// Failures: a broken or silent connection in any phase pauses the migration (the
    /// workload keeps running before the switch; after it the destination holds it) and
    /// it resumes on a new pair. It gives up, with [`Error::Transport`] holding
    /// [`transport::Error::GaveUp`], once [`Timing::give_up_after`] has passed since its
    /// last progress — however many pairs connected meanwhile: a new pair is not
    /// progress. Progress is what the destination confirms: precopy pages (SYNCED), a step
    /// acknowledged (LISTEN, RUN, the verdict), and after the switch more pages held than
    /// it ever reported before (its RECV_BITMAP, at the next greeting); the stop of the
    /// workload counts too, and so does a postcopy pair that broke after two silence
    /// deadlines up with nothing to deliver (demand-only, no request: idle, not stalled). A pair that sent what only the next greeting can confirm
    /// (postcopy pages, LISTEN, RUN, the verdict) counts as progress at its break until
    /// that greeting shows none of it landed. The bound is checked at each break, before
    /// each connection attempt, in the greeting's waits and after each greeting (the
    /// destination is then told why, with a SHUT); a pair that stays up is bounded by its
    /// own waits (silent for [`Timing::silence`], or an awaited ACK or SYNCED not answered
    /// within [`Timing::give_up_after`], and it breaks). After a pair that progressed
    /// (or whose greeting showed that the last one did) the next is dialed at once, else
    /// after a backoff doubling from [`Timing::first_backoff`] to [`Timing::max_backoff`].
    /// Before RUN nothing runs at the destination, so the caller may simply resume its
    /// workload if it was already stopped.
    pub fn run_with_state<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
        self,
        stop_workload: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<SourceReport, Error> {
        let mut run = Run::new(&self)?;
        let mut stop = Some(|| stop_workload().map_err(|e| -> BoxError { e.into() }));
        let mut pair = run.connect(true)?;
        let mut stage = if self.opts.max_rounds > 0 {
            Stage::Precopy
        } else {
            Stage::Switch
        };
        loop {
            let done = match stage {
                Stage::Precopy => run.precopy(&pair).map(|()| Stage::Switch),
                Stage::Switch => run.switch(&pair, &mut stop).map(|()| Stage::Postcopy),
                Stage::Postcopy => run.postcopy(&pair).map(|()| Stage::Done),
                Stage::Done => break,
            };
            match done {
                Ok(next) => stage = next,
                Err(e) if e.is_link() => pair = run.resume(pair, e)?,
                Err(e) => {
                    log::error!("source: {}", crate::error::chain(&e));
                    return Err(e);
                }
            }
        }
        self.control.progress.set_phase(Phase::Done);
        Ok(run.report())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Precopy,
    Switch,
    Postcopy,
    Done,
}
