//! Errors: a broken link ([`LinkError`], the transport's: it pauses a session until it
//! reconnects) is kept apart from everything that ends it ([`Error`]'s other variants).

pub use transport::chain;
pub use transport::link::LinkError;

use crate::wire::{Channel, Message, ShutReason};

/// Why a peer or this side ends a session once it runs (refusals at a connection's
/// handshake are the transport's: [`Error::Transport`] with [`transport::Refusal`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
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
    /// The geometry is the same on a reconnection, but the image is another (a page
    /// server restarted with another snapshot of the same size).
    #[error("the peer sends another image than before the break (restarted with another?)")]
    ImageChanged,
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
}

/// Errors of the postcopy endpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A connection broke; a session pauses and resumes on such errors.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The link failed otherwise: a connection refused at its handshake (a wrong key or
    /// certificate, a security mismatch, a busy listener's other session), giving up
    /// after [`Timing::give_up_after`](transport::link::Timing::give_up_after) without a
    /// working connection, TLS set-up, key or certificate material. Never a broken link
    /// (that is [`Error::Link`]).
    #[error(transparent)]
    Transport(transport::Error),
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
    /// An option or argument that cannot work.
    #[error("{what}: {value}")]
    Invalid {
        /// Which.
        what: &'static str,
        /// The value given.
        value: String,
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

    /// Gave up after `after` without a working connection, the last failure `last`.
    pub(crate) fn gave_up(after: std::time::Duration, last: LinkError) -> Error {
        Error::Transport(transport::Error::GaveUp { after, last })
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}

impl From<transport::Error> for Error {
    /// A broken link stays one ([`Error::Link`]); the rest is [`Error::Transport`].
    fn from(e: transport::Error) -> Error {
        match e {
            transport::Error::Link(link) => Error::Link(link),
            other => Error::Transport(other),
        }
    }
}

impl transport::link::Failure for Error {
    fn into_link(self) -> Result<LinkError, Error> {
        match self {
            Error::Link(link) => Ok(link),
            other => Err(other),
        }
    }
}

impl Error {
    /// The transport's refusal, if a connection was refused at its handshake.
    pub fn refusal(&self) -> Option<&transport::Refusal> {
        match self {
            Error::Transport(e) => e.refusal(),
            _ => None,
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
