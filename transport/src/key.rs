//! Pre-shared-key challenge–response, for links that need no encryption (trusted links
//! only: pages then travel in the clear): both ends prove the key on every connection,
//! so a stranger can neither pull memory from a page server nor push pages into a
//! destination. Between hosts, use TLS ([`crate::tls`]).
//!
//! Opener: HELLO → (listener) CHALLENGE{n_l} → AUTH{HMAC(k, "open"|n_l|session), n_o} →
//! (listener verifies) AUTH_OK{HMAC(k, "listen"|n_o|session)} → opener verifies.
//! HMAC-SHA256 ([`Key::proof`], [`Key::verify`]); comparisons in constant time. The
//! messages themselves are the handshake's ([`crate::handshake`]).

use std::io::Read;

use hmac::{Hmac, Mac};
use sha2::Sha256;

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

    fn mac(&self, label: &[u8], nonce: &[u8; 32], session: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"uffdkit-postcopy-v1|");
        mac.update(label);
        mac.update(nonce);
        mac.update(&session.to_le_bytes());
        mac
    }

    /// HMAC-SHA256 over the domain label `label`, `nonce` and `session`: what the side
    /// proving the key sends.
    pub fn proof(&self, label: &[u8], nonce: &[u8; 32], session: u64) -> [u8; 32] {
        self.mac(label, nonce, session)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is [`Key::proof`] of the same inputs (in constant time).
    pub fn verify(&self, label: &[u8], nonce: &[u8; 32], session: u64, proof: &[u8; 32]) -> bool {
        self.mac(label, nonce, session).verify_slice(proof).is_ok()
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
