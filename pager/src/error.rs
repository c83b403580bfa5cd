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
