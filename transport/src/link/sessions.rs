//! What the accepting thread (`gate`) and the pairing (`accept`) share: the listener,
//! its policy and counters, and the table of sessions whose connections are being paired.
//! Both files build on this one; neither needs the other's internals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::{Admission, Channel, CutOnDrop, Cutter, LinkError, Role, ShutReason, Timing};
use crate::error::Refusal;
use crate::handshake::Hello;
use crate::wire::Protocol;
use crate::{Conn, Listener, Security};

/// An authenticated connection pair of one session generation.
pub struct Arrival {
    /// Its session.
    pub session: u64,
    /// The main and the urgent connection.
    pub conns: (Conn, Conn),
    /// Cuts both (a newer generation cuts it too).
    pub cutter: Arc<Cutter>,
    /// Cuts both when dropped (with the arrival, or wherever its taker keeps it) unless
    /// disarmed: the session's place is held only while a pair can run on them.
    pub guard: CutOnDrop,
}

/// Which sessions a listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The first authenticated session only (a migration destination).
    OneSession,
    /// Up to [`Admission::max_sessions`] at once (a page server).
    AnySession,
}

/// Counters of a listener. Every connection that is not admitted is counted once, in
/// `refused`, `timed_out`, `evicted` or `busy`.
#[derive(Debug, Default)]
pub struct AcceptStats {
    /// Connections that authenticated and were admitted.
    pub admitted: AtomicU64,
    /// Connections refused by their handshake: a wrong key or certificate, a security
    /// mismatch, the wrong role, malformed bytes, closed midway.
    pub refused: AtomicU64,
    /// Of `refused`: a certificate refused (the opener's here, or ours by the opener).
    pub refused_certificate: AtomicU64,
    /// Of `refused`: the opener spoke the other security (TLS vs. pre-shared key).
    pub refused_mismatch: AtomicU64,
    /// Closed at the handshake deadline.
    pub timed_out: AtomicU64,
    /// Closed to make room: the handshake cap, or no file descriptor left to accept with.
    pub evicted: AtomicU64,
    /// Authenticated, and refused at the session cap.
    pub busy: AtomicU64,
    /// Connection pairs superseded by a newer generation of their session.
    pub superseded: AtomicU64,
    /// Connections in their handshake now.
    pub handshaking: AtomicU64,
}

pub(super) type Deliver = Box<dyn Fn(Arrival) + Send + Sync>;

/// What the gate and the pairing share.
pub(super) struct Shared {
    pub listener: Listener,
    pub protocol: Protocol,
    pub security: Security,
    pub timing: Timing,
    pub admission: Admission,
    pub peer: Role,
    pub(super) admit: Admit,
    pub stop: AtomicBool,
    pub(super) slots: Mutex<Slots>,
    pub(super) ready: Condvar,
    pub(super) deliver: Option<Deliver>,
    pub stats: AcceptStats,
}

/// The table of sessions: the live ones, and the memory of those whose pair broke (their
/// generation and certificate), at most `max_sessions` of those, the longest quiet
/// forgotten first ([`Shared::remember`]).
#[derive(Default)]
pub(super) struct Slots {
    owner: Option<u64>,
    sessions: HashMap<u64, Slot>,
}

/// One session's connections: the newest generation's halves, its pair ready to be
/// taken, and the cutter of its latest pair (which the next pair supersedes); and, for as
/// long as the session is remembered, the certificate it began with.
struct Slot {
    generation: u32,
    main: Option<Conn>,
    urgent: Option<Conn>,
    /// When the first half of the generation arrived.
    since: Option<Instant>,
    ready: Option<Arrival>,
    active: Option<Arc<Cutter>>,
    /// The certificate the session's first connection authenticated with (TLS): every
    /// later connection of the session must show the same one, live pair or not.
    identity: Option<[u8; 32]>,
    /// When a connection of the session last came (the memory forgets the oldest).
    touched: Instant,
}

impl Slot {
    fn new(identity: Option<[u8; 32]>) -> Slot {
        Slot {
            generation: 0,
            main: None,
            urgent: None,
            since: None,
            ready: None,
            active: None,
            identity,
            touched: Instant::now(),
        }
    }

    /// Whether the session holds anything: a half, a pair to take, a live pair.
    fn live(&self) -> bool {
        self.main.is_some()
            || self.urgent.is_some()
            || self.ready.is_some()
            || self.active.as_ref().is_some_and(|c| !c.is_cut())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the authenticated opener `hello` (with `identity`, under TLS) may come
    /// in: else why not, as the SHUT that tells it.
    pub fn admits(
        &self,
        hello: &Hello,
        identity: Option<[u8; 32]>,
    ) -> Result<(), (ShutReason, String)> {
        let mut slots = self.lock();
        if self.admit == Admit::OneSession {
            match slots.owner {
                Some(owner) if owner != hello.session => {
                    return Err((ShutReason::Error, Refusal::OtherSession.to_string()));
                }
                _ => slots.owner = Some(hello.session),
            }
        }
        if let Some(slot) = slots.sessions.get(&hello.session) {
            // The session id travels in clear: only its own certificate may resume it.
            if slot.identity != identity {
                return Err((ShutReason::Error, Refusal::PeerChanged.to_string()));
            }
            if slot.live() {
                return Ok(());
            }
        }
        let live = slots.sessions.values().filter(|s| s.live()).count();
        let max = self.admission.max_sessions.max(1);
        if live >= max {
            return Err((
                ShutReason::Busy,
                format!("{live} sessions in progress, the most this listener serves"),
            ));
        }
        if !slots.sessions.contains_key(&hello.session) && !self.has_room(&slots, identity) {
            return Err((
                ShutReason::Busy,
                format!(
                    "{} paused sessions may still come back (for {:?} after their break)",
                    max - 1,
                    self.timing.give_up_after
                ),
            ));
        }
        Ok(())
    }

    /// Whether a new session of a peer with `identity` can be remembered: fewer than
    /// `max_sessions - 1` paused ones, or one `remember` may forget for it.
    fn has_room(&self, slots: &Slots, identity: Option<[u8; 32]>) -> bool {
        let keep = self.admission.max_sessions.max(1) - 1;
        let paused = slots.sessions.values().filter(|s| !s.live());
        paused.clone().count() < keep.max(1)
            || paused.into_iter().any(|s| self.forgettable(s, identity))
    }

    /// Whether a paused session may be forgotten to make room for a new one of a peer with
    /// `identity`: one of that same peer's (it takes nothing from anyone else), or one
    /// paused longer than the give-up bound (its peer gave up on it). A session of another
    /// peer paused more recently may come back, and forgotten it would be admitted anew
    /// with any certificate: peers opening and dropping sessions could flush it out and
    /// take it over.
    fn forgettable(&self, slot: &Slot, identity: Option<[u8; 32]>) -> bool {
        slot.identity == identity || slot.touched.elapsed() >= self.timing.give_up_after
    }

    /// Files an admitted connection under its session; a completed pair supersedes the
    /// session's previous pair and is delivered.
    pub fn deposit(&self, hello: Hello, identity: Option<[u8; 32]>, conn: Conn) {
        let mut slots = self.lock();
        if !slots.sessions.contains_key(&hello.session) {
            self.remember(&mut slots, identity);
        }
        let slot = (slots.sessions)
            .entry(hello.session)
            .or_insert_with(|| Slot::new(identity));
        // Two openers of a new session admitted before either was filed: the first keeps it.
        if slot.identity != identity {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return log::warn!("closed a connection of a session with another certificate");
        }
        self.stats.admitted.fetch_add(1, Ordering::Relaxed);
        slot.touched = Instant::now();
        if hello.generation < slot.generation {
            return log::debug!(
                "dropped a stale connection of generation {}",
                hello.generation
            );
        }
        if hello.generation > slot.generation || slot.since.is_none() {
            (slot.generation, slot.main, slot.urgent) = (hello.generation, None, None);
            slot.since = Some(Instant::now());
        }
        match hello.channel {
            Channel::Main => slot.main = Some(conn),
            Channel::Urgent => slot.urgent = Some(conn),
        }
        if slot.main.is_none() || slot.urgent.is_none() {
            return;
        }
        let main = slot.main.take().expect("both halves are here");
        let urgent = slot.urgent.take().expect("both halves are here");
        slot.since = None;
        let cutter = match Cutter::new(&main, &urgent) {
            Ok(c) => c,
            Err(e) => return log::warn!("cannot keep a connection pair: {e}"),
        };
        if let Some(old) = slot.active.replace(cutter.clone()) {
            if !old.is_cut() {
                self.stats.superseded.fetch_add(1, Ordering::Relaxed);
                log::info!("a newer connection pair of the session supersedes the current one");
            }
            old.cut(LinkError::Superseded);
        }
        let arrival = Arrival {
            session: hello.session,
            conns: (main, urgent),
            guard: cutter.cut_on_drop(),
            cutter,
        };
        match &self.deliver {
            Some(deliver) => {
                drop(slots);
                deliver(arrival);
            }
            None => {
                slot.ready = Some(arrival);
                self.ready.notify_all();
            }
        }
    }

    /// Makes room for one more session, of a peer with `identity`: forgets remembered
    /// sessions (no live pair) beyond `max_sessions - 1` of them, the longest quiet first,
    /// among those it may ([`forgettable`](Self::forgettable)). `admits` refuses a new
    /// session while none can be forgotten, so the table stays within twice `max_sessions`
    /// (but for openers admitted at once, racing to be filed).
    fn remember(&self, slots: &mut Slots, identity: Option<[u8; 32]>) {
        let keep = self.admission.max_sessions.max(1) - 1;
        let mut quiet: Vec<(Instant, u64)> = (slots.sessions.iter())
            .filter(|(_, s)| !s.live() && self.forgettable(s, identity))
            .map(|(id, s)| (s.touched, *id))
            .collect();
        let paused = slots.sessions.values().filter(|s| !s.live()).count();
        let keep = keep.saturating_sub(paused - quiet.len());
        if quiet.len() <= keep {
            return;
        }
        quiet.sort_unstable();
        for (_, id) in &quiet[..quiet.len() - keep] {
            slots.sessions.remove(id);
        }
    }

    /// Drops half pairs whose other half has not come within the handshake deadline.
    pub fn drop_stale_halves(&self) {
        let limit = self.admission.handshake_deadline;
        let mut slots = self.lock();
        for slot in slots.sessions.values_mut() {
            if slot.since.is_some_and(|t| t.elapsed() > limit) {
                log::debug!("dropped half a connection pair: its other half never came");
                (slot.main, slot.urgent, slot.since) = (None, None, None);
            }
        }
    }

    /// Sessions held now (a pair or half of one, live or waiting to be taken).
    pub fn live_sessions(&self) -> usize {
        self.lock().sessions.values().filter(|s| s.live()).count()
    }

    /// Waits until `until` for the next pair of `session` (of any session with `None`).
    pub fn take(&self, session: Option<u64>, until: Instant) -> Option<Arrival> {
        let mut slots = self.lock();
        loop {
            let found = slots
                .sessions
                .iter_mut()
                .filter(|(s, _)| session.is_none_or(|want| want == **s))
                .find_map(|(_, slot)| slot.ready.take());
            if found.is_some() {
                return found;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            slots = (self.ready.wait_timeout(slots, left))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
