//! # postcopy: QEMU's postcopy protocol on a link
//!
//! The migration protocol as QEMU's postcopy runs it — ADVISE, precopy rounds, DISCARD,
//! LISTEN, RUN, then pages on demand while the rest streams — in a format of our own
//! ([`wire`]), over connection pairs that the [`transport`] crate below secures (TLS 1.3
//! with mutual certificates, or a pre-shared key), authenticates, keeps alive (heartbeats,
//! silence deadlines, reconnection) and admits behind listeners that strangers cannot
//! exhaust. Here: the messages on those frames ([`net`]), and two halves written once —
//! a sender and a receiver ([`endpoint`]) — that make two endpoints each:
//!
//! - the page server ([`server::PageServer`]) and its restore-side source
//!   ([`client::RemoteSource`]): faults become urgent requests on a connection of their
//!   own while a background stream pushes every page;
//! - live migration ([`migrate`]): a source with dirty tracking and iterative precopy,
//!   the switch with DISCARD, and a destination built on the pager.
//!
//! Where pages come from on the sending side is not [`pager::Source`] but the sender's own
//! two-method view (see `endpoint::sender`): the page server adapts its image's `Source`
//! to it, and the migration source reads its live memory in place — it does not use the
//! pager at all. The receiving side (the restore client, the destination) is the pager's.
//!
//! Every session survives broken and silent connections: both sides pause, the opener
//! reconnects with backoff (a newer connection pair supersedes the old one), the receiver
//! says what it has, and nothing is lost; every wait is bounded. Diagnostics go through
//! the `log` facade.
//!
//! ```
//! use postcopy::wire::{decode, encode, Limits, Message};
//!
//! let mut frame = Vec::new();
//! encode(&Message::Sync { seq: 7 }, &mut frame);
//! let (msg, used) = decode(&frame, &Limits::default())?.expect("a whole frame");
//! assert_eq!((msg, used), (Message::Sync { seq: 7 }, frame.len()));
//! assert_eq!(decode(&frame[..5], &Limits::default())?, None); // incomplete: read more
//! # Ok::<(), postcopy::wire::WireError>(())
//! ```

pub mod client;
pub mod endpoint;
mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod link;
pub mod migrate;
pub mod net;
pub mod server;
pub mod wire;

pub use error::{Error, LinkError, Refusal};
pub use transport::link::{AcceptStats, Admission, Timing};
pub use transport::{CertProblem, Security, SecurityKind};
