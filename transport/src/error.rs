//! Errors of setting up links: addresses, key and certificate material, TLS handshakes.

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

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option or argument that cannot work.
    #[error("{what}: {value}")]
    Invalid {
        /// Which.
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// Local I/O: a key file, `/dev/urandom`.
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
    /// This side refused the peer's certificate.
    #[error("the peer's certificate is {0}")]
    PeerCertificate(CertProblem),
    /// The peer refused this side's certificate (or its absence): its TLS alert says why.
    #[error("the peer refused this side's certificate (TLS alert {alert:?})")]
    CertificateRefused {
        /// The alert.
        alert: rustls::AlertDescription,
    },
}

impl Error {
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
