//! Where a receiver's pages land ([`Land`]), who hears of each ([`OnLand`]), and what it
//! counts ([`RecvStats`]).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use pager::{Mapping, PageStateMap, Placer};

/// Where arriving pages go.
pub(crate) enum Land {
    /// Nowhere yet: pages are unexpected.
    Idle,
    /// Copied into `memory`, which no pager serves yet, their states kept in `states`
    /// (the map the pager will start with).
    Copy {
        /// The memory (the destination's own, or its embedder's).
        memory: Arc<Mapping>,
        /// Its page states.
        states: PageStateMap,
    },
    /// Placed by a running pager.
    Place(Placer),
}

/// Told of every page a receiver lands in memory, before it is published as placed (the
/// migration destination digests what it placed: see `migrate`'s delivery invariant).
pub(crate) trait OnLand: Send + Sync {
    /// Page `page` is being landed from the current pair with `data` (`None`: zeros), in a
    /// copy (precopy: the latest copy wins) or a placement of a page not present yet.
    fn landed(&self, page: u64, data: Option<&[u8]>);
    /// As [`landed`](OnLand::landed), for a page an answer on the urgent connection brought
    /// after the switch. The stream may bring the same page too (a requested page is
    /// answered although the stream sent it: see `endpoint::sender`), and both copies may
    /// be told of before either is placed.
    fn landed_urgent(&self, page: u64, data: Option<&[u8]>) {
        self.landed(page, data);
    }
    /// Pages `pages` were dropped by DISCARD (they read as zeros until landed again).
    fn dropped(&self, pages: std::ops::Range<usize>);
}

/// Counters of what a receiver received.
#[derive(Debug, Default)]
pub struct RecvStats {
    /// Pages copied in before a pager ran (re-sends included).
    pub copied: AtomicU64,
    /// Pages placed through the pager.
    pub placed: AtomicU64,
    /// Pages asked for by faults.
    pub requested: AtomicU64,
    /// Pages dropped by DISCARD (before a pager ran).
    pub discarded: AtomicU64,
    /// Time spent applying DISCARD, in nanoseconds.
    pub discarding_ns: AtomicU64,
    /// Frames refused because they came on a pair older than the one greeted last (a
    /// superseded connection still delivering): never applied.
    pub stale_frames: AtomicU64,
}
