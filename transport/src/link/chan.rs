//! One connection's writing side ([`Chan`]), shared by the threads that send on it: the
//! phase logic, the readers answering requests, the heartbeat and fault handlers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::forward::Forward;
use super::{Channel, LinkError};
use crate::conn::FrameWriter;
use crate::net::Link;
use crate::wire::Control;

/// One connection's writing side, shared by the threads that send on it.
pub struct Chan {
    /// What it carries.
    pub channel: Channel,
    /// Its pair's epoch ([`Pair::epoch`](super::Pair::epoch)): a receiver can tell frames of a superseded pair
    /// from the newest's.
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
pub struct Sending<'a> {
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
    pub(super) fn new(
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
    pub(super) fn stalled(&self, limit: Duration) -> bool {
        let since = self.busy_since.load(Ordering::Relaxed);
        since != 0 && self.now().saturating_sub(since) > limit.as_nanos() as u64
    }

    /// Sends the frame `encode` writes (into the writer's preallocated buffer).
    pub fn send_with(&self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(), LinkError> {
        self.writer().send_with(encode)
    }

    /// Sends one of the link's messages (a SHUT).
    pub fn send_control(&self, msg: &Control) -> Result<(), LinkError> {
        self.writer().send_control(msg)
    }

    /// Sends a heartbeat unless another thread is sending (its bytes show the link is
    /// alive, and waiting for it could starve the other connection's heartbeat).
    pub(super) fn beat(&self, seq: u64) -> Result<(), LinkError> {
        let writer = match self.writer.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        self.sending(writer).send_control(&Control::Ping { seq })
    }

    /// Sends the frames `encode` writes (at most `len` bytes) without allocating — on an
    /// encrypted connection through the pair's forwarding thread (see
    /// [`Inbound::forwards_requests`](super::Inbound::forwards_requests)); on failure shuts the connection down (its reader
    /// reports the break). For fault handlers, which must not allocate.
    pub fn request_with(&self, len: usize, encode: impl FnOnce(&mut Vec<u8>)) {
        let sent = match &self.forward {
            Some(forward) => forward.push(len, encode),
            None => self.writer().send_with(encode).is_ok(),
        };
        if !sent {
            self.link.shutdown();
        }
    }
}
