//! The frame every link message travels in, and the link's own messages.
//!
//! A frame is `body_len: u32 | kind: u8 | flags: u8 | reserved: u16 | body | crc32: u32`,
//! little endian, the CRC-32 covering kind, flags, reserved and body. The kinds of
//! [`Control`] are the link's (the handshake, heartbeats, SHUT); a protocol spoken on
//! the link takes every other kind and encodes its bodies with [`Writer`] and decodes
//! them with [`Reader`], through [`put_frame`] and [`open_frame`]. Decoding refuses
//! anything malformed — oversize, bad checksum, reserved bits, a truncated or padded
//! body, a field out of range — with a typed [`WireError`], never a panic.
//!
//! Every connection starts with the opener's HELLO: the protocol's magic and version
//! ([`Protocol`]), its features, and who it is ([`Hello`](crate::handshake::Hello)).

use crate::link::{Channel, Role, ShutReason};

/// Bytes before a frame's body: its length, kind, flags and reserved bytes.
pub const HEADER_LEN: usize = 8;
/// Bytes after a frame's body: its checksum.
pub const TRAILER_LEN: usize = 4;
/// The largest body a reader accepts unless told otherwise: 32 MiB of data and a page of
/// headers.
pub const DEFAULT_MAX_BODY: usize = 32 << 20 | 4096;

/// Longest SHUT detail text.
pub const MAX_DETAIL: usize = 1024;

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

/// A malformed frame or message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame's body is larger than accepted.
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    Oversize {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The checksum does not match.
    #[error("checksum mismatch on a kind-{kind} frame")]
    BadChecksum {
        /// The frame's kind byte.
        kind: u8,
    },
    /// A kind this version does not know (or not here).
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// Flags or reserved bits set.
    #[error("kind-{kind} frame has reserved bits set")]
    Reserved {
        /// The kind.
        kind: u8,
    },
    /// HELLO with another protocol's magic.
    #[error("not a peer of this protocol (bad magic)")]
    BadMagic,
    /// HELLO with another version.
    #[error("peer speaks wire version {theirs}, this side {ours}")]
    BadVersion {
        /// The peer's.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// The body ended before the message did.
    #[error("kind-{kind} body truncated")]
    Truncated {
        /// The kind.
        kind: u8,
    },
    /// Bytes after the message.
    #[error("kind-{kind} body has {extra} trailing bytes")]
    Trailing {
        /// The kind.
        kind: u8,
        /// How many.
        extra: usize,
    },
    /// A field outside what the geometry allows.
    #[error("{what} {value} out of range (limit {limit})")]
    OutOfRange {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit it broke.
        limit: u64,
    },
    /// Anything else that cannot be.
    #[error("invalid message: {0}")]
    Invalid(&'static str),
}

/// Appends to a frame's body.
pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    /// A little-endian `u16`.
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A little-endian `u32`.
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A little-endian `u64`.
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Bytes as they are.
    pub fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
}

/// Reads a frame's body, refusing what is short ([`WireError::Truncated`]) or left over
/// ([`Reader::finish`]).
pub struct Reader<'a> {
    /// What is left of the body.
    pub buf: &'a [u8],
    /// The frame's kind (for errors).
    pub kind: u8,
}

impl<'a> Reader<'a> {
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated { kind: self.kind });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    /// A little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(u16::from_le_bytes)
    }
    /// A little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_le_bytes)
    }
    /// A little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.array().map(u64::from_le_bytes)
    }
    /// A count prefix, refused above `max` and above what the remaining bytes can hold
    /// at `item` bytes each (so a lying count cannot make us allocate).
    pub fn count(&mut self, max: usize, item: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::OutOfRange {
                what: "item count",
                value: n as u64,
                limit: max as u64,
            });
        }
        if n.saturating_mul(item) > self.buf.len() {
            return Err(WireError::Truncated { kind: self.kind });
        }
        Ok(n)
    }
    /// The body is used up: anything left is an error.
    pub fn finish(self) -> Result<(), WireError> {
        match self.buf.len() {
            0 => Ok(()),
            extra => Err(WireError::Trailing {
                kind: self.kind,
                extra,
            }),
        }
    }
}

/// Appends one frame of `kind` whose body `body` writes.
pub fn put_frame(out: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Writer<'_>)) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    body(&mut Writer(out));
    let body_len = out.len() - start - HEADER_LEN;
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4] = kind;
    let crc = crc32fast::hash(&out[start + 4..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// The header and trailer of a frame of `kind` whose body is `parts` one after another:
/// for sending a body straight from the caller's memory (`writev` of header, parts,
/// trailer) without copying it into a frame first.
pub fn envelope(kind: u8, parts: &[&[u8]]) -> ([u8; HEADER_LEN], [u8; TRAILER_LEN]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut head = [0u8; HEADER_LEN];
    head[..4].copy_from_slice(&(len as u32).to_le_bytes());
    head[4] = kind;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[4..]);
    for p in parts {
        crc.update(p);
    }
    (head, crc.finalize().to_le_bytes())
}

/// The length of the first frame of `buf` once its header is in: `Ok(None)` if even the
/// header is incomplete. Refuses an oversize length before anything is buffered for it.
pub fn frame_len(buf: &[u8], max_body: usize) -> Result<Option<usize>, WireError> {
    let Some(len) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(len[..4].try_into().expect("4 bytes")) as usize;
    if len > max_body {
        return Err(WireError::Oversize { len, max: max_body });
    }
    Ok(Some(HEADER_LEN + len + TRAILER_LEN))
}

/// A checked frame's parts, borrowed from the buffer it was read into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened<'a> {
    /// Its kind.
    pub kind: u8,
    /// Its body.
    pub body: &'a [u8],
    /// The bytes the whole frame took, header to trailer.
    pub len: usize,
}

/// The first frame of `buf`, checked (length, checksum, reserved bits): `Ok(None)` while
/// it is incomplete.
pub fn open_frame(buf: &[u8], max_body: usize) -> Result<Option<Opened<'_>>, WireError> {
    let Some(len) = frame_len(buf, max_body)? else {
        return Ok(None);
    };
    if buf.len() < len {
        return Ok(None);
    }
    let kind = buf[4];
    let crc = u32::from_le_bytes(buf[len - 4..len].try_into().expect("4 bytes"));
    if crc32fast::hash(&buf[4..len - 4]) != crc {
        return Err(WireError::BadChecksum { kind });
    }
    if buf[5..8] != [0, 0, 0] {
        return Err(WireError::Reserved { kind });
    }
    let body = &buf[HEADER_LEN..len - TRAILER_LEN];
    Ok(Some(Opened { kind, body, len }))
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
    let reason = match r.u8()? {
        1 => ShutReason::Done,
        2 => ShutReason::Error,
        3 => ShutReason::Auth,
        4 => ShutReason::Cancelled,
        5 => ShutReason::SecurityMismatch,
        6 => ShutReason::Busy,
        _ => return Err(WireError::Invalid("unknown shut reason")),
    };
    let len = r.u16()? as usize;
    if len > MAX_DETAIL {
        return Err(WireError::OutOfRange {
            what: "shut detail length",
            value: len as u64,
            limit: MAX_DETAIL as u64,
        });
    }
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
