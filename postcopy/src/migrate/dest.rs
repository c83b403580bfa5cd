//! The migration destination: ADVISE → LISTEN → RUNNING → END.
//!
//! Before LISTEN, arriving pages are copied straight into the fresh mapping (no
//! userfaultfd yet; precopy rounds may overwrite them) and DISCARD drops the ones the
//! source dirtied after sending. At LISTEN a pager registers the mapping with a remote
//! source that turns faults into REQ_PAGES on the urgent connection; receiver threads place
//! whatever arrives on either connection. The workload starts at RUN.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use page_state::PageState;
use pager::{DeliveryMode, Fetched, Pager, Placer, Prefetch, RegionSpec, Source, SourceError};
use uffd_core::{Features as UffdFeatures, Mapping, MemoryKind, Uffd};

use super::{digest_raw, Timing};
use crate::auth::{self, Key};
use crate::net::{split, Addr, FrameReader, FrameWriter, Listener, Stream};
use crate::wire::{Advise, Channel, Frame, Limits, Message, PageRange, Role, ShutReason};
use crate::Error;
use pager::{AtomicLatencyHistogram, LatencyHistogram, PageStateMap};

/// Digests per DIGESTS frame.
const DIGESTS_PER_FRAME: usize = 8192;

/// How the destination runs.
#[derive(Debug, Clone, Copy)]
pub struct DestOptions {
    /// How the pager receives faults.
    pub mode: DeliveryMode,
    /// Timeouts; `give_up_after` bounds a pause waiting for the source to reconnect.
    pub timing: Timing,
}

impl Default for DestOptions {
    fn default() -> Self {
        Self {
            mode: DeliveryMode::PerCpu,
            timing: Timing::default(),
        }
    }
}

/// Destination states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DestPhase {
    /// Waiting for the source.
    Waiting = 0,
    /// ADVISE received; precopy pages arriving.
    Advise = 1,
    /// Registered; waiting for RUN.
    Listen = 2,
    /// The workload runs; pages arrive on demand and in the background.
    Running = 3,
    /// A connection broke; waiting for the source to reconnect.
    Paused = 4,
    /// Every page arrived and was verified.
    End = 5,
}

/// Live counters and fault injection of a running destination.
#[derive(Debug, Default)]
pub struct DestControl {
    phase: AtomicU8,
    /// Pages copied in during precopy (including re-sends).
    pub precopy_pages: AtomicU64,
    /// Pages placed in postcopy (arrivals).
    pub postcopy_pages: AtomicU64,
    /// Reconnections accepted.
    pub reconnects: AtomicU64,
    stall: Mutex<Option<(u64, Duration)>>,
}

impl DestControl {
    /// The current state.
    pub fn phase(&self) -> DestPhase {
        match self.phase.load(Ordering::Relaxed) {
            1 => DestPhase::Advise,
            2 => DestPhase::Listen,
            3 => DestPhase::Running,
            4 => DestPhase::Paused,
            5 => DestPhase::End,
            _ => DestPhase::Waiting,
        }
    }

    fn set_phase(&self, p: DestPhase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }

    /// Fault injection: once `after_pages` postcopy pages were placed, the main receiver
    /// stops reading for `pause` (a peer that stops reading).
    pub fn stall_reading(&self, after_pages: u64, pause: Duration) {
        *self.stall.lock().unwrap_or_else(|p| p.into_inner()) = Some((after_pages, pause));
    }

    fn take_stall(&self) -> Option<Duration> {
        let mut s = self.stall.lock().unwrap_or_else(|p| p.into_inner());
        match *s {
            Some((after, pause)) if self.postcopy_pages.load(Ordering::Relaxed) >= after => {
                *s = None;
                Some(pause)
            }
            _ => None,
        }
    }
}

/// The migrated memory, handed to the workload at RUN.
#[derive(Debug, Clone, Copy)]
pub struct RunningMemory {
    /// First byte.
    pub base: usize,
    /// Bytes.
    pub len: usize,
    /// Page size.
    pub page_size: usize,
}

/// What a finished destination did. Owns the migrated memory.
#[derive(Debug)]
pub struct DestReport {
    /// The migrated memory (still mapped; the workload may go on using it).
    pub memory: Mapping,
    /// Page size.
    pub page_size: usize,
    /// Pages.
    pub pages: u64,
    /// Pages copied in during precopy (with re-sends).
    pub precopy_pages: u64,
    /// Pages dropped by DISCARD.
    pub discarded: u64,
    /// Pages placed in postcopy.
    pub postcopy_pages: u64,
    /// Pages requested by faults.
    pub requested: u64,
    /// Requested-page latency (request sent → page placed).
    pub latency: LatencyHistogram,
    /// Sum of requested-page latencies: the time faulting threads spent waiting for the
    /// source (an upper bound; concurrent faults on one page count once).
    pub blocktime: Duration,
    /// Reconnections.
    pub reconnects: u64,
    /// RUN → every page present.
    pub postcopy: Duration,
    /// The pager's counters.
    pub pager: pager::StatsSnapshot,
    /// The source's verdict.
    pub verdict: String,
}

/// The destination's view of the source, as a pager source: a fault asks on the urgent
/// connection and returns at once; receivers place the answer. While paused the request
/// is only remembered (the page stays Requested) and re-sent on reconnection.
struct Remote {
    base: usize,
    len: u64,
    ps: usize,
    started: Instant,
    urgent: Mutex<Option<FrameWriter>>,
    /// Per page: ns since `started` when requested + 1, 0 when not requested.
    asked: Box<[AtomicU64]>,
    requested: AtomicU64,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Remote {
    fn ask(&self, ranges: Vec<PageRange>) {
        let mut w = self.urgent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(writer) = w.as_mut() {
            if writer.send(&Message::ReqPages { ranges }).is_err() {
                // Broken: the receivers notice too; the page stays Requested and is asked
                // again after reconnection.
                writer.shutdown();
                *w = None;
            }
        }
    }
}

impl Source for Remote {
    fn len(&self) -> u64 {
        self.len
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let first = offset / self.ps as u64;
        let count = (scratch.len() / self.ps).max(1) as u64;
        let now = self.started.elapsed().as_nanos() as u64 + 1;
        for p in first..first + count {
            if let Some(a) = self.asked.get(p as usize) {
                // Relaxed: a timestamp read back by the receiver that places the page.
                let _ = a.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
        self.requested.fetch_add(count, Ordering::Relaxed);
        self.ask(vec![PageRange { first, count }]);
        Ok(Fetched::Pending)
    }
}

struct Conn {
    r: FrameReader,
    w: FrameWriter,
    cut: Stream,
}

/// A migration destination listening for its source.
pub struct Destination {
    listener: Listener,
    key: Key,
    opts: DestOptions,
    control: Arc<DestControl>,
}

impl Destination {
    /// Listens on `addr` for a source that knows `key`.
    pub fn bind(addr: &Addr, key: Key, opts: DestOptions) -> Result<Destination, Error> {
        Ok(Destination {
            listener: Listener::bind(addr)?,
            key,
            opts,
            control: Arc::new(DestControl::default()),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<Addr, Error> {
        Ok(self.listener.local_addr()?)
    }

    /// Progress and fault injection.
    pub fn control(&self) -> Arc<DestControl> {
        self.control.clone()
    }

    /// Accepts the main and urgent connections of one session (`expected`, or the first
    /// authenticated one). Strangers and wrong keys are refused and do not count.
    fn accept_pair(
        &self,
        expected: Option<u64>,
        deadline: Instant,
    ) -> Result<(Conn, Conn, u64), Error> {
        let t = &self.opts.timing;
        let (mut main, mut urgent) = (None, None);
        let mut session = expected;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Fatal(format!(
                    "no source (re)connected within {:?}",
                    t.give_up_after
                )));
            }
            let Some(stream) = self.listener.accept_timeout(left)? else {
                continue;
            };
            let attempt = (|| -> Result<(Conn, Channel, u64), Error> {
                stream.set_timeouts(Some(t.io_timeout), Some(t.io_timeout))?;
                let cut = stream.try_clone()?;
                let (mut r, mut w) = split(stream)?;
                let (role, channel, s) = auth::listen(&mut r, &mut w, &self.key)?;
                if role != Role::Source {
                    let _ = w.send(&Message::Shut {
                        reason: ShutReason::Error,
                        detail: "a migration destination talks to sources only".into(),
                    });
                    return Err(Error::Protocol("a non-source connected".into()));
                }
                if session.is_some_and(|x| x != s) {
                    let _ = w.send(&Message::Shut {
                        reason: ShutReason::Error,
                        detail: "another migration is in progress here".into(),
                    });
                    return Err(Error::Protocol("a second session connected".into()));
                }
                Ok((Conn { r, w, cut }, channel, s))
            })();
            // A failed attempt is that connection's problem only.
            let Ok((conn, channel, s)) = attempt else {
                continue;
            };
            session = Some(s);
            match channel {
                Channel::Main => main = Some(conn),
                Channel::Urgent => urgent = Some(conn),
            }
            if main.is_some() && urgent.is_some() {
                let (m, u) = (main.take().expect("main"), urgent.take().expect("urgent"));
                return Ok((m, u, s));
            }
        }
    }

    /// Runs the destination to the end. `on_run` is called at RUN with the memory (start
    /// the workload there; it runs while pages are still arriving).
    ///
    /// A broken connection after RUN pauses (the pager keeps the workload's faults waiting)
    /// until the source reconnects, or fails after [`Timing::give_up_after`]. If the
    /// migration fails after RUN, the memory is left mapped (the workload may still use
    /// it) and, with the pager gone, pages that never arrived read as zero.
    pub fn run(self, on_run: impl FnOnce(RunningMemory)) -> Result<DestReport, Error> {
        let t = self.opts.timing;
        let ctl = self.control.clone();
        let (mut main, mut urgent, session) =
            self.accept_pair(None, Instant::now() + t.give_up_after)?;
        let advise = match main.r.recv()? {
            Message::Advise(a) => a,
            other => return Err(Error::Protocol(format!("expected ADVISE, got {other:?}"))),
        };
        ctl.set_phase(DestPhase::Advise);
        let (ps, pages) = check_advise(&advise)?;
        let limits = Limits::default().advised(&advise);
        main.r.limits = limits;
        urgent.r.limits = limits;
        let len = ps * pages as usize;
        let kind = if ps == 4096 {
            MemoryKind::Anon
        } else {
            uffd_core::hugetlb::ensure_free(pages as usize).map_err(|e| {
                Error::Fatal(format!("{pages} free 2 MiB huge pages are needed: {e}"))
            })?;
            // Private: MADV_DONTNEED (DISCARD) really drops a private page, where a shared
            // hugetlb mapping would keep it in its page cache and never fault.
            MemoryKind::HugetlbPrivate
        };
        let memory = Mapping::new(kind, len)?;
        let base = memory.addr();
        main.w.send(&Message::Ack { seq: 0 })?;

        // Precopy: copy in, zero, discard.
        // The page states the pager will run with, written as precopy goes.
        let states = PageStateMap::new(pages as usize);
        // Drops pages: a private mapping's MADV_DONTNEED frees them (they read as zero
        // and, once registered, fault).
        let drop_pages = |r: PageRange| -> Result<std::ops::Range<usize>, Error> {
            let (first, count) = (r.first as usize, r.count as usize);
            memory.madvise(first * ps, count * ps, libc::MADV_DONTNEED)?;
            Ok(first..first + count)
        };
        let mut discarded = 0;
        loop {
            match main.r.recv()? {
                Message::Pages { first, data } => {
                    // SAFETY: the decoder checked first + n <= pages against the advise; the
                    // mapping is ours and not yet shared with any other thread.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data.as_ptr(),
                            (base + first as usize * ps) as *mut u8,
                            data.len(),
                        )
                    };
                    let n = (data.len() / ps) as u64;
                    states.mark_received_range(first as usize, (first + n) as usize)?;
                    ctl.precopy_pages.fetch_add(n, Ordering::Relaxed);
                }
                // Known zero: a fault there gets a zero page locally, nothing is fetched
                // (and nothing is placed now, which would cost one ioctl per page of
                // downtime).
                Message::ZeroRun(r) => {
                    let pages = drop_pages(r)?;
                    states.mark_zero_range(pages.start, pages.end)?;
                }
                Message::Discard { ranges } => {
                    for r in ranges {
                        let pages = drop_pages(r)?;
                        // Setup, nothing runs yet: a page sent as zero goes through
                        // Received (zero → received → missing are both legal).
                        states.mark_received_range(pages.start, pages.end)?;
                        states.discard_range(pages.start, pages.end)?;
                        discarded += r.count;
                    }
                }
                Message::Listen => break,
                Message::Ping { seq } => main.w.send(&Message::Pong { seq })?,
                Message::Shut { detail, .. } => {
                    return Err(Error::Fatal(format!("the source cancelled: {detail}")))
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected {other:?} before LISTEN"
                    )))
                }
            }
        }

        // LISTEN: register and start the pager with what precopy brought.
        let remote = Arc::new(Remote {
            base,
            len: len as u64,
            ps,
            started: Instant::now(),
            urgent: Mutex::new(None),
            asked: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            requested: AtomicU64::new(0),
        });
        let uffd = Uffd::builder()
            .non_blocking(true)
            .require(UffdFeatures::EVENT_REMOVE)
            .open()?;
        let pager = Pager::builder(uffd, remote.clone())
            .region(RegionSpec::new(base, len, kind, 0))
            .mode(self.opts.mode)
            .prefetch(Prefetch::None)
            .states(states)
            .start()?;
        let placer = pager.placer();
        *remote.urgent.lock().unwrap_or_else(|p| p.into_inner()) = Some(urgent.w);
        ctl.set_phase(DestPhase::Listen);
        main.w.send(&Message::Ack { seq: 1 })?;
        match main.r.recv()? {
            Message::Run => {}
            other => return Err(Error::Protocol(format!("expected RUN, got {other:?}"))),
        }
        on_run(RunningMemory {
            base,
            len,
            page_size: ps,
        });
        let run_at = Instant::now();
        ctl.set_phase(DestPhase::Running);
        // A failed send here shows up as a broken session below.
        let _ = main.w.send(&Message::Ack { seq: 2 });

        // RUNNING, resumed after every broken connection.
        let hist = AtomicLatencyHistogram::default();
        let mut complete_at = None;
        let (mut urgent_r, mut urgent_cut) = (urgent.r, urgent.cut);
        let running = (|| -> Result<String, Error> {
            loop {
                match self.session(
                    &mut main,
                    &mut urgent_r,
                    &urgent_cut,
                    &placer,
                    &pager,
                    &remote,
                    &hist,
                    &mut complete_at,
                ) {
                    Ok(verdict) => return Ok(verdict),
                    Err(e @ (Error::Fatal(_) | Error::Mismatch { .. })) => return Err(e),
                    Err(_) => {}
                }
                // Paused until a reconnection gets through the re-plan.
                ctl.set_phase(DestPhase::Paused);
                loop {
                    *remote.urgent.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    let (mut m, mut u, _) =
                        self.accept_pair(Some(session), Instant::now() + t.give_up_after)?;
                    m.r.limits = limits;
                    u.r.limits = limits;
                    // What we have (placed, or zero here); the source sends the rest.
                    let words = pager.states().export_present();
                    let outstanding: Vec<PageRange> = (pager.states().iter().enumerate())
                        .filter(|(_, s)| *s == PageState::Requested)
                        .map(|(i, _)| PageRange {
                            first: i as u64,
                            count: 1,
                        })
                        .collect();
                    if m.w.send(&Message::RecvBitmap { words }).is_err() {
                        continue;
                    }
                    *remote.urgent.lock().unwrap_or_else(|p| p.into_inner()) = Some(u.w);
                    // Outstanding requests again, once the new writer is in place: a fault
                    // racing this either sent on the new writer or was Requested above (a
                    // duplicate request is answered twice and placed once).
                    for chunk in outstanding.chunks(1024) {
                        remote.ask(chunk.to_vec());
                    }
                    (main, urgent_r, urgent_cut) = (m, u.r, u.cut);
                    ctl.reconnects.fetch_add(1, Ordering::Relaxed);
                    ctl.set_phase(DestPhase::Running);
                    break;
                }
            }
        })();
        let verdict = match running {
            Ok(v) => v,
            Err(e) => {
                // The workload may still be using the memory: leave it mapped. With the
                // pager gone, pages that never arrived read as zero.
                drop(pager);
                let _ = memory.leak();
                return Err(e);
            }
        };
        ctl.set_phase(DestPhase::End);
        let postcopy = complete_at
            .unwrap_or(run_at)
            .saturating_duration_since(run_at);
        let stats = pager.stop()?;
        Ok(DestReport {
            memory,
            page_size: ps,
            pages,
            precopy_pages: ctl.precopy_pages.load(Ordering::Relaxed),
            discarded,
            postcopy_pages: ctl.postcopy_pages.load(Ordering::Relaxed),
            requested: remote.requested.load(Ordering::Relaxed),
            blocktime: hist.snapshot().sum(),
            latency: hist.snapshot(),
            reconnects: ctl.reconnects.load(Ordering::Relaxed),
            postcopy,
            pager: stats,
            verdict,
        })
    }

    /// Receives on one connection pair until the source's verdict (Ok) or a break (Err).
    #[allow(clippy::too_many_arguments)]
    fn session(
        &self,
        main: &mut Conn,
        urgent_r: &mut FrameReader,
        urgent_cut: &Stream,
        placer: &Placer,
        pager: &Pager,
        remote: &Remote,
        hist: &AtomicLatencyHistogram,
        complete_at: &mut Option<Instant>,
    ) -> Result<String, Error> {
        let ctl = &*self.control;
        let ps = remote.ps;
        let pages = (remote.len / ps as u64) as usize;
        let _ = main
            .cut
            .set_timeouts(None, Some(self.opts.timing.io_timeout));
        let _ = urgent_cut.set_timeouts(None, Some(self.opts.timing.io_timeout));
        let broken = AtomicBool::new(false);
        let main_cut = &main.cut;
        let cut = || {
            broken.store(true, Ordering::Relaxed);
            main_cut.shutdown();
            urgent_cut.shutdown();
        };
        // Requested pages that are now present: their latency, request → arrival.
        let arrived = |first: u64, count: u64| {
            let now = remote.started.elapsed().as_nanos() as u64 + 1;
            for p in first..first + count {
                let asked = remote.asked[p as usize].swap(0, Ordering::Relaxed);
                if asked != 0 {
                    hist.record(Duration::from_nanos(now.saturating_sub(asked)));
                }
            }
        };
        let stopped = || Error::Fatal("the pager stopped".into());
        let place = |first: u64, data: Option<&[u8]>, count: u64| -> Result<(), Error> {
            match data {
                Some(d) => {
                    let n = placer
                        .place_run(first * ps as u64, d)?
                        .ok_or_else(stopped)?;
                    ctl.postcopy_pages.fetch_add(n as u64, Ordering::Relaxed);
                }
                None => {
                    for p in first..first + count {
                        match placer.place(p * ps as u64, None)? {
                            pager::Placed::Placed => {
                                ctl.postcopy_pages.fetch_add(1, Ordering::Relaxed);
                            }
                            pager::Placed::Duplicate => {}
                            pager::Placed::NoRegion | pager::Placed::Stopped => {
                                return Err(stopped())
                            }
                        }
                    }
                }
            }
            arrived(first, count);
            Ok(())
        };
        // Ok(detail) when the source says the migration is done and verified.
        let receive = |r: &mut FrameReader,
                       on_end: &mut dyn FnMut() -> Result<(), Error>|
         -> Result<String, Error> {
            loop {
                let msg = match r.recv_frame()? {
                    Frame::Pages { first, data } => {
                        place(first, Some(data), (data.len() / ps) as u64)?;
                        None
                    }
                    Frame::Other(msg) => Some(msg),
                };
                match msg {
                    None => {}
                    Some(Message::ZeroRun(z)) => place(z.first, None, z.count)?,
                    Some(Message::End) => on_end()?,
                    Some(Message::Pong { .. } | Message::Ack { .. }) => {}
                    Some(Message::Shut { reason, detail }) => {
                        return match reason {
                            ShutReason::Done => Ok(detail),
                            _ => Err(Error::Fatal(format!(
                                "the source shut the migration: {detail}"
                            ))),
                        }
                    }
                    Some(other) => {
                        return Err(Error::Protocol(format!("unexpected {other:?} in postcopy")))
                    }
                }
                if let Some(pause) = ctl.take_stall() {
                    std::thread::sleep(pause);
                }
            }
        };
        std::thread::scope(|s| {
            let urgent_t = s.spawn(|| {
                let r = receive(urgent_r, &mut || {
                    Err(Error::Protocol("END on the urgent channel".into()))
                });
                // A clean close is the source finishing (or dying: main sees that too).
                if !matches!(r, Err(Error::Closed)) {
                    cut();
                }
                r
            });
            let main_result: Result<String, Error> = {
                let (mr, mw) = (&mut main.r, &mut main.w);
                let mut on_end = || -> Result<(), Error> {
                    // Wait for the last placements (urgent answers may still be in flight).
                    while count_missing(pager) > 0 {
                        if broken.load(Ordering::Relaxed) {
                            return Err(Error::Closed);
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    complete_at.get_or_insert_with(Instant::now);
                    for first in (0..pages).step_by(DIGESTS_PER_FRAME) {
                        let n = DIGESTS_PER_FRAME.min(pages - first);
                        let digests = (first..first + n)
                            // SAFETY: every page is present now; the mapping lives as
                            // long as the report.
                            .map(|p| unsafe { digest_raw((remote.base + p * ps) as *const u8, ps) })
                            .collect();
                        mw.send(&Message::Digests {
                            first: first as u64,
                            digests,
                        })?;
                    }
                    Ok(())
                };
                receive(mr, &mut on_end)
            };
            if main_result.is_ok() {
                broken.store(true, Ordering::Relaxed);
                main_cut.shutdown();
                urgent_cut.shutdown();
            } else {
                cut();
            }
            let urgent_result = urgent_t.join().unwrap_or(Err(Error::Closed));
            match main_result {
                Ok(v) => Ok(v),
                Err(e @ (Error::Fatal(_) | Error::Mismatch { .. })) => Err(e),
                Err(e) => Err(match urgent_result {
                    Err(u @ Error::Fatal(_)) => u,
                    _ => e,
                }),
            }
        })
    }
}

fn count_missing(pager: &Pager) -> usize {
    pager.states().count(PageState::Missing) + pager.states().count(PageState::Requested)
}

fn check_advise(a: &Advise) -> Result<(usize, u64), Error> {
    let ps = a.page_size as usize;
    if ps != 4096 && ps != uffd_core::HUGE_PAGE_SIZE {
        return Err(Error::Protocol(format!("unsupported page size {ps}")));
    }
    if a.page_count == 0
        || a.regions.len() != 1
        || a.regions[0].first_page != 0
        || a.regions[0].pages != a.page_count
    {
        return Err(Error::Protocol(
            "a migration destination takes one region covering every page".into(),
        ));
    }
    if a.page_count
        .checked_mul(ps as u64)
        .is_none_or(|b| b > 1 << 46)
    {
        return Err(Error::Protocol(format!(
            "{} pages is too large",
            a.page_count
        )));
    }
    Ok((ps, a.page_count))
}
