//! Fault handlers' page requests on an encrypted connection.
//!
//! A fault handler must reach its next `read()` without allocating (a forking thread of
//! the faulting process may hold the allocator's locks until the handler reads the FORK
//! event; see the pager's worker docs), and sealing a TLS record allocates. So on such a
//! connection a request is queued — in a buffer allocated once, under a lock held only
//! by our own threads — and a thread of the pair seals and sends it. That costs one
//! thread wake-up per batch of requests; `uffdkit migrate netbench --tls` measures it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::{Chan, Cutter};
use crate::net::SendMessage;
use crate::wire::PageRange;

/// Ranges the queue holds before a fault handler waits for room.
const QUEUED: usize = 1024;
/// Ranges per REQ_PAGES frame (fits the writer's preallocated buffer).
const PER_FRAME: usize = 200;

/// Requests waiting for the forwarding thread.
pub(crate) struct Forward {
    queue: Mutex<Vec<PageRange>>,
    wake: Condvar,
    room: Condvar,
    closed: AtomicBool,
    /// How long a fault handler waits for room before it gives the connection up.
    patience: Duration,
}

impl Forward {
    pub fn new(patience: Duration) -> Forward {
        Forward {
            queue: Mutex::new(Vec::with_capacity(QUEUED)),
            wake: Condvar::new(),
            room: Condvar::new(),
            closed: AtomicBool::new(false),
            patience,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<PageRange>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_closed(&self) -> bool {
        // Relaxed: re-checked under the queue's lock after every wake-up.
        self.closed.load(Ordering::Relaxed)
    }

    /// Queues `ranges` without allocating (the queue never grows past its capacity);
    /// false if no room came within the patience or the pair is closing.
    pub fn push(&self, ranges: &[PageRange]) -> bool {
        let mut queue = self.lock();
        for r in ranges {
            while queue.len() >= QUEUED {
                if self.is_closed() {
                    return false;
                }
                let (q, waited) = (self.room.wait_timeout(queue, self.patience))
                    .unwrap_or_else(|p| p.into_inner());
                queue = q;
                if waited.timed_out() && queue.len() >= QUEUED {
                    return false;
                }
            }
            queue.push(*r);
        }
        drop(queue);
        self.wake.notify_one();
        true
    }

    /// Ends [`Forward::run`] and any wait for room.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let _queue = self.lock();
        self.wake.notify_all();
        self.room.notify_all();
    }

    /// Sends what is queued on `chan` until the pair is cut or closed.
    pub fn run(&self, chan: &Chan, cutter: &Cutter) {
        let mut batch = Vec::with_capacity(QUEUED);
        loop {
            {
                let mut queue = self.lock();
                while queue.is_empty() && !self.is_closed() && !cutter.is_cut() {
                    queue = (self.wake.wait_timeout(queue, Duration::from_millis(100)))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                if self.is_closed() || cutter.is_cut() {
                    return;
                }
                std::mem::swap(&mut *queue, &mut batch);
            }
            self.room.notify_all();
            for ranges in batch.chunks(PER_FRAME) {
                if let Err(e) = chan.writer().request(ranges) {
                    return cutter.cut(e);
                }
            }
            batch.clear();
        }
    }
}
