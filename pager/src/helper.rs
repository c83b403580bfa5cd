//! A second thread for work that splits into pieces: [`Helper::for_each`] calls a function
//! on every index, on the caller's thread and the helper's at once. A receiver lands a long
//! run of arriving pages so (each piece's digest and `UFFDIO_COPY` on whichever CPU is
//! free): one thread landing a whole stream was its bottleneck while the other CPU idled.
//!
//! Why pieces taken in turn and not halves: on a busy machine the helper's wakeup can take
//! as long as its half (0.33 ms on average here), and a caller waiting for it would be
//! slower than one doing everything. Why a thread kept for the purpose and not
//! `std::thread::scope`: a spawn costs 140–270 µs here, as much as landing half a MiB.
//! Why `unsafe`: the job borrows the caller's data, and the helper thread outlives any one
//! call, so the compiler cannot see that the call never returns while the job may still
//! run. It does not, on every path — a panic in either thread included — and that is the
//! one promise the one `unsafe` block rests on (crossbeam's and rayon's scopes rest on the
//! same).

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// A job with its borrows erased: see [`Helper::for_each`] for why it cannot outlive them.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// What the helper is doing; changed under [`Slot::state`]'s lock, announced on its
/// condition variable.
enum State {
    /// Free for a [`Helper::for_each`].
    Idle,
    /// Claimed by a call, which is about to hand its job over.
    Claimed,
    /// A job handed over, not started yet.
    Job(Job),
    /// The helper runs the job.
    Running,
    /// The job is over: `Some(payload)` if it panicked.
    Done(Option<Box<dyn Any + Send>>),
    /// The helper is being dropped: its thread leaves.
    Closed,
}

struct Slot {
    state: Mutex<State>,
    changed: Condvar,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock (jobs run outside it).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, state: State) {
        *self.lock() = state;
        self.changed.notify_all();
    }
}

/// A helper thread (see the module docs).
pub struct Helper {
    slot: Arc<Slot>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Helper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helper").finish_non_exhaustive()
    }
}

impl Helper {
    /// Starts a helper thread named `name`; without one (the spawn failed: logged),
    /// [`Helper::for_each`] runs everything on its caller.
    pub fn new(name: &str) -> Helper {
        let slot = Arc::new(Slot {
            state: Mutex::new(State::Idle),
            changed: Condvar::new(),
        });
        let s = slot.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || serve(&s))
            .inspect_err(|e| log::warn!("no helper thread {name}, one thread works: {e}"))
            .ok();
        if thread.is_none() {
            *slot.lock() = State::Closed;
        }
        Helper { slot, thread }
    }

    /// Calls `f(i)` for every `i` in `0..n`, on this thread and on the helper at once (each
    /// takes the next index until none is left), and returns once every call has ended;
    /// after an error no further index is taken, and the first error is returned. A panic
    /// in either thread is resumed here once both are done.
    ///
    /// The helper takes part only if it starts in time: a job it has not started when this
    /// thread has run out of indices is taken back, never waited for (its wakeup on a busy
    /// CPU took 0.33 ms on average here, as long as the work). So it never takes longer
    /// than calling `f` on every index here, but for one wakeup. When another call holds
    /// the helper, or for a single index, everything runs here.
    pub fn for_each<E: Send>(
        &self,
        n: usize,
        f: impl Fn(usize) -> Result<(), E> + Sync,
    ) -> Result<(), E> {
        let next = AtomicUsize::new(0);
        let failed = Mutex::new(None);
        let work = || loop {
            // Relaxed: the index is all it hands out; what `f` did is ordered by the slot's
            // lock (this thread sees the helper's Done under it).
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return;
            }
            if let Err(e) = f(i) {
                next.store(n, Ordering::Relaxed);
                let mut first = failed.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert(e);
                return;
            }
        };
        if self.claim(n) {
            let job: Box<dyn FnOnce() + Send + '_> = Box::new(work);
            // SAFETY: only the lifetime changes (same layout). The job borrows `next`,
            // `failed` and `f`, which outlive this call, and it does not outlive the call:
            // `Settle` (by `done`, or by its drop if `work` unwinds here) returns only once
            // the job was taken back unstarted, or ran to its end (the helper drops it
            // before it says Done: `serve`).
            let job = unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + '_>, Job>(job) };
            let settle = Settle(&self.slot);
            self.slot.set(State::Job(job));
            work();
            if let Some(panic) = settle.done() {
                resume_unwind(panic);
            }
        } else {
            work();
        }
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Takes the helper for one call of `n` indices, if it is free and worth waking.
    fn claim(&self, n: usize) -> bool {
        if n < 2 {
            return false;
        }
        let mut state = self.slot.lock();
        let free = matches!(*state, State::Idle);
        if free {
            *state = State::Claimed;
        }
        free
    }
}

/// Ends a hand-over: takes the job back if the helper has not started it, else waits for
/// its end — in [`Settle::done`], or in the drop when the caller's part unwinds (so the
/// borrows the job holds stay alive until it is over).
struct Settle<'a>(&'a Slot);

impl Settle<'_> {
    /// The job is over: `Some(payload)` if it panicked on the helper.
    fn done(self) -> Option<Box<dyn Any + Send>> {
        let panic = settle(self.0);
        std::mem::forget(self);
        panic
    }
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        let _ = settle(self.0);
    }
}

fn settle(slot: &Slot) -> Option<Box<dyn Any + Send>> {
    let mut state = slot.lock();
    loop {
        match std::mem::replace(&mut *state, State::Idle) {
            State::Job(job) => {
                drop(state);
                drop(job);
                return None;
            }
            State::Done(panic) => return panic,
            running => *state = running,
        }
        state = slot.changed.wait(state).unwrap_or_else(|p| p.into_inner());
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // No call is running (it borrows the helper), so the helper is idle.
        self.slot.set(State::Closed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("a helper thread panicked outside its jobs");
            }
        }
    }
}

/// The helper thread: runs each job handed over, until closed.
fn serve(slot: &Slot) {
    loop {
        let job = {
            let mut state = slot.lock();
            loop {
                match std::mem::replace(&mut *state, State::Running) {
                    State::Job(job) => break job,
                    State::Closed => return,
                    other => *state = other,
                }
                state = slot.changed.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        };
        // The job (and its borrows) is dropped inside, before Done is said.
        let panic = catch_unwind(AssertUnwindSafe(job)).err();
        slot.set(State::Done(panic));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::ThreadId;
    use std::time::Duration;

    /// Waits until `flag` is set (the helper has begun a call of its own).
    fn until(flag: &AtomicUsize) {
        while flag.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
    }

    #[test]
    fn every_index_is_called_once_and_both_threads_take_part() {
        let helper = Helper::new("test-helper");
        let here = std::thread::current().id();
        let (mine, helping) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let ran = Mutex::new(vec![Vec::new(); 64]);
        helper
            .for_each(64, |i| {
                let me = std::thread::current().id();
                ran.lock().unwrap()[i].push(me);
                // Each thread, once in, waits for the other to be in too: whichever
                // starts first (the helper can, if this thread is preempted after handing
                // the job over) cannot take every index alone.
                let (own, other) = match me == here {
                    true => (&mine, &helping),
                    false => (&helping, &mine),
                };
                own.fetch_add(1, Ordering::Release);
                until(other);
                Ok::<_, ()>(())
            })
            .unwrap();
        let ran: Vec<Vec<ThreadId>> = ran.into_inner().unwrap();
        assert!(ran.iter().all(|r| r.len() == 1), "{ran:?}");
        assert!(ran.iter().any(|r| r[0] == here));
        assert!(ran.iter().any(|r| r[0] != here));
    }

    #[test]
    fn the_first_error_is_returned_and_no_index_is_taken_after_it() {
        let helper = Helper::new("test-helper");
        let calls = AtomicUsize::new(0);
        let r = helper.for_each(1000, |i| {
            calls.fetch_add(1, Ordering::Relaxed);
            if i == 3 {
                return Err(i);
            }
            std::thread::sleep(Duration::from_millis(1));
            Ok(())
        });
        assert_eq!(r, Err(3));
        assert!(calls.load(Ordering::Relaxed) < 10);
    }

    #[test]
    fn a_panic_on_the_helper_reaches_the_caller_after_both_ended() {
        let helper = Helper::new("test-helper");
        let here = std::thread::current().id();
        let (helping, mine) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let r = catch_unwind(AssertUnwindSafe(|| {
            helper.for_each(8, |_| {
                if std::thread::current().id() != here {
                    helping.store(1, Ordering::Release);
                    panic!("on the helper");
                }
                until(&helping);
                mine.fetch_add(1, Ordering::Relaxed);
                Ok::<_, ()>(())
            })
        }));
        assert!(r.is_err());
        assert!(mine.load(Ordering::Relaxed) > 0);
        // Free again afterwards.
        assert_eq!(helper.for_each(4, |_| Ok::<_, ()>(())), Ok(()));
    }

    #[test]
    fn a_panic_here_waits_for_the_helpers_call_in_progress() {
        let helper = Helper::new("test-helper");
        let here = std::thread::current().id();
        let (started, finished) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let entered = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            helper.for_each(8, |_| {
                if std::thread::current().id() == here {
                    entered.store(1, Ordering::Release);
                    until(&started);
                    panic!("here");
                }
                // Not every index before this thread took one (it may be preempted after
                // handing the job over): it must get to panic.
                until(&entered);
                started.fetch_add(1, Ordering::Release);
                std::thread::sleep(Duration::from_millis(20));
                finished.fetch_add(1, Ordering::Release);
                Ok::<_, ()>(())
            })
        }));
        assert!(r.is_err());
        assert_eq!(
            finished.load(Ordering::Acquire),
            started.load(Ordering::Acquire),
            "every call the helper began had ended"
        );
        assert_eq!(helper.for_each(4, |_| Ok::<_, ()>(())), Ok(()));
    }

    #[test]
    fn a_call_while_the_helper_is_held_runs_everything_on_the_caller() {
        let helper = Helper::new("test-helper");
        let outer = std::thread::current().id();
        helper
            .for_each(2, |_| {
                let here = std::thread::current().id();
                if here == outer {
                    helper.for_each(16, |_| {
                        assert_eq!(std::thread::current().id(), here);
                        Ok::<_, ()>(())
                    })?;
                }
                Ok::<_, ()>(())
            })
            .unwrap();
    }
}
