//! Pager errors.

use std::path::PathBuf;

use page_state::PageState;

use crate::record::RecordingError;

/// Errors of the pager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A region that cannot be served as described.
    #[error("region {base:#x}+{len:#x}: {reason}")]
    BadRegion {
        /// Its base.
        base: usize,
        /// Its length.
        len: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A region extends beyond the image.
    #[error("region needs image bytes up to {need}, the image has {have}")]
    ImageTooSmall {
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// A seeded page-state map that does not fit the regions.
    #[error("seeded page states: {pages} pages given, the regions hold {want}")]
    StatesSize {
        /// Pages in the map given.
        pages: usize,
        /// Pages the regions hold.
        want: usize,
    },
    /// A seeded page-state map with a page in a state nobody would resolve.
    #[error("seeded page states: page {page} is {state}; a seed holds only missing, received or zero pages")]
    SeededState {
        /// The first such page.
        page: usize,
        /// Its state.
        state: PageState,
    },
    /// The kernel refused an operation.
    #[error(transparent)]
    Uffd(#[from] uffd_core::Error),
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// I/O (threads, eventfd, CPU affinity).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A Firecracker handshake that cannot be served.
    #[cfg(feature = "firecracker")]
    #[error("firecracker handshake")]
    Handshake(#[source] crate::firecracker::HandshakeError),
    /// A working-set file that cannot be used.
    #[error("working-set file {}", path.display())]
    BadRecording {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        problem: RecordingError,
    },
    /// A pager thread panicked (a source's `fetch` that panicked, a broken invariant):
    /// the pager stopped on it.
    #[error("pager thread {thread} panicked: {message}")]
    ThreadPanicked {
        /// The thread's name.
        thread: String,
        /// The panic's message.
        message: String,
    },
    /// `poll(2)` reported the userfaultfd in error (POLLERR: it was made blocking
    /// again, or never negotiated; POLLHUP/POLLNVAL: it is gone): nothing more can be
    /// read from it.
    #[error("the userfaultfd reported {what} (poll revents {revents:#x})")]
    UffdPoll {
        /// Which condition.
        what: &'static str,
        /// The poll revents.
        revents: i16,
    },
    /// A handler thread could not be pinned to its CPU.
    #[error("pin a handler thread to CPU {cpu}")]
    Pin {
        /// The CPU.
        cpu: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A page seeded Received is not present in memory: it would read as zeros forever
    /// ([`PagerBuilder::check_seeded`](crate::PagerBuilder::check_seeded)).
    #[error(
        "seeded page states: page {page} (at {addr:#x}) is marked received but is not in memory"
    )]
    SeededNotPresent {
        /// The first such page.
        page: usize,
        /// Its address.
        addr: usize,
    },
    /// A forked child's engine, serving from its parent's source
    /// ([`ChildSource::Shared`](crate::ChildSource::Shared)), got `Pending`: the
    /// source is remote and must give the child a source of its own or refuse it.
    #[error("a forked child's engine got Pending from its parent's source at image offset {offset:#x}: a remote source must give a child a source of its own or refuse it (Source::child)")]
    ChildSourcePending {
        /// The offset asked for.
        offset: u64,
    },
    /// The requested delivery mode cannot be used here.
    #[error("delivery mode {mode}: {reason}")]
    Mode {
        /// The mode.
        mode: &'static str,
        /// Why not.
        reason: String,
    },
}

/// An error from a [`crate::Source`].
#[derive(Debug, thiserror::Error)]
#[error("{what} at image offset {offset:#x}")]
pub struct SourceError {
    /// What failed.
    pub what: &'static str,
    /// Where.
    pub offset: u64,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// `Result` with the pager's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
