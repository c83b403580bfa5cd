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
//! a local file (a migration source, a page server, an object store), pages can be
//! fetched in the order the workload needs them with a background stream for the rest,
//! and the pager sees every fault, which is what lazy restore and post-copy migration
//! need to measure.
//!
//! This crate is all an embedder needs: it re-exports the kernel types ([`Uffd`],
//! [`Features`], [`Mapping`], [`MemoryKind`]) and [`PageState`].
//!
//! ```
//! use std::sync::Arc;
//! use pager::{DeliveryMode, Features, Mapping, MemoryKind, MemorySource, Pager, RegionSpec, Uffd};
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
//!
//! ## Where a fault goes
//!
//! 1. `worker.rs` — a handler thread (one, busy-polling, or one per CPU) polls the uffd,
//!    closes the gate, reads a batch of events, applies the address-space events
//!    (`events.rs`: REMOVE, UNMAP, REMAP, FORK) and opens the gate again.
//! 2. `fault.rs` — each fault asks the page-state map: the first fault on a missing page
//!    fetches it from the source; a page someone else asked for is watched; a placed page
//!    is only woken (or, if it was dropped since, put back as zeros); a known-zero page
//!    gets a zero page. Fault-around places the next pages too.
//! 3. `place.rs` — the placement: inside the gate (`gate.rs`, which orders placements
//!    against the reading of REMOVE events), decide the content (a dropped page gets
//!    zeros), one ioctl, then count and publish Received. EEXIST wakes; EAGAIN parks the
//!    fault for a retry once the pending events are read.
//! 4. `placer.rs` — arrivals from a remote source take the same path from any thread;
//!    `prefetch.rs` pushes the rest in the background; `sigbus.rs` resolves faults inside
//!    the faulting thread instead, async-signal-safe; `fork.rs` serves forked children.
//!
//! The state they share is in `shared.rs`; regions in `region.rs`; counters in
//! `stats.rs` and `histogram.rs`.

mod builder;
mod cpu;
mod error;
mod events;
mod fault;
#[cfg(feature = "firecracker")]
pub mod firecracker;
mod fork;
mod gate;
mod histogram;
mod pager;
mod place;
mod placer;
mod prefetch;
pub mod record;
mod region;
mod shared;
mod sigbus;
mod sigsafe;
mod source;
mod stats;
mod sync;
mod worker;

pub use builder::PagerBuilder;
pub use cpu::pin_to_cpu;
pub use error::{Error, Result, SourceError};
pub use histogram::{AtomicLatencyHistogram, LatencyHistogram};
pub use pager::{DeliveryMode, PageStates, Pager};
pub use placer::{Placed, Placer};
pub use prefetch::Prefetch;
pub use region::{RegionSpec, Resolve};
pub use sigsafe::in_fault_handler;
pub use source::{Fetched, FileSource, MemorySource, Source, ZeroSource};
pub use stats::StatsSnapshot;

pub use page_state::{PageState, PageStateMap};
pub use uffd_core::{Features, Mapping, MemoryKind, Uffd};
