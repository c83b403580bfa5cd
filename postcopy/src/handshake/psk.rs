//! The opener's side of the pre-shared-key challenge–response (see [`transport::key`] for
//! the proofs), and the SHUT a refused connection gets.

use std::time::{Duration, Instant};

use transport::{Key, SecurityKind};

use super::{refused_by_listener, Hello};
use crate::error::{unexpected, Refusal};
use crate::net::{Conn, RecvMessage, SendMessage};
use crate::wire::{Message, ShutReason};
use crate::Error;

/// The opener's side: HELLO in the clear, then the challenge–response; succeeds once both
/// ends have proved the key.
pub(crate) fn open(conn: &mut Conn, key: &Key, hello: Hello) -> Result<(), Error> {
    let channel = hello.channel;
    conn.set_channel(channel);
    conn.w.send(&hello.message(SecurityKind::PreSharedKey))?;
    let challenge = match conn.r.recv()? {
        Message::Challenge { nonce } => nonce,
        Message::Shut { reason, detail } => {
            return Err(refused_by_listener(
                SecurityKind::PreSharedKey,
                reason,
                detail,
            ))
        }
        other => return Err(unexpected(other, "CHALLENGE", channel)),
    };
    let mine = transport::key::nonce()?;
    conn.w.send(&Message::Auth {
        proof: key.proof(b"open", &challenge, hello.session),
        nonce: mine,
    })?;
    match conn.r.recv()? {
        Message::AuthOk { proof } if key.verify(b"listen", &mine, hello.session, &proof) => Ok(()),
        Message::AuthOk { .. } => Err(Error::refused(Refusal::WrongKey)),
        Message::Shut { reason, detail } => Err(refused_by_listener(
            SecurityKind::PreSharedKey,
            reason,
            detail,
        )),
        other => Err(unexpected(other, "AUTH_OK", channel)),
    }
}

/// How long a refusal waits for the peer to close first.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Tells the peer why it is refused (best effort: it may be gone), waits — at most
/// [`REFUSAL_LINGER`], reading what it still sends — for the peer to close first, and
/// closes. Closing at once, with the peer's frames (its heartbeats) unread, resets the
/// connection, and the pair's other connection with it: the peer could see a reset before
/// it reads the SHUT, take it for a break and dial again until it gives up.
pub(crate) fn refuse(conn: &mut Conn, reason: ShutReason, detail: &str) {
    let shut = Message::Shut {
        reason,
        detail: detail.into(),
    };
    if conn.w.send(&shut).is_ok() {
        let until = Instant::now() + REFUSAL_LINGER;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero()
                || conn.link.set_deadlines(Some(left), None).is_err()
                || conn.r.recv_raw().is_err()
            {
                break;
            }
        }
    }
    conn.link.shutdown();
}
