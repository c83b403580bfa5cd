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
    /// Page `page` is being copied in from the current pair with `data` (`None`: zeros)
    /// before a pager runs: precopy, where a page sent again was written again, so the
    /// latest copy wins.
    fn copied(&self, page: u64, data: Option<&[u8]>);
    /// Page `page`, not present, is being placed through the pager with `data`. After the
    /// switch a page may come twice — answered on the urgent connection and in the stream
    /// (a requested page is answered although the stream sent it: see `endpoint::sender`),
    /// or again on a later pair — and two copies may both be told of before either is
    /// placed.
    fn placing(&self, page: u64, data: Option<&[u8]>);
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
