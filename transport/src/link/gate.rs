//! The gate every connection passes before it is admitted.
//!
//! One thread accepts and takes every connection through its handshake at once
//! ([`Listening`] does no I/O; this polls the sockets and feeds it), so a stranger costs
//! a socket and a few KiB, never a thread, however many sockets it opens. What strangers
//! can hold is bounded by the listener's [`Admission`](super::Admission):
//!
//! - each connection has the handshake deadline, whole (not per read: one byte a second
//!   does not keep a connection in);
//! - at most `max_handshakes` connections are in their handshake; one more closes one of
//!   them, by the rule below, so strangers cannot keep an opener out however many sockets
//!   they open and whatever they send on them;
//! - out of file descriptors, the gate closes a handshake (by the same rule) to accept
//!   the next, or, with none to close, stops accepting for a moment (backing off to a second) and
//!   goes on — it never stops listening.
//!
//! A refused opener is told why (SHUT, or a TLS alert) and its connection closed
//! gracefully: our side shut, its bytes read and dropped until it closes or a second
//! passes, so it reads the reason rather than a reset. Every connection not admitted is
//! counted by why ([`AcceptStats`](super::AcceptStats)); refusals are logged, at most ten
//! lines per ten seconds, then summed up.
//!
//! # Who makes room
//!
//! Nothing a connection sends before it proves its peer can be told from a stranger's
//! imitation: the HELLO is plaintext anyone can write; with a pre-shared key a stranger
//! can take the CHALLENGE and sit on it; with TLS it can send a ClientHello (replayed
//! bytes, no key needed), take our whole flight and stop before its certificate. The proof
//! (an AUTH that verifies; a client certificate, its signature and the HELLO inside) cannot
//! be faked, and a connection past it leaves the gate at once, admitted or refused. So
//! ranking handshakes by progress protects no one: a flood that imitates the progress
//! ranks beside the client, and the oldest-first rule then closes every client that needs
//! more than `max_handshakes` newcomers' time — a WAN handshake of a few round trips,
//! against a few thousand one-byte connections a second, forever. What a stranger cannot
//! choose is its address (TCP's handshake proves it) and our draws. A newcomer beyond the
//! cap closes (`evict::victim`):
//!
//! 1. the oldest refused connection (only its last words were left to send);
//! 2. else, of the connections in their handshake, from the sources (an IPv4 address, an
//!    IPv6 /64) holding the most of them: the oldest one polled since it came and silent —
//!    an opener speaks first, so a client's first bytes come with its connection — or else
//!    one drawn uniformly at random (SHA-256 of a secret seed and a counter);
//! 3. else the oldest (authenticated ones, their answer still being sent).
//!
//! A flood from other addresses than the client's thus never closes the client's
//! connection while the flood's addresses hold more handshakes than the client's. A flood
//! from the client's own address, or spread over as many addresses as there are slots, is
//! met by the draw: a connection that stays through `n` newcomers survives with
//! probability `(1 - 1/max_handshakes)^n`, about `e^(-rate × handshake time / cap)` —
//! never zero, so the opener's retries get through, and `max_handshakes` (a socket and a
//! few KiB each) is what an operator raises against a larger flood. A stranger that sends
//! nothing is closed first (a client is not: its HELLO comes with its connection); a byte
//! brings it only to the draw.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, send, shutdown, MsgFlags, Shutdown};

use super::evict::{self, Draw, Source, Standing};
use super::notes::Notes;
use super::sessions::Shared;
use super::ShutReason;
use crate::error::Refusal;
use crate::handshake::{Hello, Listening, Progress};
use crate::{chain, Error, Socket};

/// Connections accepted per turn of the loop (then the handshakes get their turn).
const ACCEPTS_PER_TURN: usize = 64;
/// Bytes read from one connection per turn.
const READ_PER_TURN: usize = 64 << 10;
/// How long a refused connection may take to close after its last words.
const LINGER: Duration = Duration::from_secs(1);
/// The loop wakes at least this often (to see `stop`).
const TICK: Duration = Duration::from_millis(200);

/// Runs the gate until the listener stops.
pub(super) fn run(shared: &Shared, draw: Draw) {
    let mut gate = Gate {
        shared,
        draw,
        pending: Vec::new(),
        scratch: vec![0; 16 << 10].into_boxed_slice(),
        paused_until: None,
        backoff: Duration::ZERO,
        notes: Notes::new(),
        swept: Instant::now(),
    };
    while !shared.stop.load(Ordering::Relaxed) {
        gate.turn();
    }
    shared.stats.handshaking.store(0, Ordering::Relaxed);
}

/// A connection at the gate.
struct Pending {
    socket: Socket,
    shake: Listening,
    deadline: Instant,
    then: Then,
    /// Where it comes from.
    source: Source,
    said: Said,
}

/// What a connection at the gate has sent since it came.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Said {
    /// Not polled yet.
    Unpolled,
    /// Polled, and nothing came: an opener speaks first, so no client in its handshake.
    Nothing,
    /// Some bytes (which prove nothing).
    Something,
}

impl Pending {
    fn standing(&self) -> Standing {
        match (&self.then, self.said) {
            (Then::Close { .. }, _) => Standing::Refused,
            (Then::HandOver(..), _) => Standing::Admitted,
            (Then::Shake, Said::Nothing) => Standing::Silent,
            (Then::Shake, _) => Standing::Unproven,
        }
    }
}

/// What happens to a connection once its output is sent.
enum Then {
    /// Nothing yet: it is in its handshake.
    Shake,
    /// It goes in.
    HandOver(Hello, Option<[u8; 32]>),
    /// It was refused: close gracefully (`shut`: our side is shut already).
    Close { shut: bool },
}

struct Gate<'a> {
    shared: &'a Shared,
    /// Which connection makes room, when one must.
    draw: Draw,
    /// Oldest first.
    pending: Vec<Pending>,
    scratch: Box<[u8]>,
    /// Accepting paused (out of file descriptors) until then.
    paused_until: Option<Instant>,
    backoff: Duration,
    notes: Notes,
    swept: Instant,
}

impl Gate<'_> {
    fn turn(&mut self) {
        let now = Instant::now();
        let accepting = self.paused_until.is_none_or(|t| now >= t);
        let (listener, ready) = self.wait(accepting, now);
        // After the wait: a connection accepted now came now (its deadline counts from
        // here, not from before the poll), and deadlines are checked against the time.
        let now = Instant::now();
        let mut i = 0;
        let mut ready = ready.into_iter();
        while i < self.pending.len() {
            let revents = ready.next().unwrap_or(PollFlags::empty());
            match self.service(i, revents, now) {
                true => i += 1,
                false => self.finish(i),
            }
        }
        if listener {
            self.accept(now);
        }
        let stats = &self.shared.stats;
        stats
            .handshaking
            .store(self.pending.len() as u64, Ordering::Relaxed);
        if now.duration_since(self.swept) >= Duration::from_secs(1) {
            self.swept = now;
            self.shared.drop_stale_halves();
            self.notes.summary(stats);
        }
    }

    /// Polls the listener (if `accepting`) and every connection, until one is ready, a
    /// deadline passes or a tick; returns whether the listener is ready, and each
    /// connection's events.
    fn wait(&self, accepting: bool, now: Instant) -> (bool, Vec<PollFlags>) {
        let mut fds = Vec::with_capacity(self.pending.len() + 1);
        if accepting {
            fds.push(PollFd::new(self.shared.listener.as_fd(), PollFlags::POLLIN));
        }
        for p in &self.pending {
            let mut flags = PollFlags::POLLIN;
            if !p.shake.output().is_empty() {
                flags |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(p.socket.as_fd(), flags));
        }
        let mut until = now + TICK;
        if let Some(first) = self.pending.iter().map(|p| p.deadline).min() {
            until = until.min(first);
        }
        if let Some(t) = self.paused_until.filter(|_| !accepting) {
            until = until.min(t);
        }
        let timeout = until.saturating_duration_since(now);
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        if let Err(e) = poll(&mut fds, timeout) {
            if e != Errno::EINTR {
                log::warn!("the accepting thread cannot poll: {e}");
                std::thread::sleep(TICK);
            }
            return (false, Vec::new());
        }
        let mut events = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()));
        let listener = accepting && events.next().is_some_and(|e| !e.is_empty());
        (listener, events.collect())
    }

    /// Serves connection `i`: sends its output, reads what came, feeds its handshake,
    /// acts on the verdict. False when it is done (admitted or to be closed).
    fn service(&mut self, i: usize, revents: PollFlags, now: Instant) -> bool {
        let p = &mut self.pending[i];
        if now >= p.deadline {
            if let Then::Shake | Then::HandOver(..) = p.then {
                self.shared.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                log::debug!("closed a connection at the handshake deadline");
            }
            return false;
        }
        if !flush(p) {
            return self.drop_failed(i, "the connection broke while we answered");
        }
        if revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            let mut total = 0;
            loop {
                let fd = self.pending[i].socket.as_fd().as_raw_fd();
                match recv(fd, &mut self.scratch, MsgFlags::MSG_DONTWAIT) {
                    Ok(0) => return self.drop_failed(i, "closed before it was admitted"),
                    Ok(n) => {
                        total += n;
                        self.take(i, n, now);
                        if total >= READ_PER_TURN {
                            break;
                        }
                    }
                    Err(Errno::EAGAIN) => break,
                    Err(Errno::EINTR) => {}
                    Err(_) => return self.drop_failed(i, "the connection broke"),
                }
            }
            if !flush(&mut self.pending[i]) {
                return self.drop_failed(i, "the connection broke while we answered");
            }
        }
        let p = &mut self.pending[i];
        if p.said == Said::Unpolled {
            p.said = Said::Nothing;
        }
        match p.then {
            Then::HandOver(..) => !p.shake.output().is_empty(),
            Then::Close { shut: false } if p.shake.output().is_empty() => {
                // Our last words are out: the opener reads them, then its end of file.
                let _ = shutdown(p.socket.as_fd().as_raw_fd(), Shutdown::Write);
                p.then = Then::Close { shut: true };
                true
            }
            _ => true,
        }
    }

    /// Feeds `n` bytes of the scratch buffer to connection `i`'s handshake.
    fn take(&mut self, i: usize, n: usize, now: Instant) {
        let p = &mut self.pending[i];
        if let Then::Close { .. } = p.then {
            return;
        }
        if n > 0 {
            p.said = Said::Something;
        }
        // (An admitted opener waits for its answer: bytes now are refused by `feed`.)
        match p.shake.feed(&self.scratch[..n]) {
            Ok(Progress::More) => {}
            Ok(Progress::Authenticated(hello)) => self.decide(i, hello, now),
            Err(e) => self.refused(i, &e, now),
        }
    }

    /// Admits the authenticated opener of connection `i`, or refuses it (another
    /// session here, the session cap, another certificate than its session's).
    fn decide(&mut self, i: usize, hello: Hello, now: Instant) {
        let p = &mut self.pending[i];
        let identity = p.shake.identity();
        match self.shared.admits(&hello, identity) {
            Ok(()) => match p.shake.admit() {
                Ok(()) => p.then = Then::HandOver(hello, identity),
                Err(e) => self.refused(i, &e, now),
            },
            Err((reason, detail)) => {
                p.shake.refuse(reason, &detail);
                let stats = &self.shared.stats;
                let (counter, level) = match reason {
                    ShutReason::Busy => (&stats.busy, log::Level::Info),
                    _ => (&stats.refused, log::Level::Warn),
                };
                counter.fetch_add(1, Ordering::Relaxed);
                self.notes
                    .tell(level, &format!("refused a session: {detail}"));
                self.close_after_words(i, now);
            }
        }
    }

    /// Counts and logs a failed handshake; the connection closes after its last words.
    fn refused(&mut self, i: usize, e: &Error, now: Instant) {
        let stats = &self.shared.stats;
        stats.refused.fetch_add(1, Ordering::Relaxed);
        let level = match e {
            Error::Refused { reason } => {
                match reason {
                    Refusal::PeerCertificate(_) | Refusal::CertificateRefused { .. } => {
                        stats.refused_certificate.fetch_add(1, Ordering::Relaxed);
                    }
                    Refusal::SecurityMismatch { .. } => {
                        stats.refused_mismatch.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                log::Level::Warn
            }
            Error::Tls { .. } => log::Level::Warn,
            // A probe that closes, garbage: not worth a line unless asked.
            Error::Link(_) => log::Level::Debug,
            _ => log::Level::Info,
        };
        self.notes
            .tell(level, &format!("refused a connection: {}", chain(e)));
        self.close_after_words(i, now);
    }

    fn close_after_words(&mut self, i: usize, now: Instant) {
        let p = &mut self.pending[i];
        p.then = Then::Close { shut: false };
        p.deadline = p.deadline.min(now + LINGER);
    }

    /// Drops connection `i` (false, for `service`), counting it refused if it was still
    /// in its handshake.
    fn drop_failed(&mut self, i: usize, why: &str) -> bool {
        if let Then::Shake | Then::HandOver(..) = self.pending[i].then {
            self.shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            log::debug!("refused a connection: {why}");
        }
        self.pending[i].then = Then::Close { shut: true };
        false
    }

    /// Removes connection `i`: hands it over if it was admitted, else closes it.
    fn finish(&mut self, i: usize) {
        let p = self.pending.remove(i);
        if let Then::HandOver(hello, identity) = p.then {
            if p.shake.output().is_empty() {
                self.hand_over(p.socket, p.shake, hello, identity);
            }
        }
    }

    fn hand_over(&self, socket: Socket, shake: Listening, hello: Hello, id: Option<[u8; 32]>) {
        let silence = self.shared.timing.silence;
        let conn = socket
            .set_nonblocking(false)
            .map_err(Error::io("make a connection blocking"))
            .and_then(|()| shake.into_conn(socket))
            .and_then(|mut conn| {
                conn.set_channel(hello.channel);
                conn.set_deadline(silence)
                    .map_err(Error::io("set deadlines"))?;
                Ok(conn)
            });
        match conn {
            Ok(conn) => self.shared.deposit(hello, id, conn),
            Err(e) => log::warn!("cannot use an admitted connection: {}", chain(&e)),
        }
    }

    /// Accepts what is waiting (a burst at most).
    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPTS_PER_TURN {
            match self.shared.listener.accept() {
                Ok(socket) => {
                    self.backoff = Duration::ZERO;
                    if socket.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if self.pending.len() >= self.shared.admission.max_handshakes.max(1) {
                        self.make_room();
                    }
                    let s = self.shared;
                    let shake = Listening::new(s.protocol, s.security.clone(), s.peer);
                    let source = Source::of(&socket);
                    self.pending.push(Pending {
                        socket,
                        shake,
                        deadline: now + self.shared.admission.handshake_deadline,
                        then: Then::Shake,
                        source,
                        said: Said::Unpolled,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Closing a handshake frees a descriptor for the newcomer.
                    if !self.make_room() {
                        return self.pause(now, "no file descriptor left to accept with");
                    }
                }
                Err(e) if transient(&e) => {}
                Err(e) => return self.pause(now, &e.to_string()),
            }
        }
    }

    /// Closes the connection the rule (module doc) picks; false if there is none.
    fn make_room(&mut self) -> bool {
        let standings: Vec<_> = (self.pending.iter())
            .map(|p| (p.source, p.standing()))
            .collect();
        let Some(i) = evict::victim(&standings, &mut self.draw) else {
            return false;
        };
        let p = self.pending.remove(i);
        if let Then::Shake | Then::HandOver(..) = p.then {
            self.shared.stats.evicted.fetch_add(1, Ordering::Relaxed);
            log::debug!("closed a connection in its handshake to make room");
        }
        true
    }

    /// Stops accepting for a moment (doubling up to a second while it lasts).
    fn pause(&mut self, now: Instant, why: &str) {
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
        self.paused_until = Some(now + self.backoff);
        let pause = self.backoff;
        (self.notes).tell(
            log::Level::Warn,
            &format!("accept: {why}; pausing {pause:?}"),
        );
    }
}

/// Sends what the handshake has for the opener, as far as the socket takes it now;
/// false if the connection broke.
fn flush(p: &mut Pending) -> bool {
    while !p.shake.output().is_empty() {
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        match send(p.socket.as_fd().as_raw_fd(), p.shake.output(), flags) {
            Ok(n) => p.shake.sent(n),
            Err(Errno::EAGAIN) => return true,
            Err(Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Accept errors that concern one connection only (it was aborted before we took it).
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EPROTO | libc::EINTR | libc::EPERM | libc::EHOSTUNREACH)
    ) || e.kind() == std::io::ErrorKind::Interrupted
}
