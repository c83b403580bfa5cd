//! An engine's bell: an eventfd it writes when a page leaves Requested (placed, or its
//! claim given back) while someone waits on one of its pages — a forked child's handler
//! (`parent.rs`), the prefetcher waiting for a remote source's run (`prefetch.rs`) — so
//! they sleep until then instead of polling. It is written only while `watched` says
//! someone waits, and never read: each waiter watches it edge-triggered through an epoll
//! of its own ([`Bell`]), so one write wakes every waiter and none has to reset it for
//! the others. A stop rings it too.
//!
//! Orderings: a waiter counts itself in `watched` and then reads the page's state; a
//! placement publishes the state and then reads `watched`; a SeqCst fence between the two
//! steps on each side means at least one of them sees the other (Dekker): the waiter sees
//! the page placed, or the placement rings.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::error::{Error, Result};
use crate::shared::Shared;

impl Shared {
    /// A waiter (a forked child's handler, the prefetcher) starts (`true`) or stops
    /// waiting on this engine's pages.
    pub(crate) fn watch(&self, start: bool) {
        if start {
            self.watched.fetch_add(1, Ordering::Relaxed);
            // SeqCst: the count is visible before the caller reads the page's state
            // (module docs), or a placement might not ring.
            fence(Ordering::SeqCst);
        } else {
            self.watched.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A page of this engine left Requested: wakes whoever waits on one (module docs).
    /// Async-signal-safe: a fence, a load and `write(2)`.
    pub(crate) fn ring(&self) {
        // SeqCst: the page's new state is visible before `watched` is read (module docs).
        fence(Ordering::SeqCst);
        if self.watched.load(Ordering::Relaxed) > 0 {
            let _ = self.bell.write(1);
        }
    }
}

/// A waiter's view of an engine's bell: an epoll holding the bell edge-triggered,
/// readable after each ring until [`clear`](Self::clear)ed.
pub(crate) struct Bell(Epoll);

impl Bell {
    /// A view of `engine`'s bell.
    pub fn of(engine: &Shared) -> Result<Bell> {
        let io = |e: nix::Error| Error::Io {
            what: "watch a pager's bell",
            source: e.into(),
        };
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io)?;
        let edge = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, 0);
        epoll.add(engine.bell.as_fd(), edge).map_err(io)?;
        Ok(Bell(epoll))
    }

    /// What to poll: readable once the engine rang since the last [`clear`](Self::clear).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0 .0.as_fd()
    }

    /// Takes the rings so far (the next one makes [`fd`](Self::fd) readable again).
    pub fn clear(&self) {
        let mut events = [EpollEvent::empty()];
        let _ = self.0.wait(&mut events, EpollTimeout::ZERO);
    }

    /// Waits until the engine rings, or `timeout` passes; takes the rings.
    pub fn wait(&self, timeout: Duration) {
        let mut events = [EpollEvent::empty()];
        let timeout = EpollTimeout::try_from(timeout).unwrap_or(EpollTimeout::NONE);
        let _ = self.0.wait(&mut events, timeout);
    }
}
