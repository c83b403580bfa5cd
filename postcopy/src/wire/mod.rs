//! The postcopy wire format: its messages in the transport's frames.
//!
//! A frame is `body_len: u32 | kind: u8 | flags: u8 | reserved: u16 | body | crc32: u32`
//! ([`transport::wire`]); the transport's own messages — the handshake, heartbeats,
//! SHUT — take a few kinds, and every other kind is one of these. A connection starts
//! with the transport's HELLO naming this protocol ([`PROTOCOL`]: magic, version,
//! features). [`decode`] refuses anything malformed — oversize, unknown kind, bad
//! checksum, fields out of range for the advised geometry, trailing bytes — with a typed
//! [`WireError`], never a panic; an incomplete frame is `Ok(None)` (read more).

use bitflags::bitflags;

mod decode;
mod encode;

pub use decode::{decode, decode_frame, Frame};
pub use encode::{encode, encode_request};
/// The link's vocabulary, which HELLO and SHUT carry (defined by the transport).
pub use transport::link::{Channel, Role, ShutReason};
pub use transport::wire::{
    peek_channel, WireError, DEFAULT_MAX_BODY, HEADER_LEN, MAX_DETAIL, TRAILER_LEN,
};

/// Identifies a uffdkit postcopy connection.
pub const MAGIC: [u8; 8] = *b"UFFDKPC\0";
/// The wire version this crate speaks (3: a HELLO asking for TLS is answered with START_TLS,
/// and the connection is admitted inside TLS with ADMITTED; 4: precopy pages count as
/// delivered only once a SYNC after them is answered with SYNCED; 5: RUN carries the
/// source's opaque device state, handed to the destination's embedder before it resumes;
/// 6: DIGESTS are XXH3-64 of each page; 7: on a TLS connection PAGES frames carry no
/// checksum, the AEAD authenticating them; 8: ADVISE names the image, so a client
/// resuming after a break refuses a server now serving another one).
pub const VERSION: u16 = 8;
/// Where a PAGES body's page data begins (after the first page's number): the byte a
/// receiver aligns to move whole pages out of its buffer
/// (`transport::conn::FrameReader::align_bodies`).
pub const PAGES_DATA_AT: usize = 8;
/// Page counts above this are refused (2^40 pages: 4 PiB of 4 KiB pages).
pub const MAX_PAGES: u64 = 1 << 40;
/// Most regions in one ADVISE.
pub const MAX_REGIONS: usize = 4096;
/// Most ranges in one DISCARD or REQ_PAGES.
pub const MAX_RANGES: usize = 1 << 16;
/// Largest device state RUN carries (vCPU registers and device models are kilobytes; a
/// frame must stay under [`DEFAULT_MAX_BODY`]).
pub const MAX_DEVICE_STATE: usize = 16 << 20;
/// A DIGESTS entry for a page the destination's workload dropped (`MADV_DONTNEED`, a
/// balloon: [`pager::Pager::dropped`]) before any copy of it landed. It holds the
/// workload's own zeros, nothing the protocol brought, so the source leaves it out of its
/// verdict and counts it. A real digest of this value (one in 2^64) is taken as the mark.
/// A source that predates the mark counts it as a mismatch, as it counted the zero digest
/// sent before.
pub const DROPPED: u64 = u64::MAX;

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
        const _ = !0;
    }
}

/// What every connection's HELLO says of this protocol: a listener admits only openers
/// that speak it (the features are informative; ADVISE carries the ones in use).
pub const PROTOCOL: transport::wire::Protocol = transport::wire::Protocol {
    magic: MAGIC,
    version: VERSION,
    features: Features::ZERO_RUNS
        .union(Features::URGENT_CHANNEL)
        .union(Features::RECOVERY)
        .bits(),
};

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
    /// Which pages these are: the same on every pair of a session, so that a pair that
    /// resumes it after a break is refused if the sender now sends other ones (a page
    /// server restarted with another image of the same size) rather than mixing them.
    pub image: u64,
}

/// Every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Geometry and features.
    Advise(Advise),
    /// Pages the destination must drop (dirtied after they were sent).
    Discard {
        /// The ranges.
        ranges: Vec<PageRange>,
    },
    /// The destination may start listening for faults.
    Listen,
    /// Run the workload on the destination, after handing its embedder the device state
    /// (the vCPUs' registers, device models: opaque bytes, as QEMU's postcopy package
    /// carries them). Resent on every pair until the destination reports it ran.
    Run {
        /// The source's device state, taken once its workload stopped (at most
        /// [`MAX_DEVICE_STATE`] bytes; empty when it has none).
        device_state: Vec<u8>,
    },
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
    /// Precopy: every page frame sent before this one on the connection is to be
    /// confirmed; the destination answers [`Message::Synced`] once it has landed them.
    Sync {
        /// Echoed in SYNCED; increasing over the whole session.
        seq: u64,
    },
    /// Return path: every page frame that came before SYNC `seq` on this connection is in
    /// the destination's memory. Until it arrives, the source counts those pages as not
    /// delivered (see the delivery invariant in [`crate::migrate`]).
    Synced {
        /// The SYNC's sequence number.
        seq: u64,
    },
    /// On resume: every page the destination has received (bit i = page i).
    RecvBitmap {
        /// `ceil(page_count / 64)` words.
        words: Vec<u64>,
    },
    /// After END: digests ([`crate::migrate::digest`]) of the destination's pages
    /// `first..first + n`, for the source to verify against its final content.
    Digests {
        /// First page index.
        first: u64,
        /// One digest per page.
        digests: Vec<u64>,
    },
    /// The sender is closing the connection (the transport's SHUT, which a session's
    /// phase logic hears too).
    Shut {
        /// Why.
        reason: ShutReason,
        /// Human-readable detail (UTF-8, at most [`MAX_DETAIL`] bytes).
        detail: String,
    },
}

pub(crate) mod kind {
    pub use transport::wire::kind::SHUT;
    pub const ADVISE: u8 = 10;
    pub const DISCARD: u8 = 11;
    pub const LISTEN: u8 = 12;
    pub const RUN: u8 = 13;
    pub const END: u8 = 14;
    pub const SYNC: u8 = 15;
    pub const PAGES: u8 = 20;
    pub const ZERO_RUN: u8 = 22;
    pub const REQ_PAGES: u8 = 30;
    pub const ACK: u8 = 31;
    pub const RECV_BITMAP: u8 = 34;
    pub const DIGESTS: u8 = 35;
    pub const SYNCED: u8 = 36;
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
    /// The frames come on a sealed connection (TLS): their checksum is not checked
    /// (`transport::wire::open_frame_with`).
    pub sealed: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: DEFAULT_MAX_BODY,
            page_size: None,
            page_count: None,
            sealed: false,
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
            Message::Advise(_) => (kind::ADVISE, "ADVISE"),
            Message::Discard { .. } => (kind::DISCARD, "DISCARD"),
            Message::Listen => (kind::LISTEN, "LISTEN"),
            Message::Run { .. } => (kind::RUN, "RUN"),
            Message::End => (kind::END, "END"),
            Message::Pages { .. } => (kind::PAGES, "PAGES"),
            Message::ZeroRun(_) => (kind::ZERO_RUN, "ZERO_RUN"),
            Message::ReqPages { .. } => (kind::REQ_PAGES, "REQ_PAGES"),
            Message::Ack { .. } => (kind::ACK, "ACK"),
            Message::Sync { .. } => (kind::SYNC, "SYNC"),
            Message::Synced { .. } => (kind::SYNCED, "SYNCED"),
            Message::RecvBitmap { .. } => (kind::RECV_BITMAP, "RECV_BITMAP"),
            Message::Digests { .. } => (kind::DIGESTS, "DIGESTS"),
            Message::Shut { .. } => (kind::SHUT, "SHUT"),
        }
    }
}
