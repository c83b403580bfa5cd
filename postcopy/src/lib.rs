//! # postcopy: live post-copy migration on uffdkit
//!
//! Source → destination over a byte stream. This crate starts with its wire format
//! ([`wire`]): length-framed, CRC-checked messages whose decoder refuses malformed,
//! oversize and out-of-range input. The endpoints (page server, destination, recovery)
//! build on it.
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

pub mod wire;
