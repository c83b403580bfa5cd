//! A live connection pair: its channels' writers, the readers and the heartbeat.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::chan::Chan;
use super::forward::Forward;
use super::{Channel, LinkError, Timing};
use crate::conn::{Conn, FrameReader};
use crate::net::Link;
use crate::wire::{kind, Control};

/// Pairs' epochs, increasing in the order pairs start, process-wide.
static EPOCHS: AtomicU64 = AtomicU64::new(1);

/// Cuts a pair's two connections, once, remembering the first cause.
pub struct Cutter {
    links: [Link; 2],
    cut: AtomicBool,
    cause: Mutex<Option<LinkError>>,
    wake: Condvar,
}

impl Cutter {
    /// The cutter of `main` and `urgent`.
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
        self.shut();
    }

    /// Cuts with `e` and returns it, or, if the pair was cut before with a cause nobody
    /// has taken yet, returns that cause instead ([`Pair::cause`]).
    fn cause_for(&self, e: LinkError) -> LinkError {
        let mut first = self.cause.lock().unwrap_or_else(|p| p.into_inner());
        let earlier = match self.cut.swap(true, Ordering::Relaxed) {
            true => first.take(),
            false => None,
        };
        drop(first);
        self.shut();
        earlier.unwrap_or(e)
    }

    fn shut(&self) {
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

    /// A guard that cuts this pair when dropped, unless disarmed once a [`Pair`] owns it.
    pub fn cut_on_drop(self: &Arc<Self>) -> CutOnDrop {
        CutOnDrop(Some(self.clone()))
    }

    /// Sleeps up to `d`, or until the pair is cut; true if it was.
    pub fn sleep(&self, d: Duration) -> bool {
        let guard = self.cause.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .wake
            .wait_timeout_while(guard, d, |_| !self.is_cut())
            .unwrap_or_else(|p| p.into_inner());
        self.is_cut()
    }
}

/// Cuts a pair when dropped ([`Cutter::cut_on_drop`]): whoever takes an
/// [`Arrival`](super::Arrival) apart holds it until a [`Pair`] runs on the connections, so
/// that no way out before that (a failed send, a refusal, a crash of the step) leaves them
/// open and their session's place at the listener held.
#[must_use = "dropped at once, it cuts the pair at once"]
pub struct CutOnDrop(Option<Arc<Cutter>>);

impl CutOnDrop {
    /// The pair runs: its [`Pair`] cuts it from now on.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CutOnDrop {
    fn drop(&mut self) {
        if let Some(cutter) = self.0.take() {
            cutter.cut(LinkError::Cut);
        }
    }
}

/// What a protocol does with its frames, on the reading thread of the connection they
/// came on: use data frames (place pages, answer requests) and return `None`, or return
/// the message for the phase logic's queue ([`Pair::next`]). An error that is not a
/// broken link ([`Failure::into_link`]) ends the session: that connection is read no
/// more, and the phase logic gets the error with the pair still up, to tell the peer why
/// ([`Pair::shut`]) before it ends it.
pub trait Inbound: Send + Sync {
    /// The protocol's messages.
    type Message: Send + 'static;
    /// The protocol's errors.
    type Error: Failure;

    /// Handles one whole frame (header to trailer, as read) that arrived on `chan`'s
    /// connection; the link's heartbeats never get here. The bytes are the reader's
    /// buffer, the inbound's to consume: it may move whole pages out of a body that
    /// [`FrameReader::align_bodies`](crate::conn::FrameReader::align_bodies) aligned.
    fn frame(&self, chan: &Chan, frame: &mut [u8]) -> Result<Option<Self::Message>, Self::Error>;

    /// [`frame`](Self::frame), with the reader's spare: where the next body of the same
    /// size will be read, when this one was read aligned (else empty; see
    /// [`FrameReader::recv_spare`](crate::conn::FrameReader::recv_spare)). By default
    /// the spare is left alone.
    fn frame_with_spare(
        &self,
        chan: &Chan,
        frame: &mut [u8],
        spare: &mut [u8],
    ) -> Result<Option<Self::Message>, Self::Error> {
        let _ = spare;
        self.frame(chan, frame)
    }

    /// Whether fault handlers send on the urgent connection ([`Chan::request_with`]):
    /// over an encrypted connection the pair then runs a thread that seals their frames.
    fn forwards_requests(&self) -> bool {
        false
    }
}

/// A protocol's error type, of which a broken link is one case.
pub trait Failure: From<LinkError> + Send + 'static {
    /// The broken link it is, or itself if it is anything else.
    fn into_link(self) -> Result<LinkError, Self>;
}

/// The transport's own error is one: a pair whose protocol has no error of its own.
impl Failure for crate::Error {
    fn into_link(self) -> Result<LinkError, crate::Error> {
        match self {
            crate::Error::Link(link) => Ok(link),
            other => Err(other),
        }
    }
}

/// What the readers queue for the phase logic.
enum Queued<M, E> {
    Message(Channel, M),
    Broken,
    Failed(E),
}

type Handler<M, E> = Arc<dyn Inbound<Message = M, Error = E>>;

/// Fails a pair's session from a thread of its own ([`Pair::failing`]).
pub struct Failing<M, E>(mpsc::Sender<Queued<M, E>>);

impl<M, E> Failing<M, E> {
    /// The phase logic's next message is `e` (an error that ends the session, met off the
    /// readers: a stream that cannot read a page); the pair stays up for it to say why.
    pub fn fail(&self, e: E) {
        let _ = self.0.send(Queued::Failed(e));
    }
}

/// A live connection pair with its reader and heartbeat threads. Dropping it cuts both
/// connections and joins the threads.
pub struct Pair<M, E> {
    /// The main connection.
    pub main: Arc<Chan>,
    /// The urgent connection.
    pub urgent: Arc<Chan>,
    /// Cuts both.
    pub cutter: Arc<Cutter>,
    /// Greater than every pair's started before it in this process.
    pub epoch: u64,
    queue: mpsc::Receiver<Queued<M, E>>,
    failing: mpsc::Sender<Queued<M, E>>,
    forward: Option<Arc<Forward>>,
    threads: Vec<JoinHandle<()>>,
}

impl<M: Send + 'static, E: Failure> Pair<M, E> {
    /// Makes a pair of two connections: cuts both when either breaks.
    pub fn new(
        conns: (Conn, Conn),
        inbound: Handler<M, E>,
        timing: &Timing,
    ) -> Result<Pair<M, E>, crate::Error> {
        let cutter =
            Cutter::new(&conns.0, &conns.1).map_err(crate::Error::io("clone a connection"))?;
        Pair::start(conns, cutter, inbound, timing)
    }

    /// Starts the readers (handing frames to `inbound`) and the heartbeat of two
    /// connections that `cutter` cuts.
    pub fn start(
        (main, urgent): (Conn, Conn),
        cutter: Arc<Cutter>,
        inbound: Handler<M, E>,
        timing: &Timing,
    ) -> Result<Pair<M, E>, crate::Error> {
        // Relaxed: a unique, increasing number; the pair's threads start after it.
        let epoch = EPOCHS.fetch_add(1, Ordering::Relaxed);
        let (tx, queue) = mpsc::channel();
        let mut threads = Vec::new();
        let mut chans = Vec::new();
        let forward = (urgent.writes_allocate() && inbound.forwards_requests())
            .then(|| Arc::new(Forward::new(timing.silence)));
        for (channel, conn) in [(Channel::Main, main), (Channel::Urgent, urgent)] {
            let Conn { r, w, link, .. } = conn;
            let fwd = forward.clone().filter(|_| channel == Channel::Urgent);
            let chan = Arc::new(Chan::new((channel, epoch), w, link, fwd));
            let (c, cut, inb, tx) = (chan.clone(), cutter.clone(), inbound.clone(), tx.clone());
            threads.push(spawn(&format!("link-{channel}-rx"), move || {
                read_loop(r, &c, &cut, &*inb, &tx)
            })?);
            chans.push(chan);
        }
        let (main, urgent) = (chans[0].clone(), chans[1].clone());
        let (m, u, cut, t) = (main.clone(), urgent.clone(), cutter.clone(), *timing);
        threads.push(spawn("link-heartbeat", move || {
            heartbeat(&m, &u, &cut, &t)
        })?);
        if let Some(f) = &forward {
            let (f, u, cut) = (f.clone(), urgent.clone(), cutter.clone());
            threads.push(spawn("link-requests", move || {
                let write = |frames: &[u8]| u.writer().write_raw(frames);
                if let Err(e) = f.run(|| cut.is_cut(), write) {
                    cut.cut(e);
                }
            })?);
        }
        Ok(Pair {
            main,
            urgent,
            cutter,
            epoch,
            queue,
            failing: tx,
            forward,
            threads,
        })
    }

    /// The next queued message, waiting up to `wait`: `Ok(None)` if none came; the
    /// pair's cause once it is broken; the error that failed an inbound handler.
    pub fn next_within(&self, wait: Duration) -> Result<Option<(Channel, M)>, E> {
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
    pub fn wait(&self) -> Result<(Channel, M), E> {
        match self.queue.recv() {
            Ok(Queued::Message(c, m)) => Ok((c, m)),
            Ok(Queued::Failed(e)) => Err(e),
            Ok(Queued::Broken) | Err(_) => Err(self.cutter.take_cause().into()),
        }
    }

    /// The next queued message; [`LinkError::NoAnswer`] after `limit`.
    pub fn next(&self, expected: &'static str, limit: Duration) -> Result<(Channel, M), E> {
        match self.next_within(limit)? {
            Some(m) => Ok(m),
            None => {
                let after = limit;
                self.cut(LinkError::NoAnswer { expected, after });
                Err(self.cutter.take_cause().into())
            }
        }
    }

    /// Ends the session over an error: SHUT (error, `detail` cut to [`MAX_DETAIL`] bytes
    /// on a character boundary) on main, then waits, up to `within`, for the peer to close
    /// the pair first. Closing ours at once, the peer may see the connection close before
    /// it reads the SHUT, take it for a break and wait out its bound for a reconnection
    /// that never comes.
    ///
    /// [`MAX_DETAIL`]: crate::wire::MAX_DETAIL
    pub fn shut(&self, detail: &str, within: Duration) {
        let mut end = detail.len().min(crate::wire::MAX_DETAIL);
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        let shut = Control::Shut {
            reason: super::ShutReason::Error,
            detail: detail[..end].to_owned(),
        };
        if let Err(e) = self.main.send_control(&shut) {
            return log::debug!("the SHUT was not sent: {e}");
        }
        let until = Instant::now() + within;
        while let Ok(Some(_)) = self.next_within(until.saturating_duration_since(Instant::now())) {}
    }

    /// Fails the session from another thread (the phase logic hears it next).
    pub fn failing(&self) -> Failing<M, E> {
        Failing(self.failing.clone())
    }

    /// Cuts both connections (the readers then end).
    pub fn cut(&self, cause: LinkError) {
        self.cutter.cut(cause);
    }

    /// What to report for `e`, an error a session met on this pair (a failed send, say):
    /// the pair's first cause if it was cut before and nobody has reported that cause yet
    /// — a write on a connection the cut shut down fails with `EPIPE`, which says nothing
    /// of why (a silent peer, a reset) — else `e`. The pair is cut either way.
    pub fn cause(&self, e: LinkError) -> LinkError {
        self.cutter.cause_for(e)
    }
}

impl<M, E> Drop for Pair<M, E> {
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

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, crate::Error> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(crate::Error::io("start a connection thread"))
}

fn read_loop<M: Send + 'static, E: Failure>(
    mut r: FrameReader,
    chan: &Chan,
    cutter: &Cutter,
    inbound: &dyn Inbound<Message = M, Error = E>,
    tx: &mpsc::Sender<Queued<M, E>>,
) {
    let failed = loop {
        let (frame, spare) = match r.recv_spare() {
            Ok(read) => read,
            Err(e) => break Queued::Broken.with_cut(cutter, e),
        };
        if let kind::PING | kind::PONG = frame[4] {
            match Control::decode_frame(frame, usize::MAX) {
                Ok(_) => continue,
                Err(e) => {
                    break Queued::Broken.with_cut(cutter, LinkError::malformed(chan.channel, e))
                }
            }
        }
        match inbound
            .frame_with_spare(chan, frame, spare)
            .map_err(Failure::into_link)
        {
            Ok(None) => {}
            Ok(Some(msg)) => {
                if tx.send(Queued::Message(chan.channel, msg)).is_err() {
                    return;
                }
            }
            Err(Ok(e)) => break Queued::Broken.with_cut(cutter, e),
            // Not cut: the phase logic may tell the peer why first (`Pair::shut`).
            Err(Err(e)) => break Queued::Failed(e),
        }
    };
    let _ = tx.send(failed);
}

impl<M, E> Queued<M, E> {
    fn with_cut(self, cutter: &Cutter, cause: LinkError) -> Self {
        if !cutter.is_cut() {
            log::debug!("connection pair broken: {}", crate::chain(&cause));
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
