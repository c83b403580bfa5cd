//! The placement handle for remote sources: pages that arrive later, on a thread of the
//! source's own, are placed through a cloneable [`Placer`] with the same rules as the
//! fault path (gate, removed pages as zeros, EEXIST, EAGAIN retried).
//!
//! The handle sits below the engine: a [`Source`](crate::Source) is handed a placer, and the
//! engine holds its source, so the placer reaches the engine only through the [`Engine`]
//! trait defined here (the engine implements it in `arrival.rs`).

use std::marker::PhantomData;
use std::sync::Weak;

use page_state::PageState;

use crate::error::{Result, SourceError};
use crate::states::PageStates;

/// What a placer needs of the engine that placed it: the arrival path, the failure
/// report and the page states.
pub(crate) trait Engine: Send + Sync {
    /// See [`Placer::place`].
    fn place_arrival(&self, offset: u64, data: Option<&[u8]>) -> Result<Placed>;
    /// See [`Placer::place_run`] and [`Placer::place_zero_run`].
    fn place_arrivals(&self, offset: u64, run: Run<'_>) -> Result<Option<usize>>;
    /// Whether pages may be moved out of `data`: whole pages, in no region of this pager
    /// (see [`Placer::place_run_moving`]).
    fn may_move_from(&self, data: &[u8]) -> bool;
    /// See [`Placer::fail`].
    fn fail_source(&self, error: SourceError);
    /// The page states, read-only.
    fn page_states(&self) -> PageStates<'_>;
}

/// An arriving run of whole pages: their bytes, `len` bytes known to be zero, or
/// `len` bytes of whole pages at an address that the caller gives up (moved into place
/// where they can be: [`Placer::place_run_moving`]).
#[derive(Clone, Copy)]
pub(crate) enum Run<'a> {
    Data(&'a [u8]),
    Zeros(usize),
    Moving {
        /// First byte, page aligned.
        at: usize,
        len: usize,
        /// The caller's exclusive borrow of the pages, for as long as the run is placed.
        borrow: PhantomData<&'a mut [u8]>,
    },
}

impl<'a> Run<'a> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Run::Data(d) => d.len(),
            Run::Zeros(len) | Run::Moving { len, .. } => *len,
        }
    }

    /// Page `i` of `ps` bytes: its data, or `None` for zeros (as [`Placer::place`] takes it).
    /// For a moving run: what the page holds now (zeros once it was moved out; a page
    /// moved out was placed, and is a duplicate for whoever places it again).
    pub(crate) fn page(&self, i: usize, ps: usize) -> Option<&'a [u8]> {
        match *self {
            Run::Data(d) => Some(&d[i * ps..(i + 1) * ps]),
            Run::Zeros(_) => None,
            Run::Moving { at, .. } => {
                // SAFETY: page `i` lies in the pages the caller lent exclusively for `'a`;
                // they stay mapped (a page moved out reads zeros), and nothing moves a
                // page out of them while a slice given here is in use: moves happen only
                // inside a placement of the run's own `Content::Move`, never of data read
                // from it.
                Some(unsafe { std::slice::from_raw_parts((at + i * ps) as *const u8, ps) })
            }
        }
    }
}

/// A cloneable handle through which any thread places pages that arrive from a remote
/// source. Addresses are found from the image offset; page states and stats are kept.
///
/// It holds the engine weakly: a remote source's thread keeping a placer does not keep
/// the pager (and its userfaultfd) alive once the [`Pager`](crate::Pager) is gone.
#[derive(Clone)]
pub struct Placer {
    engine: Weak<dyn Engine>,
}

impl std::fmt::Debug for Placer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placer").finish_non_exhaustive()
    }
}

/// What [`Placer::place`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The page is in memory and its waiters woken.
    Placed,
    /// It was already received; nothing done (a duplicate arrival).
    Duplicate,
    /// No mapped region holds this offset (unmapped meanwhile, or out of range).
    NoRegion,
    /// The pager is stopping or the process is gone.
    Stopped,
}

impl Placer {
    /// A placer for `engine`, held weakly.
    pub(crate) fn new(engine: Weak<dyn Engine>) -> Placer {
        Placer { engine }
    }

    /// Places the page at image offset `offset` (page aligned) with `data` (one page), or
    /// a zero page when `data` is `None`. Retries while the address space is changing.
    pub fn place(&self, offset: u64, data: Option<&[u8]>) -> Result<Placed> {
        match self.engine.upgrade() {
            Some(engine) => engine.place_arrival(offset, data),
            None => Ok(Placed::Stopped),
        }
    }

    /// Places a run of arriving pages, `data` being whole pages from image offset `offset`,
    /// with one ioctl per stretch of pages still to be placed (Missing or Requested);
    /// received pages are skipped, known-zero ones get zeros (as in [`place`]), pages no
    /// mapped region holds (unmapped meanwhile) are skipped. Returns how many pages were
    /// placed, or `None` if the pager is gone or stopping.
    ///
    /// [`place`]: Placer::place
    pub fn place_run(&self, offset: u64, data: &[u8]) -> Result<Option<usize>> {
        match self.engine.upgrade() {
            Some(engine) => engine.place_arrivals(offset, Run::Data(data)),
            None => Ok(None),
        }
    }

    /// Places a run of arriving pages like [`place_run`](Placer::place_run), taking them
    /// from `data` by moving them (`UFFDIO_MOVE`) rather than copying where it can: the
    /// receiving side of a zero-copy transfer, which reads pages straight into memory of
    /// its own and then gives that memory up. Moving needs whole pages of private
    /// anonymous memory on both sides (a region of `MemoryKind::Anon`, `data` page aligned
    /// and in no region of this pager), a userfaultfd opened with
    /// [`Features::MOVE`](uffd_core::Features::MOVE), and pages of `data` that are this
    /// process's alone (not shared with a forked child); 2 MiB-aligned stretches of
    /// transparent huge pages move whole. Whatever cannot move — or the kernel refuses to
    /// — is copied, as `place_run` would. Pages already present are not placed again.
    ///
    /// Afterwards `data` holds unspecified bytes: every page moved out of it reads zeros
    /// (and takes a fresh page when written). Returns how many pages were placed
    /// ([`StatsSnapshot::placed_moved`](crate::StatsSnapshot::placed_moved) of them by
    /// moving), or `None` if the pager is gone or stopping.
    pub fn place_run_moving(&self, offset: u64, data: &mut [u8]) -> Result<Option<usize>> {
        let Some(engine) = self.engine.upgrade() else {
            return Ok(None);
        };
        let run = if engine.may_move_from(data) {
            Run::Moving {
                at: data.as_mut_ptr() as usize,
                len: data.len(),
                borrow: PhantomData,
            }
        } else {
            Run::Data(data)
        };
        engine.place_arrivals(offset, run)
    }

    /// Places a run of `len` bytes of zero pages from image offset `offset` (a run the
    /// source knows is all zeros), as [`place_run`] places data: one ioctl
    /// (`UFFDIO_ZEROPAGE`, or a copy of zeros where the kernel has no zero page for the
    /// memory) per stretch of pages still to be placed, so a thread waiting in the run is
    /// woken once for all of it. Returns how many pages were placed, or `None` if the pager
    /// is gone or stopping.
    ///
    /// [`place_run`]: Placer::place_run
    pub fn place_zero_run(&self, offset: u64, len: usize) -> Result<Option<usize>> {
        match self.engine.upgrade() {
            Some(engine) => engine.place_arrivals(offset, Run::Zeros(len)),
            None => Ok(None),
        }
    }

    /// Reports that a remote source can no longer deliver pages it answered
    /// [`Fetched::Pending`](crate::Fetched::Pending) for (retries exhausted, data that failed
    /// verification): the pager records the error, stops, poisons every page not yet
    /// placed (unless told not to: the faulting threads get SIGBUS, never zeros), tells
    /// the embedder ([`Pager::wait`](crate::Pager::wait)) and returns the error from
    /// [`Pager::stop`](crate::Pager::stop).
    pub fn fail(&self, error: SourceError) {
        if let Some(engine) = self.engine.upgrade() {
            engine.fail_source(error);
        }
    }

    /// Runs `f` on a read-only view of the page states (what a remote source reports when
    /// it reconnects: the present set, the pages still Requested); `None` once the pager
    /// is gone.
    pub fn states<R>(&self, f: impl FnOnce(PageStates<'_>) -> R) -> Option<R> {
        let engine = self.engine.upgrade()?;
        Some(f(engine.page_states()))
    }

    /// Whether page `page` (index in the state map) is still to be placed; `None` once
    /// the pager is gone.
    pub fn state(&self, page: usize) -> Option<PageState> {
        self.engine.upgrade()?.page_states().get(page)
    }
}
