//! Pre-shared-key challenge–response on every connection, both ways: a stranger can
//! neither pull memory from a page server nor push pages into a destination.
//!
//! Opener: HELLO → (listener) CHALLENGE{n_l} → AUTH{HMAC(k, "open"|n_l|session), n_o} →
//! (listener verifies) AUTH_OK{HMAC(k, "listen"|n_o|session)} → opener verifies.
//! HMAC-SHA256; comparisons in constant time.

use std::io::Read;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{unexpected, Refusal};
use crate::net::Conn;
use crate::wire::{Channel, Features, Message, Role, ShutReason, VERSION};
use crate::Error;

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

    /// Reads a key file (surrounding whitespace ignored).
    pub fn from_file(path: &std::path::Path) -> Result<Key, Error> {
        let text = std::fs::read(path).map_err(Error::io("read the key file"))?;
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

    fn proof(&self, label: &[u8], nonce: &[u8; 32], session: u64) -> [u8; 32] {
        self.mac(label, nonce, session)
            .finalize()
            .into_bytes()
            .into()
    }

    fn verify(&self, label: &[u8], nonce: &[u8; 32], session: u64, proof: &[u8; 32]) -> bool {
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

/// What an opener said of itself in its HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Its role.
    pub role: Role,
    /// What the connection carries.
    pub channel: Channel,
    /// Its session.
    pub session: u64,
    /// Which connection pair of the session.
    pub generation: u32,
}

/// The opener's side: succeeds once both ends have proved the key.
pub fn open(conn: &mut Conn, key: &Key, hello: Hello) -> Result<(), Error> {
    conn.set_channel(hello.channel);
    conn.w.send(&Message::Hello {
        version: VERSION,
        features: Features::ZERO_RUNS | Features::URGENT_CHANNEL | Features::RECOVERY,
        role: hello.role,
        channel: hello.channel,
        session: hello.session,
        generation: hello.generation,
    })?;
    let challenge = match conn.r.recv()? {
        Message::Challenge { nonce } => nonce,
        other => return Err(unexpected(other, "CHALLENGE", hello.channel)),
    };
    let mine = nonce()?;
    conn.w.send(&Message::Auth {
        proof: key.proof(b"open", &challenge, hello.session),
        nonce: mine,
    })?;
    match conn.r.recv()? {
        Message::AuthOk { proof } if key.verify(b"listen", &mine, hello.session, &proof) => Ok(()),
        Message::AuthOk { .. } => Err(Error::refused(Refusal::WrongKey)),
        other => Err(unexpected(other, "AUTH_OK", hello.channel)),
    }
}

/// The listener's side. Returns what the opener said of itself.
pub fn listen(conn: &mut Conn, key: &Key) -> Result<Hello, Error> {
    let hello = match conn.r.recv()? {
        Message::Hello {
            role,
            channel,
            session,
            generation,
            ..
        } => Hello {
            role,
            channel,
            session,
            generation,
        },
        other => return Err(unexpected(other, "HELLO", Channel::Main)),
    };
    conn.set_channel(hello.channel);
    let challenge = nonce()?;
    conn.w.send(&Message::Challenge { nonce: challenge })?;
    let (proof, theirs) = match conn.r.recv()? {
        Message::Auth { proof, nonce } => (proof, nonce),
        other => return Err(unexpected(other, "AUTH", hello.channel)),
    };
    if !key.verify(b"open", &challenge, hello.session, &proof) {
        refuse(conn, ShutReason::Auth, "authentication failed: wrong key");
        return Err(Error::refused(Refusal::WrongKey));
    }
    conn.w.send(&Message::AuthOk {
        proof: key.proof(b"listen", &theirs, hello.session),
    })?;
    Ok(hello)
}

/// Tells the peer why it is refused (best effort: it may be gone) and closes.
pub(crate) fn refuse(conn: &mut Conn, reason: ShutReason, detail: &str) {
    let _ = conn.w.send(&Message::Shut {
        reason,
        detail: detail.into(),
    });
    conn.link.shutdown();
}
