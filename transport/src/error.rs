//! Errors of links: a broken or silent connection ([`LinkError`], after which a session
//! pauses and reconnects) kept apart from everything else ([`Error`]'s other variants: a
//! refused handshake, giving up, key and certificate material, local I/O).

use std::time::Duration;

use crate::link::{Channel, LinkError, Role, ShutReason};

/// How a link is secured (named when the two ends disagree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityKind {
    /// TLS 1.3 with mutual certificate authentication.
    Tls,
    /// Plaintext with a pre-shared key: trusted links only.
    PreSharedKey,
}

impl std::fmt::Display for SecurityKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SecurityKind::Tls => "TLS with certificates",
            SecurityKind::PreSharedKey => "plaintext with a pre-shared key",
        })
    }
}

/// What is wrong with a certificate, as the side that checked it found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertProblem {
    /// Not issued (directly or through the chain it came with) by a CA this side trusts.
    #[error("not issued by a trusted CA")]
    UnknownIssuer,
    /// Past its validity.
    #[error("expired")]
    Expired,
    /// Before its validity.
    #[error("not valid yet")]
    NotYetValid,
    /// Valid, but not for the name the peer must have.
    #[error("not valid for the name {expected}")]
    WrongName {
        /// The name this side required.
        expected: String,
    },
    /// The peer presented none.
    #[error("missing")]
    Missing,
    /// Revoked by its issuer.
    #[error("revoked")]
    Revoked,
    /// Its signature does not verify with the trusted CA its issuer names: another CA
    /// of the same name signed it (an impostor, or a CA made twice under one name).
    #[error("not signed by the trusted CA of its issuer's name (another CA of that name?)")]
    BadSignature,
    /// Unusable otherwise (encoding, signature, key usage); the checker's words.
    #[error("unusable ({0})")]
    Unusable(String),
}

/// Why a peer or this side refuses a connection at its handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The peer does not know the pre-shared key (or we do not know its).
    #[error("wrong key")]
    WrongKey,
    /// The peer shut the connection with a reason of its own.
    #[error("the peer shut the connection ({reason:?}): {detail}")]
    PeerShut {
        /// Its reason.
        reason: ShutReason,
        /// Its words.
        detail: String,
    },
    /// One end speaks TLS, the other plaintext with a pre-shared key.
    #[error("security mismatch: this side speaks {ours}, the peer {peer}")]
    SecurityMismatch {
        /// This side.
        ours: SecurityKind,
        /// The peer.
        peer: SecurityKind,
    },
    /// This side refused the peer's certificate.
    #[error("the peer's certificate is {0}")]
    PeerCertificate(CertProblem),
    /// The peer refused this side's certificate (or its absence): its TLS alert says why.
    #[error("the peer refused this side's certificate (TLS alert {alert:?})")]
    CertificateRefused {
        /// The alert.
        alert: rustls::AlertDescription,
    },
    /// The opener is not the role this listener serves.
    #[error("a {got:?} connected where only a {want:?} may")]
    WrongRole {
        /// What it said it is.
        got: Role,
        /// What this listener takes.
        want: Role,
    },
    /// Another session owns this listener (one that takes a single session).
    #[error("another session is in progress here")]
    OtherSession,
    /// A connection of a session came with another certificate than the session's first.
    #[error("another certificate than the session's own")]
    PeerChanged,
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A connection broke or went silent: a session pauses and reconnects on it.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The connection was refused at its handshake, by the peer or by this side.
    #[error("refused: {reason}")]
    Refused {
        /// Why.
        reason: Refusal,
    },
    /// A handshake message out of turn.
    #[error("unexpected {got} on the {channel} connection (expected {expected})")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: &'static str,
        /// Where.
        channel: Channel,
    },
    /// Paused (or connecting) for longer than the bound without a working connection.
    #[error("gave up after {after:?} without a working connection")]
    GaveUp {
        /// The bound.
        after: Duration,
        /// The last failure.
        #[source]
        last: LinkError,
    },
    /// An option or argument that cannot work.
    #[error("{what}: {value}")]
    Invalid {
        /// Which.
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// Local I/O: a key file, `/dev/urandom`, a listener.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// TLS failed for a reason other than a certificate (no common protocol version or
    /// cipher suite, a peer breaking the protocol) or cannot be set up.
    #[error("TLS: {what}")]
    Tls {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: rustls::Error,
    },
    /// Certificates or keys that cannot be read or used.
    #[error("{what}")]
    TlsMaterial {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Whether a new connection can carry on (a broken link), as opposed to an error
    /// that ends the session.
    pub fn is_link(&self) -> bool {
        matches!(self, Error::Link(_))
    }

    /// The refusal, if the connection was refused.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Error::Refused { reason } => Some(reason),
            _ => None,
        }
    }

    pub(crate) fn refused(reason: Refusal) -> Error {
        Error::Refused { reason }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}

/// An error and its causes on one line: `a: b: c` (for logs).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
