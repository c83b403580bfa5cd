//! What the destination placed, page by page, as digests: what it reports in DIGESTS.
//!
//! Each page's digest is taken from the bytes the receiver lands (a precopy copy, the
//! latest winning; a postcopy placement of a page not present yet), never from memory
//! afterwards, where the resumed workload may already have written. A page never landed
//! reads as zeros here. Every page is sent (zero ones as zero runs), so in a finished
//! migration that is a page the workload dropped before a copy arrived; DIGESTS marks it
//! so ([`crate::wire::DROPPED`]) when the pager saw the drop.
//! See the delivery invariant in [`crate::migrate`] for why this checks the protocol.
//!
//! After the switch a page may come more than once — a requested page is answered on the
//! urgent connection although the stream sent it (`endpoint::sender` says why), and a
//! later pair may bring it again — and two copies may both be told of before either is
//! placed, so which one is in memory is not known here. It need not be: the source's
//! memory is frozen then, so they are the same bytes. If they are not, the source's memory
//! changed after its stop, and the page's digest becomes one that matches neither copy,
//! so the verdict fails. A page being placed is not present, so its digest is one only
//! copies after the switch wrote (a precopy copy made it present; DISCARD made it untold
//! again): each such copy is compared with the digest there, none overwrites it.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    /// Each page's digest, or [`UNTOLD`].
    of: Box<[AtomicU64]>,
    /// A page came twice with different content (logged once: a stop that left a writer
    /// running changes many).
    differed: AtomicBool,
}

impl Placed {
    /// `pages` pages of `ps` bytes, none landed: all zeros.
    pub(super) fn new(ps: usize, pages: u64) -> Placed {
        Placed {
            zero: digest(&vec![0; ps]),
            of: (0..pages).map(|_| AtomicU64::new(UNTOLD)).collect(),
            differed: AtomicBool::new(false),
        }
    }

    /// Whether a copy of page `page` was told of (landed, or being placed).
    pub(super) fn told(&self, page: usize) -> bool {
        self.of[page].load(DIGEST) != UNTOLD
    }

    /// Page `page`'s digest (of zeros if no copy was told of).
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
    fn copied(&self, page: u64, data: Option<&[u8]>) {
        let d = data.map_or(self.zero, digest);
        // The receiver checked the page against the advised geometry, which sized `of`.
        self.of[page as usize].store(d, DIGEST);
    }

    fn placing(&self, page: u64, data: Option<&[u8]>) {
        let d = data.map_or(self.zero, digest);
        let of = &self.of[page as usize];
        // The first copy's digest stands; a later one must agree with it.
        let _ = of.fetch_update(DIGEST, DIGEST, |told| match told {
            UNTOLD => Some(d),
            same if same == d => None,
            other => {
                if !self.differed.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "page {page} came twice with different content: the source's memory \
                         changed after its stop (further pages not logged)"
                    );
                }
                Some(neither(other, d))
            }
        });
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
    fn a_page_placed_twice_keeps_its_digest_only_if_both_copies_agree() {
        let (a, b) = (vec![1u8; 4096], vec![2u8; 4096]);
        let placed = Placed::new(4096, 6);
        placed.placing(0, Some(&a)); // one copy
        placed.placing(1, Some(&a)); // two, alike
        placed.placing(1, Some(&a));
        placed.placing(2, Some(&b)); // two, different: the memory changed after the stop
        placed.placing(2, Some(&a));
        placed.placing(3, None); // a zero run and zero data are alike
        placed.placing(3, Some(&[0; 4096]));
        assert_eq!(placed.get(0), digest(&a));
        assert_eq!(placed.get(1), digest(&a));
        let got = placed.get(2);
        assert!(got != digest(&a) && got != digest(&b), "neither copy");
        placed.placing(2, Some(&b)); // a third copy does not make it right again
        let third = placed.get(2);
        assert!(
            third != digest(&a) && third != digest(&b),
            "still neither copy"
        );
        assert_eq!(placed.get(3), digest(&[0; 4096]));
        assert_eq!(placed.get(4), digest(&[0; 4096]), "never landed: zeros");
    }

    #[test]
    fn two_threads_placing_the_same_pages_at_once_agree_or_leave_neither_digest() {
        // Both threads tell every page at once, as the urgent reader and the stream's
        // landing threads may: even pages alike, odd ones different.
        let pages = 4096;
        let placed = Placed::new(4096, pages);
        let (a, b) = (vec![1u8; 4096], vec![2u8; 4096]);
        std::thread::scope(|s| {
            for mine in [&a, &b] {
                let (placed, a) = (&placed, &a);
                s.spawn(move || {
                    for p in 0..pages {
                        placed.placing(p, Some(if p % 2 == 0 { a } else { mine }));
                    }
                });
            }
        });
        for p in 0..pages as usize {
            let got = placed.get(p);
            if p % 2 == 0 {
                assert_eq!(got, digest(&a), "page {p}: alike");
            } else {
                assert!(got != digest(&a) && got != digest(&b), "page {p}: neither");
            }
        }
    }

    #[test]
    fn a_copy_before_the_switch_is_replaced_by_the_next_and_dropped_by_discard() {
        let (a, b) = (vec![1u8; 4096], vec![2u8; 4096]);
        let placed = Placed::new(4096, 2);
        placed.copied(0, Some(&a));
        placed.copied(0, Some(&b)); // sent again in a later round: the latest wins
        assert_eq!(placed.get(0), digest(&b));
        placed.copied(1, Some(&b));
        placed.dropped(1..2);
        assert_eq!(placed.get(1), digest(&[0; 4096]), "dropped: zeros");
        placed.placing(1, Some(&a)); // then placed after the switch
        assert_eq!(placed.get(1), digest(&a));
    }
}
