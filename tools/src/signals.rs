//! SIGINT, SIGTERM and SIGHUP for a command that must clean up before it goes.
//!
//! The signals are blocked in every thread and taken by one thread with `sigwait(2)`, so
//! the cleanup runs as ordinary code (it may lock, allocate, unlink, log), not inside a
//! signal handler; then the process exits with 128 + the signal's number, as a shell
//! reports a process killed by it.

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};

/// Calls `cleanup` when SIGINT, SIGTERM or SIGHUP arrives, then exits 128 + signal.
///
/// Call before the process starts any thread: threads inherit the signal mask, and a
/// thread started earlier would still take these signals with their default action
/// (death without cleanup).
pub fn on_termination(cleanup: impl FnOnce(Signal) + Send + 'static) -> Result<()> {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    set.thread_block().context("block termination signals")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            // sigwait(2) fails only for an invalid set; then nothing can be caught.
            if let Ok(signal) = set.wait() {
                cleanup(signal);
                std::process::exit(128 + signal as i32);
            }
        })
        .context("start the signal thread")?;
    Ok(())
}
