//! Errors of chunked images.

use crate::hash::Digest;
use crate::manifest::{Geometry, ManifestError, MAX_CHAIN_DEPTH};

/// Errors of chunked images: opening, pushing, pulling and serving them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A URL that does not parse or names no supported store.
    #[error("image URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The object store refused or failed an operation.
    #[error("{what} {path}: {source}")]
    Store {
        /// What was being done.
        what: &'static str,
        /// The object.
        path: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// A manifest that is not one.
    #[error("manifest {name}: {source}")]
    Manifest {
        /// Where it came from.
        name: String,
        /// Why it was refused.
        #[source]
        source: ManifestError,
    },
    /// Local I/O (image files, the cache).
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A local directory or file another user could steer (the cache, an output), refused
    /// by the checks of [`uffd_core::private_fs`], or an operation on it that failed.
    #[error("{what}: {source}")]
    Private {
        /// What was being done.
        what: &'static str,
        /// The check that refused it, or the failed call.
        #[source]
        source: uffd_core::private_fs::FsError,
    },
    /// A chunk whose bytes do not hash to its name.
    #[error("chunk {chunk} failed verification: expected {expected}, read {actual}")]
    Corrupt {
        /// Chunk index in the image.
        chunk: usize,
        /// Its name in the manifest.
        expected: Digest,
        /// The digest of what was read.
        actual: Digest,
    },
    /// A read came back with the wrong length.
    #[error("chunk {chunk}: read {got} bytes, expected {want}")]
    ShortRead {
        /// Chunk index.
        chunk: usize,
        /// Bytes expected.
        want: u64,
        /// Bytes read.
        got: u64,
    },
    /// A pack shorter than the manifest says (truncated in the store: a ranged read past
    /// its end, HTTP 416): permanent, never retried.
    #[error("pack {path} is {size} bytes, the manifest reads it up to byte {want}: truncated in the store")]
    PackTooShort {
        /// The pack.
        path: String,
        /// Its size, as the store reports it.
        size: u64,
        /// The end of the read that failed.
        want: u64,
        /// The store's error for that read (none when it answered short).
        #[source]
        source: Option<object_store::Error>,
    },
    /// A fetch failed on every attempt its retry policy allowed.
    #[error("chunk {chunk}: gave up after {attempts} attempts over {elapsed_ms} ms")]
    GaveUp {
        /// The first chunk of the failed read.
        chunk: usize,
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed_ms: u64,
        /// The last attempt's error.
        #[source]
        last: Box<Error>,
    },
    /// An image whose shape the caller cannot use.
    #[error("image geometry: {0}")]
    Geometry(String),
    /// A layer whose chain of parents was refused.
    #[error("layer {layer}: {source}")]
    Chain {
        /// The layer whose parent link failed.
        layer: String,
        /// Why.
        #[source]
        source: ChainError,
    },
    /// A chunk index beyond the image.
    #[error("chunk {index} is beyond the image's {chunks} chunks")]
    ChunkOutOfRange {
        /// The index given.
        index: usize,
        /// Chunks in the image.
        chunks: usize,
    },
    /// A chunk of the wrong length.
    #[error("chunk {index} must be {want} bytes, got {got}")]
    ChunkLength {
        /// The chunk.
        index: usize,
        /// Its length in the image.
        want: usize,
        /// The length given.
        got: usize,
    },
    /// A sparse file pushed as a layer without saying what its holes mean.
    #[error(
        "{file} has holes ({hole_bytes} bytes) and is pushed as a layer over {parent:?}: say \
         whether they are unchanged since the parent (a Firecracker diff snapshot: they \
         inherit the parent's pages) or zeros (a full memory file copied sparse); read as \
         zeros, a diff's holes would wipe the parent's pages"
    )]
    SparseLayer {
        /// The input file.
        file: String,
        /// The parent named.
        parent: String,
        /// Bytes in its holes.
        hole_bytes: u64,
    },
    /// Holes that inherit from a parent, without one.
    #[error("{file}: holes can only inherit from a parent; name one, or push it as a full image")]
    InheritWithoutParent {
        /// The input file.
        file: String,
    },
    /// An image without a parent finished with chunks never written.
    #[error("image {name}: chunk {first} (and {more} more) never written; an image with no parent must be complete")]
    Incomplete {
        /// The image.
        name: String,
        /// The first chunk missing.
        first: usize,
        /// How many more are missing.
        more: usize,
    },
}

impl Error {
    /// Wraps an I/O error.
    pub(crate) fn io(
        what: &'static str,
        path: impl std::fmt::Display,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_string();
        move |source| Error::Io { what, path, source }
    }

    /// Wraps an object store error.
    pub(crate) fn store(
        what: &'static str,
        path: impl std::fmt::Display,
    ) -> impl FnOnce(object_store::Error) -> Error {
        let path = path.to_string();
        move |source| Error::Store { what, path, source }
    }

    /// Whether trying again may help (a transport failure rather than bad data or a
    /// missing object).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            Error::ShortRead { .. } => true,
            _ => false,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a layer's chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainError {
    /// The parent is not in the store.
    #[error("its parent {parent:?} is not in the store")]
    ParentMissing {
        /// The parent's name.
        parent: String,
    },
    /// The manifest under the parent's name is not the one the layer was made on.
    #[error("its parent {parent:?} changed since the layer was made (layer names {expected}, the store holds {actual})")]
    ParentChanged {
        /// The parent's name.
        parent: String,
        /// The digest the layer recorded.
        expected: Digest,
        /// The digest of the manifest found.
        actual: Digest,
    },
    /// The parent's page size, chunk size or length differs.
    #[error("its geometry {layer:?} differs from its parent {parent:?}'s {parent_geometry:?}")]
    Geometry {
        /// The parent's name.
        parent: String,
        /// The layer's geometry.
        layer: Geometry,
        /// The parent's geometry.
        parent_geometry: Geometry,
    },
    /// A name appears twice in the chain.
    #[error("{0:?} appears twice in its chain")]
    Cycle(String),
    /// More than [`MAX_CHAIN_DEPTH`] layers.
    #[error("its chain is deeper than {MAX_CHAIN_DEPTH} layers (merge it)")]
    TooDeep,
}
