//! Poison, never zeros: after a fatal error every page a fault would wait on for good is
//! poisoned (`UFFDIO_POISON`, Linux 6.6), and so are a refused child's missing pages, so a
//! touch raises SIGBUS instead of reading memory that is not the workload's. A page that
//! turns out placed meanwhile (EEXIST) keeps its content. A REMOVE queued meanwhile (the
//! kernel refuses the poison with EAGAIN until it is read) is read here for a stopped
//! pager, whose handlers read no more (`release.rs`).

use std::time::{Duration, Instant};

use page_state::PageState;
use uffd_core::{Error as UffdError, PoisonMode, Uffd};

use crate::region::{PageRef, Resolve};
use crate::shared::Shared;
use crate::stats::add;

/// Which pages [`Shared::poison_in`] poisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Poison {
    /// This engine failed, its uffd open until the embedder drops the pager: every page a
    /// fault would wait on for good — Missing, Requested, Zero (a known-zero page not
    /// placed yet) and the Received pages a REMOVE reached (their next touch faults).
    Stopped,
    /// A forked child that is not (or no longer) served, its uffd closed next: Missing and
    /// Requested pages, and every Received one (the child's copy may lack a page its
    /// parent received after the fork). Zero pages read zeros once the uffd is closed.
    Child,
}

/// How long a stopped pager's poison of one run waits out address-space changes the
/// workload keeps making (each refusing it with EAGAIN until read and applied).
const AGAIN_BOUND: Duration = Duration::from_secs(1);

impl Shared {
    /// Poisons every page of a mapped region the stopped pager would leave a fault waiting
    /// on (`UFFDIO_POISON`, one ioctl per run, page by page where a run meets a placed
    /// page). Returns the pages poisoned and those that could not be.
    pub(crate) fn poison_unplaced(&self) -> (usize, usize) {
        self.poison_in(&self.uffd, Poison::Stopped)
    }

    /// Poisons, through `uffd`, the pages of the regions that `which` says, in runs where
    /// they are not placed and one by one where they may be (a present page answers
    /// EEXIST and keeps its content). For a child, allocates nothing (a handler refuses
    /// one between two reads: `worker.rs`).
    pub(crate) fn poison_in(&self, uffd: &Uffd, which: Poison) -> (usize, usize) {
        let state = |page| self.decider(page).states.get(page);
        let open = |page| match state(page) {
            Ok(PageState::Missing | PageState::Requested) => true,
            Ok(PageState::Zero) => which == Poison::Stopped,
            _ => false,
        };
        let received = |page| match which {
            Poison::Child => true,
            Poison::Stopped => self.dropped.test(page),
        };
        let (mut poisoned, mut left) = (0, 0);
        let mut page = 0;
        while page < self.states.len() {
            let Some(first) = self.page(page) else {
                page += 1;
                continue;
            };
            let count = if open(page) {
                let mut count = 1;
                let mut prev = first;
                while let Some(next) = self.page(page + count) {
                    if !prev.is_followed_by(&next) || !open(page + count) {
                        break;
                    }
                    prev = next;
                    count += 1;
                }
                count
            } else if state(page) == Ok(PageState::Received) && received(page) {
                1
            } else {
                page += 1;
                continue;
            };
            let (done, failed) = self.poison_run(uffd, which, &first, count);
            add(&self.stats.poisoned, done as u64);
            poisoned += done;
            left += failed;
            page += count;
        }
        (poisoned, left)
    }

    /// The engine whose states decide page `page`: the parent's for a forked child's MINOR
    /// region (see `parent.rs`), this one's otherwise.
    fn decider(&self, page: usize) -> &Shared {
        match (&self.parent, self.page(page)) {
            (Some(parent), Some(p)) if p.resolve != Resolve::Copy => parent,
            _ => self,
        }
    }

    /// Poisons `count` pages from `first`, skipping pages that turn out placed (EEXIST).
    fn poison_run(
        &self,
        uffd: &Uffd,
        which: Poison,
        first: &PageRef,
        count: usize,
    ) -> (usize, usize) {
        let (mut done, mut failed) = (0, 0);
        let mut i = 0;
        let (mut tries, mut again_since) = (0, None);
        while i < count {
            let addr = first.addr + i * first.size;
            let len = (count - i) * first.size;
            match uffd.poison(addr, len, PoisonMode::empty()) {
                Ok(_) => {
                    done += count - i;
                    break;
                }
                // A page of the run is present: that one keeps its content.
                Err(UffdError::Exists { .. }) if count - i == 1 => i += 1,
                Err(UffdError::Exists { .. }) => {
                    let (d, f) = self.poison_run(uffd, which, &self.page_after(first, i), 1);
                    (done, failed) = (done + d, failed + f);
                    i += 1;
                }
                // An address-space change is pending. A stopped pager's handlers read no
                // more: read it here (release.rs), then give the thread that waited for
                // it the time to go on (the kernel refuses until it has), for as long as
                // the workload keeps changing it, up to `AGAIN_BOUND`. A child's events go
                // with its uffd: a few tries. Then give up on the rest.
                Err(UffdError::Again { done: bytes, .. })
                    if match which {
                        Poison::Stopped => {
                            again_since.get_or_insert_with(Instant::now).elapsed() < AGAIN_BOUND
                        }
                        Poison::Child => tries < 100,
                    } =>
                {
                    let whole = bytes / first.size;
                    done += whole;
                    i += whole;
                    tries += 1;
                    if which == Poison::Stopped {
                        self.read_queued();
                    }
                    crate::sigsafe::sleep(Duration::from_micros(100));
                }
                Err(UffdError::RangeGone { .. }) | Err(UffdError::ProcessGone { .. }) => break,
                Err(_) => {
                    failed += count - i;
                    break;
                }
            }
        }
        (done, failed)
    }

    /// The page `i` pages after `first` in the same region.
    fn page_after(&self, first: &PageRef, i: usize) -> PageRef {
        PageRef {
            page: first.page + i,
            addr: first.addr + i * first.size,
            offset: first.offset + (i * first.size) as u64,
            in_region: first.in_region + i * first.size,
            ..*first
        }
    }
}
