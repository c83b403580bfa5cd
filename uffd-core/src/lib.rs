//! # uffd-core: the Linux userfaultfd interface, complete and typed
//!
//! `userfaultfd(2)` lets a process serve page faults on memory it registers: a fault on
//! a missing (or write-protected, or minor) page parks the faulting thread and queues an
//! event; a handler reads the event and resolves it with an ioctl that places a page
//! (copy, zeropage, continue, move, poison) and wakes the thread.
//!
//! This crate maps each kernel call to one method:
//!
//! | kernel | here | since |
//! |---|---|---|
//! | `/dev/userfaultfd`, `userfaultfd(2)` | [`UffdBuilder::open`] | 6.1 / 4.3 |
//! | `UFFDIO_API` | [`Uffd::api`], [`probe()`] | 4.3 |
//! | `UFFDIO_REGISTER` / `UNREGISTER` | [`Uffd::register`], [`Uffd::unregister`] | 4.3 |
//! | `UFFDIO_WAKE` | [`Uffd::wake`] | 4.3 |
//! | `UFFDIO_COPY` | [`Uffd::copy`] | 4.3 |
//! | `UFFDIO_ZEROPAGE` | [`Uffd::zeropage`] | 4.3 |
//! | `UFFDIO_WRITEPROTECT` | [`Uffd::write_protect`] | 5.7 |
//! | `UFFDIO_CONTINUE` | [`Uffd::continue_range`] | 5.13 |
//! | `UFFDIO_POISON` | [`Uffd::poison`] | 6.6 |
//! | `UFFDIO_MOVE` | [`Uffd::move_pages`] | 6.8 |
//! | `PAGEMAP_SCAN` (dirty tracking with `WP_ASYNC`) | [`Pagemap::scan`], [`DirtyTracker`] | 6.7 |
//! | `read(2)` of `uffd_msg` | [`Uffd::read_events`] → [`Event`] | 4.3 |
//! | `SCM_RIGHTS` | [`send_fds`], [`recv_fds`] | |
//!
//! Errors a pager must act on have their own [`Error`] variant: `Exists` (wake and move
//! on), `Again { done }` (read pending events, retry), `ProcessGone`, `RangeGone`.
//!
//! ## Example: serve one missing fault
//!
//! ```
//! use uffd_core::{CopyMode, Event, EventBuffer, Mapping, MemoryKind, ReadStatus, RegisterMode, Uffd};
//!
//! let uffd = Uffd::builder().open()?;
//! let region = Mapping::new(MemoryKind::Anon, 4096)?;
//! uffd.register(region.addr(), region.len(), RegisterMode::MISSING)?;
//!
//! let addr = region.addr();
//! let reader = std::thread::spawn(move || {
//!     // SAFETY (example): the page is registered and served below.
//!     unsafe { std::ptr::read_volatile(addr as *const u8) }
//! });
//!
//! let mut events = EventBuffer::new(16);
//! assert_eq!(uffd.read_events(&mut events)?, ReadStatus::Events(1));
//! let Event::Pagefault { addr: fault, .. } = events.events()[0] else { panic!() };
//! let page = [42u8; 4096];
//! // SAFETY: `fault` is a missing page of a region registered with `uffd`, which no code
//! // expects to read as zero.
//! unsafe { uffd.copy(fault & !4095, &page, CopyMode::empty())? };
//! assert_eq!(reader.join().unwrap(), 42);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
pub mod dirty;
pub mod error;
pub mod event;
pub mod fd_passing;
pub mod features;
pub mod ioctl;
pub mod mapping;
pub mod open;
pub mod pagemap;
pub mod private_fs;
pub mod probe;
pub mod register;
pub mod sys;

pub use api::ApiInfo;
pub use dirty::DirtyTracker;
pub use error::{Error, Op, Result};
pub use event::{Event, EventBuffer, FaultFlags, ReadStatus};
pub use fd_passing::{peer_credentials, recv_fds, send_fds, PeerCredentials, Received};
pub use features::{Features, Ioctls};
pub use ioctl::{ContinueMode, CopyMode, MoveMode, PoisonMode, WriteProtectMode, ZeropageMode};
pub use mapping::{hugetlb, Mapping, MemoryKind, HUGE_PAGE_SIZE};
pub use open::{OpenPath, PathPolicy, Uffd, UffdBuilder, UserMode};
pub use pagemap::{PageCategories, PageRegion, Pagemap, ScanFlags, ScanQuery};
pub use probe::{probe, KindProbe, ModeProbe, PathProbe, Probe, MODE_COMBINATIONS};
pub use register::{page_size, RegisterMode};
