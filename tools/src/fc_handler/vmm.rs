//! The VMM on the socket: telling Firecracker from a probe, refusing others while one is
//! served, and ending a VMM's run when the handler cannot serve it.

use super::*;

/// Waits for Firecracker: a connection that sends nothing, or no userfaultfd, is not a
/// VMM (a probe, a stranger) and is let go; a VMM whose handshake fails is killed (unless
/// told not to) and ends the run.
pub(super) fn accept_vmm(listener: &UnixListener, kill: bool) -> Result<Handshake> {
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
        let peer = peer_credentials(&stream).ok();
        match firecracker::handshake(stream) {
            Ok(hs) => return Ok(hs),
            Err(HandshakeError::Empty) => debug!(
                "a connection from {} closed without a word (a probe of the socket?); still waiting",
                peer_name(peer)
            ),
            Err(e) if !e.leaves_vmm_waiting() => warn!(
                "ignoring a connection from {}: {e}; still waiting for Firecracker",
                peer_name(peer)
            ),
            Err(e) => {
                if let Some(peer) = peer {
                    end_peer(&peer, kill, "its region table was refused");
                }
                return Err(e).with_context(|| format!("handshake with {}", vmm_name(peer)));
            }
        }
    }
}

/// After the handshake the listener stays bound (the path is ours until we exit, so a
/// second handler is refused); connections to it are closed at once, not left queued.
pub(super) fn refuse_others(listener: &UnixListener, serving: String) -> Result<()> {
    let listener = listener.try_clone().context("clone the listener")?;
    std::thread::Builder::new()
        .name("refuse".into())
        .spawn(move || {
            let mut refused = 0u64;
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let who = peer_name(peer_credentials(&stream).ok());
                        refused += 1;
                        if refused == 1 {
                            warn!("refused a connection from {who}: this handler serves {serving} only (further refusals at debug level)");
                        } else {
                            debug!("refused connection {refused} from {who}");
                        }
                    }
                    Err(e) if transient(&e) => std::thread::sleep(Duration::from_millis(100)),
                    Err(_) => return,
                }
            }
        })
        .context("start the refusing thread")?;
    Ok(())
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
pub(super) fn end_peer(peer: &PeerCredentials, kill: bool, why: &str) {
    let who = vmm_name(Some(*peer));
    if !kill {
        warn!("leaving {who} running (--no-kill-peer): {why}; its guest hangs on its next fault");
        return;
    }
    match firecracker::kill_peer(peer) {
        Ok(()) => {
            warn!("killed {who} with SIGKILL, as it would hang on faults nobody serves: {why}")
        }
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => debug!("{who} is already gone"),
        Err(e) => warn!("could not kill {who}: {e}"),
    }
}
