//! # page-state: the lock-free 2-bit page state map
//!
//! A demand pager must know, for every page, whether it is still missing, already asked
//! of the source, placed, or known to be zero — and many threads ask at once: faults,
//! arriving pages, the background stream. This crate keeps that as 2 bits per page,
//! 32 pages per `AtomicU64`, with no locks. It knows nothing of userfaultfd.
//!
//! | value | state | meaning |
//! |---|---|---|
//! | 0 | [`Missing`](PageState::Missing) | not yet received or requested |
//! | 1 | [`Requested`](PageState::Requested) | asked of the source; later faults must not ask again |
//! | 2 | [`Received`](PageState::Received) | placed in memory; a fault here only needs a wake |
//! | 3 | [`Zero`](PageState::Zero) | known zero: place a zero page locally, never fetch |
//!
//! Allowed transitions — everything else is refused with a [`TransitionError`] naming the
//! page, the state found and the transition tried, and never applied:
//! missing → requested (a fault); requested → missing (release: a claim given back in one
//! step); missing / requested / zero → received (a page arrived or a zero page was placed);
//! received → missing (discard, setup only); missing / received → zero (a hole, or a REMOVE).
//!
//! Beside the map, [`Bitmap`] is the 1-bit atomic page set the layers above share (sent,
//! dirty, removed-in-flight, a peer's received set), in the same word layout as the map's
//! exports ([`PageStateMap::export_present`]: Received ∪ Zero, what a resuming destination
//! reports).
//!
//! ```
//! use page_state::{PageState, PageStateMap, RequestOutcome};
//!
//! let map = PageStateMap::new(1 << 20);
//! assert_eq!(map.request(7)?, RequestOutcome::Requested);        // ask the source
//! assert_eq!(map.request(7)?, RequestOutcome::AlreadyRequested); // do not ask twice
//! assert_eq!(map.mark_received(7)?, PageState::Requested);
//! assert_eq!(map.request(7)?, RequestOutcome::AlreadyReceived);  // just wake
//! assert_eq!(map.request(8)?, RequestOutcome::Requested);
//! assert_eq!(map.release(8)?, PageState::Requested);              // could not place: give back
//! assert_eq!(map.request(8)?, RequestOutcome::Requested);        // the next fault asks again
//! map.mark_zero_range(100, 200)?;                                // a hole in the image
//! assert_eq!(map.request(150)?, RequestOutcome::IsZero);
//! assert!(map.discard(150).is_err());                            // zero → missing: refused
//! assert_eq!(map.next_missing(0), Some(0));
//! assert_eq!(map.count(PageState::Zero), 100);
//! # Ok::<(), page_state::Error>(())
//! ```

mod bitmap;
mod error;
mod map;
pub mod model;
mod state;
mod sync;
mod word;

pub use bitmap::{Bitmap, Runs};
pub use error::{Error, TransitionError};
pub use map::{MissingRuns, PageStateMap, RequestOutcome};
pub use state::{PageState, Transition};
