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
//! [`Features`], [`UserMode`] — a VMM asks for [`UserMode::KernelFaults`], since KVM
//! touches guest memory from the kernel — [`Mapping`], [`MemoryKind`]) and [`PageState`].
//!
//! ```
//! use std::sync::Arc;
//! use pager::{DeliveryMode, Features, Mapping, MemoryKind, MemorySource, Pager, Uffd};
//!
//! let image: Vec<u8> = (0..64 * 4096).map(|i| (i / 4096) as u8).collect();
//! let memory = Arc::new(Mapping::new(MemoryKind::Anon, image.len())?);
//! let uffd = Uffd::builder().non_blocking(true).require(Features::EVENT_REMOVE).open()?;
//! let pager = Pager::builder(uffd, Arc::new(MemorySource::new(image)))
//!     .mapping(memory.clone(), 0) // safe: the pager keeps the mapping alive
//!     .mode(DeliveryMode::Thread)
//!     .start()?;
//! // Touching page 5 faults; the pager copies it in.
//! // SAFETY (example): the mapping is served by the pager.
//! let byte = unsafe { std::ptr::read_volatile(memory.as_ptr().add(5 * 4096)) };
//! assert_eq!(byte, 5);
//! let stats = pager.stop()?;
//! assert_eq!(stats.placed_fault, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Safety: what an embedder promises
//!
//! A pager writes pages into memory: into its regions (`UFFDIO_COPY`, `ZEROPAGE`,
//! `CONTINUE`, `POISON`), from its fault handlers, its prefetcher, every
//! [`Placer`] and the engines of forked children — and, for a region resolved in MINOR
//! mode, into its alias mapping in this process. So memory named by address is given
//! under one contract, stated once, on [`PagerBuilder::region`] and
//! [`PagerBuilder::regions`] (both `unsafe`):
//!
//! - until the pager, its placers and its children's engines are gone, each region's
//!   range, in the address space the userfaultfd serves, is memory whose content the
//!   pager decides: nothing relies on its bytes through references (only raw reads that
//!   accept what the pager places), and it is not unmapped or moved without the pager
//!   being told (UNMAP / REMAP events) or stopped first;
//! - a MINOR region's alias is a writable shared mapping, in this process, of the
//!   region's own file at the same offsets, used for nothing else. The pager checks what
//!   it can (`/proc/self/maps`: a shared file mapping, of the region's file and offsets
//!   when the region is mapped here too, overlapping no region) and refuses the rest.
//!
//! Memory the pager can check itself takes no promise: [`PagerBuilder::mapping`] and
//! [`PagerBuilder::mapping_minor`] take an `Arc<Mapping>`, keep it alive, and make the
//! alias themselves (with a userfaultfd opened in this process: an adopted one, which may
//! serve another process, is refused). The Firecracker handshake (module `firecracker`, feature `firecracker`)
//! serves memory of another process, named by that process.
//!
//! ## When something fails
//!
//! Nothing fails silently. A fatal error — a source failure, a panic in any pager thread,
//! the uffd in error (POLLERR/POLLHUP), a placement or wake the kernel refuses, a pin to a
//! CPU that fails — stops the pager, and every page not yet placed is **poisoned**
//! (`UFFDIO_POISON`, Linux 6.6): a later touch raises SIGBUS, even after the uffd is
//! closed, rather than reading zeros ([`PagerBuilder::poison_on_fatal`]); then the regions
//! are let go (unregistered, the queued events read), so the workload's `madvise`,
//! `munmap`, `mremap` or `fork` never waits on the stopped pager. The embedder
//! learns it without polling ([`Pager::wait`], or [`Pager::stopped_fd`] in its event loop)
//! and gets the error from [`Pager::stop`]. A forked child is served or refused as its
//! source says ([`Source::child`]), never left blocked; a refusal is counted, logged, and
//! the child's missing pages poisoned.
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
//! 4. `placer.rs` — arrivals from a remote source take the same path from any thread
//!    (`arrival.rs` is the engine's side of the handle; `helper.rs` lends a receiver a
//!    second thread to land a long run in pieces);
//!    `prefetch.rs` pushes the rest in the background; `sigbus.rs` resolves faults inside
//!    the faulting thread instead, async-signal-safe; `fork.rs` serves forked children,
//!    whose faults on shared memory their parent's engine decides (`parent.rs`). Who
//!    waits on a page in flight sleeps until the engine rings its bell (`bell.rs`).
//! 5. `shared.rs` — a fatal error settles the stop: poison what is not placed
//!    (`poison.rs`), let go of the regions (`release.rs`), then tell the embedder
//!    (`stopped_fd`). `maps.rs` checks
//!    a MINOR region's alias; `seeded.rs` checks a seeded map's Received pages are in
//!    memory.
//!
//! The state they share is in `shared.rs`; regions in `region.rs`; counters in
//! `stats.rs` and `histogram.rs`.

mod arrival;
mod bell;
mod builder;
mod cpu;
mod error;
mod events;
mod fault;
#[cfg(feature = "firecracker")]
pub mod firecracker;
mod fork;
mod gate;
mod helper;
mod histogram;
#[cfg(feature = "fault-injection")]
#[doc(hidden)]
pub mod inject;
mod maps;
mod pager;
mod parent;
mod place;
mod placer;
mod poison;
mod prefetch;
pub mod record;
mod region;
mod release;
mod seeded;
mod shared;
mod sigbus;
mod signal_safe;
mod sigsafe;
mod source;
mod states;
mod stats;
mod sync;
mod thread;
mod worker;

pub use builder::PagerBuilder;
pub use cpu::pin_to_cpu;
pub use error::{Error, Result, SourceError};
pub use helper::Helper;
pub use histogram::{AtomicLatencyHistogram, LatencyHistogram};
pub use pager::{DeliveryMode, Pager};
pub use placer::{Placed, Placer};
pub use prefetch::Prefetch;
pub use region::{RegionSpec, Resolve};
pub use signal_safe::SignalSafe;
pub use sigsafe::in_fault_handler;
pub use source::{is_zero, ChildSource, Fetched, FileSource, MemorySource, Source, ZeroSource};
pub use states::PageStates;
pub use stats::StatsSnapshot;

pub use page_state::{PageState, PageStateMap};
pub use uffd_core::{Features, Mapping, MemoryKind, Uffd, UserMode};
