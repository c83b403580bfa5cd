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

const FLAG_PARENT: u8 = 1;
const TAG_ZERO: u8 = 0;
const TAG_INHERIT: u8 = 1;
const TAG_DATA: u8 = 2;

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

/// An image's shape: how long, in what pages and chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Page size of the memory the image is for (4 KiB or 2 MiB, any power of two ≥ 4 KiB).
    pub page_size: u32,
    /// Chunk size: a multiple of the page size.
    pub chunk_size: u32,
    /// Image length in bytes.
    pub len: u64,
}

impl Geometry {
    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.len.div_ceil(u64::from(self.chunk_size))
    }

    /// Byte range of chunk `index` in the image.
    pub fn chunk_range(&self, index: usize) -> std::ops::Range<u64> {
        let start = index as u64 * u64::from(self.chunk_size);
        start..(start + u64::from(self.chunk_size)).min(self.len)
    }

    /// The chunk holding image offset `offset`.
    pub fn chunk_of(&self, offset: u64) -> usize {
        (offset / u64::from(self.chunk_size)) as usize
    }

    /// Checks the limits a manifest must respect.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let ps = self.page_size;
        if !ps.is_power_of_two() || !(4096..=1 << 30).contains(&ps) {
            return Err(ManifestError::BadPageSize(ps));
        }
        let cs = self.chunk_size;
        if cs == 0 || cs % ps != 0 || cs > MAX_CHUNK_SIZE {
            return Err(ManifestError::BadChunkSize {
                chunk_size: cs,
                page_size: ps,
            });
        }
        if self.len == 0 || self.len > MAX_IMAGE_LEN {
            return Err(ManifestError::BadLength(self.len));
        }
        if self.chunk_count() > MAX_CHUNKS {
            return Err(ManifestError::TooManyChunks(self.chunk_count()));
        }
        Ok(())
    }
}

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
    /// Larger than [`MAX_MANIFEST_BYTES`].
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
    /// Zero or beyond [`MAX_IMAGE_LEN`].
    #[error("bad image length {0}")]
    BadLength(u64),
    /// More chunks than [`MAX_CHUNKS`] (choose a larger chunk size).
    #[error(
        "{0} chunks is more than an image may have ({MAX_CHUNKS}): choose a larger chunk size"
    )]
    TooManyChunks(u64),
    /// More than the reader's bound (see [`Manifest::decode_limited`]): refused before
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

    /// The encoding (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let g = &self.geometry;
        let mut out = Vec::with_capacity(64 + self.packs.len() * 32 + self.chunks.len() * 45);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.hash.id());
        out.push(if self.parent.is_some() {
            FLAG_PARENT
        } else {
            0
        });
        out.extend_from_slice(&g.page_size.to_le_bytes());
        out.extend_from_slice(&g.chunk_size.to_le_bytes());
        out.extend_from_slice(&g.len.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        if let Some(p) = &self.parent {
            out.extend_from_slice(&(p.name.len() as u16).to_le_bytes());
            out.extend_from_slice(p.name.as_bytes());
            out.extend_from_slice(&p.digest.0);
        }
        for pack in &self.packs {
            out.extend_from_slice(&pack.0);
        }
        let mut i = 0;
        while i < self.chunks.len() {
            match self.chunks[i] {
                Chunk::Data {
                    digest,
                    pack,
                    offset,
                } => {
                    out.push(TAG_DATA);
                    out.extend_from_slice(&digest.0);
                    out.extend_from_slice(&pack.to_le_bytes());
                    out.extend_from_slice(&offset.to_le_bytes());
                    i += 1;
                }
                kind => {
                    let mut run = 1usize;
                    while i + run < self.chunks.len()
                        && self.chunks[i + run] == kind
                        && run < u32::MAX as usize
                    {
                        run += 1;
                    }
                    out.push(if kind == Chunk::Zero {
                        TAG_ZERO
                    } else {
                        TAG_INHERIT
                    });
                    out.extend_from_slice(&(run as u32).to_le_bytes());
                    i += run;
                }
            }
        }
        let trailer = Digest::of(&out);
        out.extend_from_slice(&trailer.0);
        out
    }

    /// Decodes and validates a manifest, within the format's own limits only
    /// ([`MAX_IMAGE_LEN`], [`MAX_CHUNKS`]). A reader of untrusted manifests wants
    /// [`Manifest::decode_limited`].
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        Self::decode_limited(bytes, MAX_IMAGE_LEN.saturating_mul(MIN_BYTES_PER_CHUNK))
    }

    /// Decodes and validates a manifest describing at most `max_len` bytes in at most
    /// `max_len / MIN_BYTES_PER_CHUNK` chunks: a header declaring more is refused
    /// ([`ManifestError::BeyondBound`]) before anything is allocated for its chunk table,
    /// so a manifest of a few bytes cannot make its reader allocate gigabytes.
    pub fn decode_limited(bytes: &[u8], max_len: u64) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let mut r = Reader { bytes, at: 0 };
        if r.take(8, "magic")? != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = r.u16("version")?;
        if version != VERSION {
            return Err(ManifestError::UnsupportedVersion(version));
        }
        let hash_id = r.u8("hash algorithm")?;
        let hash = HashAlgorithm::from_id(hash_id).ok_or(ManifestError::UnknownHash(hash_id))?;
        let flags = r.u8("flags")?;
        if flags & !FLAG_PARENT != 0 {
            return Err(ManifestError::UnknownFlags(flags));
        }
        let geometry = Geometry {
            page_size: r.u32("page size")?,
            chunk_size: r.u32("chunk size")?,
            len: r.u64("length")?,
        };
        geometry.validate()?;
        let max_chunks = max_len / MIN_BYTES_PER_CHUNK;
        if geometry.len > max_len || geometry.chunk_count() > max_chunks {
            return Err(ManifestError::BeyondBound {
                len: geometry.len,
                chunks: geometry.chunk_count(),
                max: max_len,
                max_chunks,
            });
        }
        let declared = r.u64("chunk count")?;
        let expected = geometry.chunk_count();
        if declared != expected {
            return Err(ManifestError::ChunkCount { declared, expected });
        }
        let pack_count = r.u32("pack count")?;
        if u64::from(pack_count) > expected {
            return Err(ManifestError::TooManyPacks {
                packs: u64::from(pack_count),
                chunks: expected,
            });
        }
        let parent = if flags & FLAG_PARENT != 0 {
            let n = usize::from(r.u16("parent name length")?);
            if n == 0 || n > MAX_PARENT_NAME {
                return Err(ManifestError::BadParentName);
            }
            let name = std::str::from_utf8(r.take(n, "parent name")?)
                .map_err(|_| ManifestError::BadParentName)?
                .to_owned();
            Some(Parent {
                name,
                digest: r.digest("parent digest")?,
            })
        } else {
            None
        };
        // Every pack costs 32 bytes: a count beyond what is left is refused before allocating.
        r.need(pack_count as usize * 32, "packs")?;
        let packs = (0..pack_count)
            .map(|_| r.digest("pack"))
            .collect::<Result<Vec<_>, _>>()?;
        // At least one entry byte per run: the body bounds the allocation, not the header.
        let mut chunks = Vec::with_capacity((expected as usize).min(bytes.len()));
        // The previous entry, if it was a run: its tag and length.
        let mut last_run: Option<(u8, u64)> = None;
        while (chunks.len() as u64) < expected {
            let index = chunks.len() as u64;
            let chunk = match r.u8("entry tag")? {
                TAG_DATA => Chunk::Data {
                    digest: r.digest("chunk digest")?,
                    pack: r.u32("chunk pack")?,
                    offset: r.u64("chunk offset")?,
                },
                tag @ (TAG_ZERO | TAG_INHERIT) => {
                    let run = u64::from(r.u32("run length")?);
                    if run == 0 {
                        return Err(ManifestError::EmptyRun(index));
                    }
                    if index + run > expected {
                        return Err(ManifestError::TooManyEntries(expected));
                    }
                    if matches!(last_run, Some((t, n)) if t == tag && n < u64::from(u32::MAX)) {
                        return Err(ManifestError::SplitRun(index));
                    }
                    last_run = Some((tag, run));
                    let kind = if tag == TAG_ZERO {
                        Chunk::Zero
                    } else {
                        Chunk::Inherited
                    };
                    check_chunk(&geometry, index, &kind, pack_count, parent.is_some())?;
                    chunks.extend(std::iter::repeat_n(kind, run as usize));
                    continue;
                }
                tag => return Err(ManifestError::UnknownTag { tag, chunk: index }),
            };
            last_run = None;
            check_chunk(&geometry, index, &chunk, pack_count, parent.is_some())?;
            chunks.push(chunk);
        }
        let body = r.at;
        let trailer = r.digest("trailer")?;
        if Digest::of(&bytes[..body]) != trailer {
            return Err(ManifestError::Checksum);
        }
        if r.at != bytes.len() {
            return Err(ManifestError::TrailingBytes(bytes.len() - r.at));
        }
        Ok(Self {
            geometry,
            hash,
            parent,
            packs,
            chunks,
        })
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

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn need(&self, n: usize, field: &'static str) -> Result<(), ManifestError> {
        if self.bytes.len() - self.at < n {
            return Err(ManifestError::Truncated { field, at: self.at });
        }
        Ok(())
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ManifestError> {
        self.need(n, field)?;
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ManifestError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, ManifestError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ManifestError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ManifestError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, ManifestError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn digest(&mut self, field: &'static str) -> Result<Digest, ManifestError> {
        Ok(Digest(self.array(field)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzzer: a 45-byte manifest whose header claims a length of ~2^41 bytes
    /// in 4 KiB chunks and whose one zero run then made the decoder allocate ~29 GB.
    #[test]
    fn a_huge_declared_length_is_refused_before_allocating() {
        let input = b"UFFDIMG\0\x01\0\x01\0\0\0\x01\0\0\0\x02\0#\xd7\xff\xd7\xd7\xd7\x01\0\0\
            \xec\xeb\xeb\0\0\0\0\0\0\0\0\0\0\0\x01$";
        assert_eq!(input.len(), 45);
        assert!(
            matches!(
                Manifest::decode(input),
                Err(ManifestError::TooManyChunks(_))
            ),
            "{:?}",
            Manifest::decode(input).map(|m| m.geometry)
        );
        let g = Geometry {
            page_size: 4096,
            chunk_size: 4096,
            len: (MAX_CHUNKS + 1) * 4096,
        };
        assert_eq!(
            g.validate(),
            Err(ManifestError::TooManyChunks(MAX_CHUNKS + 1))
        );
    }

    /// A manifest of one zero run: the header and one entry, whatever the length.
    fn zero_run(g: Geometry) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&[HashAlgorithm::Blake3.id(), 0]);
        b.extend_from_slice(&g.page_size.to_le_bytes());
        b.extend_from_slice(&g.chunk_size.to_le_bytes());
        b.extend_from_slice(&g.len.to_le_bytes());
        b.extend_from_slice(&g.chunk_count().to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.push(TAG_ZERO);
        b.extend_from_slice(&(g.chunk_count() as u32).to_le_bytes());
        let trailer = Digest::of(&b);
        b.extend_from_slice(&trailer.0);
        b
    }

    /// Issue 27: a 77-byte manifest declaring 1 PiB in 2^24 chunks cost its readers
    /// 1.6–2.4 GB. Beyond a reader's bound it is refused from its header alone.
    #[test]
    fn a_manifest_beyond_the_readers_bound_is_refused_from_its_header() {
        let huge = zero_run(Geometry {
            page_size: 4096,
            chunk_size: MAX_CHUNK_SIZE,
            len: MAX_IMAGE_LEN,
        });
        assert_eq!(huge.len(), 77);
        assert!(matches!(
            Manifest::decode_limited(&huge, DEFAULT_MAX_IMAGE),
            Err(ManifestError::BeyondBound {
                len: MAX_IMAGE_LEN,
                ..
            })
        ));
        // Many small chunks within the length bound are refused too.
        let small_chunks = zero_run(Geometry {
            page_size: 4096,
            chunk_size: 4096,
            len: 1 << 30,
        });
        assert!(matches!(
            Manifest::decode_limited(&small_chunks, 16 << 30),
            Err(ManifestError::BeyondBound {
                chunks: 262_144,
                max_chunks: 65_536,
                ..
            })
        ));
        let m = Manifest::decode_limited(&small_chunks, 64 << 30).unwrap();
        assert_eq!(m.chunks().len(), 262_144);
    }

    fn geometry() -> Geometry {
        Geometry {
            page_size: 4096,
            chunk_size: 64 << 10,
            len: (10 << 16) - 4096,
        }
    }

    fn sample(parent: bool) -> Manifest {
        let mut chunks = vec![Chunk::Zero; 10];
        chunks[1] = Chunk::Data {
            digest: Digest::of(b"a"),
            pack: 0,
            offset: 0,
        };
        chunks[2] = chunks[1];
        chunks[5] = Chunk::Data {
            digest: Digest::of(b"b"),
            pack: 1,
            offset: 65536,
        };
        if parent {
            chunks[7] = Chunk::Inherited;
            chunks[8] = Chunk::Inherited;
        }
        let parent = parent.then(|| Parent {
            name: "base".into(),
            digest: Digest::of(b"base"),
        });
        Manifest::new(
            geometry(),
            parent,
            vec![Digest::of(b"p0"), Digest::of(b"p1")],
            chunks,
        )
        .unwrap()
    }

    #[test]
    fn encode_decode_round_trips_with_and_without_parent() {
        for parent in [false, true] {
            let m = sample(parent);
            assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample(true).encode();
        for n in 0..bytes.len() {
            assert!(
                Manifest::decode(&bytes[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
    }

    #[test]
    fn a_flipped_bit_is_refused() {
        let bytes = sample(false).encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(Manifest::decode(&b).is_err(), "bit flip at byte {i}");
        }
    }

    #[test]
    fn malformed_headers_get_typed_errors() {
        let good = sample(false).encode();
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(Manifest::decode(&b), Err(ManifestError::BadMagic));
        let mut b = good.clone();
        b[8] = 9;
        assert_eq!(
            Manifest::decode(&b),
            Err(ManifestError::UnsupportedVersion(9))
        );
        let mut b = good.clone();
        b[10] = 7;
        assert_eq!(Manifest::decode(&b), Err(ManifestError::UnknownHash(7)));
        let mut b = good.clone();
        b[12..16].copy_from_slice(&3000u32.to_le_bytes());
        assert_eq!(Manifest::decode(&b), Err(ManifestError::BadPageSize(3000)));
        let mut b = good;
        b.push(0);
        assert_eq!(Manifest::decode(&b), Err(ManifestError::TrailingBytes(1)));
    }

    #[test]
    fn new_refuses_what_decode_would() {
        let g = geometry();
        assert!(matches!(
            Manifest::new(g, None, vec![], vec![Chunk::Zero; 3]),
            Err(ManifestError::ChunkCount { .. })
        ));
        assert_eq!(
            Manifest::new(g, None, vec![], vec![Chunk::Inherited; 10]),
            Err(ManifestError::InheritedWithoutParent(0))
        );
        let data = Chunk::Data {
            digest: Digest::of(b""),
            pack: 0,
            offset: u64::MAX,
        };
        assert_eq!(
            Manifest::new(g, None, vec![Digest::of(b"")], vec![data; 10]),
            Err(ManifestError::OffsetOverflow(0))
        );
        let bad = Geometry {
            chunk_size: 6000,
            ..g
        };
        assert!(matches!(
            Manifest::new(bad, None, vec![], vec![]),
            Err(ManifestError::BadChunkSize { .. })
        ));
    }

    #[test]
    fn a_run_split_in_two_is_refused() {
        let g = Geometry {
            page_size: 4096,
            chunk_size: 4096,
            len: 2 * 4096,
        };
        let m = Manifest::new(g, None, vec![], vec![Chunk::Zero; 2]).unwrap();
        let mut b = m.encode();
        b.truncate(b.len() - 32);
        let n = b.len();
        // One run of two zero chunks becomes two runs of one.
        b[n - 4..].copy_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&[0, 1, 0, 0, 0]);
        let d = Digest::of(&b);
        b.extend_from_slice(&d.0);
        assert_eq!(Manifest::decode(&b), Err(ManifestError::SplitRun(1)));
    }

    #[test]
    fn geometry_maps_offsets_to_chunks() {
        let g = geometry();
        assert_eq!(g.chunk_count(), 10);
        assert_eq!(g.chunk_of(65536 * 3 + 5), 3);
        assert_eq!(g.chunk_range(9), 9 * 65536..10 * 65536 - 4096);
    }
}
