//! # postcopy: live post-copy migration on uffdkit
//!
//! Source → destination over a byte stream: the wire format ([`wire`]), the pre-shared-key
//! authentication of every connection ([`auth`]), framed TCP/Unix connections ([`net`]),
//! the page server ([`server::PageServer`]) with its restore-side source
//! ([`client::RemoteSource`]): faults become urgent requests on their own connection while
//! a background stream pushes every page; and live migration ([`migrate`]): a source with
//! dirty tracking and iterative precopy, the switch with DISCARD, a destination built on
//! the pager, and recovery from broken connections.
//!
//! ```
//! use postcopy::wire::{decode, encode, Limits, Message};
//!
//! let mut frame = Vec::new();
//! encode(&Message::Ping { seq: 7 }, &mut frame);
//! let (msg, used) = decode(&frame, &Limits::default())?.expect("a whole frame");
//! assert_eq!((msg, used), (Message::Ping { seq: 7 }, frame.len()));
//! assert_eq!(decode(&frame[..5], &Limits::default())?, None); // incomplete: read more
//! # Ok::<(), postcopy::wire::WireError>(())
//! ```

pub mod auth;
pub mod client;
pub mod migrate;
pub mod net;
pub mod server;
pub mod wire;

/// Errors of the postcopy endpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// A malformed frame.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// Authentication failed.
    #[error("authentication: {0}")]
    Auth(String),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// The image source failed.
    #[error(transparent)]
    Source(#[from] pager::SourceError),
    /// A userfaultfd or pagemap operation failed.
    #[error(transparent)]
    Kernel(#[from] uffd_core::Error),
    /// The destination's pager failed.
    #[error(transparent)]
    Pager(#[from] pager::Error),
    /// A page bitmap or range that does not fit the region (a peer's RECV_BITMAP of the
    /// wrong size, a page beyond the end).
    #[error("page set: {0}")]
    Pages(#[from] page_state::Error),
    /// The migration cannot go on (no reconnection can help).
    #[error("{0}")]
    Fatal(String),
    /// The destination's pages differ from the source's final content.
    #[error("verification failed: {pages} pages differ, the first is page {first}")]
    Mismatch {
        /// How many.
        pages: u64,
        /// The lowest.
        first: u64,
    },
}
