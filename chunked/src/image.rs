//! [`Image`]: an image opened from a store (its manifest read and checked), to inspect,
//! pull into a file, or serve to a pager as a [`ChunkedSource`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::cache::ChunkCache;
use crate::error::{Error, Result};
use crate::fetch::{FetchStats, Fetcher, RetryPolicy, Sink};
use crate::layout::Layout;
use crate::manifest::{Chunk, Geometry, Manifest};
use crate::source::{ChunkedSource, SourceOptions};
use crate::store::{Store, StoreOptions};

/// An image in a store.
#[derive(Debug)]
pub struct Image {
    store: Store,
    name: String,
    manifest: Manifest,
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
    /// Reads and checks the manifest at `url`.
    pub fn open(url: &str, options: &StoreOptions) -> Result<Image> {
        let (store, name) = Store::for_image(url, options)?;
        let manifest = crate::runtime()?.block_on(store.manifest(&name))?;
        Ok(Image {
            store,
            name,
            manifest,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The image's name in its store.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves the image lazily to a pager, through `cache` if given.
    pub fn source(
        &self,
        cache: Option<Arc<ChunkCache>>,
        options: SourceOptions,
    ) -> Result<ChunkedSource> {
        let layout = Layout::from_manifest(self.store.clone(), &self.name, &self.manifest)?;
        ChunkedSource::new(layout, cache, options)
    }

    /// Writes the whole image to `path` (zero chunks as holes), every chunk verified.
    pub fn pull(
        &self,
        path: &Path,
        cache: Option<Arc<ChunkCache>>,
        retry: RetryPolicy,
        max_in_flight: usize,
    ) -> Result<PullReport> {
        let layout = Layout::from_manifest(self.store.clone(), &self.name, &self.manifest)?;
        let shown = path.display().to_string();
        let file = File::create(path).map_err(Error::io("create", &shown))?;
        file.set_len(self.manifest.geometry().len)
            .map_err(Error::io("size", &shown))?;
        let fetcher = Arc::new(Fetcher::new(layout, cache, retry, 4 << 20));
        let sink = Arc::new(FileSink {
            file,
            geometry: self.manifest.geometry(),
            error: Mutex::new(None),
        });
        let data: Vec<usize> = (0..self.manifest.chunks().len())
            .filter(|&i| matches!(self.manifest.chunks()[i], Chunk::Data { .. }))
            .collect();
        let per_read = (4 << 20) / self.manifest.geometry().chunk_size as usize;
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
            bytes: self.manifest.geometry().len,
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
