//! The postcopy wire format: length-framed, checksummed messages.
//!
//! A frame is `body_len: u32 | kind: u8 | flags: u8 | reserved: u16 | body | crc32: u32`,
//! little endian, the CRC-32 covering kind, flags, reserved and body. Every connection
//! starts with [`Message::Hello`] (magic, version, features). [`decode`] refuses anything
//! malformed — oversize, unknown kind, bad checksum, wrong version, fields out of range
//! for the advised geometry, trailing bytes — with a typed [`WireError`], never a panic;
//! an incomplete frame is `Ok(None)` (read more).

use bitflags::bitflags;

/// Identifies a uffdkit postcopy connection.
pub const MAGIC: [u8; 8] = *b"UFFDKPC\0";
/// The wire version this crate speaks (3: a HELLO asking for TLS is answered with START_TLS,
/// and the connection is admitted inside TLS with ADMITTED).
pub const VERSION: u16 = 3;
/// Bytes before the body.
pub const HEADER_LEN: usize = 8;
/// Bytes after the body.
pub const TRAILER_LEN: usize = 4;
/// The default largest body accepted (a 32 MiB batch of pages plus headers).
pub const DEFAULT_MAX_BODY: usize = 32 << 20 | 4096;
/// Page counts above this are refused (2^40 pages: 4 PiB of 4 KiB pages).
pub const MAX_PAGES: u64 = 1 << 40;
/// Most regions in one ADVISE.
pub const MAX_REGIONS: usize = 4096;
/// Most ranges in one DISCARD or REQ_PAGES.
pub const MAX_RANGES: usize = 1 << 16;
/// Longest SHUT detail text.
pub const MAX_DETAIL: usize = 1024;

bitflags! {
    /// Protocol features, negotiated in HELLO (the intersection is used).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        /// Zero pages travel as ZERO_RUN, not data.
        const ZERO_RUNS = 1 << 0;
        /// A second connection carries urgent (requested) pages.
        const URGENT_CHANNEL = 1 << 1;
        /// A broken connection pauses and resumes with RECV_BITMAP.
        const RECOVERY = 1 << 2;
        /// 2 MiB pages.
        const HUGE_PAGES = 1 << 3;
        /// In HELLO: the opener speaks TLS 1.3 with certificates (without it: plaintext and
        /// a pre-shared key). A listener speaking the other refuses it with
        /// [`ShutReason::SecurityMismatch`].
        const TLS = 1 << 4;
        const _ = !0;
    }
}

/// Which end a connection's opener is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// The migration destination (or a restore client of a page server).
    Destination = 1,
    /// The migration source.
    Source = 2,
}

/// What a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Channel {
    /// Control messages and the background stream.
    Main = 1,
    /// Requested pages only, so they never queue behind the stream.
    Urgent = 2,
}

/// Why a peer shuts a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ShutReason {
    /// The migration finished.
    Done = 1,
    /// The peer failed; see the detail text.
    Error = 2,
    /// Authentication failed.
    Auth = 3,
    /// The operator cancelled.
    Cancelled = 4,
    /// One side speaks TLS, the other plaintext with a pre-shared key.
    SecurityMismatch = 5,
    /// The listener serves as many sessions as it may; try again later.
    Busy = 6,
}

/// A run of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRange {
    /// First page index.
    pub first: u64,
    /// Number of pages (at least one).
    pub count: u64,
}

/// One region of the migrated memory, in page units of the advised page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WireRegion {
    /// First page of the region in the migration's page space.
    pub first_page: u64,
    /// Pages in the region.
    pub pages: u64,
}

/// The geometry a source announces before anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advise {
    /// Page size in bytes: 4096 or 2 MiB.
    pub page_size: u32,
    /// Pages in the migration.
    pub page_count: u64,
    /// Features in use.
    pub features: Features,
    /// The regions, sorted and disjoint, within `page_count`.
    pub regions: Vec<WireRegion>,
}

/// Every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message on every connection, from its opener.
    Hello {
        /// Protocol version.
        version: u16,
        /// Offered features.
        features: Features,
        /// Who is opening.
        role: Role,
        /// What this connection carries.
        channel: Channel,
        /// Migration session id (ties the urgent channel and reconnects to a session).
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
    /// Geometry and features.
    Advise(Advise),
    /// Pages the destination must drop (dirtied after they were sent).
    Discard {
        /// The ranges.
        ranges: Vec<PageRange>,
    },
    /// The destination may start listening for faults.
    Listen,
    /// Run the workload on the destination.
    Run,
    /// Every page has been sent.
    End,
    /// Contiguous pages of data.
    Pages {
        /// First page index.
        first: u64,
        /// `count * page_size` bytes.
        data: Vec<u8>,
    },
    /// A run of zero pages.
    ZeroRun(PageRange),
    /// Return path: the destination asks for these pages now.
    ReqPages {
        /// The ranges.
        ranges: Vec<PageRange>,
    },
    /// Acknowledges a sequence number.
    Ack {
        /// The sequence number.
        seq: u64,
    },
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
    /// On resume: every page the destination has received (bit i = page i).
    RecvBitmap {
        /// `ceil(page_count / 64)` words.
        words: Vec<u64>,
    },
    /// After END: 64-bit digests of the destination's pages `first..first + n`, for the
    /// source to verify against its final content.
    Digests {
        /// First page index.
        first: u64,
        /// One digest per page.
        digests: Vec<u64>,
    },
    /// The sender is closing the connection.
    Shut {
        /// Why.
        reason: ShutReason,
        /// Human-readable detail (UTF-8, at most [`MAX_DETAIL`] bytes).
        detail: String,
    },
}

pub(crate) mod kind {
    pub const HELLO: u8 = 1;
    pub const CHALLENGE: u8 = 2;
    pub const AUTH: u8 = 3;
    pub const AUTH_OK: u8 = 4;
    pub const START_TLS: u8 = 5;
    pub const ADMITTED: u8 = 6;
    pub const ADVISE: u8 = 10;
    pub const DISCARD: u8 = 11;
    pub const LISTEN: u8 = 12;
    pub const RUN: u8 = 13;
    pub const END: u8 = 14;
    pub const PAGES: u8 = 20;
    pub const ZERO_RUN: u8 = 22;
    pub const REQ_PAGES: u8 = 30;
    pub const ACK: u8 = 31;
    pub const PING: u8 = 32;
    pub const PONG: u8 = 33;
    pub const RECV_BITMAP: u8 = 34;
    pub const DIGESTS: u8 = 35;
    pub const SHUT: u8 = 40;
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
    /// A kind this version does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// Flags or reserved bits set.
    #[error("kind-{kind} frame has reserved bits set")]
    Reserved {
        /// The kind.
        kind: u8,
    },
    /// HELLO with the wrong magic.
    #[error("not a uffdkit postcopy peer (bad magic)")]
    BadMagic,
    /// HELLO with another version.
    #[error("peer speaks wire version {0}, this side {VERSION}")]
    BadVersion(u16),
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

/// What the decoder knows of the session: the frame size limit and, after ADVISE, the
/// geometry that page indices are checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body accepted.
    pub max_body: usize,
    /// The advised page size, once known.
    pub page_size: Option<u32>,
    /// The advised page count, once known.
    pub page_count: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: DEFAULT_MAX_BODY,
            page_size: None,
            page_count: None,
        }
    }
}

impl Limits {
    /// The limits after `advise` was accepted.
    pub fn advised(self, advise: &Advise) -> Self {
        Self {
            page_size: Some(advise.page_size),
            page_count: Some(advise.page_count),
            ..self
        }
    }
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    fn ranges(&mut self, ranges: &[PageRange]) {
        self.u32(ranges.len() as u32);
        for r in ranges {
            self.u64(r.first);
            self.u64(r.count);
        }
    }
}

impl Channel {
    /// `main` or `urgent`.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Main => "main",
            Channel::Urgent => "urgent",
        }
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The channel a connection carries, from its opener's first bytes (its HELLO): `None`
/// until the whole frame is there, an error if they are not a HELLO. For what sits
/// between two endpoints (a proxy, a test's fault injector).
pub fn peek_channel(first: &[u8]) -> Option<Result<Channel, WireError>> {
    match decode(first, &Limits::default()) {
        Ok(Some((Message::Hello { channel, .. }, _))) => Some(Ok(channel)),
        Ok(Some((other, _))) => Some(Err(WireError::UnknownKind(other.kind()))),
        Ok(None) => None,
        Err(e) => Some(Err(e)),
    }
}

impl Message {
    /// The message's name on the wire (for errors and logs).
    pub fn name(&self) -> &'static str {
        self.kind_name().1
    }

    fn kind(&self) -> u8 {
        self.kind_name().0
    }

    fn kind_name(&self) -> (u8, &'static str) {
        match self {
            Message::Hello { .. } => (kind::HELLO, "HELLO"),
            Message::Challenge { .. } => (kind::CHALLENGE, "CHALLENGE"),
            Message::Auth { .. } => (kind::AUTH, "AUTH"),
            Message::AuthOk { .. } => (kind::AUTH_OK, "AUTH_OK"),
            Message::StartTls => (kind::START_TLS, "START_TLS"),
            Message::Admitted => (kind::ADMITTED, "ADMITTED"),
            Message::Advise(_) => (kind::ADVISE, "ADVISE"),
            Message::Discard { .. } => (kind::DISCARD, "DISCARD"),
            Message::Listen => (kind::LISTEN, "LISTEN"),
            Message::Run => (kind::RUN, "RUN"),
            Message::End => (kind::END, "END"),
            Message::Pages { .. } => (kind::PAGES, "PAGES"),
            Message::ZeroRun(_) => (kind::ZERO_RUN, "ZERO_RUN"),
            Message::ReqPages { .. } => (kind::REQ_PAGES, "REQ_PAGES"),
            Message::Ack { .. } => (kind::ACK, "ACK"),
            Message::Ping { .. } => (kind::PING, "PING"),
            Message::Pong { .. } => (kind::PONG, "PONG"),
            Message::RecvBitmap { .. } => (kind::RECV_BITMAP, "RECV_BITMAP"),
            Message::Digests { .. } => (kind::DIGESTS, "DIGESTS"),
            Message::Shut { .. } => (kind::SHUT, "SHUT"),
        }
    }

    fn body(&self, w: &mut Writer<'_>) {
        match self {
            Message::Hello {
                version,
                features,
                role,
                channel,
                session,
                generation,
            } => {
                w.bytes(&MAGIC);
                w.u16(*version);
                w.u64(features.bits());
                w.u8(*role as u8);
                w.u8(*channel as u8);
                w.u64(*session);
                w.u32(*generation);
            }
            Message::Challenge { nonce } => w.bytes(nonce),
            Message::Auth { proof, nonce } => {
                w.bytes(proof);
                w.bytes(nonce);
            }
            Message::AuthOk { proof } => w.bytes(proof),
            Message::Advise(a) => {
                w.u32(a.page_size);
                w.u64(a.page_count);
                w.u64(a.features.bits());
                w.u32(a.regions.len() as u32);
                for r in &a.regions {
                    w.u64(r.first_page);
                    w.u64(r.pages);
                }
            }
            Message::Discard { ranges } | Message::ReqPages { ranges } => w.ranges(ranges),
            Message::StartTls
            | Message::Admitted
            | Message::Listen
            | Message::Run
            | Message::End => {}
            Message::Pages { first, data } => {
                w.u64(*first);
                w.bytes(data);
            }
            Message::ZeroRun(r) => {
                w.u64(r.first);
                w.u64(r.count);
            }
            Message::Ack { seq } | Message::Ping { seq } | Message::Pong { seq } => w.u64(*seq),
            Message::RecvBitmap { words } => {
                w.u32(words.len() as u32);
                for x in words {
                    w.u64(*x);
                }
            }
            Message::Digests { first, digests } => {
                w.u64(*first);
                w.u32(digests.len() as u32);
                for d in digests {
                    w.u64(*d);
                }
            }
            Message::Shut { reason, detail } => {
                w.u8(*reason as u8);
                w.u16(detail.len() as u16);
                w.bytes(detail.as_bytes());
            }
        }
    }
}

/// Appends one frame of `kind` whose body `body` writes.
fn frame(out: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Writer<'_>)) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    body(&mut Writer(out));
    let body_len = out.len() - start - HEADER_LEN;
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4] = kind;
    let crc = crc32fast::hash(&out[start + 4..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Appends `msg` as one frame to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    frame(out, msg.kind(), |w| msg.body(w));
}

/// Appends a REQ_PAGES frame for `ranges` to `out`: the same bytes as
/// `encode(&Message::ReqPages { .. })` without building a message, so a fault handler
/// asking for pages allocates nothing once `out` has the capacity.
pub fn encode_request(ranges: &[PageRange], out: &mut Vec<u8>) {
    frame(out, kind::REQ_PAGES, |w| w.ranges(ranges));
}

struct Reader<'a> {
    buf: &'a [u8],
    kind: u8,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated { kind: self.kind });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn array32(&mut self) -> Result<[u8; 32], WireError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    /// A count prefix, refused above `max` and above what the remaining bytes can hold
    /// at `item` bytes each (so a lying count cannot make us allocate).
    fn count(&mut self, max: usize, item: usize) -> Result<usize, WireError> {
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
    fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing {
                kind: self.kind,
                extra: self.buf.len(),
            })
        }
    }
}

/// The body of PAGES: the first page and whole pages of data within the geometry.
fn pages_body<'a>(r: &mut Reader<'a>, limits: &Limits) -> Result<(u64, &'a [u8]), WireError> {
    let ps = page_size(limits)?;
    let first = r.u64()?;
    let data = r.take(r.buf.len())?;
    if data.is_empty() || data.len() % ps != 0 {
        return Err(WireError::Invalid("page data is not whole pages"));
    }
    check_pages(limits, "page run end", first, (data.len() / ps) as u64)?;
    Ok((first, data))
}

/// Checks that pages `first..first + count` exist in the advised geometry.
fn check_pages(
    limits: &Limits,
    what: &'static str,
    first: u64,
    count: u64,
) -> Result<(), WireError> {
    if count == 0 {
        return Err(WireError::Invalid("empty page range"));
    }
    let limit = limits.page_count.unwrap_or(MAX_PAGES);
    match first.checked_add(count) {
        Some(end) if end <= limit => Ok(()),
        _ => Err(WireError::OutOfRange {
            what,
            value: first.saturating_add(count),
            limit,
        }),
    }
}

fn page_size(limits: &Limits) -> Result<usize, WireError> {
    limits
        .page_size
        .map(|p| p as usize)
        .ok_or(WireError::Invalid("page data before ADVISE"))
}

fn ranges(
    r: &mut Reader<'_>,
    limits: &Limits,
    what: &'static str,
) -> Result<Vec<PageRange>, WireError> {
    let n = r.count(MAX_RANGES, 16)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let range = PageRange {
            first: r.u64()?,
            count: r.u64()?,
        };
        check_pages(limits, what, range.first, range.count)?;
        out.push(range);
    }
    Ok(out)
}

fn decode_body(kind: u8, body: &[u8], limits: &Limits) -> Result<Message, WireError> {
    let mut r = Reader { buf: body, kind };
    let msg = match kind {
        kind::HELLO => hello(&mut r)?,
        kind::CHALLENGE => Message::Challenge {
            nonce: r.array32()?,
        },
        kind::AUTH => Message::Auth {
            proof: r.array32()?,
            nonce: r.array32()?,
        },
        kind::AUTH_OK => Message::AuthOk {
            proof: r.array32()?,
        },
        kind::START_TLS => Message::StartTls,
        kind::ADMITTED => Message::Admitted,
        kind::ADVISE => Message::Advise(advise(&mut r, limits)?),
        kind::DISCARD => Message::Discard {
            ranges: ranges(&mut r, limits, "discard range end")?,
        },
        kind::REQ_PAGES => Message::ReqPages {
            ranges: ranges(&mut r, limits, "requested range end")?,
        },
        kind::LISTEN => Message::Listen,
        kind::RUN => Message::Run,
        kind::END => Message::End,
        kind::PAGES => {
            let (first, data) = pages_body(&mut r, limits)?;
            Message::Pages {
                first,
                data: data.to_vec(),
            }
        }
        kind::ZERO_RUN => {
            let range = PageRange {
                first: r.u64()?,
                count: r.u64()?,
            };
            check_pages(limits, "zero run end", range.first, range.count)?;
            Message::ZeroRun(range)
        }
        kind::ACK => Message::Ack { seq: r.u64()? },
        kind::PING => Message::Ping { seq: r.u64()? },
        kind::PONG => Message::Pong { seq: r.u64()? },
        kind::RECV_BITMAP => recv_bitmap(&mut r, limits)?,
        kind::DIGESTS => {
            let first = r.u64()?;
            let n = r.count(MAX_RANGES * 4, 8)?;
            check_pages(limits, "digest run end", first, n as u64)?;
            let digests = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            Message::Digests { first, digests }
        }
        kind::SHUT => shut(&mut r)?,
        other => return Err(WireError::UnknownKind(other)),
    };
    r.finish()?;
    Ok(msg)
}

fn hello(r: &mut Reader<'_>) -> Result<Message, WireError> {
    if r.take(8)? != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(WireError::BadVersion(version));
    }
    let features = Features::from_bits_retain(r.u64()?);
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
    Ok(Message::Hello {
        version,
        features,
        role,
        channel,
        session: r.u64()?,
        generation: r.u32()?,
    })
}

fn advise(r: &mut Reader<'_>, limits: &Limits) -> Result<Advise, WireError> {
    let page_size = r.u32()?;
    if page_size != 4096 && page_size != 2 << 20 {
        return Err(WireError::OutOfRange {
            what: "page size",
            value: u64::from(page_size),
            limit: 2 << 20,
        });
    }
    let page_count = r.u64()?;
    if page_count == 0 || page_count > MAX_PAGES {
        return Err(WireError::OutOfRange {
            what: "page count",
            value: page_count,
            limit: MAX_PAGES,
        });
    }
    let features = Features::from_bits_retain(r.u64()?);
    let n = r.count(MAX_REGIONS, 16)?;
    let mut regions: Vec<WireRegion> = Vec::with_capacity(n);
    let geometry = Limits {
        page_count: Some(page_count),
        ..*limits
    };
    for _ in 0..n {
        let region = WireRegion {
            first_page: r.u64()?,
            pages: r.u64()?,
        };
        check_pages(&geometry, "region end", region.first_page, region.pages)?;
        if let Some(prev) = regions.last() {
            if region.first_page < prev.first_page + prev.pages {
                return Err(WireError::Invalid("regions overlap or are not sorted"));
            }
        }
        regions.push(region);
    }
    Ok(Advise {
        page_size,
        page_count,
        features,
        regions,
    })
}

fn recv_bitmap(r: &mut Reader<'_>, limits: &Limits) -> Result<Message, WireError> {
    let n = r.count(MAX_PAGES.div_ceil(64) as usize, 8)?;
    let words = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
    if let Some(count) = limits.page_count {
        if n as u64 != count.div_ceil(64) {
            return Err(WireError::Invalid(
                "bitmap length does not match the page count",
            ));
        }
        let tail = count % 64;
        if tail != 0 && words[n - 1] >> tail != 0 {
            return Err(WireError::Invalid(
                "bitmap marks pages beyond the page count",
            ));
        }
    }
    Ok(Message::RecvBitmap { words })
}

fn shut(r: &mut Reader<'_>) -> Result<Message, WireError> {
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
    Ok(Message::Shut { reason, detail })
}

/// A decoded frame whose page data borrows from the input: the bulk of a migration is
/// placed straight from the receive buffer. Every other message is owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// PAGES: whole pages from page `first`.
    Pages {
        /// First page index.
        first: u64,
        /// `count * page_size` bytes.
        data: &'a [u8],
    },
    /// Any other message.
    Other(Message),
}

impl Frame<'_> {
    /// The owned message.
    pub fn into_owned(self) -> Message {
        match self {
            Frame::Pages { first, data } => Message::Pages {
                first,
                data: data.to_vec(),
            },
            Frame::Other(m) => m,
        }
    }
}

/// The length of the first frame of `buf` once its header is in: `Ok(None)` if even the
/// header is incomplete. Refuses an oversize length before anything is buffered for it.
pub fn frame_len(buf: &[u8], limits: &Limits) -> Result<Option<usize>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let body_len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if body_len > limits.max_body {
        return Err(WireError::Oversize {
            len: body_len,
            max: limits.max_body,
        });
    }
    Ok(Some(HEADER_LEN + body_len + TRAILER_LEN))
}

/// Decodes the first frame of `buf` like [`decode`], borrowing page data.
pub fn decode_frame<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<(Frame<'a>, usize)>, WireError> {
    let Some(total) = frame_len(buf, limits)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let kind = buf[4];
    let crc = u32::from_le_bytes(buf[total - 4..total].try_into().expect("4 bytes"));
    if crc32fast::hash(&buf[4..total - 4]) != crc {
        return Err(WireError::BadChecksum { kind });
    }
    if buf[5] != 0 || buf[6] != 0 || buf[7] != 0 {
        return Err(WireError::Reserved { kind });
    }
    let body = &buf[HEADER_LEN..total - TRAILER_LEN];
    let frame = if kind == kind::PAGES {
        let mut r = Reader { buf: body, kind };
        let (first, data) = pages_body(&mut r, limits)?;
        r.finish()?;
        Frame::Pages { first, data }
    } else {
        Frame::Other(decode_body(kind, body, limits)?)
    };
    Ok(Some((frame, total)))
}

/// Decodes the first frame of `buf`: `Ok(None)` if it is incomplete (read more), or the
/// message and the bytes it used.
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Option<(Message, usize)>, WireError> {
    Ok(decode_frame(buf, limits)?.map(|(f, used)| (f.into_owned(), used)))
}
