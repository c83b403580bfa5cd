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
//!   [`Source::signal_safe`](crate::Source::signal_safe) promises copy from memory
//!   without allocating or locking;
//! - the placement ioctls (`UFFDIO_COPY`, `ZEROPAGE`, `CONTINUE`, `WAKE`);
//! - `clock_gettime(2)` (latency), `sched_yield(2)` and `clock_nanosleep(2)` (waiting on
//!   the gate, a busy scratch slot, or a page another thread is placing), `write(2)` on
//!   an eventfd (a fatal error: stop);
//! - the disposition we replaced, for a SIGBUS that is not ours (another address, a sent
//!   signal, a poisoned page): its handler is called as the kernel would have, or the
//!   default action is restored (`sigaction(2)`, `raise(3)`) to end the process as it
//!   would have ended — ours stays installed otherwise, so later faults still reach it.
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
use crate::place::{GoneSince, Placement};
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
    /// The SIGBUS disposition we replaced: foreign SIGBUSes are chained to it, and it is
    /// restored at `uninstall`.
    previous: libc::sigaction,
}

// SAFETY: a slot's buffer is only touched by the thread that won its `busy` flag (the
// UnsafeCell is what makes the auto traits refuse).
unsafe impl Sync for Engine {}

/// The installed engine, or null.
///
/// `ENGINE` and `ACTIVE` form a store-buffering handshake between a handler and
/// `uninstall`: the handler increments `ACTIVE`, then loads `ENGINE`; `uninstall` clears
/// `ENGINE`, then loads `ACTIVE`. Each side stores one location and then loads the other,
/// which acquire/release cannot order (both loads may see the old values: the handler an
/// engine `uninstall` is about to free, `uninstall` no handler running). So all four
/// accesses are SeqCst: in their single total order one of the stores comes first, and
/// the other side's load sees it.
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
    // The disposition we replace, in the engine before our handler can run: a foreign
    // SIGBUS is chained to it from the first one on.
    let previous = current_disposition(Signal::SIGBUS).map_err(|errno| Error::Io {
        what: "read the SIGBUS disposition",
        source: errno.into(),
    })?;
    let engine = Box::into_raw(Box::new(Engine {
        shared,
        slots,
        previous,
    }));
    // SeqCst: the handshake's ordering (see `ENGINE`); also publishes the engine's fields.
    if ENGINE
        .compare_exchange(ptr::null_mut(), engine, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // SAFETY: never published; we still own it.
        drop(unsafe { Box::from_raw(engine) });
        return Err(Error::Mode {
            mode: "sigbus",
            reason: "another SIGBUS-mode pager is active in this process".into(),
        });
    }
    // SAFETY: `on_sigbus` is async-signal-safe (module docs). Whatever installs a SIGBUS
    // handler between our query and this call is overwritten and not chained to: one
    // SIGBUS-mode pager per process, installed by the embedder before its own threads
    // race it.
    match unsafe { sigaction(Signal::SIGBUS, &action) } {
        Ok(_) => Ok(()),
        Err(errno) => {
            ENGINE.store(ptr::null_mut(), Ordering::SeqCst);
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
    // SeqCst: the handshake (see `ENGINE`).
    if ENGINE
        .compare_exchange(engine, ptr::null_mut(), Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return;
    }
    // SAFETY: `engine` is ours again (unpublished, alive).
    restore(unsafe { &(*engine).previous });
    // SeqCst: the handshake; it also acquires each handler's decrement (SeqCst RMW),
    // so the handler's accesses to the engine are done.
    while ACTIVE.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
    // SAFETY: unpublished and no handler holds it any more.
    drop(unsafe { Box::from_raw(engine) });
}

/// The current disposition of `signal`, unchanged (raw: nix builds a `SigAction` only
/// from a handler of its own, not from what `sigaction(2)` reports).
fn current_disposition(signal: Signal) -> nix::Result<libc::sigaction> {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::uninit();
    // SAFETY: a null new action only queries; `old` is written by the kernel on success.
    if unsafe { libc::sigaction(signal as i32, ptr::null(), old.as_mut_ptr()) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: initialised by the successful call above.
    Ok(unsafe { old.assume_init() })
}

/// Sets the disposition of SIGBUS back to `previous`, as `current_disposition` read it.
/// Async-signal-safe.
fn restore(previous: &libc::sigaction) {
    // SAFETY: `previous` is a disposition the kernel reported for SIGBUS.
    unsafe { libc::sigaction(libc::SIGBUS, previous, ptr::null_mut()) };
}

extern "C" fn on_sigbus(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let _scope = HandlerScope::enter();
    // Counted before the engine is loaded, so `uninstall` cannot free it under us.
    // SeqCst: the handshake (see `ENGINE`).
    ACTIVE.fetch_add(1, Ordering::SeqCst);
    let engine = ENGINE.load(Ordering::SeqCst);
    // SAFETY: `info` is the kernel's siginfo for this signal.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // Only a fault on an address (BUS_ADRERR: what a uffd in SIGBUS mode raises) can be
    // ours; a sent signal (si_code <= 0), a poisoned page (BUS_MCEERR_*) never is.
    // SAFETY: non-null engines stay alive while ACTIVE > 0.
    let handled = !engine.is_null()
        && code == libc::BUS_ADRERR
        && resolve_or_report_panic(unsafe { &*engine }, addr);
    if !handled && !engine.is_null() {
        // SAFETY: as above; `info` and `ctx` are the kernel's, passed on unchanged.
        unsafe { chain(&(*engine).previous, sig, info, ctx, code) };
    }
    // SeqCst: our reads of the engine happen before `uninstall` may free it.
    ACTIVE.fetch_sub(1, Ordering::SeqCst);
}

/// Hands a SIGBUS that is not ours to the disposition we replaced, without giving up
/// ours: a handler is called as the kernel would have; the default action (or an ignored
/// fault, which the kernel would not ignore) is restored and the signal raised again, to
/// end the process as it would have ended. Async-signal-safe (`sigaction(2)`,
/// `raise(3)`).
///
/// # Safety
///
/// Called from the SIGBUS handler with the kernel's `info` and `ctx`.
unsafe fn chain(
    previous: &libc::sigaction,
    sig: i32,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
    code: i32,
) {
    match previous.sa_sigaction {
        // A sent SIGBUS the embedder ignores stays ignored.
        libc::SIG_IGN if code <= 0 => {}
        libc::SIG_DFL | libc::SIG_IGN => {
            // The process ends as it would have without us. A fault re-faults on return
            // and meets the default action; a sent signal is raised again (delivered once
            // this handler returns, SIGBUS being blocked while it runs).
            let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            // SAFETY: restoring the default disposition of a signal about to kill us.
            let _ = unsafe { sigaction(Signal::SIGBUS, &default) };
            if code <= 0 {
                let _ = nix::sys::signal::raise(Signal::SIGBUS);
            }
        }
        handler if previous.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the embedder installed this three-argument handler for SIGBUS
            // (SA_SIGINFO); it is called as the kernel would have called it.
            let f: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(handler) };
            f(sig, info, ctx);
        }
        handler => {
            // SAFETY: the embedder installed this one-argument handler for SIGBUS.
            let f: extern "C" fn(i32) = unsafe { std::mem::transmute(handler) };
            f(sig);
        }
    }
}

/// [`resolve`], with a panic in it (a [`Source`](crate::Source) bug) caught and reported as
/// the pager's fatal error (`fail_in_signal`: its unplaced pages are then poisoned) instead
/// of aborting the process at the `extern "C"` boundary without a word.
///
/// Catching is the best that can be done here, not a sound recovery: the panic already
/// allocated its payload and ran the panic hook (which writes to stderr) inside the signal
/// handler — a deadlock if the interrupted code held the allocator's or stderr's lock, as
/// before. What is caught is reported; the payload is leaked, since freeing it here is no
/// safer than allocating it was. The SIGBUS is then handed on like any other failure.
fn resolve_or_report_panic(engine: &Engine, addr: usize) -> bool {
    // AssertUnwindSafe: after a panic the engine is only used to record the failure
    // (atomics) and stop; scratch slots are released by their guard while unwinding.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| resolve(engine, addr))) {
        Ok(handled) => handled,
        Err(payload) => {
            std::mem::forget(payload);
            let shared = &*engine.shared;
            let offset = shared.page_at(addr).map_or(0, |p| p.offset);
            shared.fail_in_signal(offset, Errno::EIO as i32);
            false
        }
    }
}

/// Resolves a SIGBUS at `addr` through the same fault path as the handler threads
/// (`fault.rs`, async-signal-safe); false if it is not ours or cannot be served.
fn resolve(engine: &Engine, addr: usize) -> bool {
    let started = Instant::now(); // clock_gettime(2)
    let mut gone = GoneSince::default();
    let shared = &*engine.shared;
    if shared.page_at(addr).is_none() {
        return false;
    }
    loop {
        // The signal says nothing of the fault's kind: MISSING unless the page cache
        // holds it (fault.rs treats a received page in MINOR mode alike either way).
        let outcome = with_slot(engine, |scratch| {
            shared.on_fault(addr, FaultFlags::empty(), scratch, true, &mut gone)
        });
        match outcome {
            FaultOutcome::Resolved => {
                shared.stats.record_latency(started.elapsed());
                return true;
            }
            // (`Parent` is a forked child's engine's, which never runs in SIGBUS mode.)
            FaultOutcome::FollowUp(p, FollowUp::Watch | FollowUp::Parent { .. }) => {
                // Another thread is placing it: wait for that, then retry the access —
                // or, if it takes long (a starved SCHED_IDLE prefetcher holding the
                // claim), place it here from the local source.
                let waiting = Instant::now();
                let mut spins = 0;
                while shared.states.get(p.page) == Ok(PageState::Requested) {
                    if shared.may_take_over(p.page, waiting.elapsed()) {
                        let placed = with_slot(engine, |scratch| shared.take_over(&p, scratch));
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

/// A claimed slot's `busy` flag, cleared on drop.
struct Held<'a>(&'a AtomicBool);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Release: our buffer writes happen before the next holder's.
        self.0.store(false, Ordering::Release);
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
                // Given back on return or while a panic unwinds (`resolve_or_report_panic`).
                let _held = Held(&slot.busy);
                // SAFETY: we won the slot's flag; nobody else touches its buffer.
                return f(unsafe { &mut *slot.buf.get() });
            }
        }
        backoff(&mut spins);
    }
}
