//! The migration source: owns the memory and its writing workload; runs the precopy
//! rounds, the switch and postcopy, each its own function, and re-plans from what the
//! destination reports after every reconnection.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use page_state::Bitmap;

use super::{copy_raw, digest_raw, step, LinkStatus, Timing};
use crate::endpoint::sender::{Pages, Sender};
use crate::endpoint::SendStats;
use crate::error::{unexpected, LinkError, Refusal};
use crate::handshake::Security;
use crate::link::dial::Dialer;
use crate::link::{self, Pair};
use crate::net::Addr;
use crate::wire::{Advise, Features, Message, PageRange, Role, ShutReason, WireRegion, MAX_RANGES};
use crate::Error;
use uffd_core::DirtyTracker;

/// How the source migrates.
#[derive(Debug, Clone, Copy)]
pub struct SourceOptions {
    /// Page size on the wire and at the destination: 4096 or 2 MiB.
    pub page_size: usize,
    /// Precopy rounds before the switch, the first being the full pass; 0 = pure postcopy.
    pub max_rounds: u32,
    /// Switch as soon as a round leaves at most this many bytes of dirty pages.
    pub switch_below_bytes: u64,
    /// A round that leaves more than this fraction of the previous round's dirty pages
    /// is not converging: switch.
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
    /// A round left more than [`SourceOptions::converge_ratio`] of the previous one's.
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
    /// Workload stopped → the destination acknowledged RUN.
    pub downtime: Duration,
    /// From RUN to the last page sent.
    pub postcopy: Duration,
    /// From start to verified.
    pub total: Duration,
    /// Reconnections after broken connections.
    pub reconnects: u64,
    /// Pages whose destination digest matched.
    pub verified: u64,
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

    fn digest(&self, p: u64) -> u64 {
        // SAFETY: in the region `Migration::new`'s caller keeps mapped; frozen, so
        // nothing writes it (and the digest reads with volatile loads anyway).
        unsafe { digest_raw(self.page_ptr(p), self.ps) }
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

    /// Runs the migration. `stop_workload` is called at the switch and must return only
    /// when nothing writes the memory any more. Returns once the destination's digests
    /// of every page matched the final content.
    ///
    /// Failures: a broken or silent connection in any phase pauses the migration (the
    /// workload keeps running before the switch; after it the destination holds it) and
    /// it resumes on a new pair, until [`Timing::give_up_after`] passes without one: then
    /// [`Error::GaveUp`]. Before RUN nothing runs at the destination, so the caller may
    /// simply resume its workload if it was already stopped.
    pub fn run(self, stop_workload: impl FnOnce()) -> Result<SourceReport, Error> {
        let mut run = Run::new(&self)?;
        let mut stop = Some(stop_workload);
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

/// A running migration's state, across connection pairs.
struct Run<'m> {
    m: &'m Migration,
    memory: Arc<Memory>,
    sender: Arc<Sender>,
    /// Pages the destination holds in the version last sent.
    sent: Bitmap,
    /// Pages written since they were last sent (or never sent).
    dirty: Bitmap,
    tracker: Option<DirtyTracker>,
    dialer: Dialer,
    advise: Advise,
    /// The destination's step, as it last reported.
    step: u64,
    rounds: Vec<Round>,
    round: (Instant, u64, u64),
    reason: SwitchReason,
    started: Instant,
    stopped: Option<Instant>,
    downtime: Duration,
    discarded: u64,
    needed_at_switch: u64,
    run_at: Option<Instant>,
    last_sent: Option<Instant>,
    verified: u64,
}

impl<'m> Run<'m> {
    fn new(m: &'m Migration) -> Result<Run<'m>, Error> {
        let ps = m.opts.page_size;
        let pages = (m.len / ps) as u64;
        let memory = Arc::new(Memory {
            base: m.base,
            ps,
            pages,
            frozen: AtomicBool::new(false),
        });
        let prog = &m.control.progress;
        prog.pages.store(pages, Ordering::Relaxed);
        #[allow(unused_mut)]
        let mut sender = Sender::new(memory.clone(), prog.postcopy.clone());
        #[cfg(feature = "fault-injection")]
        {
            sender.faults = m.control.faults.clone();
        }
        let tracker = match m.opts.max_rounds {
            0 => None,
            _ => Some(DirtyTracker::start(m.base, m.len)?),
        };
        let mut features = Features::ZERO_RUNS | Features::URGENT_CHANNEL | Features::RECOVERY;
        if ps > 4096 {
            features |= Features::HUGE_PAGES;
        }
        let dirty = Bitmap::new(pages as usize);
        dirty.fill(); // nothing sent yet
        Ok(Run {
            m,
            memory,
            sender: Arc::new(sender),
            sent: Bitmap::new(pages as usize),
            dirty,
            tracker,
            dialer: Dialer::new(
                m.addr.clone(),
                m.security.clone(),
                Role::Source,
                m.opts.timing,
            )?,
            advise: Advise {
                page_size: ps as u32,
                page_count: pages,
                features,
                regions: vec![WireRegion {
                    first_page: 0,
                    pages,
                }],
            },
            step: step::ADVISED,
            rounds: Vec::new(),
            round: (Instant::now(), 0, 0),
            reason: SwitchReason::PurePostcopy,
            started: Instant::now(),
            stopped: None,
            downtime: Duration::ZERO,
            discarded: 0,
            needed_at_switch: 0,
            run_at: None,
            last_sent: None,
            verified: 0,
        })
    }

    fn progress(&self) -> &Progress {
        &self.m.control.progress
    }

    /// A new pair of the session (the first, or after a break): ADVISE, then the
    /// destination's RECV_BITMAP and step, from which the plan is redone.
    fn connect(&mut self, first: bool) -> Result<Pair, Error> {
        let (control, auto) = (&self.m.control, self.m.opts.auto_resume || first);
        let timing = self.m.opts.timing;
        let (advise, sender) = (&self.advise, &self.sender);
        let mut seen = *control.resume.lock().unwrap_or_else(|p| p.into_inner());
        let wait = |d: Duration| {
            if auto {
                control.wait_resume(&mut seen, d);
                return Ok(true);
            }
            Ok(control.wait_resume(&mut seen, d.max(Duration::from_millis(200))))
        };
        let greet = |mut main: crate::net::Conn, urgent| {
            main.w.send(&Message::Advise(advise.clone()))?;
            let pair = link::pair((main, urgent), advise, sender.clone(), &timing)?;
            let present = match pair.next("RECV_BITMAP", timing.give_up_after)? {
                (_, Message::RecvBitmap { words }) => words,
                (channel, other) => return Err(unexpected(other, "RECV_BITMAP", channel)),
            };
            match pair.next("ACK", timing.give_up_after)? {
                (_, Message::Ack { seq }) => Ok((pair, present, seq)),
                (channel, other) => Err(unexpected(other, "ACK", channel)),
            }
        };
        let (pair, present, step) = self.dialer.connect(Instant::now(), wait, greet)?;
        self.replan(&present, step)?;
        Ok(pair)
    }

    /// Pauses after `cause` until a new pair is up.
    fn resume(&mut self, pair: Pair, cause: Error) -> Result<Pair, Error> {
        let phase = self.progress().phase();
        self.progress()
            .link
            .pause("source", &format!("{phase:?}"), &cause);
        drop(pair);
        let pair = self.connect(false)?;
        self.progress().link.resumed("source");
        Ok(pair)
    }

    /// Re-plans from the destination's present pages and step.
    fn replan(&mut self, present: &[u64], step: u64) -> Result<(), Error> {
        let pages = self.memory.pages as usize;
        let present = Bitmap::from_words(pages, present)?;
        let switched = self.stopped.is_some();
        match step {
            step::ADVISED => {
                // Sent but never arrived (in flight when the pair broke): send again.
                let lost: Vec<Range<usize>> = self.sent.runs().collect();
                for p in lost.into_iter().flatten().filter(|&p| !present.test(p)) {
                    self.sent.clear(p);
                    self.dirty.set(p);
                }
            }
            step::LISTENING | step::RUNNING | step::VERIFIED if switched => {
                self.sender.need.store_complement_of(&present.to_words())?;
            }
            _ => return Err(Error::refused(Refusal::Step { step })),
        }
        self.step = step;
        Ok(())
    }

    /// Precopy rounds until the switch is due; a round broken off goes on after the
    /// resume with what is still dirty.
    fn precopy(&mut self, pair: &Pair) -> Result<(), Error> {
        self.progress().set_phase(Phase::Precopy);
        let ps = self.memory.ps;
        let mut scratch = self.sender.scratch();
        loop {
            self.progress()
                .round
                .store(self.rounds.len() as u64 + 1, Ordering::Relaxed);
            let runs: Vec<Range<usize>> = self.dirty.runs().collect();
            for run in runs {
                self.dirty.clear_range(run.clone())?;
                self.sent.set_range(run.clone())?;
                let (first, count) = (run.start as u64, run.len() as u64);
                let b = self.sender.send(&pair.main, first, count, &mut scratch)?;
                self.round.1 += count;
                self.round.2 += b;
                self.progress()
                    .precopy_bytes
                    .fetch_add(b, Ordering::Relaxed);
                if let Some((channel, msg)) = pair.next_within(Duration::ZERO)? {
                    return Err(unexpected(msg, "nothing during precopy", channel));
                }
            }
            let dirty = &self.dirty;
            if let Some(t) = &mut self.tracker {
                t.collect(ps, |g| {
                    dirty.set(g as usize);
                })?;
            }
            if let Some(reason) = self.end_round() {
                log::info!(
                    "source: switching after {} rounds: {reason:?}",
                    self.rounds.len()
                );
                self.reason = reason;
                return Ok(());
            }
        }
    }

    /// Records the round just done; says whether to switch now, and why.
    fn end_round(&mut self) -> Option<SwitchReason> {
        let (began, pages, bytes) = std::mem::replace(&mut self.round, (Instant::now(), 0, 0));
        let dirty_after = self.dirty.count() as u64;
        let round = self.rounds.len() + 1;
        log::debug!("source: round {round}: {pages} pages sent, {dirty_after} dirty after");
        let previous = self.rounds.last().map(|r| r.dirty_after);
        self.rounds.push(Round {
            pages,
            bytes,
            dirty_after,
            took: began.elapsed(),
        });
        let o = &self.m.opts;
        if self.m.control.switch_now.load(Ordering::Relaxed) {
            Some(SwitchReason::Operator)
        } else if self.rounds.len() as u32 >= o.max_rounds {
            Some(SwitchReason::RoundLimit)
        } else if dirty_after * o.page_size as u64 <= o.switch_below_bytes {
            Some(SwitchReason::Converged)
        } else if previous.is_some_and(|p| dirty_after as f64 > p as f64 * o.converge_ratio) {
            Some(SwitchReason::NotConverging)
        } else {
            None
        }
    }

    /// The switch: stop the workload (once), final scan, then whatever of DISCARD,
    /// LISTEN and RUN the destination has not done yet.
    fn switch(&mut self, pair: &Pair, stop: &mut Option<impl FnOnce()>) -> Result<(), Error> {
        self.progress().set_phase(Phase::Switching);
        if let Some(stop_workload) = stop.take() {
            self.stopped = Some(Instant::now());
            stop_workload();
            let dirty = &self.dirty;
            if let Some(mut t) = self.tracker.take() {
                t.collect(self.memory.ps, |g| {
                    dirty.set(g as usize);
                })?;
            }
            // Release: the Acquire in `Memory::read` sees the memory as the workload left it.
            self.memory.frozen.store(true, Ordering::Release);
            self.sender.answer_requests();
        }
        if self.step == step::ADVISED {
            self.discard(pair)?;
            pair.main.send(&Message::Listen)?;
            self.expect_step(pair, step::LISTENING)?;
        }
        if self.step == step::LISTENING {
            pair.main.send(&Message::Run)?;
            self.expect_step(pair, step::RUNNING)?;
            let stopped = self.stopped.unwrap_or(self.started);
            self.downtime = stopped.elapsed();
            self.run_at = Some(Instant::now());
        }
        Ok(())
    }

    /// DISCARD what was sent and dirtied since; everything else not sent is needed.
    fn discard(&mut self, pair: &Pair) -> Result<(), Error> {
        let need = &self.sender.need;
        need.store_complement_of(&self.sent.to_words())?;
        let mut ranges = Vec::new();
        for run in self.dirty.runs() {
            need.set_range(run.clone())?;
            let mut p = run.start;
            while p < run.end {
                let (start, sent) = (p, self.sent.test(p));
                while p < run.end && self.sent.test(p) == sent {
                    p += 1;
                }
                if sent {
                    ranges.push(PageRange {
                        first: start as u64,
                        count: (p - start) as u64,
                    });
                }
            }
        }
        if self.needed_at_switch == 0 {
            self.discarded = ranges.iter().map(|r| r.count).sum();
            self.needed_at_switch = need.count() as u64;
        }
        for chunk in ranges.chunks(MAX_RANGES) {
            let ranges = chunk.to_vec();
            pair.main.send(&Message::Discard { ranges })?;
        }
        Ok(())
    }

    /// Waits for the destination's ACK of `step`.
    fn expect_step(&mut self, pair: &Pair, want: u64) -> Result<(), Error> {
        match pair.next("ACK", self.m.opts.timing.give_up_after)? {
            (_, Message::Ack { seq }) if seq == want => {
                self.step = want;
                Ok(())
            }
            (channel, other) => Err(unexpected(other, "ACK", channel)),
        }
    }

    /// Postcopy on one pair: stream what is needed (requests are answered by the urgent
    /// reader), then check the destination's digests and send the verdict.
    fn postcopy(&mut self, pair: &Pair) -> Result<(), Error> {
        if self.step == step::VERIFIED {
            return Ok(());
        }
        self.progress().set_phase(Phase::Postcopy);
        let needed = self.sender.need.count() as u64;
        self.progress().needed.store(needed, Ordering::Relaxed);
        let (sender, background) = (self.sender.clone(), self.m.opts.background);
        let (main, cutter) = (&pair.main, &pair.cutter);
        let verdict = std::thread::scope(|s| {
            let streamed = s.spawn(|| {
                let r = sender.stream(main, cutter, background);
                r.map(|()| Instant::now())
            });
            let verdict = self.digests(pair);
            if verdict.is_err() {
                pair.cut(LinkError::Cut);
            }
            let streamed = streamed.join().unwrap_or(Err(LinkError::Cut.into()));
            if let Ok(at) = streamed {
                self.last_sent = Some(at);
            }
            verdict
        })?;
        self.verdict(pair, verdict)
    }

    /// Checks DIGESTS against the final content until every page is checked; returns
    /// the pages that differ.
    fn digests(&self, pair: &Pair) -> Result<Vec<u64>, Error> {
        let (mut checked, mut bad) = (0, Vec::new());
        while checked < self.memory.pages {
            match pair.wait()? {
                (_, Message::Digests { first, digests }) => {
                    self.progress().set_phase(Phase::Verifying);
                    for (i, d) in digests.into_iter().enumerate() {
                        let p = first + i as u64;
                        if self.memory.digest(p) != d {
                            bad.push(p);
                        }
                        checked += 1;
                    }
                }
                (channel, other) => return Err(unexpected(other, "DIGESTS", channel)),
            }
        }
        Ok(bad)
    }

    /// Sends the verdict; a match waits for the destination to acknowledge it.
    fn verdict(&mut self, pair: &Pair, bad: Vec<u64>) -> Result<(), Error> {
        let pages = self.memory.pages;
        if let Some(&first) = bad.first() {
            let e = Error::Mismatch {
                pages: bad.len() as u64,
                first,
            };
            let detail = e.to_string();
            let _ = pair.main.send(&Message::Shut {
                reason: ShutReason::Error,
                detail,
            });
            return Err(e);
        }
        let detail = format!("verified {pages} pages");
        pair.main.send(&Message::Shut {
            reason: ShutReason::Done,
            detail,
        })?;
        self.expect_step(pair, step::VERIFIED)?;
        self.verified = pages;
        Ok(())
    }

    fn report(&self) -> SourceReport {
        let prog = self.progress();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let run_at = self.run_at.unwrap_or(self.started);
        SourceReport {
            pages: self.memory.pages,
            page_size: self.memory.ps,
            rounds: self.rounds.clone(),
            switch_reason: self.reason,
            precopy_bytes: get(&prog.precopy_bytes),
            postcopy_bytes: get(&prog.postcopy.bytes),
            discarded: self.discarded,
            needed_at_switch: self.needed_at_switch,
            stream_pages: get(&prog.postcopy.stream_pages),
            urgent_pages: get(&prog.postcopy.urgent_pages),
            requests: get(&prog.postcopy.requests),
            downtime: self.downtime,
            postcopy: self
                .last_sent
                .unwrap_or(run_at)
                .saturating_duration_since(run_at),
            total: self.started.elapsed(),
            reconnects: prog.link.reconnects(),
            verified: self.verified,
        }
    }
}
