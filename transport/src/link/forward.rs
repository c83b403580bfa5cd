//! Fault handlers' frames (page requests) on an encrypted connection.
//!
//! A fault handler must reach its next `read()` without allocating (a forking thread of
//! the faulting process may hold the allocator's locks until the handler reads the FORK
//! event; see the pager's worker docs), and sealing a TLS record allocates. So on such a
//! connection a frame is queued — encoded into a buffer allocated once, under a lock held
//! only by our own threads — and a thread of the pair seals and sends the queue. That
//! costs one thread wake-up per batch; `uffdkit migrate netbench --tls` measures it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::LinkError;

/// Bytes of frames the queue holds before a fault handler waits for room.
const QUEUED: usize = 64 << 10;

/// Frames waiting for the forwarding thread.
pub(super) struct Forward {
    queue: Mutex<Vec<u8>>,
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

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_closed(&self) -> bool {
        // Relaxed: re-checked under the queue's lock after every wake-up.
        self.closed.load(Ordering::Relaxed)
    }

    /// Queues the frames `encode` writes (at most `len` bytes) without allocating (the
    /// queue never grows past its capacity); false if no room came within the patience,
    /// the pair is closing, or they could never fit.
    pub fn push(&self, len: usize, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        if len > QUEUED {
            return false;
        }
        let mut queue = self.lock();
        loop {
            // Closed (the pair cut, the forwarder gone): nothing would send it.
            if self.is_closed() {
                return false;
            }
            if queue.len() + len <= QUEUED {
                break;
            }
            let (q, waited) =
                (self.room.wait_timeout(queue, self.patience)).unwrap_or_else(|p| p.into_inner());
            queue = q;
            if waited.timed_out() && queue.len() + len > QUEUED {
                return false;
            }
        }
        let before = queue.len();
        encode(&mut queue);
        debug_assert!(queue.len() - before <= len, "a frame longer than announced");
        drop(queue);
        self.wake.notify_one();
        true
    }

    /// Ends [`Forward::run`] and any wait for room.
    pub fn close(&self) {
        let _queue = self.lock();
        // Under the lock: a push that takes it after this sees the queue closed.
        self.closed.store(true, Ordering::Relaxed);
        self.wake.notify_all();
        self.room.notify_all();
    }

    /// Writes what is queued with `write` until it fails (its error is returned), the
    /// queue is closed or `cut()` says the pair is; then closes the queue, so a frame
    /// pushed later is refused at once rather than accepted and never sent (and a fault
    /// handler waiting for room does not wait out its patience).
    pub fn run(
        &self,
        cut: impl Fn() -> bool,
        write: impl FnMut(&[u8]) -> Result<(), LinkError>,
    ) -> Result<(), LinkError> {
        let ended = self.forward(cut, write);
        self.close();
        ended
    }

    fn forward(
        &self,
        cut: impl Fn() -> bool,
        mut write: impl FnMut(&[u8]) -> Result<(), LinkError>,
    ) -> Result<(), LinkError> {
        let mut batch = Vec::with_capacity(QUEUED);
        loop {
            {
                let mut queue = self.lock();
                while queue.is_empty() && !self.is_closed() && !cut() {
                    queue = (self.wake.wait_timeout(queue, Duration::from_millis(100)))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                if self.is_closed() || cut() {
                    return Ok(());
                }
                std::mem::swap(&mut *queue, &mut batch);
            }
            self.room.notify_all();
            write(&batch)?;
            batch.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once the forwarding thread has stopped (the pair was cut), a frame pushed is
    /// refused at once — not accepted into a queue nobody sends — and a handler waiting
    /// for room is let go without waiting out its patience.
    #[test]
    fn frames_pushed_after_the_forwarder_stopped_are_refused_at_once() {
        let forward = Forward::new(Duration::from_secs(30));
        assert!(forward.push(16, |q| q.extend_from_slice(&[1; 16])));
        let sent = std::cell::Cell::new(0);
        let ended = forward.run(
            || sent.get() > 0,
            |batch| {
                sent.set(sent.get() + batch.len());
                Ok(())
            },
        );
        assert!(ended.is_ok());
        assert_eq!(sent.get(), 16, "what was queued before the cut went out");
        let t = std::time::Instant::now();
        assert!(!forward.push(16, |q| q.extend_from_slice(&[2; 16])));
        assert!(!forward.push(QUEUED, |q| q.resize(q.len() + QUEUED, 3)));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
}
