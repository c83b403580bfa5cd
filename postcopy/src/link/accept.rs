//! The listening side of sessions: accepts, authenticates every connection on a thread of
//! its own (bounded by the silence deadline, so a silent stranger costs a few seconds),
//! pairs a session's main and urgent connections of one generation, and lets a newer
//! generation supersede the pair the session had: the old sockets are shut down, so a
//! peer that reconnects through a partition is let in even while this side still waits
//! on the dead pair.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Cutter, Timing};
use crate::auth::{self, Hello, Key};
use crate::error::{chain, LinkError};
use crate::net::{Addr, Conn, Listener, Socket};
use crate::wire::{Channel, Role, ShutReason};
use crate::Error;

/// An authenticated connection pair of one session generation.
pub(crate) struct Arrival {
    /// Its session.
    pub session: u64,
    /// The main and the urgent connection.
    pub conns: (Conn, Conn),
    /// Cuts both (a newer generation cuts it too).
    pub cutter: Arc<Cutter>,
}

/// Which sessions a listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// The first authenticated session only (a migration destination).
    OneSession,
    /// Any number (a page server).
    AnySession,
}

/// Counters of a listener.
#[derive(Debug, Default)]
pub struct AcceptStats {
    /// Connections that authenticated and were admitted.
    pub admitted: AtomicU64,
    /// Connections refused (a failed handshake, a wrong key or role, another session).
    pub refused: AtomicU64,
    /// Connection pairs superseded by a newer generation of their session.
    pub superseded: AtomicU64,
}

type Deliver = Box<dyn Fn(Arrival) + Send + Sync>;

struct Shared {
    listener: Listener,
    key: Key,
    timing: Timing,
    peer: Role,
    admit: Admit,
    stop: AtomicBool,
    slots: Mutex<Slots>,
    ready: Condvar,
    deliver: Option<Deliver>,
    stats: AcceptStats,
}

#[derive(Default)]
struct Slots {
    owner: Option<u64>,
    sessions: HashMap<u64, Slot>,
}

/// One session's connections: the newest generation's halves, its pair ready to be
/// taken, and the cutter of its latest pair (which the next pair supersedes).
#[derive(Default)]
struct Slot {
    generation: u32,
    main: Option<Conn>,
    urgent: Option<Conn>,
    ready: Option<Arrival>,
    active: Option<Arc<Cutter>>,
}

/// A listener accepting sessions on a thread of its own; stops on drop.
pub(crate) struct Acceptor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Accepts openers of role `peer` on `listener`. With `deliver`, each ready pair is
    /// handed to it (on a handshake thread); without, pairs wait for [`Acceptor::take`].
    pub fn start(
        listener: Listener,
        key: Key,
        timing: Timing,
        peer: Role,
        admit: Admit,
        deliver: Option<Deliver>,
    ) -> Result<Acceptor, Error> {
        let shared = Arc::new(Shared {
            listener,
            key,
            timing,
            peer,
            admit,
            stop: AtomicBool::new(false),
            slots: Mutex::default(),
            ready: Condvar::new(),
            deliver,
            stats: AcceptStats::default(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pc-accept".into())
            .spawn(move || accept_loop(&s))
            .map_err(Error::io("start the accepting thread"))?;
        Ok(Acceptor {
            shared,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<Addr, Error> {
        (self.shared.listener.local_addr()).map_err(Error::io("read the listening address"))
    }

    /// The counters.
    pub fn stats(&self) -> &AcceptStats {
        &self.shared.stats
    }

    /// Waits until `until` for the next pair of `session` (of any session with `None`).
    pub fn take(&self, session: Option<u64>, until: Instant) -> Option<Arrival> {
        let mut slots = self.shared.lock();
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
            slots = (self.shared.ready.wait_timeout(slots, left))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.listener.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refuse(&self, mut conn: Conn, detail: &str, why: &str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        log::info!("refused a connection: {why}");
        auth::refuse(&mut conn, ShutReason::Error, detail);
    }

    /// Files an authenticated connection under its session; a completed pair supersedes
    /// the session's previous pair and is delivered.
    fn deposit(&self, hello: Hello, conn: Conn) {
        let mut slots = self.lock();
        if self.admit == Admit::OneSession {
            match slots.owner {
                Some(owner) if owner != hello.session => {
                    drop(slots);
                    let detail = "another session is in progress here";
                    return self.refuse(conn, detail, detail);
                }
                _ => slots.owner = Some(hello.session),
            }
        }
        self.stats.admitted.fetch_add(1, Ordering::Relaxed);
        // Sessions whose pair broke and that have nothing pending are forgotten (a client
        // coming back starts a slot afresh, its generation still newer than any stale one).
        slots.sessions.retain(|_, s| {
            s.main.is_some() || s.urgent.is_some() || s.active.as_ref().is_some_and(|c| !c.is_cut())
        });
        let slot = slots.sessions.entry(hello.session).or_default();
        if hello.generation < slot.generation {
            return log::debug!(
                "dropped a stale connection of generation {}",
                hello.generation
            );
        }
        if hello.generation > slot.generation {
            (slot.generation, slot.main, slot.urgent) = (hello.generation, None, None);
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
}

fn accept_loop(shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::Relaxed) {
        match shared.listener.accept_timeout(Duration::from_millis(200)) {
            Ok(Some(socket)) => {
                let s = shared.clone();
                let started = std::thread::Builder::new()
                    .name("pc-handshake".into())
                    .spawn(move || handshake(&s, socket));
                if let Err(e) = started {
                    log::warn!("cannot start a handshake thread: {e}");
                }
            }
            Ok(None) => {}
            // Out of fds or memory for a moment, an aborted connection: keep listening.
            Err(e) => {
                if !shared.stop.load(Ordering::Relaxed) {
                    log::warn!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

fn handshake(shared: &Shared, socket: Socket) {
    let mut conn = match Conn::plain(socket) {
        Ok(c) => c,
        Err(e) => return log::warn!("cannot use an accepted connection: {e}"),
    };
    // A stranger that says nothing is dropped after the deadline.
    if let Err(e) = conn.set_deadline(shared.timing.silence) {
        return log::warn!("cannot set a deadline: {e}");
    }
    let hello = match auth::listen(&mut conn, &shared.key) {
        Ok(h) => h,
        Err(e) => {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            // A wrong key is worth a warning; a probe that closes or says nothing is not.
            let level = match e {
                Error::Refused { .. } => log::Level::Warn,
                Error::Link(_) => log::Level::Debug,
                _ => log::Level::Info,
            };
            return log::log!(level, "refused a connection: {}", chain(&e));
        }
    };
    if hello.role != shared.peer {
        let detail = format!(
            "a {:?} connected where only a {:?} may",
            hello.role, shared.peer
        );
        return shared.refuse(conn, &detail, &detail);
    }
    shared.deposit(hello, conn);
}
