//! A running migration: its state across connection pairs, and each phase — precopy
//! rounds, the switch, postcopy, resumption — as its own function.

use super::confirm::Unconfirmed;
use super::headway::Headway;
use super::*;
use crate::wire::DROPPED;

mod switch;
mod verdict;

/// A running migration's state, across connection pairs.
pub(super) struct Run<'m> {
    m: &'m Migration,
    memory: Arc<Memory>,
    sender: Arc<Sender>,
    /// Pages the destination holds in the version last sent.
    sent: Bitmap,
    /// Pages written since they were last sent (or never sent).
    dirty: Bitmap,
    /// Precopy pages sent and not yet confirmed by the destination (SYNCED).
    unconfirmed: Unconfirmed,
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
    steps: SwitchSteps,
    discarded: u64,
    needed_at_switch: u64,
    run_at: Option<Instant>,
    last_sent: Option<Instant>,
    /// What the verdict found — pages verified, pages the destination's workload dropped
    /// — set before SHUT(Done) goes: the destination can report step 3 (on this pair or,
    /// its ACK lost, a later one) only after this.
    checked: Option<(u64, u64)>,
    /// The last progress: what the give-up bound runs from.
    headway: Headway,
    /// [`Run::postcopy_pages`] when the current pair was connected.
    pages_at_connect: u64,
    /// The workload's device state, taken at the stop; RUN carries it.
    device_state: Vec<u8>,
}

impl<'m> Run<'m> {
    pub(super) fn new(m: &'m Migration) -> Result<Run<'m>, Error> {
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
            unconfirmed: Unconfirmed::new(sync_pace(&m.opts.timing)),
            tracker,
            dialer: Dialer::new(
                m.addr.clone(),
                (PROTOCOL, m.security.clone()),
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
                // The memory of this run, whichever pair carries it.
                image: transport::key::session_id()?,
            },
            step: step::ADVISED,
            rounds: Vec::new(),
            round: (Instant::now(), 0, 0),
            reason: SwitchReason::PurePostcopy,
            started: Instant::now(),
            stopped: None,
            downtime: Duration::ZERO,
            steps: SwitchSteps::default(),
            discarded: 0,
            needed_at_switch: 0,
            run_at: None,
            last_sent: None,
            checked: None,
            headway: Headway::new(m.opts.timing.give_up_after),
            pages_at_connect: 0,
            device_state: Vec::new(),
        })
    }

    fn progress(&self) -> &Progress {
        &self.m.control.progress
    }

    /// Pages sent in postcopy so far (streamed and requested).
    fn postcopy_pages(&self) -> u64 {
        let stats = &self.progress().postcopy;
        stats.stream_pages.load(Ordering::Relaxed) + stats.urgent_pages.load(Ordering::Relaxed)
    }

    /// A new pair of the session (the first, or after a break): ADVISE, then the
    /// destination's RECV_BITMAP and step, from which the plan is redone. Dialing and the
    /// greeting give up once [`Timing::give_up_after`] passed since
    /// [`Headway::since`].
    pub(super) fn connect(&mut self, first: bool) -> Result<Pair, Error> {
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
        let since = self.headway.since();
        let left = || (since + timing.give_up_after).saturating_duration_since(Instant::now());
        let greet = |mut main: crate::net::Conn, urgent| {
            main.w.send(&Message::Advise(advise.clone()))?;
            // The last pair is gone (joined): what it carried is not on its way any more.
            sender.new_pair();
            let pair = link::pair((main, urgent), advise, sender.clone(), &timing)?;
            let present = match pair.next("RECV_BITMAP", left())? {
                (_, Message::RecvBitmap { words }) => words,
                (channel, other) => return Err(unexpected(other, "RECV_BITMAP", channel)),
            };
            match pair.next("ACK", left())? {
                (_, Message::Ack { seq }) => Ok((pair, present, seq)),
                (channel, other) => Err(unexpected(other, "ACK", channel)),
            }
        };
        let (pair, present, step) = self.dialer.connect(since, wait, greet)?;
        self.unconfirmed.new_pair();
        self.replan(&present, step)?;
        self.pages_at_connect = self.postcopy_pages();
        Ok(pair)
    }

    /// Pauses after `cause` until a new pair is up.
    pub(super) fn resume(&mut self, pair: Pair, cause: Error) -> Result<Pair, Error> {
        let cause = first_cause(&pair, cause);
        let phase = self.progress().phase();
        self.progress()
            .link
            .pause("source", &format!("{phase:?}"), &cause);
        drop(pair);
        if self.postcopy_pages() > self.pages_at_connect {
            self.headway.sent();
        } else if self.step >= step::RUNNING && self.checked.is_none() {
            // Postcopy, nothing sent on it and no verdict awaited: it may have been idle
            // (demand-only, no request), not stalled.
            self.headway.idle_for(self.m.opts.timing.silence);
        }
        let progressed = self.headway.broke();
        let after = self.m.opts.timing.give_up_after;
        if self.headway.passed() {
            return Err(gave_up(after, cause));
        }
        // A pair that got somewhere: the next is dialed at once (the dialer backs off
        // only between pairs that bring nothing).
        if progressed {
            self.dialer.progressed();
        }
        let pair = self.connect(false)?;
        if self.headway.passed() {
            // The greeting showed that nothing of what the last pair sent landed.
            pair.shut(
                &format!("no progress in {after:?}"),
                self.m.opts.timing.silence,
            );
            return Err(gave_up(after, cause));
        }
        self.progress().link.resumed("source");
        event!(self.m.control, Resumed);
        Ok(pair)
    }

    /// Re-plans from the destination's present pages and step.
    ///
    /// The delivery invariant: a page counts as delivered only once the destination
    /// confirmed it — by SYNCED in precopy, by acknowledging LISTEN (it lands every page
    /// before handling a later message), or by its present-set once it runs the pager
    /// (after the switch only one version of a page exists, so present means current).
    /// Tells [`Headway`] whether the last pair got somewhere that only this shows.
    fn replan(&mut self, present: &[u64], step: u64) -> Result<(), Error> {
        let pages = self.memory.pages as usize;
        let present = Bitmap::from_words(pages, present)?;
        let switched = self.stopped.is_some();
        let mut held = None;
        match step {
            step::ADVISED => {
                // Not confirmed: what the destination holds may be an older version (the
                // newer one died in a frozen connection's buffers). Dirty: sent again, or
                // discarded at the switch.
                for run in self.unconfirmed.take_all() {
                    self.dirty.set_range(run)?;
                }
                // Sent but never arrived (in flight when the pair broke): send again.
                let lost: Vec<Range<usize>> = self.sent.runs().collect();
                for p in lost.into_iter().flatten().filter(|&p| !present.test(p)) {
                    self.sent.clear(p);
                    self.dirty.set(p);
                }
            }
            // Step 3 is the destination's answer to our SHUT(Done), sent only after a
            // verdict: from any other source it is refused, never counted as verified.
            step::VERIFIED if self.checked.is_none() => {
                return Err(Error::refused(Refusal::Step { step }))
            }
            step::LISTENING | step::RUNNING | step::VERIFIED if switched => {
                // It handled LISTEN, so every precopy page before it had landed.
                self.unconfirmed.confirm_all();
                self.sender.need.store_complement_of(&present.to_words())?;
                self.sender.planned();
                held = Some(present.count() as u64);
            }
            _ => return Err(Error::refused(Refusal::Step { step })),
        }
        self.headway.greeted(held, step > self.step);
        self.step = step;
        Ok(())
    }

    /// Precopy rounds until the switch is due; a round broken off goes on after the
    /// resume with what is still dirty (and what was not confirmed).
    pub(super) fn precopy(&mut self, pair: &Pair) -> Result<(), Error> {
        self.progress().set_phase(Phase::Precopy);
        let ps = self.memory.ps;
        let mut scratch = self.sender.scratch();
        loop {
            let round = self.rounds.len() as u32 + 1;
            self.progress()
                .round
                .store(u64::from(round), Ordering::Relaxed);
            event!(self.m.control, Round(round));
            let runs: Vec<Range<usize>> = self.dirty.runs().collect();
            for run in runs {
                let mut start = run.start;
                while start < run.end {
                    // A piece of the SYNCs' spacing now (which confirmations adapt).
                    let piece = (self.unconfirmed.spacing() as usize / ps).max(1);
                    let part = start..(start + piece).min(run.end);
                    start = part.end;
                    self.send_precopy(pair, part, &mut scratch)?;
                }
            }
            self.sync(pair)?;
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

    /// Sends the pages of `part`, counted as sent, not dirty and not yet confirmed; a SYNC
    /// after every [`Unconfirmed::spacing`] bytes; takes the confirmations that came
    /// meanwhile.
    fn send_precopy(
        &mut self,
        pair: &Pair,
        part: Range<usize>,
        scratch: &mut [u8],
    ) -> Result<(), Error> {
        let (first, count) = (part.start as u64, part.len() as u64);
        self.dirty.clear_range(part.clone())?;
        self.sent.set_range(part.clone())?;
        self.unconfirmed
            .sending(part, count * self.memory.ps as u64);
        let b = self.sender.send(&pair.main, first, count, scratch)?;
        self.round.1 += count;
        self.round.2 += b;
        self.progress()
            .precopy_bytes
            .fetch_add(b, Ordering::Relaxed);
        if self.unconfirmed.due() {
            self.sync(pair)?;
        }
        while let Some((channel, msg)) = pair.next_within(Duration::ZERO)? {
            self.confirmed(channel, msg, "nothing but SYNCED during precopy")?;
        }
        Ok(())
    }

    /// Asks the destination to confirm every page sent since the last SYNC.
    fn sync(&mut self, pair: &Pair) -> Result<(), Error> {
        match self.unconfirmed.mark() {
            Some(seq) => Ok(pair.main.send(&Message::Sync { seq })?),
            None => Ok(()),
        }
    }

    /// Takes a SYNCED; anything else is unexpected (`expected` says what was).
    fn confirmed(
        &mut self,
        channel: crate::wire::Channel,
        msg: Message,
        expected: &'static str,
    ) -> Result<(), Error> {
        match msg {
            Message::Synced { seq } => {
                self.unconfirmed.confirm(seq)?;
                self.headway.made();
                Ok(())
            }
            other => Err(unexpected(other, expected, channel)),
        }
    }

    /// Records the round just done; says whether to switch now, and why.
    fn end_round(&mut self) -> Option<SwitchReason> {
        let (began, pages, bytes) = std::mem::replace(&mut self.round, (Instant::now(), 0, 0));
        let dirty_after = self.dirty.count() as u64;
        let round = self.rounds.len() + 1;
        log::debug!("source: round {round}: {pages} pages sent, {dirty_after} dirty after");
        // What the round set out to send: the previous round's leftovers, or every page.
        let previous = self
            .rounds
            .last()
            .map_or(self.memory.pages, |r| r.dirty_after);
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
        } else if dirty_after as f64 > previous as f64 * o.converge_ratio {
            Some(SwitchReason::NotConverging)
        } else {
            None
        }
    }

    /// Postcopy on one pair: stream what is needed (requests are answered by the urgent
    /// reader), then check the destination's digests and send the verdict.
    pub(super) fn postcopy(&mut self, pair: &Pair) -> Result<(), Error> {
        if self.step == step::VERIFIED {
            // The destination had our verdict (`checked`: every digest matched); its ACK
            // was lost with the last pair.
            self.heard_end(pair);
            return Ok(());
        }
        self.progress().set_phase(Phase::Postcopy);
        event!(self.m.control, Postcopy);
        let needed = self.sender.need.count() as u64;
        self.progress().needed.store(needed, Ordering::Relaxed);
        let (sender, background) = (self.sender.clone(), self.m.opts.background);
        let silence = self.m.opts.timing.silence;
        let (main, cutter, failing) = (&pair.main, &pair.cutter, pair.failing());
        let verdict = std::thread::scope(|s| {
            let streamed = std::thread::Builder::new()
                .name("pc-stream".into())
                .spawn_scoped(s, move || {
                    let r = sender.stream((main, cutter), &failing, background, silence);
                    r.map(|()| Instant::now())
                })
                .map_err(Error::io("start the stream"))?;
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

    pub(super) fn report(&self) -> SourceReport {
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
            already_sent: get(&prog.postcopy.already_sent),
            resent: get(&prog.postcopy.resent),
            downtime: self.downtime,
            switch: self.steps,
            postcopy: self
                .last_sent
                .unwrap_or(run_at)
                .saturating_duration_since(run_at),
            total: self.started.elapsed(),
            reconnects: prog.link.reconnects(),
            verified: self.checked.map_or(0, |(verified, _)| verified),
            dropped_at_destination: self.checked.map_or(0, |(_, dropped)| dropped),
        }
    }
}

/// How often precopy's confirmations should come ([`Unconfirmed`] spaces its SYNCs for
/// it): well within the give-up bound, whose progress they are, and within half the
/// silence deadline, which no piece of precopy (one send) may take.
fn sync_pace(t: &Timing) -> Duration {
    (t.give_up_after / 8).min(t.silence / 2)
}

/// Gave up after `after` without progress, the last pair broken by `cause`.
fn gave_up(after: Duration, cause: Error) -> Error {
    log::warn!(
        "source: giving up: no progress in {after:?}; {}",
        crate::error::chain(&cause)
    );
    match cause {
        Error::Link(last) => Error::gave_up(after, last),
        other => other,
    }
}
