//! SIGINT, SIGTERM and SIGHUP for a command that must clean up before it goes.
//!
//! The signals are blocked in every thread and taken by one thread with `sigwait(2)`, so
//! the cleanup runs as ordinary code (it may lock, allocate, unlink, log), not inside a
//! signal handler; then the process exits with 128 + the signal's number, as a shell
//! reports a process killed by it.

use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};

/// The termination signal the signal thread took (0: none yet). Set before its cleanup
/// runs, so whatever the cleanup causes (a child it killed, a file it removed) happens
/// after it is set.
static TERMINATING: AtomicI32 = AtomicI32::new(0);

/// If a termination signal was taken, waits for the signal thread to end the process
/// (with 128 plus the signal, after its cleanup) and never returns. The command's own outcome must not
/// race that exit: its cleanup kills children and removes files, which the command then
/// meets as errors of its own ("the destination did not start"), and a command exiting
/// first, with 1 or 0, would both misreport the signal and cut the cleanup short. `main`
/// calls it before it exits.
pub fn await_termination() {
    // SeqCst: pairs with the signal thread's store before its cleanup.
    if TERMINATING.load(Ordering::SeqCst) != 0 {
        loop {
            std::thread::park();
        }
    }
}

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
                // SeqCst: visible to `await_termination` before anything the cleanup does.
                TERMINATING.store(signal as i32, Ordering::SeqCst);
                cleanup(signal);
                std::process::exit(128 + signal as i32);
            }
        })
        .context("start the signal thread")?;
    Ok(())
}

/// Removes the Unix socket file of `addr` (if it is one) when the command is terminated,
/// once the file is ours and only while it still is (the device and inode its claim
/// recorded: a socket another listener bound at the path since is left alone): a socket
/// file left behind after SIGTERM names a listener that is gone. Bind through
/// [`SocketFile::bind`], which holds the lock the signal thread takes, so a signal
/// arriving while the file appears waits for the bind and then removes it. Same rule as
/// [`on_termination`]: call it before the process starts any thread.
pub fn remove_socket_on_termination(addr: &transport::Addr) -> Result<SocketFile> {
    let bound = std::sync::Arc::new(std::sync::Mutex::new(None));
    if let transport::Addr::Unix(_) = addr {
        let ours = bound.clone();
        on_termination(move |_| {
            let file: &Option<transport::socket_file::SocketFile> =
                &ours.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(file) = file {
                if !file.remove() {
                    log::warn!(
                        "left {}: not the socket we bound any more, or it could not be removed",
                        file.path().display()
                    );
                }
            }
        })?;
    }
    Ok(SocketFile { bound })
}

/// The socket file ours to remove on termination, once bound (see
/// [`remove_socket_on_termination`]).
pub struct SocketFile {
    bound: std::sync::Arc<std::sync::Mutex<Option<transport::socket_file::SocketFile>>>,
}

impl SocketFile {
    /// Runs `bind` (which claims the socket file) with termination held off; once it
    /// succeeded, the file its claim made (`claimed` of what it bound) is ours to remove.
    pub fn bind<T, E>(
        &self,
        bind: impl FnOnce() -> Result<T, E>,
        claimed: impl FnOnce(&T) -> Option<transport::socket_file::SocketFile>,
    ) -> Result<T, E> {
        let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        let r = bind();
        if let Ok(t) = &r {
            *bound = claimed(t);
        }
        r
    }
}
