//! Why a manifest was refused: [`ManifestError`], one variant per broken rule.

use super::{MAX_CHUNKS, VERSION};

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestError {
    /// The bytes end before the field.
    #[error("manifest truncated: no room for {field} at byte {at}")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Where.
        at: usize,
    },
    /// Larger than [`MAX_MANIFEST_BYTES`](super::MAX_MANIFEST_BYTES).
    #[error("manifest of {0} bytes is larger than the limit")]
    TooLarge(usize),
    /// Not a manifest.
    #[error("not an image manifest (bad magic)")]
    BadMagic,
    /// A version this build cannot read.
    #[error("manifest version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u16),
    /// An unknown hash algorithm id.
    #[error("unknown hash algorithm id {0}")]
    UnknownHash(u8),
    /// Flag bits this version does not define.
    #[error("unknown manifest flags {0:#x}")]
    UnknownFlags(u8),
    /// A page size that is not a power of two in 4 KiB..=1 GiB.
    #[error("bad page size {0}")]
    BadPageSize(u32),
    /// A chunk size that is zero, too large, or not a multiple of the page size.
    #[error("bad chunk size {chunk_size} for page size {page_size}")]
    BadChunkSize {
        /// Chunk size.
        chunk_size: u32,
        /// Page size.
        page_size: u32,
    },
    /// Zero or beyond [`MAX_IMAGE_LEN`](super::MAX_IMAGE_LEN).
    #[error("bad image length {0}")]
    BadLength(u64),
    /// More chunks than [`MAX_CHUNKS`] (choose a larger chunk size).
    #[error(
        "{0} chunks is more than an image may have ({MAX_CHUNKS}): choose a larger chunk size"
    )]
    TooManyChunks(u64),
    /// More than the reader's bound (see [`Manifest::decode_limited`](super::Manifest::decode_limited)): refused before
    /// the chunk table is allocated.
    #[error("declares {len} bytes in {chunks} chunks, more than this reader accepts ({max} bytes, {max_chunks} chunks): raise the bound (--max-image) if the image is genuine")]
    BeyondBound {
        /// Declared length.
        len: u64,
        /// Chunks it makes.
        chunks: u64,
        /// The reader's bound on the length.
        max: u64,
        /// The reader's bound on the chunks.
        max_chunks: u64,
    },
    /// The declared chunk count does not match length / chunk size.
    #[error("declares {declared} chunks, length and chunk size make {expected}")]
    ChunkCount {
        /// Declared.
        declared: u64,
        /// Implied.
        expected: u64,
    },
    /// More packs than chunks could use.
    #[error("{packs} packs for {chunks} chunks")]
    TooManyPacks {
        /// Packs declared.
        packs: u64,
        /// Chunks.
        chunks: u64,
    },
    /// The parent name is empty, too long or not UTF-8.
    #[error("bad parent name")]
    BadParentName,
    /// An entry tag this version does not define.
    #[error("unknown entry tag {tag} at chunk {chunk}")]
    UnknownTag {
        /// The tag.
        tag: u8,
        /// The chunk it would describe.
        chunk: u64,
    },
    /// A zero or inherited run of length zero.
    #[error("empty run at chunk {0}")]
    EmptyRun(u64),
    /// A run that continues the previous run of the same kind (the encoding is canonical:
    /// one manifest, one byte string, one digest).
    #[error("split run at chunk {0}")]
    SplitRun(u64),
    /// Entries describe more chunks than declared.
    #[error("entries describe more than the {0} declared chunks")]
    TooManyEntries(u64),
    /// A data chunk in a pack the manifest does not list.
    #[error("chunk {chunk} names pack {pack} of {packs}")]
    PackOutOfRange {
        /// The chunk.
        chunk: u64,
        /// Its pack index.
        pack: u32,
        /// Packs listed.
        packs: u32,
    },
    /// A chunk's pack offset overflows.
    #[error("chunk {0}'s pack offset overflows")]
    OffsetOverflow(u64),
    /// An inherited chunk in an image without a parent.
    #[error("chunk {0} is inherited but the image has no parent")]
    InheritedWithoutParent(u64),
    /// The trailer is not the digest of the bytes before it.
    #[error("manifest checksum mismatch (corrupt or truncated)")]
    Checksum,
    /// Bytes after the trailer.
    #[error("{0} bytes after the manifest's end")]
    TrailingBytes(usize),
}
