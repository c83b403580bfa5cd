//! # chunked: memory images in an object store, served lazily
//!
//! A fleet restoring the same snapshots on many hosts keeps them in object storage. This
//! crate stores an image as a [`Manifest`] plus content-addressed chunks (BLAKE3; identical
//! chunks stored once across images, all-zero chunks not at all) in any store the
//! `object_store` crate reaches — S3-compatible, GCS, Azure, HTTP, a local directory — and
//! serves it to a [`pager::Pager`] as a [`ChunkedSource`]: faults answer `Pending` at once,
//! chunks arrive by ranged reads (adjacent misses coalesced, many in flight), each verified
//! against its digest before any of its pages is placed, through a shared on-disk
//! [`ChunkCache`] per host. The same read path serves a raw local image file in large
//! parallel reads ([`file_source`]), which a cold page cache rewards.
//!
//! An image may be a *layer* (an incremental snapshot): its manifest names a parent and
//! holds only the chunks that changed. [`ImageWriter`] writes images and layers chunk by
//! chunk; [`Image::open`] resolves a layer's [`Chain`] and flattens it, so a chain is
//! served directly — one lookup per fault at any depth — and [`merge`] writes the
//! flattened chain as a plain image without copying chunk data.
//!
//! Why a crate of its own: `object_store` is async and needs a tokio runtime. The pager is
//! a synchronous engine a VMM embeds, and stays free of tokio; this crate owns its runtime
//! (a couple of threads) and meets the pager only through [`pager::Source`] and
//! [`pager::Placer`].
//!
//! ```
//! use std::sync::Arc;
//! use chunked::{push, Image, PushOptions, SourceOptions, StoreOptions};
//! use pager::{DeliveryMode, Pager, Prefetch};
//! use uffd_core::{Features, Mapping, MemoryKind, Uffd};
//!
//! // A 4 MiB image with a zero hole, pushed to a store in a local directory.
//! let dir = std::env::temp_dir().join(format!("chunked-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let raw = dir.join("mem.raw");
//! let image: Vec<u8> = (0..1024 * 4096).map(|i| if i < 2 << 20 { (i / 4096) as u8 } else { 0 }).collect();
//! std::fs::write(&raw, &image)?;
//! let url = format!("file://{}/store/vm1", dir.display());
//! let report = push(&raw, &url, &PushOptions::default())?;
//! assert_eq!(report.zero_chunks, 4); // 2 MiB of zeros: four 512 KiB chunks stored nowhere
//!
//! // Restore it lazily into fresh memory.
//! let source = Arc::new(Image::open(&url, &StoreOptions::default())?.source(None, SourceOptions::default())?);
//! let memory = Arc::new(Mapping::new(MemoryKind::Anon, image.len())?);
//! let uffd = Uffd::builder().non_blocking(true).require(Features::EVENT_REMOVE).open()?;
//! let pager = Pager::builder(uffd, source.clone())
//!     .mapping(memory.clone(), 0)
//!     .mode(DeliveryMode::Thread)
//!     .prefetch(Prefetch::None) // the source prefetches itself
//!     .start()?;
//! // SAFETY (example): the region is mapped and served by the pager.
//! let byte = unsafe { std::ptr::read_volatile(memory.as_ptr().add(5 * 4096)) };
//! assert_eq!(byte, 5);
//! pager.stop()?;
//! std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod hash;
pub mod manifest;

pub use hash::{BadDigest, Digest, HashAlgorithm};
pub use manifest::{Chunk, Geometry, Manifest, ManifestError, Parent, MAX_CHAIN_DEPTH};

/// Items of the `store` feature (on by default): all but the manifest codec.
macro_rules! with_store {
    ($($item:item)*) => { $( #[cfg(feature = "store")] $item )* };
}

with_store! {
    mod cache;
    mod chain;
    mod error;
    mod fetch;
    mod image;
    mod layout;
    mod options;
    mod push;
    mod source;
    mod store;
    mod writer;

    pub use cache::{CacheStats, ChunkCache};
    pub use chain::Chain;
    pub use error::{ChainError, Error, Result};
    pub use fetch::{FetchStats, RetryPolicy};
    pub use image::{file_source, merge, Image, PullReport};
    pub use layout::holes;
    pub use options::{Holes, PushOptions, PushReport, DEFAULT_CHUNK_SIZE};
    pub use push::push;
    pub use source::{Background, ChunkedSource, SourceOptions, SourceStats};
    pub use store::{Store, StoreOptions};
    pub use writer::{ImageWriter, Patch};

    /// A runtime for one blocking call into the async store (push, pull, open).
    fn runtime() -> Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("chunked")
            .enable_all()
            .build()
            .map_err(Error::io("start a runtime", "tokio"))
    }
}
