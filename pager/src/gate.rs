//! The placement gate: orders placements against the reading of REMOVE events.
//!
//! Why: `madvise(MADV_DONTNEED)` on registered memory queues a REMOVE event, waits until a
//! handler has *read* it, and only then zaps the range. While the event is queued the
//! kernel refuses placements (EAGAIN); once it is read they succeed again. So a placement
//! by another thread that checked the page states before the REMOVE was applied to them,
//! and whose ioctl runs after the read and after the zap, lands stale image data where
//! zeros belong — and nothing can take it back out of another process's memory. The gate
//! closes that window: a handler closes it around `read(2)` and the handling of the batch's
//! address-space events; a placement holds it open from its decision (page state, removed
//! bit) through its ioctl. Either the placement's ioctl ran before the REMOVE was read
//! (the later zap then drops it, and the fault that follows sees the REMOVE), or it starts
//! after the REMOVE is in the page states.
//!
//! It is a counter, not a lock: placements in flight in the low 32 bits, the reader (at
//! most one: a second handler woken by the same event polls again instead) in the high 32. No allocation and no blocking call: a waiting side spins, yields, then sleeps
//! with `clock_nanosleep(2)`, all async-signal-safe, so the SIGBUS handler enters it too.
//! Neither side ever waits while holding the other's side (a placement never reads events;
//! a reader never places), so it cannot deadlock. A gate built without REMOVE events to
//! guard only counts placements (for completion) and never waits.
//!
//! Every access is SeqCst: the whole protocol is on one atomic, whose RMWs are totally
//! ordered anyway, and on x86-64 SeqCst RMWs and loads cost the same as weaker ones.

use crate::sigsafe::backoff;
use crate::sync::{AtomicU64, Ordering::SeqCst};

/// One reader in the high half.
const READER: u64 = 1 << 32;
/// The placement count in the low half.
const PLACERS: u64 = READER - 1;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Gate {
    state: AtomicU64,
    guards_reads: bool,
}

/// A placement in flight; dropping it leaves the gate.
#[must_use = "the placement holds the gate only while this lives"]
pub(crate) struct Placing<'a>(&'a Gate);

/// The gate held closed for a read; dropping it opens the gate.
#[must_use = "the read holds the gate closed only while this lives"]
pub(crate) struct Reading<'a>(Option<&'a Gate>);

impl Gate {
    /// A gate; `guards_reads` when REMOVE events can arrive (EVENT_REMOVE negotiated).
    pub fn new(guards_reads: bool) -> Self {
        Self {
            state: AtomicU64::new(0),
            guards_reads,
        }
    }

    /// Enters for one placement (its decision and its ioctl), waiting while a reader
    /// holds the gate closed. Never call it twice in one thread without leaving first.
    #[inline]
    pub fn enter(&self) -> Placing<'_> {
        let mut spins = 0;
        loop {
            let before = self.state.fetch_add(1, SeqCst);
            if !self.guards_reads || before & !PLACERS == 0 {
                return Placing(self);
            }
            // A reader is in: step back so it can drain, and wait for it to finish.
            self.state.fetch_sub(1, SeqCst);
            while self.state.load(SeqCst) & !PLACERS != 0 {
                backoff(&mut spins);
            }
        }
    }

    /// Closes the gate for a read of events, unless another reader holds it closed (then
    /// `None`: that reader takes the pending events; poll again rather than read after it
    /// — a second handler woken by the same event would only read nothing, and make the
    /// first one's placement wait for that). Waits until no placement is in flight; new
    /// placements wait until the returned guard is dropped.
    #[inline]
    pub fn try_close(&self) -> Option<Reading<'_>> {
        if !self.guards_reads {
            return Some(Reading(None));
        }
        let mut now = self.state.load(SeqCst);
        loop {
            if now & !PLACERS != 0 {
                return None;
            }
            match self
                .state
                .compare_exchange_weak(now, now + READER, SeqCst, SeqCst)
            {
                Ok(_) => break,
                Err(actual) => now = actual,
            }
        }
        let mut spins = 0;
        while self.state.load(SeqCst) & PLACERS != 0 {
            backoff(&mut spins);
        }
        Some(Reading(Some(self)))
    }

    /// Waits (spinning, then yielding, then sleeping) until no reader holds the gate
    /// closed. For a handler that lost the race to read: the uffd stays readable until
    /// the reader has read, so polling again at once would spin on it.
    pub fn wait_open(&self) {
        let mut spins = 0;
        while self.state.load(SeqCst) & !PLACERS != 0 {
            backoff(&mut spins);
        }
    }

    /// Placements in flight now.
    pub fn placing(&self) -> u64 {
        self.state.load(SeqCst) & PLACERS
    }
}

impl Drop for Placing<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.state.fetch_sub(1, SeqCst);
    }
}

impl Drop for Reading<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(gate) = self.0 {
            gate.state.fetch_sub(READER, SeqCst);
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;
    use loom::thread;

    /// The gate's promise: a placement's critical section never overlaps a read's.
    #[test]
    fn a_placement_never_overlaps_a_read() {
        loom::model(|| {
            let gate = Arc::new(Gate::new(true));
            let reading = Arc::new(AtomicBool::new(false));
            let placing = Arc::new(AtomicBool::new(false));
            let placer = {
                let (gate, reading, placing) = (gate.clone(), reading.clone(), placing.clone());
                thread::spawn(move || {
                    let _in = gate.enter();
                    placing.store(true, SeqCst);
                    assert!(!reading.load(SeqCst), "placed during a read");
                    placing.store(false, SeqCst);
                })
            };
            if let Some(_closed) = gate.try_close() {
                reading.store(true, SeqCst);
                assert!(!placing.load(SeqCst), "read during a placement");
                reading.store(false, SeqCst);
            }
            placer.join().expect("placer");
            assert_eq!(gate.placing(), 0);
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn placements_and_reads_exclude_each_other_under_real_threads() {
        let gate = Gate::new(true);
        let inside = AtomicUsize::new(0); // +1 per placement, +1000 per read
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        let _p = gate.enter();
                        let now = inside.fetch_add(1, SeqCst) + 1;
                        assert!(now < 1000, "a placement overlapped a read");
                        inside.fetch_sub(1, SeqCst);
                    }
                });
            }
            // Two readers: per-CPU handlers read the same uffd at once.
            for _ in 0..2 {
                s.spawn(|| {
                    let mut reads = 0;
                    while reads < 20_000 {
                        let Some(_r) = gate.try_close() else {
                            std::hint::spin_loop();
                            continue;
                        };
                        let now = inside.fetch_add(1000, SeqCst) + 1000;
                        assert!(now == 1000, "a read overlapped a placement or a read");
                        inside.fetch_sub(1000, SeqCst);
                        reads += 1;
                    }
                });
            }
        });
        assert_eq!(gate.placing(), 0);
    }

    #[test]
    fn an_unguarded_gate_only_counts() {
        let gate = Gate::new(false);
        let _closed = gate.try_close();
        let p = gate.enter(); // would wait forever if it guarded
        assert_eq!(gate.placing(), 1);
        drop(p);
        assert_eq!(gate.placing(), 0);
    }
}
