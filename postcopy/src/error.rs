//! Errors: a broken link ([`LinkError`], the transport's: it pauses a session until it
//! reconnects) is kept apart from everything that ends it ([`Error`]'s other variants).

use std::time::Duration;

use transport::tls::rustls;
pub use transport::{CertProblem, SecurityKind};

pub use transport::chain;
pub use transport::link::LinkError;

use crate::wire::{Channel, Message, ShutReason};

/// Why a peer or this side refuses a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The peer does not know the pre-shared key (or we do not know its).
    #[error("wrong key")]
    WrongKey,
    /// The peer shut the session with a reason of its own.
    #[error("the peer shut the session ({reason:?}): {detail}")]
    PeerShut {
        /// Its reason.
        reason: ShutReason,
        /// Its words.
        detail: String,
    },
    /// The geometry advised on a reconnection differs from the first one.
    #[error("the geometry changed on reconnection")]
    GeometryChanged,
    /// Geometry this endpoint cannot serve.
    #[error("unsupported geometry: {0}")]
    Geometry(&'static str),
    /// The peer reports a state this side cannot continue from.
    #[error("the peer is at step {step}, this side cannot continue from there")]
    Step {
        /// The step the peer reported.
        step: u64,
    },
    /// A SYNCED for a SYNC that was never sent or was confirmed already.
    #[error("the peer confirmed SYNC {seq}, which is not awaiting confirmation")]
    Confirmation {
        /// The sequence number it confirmed.
        seq: u64,
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
        got: crate::wire::Role,
        /// What this listener takes.
        want: crate::wire::Role,
    },
    /// Another session owns this listener (a migration destination takes one).
    #[error("another session is in progress here")]
    OtherSession,
    /// A connection of a session came with another certificate than the session's first.
    #[error("another certificate than the session's own")]
    PeerChanged,
}

/// Errors of the postcopy endpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A connection broke; a session pauses and resumes on such errors.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A message that has no place where it arrived.
    #[error("unexpected {got} on the {channel} connection (expected {expected})")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: &'static str,
        /// Where.
        channel: Channel,
    },
    /// The session was refused, by the peer or by this side.
    #[error("refused: {reason}")]
    Refused {
        /// Why.
        reason: Refusal,
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
    /// Local I/O: binding, a key file, mapping memory.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// 2 MiB pages were needed and the hugetlb pool does not have them.
    #[error("{needed} free 2 MiB huge pages are needed, {free} are free (grow /proc/sys/vm/nr_hugepages)")]
    HugePages {
        /// Pages needed.
        needed: u64,
        /// Pages free.
        free: u64,
    },
    /// The image source failed.
    #[error(transparent)]
    Source(#[from] pager::SourceError),
    /// A userfaultfd or pagemap operation failed.
    #[error(transparent)]
    Kernel(#[from] uffd_core::Error),
    /// The destination's pager failed.
    #[error(transparent)]
    Pager(#[from] pager::Error),
    /// The pager stopped (its process exited, or it failed) while pages were arriving.
    #[error("the pager stopped while pages were arriving")]
    PagerStopped,
    /// A page bitmap or range that does not fit the region (a peer's RECV_BITMAP of the
    /// wrong size, a page beyond the end).
    #[error("page set")]
    Pages(#[from] page_state::Error),
    /// The embedder could not give the device state at the switch (source), or could
    /// not take it at RUN (destination): the migration ends before RUN completes, so the
    /// source's workload may resume.
    #[error("device state: {what}")]
    DeviceState {
        /// Which side failed, and how.
        what: &'static str,
        /// The embedder's error (or why RUN cannot carry what it gave).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The destination's pages differ from the source's final content.
    #[error("verification failed: {pages} pages differ, the first is page {first}")]
    Mismatch {
        /// How many.
        pages: u64,
        /// The lowest.
        first: u64,
    },
}

impl Error {
    /// Whether a new connection pair can carry on (a broken link), as opposed to an
    /// error that ends the session.
    pub fn is_link(&self) -> bool {
        matches!(self, Error::Link(_))
    }

    pub(crate) fn refused(reason: Refusal) -> Error {
        Error::Refused { reason }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}

impl From<transport::Error> for Error {
    /// The same variant here: a certificate refused (by either side) is a refused session.
    fn from(e: transport::Error) -> Error {
        use transport::Error as T;
        match e {
            T::Invalid { what, value } => Error::Invalid { what, value },
            T::Io { what, source } => Error::Io { what, source },
            T::Tls { what, source } => Error::Tls { what, source },
            T::TlsMaterial { what, source } => Error::TlsMaterial { what, source },
            T::PeerCertificate(p) => Error::refused(Refusal::PeerCertificate(p)),
            T::CertificateRefused { alert } => {
                Error::refused(Refusal::CertificateRefused { alert })
            }
        }
    }
}

/// What a message that has no place here means: a SHUT is the peer refusing, anything
/// else is [`Error::Unexpected`].
pub(crate) fn unexpected(msg: Message, expected: &'static str, channel: Channel) -> Error {
    match msg {
        Message::Shut { reason, detail } => Error::refused(Refusal::PeerShut { reason, detail }),
        other => Error::Unexpected {
            expected,
            got: other.name(),
            channel,
        },
    }
}
