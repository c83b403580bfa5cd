//! The sending half, written once: a page server's sessions and the migration source
//! both push pages through it. It frames page data and zero runs, answers urgent requests
//! at once (moving the stream's cursor just past them: spatial locality), and streams what
//! is still needed, in order from that cursor, over page-state's [`Bitmap`].
//!
//! A requested page is answered on the urgent connection even when the stream sent it
//! already: the stream's copy may sit behind megabytes in the main connection's buffers
//! and the receiver's, milliseconds away, while the faulting thread waits. QEMU skips such
//! a page (it is not dirty any more); here they were skipped too, and they made most of the
//! fault latency's tail under a saturating stream (netbench's p99 ~1.5 ms, 0.3–0.5 ms
//! since: README, "The network data path"). The receiver places whichever copy
//! lands first and drops the other (the content is the same: frozen memory, or an image).
//! Only a page answered before on the same pair is not sent again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use page_state::Bitmap;

use crate::error::LinkError;
use crate::link::{Chan, Cutter, Failing, Inbound, Messages};
use crate::net::SendMessage;
use crate::wire::{Frame, Message, PageRange};
use crate::Error;

/// Bytes of page data per PAGES frame (at least one page): a 2 MiB block, and frames are
/// cut on block boundaries (pages `k * per_frame..`), so that a receiver whose memory is
/// aligned alike can move each whole block into place as one huge page
/// (`Receiver::move_blocks`).
const FRAME_BYTES: usize = 2 << 20;

/// The stream's first frames on a pair (at least one page), doubled per quick send up to
/// [`FRAME_BYTES`]: a frame lands whole or not at all, and on a slow link what the kernel's
/// buffers took at once sits ahead of everything after it, so the first frames must be
/// small for some of them to land early (a receiver holding more pages at the next
/// greeting is the source's only sign of postcopy progress).
const FIRST_FRAME_BYTES: usize = 64 << 10;

/// Where a sender's pages come from: the page server's image (a [`pager::Source`] behind
/// it, adapted in `server.rs`) or the migration source's live memory (read in place: the
/// migration source does not use the pager at all, it has no faults to serve).
///
/// Why not [`pager::Source`] itself: that trait is the fault side's, and most of it has no
/// meaning for a sender — a sender must have every page it is asked for at once (a
/// `Pending` answer, `attach`, `prioritize` and forked children are the fault loop's), and
/// it reads runs of pages by page index of one advised geometry, never byte offsets of an
/// image. This is the two methods a sender needs.
pub(crate) trait Pages: Send + Sync {
    /// Bytes per page, and pages in all.
    fn geometry(&self) -> (usize, u64);
    /// Pages `first..first + count` (`count * page_size <= scratch.len()`), in `scratch` or
    /// borrowed; `None` when they are known to be all zero.
    fn read<'a>(
        &'a self,
        first: u64,
        count: u64,
        scratch: &'a mut [u8],
    ) -> Result<Option<&'a [u8]>, Error>;
}

/// Counters of what a sender sent.
#[derive(Debug, Default)]
pub struct SendStats {
    /// Pages pushed by the background stream.
    pub stream_pages: AtomicU64,
    /// Pages sent because they were requested.
    pub urgent_pages: AtomicU64,
    /// REQ_PAGES messages answered.
    pub requests: AtomicU64,
    /// Requested pages not sent again: answered before on this connection pair (a second
    /// request for a page on its way).
    pub already_sent: AtomicU64,
    /// Requested pages answered that were no longer needed: nearly always the stream had
    /// sent them on this pair already, its copy still behind the main connection's
    /// backlog as far as the request could tell (the receiver drops whichever copy lands
    /// second); else the destination had reported them held when the pair began.
    pub resent: AtomicU64,
    /// Pages that went as zero runs (no data).
    pub zero_pages: AtomicU64,
    /// Page data bytes sent (stream and requests).
    pub bytes: AtomicU64,
}

/// Relaxed: counters and the cursor are statistics and a position hint only.
const STAT: Ordering = Ordering::Relaxed;

/// One session's sending half.
pub(crate) struct Sender {
    pages: Arc<dyn Pages>,
    ps: usize,
    count: u64,
    per_frame: u64,
    /// Pages the stream still has to push (requests clear them too).
    pub need: Bitmap,
    /// Pages answered on the current connection pair: on their way on its urgent
    /// connection, so a request for one is not answered again (see [`Sender::new_pair`]).
    answered: Bitmap,
    cursor: AtomicU64,
    answering: AtomicBool,
    /// Whether `need` holds this pair's plan ([`Sender::planned`]); read and written under
    /// `urgent_scratch`'s lock.
    planned: AtomicBool,
    /// Held by each answer, and by [`Sender::planned`]: no answer runs between a plan's
    /// store and the removal of what was answered before it.
    urgent_scratch: Mutex<Vec<u8>>,
    stats: Arc<SendStats>,
    #[cfg(feature = "fault-injection")]
    pub faults: Arc<crate::fault::Faults>,
}

impl Sender {
    /// A sender of `pages`, counting into `stats`; nothing needed yet, requests refused
    /// until [`Sender::answer_requests`].
    pub fn new(pages: Arc<dyn Pages>, stats: Arc<SendStats>) -> Sender {
        let (ps, count) = pages.geometry();
        let per_frame = (FRAME_BYTES / ps).max(1) as u64;
        Sender {
            need: Bitmap::new(count as usize),
            answered: Bitmap::new(count as usize),
            cursor: AtomicU64::new(0),
            answering: AtomicBool::new(false),
            planned: AtomicBool::new(false),
            urgent_scratch: Mutex::new(vec![0; per_frame as usize * ps]),
            pages,
            ps,
            count,
            per_frame,
            stats,
            #[cfg(feature = "fault-injection")]
            faults: Default::default(),
        }
    }

    /// A new connection pair begins (the last one is gone, its threads joined): nothing is
    /// on its way any more.
    pub fn new_pair(&self) {
        let _answers = self
            .urgent_scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.planned.store(false, STAT);
        self.answered.clear_all();
    }

    /// `need` now holds the pair's plan (stored from the peer's RECV_BITMAP): the pages
    /// answered on this pair before it are on their way, so not needed again, and from
    /// now on a requested page no longer needed counts as resent (before, `need` said
    /// nothing of what the peer holds).
    pub fn planned(&self) {
        let _answers = self
            .urgent_scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for run in self.answered.runs() {
            for p in run {
                self.need.clear(p);
            }
        }
        self.planned.store(true, STAT);
    }

    /// Answers REQ_PAGES from now on (before, a request is an unexpected message).
    pub fn answer_requests(&self) {
        self.answering.store(true, Ordering::Release);
    }

    /// A buffer of one frame's pages, for [`Sender::send`].
    pub fn scratch(&self) -> Vec<u8> {
        vec![0; self.per_frame as usize * self.ps]
    }

    /// Sends pages `first..first + count` on `chan` as PAGES and ZERO_RUN frames of at
    /// most a frame's worth each, cut on frame boundaries, taking the writer per frame
    /// (heartbeats and other senders get their turn); returns the data bytes sent.
    pub fn send(
        &self,
        chan: &Chan,
        first: u64,
        count: u64,
        scratch: &mut [u8],
    ) -> Result<u64, Error> {
        let (end, mut p, mut bytes) = (first + count, first, 0);
        while p < end {
            let n = (end - p).min(self.per_frame - p % self.per_frame);
            let data = self.pages.read(p, n, scratch)?;
            let mut w = chan.writer();
            let sent = match data {
                Some(data) => w.send_page_data(p, data, self.ps)?,
                None => {
                    w.send(&Message::ZeroRun(PageRange { first: p, count: n }))?;
                    0
                }
            };
            drop(w);
            #[cfg(feature = "fault-injection")]
            self.faults
                .event(crate::fault::Event::PageFrame(chan.channel));
            self.stats
                .zero_pages
                .fetch_add(n - sent / self.ps as u64, STAT);
            bytes += sent;
            p += n;
        }
        Ok(bytes)
    }

    /// Answers one REQ_PAGES on the connection it came on, with the requested pages not
    /// answered on this pair yet, whether the stream sent them or not (see the module
    /// docs).
    fn answer(&self, chan: &Chan, ranges: &[PageRange]) -> Result<(), Error> {
        self.stats.requests.fetch_add(1, STAT);
        let mut scratch = self
            .urgent_scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for r in ranges {
            let end = (r.first + r.count).min(self.count);
            let mut p = r.first;
            while p < end {
                // Only what was not answered on this pair yet: that is on its way here.
                if self.answered.set(p as usize) {
                    self.stats.already_sent.fetch_add(1, STAT);
                    p += 1;
                    continue;
                }
                let first = p;
                p += 1;
                while p < end && !self.answered.set(p as usize) {
                    p += 1;
                }
                let (mut resent, planned) = (0, self.planned.load(STAT));
                for q in first..p {
                    if !self.need.clear(q as usize) && planned {
                        resent += 1; // the stream took it
                    }
                }
                self.stats.resent.fetch_add(resent, STAT);
                let b = self.send(chan, first, p - first, &mut scratch)?;
                self.stats.bytes.fetch_add(b, STAT);
                self.stats.urgent_pages.fetch_add(p - first, STAT);
            }
            // The stream goes on just after the requested page.
            self.cursor.store(end % self.count, STAT);
        }
        Ok(())
    }

    /// Pushes every needed page on `chan` in order from the cursor (with `push` off,
    /// only waits for requests to take them all: demand-only), then sends END (then
    /// `Ok`); returns early once the pair is cut. Frames start at [`FIRST_FRAME_BYTES`],
    /// double after each send quicker than a sixteenth of `silence` and halve after one
    /// slower than a quarter of it (on a fast link the first 2 MiB block goes in six frames,
    /// the rest as whole blocks): a frame is one send, which the link cuts once
    /// it takes longer than `silence`, however the socket trickles. A broken link cuts the
    /// pair (its cause becomes the pair's); any other failure (a page that cannot be read)
    /// goes to the phase logic through `failing`, the pair left up for it to tell the peer
    /// why.
    pub fn stream(
        &self,
        (chan, cutter): (&Chan, &Cutter),
        failing: &Failing,
        push: bool,
        silence: Duration,
    ) -> Result<(), Error> {
        match self.push(chan, cutter, push, silence) {
            Err(Error::Link(e)) => {
                cutter.cut(e);
                Err(LinkError::Cut.into())
            }
            Err(e) => {
                failing.fail(e);
                Err(LinkError::Cut.into())
            }
            Ok(()) => Ok(()),
        }
    }

    fn push(
        &self,
        chan: &Chan,
        cutter: &Cutter,
        push: bool,
        silence: Duration,
    ) -> Result<(), Error> {
        let mut scratch = self.scratch();
        // Pages per frame now: a power of two, so frames stay on block boundaries.
        let first_frame = (FIRST_FRAME_BYTES / self.ps).max(1) as u64;
        let mut per_frame = first_frame.next_power_of_two().min(self.per_frame);
        loop {
            if cutter.is_cut() {
                return Err(LinkError::Cut.into());
            }
            #[cfg(feature = "fault-injection")]
            self.inject(chan)?;
            let at = self.cursor.load(STAT) as usize;
            let Some(first) = self.need.next_set_wrapping(at) else {
                break;
            };
            if !push {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let first = first as u64;
            // Up to the next frame boundary (see `FRAME_BYTES`).
            let frame = per_frame - first % per_frame;
            let mut n = 0;
            while n < frame && first + n < self.count && self.need.clear((first + n) as usize) {
                n += 1;
            }
            if n == 0 {
                continue; // a request took it meanwhile
            }
            self.cursor.store((first + n) % self.count, STAT);
            let began = std::time::Instant::now();
            let b = self.send(chan, first, n, &mut scratch)?;
            let took = began.elapsed();
            if took > silence / 4 {
                per_frame = (per_frame / 2).max(1);
            } else if took < silence / 16 {
                per_frame = (per_frame * 2).min(self.per_frame);
            }
            self.stats.bytes.fetch_add(b, STAT);
            self.stats.stream_pages.fetch_add(n, STAT);
        }
        chan.send(&Message::End)?;
        Ok(())
    }

    #[cfg(feature = "fault-injection")]
    fn inject(&self, chan: &Chan) -> Result<(), Error> {
        use crate::fault::Fault;
        let sent = self.stats.stream_pages.load(STAT) + self.stats.urgent_pages.load(STAT);
        match self.faults.due(sent) {
            Some(Fault::Cut) => Err(LinkError::Cut.into()),
            Some(Fault::HalfFrame) => {
                let mut frame = Vec::new();
                let data = vec![0xa5; self.ps];
                crate::wire::encode(&Message::Pages { first: 0, data }, &mut frame);
                let _ = chan.writer().write_raw(&frame[..frame.len() / 2]);
                Err(LinkError::Cut.into())
            }
            _ => Ok(()),
        }
    }
}

impl Inbound for Sender {
    fn frame(&self, chan: &Chan, frame: Frame<'_>) -> Result<Option<Message>, Error> {
        match frame {
            Frame::Other(Message::ReqPages { ranges })
                if self.answering.load(Ordering::Acquire) =>
            {
                self.answer(chan, &ranges)?;
                Ok(None)
            }
            other => Ok(Some(other.into_owned())),
        }
    }
}
