//! The receiving half, written once: a page server's restore client and the migration
//! destination both take pages through it. It lands what arrives on either connection —
//! copied into fresh memory before a pager runs (precopy), placed through the pager's
//! [`Placer`] after — asks for faulted pages on the urgent connection without allocating
//! (a fault handler calls it; see pager's worker docs on fork), and on every new
//! connection pair reports what is present (RECV_BITMAP) and asks again for the pages
//! still outstanding.
//!
//! **Only the greeted pair lands.** A receiver lands frames only from the pair it greeted
//! last (its epoch, the newest): greeting takes the landing lock for writing, so once a
//! newer pair is greeted no frame of an older one is being landed or ever will be —
//! whatever a superseded connection still delivers is refused and counted
//! ([`RecvStats::stale_frames`]), never applied over what the newer pair brought. It also
//! confirms precopy: SYNC is answered with SYNCED once every frame before it on the same
//! connection has landed (frames land in order, on the reading thread). DISCARD lands
//! there too, in the same order, so a SYNCED after a DISCARD confirms that it was applied:
//! the migration source discards most pages before it stops its workload, and waits for
//! that confirmation, so that little is left to drop in the downtime.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pager::{Fetched, Helper, PageState, Source, SourceError};

use crate::error::unexpected;
use crate::link::{Chan, Inbound, Messages, Pair};
use crate::net::{Conn, RecvMessage, SendMessage};
use crate::wire::{Advise, Channel, Frame, Message, PageRange};
use crate::Error;

pub(crate) use super::land::{Land, OnLand};
use super::RecvStats;

mod landing;

/// The sender's ADVISE, first on every main connection.
pub(crate) fn read_advise(main: &mut Conn) -> Result<Advise, Error> {
    match main.r.recv()? {
        Message::Advise(a) => Ok(a),
        other => Err(unexpected(other, "ADVISE", Channel::Main)),
    }
}

/// Relaxed: counters and timestamps that only feed statistics.
const STAT: Ordering = Ordering::Relaxed;

/// One session's receiving half (it outlives connection pairs).
pub(crate) struct Receiver {
    ps: usize,
    /// Where pages land. Read-locked while a frame lands; write-locked to change the
    /// land or the epoch.
    land: RwLock<Land>,
    /// The epoch of the pair greeted last: the only pair whose frames land. Written
    /// under `land`'s write lock, read under its read lock (the lock orders it: Relaxed).
    greeted: AtomicU64,
    urgent: Mutex<Option<Arc<Chan>>>,
    pages: u64,
    stats: Arc<RecvStats>,
    /// Told of every page landed (set once, before the receiver is shared).
    pub on_land: Option<Arc<dyn OnLand>>,
    /// Lands runs of pages in pieces on two threads.
    helper: Helper,
    /// Whole 2 MiB blocks of arriving pages are moved into place rather than copied
    /// ([`Receiver::move_blocks`]).
    moves: AtomicBool,
    #[cfg(feature = "fault-injection")]
    pub faults: Arc<crate::fault::Faults>,
}

impl Receiver {
    /// A receiver of `pages` pages of `ps` bytes landing into `land`, counting into
    /// `stats`.
    pub fn new(ps: usize, pages: u64, land: Land, stats: Arc<RecvStats>) -> Receiver {
        Receiver {
            ps,
            land: RwLock::new(land),
            greeted: AtomicU64::new(0),
            urgent: Mutex::new(None),
            pages,
            stats,
            on_land: None,
            helper: Helper::new("land-helper"),
            moves: AtomicBool::new(false),
            #[cfg(feature = "fault-injection")]
            faults: Default::default(),
        }
    }

    fn land(&self) -> std::sync::RwLockReadGuard<'_, Land> {
        self.land.read().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, moves PAGES frames' whole 2 MiB blocks into place (`UFFDIO_MOVE`) out
    /// of the reader's buffer, rather than copy them, where the frame's body was read
    /// aligned (`FrameReader::align_bodies`) and every page of the block is still to be
    /// placed. For a pager whose memory is private anonymous memory on 2 MiB boundaries
    /// and whose userfaultfd can move pages: the blocks then land as transparent huge
    /// pages, and nothing copies the bytes after `recv`.
    pub fn move_blocks(&self) {
        self.moves.store(true, Ordering::Relaxed);
    }

    /// Replaces where pages land; returns the old one.
    pub fn set_land(&self, land: Land) -> Land {
        let mut l = self.land.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *l, land)
    }

    /// Asks for pages `first..first + count` on the urgent connection, or, while there
    /// is none (paused), only remembers them: they stay Requested and are asked again
    /// on the next pair. Called by fault handlers: allocates nothing, and its locks are
    /// held only by our own threads, never across an allocation.
    pub fn request(&self, first: u64, count: u64) {
        self.stats.requested.fetch_add(count, STAT);
        let urgent = self.urgent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(chan) = urgent.as_ref() {
            chan.request(&[PageRange { first, count }]);
        }
    }

    /// Sets (or, with `None`, drops) the connection requests go to. The old one is
    /// dropped outside the lock: a fault handler never waits on a deallocation.
    fn set_urgent(&self, chan: Option<Arc<Chan>>) {
        let old = std::mem::replace(
            &mut *self.urgent.lock().unwrap_or_else(|p| p.into_inner()),
            chan,
        );
        drop(old);
    }

    /// Pauses requests (the pair broke).
    pub fn pause(&self) {
        self.set_urgent(None);
    }

    /// Greets a new pair: RECV_BITMAP (what is present here), then ACK `step` if given,
    /// on main; then requests go to its urgent connection, and the pages still
    /// outstanding are asked for again.
    pub fn greet(&self, pair: &Pair, step: Option<u64>) -> Result<(), Error> {
        {
            // The write lock waits out any frame of an older pair being landed; every
            // later landing sees the new epoch.
            let _landing = self.land.write().unwrap_or_else(|p| p.into_inner());
            self.greeted.fetch_max(pair.epoch, Ordering::Relaxed);
        }
        pair.main.send(&Message::RecvBitmap {
            words: self.present(),
        })?;
        if let Some(seq) = step {
            pair.main.send(&Message::Ack { seq })?;
        }
        // Requests go to the new pair before the scan for outstanding ones: a fault
        // racing this either sends on the new pair or is Requested when scanned (a page
        // asked twice is answered twice and placed once).
        self.set_urgent(Some(pair.urgent.clone()));
        let outstanding = self.outstanding();
        for chunk in outstanding.chunks(200) {
            pair.urgent.writer().request(chunk)?;
        }
        if !outstanding.is_empty() {
            log::info!(
                "asked again for {} outstanding page run(s)",
                outstanding.len()
            );
        }
        Ok(())
    }

    /// The present pages (received, or known zero) as bitmap words.
    fn present(&self) -> Vec<u64> {
        match &*self.land() {
            Land::Copy { states, .. } => states.export_present(),
            Land::Place(placer) => placer.states(|s| s.export_present()).unwrap_or_default(),
            Land::Idle => vec![0; self.pages.div_ceil(64) as usize],
        }
    }

    /// Runs of pages asked for and not yet placed.
    fn outstanding(&self) -> Vec<PageRange> {
        let Land::Place(placer) = &*self.land() else {
            return Vec::new();
        };
        let runs = placer.states(|s| s.runs(PageState::Requested));
        let range = |r: std::ops::Range<usize>| PageRange {
            first: r.start as u64,
            count: r.len() as u64,
        };
        runs.into_iter().flatten().map(range).collect()
    }

    /// Pages not yet present (missing or requested); `None` if nothing lands yet or
    /// the pager is gone.
    pub fn missing(&self) -> Option<usize> {
        let count =
            |s: pager::PageStates<'_>| s.count(PageState::Missing) + s.count(PageState::Requested);
        match &*self.land() {
            Land::Place(placer) => placer.states(count),
            _ => None,
        }
    }

    /// Waits until every page is present, the pair breaks, or `limit` passes (then the
    /// pair is cut: what is missing is asked for on the next one).
    pub fn wait_complete(&self, pair: &Pair, limit: Duration) -> Result<(), Error> {
        let until = Instant::now() + limit;
        while self.missing().ok_or(Error::PagerStopped)? > 0 {
            if Instant::now() > until {
                let after = limit;
                let expected = "every page after END";
                pair.cut(crate::error::LinkError::NoAnswer { expected, after });
            }
            // Nothing but pages may come before every page is here.
            if let Some((channel, msg)) = pair.next_within(Duration::from_millis(2))? {
                return Err(crate::error::unexpected(msg, "pages", channel));
            }
        }
        Ok(())
    }

    /// Whether a frame that came on `chan` may land: its pair is the one greeted last.
    /// A frame of an older pair is counted and ends that pair (superseded); one of a pair
    /// not greeted yet breaks the protocol (nothing but RECV_BITMAP's answer may follow
    /// a greeting). Call with `land` read-locked.
    fn current(&self, chan: &Chan, what: &'static str) -> Result<(), Error> {
        let greeted = self.greeted.load(Ordering::Relaxed);
        match chan.pair_epoch.cmp(&greeted) {
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Less => {
                self.stats.stale_frames.fetch_add(1, STAT);
                log::warn!(
                    "refused {what} from a superseded connection pair (epoch {} < {greeted})",
                    chan.pair_epoch
                );
                Err(crate::error::LinkError::Superseded.into())
            }
            std::cmp::Ordering::Greater => Err(Error::Unexpected {
                expected: "nothing before this side's RECV_BITMAP",
                got: what,
                channel: chan.channel,
            }),
        }
    }
}

/// The receiver is the pager's source at a destination: a fault asks and returns at once.
impl Source for Receiver {
    fn len(&self) -> u64 {
        self.pages * self.ps as u64
    }

    /// Asks for the pages ([`Receiver::request`]: allocation-free) and answers Pending.
    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let count = (scratch.len() / self.ps).max(1) as u64;
        self.request(offset / self.ps as u64, count);
        Ok(Fetched::Pending)
    }
}

impl Inbound for Receiver {
    fn asks_for_pages(&self) -> bool {
        true
    }

    fn pages(
        &self,
        chan: &Chan,
        first: u64,
        data: &mut [u8],
        spare: &mut [u8],
    ) -> Result<Option<Message>, Error> {
        match self.land_moving(chan, first, data, spare) {
            Some(landed) => landed?,
            None => self.land_pages(chan, first, (data.len() / self.ps) as u64, Some(data))?,
        }
        self.landed_frame();
        Ok(None)
    }

    fn frame(&self, chan: &Chan, frame: Frame<'_>) -> Result<Option<Message>, Error> {
        match frame {
            Frame::Pages { first, data } => {
                let count = (data.len() / self.ps) as u64;
                self.land_pages(chan, first, count, Some(data))?;
            }
            Frame::Other(Message::ZeroRun(r)) => self.land_pages(chan, r.first, r.count, None)?,
            Frame::Other(Message::Discard { ranges }) => self.discard(chan, &ranges)?,
            Frame::Other(Message::Sync { seq }) => {
                // Every frame before it on this connection has landed (in order, on this
                // thread): confirm them, unless this pair was superseded meanwhile.
                let land = self.land();
                self.current(chan, "SYNC")?;
                drop(land);
                chan.send(&Message::Synced { seq })?;
            }
            Frame::Other(msg) => return Ok(Some(msg)),
        }
        self.landed_frame();
        Ok(None)
    }
}

impl Receiver {
    /// After a frame landed: a planned stall of the reader (`fault-injection`), if due.
    fn landed_frame(&self) {
        #[cfg(feature = "fault-injection")]
        if let Some(crate::fault::Fault::Stall(d)) =
            (self.faults).due(self.stats.placed.load(STAT) + self.stats.copied.load(STAT))
        {
            std::thread::sleep(d);
        }
    }
}
