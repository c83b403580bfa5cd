//! # postcopy: live post-copy migration and remote paging on uffdkit
//!
//! Source → destination over byte streams: the wire format ([`wire`]); every connection
//! secured ([`handshake`]) by TLS 1.3 with mutual certificate authentication ([`tls`]) or,
//! on trusted links only, a pre-shared-key challenge–response in plaintext ([`auth`]);
//! framed TCP/Unix connections ([`net`]; a Unix path is claimed, never stolen from a live
//! listener: [`socket_file`]); connection pairs that notice silence and recover, behind
//! listeners that strangers cannot exhaust ([`link`]). On top, two halves
//! written once — a sender and a receiver ([`endpoint`]) — make two endpoints each:
//!
//! - the page server ([`server::PageServer`]) and its restore-side source
//!   ([`client::RemoteSource`]): faults become urgent requests on a connection of their
//!   own while a background stream pushes every page;
//! - live migration ([`migrate`]): a source with dirty tracking and iterative precopy,
//!   the switch with DISCARD, and a destination built on the pager.
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
//! encode(&Message::Ping { seq: 7 }, &mut frame);
//! let (msg, used) = decode(&frame, &Limits::default())?.expect("a whole frame");
//! assert_eq!((msg, used), (Message::Ping { seq: 7 }, frame.len()));
//! assert_eq!(decode(&frame[..5], &Limits::default())?, None); // incomplete: read more
//! # Ok::<(), postcopy::wire::WireError>(())
//! ```

pub mod auth;
pub mod client;
pub mod endpoint;
mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod handshake;
pub mod link;
pub mod migrate;
pub mod net;
pub mod server;
pub mod socket_file;
pub mod tls;
pub mod wire;

pub use error::Error;
pub use error::{CertProblem, LinkError, Refusal, SecurityKind};
pub use handshake::Security;
