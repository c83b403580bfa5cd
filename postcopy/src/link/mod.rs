//! Connection pairs that notice when they die.
//!
//! A session runs over a `Pair` of authenticated connections: *main* (control and the
//! background stream) and *urgent* (requested pages, so they never queue behind the
//! stream). While a pair lives, one thread reads each connection and one sends a PING on
//! both every [`Timing::heartbeat`]; every read and write has the [`Timing::silence`]
//! deadline. So a connection that breaks *or goes silent* (a partition: both ends
//! established, nothing flowing) is noticed on both sides within the deadline, and the
//! side that notices cuts both connections, which tells a reachable peer at once.
//!
//! Readers hand data frames to the endpoint's `Inbound` on their own thread (pages are
//! placed, requests answered, without a hop) and queue everything else for the endpoint's
//! phase logic, which reads the queue with `Pair::next`. A broken pair ends in one
//! [`LinkError`]: the first cause.
//!
//! Pairs are made by a `dial::Dialer` (with backoff, bounded) or an
//! `accept::Acceptor` (which pairs the two connections of one session generation and
//! lets a newer generation supersede the older pair).

pub(crate) mod accept;
pub(crate) mod dial;
mod forward;
mod gate;
mod sessions;

pub use sessions::AcceptStats;
pub use transport::link::{Admission, Timing};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use self::forward::Forward;
use transport::Link;

use crate::error::LinkError;
use transport::conn::{FrameReader, FrameWriter};

use crate::net::{Conn, RecvMessage, SendMessage};
use crate::wire::{Advise, Channel, Frame, Limits, Message, PageRange};
use crate::Error;

/// Pairs' epochs, increasing in the order pairs start, process-wide.
static EPOCHS: AtomicU64 = AtomicU64::new(1);

/// One connection's writing side, shared by the threads that send on it.
pub(crate) struct Chan {
    /// What it carries.
    pub channel: Channel,
    /// Its pair's epoch: a receiver lands frames only from the pair it greeted last, the
    /// newest (see `Receiver`), so nothing a superseded pair still carries is applied.
    pub pair_epoch: u64,
    writer: Mutex<FrameWriter>,
    link: Link,
    /// Where fault handlers' requests go when a write may allocate (an encrypted
    /// connection): a thread of the pair's sends them.
    forward: Option<Arc<Forward>>,
    epoch: Instant,
    /// When the send in progress began (ns since `epoch`, plus one), or 0: a send that
    /// takes longer than the silence deadline breaks the pair, however the socket
    /// trickles (a peer that stopped reading can still take a few bytes a second).
    busy_since: AtomicU64,
}

/// The writer of a [`Chan`], held for one or more frames; the send is timed while held.
pub(crate) struct Sending<'a> {
    writer: MutexGuard<'a, FrameWriter>,
    busy: &'a AtomicU64,
}

impl std::ops::Deref for Sending<'_> {
    type Target = FrameWriter;
    fn deref(&self) -> &FrameWriter {
        &self.writer
    }
}

impl std::ops::DerefMut for Sending<'_> {
    fn deref_mut(&mut self) -> &mut FrameWriter {
        &mut self.writer
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        // Relaxed: a watchdog's hint; the writer lock orders the sends themselves.
        self.busy.store(0, Ordering::Relaxed);
    }
}

impl Chan {
    fn new(
        (channel, epoch): (Channel, u64),
        writer: FrameWriter,
        link: Link,
        forward: Option<Arc<Forward>>,
    ) -> Chan {
        Chan {
            channel,
            pair_epoch: epoch,
            writer: Mutex::new(writer),
            link,
            forward,
            epoch: Instant::now(),
            busy_since: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    fn sending<'a>(&'a self, writer: MutexGuard<'a, FrameWriter>) -> Sending<'a> {
        self.busy_since.store(self.now(), Ordering::Relaxed);
        Sending {
            writer,
            busy: &self.busy_since,
        }
    }

    /// The writer, for a sequence of frames (the lock is held by our own threads only,
    /// and never across an allocation on the fault path).
    pub fn writer(&self) -> Sending<'_> {
        self.sending(self.writer.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether a send has been in progress for longer than `limit`.
    fn stalled(&self, limit: Duration) -> bool {
        let since = self.busy_since.load(Ordering::Relaxed);
        since != 0 && self.now().saturating_sub(since) > limit.as_nanos() as u64
    }

    /// Sends one message.
    pub fn send(&self, msg: &Message) -> Result<(), LinkError> {
        self.writer().send(msg)
    }

    /// Sends a heartbeat unless another thread is sending (its bytes show the link is
    /// alive, and waiting for it could starve the other connection's heartbeat).
    fn beat(&self, seq: u64) -> Result<(), LinkError> {
        let writer = match self.writer.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        self.sending(writer).send(&Message::Ping { seq })
    }

    /// Sends REQ_PAGES without allocating — on an encrypted connection, through the
    /// pair's forwarding thread; on failure shuts the connection down (its reader reports
    /// the break). For fault handlers.
    pub fn request(&self, ranges: &[PageRange]) {
        match &self.forward {
            Some(forward) => {
                if !forward.push(ranges) {
                    self.link.shutdown();
                }
            }
            None => {
                if self.writer().request(ranges).is_err() {
                    self.link.shutdown();
                }
            }
        }
    }
}

/// Cuts a pair's two connections, once, remembering the first cause.
pub(crate) struct Cutter {
    links: [Link; 2],
    cut: AtomicBool,
    cause: Mutex<Option<LinkError>>,
    wake: Condvar,
}

impl Cutter {
    pub fn new(main: &Conn, urgent: &Conn) -> std::io::Result<Arc<Cutter>> {
        Ok(Arc::new(Cutter {
            links: [main.link.try_clone()?, urgent.link.try_clone()?],
            cut: AtomicBool::new(false),
            cause: Mutex::new(None),
            wake: Condvar::new(),
        }))
    }

    /// Shuts both connections down; the first cause is the pair's.
    pub fn cut(&self, cause: LinkError) {
        let mut first = self.cause.lock().unwrap_or_else(|p| p.into_inner());
        // Relaxed: the flag is read under the same lock or only as a hint.
        if !self.cut.swap(true, Ordering::Relaxed) {
            *first = Some(cause);
        }
        drop(first);
        for l in &self.links {
            l.shutdown();
        }
        self.wake.notify_all();
    }

    /// Whether the pair was cut.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }

    fn take_cause(&self) -> LinkError {
        let mut cause = self.cause.lock().unwrap_or_else(|p| p.into_inner());
        cause.take().unwrap_or(LinkError::Cut)
    }

    /// Sleeps up to `d`, or until the pair is cut; true if it was.
    fn sleep(&self, d: Duration) -> bool {
        let guard = self.cause.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .wake
            .wait_timeout_while(guard, d, |_| !self.is_cut())
            .unwrap_or_else(|p| p.into_inner());
        self.is_cut()
    }
}

/// What an endpoint does with frames, on the reading thread of the connection they came
/// on: use data frames (place pages, answer requests) and return `None`, or return the
/// message for the phase logic's queue. An error other than [`Error::Link`] ends the
/// session.
pub(crate) trait Inbound: Send + Sync {
    /// Handles one frame read on `chan`'s connection (PING and PONG never get here).
    fn frame(&self, chan: &Chan, frame: Frame<'_>) -> Result<Option<Message>, Error>;

    /// Whether fault handlers ask for pages through [`Chan::request`] on this pair.
    fn asks_for_pages(&self) -> bool {
        false
    }
}

/// What the readers queue for the phase logic.
enum Queued {
    Message(Channel, Message),
    Broken,
    Failed(Error),
}

/// A live connection pair with its reader and heartbeat threads. Dropping it cuts both
/// connections and joins the threads.
pub(crate) struct Pair {
    /// The main connection.
    pub main: Arc<Chan>,
    /// The urgent connection.
    pub urgent: Arc<Chan>,
    /// Cuts both.
    pub cutter: Arc<Cutter>,
    /// Greater than every pair's started before it in this process.
    pub epoch: u64,
    queue: mpsc::Receiver<Queued>,
    forward: Option<Arc<Forward>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pair {
    /// Starts the readers (decoding against `advise`, handing frames to `inbound`) and
    /// the heartbeat.
    pub fn start(
        (main, urgent): (Conn, Conn),
        cutter: Arc<Cutter>,
        advise: &Advise,
        inbound: Arc<dyn Inbound>,
        timing: &Timing,
    ) -> Result<Pair, Error> {
        let limits = Limits::default().advised(advise);
        // Relaxed: a unique, increasing number; the pair's threads start after it.
        let epoch = EPOCHS.fetch_add(1, Ordering::Relaxed);
        let (tx, queue) = mpsc::channel();
        let mut threads = Vec::new();
        let mut chans = Vec::new();
        let forward = (urgent.writes_allocate() && inbound.asks_for_pages())
            .then(|| Arc::new(Forward::new(timing.silence)));
        for (channel, conn) in [(Channel::Main, main), (Channel::Urgent, urgent)] {
            let Conn { r, w, link, .. } = conn;
            let fwd = forward.clone().filter(|_| channel == Channel::Urgent);
            let chan = Arc::new(Chan::new((channel, epoch), w, link, fwd));
            let (c, cut, inb, tx) = (chan.clone(), cutter.clone(), inbound.clone(), tx.clone());
            threads.push(spawn(&format!("pc-{channel}-rx"), move || {
                read_loop((r, &limits), &c, &cut, &*inb, &tx)
            })?);
            chans.push(chan);
        }
        let (main, urgent) = (chans[0].clone(), chans[1].clone());
        let (m, u, cut, t) = (main.clone(), urgent.clone(), cutter.clone(), *timing);
        threads.push(spawn("pc-heartbeat", move || heartbeat(&m, &u, &cut, &t))?);
        if let Some(f) = &forward {
            let (f, u, cut) = (f.clone(), urgent.clone(), cutter.clone());
            threads.push(spawn("pc-requests", move || f.run(&u, &cut))?);
        }
        Ok(Pair {
            main,
            urgent,
            cutter,
            epoch,
            queue,
            forward,
            threads,
        })
    }

    /// The next queued message, waiting up to `wait`: `Ok(None)` if none came; the
    /// pair's cause once it is broken; the error that failed an inbound handler.
    pub fn next_within(&self, wait: Duration) -> Result<Option<(Channel, Message)>, Error> {
        match self.queue.recv_timeout(wait) {
            Ok(Queued::Message(c, m)) => Ok(Some((c, m))),
            Ok(Queued::Failed(e)) => Err(e),
            Ok(Queued::Broken) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(self.cutter.take_cause().into())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
        }
    }

    /// The next queued message, however long it takes (the pair's liveness bounds it:
    /// a dead or silent pair ends in its cause).
    pub fn wait(&self) -> Result<(Channel, Message), Error> {
        match self.queue.recv() {
            Ok(Queued::Message(c, m)) => Ok((c, m)),
            Ok(Queued::Failed(e)) => Err(e),
            Ok(Queued::Broken) | Err(_) => Err(self.cutter.take_cause().into()),
        }
    }

    /// The next queued message; [`LinkError::NoAnswer`] after `limit`.
    pub fn next(
        &self,
        expected: &'static str,
        limit: Duration,
    ) -> Result<(Channel, Message), Error> {
        match self.next_within(limit)? {
            Some(m) => Ok(m),
            None => {
                let after = limit;
                self.cut(LinkError::NoAnswer { expected, after });
                Err(self.cutter.take_cause().into())
            }
        }
    }

    /// Cuts both connections (the readers then end).
    pub fn cut(&self, cause: LinkError) {
        self.cutter.cut(cause);
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.cutter.cut(LinkError::Cut);
        if let Some(f) = &self.forward {
            f.close();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, Error> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(Error::io("start a connection thread"))
}

fn read_loop(
    (mut r, limits): (FrameReader, &Limits),
    chan: &Chan,
    cutter: &Cutter,
    inbound: &dyn Inbound,
    tx: &mpsc::Sender<Queued>,
) {
    let failed = loop {
        let frame = match r.recv_frame(limits) {
            Ok(Frame::Other(Message::Ping { .. } | Message::Pong { .. })) => continue,
            Ok(frame) => frame,
            Err(e) => break Queued::Broken.with_cut(cutter, e),
        };
        match inbound.frame(chan, frame) {
            Ok(None) => {}
            Ok(Some(msg)) => {
                if tx.send(Queued::Message(chan.channel, msg)).is_err() {
                    return;
                }
            }
            Err(Error::Link(e)) => break Queued::Broken.with_cut(cutter, e),
            Err(e) => break Queued::Failed(e).with_cut(cutter, LinkError::Cut),
        }
    };
    let _ = tx.send(failed);
}

impl Queued {
    fn with_cut(self, cutter: &Cutter, cause: LinkError) -> Queued {
        if !cutter.is_cut() {
            log::debug!("connection pair broken: {}", crate::error::chain(&cause));
        }
        cutter.cut(cause);
        self
    }
}

/// Sends a PING on both connections every heartbeat, and cuts the pair when a send has
/// made no whole frame's progress for the silence deadline.
fn heartbeat(main: &Chan, urgent: &Chan, cutter: &Cutter, timing: &Timing) {
    let mut seq = 0;
    while !cutter.sleep(timing.heartbeat) {
        seq += 1;
        for chan in [main, urgent] {
            if chan.stalled(timing.silence) {
                let (channel, after) = (chan.channel, timing.silence);
                return cutter.cut(LinkError::Silent { channel, after });
            }
            if let Err(e) = chan.beat(seq) {
                return cutter.cut(e);
            }
        }
    }
}

/// Makes a pair from two connections: their cutter, then the running [`Pair`].
pub(crate) fn pair(
    conns: (Conn, Conn),
    advise: &Advise,
    inbound: Arc<dyn Inbound>,
    timing: &Timing,
) -> Result<Pair, Error> {
    let cutter = Cutter::new(&conns.0, &conns.1).map_err(Error::io("clone a connection"))?;
    Pair::start(conns, cutter, advise, inbound, timing)
}
