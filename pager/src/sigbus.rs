//! SIGBUS delivery: with `UFFD_FEATURE_SIGBUS` a fault raises SIGBUS in the faulting
//! thread instead of queueing an event, and the handler here resolves it right there —
//! no context switch to a handler thread. REMOVE/UNMAP/REMAP events still go to an event
//! thread, which applies them before it lets placements go on (the [gate](crate::gate)).
//!
//! **What the handler may call**, everything it reaches being async-signal-safe:
//! - atomics: the page-state map and the removed-in-flight [`Bitmap`](page_state::Bitmap)
//!   (page-state, lock-free), the region table (atomics, no lock), the gate, the
//!   counters and the latency histogram, the working-set recorder;
//! - a scratch buffer claimed from a preallocated set with a CAS;
//! - the fault path shared with the handler threads (`fault.rs`, `place.rs`), including
//!   fault-around runs;
//! - the source's `fetch` (and `prioritize`), which
//!   [`Source::is_signal_safe`](crate::Source::is_signal_safe) promises copy from memory
//!   without allocating or locking;
//! - the placement ioctls (`UFFDIO_COPY`, `ZEROPAGE`, `CONTINUE`, `WAKE`);
//! - `clock_gettime(2)` (latency), `sched_yield(2)` and `clock_nanosleep(2)` (waiting on
//!   the gate, a busy scratch slot, or a page another thread is placing), `write(2)` on
//!   an eventfd and `sigaction(2)` (a fatal error: stop, and hand the signal back).
//!
//! It never locks, allocates, logs or builds an error value: a failure is recorded in
//! atomics ([`Shared::fail_in_signal`]) and turned into an error when the pager stops.
//! The pager's tests prove it with a global allocator that aborts when called while
//! [`in_fault_handler`](crate::in_fault_handler) is true, under a REMOVE storm.
//!
//! One SIGBUS-mode pager per process (the signal disposition is process-wide). Memory
//! must be this process's own; the source must be signal-safe.

use std::cell::UnsafeCell;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use page_state::PageState;
use uffd_core::{Error as UffdError, FaultFlags};

use crate::error::{Error, Result};
use crate::fault::{FaultOutcome, FollowUp, MAX_AROUND_BYTES};
use crate::place::{Origin, Placement};
use crate::shared::Shared;
use crate::sigsafe::{backoff, sleep, HandlerScope};

/// A scratch buffer a signal handler may claim without allocating.
struct Slot {
    busy: AtomicBool,
    buf: UnsafeCell<Box<[u8]>>,
}

struct Engine {
    shared: Arc<Shared>,
    slots: Box<[Slot]>,
    previous: SigAction,
}

// SAFETY: a slot's buffer is only touched by the thread that won its `busy` flag (the
// UnsafeCell is what makes the auto traits refuse).
unsafe impl Sync for Engine {}

/// The installed engine, or null.
static ENGINE: AtomicPtr<Engine> = AtomicPtr::new(ptr::null_mut());
/// Handlers currently running: `uninstall` waits for them before freeing the engine.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Installs the SIGBUS handler for `shared`. Fails if another SIGBUS pager is active.
pub(crate) fn install(shared: Arc<Shared>, slots: usize) -> Result<()> {
    // A page, or a fault-around run.
    let around = if shared.fault_around > 0 || shared.readahead {
        MAX_AROUND_BYTES
    } else {
        0
    };
    let size = shared.regions.max_page_size().max(around);
    let slots = (0..slots.max(1))
        .map(|_| Slot {
            busy: AtomicBool::new(false),
            buf: UnsafeCell::new(vec![0u8; size].into_boxed_slice()),
        })
        .collect();
    let action = SigAction::new(
        SigHandler::SigAction(on_sigbus),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    let engine = Box::into_raw(Box::new(Engine {
        shared,
        slots,
        previous: action, // replaced by the real previous disposition below
    }));
    // AcqRel: publishes the engine's fields to handlers that load it with Acquire.
    if ENGINE
        .compare_exchange(ptr::null_mut(), engine, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // SAFETY: never published; we still own it.
        drop(unsafe { Box::from_raw(engine) });
        return Err(Error::Mode {
            mode: "sigbus",
            reason: "another SIGBUS-mode pager is active in this process".into(),
        });
    }
    // SAFETY: `on_sigbus` is async-signal-safe (module docs). Until `previous` is stored,
    // a SIGBUS on memory that is not ours would hand back our own handler: none can come
    // from a served region before `start` returns, and other SIGBUSes are a crash anyway.
    match unsafe { sigaction(Signal::SIGBUS, &action) } {
        Ok(previous) => {
            // SAFETY: published but not yet read by handlers for anything but their own
            // address (`previous` is read only for foreign faults, see above).
            unsafe { (*engine).previous = previous };
            Ok(())
        }
        Err(errno) => {
            ENGINE.store(ptr::null_mut(), Ordering::Release);
            // SAFETY: the handler never ran (installing failed): nobody else holds it.
            drop(unsafe { Box::from_raw(engine) });
            Err(Error::Io {
                what: "install the SIGBUS handler",
                source: errno.into(),
            })
        }
    }
}

/// If `shared`'s engine is the one installed: restores the previous SIGBUS disposition
/// and frees the engine once no handler runs.
pub(crate) fn uninstall(shared: &Arc<Shared>) {
    let engine = ENGINE.load(Ordering::Acquire);
    // SAFETY: a published engine stays alive until it is unpublished, which only its
    // owner does, here.
    if engine.is_null() || !Arc::ptr_eq(unsafe { &(*engine).shared }, shared) {
        return; // not installed, or another pager's
    }
    if ENGINE
        .compare_exchange(engine, ptr::null_mut(), Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    // SAFETY: restores the disposition saved at install; `engine` is ours again.
    let _ = unsafe { sigaction(Signal::SIGBUS, &(*engine).previous) };
    // Acquire: pairs with each handler's Release decrement, so its accesses are done.
    while ACTIVE.load(Ordering::Acquire) != 0 {
        std::thread::yield_now();
    }
    // SAFETY: unpublished and no handler holds it any more.
    drop(unsafe { Box::from_raw(engine) });
}

extern "C" fn on_sigbus(sig: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let _scope = HandlerScope::enter();
    // Counted before the engine is loaded, so `uninstall` cannot free it under us.
    ACTIVE.fetch_add(1, Ordering::AcqRel);
    let engine = ENGINE.load(Ordering::Acquire);
    // SAFETY: non-null engines stay alive while ACTIVE > 0; `info` is the kernel's.
    let handled = !engine.is_null() && unsafe { resolve(&*engine, (*info).si_addr() as usize) };
    if !handled && !engine.is_null() {
        // Not ours (or not servable): hand the signal back to whoever had it; the access
        // re-faults and the restored disposition (by default: terminate) applies.
        if let Ok(signal) = Signal::try_from(sig) {
            // SAFETY: restores the disposition saved at install (sigaction(2) is
            // async-signal-safe).
            let _ = unsafe { sigaction(signal, &(*engine).previous) };
        }
    }
    // Release: our reads of the engine happen before `uninstall` may free it.
    ACTIVE.fetch_sub(1, Ordering::Release);
}

/// Resolves a SIGBUS at `addr` through the same fault path as the handler threads
/// (`fault.rs`, async-signal-safe); false if it is not ours or cannot be served.
fn resolve(engine: &Engine, addr: usize) -> bool {
    let started = Instant::now(); // clock_gettime(2)
    let shared = &*engine.shared;
    if shared.page_at(addr).is_none() {
        return false;
    }
    loop {
        // The signal says nothing of the fault's kind: MISSING unless the page cache
        // holds it (fault.rs treats a received page in MINOR mode alike either way).
        let outcome = with_slot(engine, |scratch| {
            shared.on_fault(addr, FaultFlags::empty(), scratch, true)
        });
        match outcome {
            FaultOutcome::Resolved => {
                shared.stats.record_latency(started.elapsed());
                return true;
            }
            FaultOutcome::FollowUp(p, FollowUp::Watch) => {
                // Another thread is placing it: wait for that, then retry the access —
                // or, if it takes long (a starved SCHED_IDLE prefetcher holding the
                // claim), place it here from the local source.
                let waiting = Instant::now();
                let mut spins = 0;
                while shared.states.get(p.page) == Ok(PageState::Requested) {
                    if shared.may_take_over(p.page, waiting.elapsed()) {
                        let placed = with_slot(engine, |scratch| {
                            shared.fetch_and_place(&p, 1, scratch, true, Origin::Fault)
                        });
                        if !matches!(placed, Placement::Again { .. }) {
                            break;
                        }
                    }
                    backoff(&mut spins);
                }
                shared.stats.record_latency(started.elapsed());
                return true;
            }
            // A REMOVE is pending; the event thread reads it. Give the claim back in one
            // step and go round again after a short sleep.
            FaultOutcome::FollowUp(p, FollowUp::Retry) => {
                shared.release(p.page);
                sleep(Duration::from_micros(50));
            }
            // Signal-safe sources answer locally: `Pending` is a source's broken promise.
            FaultOutcome::Asked => {
                if let Some(p) = shared.page_at(addr) {
                    shared.release(p.page);
                    shared.fail_in_signal(p.offset, Errno::EINVAL as i32);
                }
                return false;
            }
            FaultOutcome::Failed(failed) => {
                let p = shared.page_at(addr);
                if let Some(p) = p {
                    shared.release(p.page);
                }
                let errno = match &failed {
                    Placement::Failed(e) => errno_of(e),
                    Placement::SourceFailed(e) => {
                        e.source.raw_os_error().unwrap_or(Errno::EIO as i32)
                    }
                    _ => Errno::EIO as i32,
                };
                shared.fail_in_signal(p.map_or(0, |p| p.offset), errno);
                return false;
            }
        }
    }
}

/// The errno behind a kernel refusal, for the atomics `fail_in_signal` keeps.
fn errno_of(e: &UffdError) -> i32 {
    match e {
        UffdError::Os { errno, .. } | UffdError::ProcessGone { errno, .. } => *errno as i32,
        UffdError::InvalidArgument { .. } => Errno::EINVAL as i32,
        _ => Errno::EIO as i32,
    }
}

/// Runs `f` with a claimed scratch slot, waiting until one is free.
fn with_slot<T>(engine: &Engine, f: impl FnOnce(&mut [u8]) -> T) -> T {
    let mut spins = 0;
    loop {
        for slot in engine.slots.iter() {
            // Acquire: the previous holder's writes to the buffer are done.
            if slot
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                // SAFETY: we won the slot's flag; nobody else touches its buffer.
                let result = f(unsafe { &mut *slot.buf.get() });
                // Release: our buffer writes happen before the next holder's.
                slot.busy.store(false, Ordering::Release);
                return result;
            }
        }
        backoff(&mut spins);
    }
}
