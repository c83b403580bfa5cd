//! Pager errors.

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
    /// The kernel refused an operation.
    #[error(transparent)]
    Uffd(#[from] uffd_core::Error),
    /// The source failed.
    #[error("source: {0}")]
    Source(#[from] SourceError),
    /// I/O (recording files, threads).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A Firecracker handshake that cannot be served.
    #[error("firecracker handshake: {0}")]
    Handshake(String),
    /// A working-set file that is not one.
    #[error("working-set file: {0}")]
    BadRecording(String),
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
#[error("{what} at image offset {offset:#x}: {source}")]
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
