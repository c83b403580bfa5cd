//! [`Image`]: an image opened from a store (its manifest read and checked, and for a layer
//! its chain of parents resolved and flattened), to inspect, pull into a file, merge into a
//! new image, or serve to a pager as a [`ChunkedSource`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::cache::ChunkCache;
use crate::chain::Chain;
use crate::error::{ChainError, Error, Result};
use crate::fetch::{FetchStats, Fetcher, RetryPolicy, Sink};
use crate::layout::Layout;
use crate::manifest::{Chunk, Geometry, Manifest};
use crate::source::{ChunkedSource, SourceOptions};
use crate::store::{Store, StoreOptions};

/// An image in a store: a plain image, or a layer with its chain resolved.
#[derive(Debug)]
pub struct Image {
    store: Store,
    name: String,
    chain: Chain,
    flat: Manifest,
}

/// What a pull did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullReport {
    /// Image bytes written (zero chunks left as holes).
    pub bytes: u64,
    /// Fetching.
    pub fetch: FetchStats,
}

impl Image {
    /// Reads and checks the manifest at `url` and, for a layer, its parents down to the
    /// base (see [`Chain::resolve`]).
    pub fn open(url: &str, options: &StoreOptions) -> Result<Image> {
        let (store, name) = Store::for_image(url, options)?;
        crate::runtime()?.block_on(Image::open_in(store, name))
    }

    /// Opens image `name` of `store`.
    pub(crate) async fn open_in(store: Store, name: String) -> Result<Image> {
        let top = store.manifest(&name).await?;
        let chain = Chain::resolve(&store, &name, top).await?;
        let flat = chain.flatten();
        Ok(Image {
            store,
            name,
            chain,
            flat,
        })
    }

    /// The image's own manifest (for a layer: its changed chunks, the rest inherited).
    pub fn manifest(&self) -> &Manifest {
        self.chain.top()
    }

    /// The image as served: the chain folded into one manifest ([`Chain::flatten`]).
    pub fn flattened(&self) -> &Manifest {
        &self.flat
    }

    /// The chain: this image and its parents, top first (one layer for a plain image).
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// The image's name in its store.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves the image lazily to a pager, through `cache` if given. A layer is served
    /// straight from its chain: one lookup per fault at any depth, nothing merged first.
    pub fn source(
        &self,
        cache: Option<Arc<ChunkCache>>,
        options: SourceOptions,
    ) -> Result<ChunkedSource> {
        let layout = Layout::from_manifest(self.store.clone(), &self.flat);
        ChunkedSource::new(layout, cache, options)
    }

    /// Writes the flattened chain as a new image `name` in the same store root: a manifest
    /// with no parent naming the chunks where they already are (no chunk data is read or
    /// written). The result restores without reading any layer manifest.
    pub fn merge_into(&self, name: &str) -> Result<Manifest> {
        if self.chain.layers().iter().any(|(n, _)| n == name) {
            return Err(Error::Chain {
                layer: format!("{}{name}", self.store.url()),
                source: ChainError::Cycle(name.to_owned()),
            });
        }
        crate::runtime()?.block_on(self.store.put_manifest(name, &self.flat))?;
        Ok(self.flat.clone())
    }

    /// Writes the whole image to `path` (zero chunks as holes), every chunk verified:
    /// complete or absent. It is written to a new file of an unguessable name in `path`'s
    /// directory (0600, `O_EXCL`: see [`uffd_core::private_fs::create_temp_for`]), renamed
    /// to `path` once complete, removed on failure — a full-length file of holes would
    /// read as an image of zero pages.
    pub fn pull(
        &self,
        path: &Path,
        cache: Option<Arc<ChunkCache>>,
        retry: RetryPolicy,
        max_in_flight: usize,
    ) -> Result<PullReport> {
        let (file, temp) =
            uffd_core::private_fs::create_temp_for(path).map_err(|source| {
                Error::Private {
                    what: "create the pulled image",
                    source,
                }
            })?;
        let pulled = self
            .pull_into(file, &temp, cache, retry, max_in_flight)
            .and_then(|report| {
                std::fs::rename(&temp, path)
                    .map_err(Error::io("rename the pulled image to", path.display()))?;
                Ok(report)
            });
        if pulled.is_err() {
            if let Err(e) = std::fs::remove_file(&temp) {
                log::warn!("remove the partial pull {}: {e}", temp.display());
            }
        }
        pulled
    }

    /// Writes the whole image into `file`, new and empty, at `path` (for messages), every
    /// chunk verified; the caller renames it into place once this returns `Ok` (see
    /// [`pull`](Self::pull)).
    pub fn pull_into(
        &self,
        file: File,
        path: &Path,
        cache: Option<Arc<ChunkCache>>,
        retry: RetryPolicy,
        max_in_flight: usize,
    ) -> Result<PullReport> {
        let layout = Layout::from_manifest(self.store.clone(), &self.flat);
        let shown = path.display().to_string();
        file.set_len(self.flat.geometry().len)
            .map_err(Error::io("size", &shown))?;
        let fetcher = Arc::new(Fetcher::new(layout, cache, retry, 4 << 20));
        let sink = Arc::new(FileSink {
            file,
            geometry: self.flat.geometry(),
            error: Mutex::new(None),
        });
        let data: Vec<usize> = (0..self.flat.chunks().len())
            .filter(|&i| matches!(self.flat.chunks()[i], Chunk::Data { .. }))
            .collect();
        let per_read = (4 << 20) / self.flat.geometry().chunk_size as usize;
        let batches: Vec<Vec<usize>> = data
            .chunks(per_read.max(1))
            .map(<[usize]>::to_vec)
            .collect();
        crate::runtime()?.block_on(async {
            use futures::StreamExt;
            futures::stream::iter(batches)
                .for_each_concurrent(max_in_flight.max(1), |batch| {
                    let (f, s) = (fetcher.clone(), sink.clone());
                    async move {
                        f.fetch(&batch, &*s).await;
                    }
                })
                .await;
        });
        if let Some(e) = sink.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        sink.file.sync_all().map_err(Error::io("sync", &shown))?;
        Ok(PullReport {
            bytes: self.flat.geometry().len,
            fetch: fetcher.stats(),
        })
    }
}

/// Writes chunks where they belong in a file.
struct FileSink {
    file: File,
    geometry: Geometry,
    error: Mutex<Option<Error>>,
}

impl Sink for FileSink {
    fn deliver(&self, index: usize, data: &[u8]) {
        let at = self.geometry.chunk_range(index).start;
        if let Err(e) = self.file.write_all_at(data, at) {
            self.fail(index, Error::io("write", "pulled image")(e));
        }
    }

    fn fail(&self, _index: usize, error: Error) {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(error);
    }
}

/// Flattens the chain of the image at `top` into a new image `out` in the same store root
/// (see [`Image::merge_into`]: no chunk data is copied). For a raw file, use
/// [`Image::pull`].
pub fn merge(top: &str, out: &str, options: &StoreOptions) -> Result<Manifest> {
    let image = Image::open(top, options)?;
    let (store, name) = Store::for_image(out, options)?;
    if store.url() != image.store().url() {
        return Err(Error::Url {
            url: out.to_owned(),
            reason: format!(
                "a merged manifest names the chain's chunks where they are: it must be in the same store root as {top} ({})",
                image.store().url()
            ),
        });
    }
    image.merge_into(&name)
}

/// Serves a raw local image file through the chunked read path: large reads, many at
/// once, instead of one small read per fault.
pub fn file_source(
    path: &Path,
    page_size: u32,
    chunk_size: u32,
    options: SourceOptions,
) -> Result<ChunkedSource> {
    ChunkedSource::new(
        Layout::from_file(path, page_size, chunk_size)?,
        None,
        options,
    )
}
