//! # snapshot: take memory snapshots while it runs, incrementally, and serve chains lazily
//!
//! - [`LiveSnapshot`]: a consistent snapshot of memory that keeps being written — of this
//!   process, or of another through the userfaultfd it handed over. Everything is
//!   write-protected in one go (the *cut*); workers save pages in the background; a write to
//!   a page not yet saved waits only until that page is saved (QEMU's background snapshot,
//!   with several threads). The result equals the memory at the cut.
//! - [`Chain`]: incremental snapshots after a full one, as layers in the chunked image
//!   format (`chunked`): only chunks written since the previous snapshot are stored, found
//!   with async write-protect and `PAGEMAP_SCAN` (uffd-core's [`DirtyTracker`]).
//!   `chunked` serves a layer straight from its chain.
//! - [`LayeredSource`]: a Firecracker diff-snapshot chain (sparse memory files) served as
//!   one image, without `rebase-snap`.
//! - [`dump`]: the stop-the-world baseline; [`workload`]: logged writers that measure the
//!   stalls a snapshot causes and check that it holds one consistent instant.
//!
//! ## Where it sits in the layers, and why
//!
//! Beside `pager` and `chunked`, above uffd-core and page-state, below `tools`; arrows
//! only point down, and nothing but the CLI depends on it.
//!
//! - Not in `pager`: the pager resolves *missing* faults by *placing* pages from a source;
//!   a snapshot resolves *write-protect* faults by *reading* pages out to a sink — another
//!   engine with other threads, priorities and failure rules. The pager needs none of it,
//!   and would otherwise pull in `chunked` (and its tokio runtime) for layers. The two meet
//!   only in [`LayeredSource`], a [`pager::Source`], and in restoring a layer, which is
//!   `chunked`'s job.
//! - Not in uffd-core: uffd-core knows nothing of pages' meaning. What a snapshot needs of
//!   the kernel went there — [`DirtyTracker`] (async write-protect + `PAGEMAP_SCAN`), lifted
//!   out of postcopy's migration source so that both use one tracker, and
//!   `Uffd::set_non_blocking` for a userfaultfd received from another process.
//! - Not in `postcopy`: a snapshot sends nothing anywhere; a live snapshot can feed a page
//!   server or an object store through its sink.
//! - Its state is page-state's [`Bitmap`](page_state::Bitmap)s (claimed, captured,
//!   written), shared lock-free by its fault handlers and savers.
//!
//! ```
//! use std::sync::Arc;
//! use snapshot::{LiveSnapshot, MemorySink, Region};
//! use uffd_core::{Mapping, MemoryKind};
//!
//! let memory = Mapping::new(MemoryKind::Anon, 256 * 4096)?;
//! let page = |i: usize| (memory.addr() + i * 4096) as *mut u64;
//! // SAFETY (example): pages of our own mapping.
//! unsafe { page(3).write_volatile(7) };
//! let sink = Arc::new(MemorySink::new(memory.len()));
//! // SAFETY: the mapping outlives the snapshot and no other userfaultfd is on it.
//! let live = unsafe {
//!     LiveSnapshot::builder()
//!         .region(Region::new(memory.addr(), memory.len(), MemoryKind::Anon, 0))
//!         .start(sink.clone())?
//! };
//! // The cut is taken: this write waits until page 3 is saved, and is not in the snapshot.
//! // SAFETY (example): as above.
//! unsafe { page(3).write_volatile(8) };
//! let report = live.finish()?;
//! assert_eq!(report.pages, 256);
//! assert_eq!(sink.to_vec()[3 * 4096], 7);
//! // SAFETY (example): as above.
//! assert_eq!(unsafe { page(3).read_volatile() }, 8);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`DirtyTracker`]: uffd_core::DirtyTracker

mod chain;
mod discard;
mod dump;
mod engine;
mod error;
mod events;
mod layered;
mod live;
mod memory;
mod region;
mod sink;
pub mod workload;

pub use chain::{Chain, LayerReport, Quiesce, QuiesceError, Stopped};
pub use dump::{dump, DumpReport};
pub use error::{Error, Result};
pub use layered::{LayeredSource, MergeReport};
pub use live::{LiveSnapshot, LiveSnapshotBuilder, SnapshotReport, DEFAULT_BATCH, DEFAULT_SPIN};
pub use region::Region;
pub use sink::{FileSink, MemorySink, PageSink};
