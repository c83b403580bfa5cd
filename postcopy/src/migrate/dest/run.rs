//! A running destination: its state across connection pairs, and each phase — precopy,
//! LISTEN, RUN, postcopy, the digests, resumption — as its own function.

use super::headway::Headway;
use super::*;

/// A running destination's state, across connection pairs.
pub(super) struct DestRun<'d> {
    d: &'d Destination,
    session: u64,
    advise: Advise,
    receiver: Arc<Receiver>,
    pair: Option<Pair>,
    pub(super) step: u64,
    memory: Option<Arc<Mapping>>,
    /// What was placed in every page, as digests.
    placed: Arc<Placed>,
    pager: Option<Pager>,
    steps: DestSwitchSteps,
    run_at: Option<Instant>,
    complete_at: Option<Instant>,
    verdict: String,
    /// The memory is private anonymous memory on 2 MiB boundaries: PAGES bodies are read
    /// aligned, and whole blocks are moved into place once a pager runs (if its
    /// userfaultfd can move pages).
    blocks: bool,
    /// The last progress: what the give-up bound runs from.
    headway: Headway,
}

impl<'d> DestRun<'d> {
    /// Waits for the first session (bounded), maps its memory and greets it.
    pub(super) fn start(d: &'d Destination) -> Result<DestRun<'d>, Error> {
        let t = d.opts.timing;
        let until = Instant::now() + t.give_up_after;
        let (mut arrival, advise) = loop {
            let mut arrival = d.acceptor.take(None, until).ok_or(Error::gave_up(
                t.give_up_after,
                LinkError::NoAnswer {
                    expected: "a source",
                    after: t.give_up_after,
                },
            ))?;
            match read_advise(&mut arrival.conns.0) {
                Ok(advise) => break (arrival, advise),
                Err(e) if e.is_link() => continue,
                Err(e) => return Err(e),
            }
        };
        let geometry = check_advise(&advise).and_then(|(ps, pages)| {
            check_memory(d.memory.as_deref(), ps, pages).map(|()| (ps, pages))
        });
        let (ps, pages) = match geometry {
            Ok(g) => g,
            Err(e) => {
                transport::handshake::refuse(
                    &mut arrival.conns.0,
                    ShutReason::Error,
                    &e.to_string(),
                );
                return Err(e);
            }
        };
        let kind = kind_for(ps);
        let memory = match &d.memory {
            Some(memory) => {
                // Pages it holds would never fault once registered: drop them all.
                memory
                    .madvise(0, memory.len(), libc::MADV_DONTNEED)
                    .map_err(Error::io("drop the embedder's memory"))?;
                memory.clone()
            }
            None => Arc::new(map(kind, ps, pages)?),
        };
        // No huge pages before LISTEN: khugepaged could collapse a range around pages that
        // DISCARD dropped, filling them with zeros that would never fault. Registered, the
        // memory is safe from that (a missing page in a userfaultfd range is never filled).
        if kind == MemoryKind::Anon {
            memory
                .madvise(0, memory.len(), libc::MADV_NOHUGEPAGE)
                .map_err(Error::io("advise the memory against huge pages"))?;
        }
        let blocks = d.opts.huge_pages
            && kind == MemoryKind::Anon
            && memory.addr() % uffd_core::HUGE_PAGE_SIZE == 0;
        let states = PageStateMap::new(pages as usize);
        let land = Land::Copy { memory, states };
        let placed = Arc::new(Placed::new(ps, pages));
        let mut receiver = Receiver::new(ps, pages, land, d.control.received.clone());
        receiver.on_land = Some(placed.clone());
        #[cfg(feature = "fault-injection")]
        {
            receiver.faults = d.control.faults.clone();
        }
        let mut run = DestRun {
            d,
            session: arrival.session,
            advise,
            receiver: Arc::new(receiver),
            pair: None,
            step: step::ADVISED,
            memory: None,
            placed,
            pager: None,
            steps: DestSwitchSteps::default(),
            run_at: None,
            complete_at: None,
            verdict: String::new(),
            blocks,
            headway: Headway::new(t.give_up_after, t.silence),
        };
        d.control.set_phase(DestPhase::Precopy);
        let advise = run.advise.clone();
        match run.adopt(arrival, advise) {
            Err(e) if e.is_link() => run.resume(e)?,
            other => other?,
        }
        Ok(run)
    }

    /// Takes `arrival` as the session's pair: its ADVISE must be the first one; then
    /// RECV_BITMAP and the step go back.
    fn adopt(&mut self, mut arrival: Arrival, advise: Advise) -> Result<(), Error> {
        if advise != self.advise {
            let e = match (Advise {
                image: self.advise.image,
                ..advise
            }) == self.advise
            {
                true => Refusal::ImageChanged,
                false => Refusal::GeometryChanged,
            };
            transport::handshake::refuse(&mut arrival.conns.0, ShutReason::Error, &e.to_string());
            return Err(Error::refused(e));
        }
        if self.blocks {
            let block = uffd_core::HUGE_PAGE_SIZE;
            arrival
                .conns
                .0
                .r
                .align_bodies(PAGES_DATA_AT, block)
                .map_err(Error::io("map an aligned receive buffer"))?;
        }
        let (timing, receiver) = (&self.d.opts.timing, self.receiver.clone());
        let Arrival {
            conns,
            cutter,
            guard,
            ..
        } = arrival;
        let pair = link::start(conns, cutter, &advise, receiver, timing)?;
        guard.disarm();
        self.receiver.greet(&pair, Some(self.step))?;
        self.headway.greeted(self.landed(), self.step);
        self.pair = Some(pair);
        Ok(())
    }

    /// Pages landed so far: copied in, placed, dropped by DISCARD.
    fn landed(&self) -> u64 {
        let r = &self.d.control.received;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        get(&r.copied) + get(&r.placed) + get(&r.discarded)
    }

    fn pair(&self) -> &Pair {
        self.pair.as_ref().expect("a pair between adopt and resume")
    }

    /// Pauses after `cause` until the source's next pair is up, or gives up once
    /// [`Timing::give_up_after`] passed since the last progress ([`Headway`]).
    pub(super) fn resume(&mut self, cause: Error) -> Result<(), Error> {
        let cause = match &self.pair {
            Some(pair) => first_cause(pair, cause),
            None => cause,
        };
        let control = &self.d.control;
        let phase = format!("{:?}", control.phase());
        control.link.pause("destination", &phase, &cause);
        self.receiver.pause();
        self.pair = None;
        let after = self.d.opts.timing.give_up_after;
        let mut last = match cause {
            Error::Link(e) => e,
            _ => LinkError::Cut,
        };
        let until = self.headway.broke(self.landed(), self.step);
        if until <= Instant::now() {
            // Even if the source's next pair is already waiting to be taken.
            return Err(self.fail(Error::gave_up(after, last)));
        }
        match self.next_pair(until, &mut last) {
            Ok(true) => {}
            Ok(false) => return Err(self.fail(Error::gave_up(after, last))),
            Err(e) => return Err(self.fail(e)),
        }
        self.d.control.link.resumed("destination");
        Ok(())
    }

    /// Adopts the session's next pair that greets; false if `until` passes first
    /// (`last`: the latest failure).
    fn next_pair(&mut self, until: Instant, last: &mut LinkError) -> Result<bool, Error> {
        while let Some(mut arrival) = self.d.acceptor.take(Some(self.session), until) {
            match read_advise(&mut arrival.conns.0).and_then(|a| self.adopt(arrival, a)) {
                Ok(()) => return Ok(true),
                Err(Error::Link(e)) => *last = e,
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Precopy until LISTEN: pages and DISCARD land on the reader thread.
    pub(super) fn precopy(&mut self) -> Result<(), Error> {
        match self.pair().wait()? {
            (_, Message::Listen) => self.listen(),
            (channel, other) => Err(unexpected(other, "LISTEN", channel)),
        }
    }

    /// LISTEN: registers the memory and starts the pager with the states precopy wrote.
    fn listen(&mut self) -> Result<(), Error> {
        let at = Instant::now();
        let Land::Copy { memory, states } = self.receiver.set_land(Land::Idle) else {
            unreachable!("LISTEN is handled once, from the precopy land");
        };
        let uffd = Uffd::builder()
            .non_blocking(true)
            .require(UffdFeatures::EVENT_REMOVE)
            .optional(UffdFeatures::MOVE)
            .open()?;
        let moves = self.blocks && uffd.features().contains(UffdFeatures::MOVE);
        let pager = Pager::builder(uffd, self.receiver.clone())
            .mapping(memory.clone(), 0)
            .mode(self.d.opts.mode)
            .prefetch(Prefetch::None)
            .states(states)
            .start()?;
        if self.d.opts.huge_pages && memory.kind() == MemoryKind::Anon {
            // Registered now (see `start`): huge pages for the workload where they fit.
            memory
                .madvise(0, memory.len(), libc::MADV_HUGEPAGE)
                .map_err(Error::io("advise the memory for huge pages"))?;
        }
        if moves {
            self.receiver.move_blocks();
        }
        self.receiver.set_land(Land::Place(pager.placer()));
        (self.memory, self.pager) = (Some(memory), Some(pager));
        self.steps.listen = at.elapsed();
        self.step = step::LISTENING;
        self.d.control.set_phase(DestPhase::Listening);
        self.pair().main.send(&Message::Ack {
            seq: step::LISTENING,
        })?;
        Ok(())
    }

    /// RUN: starts the workload (once) and acknowledges.
    pub(super) fn await_run(
        &mut self,
        on_run: &mut Option<impl FnOnce(RunningMemory, Vec<u8>) -> Result<(), BoxError>>,
    ) -> Result<(), Error> {
        let device_state = match self.pair().wait()? {
            (_, Message::Run { device_state }) => device_state,
            (channel, other) => return Err(unexpected(other, "RUN", channel)),
        };
        let memory = self.memory.as_ref().expect("mapped at LISTEN");
        // Once: a RUN repeated on a later pair cannot come (this side reports step
        // RUNNING on every pair from here on), but would find `on_run` taken.
        if let Some(on_run) = on_run.take() {
            let running = RunningMemory {
                base: memory.addr(),
                len: memory.len(),
                page_size: self.advise.page_size as usize,
            };
            let at = Instant::now();
            let ran = on_run(running, device_state);
            self.steps.run = at.elapsed();
            if let Err(source) = ran {
                let what = "the destination's embedder could not take it";
                let e = Error::DeviceState { what, source };
                self.pair()
                    .shut(&crate::error::chain(&e), self.d.opts.timing.silence);
                return Err(e);
            }
            self.run_at = Some(Instant::now());
        }
        self.step = step::RUNNING;
        self.d.control.set_phase(DestPhase::Running);
        self.pair()
            .main
            .send(&Message::Ack { seq: step::RUNNING })?;
        Ok(())
    }

    /// Postcopy: pages land on the readers; after END and every page, DIGESTS, then the
    /// source's verdict.
    pub(super) fn postcopy(&mut self) -> Result<(), Error> {
        let pair = self.pair.as_ref().expect("a pair between adopt and resume");
        match pair.wait()? {
            (_, Message::End) => {}
            (channel, other) => return Err(unexpected(other, "END", channel)),
        }
        self.receiver
            .wait_complete(pair, self.d.opts.timing.silence)?;
        self.complete_at.get_or_insert_with(Instant::now);
        self.d.control.set_phase(DestPhase::Verifying);
        self.send_digests(pair)?;
        match pair.next("the verdict", self.d.opts.timing.give_up_after)? {
            (
                _,
                Message::Shut {
                    reason: ShutReason::Done,
                    detail,
                },
            ) => self.verdict = detail,
            (channel, other) => return Err(unexpected(other, "SHUT", channel)),
        }
        self.step = step::VERIFIED;
        // Lost, it is asked for again: the source reconnects and hears step 3.
        let _ = pair.main.send(&Message::Ack {
            seq: step::VERIFIED,
        });
        Ok(())
    }

    fn send_digests(&self, pair: &Pair) -> Result<(), Error> {
        let pages = self.advise.page_count as usize;
        for first in (0..pages).step_by(DIGESTS_PER_FRAME) {
            let n = DIGESTS_PER_FRAME.min(pages - first);
            // Of what was placed, not of memory now: the workload may have written since.
            // A page never landed that the workload dropped holds its zeros: marked.
            let digest = |p| {
                let dropped = || self.pager.as_ref().is_some_and(|g| g.dropped(p));
                if !self.placed.told(p) && dropped() {
                    crate::wire::DROPPED
                } else {
                    self.placed.get(p)
                }
            };
            let digests = (first..first + n).map(digest).collect();
            pair.main.send(&Message::Digests {
                first: first as u64,
                digests,
            })?;
        }
        Ok(())
    }

    /// After the verdict: until the source says it heard our ACK of step 3 (it echoes
    /// it), on this pair or — if this one breaks or is superseded first (the ACK may be
    /// lost with it) — on the next one it opens, which hears step 3 in its greeting;
    /// bounded by two silence deadlines and a backoff.
    pub(super) fn linger(&mut self) {
        let t = self.d.opts.timing;
        let until = Instant::now() + t.silence * 2 + t.max_backoff;
        while let Some(pair) = &self.pair {
            match pair.next_within(until.saturating_duration_since(Instant::now())) {
                Ok(Some((_, Message::Ack { seq }))) if seq == step::VERIFIED => return,
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return log::warn!("destination: the source never said it heard the end")
                }
                Err(_) => self.pair = None,
            }
            if !matches!(self.next_pair(until, &mut LinkError::Cut), Ok(true)) {
                return log::warn!("destination: the source did not come back to hear the end");
            }
        }
    }

    /// After RUN the workload may still use the memory: it stays mapped, and every page
    /// that never arrived is poisoned first (the pager fails with the cause), so a touch
    /// raises SIGBUS rather than reading zeros that were never the source's.
    pub(super) fn fail(&mut self, e: Error) -> Error {
        log::error!("destination: {}", crate::error::chain(&e));
        self.pair = None;
        if let Some(pager) = self.pager.take() {
            pager.fail(pager::SourceError {
                what: "the migration",
                offset: 0,
                source: std::io::Error::other(crate::error::chain(&e)),
            });
        }
        if self.run_at.is_some() {
            if let Some(m) = self.memory.take() {
                // Never unmapped by us (the embedder may hold it too and keeps it mapped).
                std::mem::forget(m);
            }
        }
        e
    }

    pub(super) fn report(mut self) -> Result<DestReport, Error> {
        let stats = self.pager.take().expect("started at LISTEN").stop()?;
        let stats_of = &self.d.control.received;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let run_at = self.run_at.unwrap_or_else(Instant::now);
        Ok(DestReport {
            memory: self.memory.take().expect("mapped at LISTEN"),
            page_size: self.advise.page_size as usize,
            pages: self.advise.page_count,
            precopy_pages: get(&stats_of.copied),
            discarded: get(&stats_of.discarded),
            postcopy_pages: get(&stats_of.placed),
            requested: get(&stats_of.requested),
            reconnects: self.d.control.link.reconnects(),
            postcopy: self
                .complete_at
                .unwrap_or(run_at)
                .saturating_duration_since(run_at),
            switch: DestSwitchSteps {
                discard: Duration::from_nanos(get(&stats_of.discarding_ns)),
                ..self.steps
            },
            pager: stats,
            verdict: std::mem::take(&mut self.verdict),
        })
    }
}

/// The memory kind a page size needs. Private: MADV_DONTNEED (DISCARD) really drops a
/// private page, where a shared mapping would keep it in its page cache and never fault.
fn kind_for(ps: usize) -> MemoryKind {
    match ps {
        4096 => MemoryKind::Anon,
        _ => MemoryKind::HugetlbPrivate,
    }
}

/// Checks the embedder's memory, if it gave one, against the advised geometry.
fn check_memory(memory: Option<&Mapping>, ps: usize, pages: u64) -> Result<(), Error> {
    let Some(memory) = memory else {
        return Ok(());
    };
    let geometry = |what| Err(Error::refused(Refusal::Geometry(what)));
    if memory.kind() != kind_for(ps) {
        return geometry("the destination's memory is not private memory of the advised page size");
    }
    if memory.len() as u64 != pages * ps as u64 {
        return geometry("the destination's memory is not the advised size");
    }
    Ok(())
}

/// Maps the destination memory; a hugetlb pool too small is named as such.
fn map(kind: MemoryKind, ps: usize, pages: u64) -> Result<Mapping, Error> {
    let len = ps * pages as usize;
    let mapped = match kind {
        // On 2 MiB boundaries: whole blocks can then arrive as huge pages.
        MemoryKind::Anon => Mapping::anon_aligned(len, uffd_core::HUGE_PAGE_SIZE),
        _ => Mapping::new(kind, len),
    };
    mapped.map_err(
        |source| match (kind.is_hugetlb(), uffd_core::hugetlb::free()) {
            (true, Ok(free)) if (free as u64) < pages => Error::HugePages {
                needed: pages,
                free: free as u64,
            },
            _ => Error::Io {
                what: "map the destination memory",
                source,
            },
        },
    )
}

fn check_advise(a: &Advise) -> Result<(usize, u64), Error> {
    let ps = a.page_size as usize;
    let geometry = |what| Err(Error::refused(Refusal::Geometry(what)));
    if ps != 4096 && ps != uffd_core::HUGE_PAGE_SIZE {
        return geometry("a page size other than 4 KiB or 2 MiB");
    }
    if a.regions.len() != 1 || a.regions[0].first_page != 0 || a.regions[0].pages != a.page_count {
        return geometry("a migration destination takes one region covering every page");
    }
    if a.page_count
        .checked_mul(ps as u64)
        .is_none_or(|b| b > 1 << 46)
    {
        return geometry("more than 64 TiB");
    }
    Ok((ps, a.page_count))
}
