//! Reading a page that must raise SIGBUS (a poisoned page), from a test running in a
//! process of its own ([`crate::isolated`]): the faulting thread is parked in the handler
//! for good.

use std::sync::atomic::Ordering;

static SIGBUS_AT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn park_on_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel's siginfo for this SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    SIGBUS_AT.store(addr.max(1), Ordering::SeqCst);
    // The faulting thread never returns to its access: it waits here for the process to
    // end (pause(2) is async-signal-safe).
    loop {
        // SAFETY: no arguments, no memory.
        unsafe { libc::pause() };
    }
}

/// For a test in a process of its own (`testkit::isolated`): spawns a thread that reads
/// the byte at `addr` and waits up to `timeout` for that read to raise SIGBUS. The thread
/// is parked in a SIGBUS handler for good. `Err` says what happened instead: the byte it
/// read, or nothing within `timeout` (still blocked).
pub fn touch_expecting_sigbus(addr: usize, timeout: std::time::Duration) -> Result<(), String> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::SigAction(park_on_sigbus),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    // SAFETY: the handler only stores an atomic and pauses.
    unsafe { sigaction(Signal::SIGBUS, &action) }.expect("install the parking SIGBUS handler");
    SIGBUS_AT.store(0, Ordering::SeqCst);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: a served (or poisoned) page of the test's region.
        let byte = unsafe { std::ptr::read_volatile(addr as *const u8) };
        let _ = tx.send(byte);
    });
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let at = SIGBUS_AT.load(Ordering::SeqCst);
        if at != 0 {
            return if at == addr {
                Ok(())
            } else {
                Err(format!("SIGBUS at {at:#x}, not {addr:#x}"))
            };
        }
        if let Ok(byte) = rx.try_recv() {
            return Err(format!(
                "the read returned {byte} instead of raising SIGBUS"
            ));
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("the read is still blocked after {timeout:?}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
