//! Writing an image chunk by chunk: [`ImageWriter`] names each chunk by its digest, stores
//! only what the store does not have yet (zero chunks nowhere) in one new pack, and writes
//! the manifest last, so a manifest never names a missing chunk.
//!
//! Given a parent, it writes a *layer*: a chunk equal to the parent chain's chunk at the
//! same index is recorded as inherited (shared, not stored again), and so is every chunk
//! never written — an incremental snapshot hands in only the chunks it saw change, or
//! only their changed pages ([`ImageWriter::write_patches`]: the rest of each chunk is read
//! from the parent, verified). Chunks may be written in any order; storage order follows
//! the writes, so writing in image order keeps neighbouring chunks one ranged read apart.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use object_store::buffered::BufWriter;
use tokio::io::AsyncWriteExt;

use crate::error::{ChainError, Error, Result};
use crate::fetch::{Fetcher, RetryPolicy, Sink};
use crate::hash::Digest;
use crate::image::Image;
use crate::layout::Layout;
use crate::manifest::{Chunk, Geometry, Manifest, Parent};
use crate::options::{PushOptions, PushReport};
use crate::store::Store;

/// New chunk bytes are handed to the pack upload in pieces of at least this much.
const PUT_BYTES: usize = 4 << 20;

/// Where an existing chunk lives: its pack and offset.
type Known = HashMap<Digest, (Digest, u64)>;

/// Writes one image or layer (see the module docs).
pub struct ImageWriter {
    runtime: tokio::runtime::Runtime,
    store: Store,
    name: String,
    geometry: Geometry,
    /// The parent's name and digest, and its chain flattened (what each chunk resolves to).
    parent: Option<(Parent, Manifest)>,
    known: Known,
    pack_id: Digest,
    pack: BufWriter,
    packs: Vec<Digest>,
    pack_index: HashMap<Digest, u32>,
    /// Offsets in the new pack of the chunks it holds.
    ours: HashMap<Digest, u64>,
    /// New chunk bytes not yet handed to the pack upload (put in large pieces: a put per
    /// small chunk would cost a runtime round trip each).
    pending: Vec<u8>,
    chunks: Vec<Option<Chunk>>,
    report: PushReport,
}

impl std::fmt::Debug for ImageWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageWriter")
            .field("name", &self.name)
            .field("geometry", &self.geometry)
            .field("parent", &self.parent.as_ref().map(|(p, _)| &p.name))
            .finish_non_exhaustive()
    }
}

impl ImageWriter {
    /// Starts image `url` of `len` bytes, shaped by `options` (page and chunk size; with
    /// `options.parent`, a layer over that image of the same store root, whose geometry it
    /// takes and whose chain must resolve).
    pub fn create(url: &str, len: u64, options: &PushOptions) -> Result<ImageWriter> {
        let runtime = crate::runtime()?;
        let (store, name) = Store::for_image(url, &options.store)?;
        let refuse_geometry = |e| Error::Geometry(format!("{url}: {e}"));
        let (geometry, parent) = match &options.parent {
            Some(parent) => {
                if *parent == name {
                    return Err(Error::Chain {
                        layer: url.to_owned(),
                        source: ChainError::Cycle(name),
                    });
                }
                let image = runtime.block_on(Image::open_in(store.clone(), parent.clone()))?;
                // Not only the parent: a layer written over any image of its own chain
                // replaces a manifest the chain stands on, and every image above it breaks.
                if image.chain().layers().iter().any(|(n, _)| *n == name) {
                    return Err(Error::Chain {
                        layer: url.to_owned(),
                        source: ChainError::Cycle(name),
                    });
                }
                let g = image.flattened().geometry();
                if g.len != len {
                    return Err(refuse_geometry(format!(
                        "a layer of {len} bytes over {parent:?} of {} bytes",
                        g.len
                    )));
                }
                let link = Parent {
                    name: parent.clone(),
                    digest: image.manifest().digest(),
                };
                (g, Some((link, image.flattened().clone())))
            }
            None => {
                let g = Geometry {
                    page_size: options.page_size,
                    chunk_size: options.chunk_size,
                    len,
                };
                g.validate().map_err(|e| refuse_geometry(e.to_string()))?;
                (g, None)
            }
        };
        let mut known = Known::new();
        let mut manifests_indexed = 0;
        if let Some((_, flat)) = &parent {
            index(&mut known, flat);
        }
        if options.dedupe_with_store {
            for (_, m) in runtime.block_on(store.manifests(&name))? {
                manifests_indexed += 1;
                index(&mut known, &m);
            }
        }
        // The new pack's name: unique per writer (a retry of the same push writes a new pack).
        let pack_id = Digest::of(
            format!(
                "{name}:{}:{len}:{:?}",
                std::process::id(),
                std::time::SystemTime::now()
            )
            .as_bytes(),
        );
        let pack = BufWriter::with_capacity(
            Arc::clone(store.objects()),
            store.pack_path(&pack_id),
            8 << 20,
        )
        .with_max_concurrency(4);
        let count = geometry.chunk_count() as usize;
        let empty =
            Manifest::new(geometry, None, vec![], vec![Chunk::Zero; count]).map_err(|source| {
                Error::Manifest {
                    name: name.clone(),
                    source,
                }
            })?;
        Ok(ImageWriter {
            runtime,
            store,
            name,
            geometry,
            parent,
            known,
            pack_id,
            pack,
            packs: Vec::new(),
            pack_index: HashMap::new(),
            ours: HashMap::new(),
            pending: Vec::new(),
            chunks: vec![None; count],
            report: PushReport {
                manifest: empty,
                chunks: count as u64,
                zero_chunks: 0,
                repeated_chunks: 0,
                existing_chunks: 0,
                new_chunks: 0,
                inherited_chunks: 0,
                data_bytes: 0,
                uploaded_bytes: 0,
                manifests_indexed,
            },
        })
    }

    /// The image's geometry (for a layer, its parent's).
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Sets chunk `index` to `data` (exactly the chunk's length). Writing a chunk twice
    /// keeps the second.
    pub fn write_chunk(&mut self, index: usize, data: &[u8]) -> Result<()> {
        if index >= self.chunks.len() {
            return Err(Error::ChunkOutOfRange {
                index,
                chunks: self.chunks.len(),
            });
        }
        let range = self.geometry.chunk_range(index);
        let want = (range.end - range.start) as usize;
        if data.len() != want {
            return Err(Error::ChunkLength {
                index,
                want,
                got: data.len(),
            });
        }
        let inherited = self.parent.as_ref().map(|(_, flat)| flat.chunks()[index]);
        let chunk = if data.iter().all(|&b| b == 0) {
            match inherited {
                Some(Chunk::Zero) => Chunk::Inherited,
                _ => Chunk::Zero,
            }
        } else {
            let digest = Digest::of(data);
            match inherited {
                Some(Chunk::Data { digest: d, .. }) if d == digest => Chunk::Inherited,
                _ => self.store_data(digest, data)?,
            }
        };
        self.chunks[index] = Some(chunk);
        Ok(())
    }

    /// Writes chunks of which only `patches` changed: each chunk's bytes are the
    /// parent's (fetched from the store in ranged reads and verified; zero where the parent
    /// has a zero chunk, or for an image with no parent) with the patch's pieces laid over
    /// them. Patches are taken in order, a bounded batch of chunks in memory at a time.
    pub fn write_patches(&mut self, patches: &[Patch<'_>]) -> Result<()> {
        const BATCH: usize = 32 << 20;
        let per_batch = (BATCH / self.geometry.chunk_size as usize).max(1);
        let fetcher = match &self.parent {
            Some((_, flat)) => Some(Fetcher::new(
                Layout::from_manifest(self.store.clone(), flat),
                None,
                RetryPolicy::default(),
                4 << 20,
            )),
            None => None,
        };
        for batch in patches.chunks(per_batch) {
            for p in batch {
                if p.chunk >= self.chunks.len() {
                    return Err(Error::ChunkOutOfRange {
                        index: p.chunk,
                        chunks: self.chunks.len(),
                    });
                }
            }
            let sink = Collect::default();
            if let Some(fetcher) = &fetcher {
                // A chunk the pieces cover whole needs nothing of the parent.
                let mut indices: Vec<usize> = batch
                    .iter()
                    .filter(|p| {
                        let r = self.geometry.chunk_range(p.chunk);
                        !covers(&p.pieces, (r.end - r.start) as usize)
                    })
                    .map(|p| p.chunk)
                    .collect();
                indices.sort_unstable();
                indices.dedup();
                self.runtime.block_on(fetcher.fetch(&indices, &sink));
                if let Some(e) = sink.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Err(e);
                }
            }
            let mut fetched = sink.chunks.into_inner().unwrap_or_else(|p| p.into_inner());
            for p in batch {
                let range = self.geometry.chunk_range(p.chunk);
                let len = (range.end - range.start) as usize;
                let mut data = fetched.remove(&p.chunk).unwrap_or_else(|| vec![0u8; len]);
                for (at, bytes) in &p.pieces {
                    let end = at.checked_add(bytes.len()).filter(|&e| e <= len).ok_or(
                        Error::ChunkLength {
                            index: p.chunk,
                            want: len,
                            got: at.saturating_add(bytes.len()),
                        },
                    )?;
                    data[*at..end].copy_from_slice(bytes);
                }
                self.write_chunk(p.chunk, &data)?;
            }
        }
        Ok(())
    }

    /// Names data chunk `data` in the new pack or where the store already has it.
    fn store_data(&mut self, digest: Digest, data: &[u8]) -> Result<Chunk> {
        let (pack, offset) = if let Some(&offset) = self.ours.get(&digest) {
            (self.pack_id, offset)
        } else if let Some(&at) = self.known.get(&digest) {
            at
        } else {
            let offset = self.report.uploaded_bytes;
            self.pending.extend_from_slice(data);
            if self.pending.len() >= PUT_BYTES {
                self.put_pending()?;
            }
            self.report.uploaded_bytes += data.len() as u64;
            self.ours.insert(digest, offset);
            (self.pack_id, offset)
        };
        let pack = *self.pack_index.entry(pack).or_insert_with(|| {
            self.packs.push(pack);
            (self.packs.len() - 1) as u32
        });
        Ok(Chunk::Data {
            digest,
            pack,
            offset,
        })
    }

    /// Hands the pending bytes to the pack upload.
    fn put_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = Bytes::from(std::mem::take(&mut self.pending));
        self.runtime
            .block_on(self.pack.put(bytes))
            .map_err(Error::store(
                "upload pack",
                self.store.pack_path(&self.pack_id),
            ))
    }

    /// Completes the pack, then writes the manifest. Chunks never written are inherited
    /// in a layer; an image with no parent must have had every chunk written.
    pub fn finish(mut self) -> Result<PushReport> {
        let missing: Vec<usize> = (0..self.chunks.len())
            .filter(|&i| self.chunks[i].is_none())
            .collect();
        if self.parent.is_none() {
            if let Some(&first) = missing.first() {
                return Err(Error::Incomplete {
                    name: self.name,
                    first,
                    more: missing.len() - 1,
                });
            }
        }
        let pack_path = self.store.pack_path(&self.pack_id);
        self.put_pending()?;
        if self.ours.is_empty() {
            let _ = self.runtime.block_on(self.pack.abort());
        } else {
            self.runtime
                .block_on(self.pack.shutdown())
                .map_err(Error::io("finish pack upload", &pack_path))?;
        }
        let chunks: Vec<Chunk> = self
            .chunks
            .iter()
            .map(|c| c.unwrap_or(Chunk::Inherited))
            .collect();
        let r = &mut self.report;
        // Chunks of the new pack named so far: the first naming is new, later ones repeats.
        let mut named = std::collections::HashSet::new();
        for (i, c) in chunks.iter().enumerate() {
            let len = self.geometry.chunk_range(i);
            match c {
                Chunk::Zero => r.zero_chunks += 1,
                Chunk::Inherited => r.inherited_chunks += 1,
                Chunk::Data { digest, .. } => {
                    r.data_bytes += len.end - len.start;
                    if !self.ours.contains_key(digest) {
                        r.existing_chunks += 1;
                    } else if named.insert(*digest) {
                        r.new_chunks += 1;
                    } else {
                        r.repeated_chunks += 1;
                    }
                }
            }
        }
        let parent = self.parent.map(|(p, _)| p);
        let manifest =
            Manifest::new(self.geometry, parent, self.packs, chunks).map_err(|source| {
                Error::Manifest {
                    name: self.name.clone(),
                    source,
                }
            })?;
        // Only after its pack is complete: a manifest never names a missing chunk.
        self.runtime
            .block_on(self.store.put_manifest(&self.name, &manifest))?;
        self.report.manifest = manifest;
        Ok(self.report)
    }
}

/// Adds every data chunk of `m` to the dedupe index.
fn index(known: &mut Known, m: &Manifest) {
    for c in m.chunks() {
        if let Chunk::Data {
            digest,
            pack,
            offset,
        } = *c
        {
            known
                .entry(digest)
                .or_insert((m.packs()[pack as usize], offset));
        }
    }
}

/// A chunk's changed bytes: pieces at offsets within the chunk (see
/// [`ImageWriter::write_patches`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patch<'a> {
    /// The chunk's index.
    pub chunk: usize,
    /// (offset in the chunk, new bytes there).
    pub pieces: Vec<(usize, &'a [u8])>,
}

/// Whether `pieces` cover `[0, len)` of a chunk entirely.
fn covers(pieces: &[(usize, &[u8])], len: usize) -> bool {
    let mut spans: Vec<(usize, usize)> = pieces
        .iter()
        .map(|(at, b)| (*at, at.saturating_add(b.len())))
        .collect();
    spans.sort_unstable();
    let mut reached = 0;
    for (start, end) in spans {
        if start > reached {
            return false;
        }
        reached = reached.max(end);
    }
    reached >= len
}

/// Gathers fetched chunks for a patch batch.
#[derive(Default)]
struct Collect {
    chunks: std::sync::Mutex<HashMap<usize, Vec<u8>>>,
    error: std::sync::Mutex<Option<Error>>,
}

impl Sink for Collect {
    fn deliver(&self, index: usize, data: &[u8]) {
        self.chunks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(index, data.to_vec());
    }

    fn fail(&self, _index: usize, error: Error) {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(error);
    }
}
