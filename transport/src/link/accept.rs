//! The listening side of sessions: one thread takes every connection through its
//! handshake (`gate`), then this pairs a session's main and urgent connections of one
//! generation and lets a newer generation supersede the pair the session had: the old
//! sockets are shut down, so a peer that reconnects through a partition is let in even
//! while this side still waits on the dead pair.
//!
//! Sessions are admitted (by the session table, `sessions`) before the opener is told it
//! is in: a migration destination takes the first session only, a page server up to
//! [`Admission::max_sessions`] (a session already here — reconnecting — always), and a
//! session authenticated by a certificate keeps that certificate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::sessions::{AcceptStats, Admit, Arrival, Deliver, Shared};
use super::{Admission, Role, Timing};
use crate::wire::Protocol;
use crate::{Addr, Error, Listener, Security};

/// A listener admitting sessions on a thread of its own; stops on drop.
pub struct Acceptor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Accepts openers of role `peer` speaking `protocol` on `listener`, secured as
    /// `security` says. With
    /// `deliver`, each ready pair is handed to it (on the accepting thread: it must not
    /// block); without, pairs wait for [`Acceptor::take`].
    pub fn start(
        listener: Listener,
        (protocol, security): (Protocol, Security),
        (timing, admission): (Timing, Admission),
        (peer, admit): (Role, Admit),
        deliver: Option<Deliver>,
    ) -> Result<Acceptor, Error> {
        listener
            .set_nonblocking(true)
            .map_err(Error::io("make the listener non-blocking"))?;
        let shared = Arc::new(Shared {
            listener,
            protocol,
            security,
            timing,
            admission,
            peer,
            admit,
            stop: AtomicBool::new(false),
            slots: Mutex::default(),
            ready: Condvar::new(),
            deliver,
            stats: AcceptStats::default(),
        });
        let s = shared.clone();
        let draw = super::evict::Draw::new()?;
        let thread = std::thread::Builder::new()
            .name("link-accept".into())
            .spawn(move || super::gate::run(&s, draw))
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

    /// The socket file a Unix listener claimed (see [`Listener::socket_file`]).
    pub fn socket_file(&self) -> Option<crate::socket_file::SocketFile> {
        self.shared.listener.socket_file().cloned()
    }

    /// The counters.
    pub fn stats(&self) -> &AcceptStats {
        &self.shared.stats
    }

    /// Sessions held now (a pair or half of one, live or waiting to be taken).
    pub fn sessions(&self) -> usize {
        self.shared.live_sessions()
    }

    /// Waits until `until` for the next pair of `session` (of any session with `None`).
    pub fn take(&self, session: Option<u64>, until: Instant) -> Option<Arrival> {
        self.shared.take(session, until)
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
