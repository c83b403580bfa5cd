//! The link's own messages: the handshake's, the heartbeats and SHUT, in frames of the
//! kinds reserved for them ([`kind`]).

use super::{open_frame, put_frame, within, Reader, WireError, DEFAULT_MAX_BODY, MAX_DETAIL};
use crate::link::{Channel, Role, ShutReason};

/// The link's frame kinds. A protocol must not use them for its own messages.
pub mod kind {
    /// The opener's first message.
    pub const HELLO: u8 = 1;
    /// The listener's pre-shared-key challenge.
    pub const CHALLENGE: u8 = 2;
    /// The opener's proof of the key.
    pub const AUTH: u8 = 3;
    /// The listener's proof: admitted.
    pub const AUTH_OK: u8 = 4;
    /// The listener's answer to a HELLO asking for TLS.
    pub const START_TLS: u8 = 5;
    /// Admitted, inside TLS.
    pub const ADMITTED: u8 = 6;
    /// Heartbeat.
    pub const PING: u8 = 32;
    /// Answer to a heartbeat.
    pub const PONG: u8 = 33;
    /// The sender is closing the connection.
    pub const SHUT: u8 = 40;

    /// Whether `kind` is one of the link's.
    pub fn is_link(kind: u8) -> bool {
        matches!(kind, 1..=6 | 32 | 33 | 40)
    }
}

/// Which protocol a link speaks, as its HELLO says: a listener admits only openers that
/// speak the same magic and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol {
    /// Eight bytes naming the protocol.
    pub magic: [u8; 8],
    /// Its wire version.
    pub version: u16,
    /// Its feature bits offered in HELLO (the transport adds [`HELLO_TLS`]).
    pub features: u64,
}

/// In a HELLO's features: the opener speaks TLS 1.3 with certificates (without it:
/// plaintext and a pre-shared key). A listener speaking the other refuses it with
/// [`ShutReason::SecurityMismatch`].
pub const HELLO_TLS: u64 = 1 << 4;

/// The link's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// First message on every connection, from its opener.
    Hello {
        /// The protocol's magic.
        magic: [u8; 8],
        /// The protocol's version.
        version: u16,
        /// Offered features ([`HELLO_TLS`] and the protocol's).
        features: u64,
        /// Who is opening.
        role: Role,
        /// What this connection carries.
        channel: Channel,
        /// Session id (ties the urgent channel and reconnects to a session).
        session: u64,
        /// Which connection pair of the session this is: the opener counts its attempts,
        /// and a newer generation supersedes the pair of an older one.
        generation: u32,
    },
    /// The listener's authentication challenge.
    Challenge {
        /// Random nonce to prove the key over.
        nonce: [u8; 32],
    },
    /// The opener's proof of the pre-shared key over the challenge, and its own nonce.
    Auth {
        /// MAC of the challenge nonce.
        proof: [u8; 32],
        /// Nonce for the listener to prove the key over.
        nonce: [u8; 32],
    },
    /// The listener's proof over the opener's nonce: both sides are authenticated.
    AuthOk {
        /// MAC of the opener's nonce.
        proof: [u8; 32],
    },
    /// The listener's answer to a HELLO asking for TLS, in plaintext: the opener's TLS
    /// handshake comes next.
    StartTls,
    /// Inside TLS, after the opener repeated its HELLO there: the connection is admitted.
    Admitted,
    /// Liveness probe.
    Ping {
        /// Echoed in the PONG.
        seq: u64,
    },
    /// Answer to PING.
    Pong {
        /// The PING's sequence number.
        seq: u64,
    },
    /// The sender is closing the connection.
    Shut {
        /// Why.
        reason: ShutReason,
        /// Human-readable detail (UTF-8, at most [`MAX_DETAIL`] bytes).
        detail: String,
    },
}

impl Control {
    /// The message's name on the wire (for errors and logs).
    pub fn name(&self) -> &'static str {
        self.kind_name().1
    }

    fn kind_name(&self) -> (u8, &'static str) {
        match self {
            Control::Hello { .. } => (kind::HELLO, "HELLO"),
            Control::Challenge { .. } => (kind::CHALLENGE, "CHALLENGE"),
            Control::Auth { .. } => (kind::AUTH, "AUTH"),
            Control::AuthOk { .. } => (kind::AUTH_OK, "AUTH_OK"),
            Control::StartTls => (kind::START_TLS, "START_TLS"),
            Control::Admitted => (kind::ADMITTED, "ADMITTED"),
            Control::Ping { .. } => (kind::PING, "PING"),
            Control::Pong { .. } => (kind::PONG, "PONG"),
            Control::Shut { .. } => (kind::SHUT, "SHUT"),
        }
    }

    /// Appends the message as one frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_frame(out, self.kind_name().0, |w| match self {
            Control::Hello {
                magic,
                version,
                features,
                role,
                channel,
                session,
                generation,
            } => {
                w.bytes(magic);
                w.u16(*version);
                w.u64(*features);
                w.u8(*role as u8);
                w.u8(*channel as u8);
                w.u64(*session);
                w.u32(*generation);
            }
            Control::Challenge { nonce } => w.bytes(nonce),
            Control::Auth { proof, nonce } => {
                w.bytes(proof);
                w.bytes(nonce);
            }
            Control::AuthOk { proof } => w.bytes(proof),
            Control::StartTls | Control::Admitted => {}
            Control::Ping { seq } | Control::Pong { seq } => w.u64(*seq),
            Control::Shut { reason, detail } => {
                w.u8(*reason as u8);
                w.u16(detail.len() as u16);
                w.bytes(detail.as_bytes());
            }
        })
    }

    /// Decodes the body of a frame of one of the link's kinds ([`kind::is_link`]);
    /// [`WireError::UnknownKind`] for any other.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Control, WireError> {
        let mut r = Reader { buf: body, kind };
        let msg = match kind {
            kind::HELLO => hello(&mut r)?,
            kind::CHALLENGE => Control::Challenge { nonce: r.array()? },
            kind::AUTH => Control::Auth {
                proof: r.array()?,
                nonce: r.array()?,
            },
            kind::AUTH_OK => Control::AuthOk { proof: r.array()? },
            kind::START_TLS => Control::StartTls,
            kind::ADMITTED => Control::Admitted,
            kind::PING => Control::Ping { seq: r.u64()? },
            kind::PONG => Control::Pong { seq: r.u64()? },
            kind::SHUT => shut(&mut r)?,
            other => return Err(WireError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Decodes the first frame of `buf`, which must be one of the link's: `Ok(None)` while
    /// it is incomplete, else the message and the bytes it used.
    pub fn decode_frame(
        buf: &[u8],
        max_body: usize,
    ) -> Result<Option<(Control, usize)>, WireError> {
        let Some(f) = open_frame(buf, max_body)? else {
            return Ok(None);
        };
        Ok(Some((Control::decode(f.kind, f.body)?, f.len)))
    }
}

fn hello(r: &mut Reader<'_>) -> Result<Control, WireError> {
    let magic = r.array()?;
    let version = r.u16()?;
    let features = r.u64()?;
    let role = match r.u8()? {
        1 => Role::Destination,
        2 => Role::Source,
        _ => return Err(WireError::Invalid("unknown role")),
    };
    let channel = match r.u8()? {
        1 => Channel::Main,
        2 => Channel::Urgent,
        _ => return Err(WireError::Invalid("unknown channel")),
    };
    Ok(Control::Hello {
        magic,
        version,
        features,
        role,
        channel,
        session: r.u64()?,
        generation: r.u32()?,
    })
}

fn shut(r: &mut Reader<'_>) -> Result<Control, WireError> {
    let byte = usize::from(r.u8()?);
    let Some(&reason) = byte.checked_sub(1).and_then(|i| ShutReason::ALL.get(i)) else {
        return Err(WireError::Invalid("unknown shut reason"));
    };
    let len = within("shut detail length", r.u16()?.into(), MAX_DETAIL)?;
    let detail = std::str::from_utf8(r.take(len)?)
        .map_err(|_| WireError::Invalid("shut detail is not UTF-8"))?
        .to_string();
    Ok(Control::Shut { reason, detail })
}

/// The channel a connection carries, from its opener's first bytes (its HELLO): `None`
/// until the whole frame is there, an error if they are not a HELLO. For what sits
/// between two endpoints (a proxy, a test's fault injector).
pub fn peek_channel(first: &[u8]) -> Option<Result<Channel, WireError>> {
    match Control::decode_frame(first, DEFAULT_MAX_BODY) {
        Ok(Some((Control::Hello { channel, .. }, _))) => Some(Ok(channel)),
        Ok(Some((other, _))) => Some(Err(WireError::UnknownKind(other.kind_name().0))),
        Ok(None) => None,
        Err(e) => Some(Err(e)),
    }
}
