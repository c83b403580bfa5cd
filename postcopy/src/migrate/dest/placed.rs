//! What the destination placed, page by page, as digests: what it reports in DIGESTS.
//!
//! Each page's digest is taken from the bytes the receiver lands (a precopy copy, the
//! latest winning; a postcopy placement of a page not present yet), never from memory
//! afterwards, where the resumed workload may already have written. A page never landed
//! counts as zeros: it is a known-zero page, which the pager fills with zeros locally.
//! See the delivery invariant in [`crate::migrate`] for why this checks the protocol.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use super::super::digest;
use crate::endpoint::receiver::OnLand;

/// Relaxed: a digest is stored before its page is published placed (the state map's
/// Release CAS), and read only once every page is seen placed (its Acquire loads), or
/// after LISTEN's handover of the land (a lock): those order it.
const DIGEST: Ordering = Ordering::Relaxed;

/// Every page's digest of what was placed in it.
pub(super) struct Placed {
    /// The digest of a page of zeros.
    zero: u64,
    of: Box<[AtomicU64]>,
}

impl Placed {
    /// `pages` pages of `ps` bytes, none landed: all zeros.
    pub(super) fn new(ps: usize, pages: u64) -> Placed {
        let zero = digest(&vec![0; ps]);
        Placed {
            zero,
            of: (0..pages).map(|_| AtomicU64::new(zero)).collect(),
        }
    }

    /// Page `page`'s digest.
    pub(super) fn get(&self, page: usize) -> u64 {
        self.of[page].load(DIGEST)
    }
}

impl OnLand for Placed {
    fn landed(&self, page: u64, data: Option<&[u8]>) {
        let d = data.map_or(self.zero, digest);
        // The receiver checked the page against the advised geometry, which sized `of`.
        self.of[page as usize].store(d, DIGEST);
    }

    fn dropped(&self, pages: Range<usize>) {
        for d in &self.of[pages] {
            d.store(self.zero, DIGEST);
        }
    }
}
