//! Pushing an image: cut a raw memory file into chunks, name each by its digest, store
//! only the chunks the store does not have (zero chunks nowhere), then the manifest.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use object_store::buffered::BufWriter;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};
use crate::hash::Digest;
use crate::manifest::{Chunk, Geometry, Manifest};
use crate::store::{Store, StoreOptions};

/// The default chunk size (see the README's figures for why).
pub const DEFAULT_CHUNK_SIZE: u32 = 512 << 10;

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Page size of the memory the image is for.
    pub page_size: u32,
    /// Chunk size (a multiple of the page size).
    pub chunk_size: u32,
    /// Deduplicate against every manifest already in the store root.
    pub dedupe_with_store: bool,
    /// Network timeouts.
    pub store: StoreOptions,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self {
            page_size: 4096,
            chunk_size: DEFAULT_CHUNK_SIZE,
            dedupe_with_store: true,
            store: StoreOptions::default(),
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// Chunks in the image.
    pub chunks: u64,
    /// All-zero chunks (stored nowhere).
    pub zero_chunks: u64,
    /// Data chunks found earlier in the same image.
    pub repeated_chunks: u64,
    /// Data chunks the store already had (from other images).
    pub existing_chunks: u64,
    /// Chunks uploaded.
    pub new_chunks: u64,
    /// Bytes of non-zero chunks in the image.
    pub data_bytes: u64,
    /// Bytes uploaded (the new pack).
    pub uploaded_bytes: u64,
    /// Manifests deduplicated against.
    pub manifests_indexed: usize,
}

impl PushReport {
    /// Data bytes per byte uploaded (∞ when nothing new was stored is reported as the data
    /// bytes themselves over one).
    pub fn dedupe_ratio(&self) -> f64 {
        self.data_bytes as f64 / self.uploaded_bytes.max(1) as f64
    }
}

/// Where an existing chunk lives.
type Known = HashMap<Digest, (Digest, u64)>;

/// Pushes raw image `file` to `url` (see [`crate::store`] for the layout).
pub fn push(file: &Path, url: &str, options: &PushOptions) -> Result<PushReport> {
    let runtime = crate::runtime()?;
    let (store, name) = Store::for_image(url, &options.store)?;
    runtime.block_on(push_async(file, &store, &name, options))
}

async fn push_async(
    path: &Path,
    store: &Store,
    name: &str,
    options: &PushOptions,
) -> Result<PushReport> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(Error::io("open", &shown))?;
    let len = file.metadata().map_err(Error::io("stat", &shown))?.len();
    let geometry = Geometry {
        page_size: options.page_size,
        chunk_size: options.chunk_size,
        len,
    };
    geometry
        .validate()
        .map_err(|e| Error::Geometry(format!("{shown}: {e}")))?;
    let mut known = Known::new();
    let mut manifests_indexed = 0;
    if options.dedupe_with_store {
        for (_, m) in store.manifests(name).await? {
            manifests_indexed += 1;
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
    }
    // The new pack's name: unique per push (a retry of the same push writes a new pack).
    let pack_id = Digest::of(
        format!(
            "{name}:{}:{}:{:?}",
            std::process::id(),
            len,
            std::time::SystemTime::now()
        )
        .as_bytes(),
    );
    let pack_path = store.pack_path(&pack_id);
    let mut writer =
        BufWriter::with_capacity(Arc::clone(store.objects()), pack_path.clone(), 8 << 20)
            .with_max_concurrency(4);
    let mut report = PushReport {
        manifest: Manifest::new(
            geometry,
            None,
            vec![],
            vec![Chunk::Zero; geometry.chunk_count() as usize],
        )
        .map_err(|source| Error::Manifest {
            name: name.to_owned(),
            source,
        })?,
        chunks: geometry.chunk_count(),
        zero_chunks: 0,
        repeated_chunks: 0,
        existing_chunks: 0,
        new_chunks: 0,
        data_bytes: 0,
        uploaded_bytes: 0,
        manifests_indexed,
    };
    let mut packs: Vec<Digest> = Vec::new();
    let mut pack_index: HashMap<Digest, u32> = HashMap::new();
    let mut ours: HashMap<Digest, u64> = HashMap::new();
    let mut chunks = Vec::with_capacity(report.chunks as usize);
    let mut buf = vec![0u8; options.chunk_size as usize];
    for i in 0..report.chunks as usize {
        let r = geometry.chunk_range(i);
        let data = &mut buf[..(r.end - r.start) as usize];
        file.read_exact_at(data, r.start)
            .map_err(Error::io("read", &shown))?;
        if data.iter().all(|&b| b == 0) {
            report.zero_chunks += 1;
            chunks.push(Chunk::Zero);
            continue;
        }
        report.data_bytes += data.len() as u64;
        let digest = Digest::of(data);
        let mut index_of = |pack: Digest| -> u32 {
            *pack_index.entry(pack).or_insert_with(|| {
                packs.push(pack);
                (packs.len() - 1) as u32
            })
        };
        let (pack, offset) = if let Some(&offset) = ours.get(&digest) {
            report.repeated_chunks += 1;
            (index_of(pack_id), offset)
        } else if let Some(&(pack, offset)) = known.get(&digest) {
            report.existing_chunks += 1;
            (index_of(pack), offset)
        } else {
            let offset = report.uploaded_bytes;
            writer
                .put(Bytes::copy_from_slice(data))
                .await
                .map_err(Error::store("upload pack", &pack_path))?;
            report.uploaded_bytes += data.len() as u64;
            report.new_chunks += 1;
            ours.insert(digest, offset);
            (index_of(pack_id), offset)
        };
        chunks.push(Chunk::Data {
            digest,
            pack,
            offset,
        });
    }
    if report.new_chunks > 0 {
        writer
            .shutdown()
            .await
            .map_err(|e| Error::io("finish pack upload", &pack_path)(e))?;
    } else {
        let _ = writer.abort().await;
    }
    let manifest =
        Manifest::new(geometry, None, packs, chunks).map_err(|source| Error::Manifest {
            name: name.to_owned(),
            source,
        })?;
    // Only after its pack is complete: a manifest never names a missing chunk.
    store.put_manifest(name, &manifest).await?;
    report.manifest = manifest;
    Ok(report)
}
