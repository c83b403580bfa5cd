//! The manifest's encoding (described in the [module docs](super)): [`Manifest::encode`],
//! and the decoder that refuses anything else, reading through a bounds-checked cursor.

use super::{
    check_chunk, Chunk, Geometry, Manifest, ManifestError, Parent, MAGIC, MAX_IMAGE_LEN,
    MAX_MANIFEST_BYTES, MAX_PARENT_NAME, MIN_BYTES_PER_CHUNK, VERSION,
};
use crate::hash::{Digest, HashAlgorithm};

pub(super) const FLAG_PARENT: u8 = 1;
pub(super) const TAG_ZERO: u8 = 0;
pub(super) const TAG_INHERIT: u8 = 1;
pub(super) const TAG_DATA: u8 = 2;

impl Manifest {
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
    /// ([`MAX_IMAGE_LEN`], [`MAX_CHUNKS`](super::MAX_CHUNKS)). A reader of untrusted manifests wants
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
