//! Pushing an image: cut a raw memory file into chunks and hand them to an
//! [`ImageWriter`], which stores only the chunks the store does not have (zero chunks
//! nowhere, and for a layer none its parent has at the same place), then the manifest.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::store::StoreOptions;
use crate::writer::ImageWriter;

/// The default chunk size (see the README's figures for why).
pub const DEFAULT_CHUNK_SIZE: u32 = 512 << 10;

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Page size of the memory the image is for (a layer takes its parent's).
    pub page_size: u32,
    /// Chunk size, a multiple of the page size (a layer takes its parent's).
    pub chunk_size: u32,
    /// Write a layer over this image (its name in the same store root): chunks equal to
    /// the parent chain's are inherited, not stored.
    pub parent: Option<String>,
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
            parent: None,
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
    /// Chunks a layer inherits from its parent (unchanged, or never written).
    pub inherited_chunks: u64,
    /// Bytes of the image's own non-zero chunks (a layer's inherited ones not counted).
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

/// Pushes raw image `file` to `url` (see [`crate::store`] for the layout); with
/// `options.parent`, as a layer over that image.
pub fn push(file: &Path, url: &str, options: &PushOptions) -> Result<PushReport> {
    let shown = file.display().to_string();
    let f = File::open(file).map_err(Error::io("open", &shown))?;
    let len = f.metadata().map_err(Error::io("stat", &shown))?.len();
    let mut writer = ImageWriter::create(url, len, options)?;
    let geometry = writer.geometry();
    let mut buf = vec![0u8; geometry.chunk_size as usize];
    for i in 0..geometry.chunk_count() as usize {
        let r = geometry.chunk_range(i);
        let data = &mut buf[..(r.end - r.start) as usize];
        f.read_exact_at(data, r.start)
            .map_err(Error::io("read", &shown))?;
        writer.write_chunk(i, data)?;
    }
    writer.finish()
}
