//! How every connection starts, before any page moves.
//!
//! The opener's HELLO always goes first and in the clear: who it is (role), what the
//! connection carries (channel), its session and which connection pair of it
//! (generation), and whether it speaks TLS ([`crate::wire::HELLO_TLS`]). Nothing in it is secret;
//! it lets the listener refuse a peer that speaks the other security at once, with a
//! SHUT saying so (each end then reports [`Refusal::SecurityMismatch`] naming both), and
//! lets what sits between the ends (a proxy, a fault injector) tell the channels apart.
//!
//! ```text
//! plaintext, pre-shared key (trusted links only)   TLS 1.3, mutual certificates
//!   HELLO ──────────────────────▶                    HELLO (TLS) ─────────────────▶
//!         ◀────────────── CHALLENGE                        ◀──────────────── START_TLS
//!   AUTH (proof, nonce) ────────▶                    TLS handshake, both certificates
//!         ◀─────────────── AUTH_OK (proof)           HELLO again, inside ─────────▶
//!                                                          ◀───────────────── ADMITTED
//! ```
//!
//! With a pre-shared key, each proof is a MAC over everything said so far (a
//! [`crate::key::Transcript`], the HELLO first), so a HELLO rewritten on the way fails the
//! opener's proof and the connection is refused as a wrong key.
//! With TLS, the listener admits the connection only if the HELLO repeated inside the
//! encrypted session is the one sent outside (so the session, channel and generation it
//! files the connection under are authenticated). Either way the listener may instead
//! answer SHUT: the peer's key or certificate is wrong, it is the wrong role, another
//! session owns this destination, or the listener is at its session cap
//! ([`LinkError::Busy`], which an opener retries).
//!
//! Openers handshake with blocking I/O on their own thread; listeners run
//! [`Listening`], which does no I/O at all, so that one thread can take any number of
//! strangers' connections through it at once (the gate of [`crate::link::Acceptor`]).
//!
//! [`Refusal::SecurityMismatch`]: crate::Refusal::SecurityMismatch
//! [`LinkError::Busy`]: crate::link::LinkError::Busy

mod listen;
mod open;
mod psk;

pub use listen::{Listening, Progress, MAX_HANDSHAKE_FRAME};
pub(crate) use open::open;
pub use psk::refuse;

use crate::error::{Refusal, SecurityKind};
use crate::link::{Channel, LinkError, Role, ShutReason};
use crate::wire::{Control, Protocol, WireError, HELLO_TLS};
use crate::Error;

/// What an opener says of itself in its HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Its role.
    pub role: Role,
    /// What the connection carries.
    pub channel: Channel,
    /// Its session.
    pub session: u64,
    /// Which connection pair of the session.
    pub generation: u32,
}

impl Hello {
    /// The HELLO an opener speaking `protocol`, secured as `security`, sends.
    pub fn message(&self, protocol: &Protocol, security: SecurityKind) -> Control {
        let tls = match security {
            SecurityKind::Tls => HELLO_TLS,
            SecurityKind::PreSharedKey => 0,
        };
        Control::Hello {
            magic: protocol.magic,
            version: protocol.version,
            features: protocol.features | tls,
            role: self.role,
            channel: self.channel,
            session: self.session,
            generation: self.generation,
        }
    }

    /// The opener's words in a HELLO message of `protocol`, and the security it asks
    /// for: `None` if it is not a HELLO; an error if it speaks another protocol.
    fn of(msg: &Control, protocol: &Protocol) -> Option<Result<(Hello, SecurityKind), WireError>> {
        let Control::Hello {
            magic,
            version,
            features,
            role,
            channel,
            session,
            generation,
        } = *msg
        else {
            return None;
        };
        if magic != protocol.magic {
            return Some(Err(WireError::BadMagic));
        }
        if version != protocol.version {
            let ours = protocol.version;
            return Some(Err(WireError::BadVersion {
                theirs: version,
                ours,
            }));
        }
        let hello = Hello {
            role,
            channel,
            session,
            generation,
        };
        let kind = match features & HELLO_TLS != 0 {
            true => SecurityKind::Tls,
            false => SecurityKind::PreSharedKey,
        };
        Some(Ok((hello, kind)))
    }
}

/// The other security.
fn other(kind: SecurityKind) -> SecurityKind {
    match kind {
        SecurityKind::Tls => SecurityKind::PreSharedKey,
        SecurityKind::PreSharedKey => SecurityKind::Tls,
    }
}

/// What a listener's SHUT during the handshake means to an opener speaking `ours`.
fn refused_by_listener(ours: SecurityKind, reason: ShutReason, detail: String) -> Error {
    match reason {
        ShutReason::SecurityMismatch => Error::refused(Refusal::SecurityMismatch {
            ours,
            peer: other(ours),
        }),
        ShutReason::Busy => LinkError::Busy { detail }.into(),
        ShutReason::Auth if ours == SecurityKind::PreSharedKey => Error::refused(Refusal::WrongKey),
        reason => Error::refused(Refusal::PeerShut { reason, detail }),
    }
}

/// What a handshake message out of turn means: a SHUT is the peer refusing, anything
/// else is [`Error::Unexpected`].
fn unexpected(msg: Control, expected: &'static str, channel: Channel) -> Error {
    match msg {
        Control::Shut { reason, detail } => Error::refused(Refusal::PeerShut { reason, detail }),
        other => Error::Unexpected {
            expected,
            got: other.name(),
            channel,
        },
    }
}
