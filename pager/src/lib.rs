//! # pager: serve a process's memory on demand
//!
//! A [`Pager`] owns a userfaultfd and a set of regions, and resolves every fault on them
//! from a [`Source`]: a local image answers at once; a remote source is asked and answers
//! later through a [`Placer`], while the fault loop goes on serving other pages. A
//! lock-free page state map (from `page-state`) decides each fault: ask the source once,
//! never twice; only wake when the page is already there; place a zero page locally when
//! it is known zero.
//!
//! Why userfaultfd rather than a `MAP_PRIVATE` mapping of the image: the image may not be
//! a local file (a migration source, a page server), pages can be fetched in the order
//! the workload needs them with a background stream for the rest, and the pager sees
//! every fault, which is what lazy restore and post-copy migration need to measure.
//!
//! ```
//! use std::sync::Arc;
//! use pager::{DeliveryMode, MemorySource, Pager, RegionSpec};
//! use uffd_core::{Features, Mapping, MemoryKind, Uffd};
//!
//! let image: Vec<u8> = (0..64 * 4096).map(|i| (i / 4096) as u8).collect();
//! let memory = Mapping::new(MemoryKind::Anon, image.len())?;
//! let uffd = Uffd::builder().non_blocking(true).require(Features::EVENT_REMOVE).open()?;
//! let pager = Pager::builder(uffd, Arc::new(MemorySource::new(image)))
//!     .region(RegionSpec::new(memory.addr(), memory.len(), MemoryKind::Anon, 0))
//!     .mode(DeliveryMode::Thread)
//!     .start()?;
//! // Touching page 5 faults; the pager copies it in.
//! // SAFETY (example): the region is mapped and served by the pager.
//! let byte = unsafe { std::ptr::read_volatile(memory.as_ptr().add(5 * 4096)) };
//! assert_eq!(byte, 5);
//! let stats = pager.stop()?;
//! assert_eq!(stats.placed_fault, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod engine;
mod error;
pub mod firecracker;
mod pager;
mod prefetch;
pub mod record;
mod region;
mod sigbus;
mod source;
mod stats;
mod worker;

pub use engine::{Placed, Placer};
pub use error::{Error, Result, SourceError};
pub use pager::{pin_to_cpu, DeliveryMode, Pager, PagerBuilder};
pub use prefetch::Prefetch;
pub use region::{PageRef, Region, RegionSpec, RegionTable, Resolve};
pub use source::{Fetched, FileSource, MemorySource, Source, ZeroSource};
pub use stats::{bucket, histogram_lines, latency_quantile, Stats, StatsSnapshot, BUCKETS};
