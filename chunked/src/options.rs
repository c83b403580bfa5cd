//! What a push is told ([`PushOptions`], [`Holes`]) and what it reports ([`PushReport`]):
//! the inputs and output of an [`ImageWriter`](crate::ImageWriter), which
//! [`push`](crate::push()) drives, owned here below both.

use crate::store::StoreOptions;
use crate::manifest::Manifest;

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
    /// What the input file's holes mean (matters for a layer only).
    pub holes: Holes,
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
            holes: Holes::default(),
            store: StoreOptions::default(),
        }
    }
}

/// What the holes of a sparse input file mean (`SEEK_HOLE`: ranges the file system
/// allocated nothing for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Holes {
    /// Unsaid: a layer from a sparse file is refused ([`Error::SparseLayer`](crate::Error::SparseLayer)); an image
    /// with no parent reads its holes as zeros, as the file does.
    #[default]
    Refuse,
    /// Zeros, as the file reads (a full memory file copied sparse).
    Zero,
    /// Unchanged since the parent (a Firecracker diff snapshot): the layer holds the file's
    /// data only, and every page in a hole is the parent's.
    Inherit,
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
