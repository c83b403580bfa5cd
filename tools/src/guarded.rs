//! A workload over pager-served memory that ends when the pager stops.
//!
//! When the pager gives up (its source failed for good, a handler panicked), every page it
//! has not placed is poisoned: a touch raises SIGBUS. Left at its default action, that
//! SIGBUS kills the process before it can say why. So the workload runs on a thread of
//! its own; a SIGBUS on the pager's memory parks that thread for good (the handler never
//! returns to the access), and the command's thread, which waits for whichever comes
//! first — the workload's end or the pager's stop ([`Pager::stopped_fd`]) — reports the
//! pager's error and ends the process, parked thread and all. No thread waits on anything
//! unbounded: the pager stops within its source's bound, and the process exit releases a
//! parked or blocked workload.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use anyhow::{anyhow, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use pager::{DeliveryMode, Pager};
use uffd_core::Mapping;

/// The pager-served range a SIGBUS parks the faulting thread for (empty: none).
static GUARDED_BASE: AtomicUsize = AtomicUsize::new(0);
static GUARDED_LEN: AtomicUsize = AtomicUsize::new(0);
/// Threads parked in [`park_on_sigbus`].
static PARKED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn park_on_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: `info` is the kernel's siginfo for this SIGBUS (SA_SIGINFO).
    let addr = unsafe { (*info).si_addr() } as usize;
    // SeqCst, all of them: a handful of loads on a path taken once per process.
    let base = GUARDED_BASE.load(Ordering::SeqCst);
    let len = GUARDED_LEN.load(Ordering::SeqCst);
    if addr >= base && addr - base < len {
        PARKED.fetch_add(1, Ordering::SeqCst);
        // The pager could not serve this page: the thread never returns to its access and
        // waits here for the process to end (pause(2) is async-signal-safe).
        loop {
            nix::unistd::pause();
        }
    }
    // Not the pager's memory: the default action, which the access meets again on return
    // and which ends the process as it would have ended without us.
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: restoring the default disposition (sigaction(2) is async-signal-safe).
    let _ = unsafe { sigaction(Signal::SIGBUS, &default) };
}

/// Parks, rather than kills, a thread whose touch of `memory` raises SIGBUS. Call before
/// the pager starts: a SIGBUS-mode pager chains the SIGBUSes it cannot serve (a poisoned
/// page) to the disposition it found.
pub fn install(memory: &Mapping) -> Result<()> {
    GUARDED_BASE.store(memory.addr(), Ordering::SeqCst);
    GUARDED_LEN.store(memory.len(), Ordering::SeqCst);
    let action = SigAction::new(
        SigHandler::SigAction(park_on_sigbus),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    // SAFETY: the handler only loads and bumps atomics, pauses, and calls sigaction(2).
    unsafe { sigaction(Signal::SIGBUS, &action) }.context("install the SIGBUS handler")?;
    Ok(())
}

/// Stops treating the memory [`install`] named as pager-served (once its pager stopped
/// cleanly): a later SIGBUS there, in other memory mapped at the same address, meets the
/// default action again.
pub fn disarm() {
    GUARDED_LEN.store(0, Ordering::SeqCst);
}

/// Runs `work` on a thread of its own over pager-served `memory` (kept mapped for as long
/// as that thread may touch it) and waits for it or for the pager to stop, whichever
/// comes first: `Some` with the work's result, `None` when the pager stopped first — then
/// report [`stopped`] and end the process soon, the workload thread being parked or
/// blocked for good.
pub fn run<R: Send + 'static>(
    pager: &Pager,
    memory: Arc<Mapping>,
    work: impl FnOnce() -> R + Send + 'static,
) -> Result<Option<R>> {
    let done = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
        .context("create the workload's eventfd")?;
    let (tx, rx) = mpsc::channel();
    let signal = done
        .as_fd()
        .try_clone_to_owned()
        .context("dup an eventfd")?;
    std::thread::Builder::new()
        .name("workload".into())
        .spawn(move || {
            let _mapped = memory;
            // Dropped after the result is sent, or as a panic unwinds: either way the
            // command's thread wakes (and finds the result, or none).
            let _done = Done(signal);
            let _ = tx.send(work());
        })
        .context("start the workload thread")?;
    loop {
        let mut fds = [
            PollFd::new(done.as_fd(), PollFlags::POLLIN),
            PollFd::new(pager.stopped_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("wait for the workload"),
        }
        let readable = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        if readable(&fds[0]) {
            let result = rx
                .recv()
                .map_err(|_| anyhow!("the workload thread panicked"))?;
            return Ok(Some(result));
        }
        if readable(&fds[1]) {
            return Ok(None);
        }
    }
}

/// Makes the workload's eventfd readable when dropped.
struct Done(std::os::fd::OwnedFd);

impl Drop for Done {
    fn drop(&mut self) {
        // An eventfd write of 1 fails only if the counter would overflow: it cannot here.
        let _ = nix::unistd::write(&self.0, &1u64.to_ne_bytes());
    }
}

/// The error of a pager that stopped under a running workload ([`run`] said `None`).
pub fn stopped(pager: Pager) -> anyhow::Error {
    let why = "the pager stopped while the workload ran: its memory can no longer be served";
    if pager.mode() == DeliveryMode::Sigbus && PARKED.load(Ordering::SeqCst) > 0 {
        // The parked thread sits in the pager's own SIGBUS handler (it chained the
        // poisoned page to ours), which stopping would wait for: take the error, and leave
        // the pager to the process's end.
        let error = pager.take_error();
        std::mem::forget(pager);
        return match error {
            Some(e) => anyhow::Error::new(e).context(why),
            None => anyhow!(why),
        };
    }
    match pager.stop() {
        Err(e) => anyhow::Error::new(e).context(why),
        Ok(_) => anyhow!(why),
    }
}
