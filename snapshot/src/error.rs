//! Errors of snapshots and layered sources.

use std::path::PathBuf;

use uffd_core::Features;

/// Errors taking a snapshot, writing a layer, or opening a layered source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A userfaultfd operation failed.
    #[error("{what}: {source}")]
    Uffd {
        /// What was being done.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: uffd_core::Error,
    },
    /// The userfaultfd lacks features the regions need for write-protect.
    #[error("the userfaultfd lacks {missing:?} (negotiated by whoever opened it)")]
    MissingFeatures {
        /// What is missing.
        missing: Features,
    },
    /// The userfaultfd resolves write-protect faults itself (`WP_ASYNC`): it cannot hold a
    /// write until its page is saved.
    #[error("the userfaultfd was opened with WP_ASYNC: its write-protect faults never reach a handler, so a live snapshot cannot hold writes")]
    AsyncWriteProtect,
    /// A region that cannot be snapshotted as given.
    #[error("region {index}: {reason}")]
    Region {
        /// Its index in the order given.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Reading the memory failed (another process's memory that went away, or a range
    /// that is not mapped).
    #[error("read {len} bytes of memory at {addr:#x}: {source}")]
    ReadMemory {
        /// Start address.
        addr: usize,
        /// Bytes asked for.
        len: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The sink refused a page.
    #[error("save {len} bytes at image offset {offset:#x}: {source}")]
    Sink {
        /// Image offset.
        offset: u64,
        /// Bytes.
        len: usize,
        /// The sink's error.
        #[source]
        source: std::io::Error,
    },
    /// The system refused a resource (a thread, an eventfd).
    #[error("{what}: {source}")]
    System {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot worker panicked (a bug); its pages were released unsaved.
    #[error("a snapshot worker panicked")]
    WorkerPanicked,
    /// Pausing or resuming the workload failed.
    #[error("{what} the workload: {source}")]
    Quiesce {
        /// "pause" or "resume".
        what: &'static str,
        /// The embedder's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Reading or writing a chunked image.
    #[error(transparent)]
    Chunked(#[from] chunked::Error),
    /// The chain's image does not fit the tracked memory.
    #[error("image {url}: {reason}")]
    ImageShape {
        /// The image.
        url: String,
        /// What does not fit.
        reason: String,
    },
    /// A file of a layered chain.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An output refused by the checks of [`uffd_core::private_fs`] (a link, a FIFO, a
    /// hard-linked file at its path), or its creation failed.
    #[error("{what}: {source}")]
    Private {
        /// What was being done.
        what: &'static str,
        /// The check that refused it, or the failed call.
        #[source]
        source: uffd_core::private_fs::FsError,
    },
    /// A Firecracker diff layer that does not belong on its base.
    #[error("layer {path}: {len} bytes, but the base is {base_len} bytes: not a diff snapshot of the same guest memory")]
    LayerLength {
        /// The layer.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The base's.
        base_len: u64,
    },
    /// Memory was discarded (`madvise(2)` `MADV_DONTNEED`, `MADV_FREE` or `MADV_REMOVE`)
    /// after the cut, before the live snapshot had saved all of it: its content at the cut
    /// is gone, so the snapshot cannot hold it (see [`crate::LiveSnapshot`]).
    #[error("{len:#x} bytes at {addr:#x} were discarded after the cut before the snapshot saved them: their content at the cut is lost")]
    Discarded {
        /// Start of the discarded range (or of the copy it reached).
        addr: usize,
        /// Its length in bytes.
        len: usize,
    },
}

impl Error {
    /// Wraps a userfaultfd error.
    pub(crate) fn uffd(what: &'static str) -> impl FnOnce(uffd_core::Error) -> Error {
        move |source| Error::Uffd { what, source }
    }

    /// Wraps a file error.
    pub(crate) fn io(
        what: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
