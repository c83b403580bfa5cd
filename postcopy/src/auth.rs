//! Pre-shared-key challenge–response on every connection, both ways: a stranger can
//! neither pull memory from a page server nor push pages into a destination.
//!
//! Opener: HELLO → (listener) CHALLENGE{n_l} → AUTH{HMAC(k, "open"|n_l|session), n_o} →
//! (listener verifies) AUTH_OK{HMAC(k, "listen"|n_o|session)} → opener verifies.
//! HMAC-SHA256; comparisons in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::net::{FrameReader, FrameWriter};
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
            return Err(Error::Auth("a key needs at least 16 bytes".into()));
        }
        Ok(Key(bytes))
    }

    /// Reads a key file (surrounding whitespace ignored).
    pub fn from_file(path: &std::path::Path) -> Result<Key, Error> {
        let text = std::fs::read(path)?;
        let trimmed = text.trim_ascii();
        Key::new(trimmed.to_vec())
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

/// 32 random bytes from the kernel.
pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    // SAFETY: getrandom writes at most 32 bytes into `n`.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), 32, 0) };
    assert_eq!(got, 32, "getrandom failed");
    n
}

/// A random session id.
pub fn session_id() -> u64 {
    u64::from_le_bytes(nonce()[..8].try_into().expect("8 bytes"))
}

/// The opener's side: succeeds once both ends have proved the key.
pub fn open(
    r: &mut FrameReader,
    w: &mut FrameWriter,
    key: &Key,
    role: Role,
    channel: Channel,
    session: u64,
) -> Result<(), Error> {
    w.send(&Message::Hello {
        version: VERSION,
        features: Features::ZERO_RUNS | Features::URGENT_CHANNEL | Features::RECOVERY,
        role,
        channel,
        session,
    })?;
    let challenge = match r.recv()? {
        Message::Challenge { nonce } => nonce,
        Message::Shut { detail, .. } => return Err(Error::Auth(detail)),
        other => {
            return Err(Error::Protocol(format!(
                "expected CHALLENGE, got {other:?}"
            )))
        }
    };
    let mine = nonce();
    w.send(&Message::Auth {
        proof: key.proof(b"open", &challenge, session),
        nonce: mine,
    })?;
    match r.recv()? {
        Message::AuthOk { proof } if key.verify(b"listen", &mine, session, &proof) => Ok(()),
        Message::AuthOk { .. } => Err(Error::Auth("the peer does not know the key".into())),
        Message::Shut { detail, .. } => Err(Error::Auth(detail)),
        other => Err(Error::Protocol(format!("expected AUTH_OK, got {other:?}"))),
    }
}

/// The listener's side. Returns the opener's role, channel and session.
pub fn listen(
    r: &mut FrameReader,
    w: &mut FrameWriter,
    key: &Key,
) -> Result<(Role, Channel, u64), Error> {
    let (role, channel, session) = match r.recv()? {
        Message::Hello {
            role,
            channel,
            session,
            ..
        } => (role, channel, session),
        other => return Err(Error::Protocol(format!("expected HELLO, got {other:?}"))),
    };
    let challenge = nonce();
    w.send(&Message::Challenge { nonce: challenge })?;
    let (proof, theirs) = match r.recv()? {
        Message::Auth { proof, nonce } => (proof, nonce),
        other => return Err(Error::Protocol(format!("expected AUTH, got {other:?}"))),
    };
    if !key.verify(b"open", &challenge, session, &proof) {
        let _ = w.send(&Message::Shut {
            reason: ShutReason::Auth,
            detail: "authentication failed: wrong key".into(),
        });
        return Err(Error::Auth("a peer presented a wrong key".into()));
    }
    w.send(&Message::AuthOk {
        proof: key.proof(b"listen", &theirs, session),
    })?;
    Ok((role, channel, session))
}
