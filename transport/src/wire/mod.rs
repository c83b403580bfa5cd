//! The frame every link message travels in, and the link's own messages.
//!
//! A frame is `body_len: u32 | kind: u8 | flags: u8 | reserved: u16 | body | crc32: u32`,
//! little endian, the CRC-32 covering kind, flags, reserved and body — except where the
//! connection is *sealed* (TLS: the AEAD authenticates every byte, so a CRC adds nothing):
//! there a protocol may leave it zero ([`envelope`]) and its decoder does not check it
//! ([`open_frame_with`]). Whether a connection is sealed is each end's own knowledge of
//! its connection, never a bit on the wire a peer could set. The kinds of
//! [`Control`] are the link's (the handshake, heartbeats, SHUT); a protocol spoken on
//! the link takes every other kind and encodes its bodies with [`Writer`] and decodes
//! them with [`Reader`], through [`put_frame`] and [`open_frame`]. Decoding refuses
//! anything malformed — oversize, bad checksum, reserved bits, a truncated or padded
//! body, a field out of range — with a typed [`WireError`], never a panic.
//!
//! Every connection starts with the opener's HELLO: the protocol's magic and version
//! ([`Protocol`]), its features, and who it is ([`Hello`](crate::handshake::Hello)).

mod control;

pub use control::{kind, peek_channel, Control, Protocol, HELLO_TLS};

/// Bytes before a frame's body: its length, kind, flags and reserved bytes.
pub const HEADER_LEN: usize = 8;
/// Bytes after a frame's body: its checksum.
pub const TRAILER_LEN: usize = 4;
/// The largest body a reader accepts unless told otherwise: 32 MiB of data and a page of
/// headers.
pub const DEFAULT_MAX_BODY: usize = 32 << 20 | 4096;

/// Longest SHUT detail text.
pub const MAX_DETAIL: usize = 1024;

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
        let n = within("item count", self.u32()? as usize, max)?;
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

/// `value` if it is at most `limit`; else [`WireError::OutOfRange`] naming `what`.
pub fn within(what: &'static str, value: usize, limit: usize) -> Result<usize, WireError> {
    match value <= limit {
        true => Ok(value),
        false => Err(WireError::OutOfRange {
            what,
            value: value as u64,
            limit: limit as u64,
        }),
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
/// trailer) without copying it into a frame first. On a `sealed` connection the trailer
/// is zero and the parts are not read (see the module's docs).
pub fn envelope(kind: u8, parts: &[&[u8]], sealed: bool) -> ([u8; HEADER_LEN], [u8; TRAILER_LEN]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut head = [0u8; HEADER_LEN];
    head[..4].copy_from_slice(&(len as u32).to_le_bytes());
    head[4] = kind;
    if sealed {
        return (head, [0; TRAILER_LEN]);
    }
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
    open_frame_with(buf, max_body, false)
}

/// [`open_frame`] for a frame read from a connection that is `sealed` or not: on a sealed
/// one the checksum is not checked (see the module's docs), everything else is.
pub fn open_frame_with(
    buf: &[u8],
    max_body: usize,
    sealed: bool,
) -> Result<Option<Opened<'_>>, WireError> {
    let Some(len) = frame_len(buf, max_body)? else {
        return Ok(None);
    };
    if buf.len() < len {
        return Ok(None);
    }
    let kind = buf[4];
    let crc = u32::from_le_bytes(buf[len - 4..len].try_into().expect("4 bytes"));
    if !sealed && crc32fast::hash(&buf[4..len - 4]) != crc {
        return Err(WireError::BadChecksum { kind });
    }
    if buf[5..8] != [0, 0, 0] {
        return Err(WireError::Reserved { kind });
    }
    let body = &buf[HEADER_LEN..len - TRAILER_LEN];
    Ok(Some(Opened { kind, body, len }))
}
