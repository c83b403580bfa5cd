//! What the destination placed, page by page, as digests: what it reports in DIGESTS.
//!
//! Each page's digest is taken from the bytes the receiver lands (a precopy copy, the
//! latest winning; a postcopy placement of a page not present yet), never from memory
//! afterwards, where the resumed workload may already have written. A page never landed
//! counts as zeros: it is a known-zero page, which the pager fills with zeros locally.
//! See the delivery invariant in [`crate::migrate`] for why this checks the protocol.
//!
//! After the switch a requested page may come twice, on the urgent connection and in the
//! stream (`endpoint::sender` says why), and both copies may be told of before either is
//! placed, so which one is in memory is not known here. It need not be: the source's
//! memory is frozen, so the two are the same bytes. If they are not, the source's memory
//! changed after its stop, and the page's digest becomes one that matches neither copy,
//! so the verdict fails.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::super::digest;
use crate::endpoint::receiver::OnLand;

/// Relaxed: a digest is stored before its page is published placed (the state map's
/// Release CAS), and read only once every page is seen placed (its Acquire loads), or
/// after LISTEN's handover of the land (a lock): those order it.
const DIGEST: Ordering = Ordering::Relaxed;

/// No copy of the page was told of: it reads as zeros. A value no digest is expected to
/// take (one in 2^64).
const UNTOLD: u64 = u64::MAX;

/// Every page's digest of what was placed in it.
pub(super) struct Placed {
    /// The digest of a page of zeros.
    zero: u64,
    /// What the stream (and precopy) brought, or [`UNTOLD`].
    of: Box<[AtomicU64]>,
    /// What urgent answers brought, page and digest, until [`Placed::settle`].
    urgent: Mutex<Vec<(u64, u64)>>,
}

impl Placed {
    /// `pages` pages of `ps` bytes, none landed: all zeros.
    pub(super) fn new(ps: usize, pages: u64) -> Placed {
        Placed {
            zero: digest(&vec![0; ps]),
            of: (0..pages).map(|_| AtomicU64::new(UNTOLD)).collect(),
            urgent: Mutex::new(Vec::new()),
        }
    }

    /// Takes in what urgent answers brought: a page the stream brought too keeps its
    /// digest if the two copies agree, and gets one that matches neither if they do not.
    /// Before the digests are read (again, if a late copy was told since).
    pub(super) fn settle(&self) {
        let urgent = std::mem::take(&mut *self.urgent.lock().unwrap_or_else(|p| p.into_inner()));
        for (page, d) in urgent {
            let of = &self.of[page as usize];
            match of.load(DIGEST) {
                UNTOLD => of.store(d, DIGEST),
                same if same == d => {}
                other => {
                    log::warn!("page {page} came twice, with different content");
                    of.store(neither(other, d), DIGEST);
                }
            }
        }
    }

    /// Page `page`'s digest (after [`Placed::settle`]).
    pub(super) fn get(&self, page: usize) -> u64 {
        match self.of[page].load(DIGEST) {
            UNTOLD => self.zero,
            d => d,
        }
    }
}

/// A value other than `a`, `b` and [`UNTOLD`].
fn neither(a: u64, b: u64) -> u64 {
    (1..4)
        .map(|k| a.wrapping_add(k))
        .find(|&x| x != b && x != UNTOLD)
        .expect("three candidates, two excluded")
}

impl OnLand for Placed {
    fn landed(&self, page: u64, data: Option<&[u8]>) {
        let d = data.map_or(self.zero, digest);
        // The receiver checked the page against the advised geometry, which sized `of`.
        self.of[page as usize].store(d, DIGEST);
    }

    fn landed_urgent(&self, page: u64, data: Option<&[u8]>) {
        let d = data.map_or(self.zero, digest);
        let mut urgent = self.urgent.lock().unwrap_or_else(|p| p.into_inner());
        urgent.push((page, d));
    }

    fn dropped(&self, pages: Range<usize>) {
        for d in &self.of[pages] {
            d.store(UNTOLD, DIGEST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_brought_twice_keeps_its_digest_only_if_both_copies_agree() {
        let (a, b) = (vec![1u8; 4096], vec![2u8; 4096]);
        let placed = Placed::new(4096, 5);
        placed.landed(0, Some(&a)); // the stream only
        placed.landed_urgent(1, Some(&a)); // an answer only
        placed.landed(2, Some(&a)); // both, alike, in either order
        placed.landed_urgent(2, Some(&a));
        placed.landed_urgent(3, Some(&b)); // both, different: the memory changed
        placed.landed(3, Some(&a));
        placed.settle();
        assert_eq!(placed.get(0), digest(&a));
        assert_eq!(placed.get(1), digest(&a));
        assert_eq!(placed.get(2), digest(&a));
        let got = placed.get(3);
        assert!(got != digest(&a) && got != digest(&b), "neither copy");
        assert_eq!(placed.get(4), digest(&[0; 4096]), "never landed: zeros");
        placed.landed(4, Some(&b));
        placed.dropped(4..5);
        assert_eq!(placed.get(4), digest(&[0; 4096]), "dropped: zeros");
    }
}
