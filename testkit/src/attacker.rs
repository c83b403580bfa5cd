//! Playing the other local user: a forked child that drops to `nobody` (uid and gid
//! 65534, no supplementary groups) and plants what an unprivileged tenant could — links,
//! FIFOs, sparse fillers, pre-created directories, locks — before the root operation
//! under test runs. The child can stay alive (holding its locks and fds) until the test
//! is done with it.
//!
//! Tests that use it need root (to drop privileges at all); [`available`] says so loudly
//! and records the skip when the tests run as another user.
//!
//! The child is forked from a multi-threaded test binary: what it runs must not take a
//! process-wide lock another thread could have held at the fork (the environment's, as
//! `std::env::var` and `temp_dir` do; stdout's, as `println!` does). Compute paths in the
//! test, plant with plain file-system calls, report through the returned `Result`.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};

/// The unprivileged user the attacker runs as.
pub const NOBODY: u32 = 65534;

/// Whether attacker tests can run here (as root); if not, reports `test` as skipped.
pub fn available(test: &str) -> bool {
    if Uid::effective().is_root() {
        return true;
    }
    crate::skip(
        test,
        "needs root: the attacker is a child that drops to uid 65534",
    );
    false
}

/// What the attacker did, as a result it reports to the test.
pub type Planted = Result<(), String>;

/// An attacker process, alive until dropped (or [`Attacker::finish`]ed).
#[derive(Debug)]
pub struct Attacker {
    pid: Option<Pid>,
    /// Closing it tells the child to exit.
    release: Option<OwnedFd>,
}

/// Runs `plant` as `nobody` in a child and waits for it to exit; panics with the child's
/// message if `plant` failed.
pub fn as_nobody(plant: impl FnOnce() -> Planted) {
    spawn(plant).finish();
}

/// Runs `plant` as `nobody` in a child that then stays alive — holding what it opened —
/// until the returned [`Attacker`] is dropped. Returns once `plant` is done; panics with
/// the child's message if it failed.
pub fn spawn(plant: impl FnOnce() -> Planted) -> Attacker {
    let (ready_r, ready_w) = nix::unistd::pipe().expect("pipe");
    let (release_r, release_w) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the child only makes system calls and allocates (glibc's malloc is made
    // usable after fork by its own atfork handlers; nothing here takes a lock another
    // thread of the test harness could have held, such as stdout's), then `_exit`s
    // without running the parent's destructors or atexit handlers.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            drop(ready_r);
            drop(release_w);
            let outcome = drop_privileges().and_then(|()| plant());
            let mut ready = std::fs::File::from(ready_w);
            let message = match &outcome {
                Ok(()) => "ok".to_owned(),
                Err(e) => format!("attacker failed: {e}"),
            };
            let _ = ready.write_all(message.as_bytes());
            drop(ready);
            if outcome.is_ok() {
                // Stay alive (with every fd and lock) until the test closes its end.
                let mut byte = [0u8; 1];
                let _ = std::fs::File::from(release_r).read(&mut byte);
            }
            // SAFETY: `_exit` ends the forked child without unwinding into the harness.
            unsafe { libc::_exit(i32::from(outcome.is_err())) }
        }
        ForkResult::Parent { child } => {
            drop(ready_w);
            drop(release_r);
            let mut message = String::new();
            let _ = std::fs::File::from(ready_r).read_to_string(&mut message);
            let attacker = Attacker {
                pid: Some(child),
                release: Some(release_w),
            };
            assert_eq!(message, "ok", "the attacker could not plant: {message}");
            attacker
        }
    }
}

fn drop_privileges() -> Planted {
    let id = |e: nix::Error| format!("drop to uid {NOBODY}: {e}");
    nix::unistd::setgroups(&[]).map_err(id)?;
    nix::unistd::setgid(Gid::from_raw(NOBODY)).map_err(id)?;
    nix::unistd::setuid(Uid::from_raw(NOBODY)).map_err(id)?;
    if Uid::effective().as_raw() != NOBODY {
        return Err("still privileged after setuid".into());
    }
    Ok(())
}

impl Attacker {
    /// Lets the child exit and reaps it.
    pub fn finish(mut self) {
        self.end();
    }

    fn end(&mut self) {
        drop(self.release.take());
        if let Some(pid) = self.pid.take() {
            let _ = waitpid(pid, None);
        }
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.end();
    }
}

/// The attacker's error for `what` on `path`.
pub fn failed(what: &str, path: &Path, e: impl std::fmt::Display) -> String {
    format!("{what} {}: {e}", path.display())
}
