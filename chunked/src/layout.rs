//! Where each chunk of an image is read from: a pack in an object store (named by its
//! digest, verified on read) or a range of a local raw image file.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::hash::Digest;
use crate::manifest::{Chunk, Geometry, Manifest};
use crate::store::Store;

/// One chunk, as the fetcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// All zero: never read.
    Zero,
    /// Bytes at `offset` of object `object` (a pack index, or 0 for a raw file); verified
    /// against `digest` when there is one.
    Data {
        digest: Option<Digest>,
        object: u32,
        offset: u64,
    },
}

/// Where the bytes live.
pub(crate) enum Backend {
    /// Packs in an object store.
    Store { store: Store, packs: Vec<Digest> },
    /// A raw image file.
    File { file: Arc<File>, path: String },
}

/// An image's chunks and where to read them.
pub(crate) struct Layout {
    pub geometry: Geometry,
    pub slots: Vec<Slot>,
    pub backend: Backend,
}

impl Layout {
    /// The chunks of an image in a store, from its flattened manifest ([`Chain::flatten`]:
    /// nothing inherited is left).
    ///
    /// [`Chain::flatten`]: crate::Chain::flatten
    pub fn from_manifest(store: Store, flat: &Manifest) -> Self {
        let slots = flat
            .chunks()
            .iter()
            .map(|c| match *c {
                Chunk::Zero => Slot::Zero,
                Chunk::Data {
                    digest,
                    pack,
                    offset,
                } => Slot::Data {
                    digest: Some(digest),
                    object: pack,
                    offset,
                },
                Chunk::Inherited => unreachable!("a flattened manifest inherits nothing"),
            })
            .collect();
        Self {
            geometry: flat.geometry(),
            slots,
            backend: Backend::Store {
                store,
                packs: flat.packs().to_vec(),
            },
        }
    }

    /// A raw image file cut into `chunk_size` chunks; chunks wholly inside a hole
    /// (`SEEK_HOLE`) are zero and never read.
    pub fn from_file(path: &std::path::Path, page_size: u32, chunk_size: u32) -> Result<Self> {
        let name = path.display().to_string();
        // A regular file, opened without waiting on a FIFO planted at the path.
        let file = uffd_core::private_fs::open_regular(path, false).map_err(|e| match e {
            // A missing or unreadable file keeps its plain I/O error.
            uffd_core::private_fs::FsError::Io { source, .. } => Error::io("open", &name)(source),
            source => Error::Private {
                what: "open the image file",
                source,
            },
        })?;
        let len = file.metadata().map_err(Error::io("stat", &name))?.len();
        let geometry = Geometry {
            page_size,
            chunk_size,
            len,
        };
        geometry
            .validate()
            .map_err(|e| Error::Geometry(format!("{name}: {e}")))?;
        let holes = holes(&file, len).map_err(Error::io("find holes in", &name))?;
        let slots = (0..geometry.chunk_count() as usize)
            .map(|i| {
                let r = geometry.chunk_range(i);
                if covered(&holes, &r) {
                    Slot::Zero
                } else {
                    Slot::Data {
                        digest: None,
                        object: 0,
                        offset: r.start,
                    }
                }
            })
            .collect();
        Ok(Self {
            geometry,
            slots,
            backend: Backend::File {
                file: Arc::new(file),
                path: name,
            },
        })
    }

    /// Bytes in chunk `index`.
    pub fn chunk_len(&self, index: usize) -> usize {
        let r = self.geometry.chunk_range(index);
        (r.end - r.start) as usize
    }

    /// Whether chunk `b` directly follows chunk `a` in storage (one ranged read covers both).
    pub fn follows(&self, a: usize, b: usize) -> bool {
        match (self.slots.get(a), self.slots.get(b)) {
            (
                Some(Slot::Data {
                    object: oa,
                    offset: fa,
                    ..
                }),
                Some(Slot::Data {
                    object: ob,
                    offset: fb,
                    ..
                }),
            ) => b == a + 1 && oa == ob && fa + self.chunk_len(a) as u64 == *fb,
            _ => false,
        }
    }

    /// Zero chunks as merged image ranges.
    pub fn zero_ranges(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            if *s != Slot::Zero {
                continue;
            }
            let r = self.geometry.chunk_range(i);
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }
}

fn covered(holes: &[Range<u64>], r: &Range<u64>) -> bool {
    let i = holes.partition_point(|h| h.end <= r.start);
    holes
        .get(i)
        .is_some_and(|h| h.start <= r.start && r.end <= h.end)
}

/// The holes of a sparse `file` up to `len`, in order, found with `lseek(2)`'s
/// `SEEK_DATA` / `SEEK_HOLE` (ranges the file system allocated nothing for; they read as
/// zero). Granularity is the file system's block size.
pub fn holes(file: &File, len: u64) -> std::io::Result<Vec<Range<u64>>> {
    use nix::unistd::{lseek, Whence};
    let mut holes = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        let data = match lseek(file.as_fd(), pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => len, // no data after pos
            Err(e) => return Err(e.into()),
        };
        if data > pos {
            holes.push(pos..data.min(len));
        }
        if data >= len {
            break;
        }
        pos = lseek(file.as_fd(), data as i64, Whence::SeekHole)? as u64;
    }
    Ok(holes)
}
