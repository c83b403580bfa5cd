//! The dispatcher: turns wanted chunks into ranged reads — urgent ones (asked for by a
//! fault) first, with their queued neighbours, then the background plan (a replayed
//! working set, then every chunk in order from the last fault) with the capacity left.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Background, Shared, State, Table};

impl Shared {
    /// Picks the next reads: urgent chunks first (each with its queued neighbours), then
    /// background runs while capacity is left.
    fn next_reads(&self) -> Vec<(Vec<usize>, bool)> {
        let o = &self.options;
        let mut t = self.lock();
        let mut reads = Vec::new();
        let per_read = (o.max_read / u64::from(self.geometry().chunk_size)).max(1) as usize;
        while t.in_flight < o.max_in_flight {
            let Some(c) = t.urgent.pop_front() else { break };
            if t.state[c] != State::Queued {
                continue;
            }
            let run = self.claim_run(&mut t, c, per_read, State::Queued);
            reads.push((run, false));
        }
        let limit = o.max_in_flight.saturating_sub(o.reserved_for_faults).max(1);
        while t.started_background
            && t.in_flight < limit
            && t.background_in_flight < o.max_background
            && o.background != Background::None
        {
            let Some(c) = self.next_background(&mut t) else {
                break;
            };
            let run = self.claim_run(&mut t, c, per_read, State::Idle);
            t.background_in_flight += run.len();
            reads.push((run, true));
        }
        reads
    }

    /// Marks `c` and following chunks in state `like` (and storage-adjacent) in flight.
    fn claim_run(&self, t: &mut Table, c: usize, per_read: usize, like: State) -> Vec<usize> {
        let layout = &self.fetcher.layout;
        let mut run = vec![c];
        t.state[c] = State::InFlight;
        while run.len() < per_read {
            let next = c + run.len();
            if next >= t.state.len() || t.state[next] != like || !layout.follows(next - 1, next) {
                break;
            }
            t.state[next] = State::InFlight;
            run.push(next);
        }
        t.in_flight += run.len();
        run
    }

    fn next_background(&self, t: &mut Table) -> Option<usize> {
        while let Some(c) = t.replay.pop_front() {
            if t.state[c] == State::Idle {
                return Some(c);
            }
        }
        let n = t.state.len();
        // Relaxed: a position hint; the table (under its lock) is the truth.
        let cursor = self.cursor.load(Ordering::Relaxed);
        if cursor != usize::MAX {
            t.scan = cursor % n.max(1);
            self.cursor.store(usize::MAX, Ordering::Relaxed);
        }
        for k in 0..n {
            let c = (t.scan + k) % n;
            if t.state[c] == State::Idle {
                t.scan = c;
                return Some(c);
            }
        }
        None
    }

    fn finish(&self, run: &[usize], ok: bool, background: bool) {
        let mut t = self.lock();
        if background {
            t.background_in_flight -= run.len();
        }
        for &c in run {
            if t.state[c] == State::InFlight {
                t.state[c] = if ok { State::Done } else { State::Idle };
            }
        }
        t.in_flight -= run.len();
    }
}

/// The dispatcher: runs until the source is dropped or fails.
pub(super) async fn run(shared: Arc<Shared>) {
    loop {
        if shared.stopped.load(Ordering::Relaxed) {
            return;
        }
        // Registered before looking at the table, so a wake-up in between is not lost.
        let woken = shared.wake.notified();
        shared.place_zero_pages();
        for (run, background) in shared.next_reads() {
            let s = shared.clone();
            let counter = if background {
                &s.background
            } else {
                &s.faulted
            };
            counter.fetch_add(run.len() as u64, Ordering::Relaxed);
            tokio::spawn(async move {
                let ok = s.fetcher.fetch(&run, &*s).await;
                s.finish(&run, ok, background);
                s.wake.notify_one();
            });
        }
        woken.await;
    }
}
