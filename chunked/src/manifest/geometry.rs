//! An image's shape ([`Geometry`]): its length, page size and chunk size, and the
//! arithmetic from offsets to chunks.

use super::{ManifestError, MAX_CHUNKS, MAX_CHUNK_SIZE, MAX_IMAGE_LEN};

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
