//! The switch: the workload stops, the last dirty pages are discarded at the destination
//! and the device state rides in RUN; each step timed.

use super::*;

impl Run<'_> {
    /// The switch: DISCARD what the last round found rewritten, while the workload still
    /// runs; stop the workload (once), final scan; then whatever of DISCARD (of the last
    /// delta), LISTEN and RUN the destination has not done yet — RUN sent right behind
    /// LISTEN, without waiting for its ACK (the destination handles them in order).
    pub(in super::super) fn switch(
        &mut self,
        pair: &Pair,
        stop: &mut Option<impl FnOnce() -> Result<Vec<u8>, BoxError>>,
    ) -> Result<(), Error> {
        self.progress().set_phase(Phase::Switching);
        // What the stream must send is planned before the stop where it can be: every
        // page not sent (the early DISCARD made its pages not sent), an O(memory) pass;
        // in the downtime only what the last scan found is added to it.
        let planned = stop.is_some() && self.step == step::ADVISED;
        if planned {
            self.discard_before_stop(pair)?;
            self.sender
                .need
                .store_complement_of(&self.sent.to_words())?;
        }
        if let Some(stop_workload) = stop.take() {
            let at = Instant::now();
            self.stopped = Some(at);
            self.device_state = match checked_state(stop_workload()) {
                Ok(state) => state,
                Err(source) => {
                    let what = "the source's embedder could not give it";
                    let e = Error::DeviceState { what, source };
                    pair.shut(&crate::error::chain(&e), self.m.opts.timing.silence);
                    return Err(e);
                }
            };
            // A step of the migration, taken once: the give-up bound does not count the
            // embedder's time against the destination.
            self.headway.made();
            let at = self.steps.lap(at, |s| &mut s.stop);
            let dirty = &self.dirty;
            // The last scan: a walk of every page-table entry of the region, the one
            // step of the downtime that grows with memory (0.23 ms per GiB where we
            // measured; two threads walking halves were no faster). The tracker stays
            // registered until RUN is acknowledged: unregistering walks them again.
            if let Some(t) = &mut self.tracker {
                t.collect(self.memory.ps, |g| {
                    dirty.set(g as usize);
                })?;
            }
            self.steps.lap(at, |s| &mut s.scan);
            // Release: the Acquire in `Memory::read` sees the memory as the workload left it.
            self.memory.frozen.store(true, Ordering::Release);
            self.sender.answer_requests();
            event!(self.m.control, Stopped);
        }
        let mut at = Instant::now();
        let listen = self.step == step::ADVISED;
        if listen {
            self.discard(pair, planned)?;
            at = self.steps.lap(at, |s| &mut s.discard);
            pair.main.send(&Message::Listen)?;
            self.headway.sent();
            event!(self.m.control, Sent("LISTEN"));
        }
        if self.step <= step::LISTENING {
            // Sent again on every pair until the destination reports it ran: the state
            // is handed over there exactly once (see the delivery invariant).
            pair.main.send(&Message::Run {
                device_state: self.device_state.clone(),
            })?;
            self.headway.sent();
            event!(self.m.control, Sent("RUN"));
        }
        if listen {
            self.expect_step(pair, step::LISTENING)?;
            at = self.steps.lap(at, |s| &mut s.listen);
            // It handled LISTEN after every page before it: all of precopy landed.
            self.unconfirmed.confirm_all();
        }
        if self.step == step::LISTENING {
            self.expect_step(pair, step::RUNNING)?;
            self.steps.lap(at, |s| &mut s.run);
        }
        // The destination runs: RUN acknowledged just now, or in this pair's greeting
        // (its ACK lost with the last pair; the downtime then counts the reconnection).
        if self.run_at.is_none() {
            let stopped = self.stopped.unwrap_or(self.started);
            self.downtime = stopped.elapsed();
            self.run_at = Some(Instant::now());
            // Out of the downtime: unregistering the tracker's write protection.
            self.tracker = None;
        }
        Ok(())
    }

    /// Before the stop, while the workload runs: DISCARD every page sent and rewritten
    /// since (most of them when precopy did not converge), and wait for the destination
    /// to confirm it applied it — it applies DISCARD in order with pages, so the SYNCED
    /// of a SYNC sent behind it says so. Those pages then count as not sent: the
    /// destination holds none of them (Missing there), so they are needed and never
    /// discarded again; only what the workload rewrites from here to the stop is
    /// discarded in the downtime. Unconfirmed (the pair broke), they stay sent and dirty,
    /// and are discarded again at the switch, after the present-set was re-read: the
    /// destination never keeps a stale version of a page as present. With nothing to
    /// discard the SYNC still goes: the pages of the last round still in flight or
    /// landing must not sit in the downtime in front of LISTEN.
    fn discard_before_stop(&mut self, pair: &Pair) -> Result<(), Error> {
        let at = Instant::now();
        let ranges = self.sent_and_dirty();
        if !ranges.is_empty() {
            self.send_discard(pair, &ranges, "EARLY DISCARD")?;
        }
        let seq = self.unconfirmed.barrier();
        pair.main.send(&Message::Sync { seq })?;
        while !self.unconfirmed.confirmed(seq) {
            let (channel, msg) = pair.next("SYNCED", self.m.opts.timing.give_up_after)?;
            self.confirmed(channel, msg, "SYNCED")?;
        }
        for r in &ranges {
            self.sent
                .clear_range(r.first as usize..(r.first + r.count) as usize)?;
        }
        self.discarded += ranges.iter().map(|r| r.count).sum::<u64>();
        self.steps.early_discard = at.elapsed();
        Ok(())
    }

    /// DISCARD what was sent and dirtied since; everything else not sent is needed
    /// (`planned`: the pages not sent are in the need map already).
    fn discard(&mut self, pair: &Pair, planned: bool) -> Result<(), Error> {
        let need = &self.sender.need;
        if !planned {
            need.store_complement_of(&self.sent.to_words())?;
        }
        for run in self.dirty.runs() {
            need.set_range(run)?;
        }
        self.sender.planned();
        self.headway
            .listening_with(self.memory.pages - need.count() as u64);
        let ranges = self.sent_and_dirty();
        if self.needed_at_switch == 0 {
            self.discarded += ranges.iter().map(|r| r.count).sum::<u64>();
            self.needed_at_switch = need.count() as u64;
        }
        self.send_discard(pair, &ranges, "DISCARD")
    }

    /// The runs of pages sent and written since.
    fn sent_and_dirty(&self) -> Vec<PageRange> {
        let mut ranges = Vec::new();
        for run in self.dirty.runs() {
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
        ranges
    }

    /// Sends `ranges` as DISCARD messages (`event`: what the test observer hears).
    fn send_discard(
        &self,
        pair: &Pair,
        ranges: &[PageRange],
        #[allow(unused_variables)] event: &'static str,
    ) -> Result<(), Error> {
        for chunk in ranges.chunks(MAX_RANGES) {
            let ranges = chunk.to_vec();
            pair.main.send(&Message::Discard { ranges })?;
            event!(self.m.control, Sent(event));
        }
        Ok(())
    }

    /// Waits for the destination's ACK of `step` (taking the last precopy SYNCEDs that
    /// come before it).
    pub(super) fn expect_step(&mut self, pair: &Pair, want: u64) -> Result<(), Error> {
        loop {
            match pair.next("ACK", self.m.opts.timing.give_up_after)? {
                (_, Message::Ack { seq }) if seq == want => {
                    self.step = want;
                    self.headway.made();
                    return Ok(());
                }
                (channel, other) => self.confirmed(channel, other, "ACK")?,
            }
        }
    }
}

impl SwitchSteps {
    /// Records the time since `since` as the step `step` picks; returns now.
    fn lap(&mut self, since: Instant, step: impl FnOnce(&mut Self) -> &mut Duration) -> Instant {
        let now = Instant::now();
        *step(self) = now - since;
        now
    }
}

/// The device state the embedder gave, if RUN can carry it.
fn checked_state(given: Result<Vec<u8>, BoxError>) -> Result<Vec<u8>, BoxError> {
    let state = given?;
    if state.len() > MAX_DEVICE_STATE {
        let len = state.len();
        return Err(format!("{len} bytes, more than RUN carries ({MAX_DEVICE_STATE})").into());
    }
    Ok(state)
}
