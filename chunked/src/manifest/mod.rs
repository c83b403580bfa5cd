//! The image manifest: what an image is made of, chunk by chunk.
//!
//! An image of `len` bytes is cut into chunks of `chunk_size` bytes (the last may be
//! shorter). Each chunk is one of: all zero (stored nowhere), data (named by its BLAKE3
//! digest and stored once, at an offset in a *pack*), or — in a layer — inherited from the
//! parent image. A pack is an object holding chunks back to back; a push writes the chunks
//! the store did not have yet into one new pack, in image order, so that neighbouring
//! chunks a restore misses together are one ranged read. Chunks already in the store (from
//! any image, or earlier in the same one) are referenced where they are, never stored again.
//!
//! A layer (an incremental snapshot) is a manifest with a parent: its chunks are the
//! changed ones, the rest `Inherited`; reading a chain resolves each chunk to the newest
//! layer that has it.
//!
//! # Encoding (version 1, little-endian)
//!
//! ```text
//! magic "UFFDIMG\0" | version u16 | hash u8 | flags u8 (bit 0: has parent)
//! page_size u32 | chunk_size u32 | len u64 | chunk_count u64 | pack_count u32
//! [parent: name_len u16, name bytes (UTF-8), digest 32]   if flags bit 0
//! packs: pack_count × digest 32
//! entries until chunk_count chunks are described:
//!   0, count u32        a run of zero chunks
//!   1, count u32        a run of inherited chunks (layers only)
//!   2, digest 32, pack u32, offset u64   one data chunk
//! trailer: BLAKE3 of every byte before it (32) — the manifest's own digest
//! ```
//!
//! [`Manifest::decode`] refuses anything else with a [`ManifestError`] naming what is
//! wrong: it is fed bytes from an object store that anyone with write access can change.
//!
//! Here the manifest and its limits; `geometry.rs` an image's shape, `codec.rs` the
//! encoding and the decoder, `error.rs` why a manifest is refused.

use crate::hash::{Digest, HashAlgorithm};

/// The first bytes of every manifest.
pub const MAGIC: [u8; 8] = *b"UFFDIMG\0";
/// The encoding version this crate writes and reads.
pub const VERSION: u16 = 1;
/// The largest manifest accepted (1 GiB images of 4 KiB chunks fit many times over).
pub const MAX_MANIFEST_BYTES: usize = 256 << 20;
/// The largest chunk accepted.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// The largest image accepted (1 PiB).
pub const MAX_IMAGE_LEN: u64 = 1 << 50;
/// The longest image a reader accepts unless told otherwise ([`Manifest::decode_limited`],
/// `StoreOptions::max_image`): 1 TiB. A manifest is input from a store anyone with write
/// access can change, and what it declares shapes what every reader allocates.
pub const DEFAULT_MAX_IMAGE: u64 = 1 << 40;
/// Bytes of image per chunk-table entry a reader's bound allows: a reader accepting images
/// of up to `max` bytes accepts up to `max / MIN_BYTES_PER_CHUNK` chunks (4 Mi at the
/// default bound: a decoded table of ~200 MiB), whatever the chunk size declared.
pub const MIN_BYTES_PER_CHUNK: u64 = 256 << 10;
/// The longest parent name accepted.
pub const MAX_PARENT_NAME: usize = 1024;
/// Layers a chain of parents may have, its base included: deeper chains are refused (and should be
/// merged; each layer costs a manifest read at open).
pub const MAX_CHAIN_DEPTH: usize = 128;

/// The most chunks an image may have (16 Mi: 8 TiB in 512 KiB chunks, 1 TiB in 64 KiB
/// ones). A decoded manifest holds an entry per chunk, so this bounds what a manifest of a
/// few bytes — a header claiming a huge length and one zero run — makes the decoder
/// allocate (about 48 bytes a chunk: 768 MiB at the limit).
pub const MAX_CHUNKS: u64 = 1 << 24;

mod codec;
mod error;
mod geometry;
#[cfg(test)]
mod tests;

pub use error::ManifestError;
pub use geometry::Geometry;

/// One chunk of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// All zero: stored nowhere.
    Zero,
    /// Taken from the parent image (layers only).
    Inherited,
    /// Stored data.
    Data {
        /// BLAKE3 of the chunk's bytes.
        digest: Digest,
        /// Index into [`Manifest::packs`].
        pack: u32,
        /// Byte offset of the chunk in its pack.
        offset: u64,
    },
}

/// A layer's parent: the image it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// The parent manifest's name in the same store (its path relative to the store root).
    pub name: String,
    /// The parent manifest's digest ([`Manifest::digest`]), so a replaced parent is noticed.
    pub digest: Digest,
}

/// An image manifest (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    geometry: Geometry,
    hash: HashAlgorithm,
    parent: Option<Parent>,
    packs: Vec<Digest>,
    chunks: Vec<Chunk>,
}

impl Manifest {
    /// A manifest of `chunks` (one per chunk of `geometry`) stored in `packs`. Refused
    /// unless it would encode and decode to itself.
    pub fn new(
        geometry: Geometry,
        parent: Option<Parent>,
        packs: Vec<Digest>,
        chunks: Vec<Chunk>,
    ) -> Result<Self, ManifestError> {
        geometry.validate()?;
        let expected = geometry.chunk_count();
        if chunks.len() as u64 != expected {
            return Err(ManifestError::ChunkCount {
                declared: chunks.len() as u64,
                expected,
            });
        }
        if packs.len() as u64 > expected {
            return Err(ManifestError::TooManyPacks {
                packs: packs.len() as u64,
                chunks: expected,
            });
        }
        if let Some(p) = &parent {
            if p.name.is_empty() || p.name.len() > MAX_PARENT_NAME {
                return Err(ManifestError::BadParentName);
            }
        }
        for (i, c) in chunks.iter().enumerate() {
            check_chunk(&geometry, i as u64, c, packs.len() as u32, parent.is_some())?;
        }
        Ok(Self {
            geometry,
            hash: HashAlgorithm::Blake3,
            parent,
            packs,
            chunks,
        })
    }

    /// Page size, chunk size, length.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The hash algorithm naming the chunks.
    pub fn hash_algorithm(&self) -> HashAlgorithm {
        self.hash
    }

    /// The parent, for a layer.
    pub fn parent(&self) -> Option<&Parent> {
        self.parent.as_ref()
    }

    /// The packs the data chunks live in.
    pub fn packs(&self) -> &[Digest] {
        &self.packs
    }

    /// Every chunk, in image order.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// The manifest's digest (its encoding's trailer): how a layer names its parent.
    pub fn digest(&self) -> Digest {
        let bytes = self.encode();
        let mut d = [0u8; 32];
        d.copy_from_slice(&bytes[bytes.len() - 32..]);
        Digest(d)
    }
}

fn check_chunk(
    g: &Geometry,
    index: u64,
    chunk: &Chunk,
    packs: u32,
    has_parent: bool,
) -> Result<(), ManifestError> {
    match *chunk {
        Chunk::Zero => Ok(()),
        Chunk::Inherited if has_parent => Ok(()),
        Chunk::Inherited => Err(ManifestError::InheritedWithoutParent(index)),
        Chunk::Data { pack, offset, .. } => {
            if pack >= packs {
                return Err(ManifestError::PackOutOfRange {
                    chunk: index,
                    pack,
                    packs,
                });
            }
            let len = g.chunk_range(index as usize);
            if offset.checked_add(len.end - len.start).is_none() {
                return Err(ManifestError::OffsetOverflow(index));
            }
            Ok(())
        }
    }
}
