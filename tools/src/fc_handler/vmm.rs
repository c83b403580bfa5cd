//! The VMM on the socket: telling Firecracker from a probe, refusing others while one is
//! served, and ending a VMM's run when the handler cannot serve it.

use super::*;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use uffd_core::{peer_credentials, PeerCredentials};

/// Waits for Firecracker: a connection from a user not allowed is closed unread; one
/// that sends nothing, or no userfaultfd, is not a VMM (a probe, a stranger) and is let
/// go; a VMM whose handshake fails is killed (unless told not to) and ends the run.
pub(super) fn accept_vmm(
    listener: &UnixListener,
    kill: bool,
    peer_uid: Option<u32>,
) -> Result<(Handshake, Option<Peer>)> {
    let mut strangers = 0u64;
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if transient(&e) => {
                warn!("accept: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e).context("accept a connection"),
        };
        let peer = Peer::of(&stream);
        if !allowed(peer.as_ref(), peer_uid) {
            strangers += 1;
            refuse_stranger(peer.as_ref(), strangers, "still waiting for Firecracker");
            continue;
        }
        let creds = peer.as_ref().map(|p| p.creds);
        match firecracker::handshake(stream) {
            Ok(hs) => return Ok((hs, peer)),
            Err(HandshakeError::Empty) => debug!(
                "a connection from {} closed without a word (a probe of the socket?); still waiting",
                peer_name(creds)
            ),
            Err(e) if !e.leaves_vmm_waiting() => warn!(
                "ignoring a connection from {}: {e}; still waiting for Firecracker",
                peer_name(creds)
            ),
            Err(e) => {
                if let Some(peer) = &peer {
                    end_peer(peer, kill, "its region table was refused");
                }
                return Err(e).with_context(|| format!("handshake with {}", vmm_name(creds)));
            }
        }
    }
}

/// A connection's peer process, as of its `connect(2)`: its credentials (`SO_PEERCRED`)
/// and, where the kernel gives one ([`firecracker::peer_pidfd`]), a pidfd that names that
/// process for good — its pid may name another process once it exits.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    pub(super) creds: PeerCredentials,
    pidfd: Option<Arc<OwnedFd>>,
}

impl Peer {
    fn of(stream: &UnixStream) -> Option<Peer> {
        let creds = peer_credentials(stream).ok()?;
        let pidfd = firecracker::peer_pidfd(stream, Some(creds)).map(Arc::new);
        Some(Peer { creds, pidfd })
    }

    /// SIGKILL, through the pidfd; by pid only where the kernel gave none.
    fn kill(&self) -> std::io::Result<()> {
        match &self.pidfd {
            Some(pidfd) => firecracker::kill_pidfd(pidfd.as_fd()),
            None => firecracker::kill_peer(&self.creds),
        }
    }
}

/// Whether `peer` may use the socket: root, our own user, or `--peer-uid`. A peer whose
/// credentials could not be read is not.
fn allowed(peer: Option<&Peer>, peer_uid: Option<u32>) -> bool {
    let euid = nix::unistd::geteuid().as_raw();
    peer.is_some_and(|p| [0, euid].contains(&p.creds.uid) || Some(p.creds.uid) == peer_uid)
}

/// Logs the `n`th connection from a user not allowed (closed unread by the caller): the
/// first at warning level, later ones at debug level (strangers may open thousands).
fn refuse_stranger(peer: Option<&Peer>, n: u64, then: &str) {
    let who = match peer {
        Some(p) => format!("uid {} (pid {})", p.creds.uid, p.creds.pid),
        None => "a peer whose credentials could not be read".into(),
    };
    if n == 1 {
        warn!(
            "closed a connection from {who} unread: only our own user, root and --peer-uid \
             may connect; {then} (further refusals at debug level)"
        );
    } else {
        debug!("closed connection {n} from {who} unread");
    }
}

/// VMMs that connected while another was served.
#[derive(Debug, Default)]
pub(super) struct Intruders {
    /// Second VMMs killed (SIGKILL), or left running under --no-kill-peer.
    pub(super) vmms: AtomicU64,
    /// Other connections (probes, strangers) closed.
    pub(super) others: AtomicU64,
}

/// After the handshake the listener stays bound (the path is ours until we exit, so a
/// second handler is refused); connections to it are closed at once, not left queued. A
/// connection that turns out to be a VMM has already handed over its userfaultfd and
/// waits in `PUT /snapshot/load` for pages nobody will serve: it gets the kill-peer
/// policy, loudly, and its userfaultfd is held until then (closing it would release its
/// faults onto zero pages). One connection at a time, each bounded by the handshake
/// deadline: a silent stranger delays the next VMM's fate by at most that.
pub(super) fn refuse_others(
    listener: &UnixListener,
    serving: String,
    kill: bool,
    peer_uid: Option<u32>,
) -> Result<Arc<Intruders>> {
    let listener = listener.try_clone().context("clone the listener")?;
    let intruders = Arc::new(Intruders::default());
    let counts = intruders.clone();
    std::thread::Builder::new()
        .name("refuse".into())
        .spawn(move || {
            // Under --no-kill-peer: second VMMs' handshakes, held until we exit.
            let mut held = Vec::new();
            loop {
                let stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(e) if transient(&e) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    Err(_) => return,
                };
                let peer = Peer::of(&stream);
                if !allowed(peer.as_ref(), peer_uid) {
                    let n = counts.others.fetch_add(1, Ordering::Relaxed) + 1;
                    refuse_stranger(peer.as_ref(), n, &format!("serving {serving}"));
                    continue;
                }
                match firecracker::handshake(stream) {
                    Ok(hs) => {
                        counts.vmms.fetch_add(1, Ordering::Relaxed);
                        refuse_vmm(peer.as_ref(), kill, &serving);
                        if !kill {
                            held.push(hs);
                        }
                    }
                    Err(e) if e.leaves_vmm_waiting() => {
                        counts.vmms.fetch_add(1, Ordering::Relaxed);
                        refuse_vmm(peer.as_ref(), kill, &serving);
                    }
                    Err(e) => {
                        let n = counts.others.fetch_add(1, Ordering::Relaxed) + 1;
                        let who = peer_name(peer.as_ref().map(|p| p.creds));
                        if n == 1 {
                            warn!("refused a connection from {who} ({e}): this handler serves {serving} only (further refusals at debug level)");
                        } else {
                            debug!("refused connection {n} from {who}: {e}");
                        }
                    }
                }
            }
        })
        .context("start the refusing thread")?;
    Ok(intruders)
}

/// A second VMM: it cannot be served by this handler, and would hang.
fn refuse_vmm(peer: Option<&Peer>, kill: bool, serving: &str) {
    let why = format!(
        "this handler already serves {serving}; a second VMM's faults would never be served"
    );
    match peer {
        Some(peer) => end_peer(peer, kill, &why),
        None => warn!("a second VMM (pid unknown) connected and cannot be killed: {why}"),
    }
}

/// Errors `accept(2)` recovers from: an aborted connection, or fds and memory running
/// out (a flood of connections) for a moment.
pub(super) fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A connection's peer before it proved to be a VMM.
pub(super) fn peer_name(peer: Option<PeerCredentials>) -> String {
    match peer {
        Some(p) => format!("pid {}", p.pid),
        None => "an unknown peer".into(),
    }
}

/// The VMM that completed the handshake.
pub(super) fn vmm_name(peer: Option<PeerCredentials>) -> String {
    match peer {
        Some(p) => format!("Firecracker (pid {})", p.pid),
        None => "Firecracker (pid unknown)".into(),
    }
}

/// Kills the VMM after a fatal error (or says why it is left running).
pub(super) fn end_peer(peer: &Peer, kill: bool, why: &str) {
    let who = vmm_name(Some(peer.creds));
    if !kill {
        warn!("leaving {who} running (--no-kill-peer): {why}; its guest hangs on its next fault");
        return;
    }
    match peer.kill() {
        Ok(()) => {
            warn!("killed {who} with SIGKILL, as it would hang on faults nobody serves: {why}")
        }
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => debug!("{who} is already gone"),
        Err(e) => warn!("could not kill {who}: {e}"),
    }
}
