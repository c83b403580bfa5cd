//! # transport: the sockets, files and secrets under uffdkit's links
//!
//! What a link between two uffdkit processes is made of, below any protocol spoken on
//! it: addresses and connected sockets, TCP or Unix, with deadlines and shutdown on the
//! socket ([`net`]); framed connections that hand out whole frames and report a silent
//! or broken socket as a typed [`LinkError`](link::LinkError) ([`conn`]); the frame
//! and the link's own messages ([`wire`]); the handshake every connection starts with
//! ([`handshake`]); connection pairs that notice silence, reconnect with backoff and let a
//! newer pair supersede an older one, behind listeners strangers cannot exhaust
//! ([`link`]); Unix socket paths claimed, never stolen from a live listener
//! ([`socket_file`]); and how a connection is secured ([`Security`]) — TLS 1.3 with
//! mutual certificates ([`tls`], rustls with the *ring* provider) or, on trusted links
//! only, a pre-shared key proved by HMAC challenge–response ([`key`]). Nothing here knows
//! of pages or migration: a protocol (postcopy) names itself in the HELLO
//! ([`wire::Protocol`]), encodes its messages into the frames and says what a pair does
//! with them ([`link::Inbound`]).
//!
//! ```
//! use transport::{Addr, Key, Security, SecurityKind};
//!
//! let addr: Addr = "unix:/run/uffdkit.sock".parse()?;
//! assert_eq!(addr.to_string(), "unix:/run/uffdkit.sock");
//! let key = Key::new(*b"sixteen byte key")?;
//! let mut said = transport::key::Transcript::new();
//! said.said(&transport::wire::Control::Challenge { nonce: [7; 32] });
//! assert!(key.verify(b"open", &said, &key.proof(b"open", &said)));
//! assert_eq!(Security::from(key).kind(), SecurityKind::PreSharedKey);
//! # Ok::<(), transport::Error>(())
//! ```

pub mod conn;
mod error;
pub mod handshake;
pub mod key;
pub mod link;
pub mod net;
mod security;
pub mod socket_file;
pub mod tls;
pub mod wire;

pub use conn::Conn;
pub use error::{chain, CertProblem, Error, Refusal, SecurityKind};
pub use key::Key;
pub use net::{Addr, Link, Listener, Socket};
pub use security::Security;
pub use tls::TlsConfig;
