//! The migration source: owns the memory and its writing workload, runs the precopy
//! rounds, switches to postcopy, streams and answers requests, and reconnects after a
//! broken connection.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::dirty::DirtyTracker;
use super::{digest_raw, Timing};
use crate::auth::{self, Key};
use crate::net::{split, Addr, FrameReader, FrameWriter, Stream};
use crate::wire::{
    encode, Advise, Channel, Features, Limits, Message, PageRange, Role, ShutReason, WireRegion,
    MAX_RANGES,
};
use crate::Error;
use page_state::Bitmap;

/// Bytes of page data per PAGES frame (at least one page).
const FRAME_BYTES: usize = 1 << 20;

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
    /// Timeouts and backoff.
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

/// A connection fault to inject (tests, and drills of an operator's recovery runbook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Close both connections.
    Close,
    /// Write half of a PAGES frame, then close.
    HalfFrame,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Connecting.
    Connecting = 0,
    /// Iterative precopy.
    Precopy = 1,
    /// Workload stopped; discard, listen, run.
    Switching = 2,
    /// Destination running; pages streamed and requested.
    Postcopy = 3,
    /// A connection broke; reconnecting.
    Paused = 4,
    /// Every page sent; checking the destination's digests.
    Verifying = 5,
    /// Done.
    Done = 6,
}

/// Live counters of a running migration, for progress displays.
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    /// Current precopy round (1-based).
    pub round: AtomicU64,
    /// Pages in the migration.
    pub pages: AtomicU64,
    /// Page data bytes sent in precopy.
    pub precopy_bytes: AtomicU64,
    /// Page data bytes sent in postcopy (stream and urgent).
    pub postcopy_bytes: AtomicU64,
    /// Pages sent by the postcopy stream.
    pub stream_pages: AtomicU64,
    /// Pages sent because they were requested.
    pub urgent_pages: AtomicU64,
    /// REQ_PAGES messages answered.
    pub requests: AtomicU64,
    /// Pages the destination still needed when the current postcopy connection began.
    pub needed: AtomicU64,
    /// Successful reconnections.
    pub reconnects: AtomicU64,
}

impl Progress {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            1 => Phase::Precopy,
            2 => Phase::Switching,
            3 => Phase::Postcopy,
            4 => Phase::Paused,
            5 => Phase::Verifying,
            6 => Phase::Done,
            _ => Phase::Connecting,
        }
    }

    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }
}

/// Operator commands to a running migration, and its progress.
#[derive(Debug, Default)]
pub struct SourceControl {
    switch_now: AtomicBool,
    resume: Mutex<u64>,
    resumed: Condvar,
    fault: Mutex<Option<(u64, Fault)>>,
    /// Live counters.
    pub progress: Progress,
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

    /// Injects `fault` on the main connection once `after_pages` pages were sent in
    /// postcopy (stream and urgent answers).
    pub fn inject(&self, fault: Fault, after_pages: u64) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = Some((after_pages, fault));
    }

    /// Waits up to `timeout` for a resume command; true if one came.
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

    fn take_fault(&self, sent: u64) -> Option<Fault> {
        let mut f = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        match *f {
            Some((after, fault)) if sent >= after => {
                *f = None;
                Some(fault)
            }
            _ => None,
        }
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
    pub switch_reason: &'static str,
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
    key: Key,
    base: usize,
    len: usize,
    opts: SourceOptions,
    control: Arc<SourceControl>,
}

/// One authenticated connection and a handle to cut it.
struct Conn {
    r: FrameReader,
    w: FrameWriter,
    cut: Stream,
}

fn connect(
    addr: &Addr,
    key: &Key,
    channel: Channel,
    session: u64,
    timing: &Timing,
) -> Result<Conn, Error> {
    let stream = Stream::connect(addr)?;
    stream.set_timeouts(Some(timing.io_timeout), Some(timing.io_timeout))?;
    let cut = stream.try_clone()?;
    let (mut r, mut w) = split(stream)?;
    auth::open(&mut r, &mut w, key, Role::Source, channel, session)?;
    Ok(Conn { r, w, cut })
}

/// The memory being migrated, read only through raw pointers: the workload writes it
/// concurrently during precopy (a torn copy is harmless: the write that tore it marked
/// the page dirty, so it is sent again or discarded).
#[derive(Clone, Copy)]
struct Memory {
    base: usize,
    ps: usize,
    pages: u64,
}

impl Memory {
    fn page_ptr(&self, p: u64) -> *const u8 {
        (self.base + p as usize * self.ps) as *const u8
    }

    /// Sends pages `first..first + count` as PAGES and ZERO_RUN frames; returns data bytes.
    /// With `snapshot` (the workload is running), each frame's pages are copied into
    /// `snapshot` first and classified and sent from there, so the frame's checksum covers
    /// exactly the bytes sent; without it the memory is frozen and sent in place.
    fn send(
        &self,
        w: &mut FrameWriter,
        first: u64,
        count: u64,
        mut snapshot: Option<&mut Vec<u8>>,
    ) -> Result<u64, Error> {
        let ps = self.ps;
        let per_frame = (FRAME_BYTES / ps).max(1) as u64;
        let end = first + count;
        let mut p = first;
        let mut bytes = 0;
        while p < end {
            let n = (end - p).min(per_frame) as usize;
            // SAFETY: pages p..p + n lie in the mapping (`end <= pages`), which
            // `Migration::new`'s caller keeps mapped. While the workload runs the bytes
            // are only memcpy'd into the snapshot (a torn copy is re-sent: the write that
            // tore it marked the page dirty); after the switch nothing writes them.
            let raw = unsafe { std::slice::from_raw_parts(self.page_ptr(p), n * ps) };
            let chunk: &[u8] = match snapshot.as_deref_mut() {
                Some(buf) => {
                    buf.clear();
                    buf.extend_from_slice(raw);
                    buf
                }
                None => raw,
            };
            bytes += w.send_page_data(p, chunk, ps)?;
            p += n as u64;
        }
        Ok(bytes)
    }

    fn digest(&self, p: u64) -> u64 {
        // SAFETY: in the mapping; after the switch nothing writes it.
        unsafe { digest_raw(self.page_ptr(p), self.ps) }
    }
}

/// How one postcopy connection pair ended.
enum SessionEnd {
    Verified(u64),
    Broken(Error),
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
        key: Key,
        base: usize,
        len: usize,
        opts: SourceOptions,
    ) -> Result<Migration, Error> {
        let ps = opts.page_size;
        if ps != 4096 && ps != uffd_core::HUGE_PAGE_SIZE {
            return Err(Error::Protocol(format!(
                "page size {ps} is neither 4 KiB nor 2 MiB"
            )));
        }
        if len == 0 || len % ps != 0 || base % 4096 != 0 {
            return Err(Error::Protocol(format!(
                "region {base:#x}+{len:#x} is empty or not a whole number of {ps}-byte pages"
            )));
        }
        Ok(Migration {
            addr,
            key,
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
    /// Failures: before RUN is acknowledged nothing runs at the destination, so an error
    /// there (a broken connection in precopy or during the switch) ends the migration and
    /// the caller may simply resume its workload if it was already stopped. After RUN the
    /// destination owns the workload: broken connections pause and resume (see the module
    /// docs) until [`Timing::give_up_after`] passes without a reconnection.
    pub fn run(self, stop_workload: impl FnOnce()) -> Result<SourceReport, Error> {
        let started = Instant::now();
        let ps = self.opts.page_size;
        let pages = (self.len / ps) as u64;
        let mem = Memory {
            base: self.base,
            ps,
            pages,
        };
        let ctl = &self.control;
        let prog = &ctl.progress;
        prog.pages.store(pages, Ordering::Relaxed);
        let timing = &self.opts.timing;
        let mut tracker = if self.opts.max_rounds > 0 {
            Some(DirtyTracker::start(self.base, self.len)?)
        } else {
            None
        };
        let session = auth::session_id();
        let mut main = connect(&self.addr, &self.key, Channel::Main, session, timing)?;
        let mut urgent = connect(&self.addr, &self.key, Channel::Urgent, session, timing)?;
        let mut features = Features::ZERO_RUNS | Features::URGENT_CHANNEL | Features::RECOVERY;
        if ps > 4096 {
            features |= Features::HUGE_PAGES;
        }
        let advise = Advise {
            page_size: ps as u32,
            page_count: pages,
            features,
            regions: vec![WireRegion {
                first_page: 0,
                pages,
            }],
        };
        let limits = Limits::default().advised(&advise);
        main.r.limits = limits;
        urgent.r.limits = limits;
        main.w.send(&Message::Advise(advise))?;
        expect_ack(&mut main.r, 0)?;

        // Precopy.
        prog.set_phase(Phase::Precopy);
        let sent = Bitmap::new(pages as usize);
        let dirty = Bitmap::new(pages as usize);
        let mut rounds = Vec::new();
        let mut switch_reason = "pure postcopy (no precopy rounds)";
        if let Some(tracker) = &mut tracker {
            let mut snapshot = Vec::with_capacity(FRAME_BYTES.max(ps));
            dirty.fill();
            loop {
                let t = Instant::now();
                prog.round.store(rounds.len() as u64 + 1, Ordering::Relaxed);
                let (mut n, mut bytes) = (0, 0);
                let runs: Vec<_> = dirty.runs().collect();
                for run in runs {
                    for p in run.clone() {
                        dirty.clear(p);
                        sent.set(p);
                    }
                    let (first, count) = (run.start as u64, run.len() as u64);
                    let b = mem.send(&mut main.w, first, count, Some(&mut snapshot))?;
                    bytes += b;
                    prog.precopy_bytes.fetch_add(b, Ordering::Relaxed);
                    n += count;
                }
                tracker.collect(ps, |g| {
                    dirty.set(g as usize);
                })?;
                let dirty_after = dirty.count() as u64;
                let previous = rounds.last().map(|r: &Round| r.dirty_after);
                rounds.push(Round {
                    pages: n,
                    bytes,
                    dirty_after,
                    took: t.elapsed(),
                });
                if ctl.switch_now.load(Ordering::Relaxed) {
                    switch_reason = "operator command";
                } else if rounds.len() as u32 >= self.opts.max_rounds {
                    switch_reason = "round limit";
                } else if dirty_after * ps as u64 <= self.opts.switch_below_bytes {
                    switch_reason = "converged";
                } else if previous
                    .is_some_and(|p| dirty_after as f64 > p as f64 * self.opts.converge_ratio)
                {
                    switch_reason = "not converging";
                } else {
                    continue;
                }
                break;
            }
        }

        // The switch: stop, final scan, discard what was sent and dirtied since.
        prog.set_phase(Phase::Switching);
        let stopped = Instant::now();
        stop_workload();
        if let Some(mut tracker) = tracker.take() {
            tracker.collect(ps, |g| {
                dirty.set(g as usize);
            })?;
        }
        let need = Bitmap::new(pages as usize);
        need.store_complement_of(&sent.to_words())?;
        let discard = Bitmap::new(pages as usize);
        for p in dirty.runs().flatten() {
            need.set(p);
            if sent.test(p) {
                discard.set(p);
            }
        }
        let discarded = discard.count() as u64;
        let needed_at_switch = need.count() as u64;
        let ranges: Vec<PageRange> = discard
            .runs()
            .map(|run| PageRange {
                first: run.start as u64,
                count: run.len() as u64,
            })
            .collect();
        for chunk in ranges.chunks(MAX_RANGES) {
            main.w.send(&Message::Discard {
                ranges: chunk.to_vec(),
            })?;
        }
        main.w.send(&Message::Listen)?;
        expect_ack(&mut main.r, 1)?;
        main.w.send(&Message::Run)?;
        expect_ack(&mut main.r, 2)?;
        let downtime = stopped.elapsed();
        let run_at = Instant::now();

        // Postcopy, resumed after every broken connection.
        let cursor = AtomicU64::new(0);
        let mut last_sent = run_at;
        let verified = loop {
            prog.set_phase(Phase::Postcopy);
            prog.needed.store(need.count() as u64, Ordering::Relaxed);
            match self.postcopy(main, urgent, &mem, &need, &cursor, &mut last_sent) {
                SessionEnd::Verified(n) => break n,
                SessionEnd::Broken(e @ Error::Fatal(_)) => return Err(e),
                SessionEnd::Broken(e) => {
                    prog.set_phase(Phase::Paused);
                    (main, urgent) = self.reconnect(session, limits, &need, e)?;
                    prog.reconnects.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        prog.set_phase(Phase::Done);
        Ok(SourceReport {
            pages,
            page_size: ps,
            rounds,
            switch_reason,
            precopy_bytes: prog.precopy_bytes.load(Ordering::Relaxed),
            postcopy_bytes: prog.postcopy_bytes.load(Ordering::Relaxed),
            discarded,
            needed_at_switch,
            stream_pages: prog.stream_pages.load(Ordering::Relaxed),
            urgent_pages: prog.urgent_pages.load(Ordering::Relaxed),
            requests: prog.requests.load(Ordering::Relaxed),
            downtime,
            postcopy: last_sent.saturating_duration_since(run_at),
            total: started.elapsed(),
            reconnects: prog.reconnects.load(Ordering::Relaxed),
            verified,
        })
    }

    /// Pauses until a reconnection succeeds (with backoff, or on command), then re-plans
    /// from the destination's received bitmap.
    fn reconnect(
        &self,
        session: u64,
        limits: Limits,
        need: &Bitmap,
        cause: Error,
    ) -> Result<(Conn, Conn), Error> {
        let t = &self.opts.timing;
        let paused = Instant::now();
        let mut delay = t.first_backoff;
        let mut seen = *self
            .control
            .resume
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut last = cause;
        loop {
            let left = t.give_up_after.saturating_sub(paused.elapsed());
            if left.is_zero() {
                return Err(Error::Protocol(format!(
                    "gave up reconnecting after {:?}; last error: {last}",
                    t.give_up_after
                )));
            }
            if self.opts.auto_resume {
                self.control.wait_resume(&mut seen, delay.min(left));
            } else if !self
                .control
                .wait_resume(&mut seen, left.min(Duration::from_secs(1)))
            {
                continue;
            }
            let attempt = (|| {
                let mut main = connect(&self.addr, &self.key, Channel::Main, session, t)?;
                let mut urgent = connect(&self.addr, &self.key, Channel::Urgent, session, t)?;
                main.r.limits = limits;
                urgent.r.limits = limits;
                match main.r.recv()? {
                    Message::RecvBitmap { words } => need.store_complement_of(&words)?,
                    Message::Shut { detail, .. } => {
                        return Err(Error::Fatal(format!("destination refused: {detail}")))
                    }
                    other => {
                        return Err(Error::Protocol(format!(
                            "expected RECV_BITMAP, got {other:?}"
                        )))
                    }
                }
                Ok((main, urgent))
            })();
            match attempt {
                Ok(pair) => return Ok(pair),
                Err(e @ Error::Fatal(_)) => return Err(e),
                Err(e) => {
                    last = e;
                    delay = (delay * 2).min(t.max_backoff);
                }
            }
        }
    }

    /// Streams and answers requests on one connection pair until verified or broken.
    fn postcopy(
        &self,
        main: Conn,
        urgent: Conn,
        mem: &Memory,
        need: &Bitmap,
        cursor: &AtomicU64,
        last_sent: &mut Instant,
    ) -> SessionEnd {
        let broken = AtomicBool::new(false);
        // Ends both connections: on any error, and once verified (ending the urgent reader).
        let cut = || {
            broken.store(true, Ordering::Relaxed);
            main.cut.shutdown();
            urgent.cut.shutdown();
        };
        // Handshake replies came under a read timeout; now both peers may idle (the
        // urgent channel is silent whenever the destination does not fault).
        for conn in [&main.cut, &urgent.cut] {
            let _ = conn.set_timeouts(None, Some(self.opts.timing.io_timeout));
        }
        let main_w = Mutex::new(main.w);
        let (mut main_r, mut urgent_r, mut urgent_w) = (main.r, urgent.r, urgent.w);
        let prog = &self.control.progress;
        let finished = Mutex::new(None::<Instant>);
        std::thread::scope(|s| {
            // Urgent: answer requests at once.
            let urgent_t = s.spawn(|| {
                let r: Result<(), Error> = (|| loop {
                    match urgent_r.recv()? {
                        Message::ReqPages { ranges } => {
                            prog.requests.fetch_add(1, Ordering::Relaxed);
                            for r in ranges {
                                need.clear_range(r.first as usize..(r.first + r.count) as usize)?;
                                let b = mem.send(&mut urgent_w, r.first, r.count, None)?;
                                prog.postcopy_bytes.fetch_add(b, Ordering::Relaxed);
                                prog.urgent_pages.fetch_add(r.count, Ordering::Relaxed);
                                // Spatial locality: the stream goes on after this page.
                                cursor.store(r.first + r.count, Ordering::Relaxed);
                            }
                        }
                        Message::Ping { seq } => urgent_w.send(&Message::Pong { seq })?,
                        other => {
                            return Err(Error::Protocol(format!(
                                "unexpected {other:?} on the urgent channel"
                            )))
                        }
                    }
                })();
                if r.is_err() {
                    cut();
                }
                r
            });
            // Background stream in address order from the cursor.
            let stream_t = s.spawn(|| {
                let per_frame = (FRAME_BYTES / mem.ps).max(1) as u64;
                let r: Result<(), Error> = (|| {
                    loop {
                        if broken.load(Ordering::Relaxed) {
                            return Err(Error::Closed);
                        }
                        let sent = prog.stream_pages.load(Ordering::Relaxed)
                            + prog.urgent_pages.load(Ordering::Relaxed);
                        match self.control.take_fault(sent) {
                            Some(Fault::Close) => {
                                return Err(Error::Protocol("injected: close".into()))
                            }
                            Some(Fault::HalfFrame) => {
                                let mut frame = Vec::new();
                                encode(
                                    &Message::Pages {
                                        first: 0,
                                        data: vec![0xa5; mem.ps],
                                    },
                                    &mut frame,
                                );
                                let mut w = main_w.lock().unwrap_or_else(|p| p.into_inner());
                                let _ = w.write_raw(&frame[..frame.len() / 2]);
                                return Err(Error::Protocol("injected: half-written frame".into()));
                            }
                            None => {}
                        }
                        let at = cursor.load(Ordering::Relaxed);
                        let Some(first) = need.next_set_wrapping(at as usize) else {
                            break;
                        };
                        let first = first as u64;
                        if !self.opts.background {
                            // Demand only: the urgent thread clears `need`.
                            std::thread::sleep(Duration::from_micros(200));
                            continue;
                        }
                        let mut count = 0;
                        while count < per_frame
                            && first + count < mem.pages
                            && need.clear((first + count) as usize)
                        {
                            count += 1;
                        }
                        if count == 0 {
                            continue; // an urgent answer took it meanwhile
                        }
                        cursor.store(first + count, Ordering::Relaxed);
                        let b = {
                            let mut w = main_w.lock().unwrap_or_else(|p| p.into_inner());
                            mem.send(&mut w, first, count, None)?
                        };
                        prog.postcopy_bytes.fetch_add(b, Ordering::Relaxed);
                        prog.stream_pages.fetch_add(count, Ordering::Relaxed);
                    }
                    *finished.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                    main_w
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .send(&Message::End)
                })();
                if r.is_err() {
                    cut();
                }
                r
            });
            // Main reader: digests after END, then the verdict.
            let verdict: Result<u64, Error> = (|| {
                let mut checked = 0u64;
                let mut bad = Vec::new();
                loop {
                    match main_r.recv()? {
                        Message::Digests { first, digests } => {
                            prog.set_phase(Phase::Verifying);
                            for (i, d) in digests.into_iter().enumerate() {
                                let p = first + i as u64;
                                if mem.digest(p) != d {
                                    bad.push(p);
                                }
                                checked += 1;
                            }
                            if checked >= mem.pages {
                                break;
                            }
                        }
                        Message::Ping { seq } => main_w
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .send(&Message::Pong { seq })?,
                        Message::Ack { .. } | Message::Pong { .. } => {}
                        Message::Shut { reason, detail } => {
                            return Err(Error::Fatal(format!(
                                "the destination shut the migration ({reason:?}): {detail}"
                            )))
                        }
                        other => {
                            return Err(Error::Protocol(format!(
                                "unexpected {other:?} on the main channel"
                            )))
                        }
                    }
                }
                let mut w = main_w.lock().unwrap_or_else(|p| p.into_inner());
                if bad.is_empty() {
                    w.send(&Message::Shut {
                        reason: ShutReason::Done,
                        detail: format!("verified {checked} pages"),
                    })?;
                    Ok(checked)
                } else {
                    let e = Error::Mismatch {
                        pages: bad.len() as u64,
                        first: bad[0],
                    };
                    let _ = w.send(&Message::Shut {
                        reason: ShutReason::Error,
                        detail: e.to_string(),
                    });
                    Err(Error::Fatal(e.to_string()))
                }
            })();
            cut();
            let stream_r = stream_t.join().unwrap_or(Err(Error::Closed));
            let urgent_r = urgent_t.join().unwrap_or(Err(Error::Closed));
            if let Some(t) = *finished.lock().unwrap_or_else(|p| p.into_inner()) {
                *last_sent = t;
            }
            match verdict {
                Ok(n) => SessionEnd::Verified(n),
                Err(e @ Error::Fatal(_)) => SessionEnd::Broken(e),
                Err(e) => {
                    SessionEnd::Broken(stream_r.err().or(urgent_r.err()).map_or(e, |first| first))
                }
            }
        })
    }
}

fn expect_ack(r: &mut FrameReader, seq: u64) -> Result<(), Error> {
    match r.recv()? {
        Message::Ack { seq: got } if got == seq => Ok(()),
        Message::Shut { detail, .. } => Err(Error::Fatal(format!(
            "the destination shut the migration: {detail}"
        ))),
        other => Err(Error::Protocol(format!(
            "expected ACK {seq}, got {other:?}"
        ))),
    }
}
