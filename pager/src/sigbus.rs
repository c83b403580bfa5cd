//! SIGBUS delivery: with `UFFD_FEATURE_SIGBUS` a fault raises SIGBUS in the faulting
//! thread instead of queueing an event, and the handler here resolves it right there —
//! no context switch to a handler thread. The handler runs async-signal-safe code only:
//! atomics, the page state map (lock-free), a region table snapshot taken at start (no
//! lock), preallocated scratch buffers, and one placement ioctl. REMOVE/UNMAP/REMAP
//! events still go to an event thread.
//!
//! One SIGBUS-mode pager per process (the signal disposition is process-wide). Memory
//! must be this process's own; the source must be [`Source::is_signal_safe`]. Regions are
//! fixed for the signal path: a region moved by `mremap` is not followed there.

use std::cell::UnsafeCell;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use page_state::{PageState, RequestOutcome};

use crate::engine::{Content, Origin, Placement, Shared};
use crate::error::{Error, Result};
use crate::region::RegionTable;
use crate::source::Fetched;
use crate::stats::bump;

/// A scratch buffer a signal handler may claim without allocating.
struct Slot {
    busy: AtomicBool,
    buf: UnsafeCell<Box<[u8]>>,
}

struct Engine {
    shared: Arc<Shared>,
    regions: RegionTable,
    slots: Box<[Slot]>,
    previous: libc::sigaction,
}

// SAFETY: a slot's buffer is only touched by the thread that won its `busy` flag.
unsafe impl Sync for Engine {}
// SAFETY: as above.
unsafe impl Send for Engine {}

/// The installed engine, or null.
static ENGINE: AtomicPtr<Engine> = AtomicPtr::new(ptr::null_mut());
/// Handlers currently running: `uninstall` waits for them before freeing the engine.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Installs the SIGBUS handler for `shared`. Fails if another SIGBUS pager is active.
pub(crate) fn install(shared: Arc<Shared>, slots: usize, max_page: usize) -> Result<()> {
    let regions = shared
        .regions
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let slots = (0..slots.max(1))
        .map(|_| Slot {
            busy: AtomicBool::new(false),
            buf: UnsafeCell::new(vec![0u8; max_page].into_boxed_slice()),
        })
        .collect();
    let engine = Box::into_raw(Box::new(Engine {
        shared,
        regions,
        slots,
        // SAFETY: an all-zero sigaction is valid; sigaction(2) below overwrites it.
        previous: unsafe { std::mem::zeroed() },
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
    // SAFETY: installs an SA_SIGINFO handler; `previous` is written by the kernel into the
    // engine we own (handlers only read it after this returns, on an unknown address).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, &mut (*engine).previous) != 0 {
            let err = std::io::Error::last_os_error();
            ENGINE.store(ptr::null_mut(), Ordering::Release);
            drop(Box::from_raw(engine));
            return Err(Error::Io {
                what: "install the SIGBUS handler",
                source: err,
            });
        }
    }
    Ok(())
}

/// Restores the previous SIGBUS disposition and frees the engine once no handler runs.
pub(crate) fn uninstall() {
    let engine = ENGINE.swap(ptr::null_mut(), Ordering::AcqRel);
    if engine.is_null() {
        return;
    }
    // SAFETY: restores the disposition saved at install.
    unsafe { libc::sigaction(libc::SIGBUS, &(*engine).previous, ptr::null_mut()) };
    // Acquire: pairs with each handler's Release decrement, so its accesses are done.
    while ACTIVE.load(Ordering::Acquire) != 0 {
        std::thread::yield_now();
    }
    // SAFETY: unpublished and no handler holds it any more.
    drop(unsafe { Box::from_raw(engine) });
}

extern "C" fn on_sigbus(sig: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Counted before the engine is loaded, so `uninstall` cannot free it under us.
    ACTIVE.fetch_add(1, Ordering::AcqRel);
    let engine = ENGINE.load(Ordering::Acquire);
    // SAFETY: non-null engines stay alive while ACTIVE > 0; `info` is the kernel's.
    let handled = !engine.is_null() && unsafe { resolve(&*engine, (*info).si_addr() as usize) };
    if !handled && !engine.is_null() {
        // Not ours: hand the signal back to whoever had it; the access re-faults and
        // the restored disposition (by default: terminate) applies.
        // SAFETY: restores the saved disposition.
        unsafe { libc::sigaction(sig, &(*engine).previous, ptr::null_mut()) };
    }
    // Release: our reads of the engine happen before `uninstall` may free it.
    ACTIVE.fetch_sub(1, Ordering::Release);
}

/// Resolves a SIGBUS at `addr`. Async-signal-safe: atomics, ioctls, nanosleep.
fn resolve(engine: &Engine, addr: usize) -> bool {
    let started = Instant::now(); // clock_gettime(2) is async-signal-safe
    let shared = &*engine.shared;
    let Some(p) = engine.regions.by_addr(addr) else {
        return false;
    };
    bump(&shared.stats.faults_missing);
    loop {
        let outcome = match shared.states.request(p.page) {
            Ok(o) => o,
            Err(_) => return false,
        };
        if outcome == RequestOutcome::Requested {
            if let Some(rec) = &shared.recorder {
                rec.record(p.page); // atomics only: signal safe
            }
        }
        let placement = match outcome {
            RequestOutcome::Requested => with_slot(engine, |scratch| {
                match shared.source.fetch(p.offset, &mut scratch[..p.size]) {
                    Ok(Fetched::Data(data)) => {
                        shared.place(&p, 1, Content::Data(data), true, Origin::Fault)
                    }
                    Ok(Fetched::Zero) => shared.place(&p, 1, Content::Zero, true, Origin::Fault),
                    // Signal-safe sources answer locally; anything else cannot be served.
                    Ok(Fetched::Pending) | Err(_) => Placement::Dropped,
                }
            }),
            RequestOutcome::IsZero => shared.place(&p, 1, Content::Zero, true, Origin::Fault),
            RequestOutcome::AlreadyReceived => Placement::Done,
            RequestOutcome::AlreadyRequested => {
                // Another thread is placing it: wait for that, then retry the access.
                while shared.states.get(p.page) == Ok(PageState::Requested) {
                    std::hint::spin_loop();
                }
                Placement::Done
            }
        };
        match placement {
            Placement::Done => {
                shared.stats.record_latency(started.elapsed());
                return true;
            }
            // A REMOVE is pending; the event thread reads it. The page is still ours
            // (Requested) or became Zero: go round again after a short sleep.
            Placement::Again { .. } => {
                if outcome == RequestOutcome::Requested {
                    shared.unclaim(p.page);
                }
                sleep(Duration::from_micros(50));
            }
            Placement::Dropped => return false,
        }
    }
}

/// Runs `f` with a claimed scratch slot, spinning until one is free.
fn with_slot(engine: &Engine, f: impl FnOnce(&mut [u8]) -> Placement) -> Placement {
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
        std::hint::spin_loop();
    }
}

/// nanosleep(2), async-signal-safe.
fn sleep(d: Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a valid timespec; no remainder wanted.
    unsafe { libc::nanosleep(&ts, ptr::null_mut()) };
}
