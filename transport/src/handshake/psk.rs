//! The opener's side of the pre-shared-key challenge–response (see [`crate::key`] for
//! the proofs), and the SHUT a refused connection gets.

use std::time::{Duration, Instant};

use super::{refused_by_listener, unexpected};
use crate::error::{Refusal, SecurityKind};
use crate::key::Transcript;
use crate::link::ShutReason;
use crate::wire::Control;
use crate::{Conn, Error, Key};

/// The opener's side: its HELLO (`hello`) in the clear, then the challenge–response;
/// succeeds once both ends have proved the key over everything said (so over the HELLO
/// the listener read being the one sent).
pub(crate) fn open(conn: &mut Conn, key: &Key, hello: Control) -> Result<(), Error> {
    let Control::Hello { channel, .. } = hello else {
        unreachable!("an opener starts with its HELLO");
    };
    conn.set_channel(channel);
    let mut transcript = Transcript::new();
    transcript.said(&hello);
    conn.w.send_control(&hello)?;
    let challenge = match conn.r.recv_control()? {
        challenge @ Control::Challenge { .. } => challenge,
        Control::Shut { reason, detail } => {
            return Err(refused_by_listener(
                SecurityKind::PreSharedKey,
                reason,
                detail,
            ))
        }
        other => return Err(unexpected(other, "CHALLENGE", channel)),
    };
    transcript.said(&challenge);
    let auth = Control::Auth {
        proof: key.proof(b"open", &transcript),
        nonce: crate::key::nonce()?,
    };
    transcript.said(&auth);
    conn.w.send_control(&auth)?;
    match conn.r.recv_control()? {
        Control::AuthOk { proof } if key.verify(b"listen", &transcript, &proof) => Ok(()),
        Control::AuthOk { .. } => Err(Error::refused(Refusal::WrongKey)),
        Control::Shut { reason, detail } => Err(refused_by_listener(
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
/// two seconds, reading what it still sends — for the peer to close first, and
/// closes. Closing at once, with the peer's frames (its heartbeats) unread, resets the
/// connection, and the pair's other connection with it: the peer could see a reset before
/// it reads the SHUT, take it for a break and dial again until it gives up.
pub fn refuse(conn: &mut Conn, reason: ShutReason, detail: &str) {
    let shut = Control::Shut {
        reason,
        detail: detail.into(),
    };
    if conn.w.send_control(&shut).is_ok() {
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
