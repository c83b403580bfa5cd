//! Pre-shared-key challenge–response, for links that need no encryption (trusted links
//! only: pages then travel in the clear): both ends prove the key on every connection,
//! so a stranger can neither pull memory from a page server nor push pages into a
//! destination. Between hosts, use TLS ([`crate::tls`]).
//!
//! Opener: HELLO → (listener) CHALLENGE{n_l} → AUTH{HMAC(k, "open"|H(HELLO|CHALLENGE)), n_o}
//! → (listener verifies) AUTH_OK{HMAC(k, "listen"|H(HELLO|CHALLENGE|AUTH))} → opener
//! verifies. Each proof covers a [`Transcript`]: the SHA-256 of every frame said so far,
//! as TLS's Finished does, so a man in the middle who rewrites any field of the HELLO
//! (its role, channel, session, generation, version, features) or of a later message
//! makes the proofs disagree and the connection is refused as a wrong key: what the
//! listener files the connection under is what the opener said. Nonces on both sides
//! keep each proof fresh. HMAC-SHA256 ([`Key::proof`], [`Key::verify`]); comparisons in
//! constant time. The messages themselves are the handshake's ([`crate::handshake`]).

use std::io::Read;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::wire::Control;
use crate::Error;

/// The longest key file read: far more than any key needs, little enough to read at once.
pub const MAX_KEY_FILE: u64 = 4096;

/// A pre-shared key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key from bytes (at least 16).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Key, Error> {
        let bytes = bytes.into();
        if bytes.len() < 16 {
            return Err(Error::Invalid {
                what: "a key needs at least 16 bytes",
                value: format!("{} bytes", bytes.len()),
            });
        }
        Ok(Key(bytes))
    }

    /// Reads a key file (surrounding whitespace ignored): a regular file (a FIFO or a
    /// device such as `/dev/zero` is refused, not read), at most [`MAX_KEY_FILE`] bytes,
    /// and — unless `readable_by_others` says the caller accepts it — readable by its
    /// owner only, since anyone who can read the key can pull memory from a page server
    /// or push pages into a destination.
    pub fn from_file(path: &std::path::Path, readable_by_others: bool) -> Result<Key, Error> {
        let text = uffd_core::private_fs::read_secret(path, MAX_KEY_FILE, readable_by_others)
            .map_err(|e| Error::io("read the key file")(std::io::Error::other(e)))?;
        Key::new(text.trim_ascii().to_vec())
    }

    fn mac(&self, label: &[u8], transcript: &Transcript) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"uffdkit-link-v2|");
        mac.update(label);
        mac.update(b"|");
        mac.update(&transcript.digest());
        mac
    }

    /// HMAC-SHA256 over the domain label `label` and the handshake's `transcript` so far:
    /// what the side proving the key sends.
    pub fn proof(&self, label: &[u8], transcript: &Transcript) -> [u8; 32] {
        self.mac(label, transcript).finalize().into_bytes().into()
    }

    /// Whether `proof` is [`Key::proof`] of the same inputs (in constant time).
    pub fn verify(&self, label: &[u8], transcript: &Transcript, proof: &[u8; 32]) -> bool {
        self.mac(label, transcript).verify_slice(proof).is_ok()
    }
}

/// Every message of a pre-shared-key handshake so far, hashed in the order said (each
/// frame carries its length, so the concatenation is unambiguous): what the proofs cover.
/// Each end adds what it sent and what it received, decoded and encoded again (decoding
/// refuses anything but the one encoding, so these are the bytes on the wire).
#[derive(Clone)]
pub struct Transcript(Sha256);

impl Default for Transcript {
    fn default() -> Self {
        Transcript::new()
    }
}

impl std::fmt::Debug for Transcript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Transcript(..)")
    }
}

impl Transcript {
    /// An empty transcript.
    pub fn new() -> Transcript {
        Transcript(Sha256::new())
    }

    /// Adds `msg`, said by either end.
    pub fn said(&mut self, msg: &Control) {
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        self.0.update(&frame);
    }

    /// The SHA-256 of what was said so far.
    fn digest(&self) -> [u8; 32] {
        self.0.clone().finalize().into()
    }
}

/// 32 random bytes from the kernel's CSPRNG.
pub fn nonce() -> Result<[u8; 32], Error> {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(Error::io("read /dev/urandom"))?;
    Ok(n)
}

/// A random session id.
pub fn session_id() -> Result<u64, Error> {
    Ok(u64::from_le_bytes(
        nonce()?[..8].try_into().expect("8 bytes"),
    ))
}
