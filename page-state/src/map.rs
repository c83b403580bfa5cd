//! The map: single-page transitions, range transitions, queries, bitmap exchange.

use crate::error::{Error, TransitionError};
use crate::state::{PageState, Transition};
use crate::sync::{AtomicU64, Ordering};
use crate::word::{self, Applied, PAGES_PER_WORD};

/// What a fault should do, as decided by [`PageStateMap::request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestOutcome {
    /// This caller moved the page missing → requested: it must ask the source.
    Requested,
    /// Someone already asked; wait for the arrival (do not ask again).
    AlreadyRequested,
    /// The page is placed; only wake the faulting thread.
    AlreadyReceived,
    /// The page is known zero: place a zero page locally.
    IsZero,
}

/// A lock-free map of 2-bit page states, 32 pages per `AtomicU64`.
///
/// Every single-page operation is one compare-and-swap loop on one word; range operations
/// work a whole word per atomic operation. No locks, and no allocation after [`new`]
/// (except the `Vec` returned by [`export_received`]).
///
/// [`new`]: PageStateMap::new
/// [`export_received`]: PageStateMap::export_received
#[derive(Debug)]
pub struct PageStateMap {
    words: Box<[AtomicU64]>,
    len: usize,
}

/// Loads use Acquire everywhere: they pair with the Release half of the CAS that stored
/// the state, so a thread that sees a page Received also sees what its placer did before.
const LOAD: Ordering = Ordering::Acquire;
/// A successful CAS is AcqRel: Release publishes our earlier writes with the new state;
/// Acquire because the new word is computed from the previous owner's state.
const CAS_OK: Ordering = Ordering::AcqRel;
/// A failed CAS is a load we will compute from next: Acquire, as for [`LOAD`].
const CAS_FAIL: Ordering = Ordering::Acquire;

impl PageStateMap {
    /// A map of `pages` pages, all Missing.
    pub fn new(pages: usize) -> Self {
        Self::filled(pages, PageState::Missing)
    }

    /// A map of `pages` pages, all in `state` (e.g. Zero for an all-zero image).
    pub fn filled(pages: usize, state: PageState) -> Self {
        let words = pages.div_ceil(PAGES_PER_WORD);
        let pattern = (state as u64) * word::LO;
        let words: Box<[AtomicU64]> = (0..words)
            .map(|w| {
                // Slots beyond `pages` stay Missing (0) so whole-word scans can ignore them.
                let last = (pages - w * PAGES_PER_WORD).min(PAGES_PER_WORD);
                let slots = word::slots(0, last);
                AtomicU64::new(pattern & (slots | (slots << 1)))
            })
            .collect();
        Self { words, len: pages }
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the map has no pages.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, start: usize, end: usize) -> Result<(), Error> {
        if start > end || end > self.len {
            return Err(Error::OutOfRange {
                start,
                end,
                len: self.len,
            });
        }
        Ok(())
    }

    #[inline]
    fn locate(page: usize) -> (usize, u64) {
        let slot = page % PAGES_PER_WORD;
        (page / PAGES_PER_WORD, 1u64 << (2 * slot))
    }

    /// The state of page `page`.
    #[inline]
    pub fn get(&self, page: usize) -> Result<PageState, Error> {
        self.check(page, page.saturating_add(1))?;
        let shift = 2 * (page % PAGES_PER_WORD);
        Ok(PageState::from_bits(
            self.words[page / PAGES_PER_WORD].load(LOAD) >> shift,
        ))
    }

    /// Applies `transition` to the `slots` of word `w` with one CAS loop.
    fn apply_word(&self, w: usize, slots: u64, transition: Transition) -> (u64, Applied) {
        let cell = &self.words[w];
        let mut old = cell.load(LOAD);
        loop {
            let applied = word::apply(old, slots, transition);
            if applied.changed == 0 {
                return (old, applied);
            }
            match cell.compare_exchange_weak(old, applied.word, CAS_OK, CAS_FAIL) {
                Ok(_) => return (old, applied),
                Err(now) => old = now,
            }
        }
    }

    /// Strict single-page transition: returns the previous state, or refuses (the page
    /// already in the target state is refused too, so duplicates are visible). One CAS
    /// loop on the page's own two bits.
    #[inline(always)]
    fn transition(&self, page: usize, transition: Transition) -> Result<PageState, Error> {
        match self.cas_page(page, transition)? {
            Ok(previous) => Ok(previous),
            Err(found) => Err(TransitionError {
                page,
                found,
                transition,
            }
            .into()),
        }
    }

    /// The CAS loop behind single-page transitions: `Ok(previous)` when applied,
    /// `Err(found)` when the table refuses it.
    #[inline(always)]
    fn cas_page(
        &self,
        page: usize,
        transition: Transition,
    ) -> Result<Result<PageState, PageState>, Error> {
        if page >= self.len {
            return Err(Error::OutOfRange {
                start: page,
                end: page.saturating_add(1),
                len: self.len,
            });
        }
        let cell = &self.words[page / PAGES_PER_WORD];
        let shift = 2 * (page % PAGES_PER_WORD);
        let target = (transition.target() as u64) << shift;
        let mut old = cell.load(LOAD);
        loop {
            let found = PageState::from_bits(old >> shift);
            if !transition.allowed_from(found) {
                return Ok(Err(found));
            }
            let new = (old & !(3 << shift)) | target;
            match cell.compare_exchange_weak(old, new, CAS_OK, CAS_FAIL) {
                Ok(_) => return Ok(Ok(found)),
                Err(now) => old = now,
            }
        }
    }

    /// A fault on `page`: moves missing → requested and tells the caller what to do.
    #[inline]
    pub fn request(&self, page: usize) -> Result<RequestOutcome, Error> {
        Ok(match self.cas_page(page, Transition::Request)? {
            Ok(_) => RequestOutcome::Requested,
            Err(PageState::Requested) => RequestOutcome::AlreadyRequested,
            Err(PageState::Received) => RequestOutcome::AlreadyReceived,
            Err(PageState::Zero) => RequestOutcome::IsZero,
            Err(PageState::Missing) => unreachable!("missing → requested is always allowed"),
        })
    }

    /// `page` was placed: missing / requested / zero → received. Returns the previous
    /// state; a page already received is refused (a duplicate arrival).
    #[inline]
    pub fn mark_received(&self, page: usize) -> Result<PageState, Error> {
        self.transition(page, Transition::Receive)
    }

    /// `page` is known zero: missing / received → zero. Returns the previous state.
    pub fn mark_zero(&self, page: usize) -> Result<PageState, Error> {
        self.transition(page, Transition::MarkZero)
    }

    /// Discards `page` (setup only, the source will resend it): received → missing.
    pub fn discard(&self, page: usize) -> Result<PageState, Error> {
        self.transition(page, Transition::Discard)
    }

    /// Gives back a claim: requested → missing in one CAS, so a later fault asks again.
    /// For a requester that cannot place the page now (the address space is changing);
    /// no other thread ever sees the page in a state it was not in.
    #[inline]
    pub fn release(&self, page: usize) -> Result<PageState, Error> {
        self.transition(page, Transition::Release)
    }

    /// Applies `transition` to `start..end`, one CAS per word. Pages already in the target
    /// state are left alone; pages whose state forbids it are left alone and reported.
    /// Returns the number of pages changed.
    fn transition_range(
        &self,
        start: usize,
        end: usize,
        transition: Transition,
    ) -> Result<usize, Error> {
        self.check(start, end)?;
        let (mut changed, mut refused) = (0usize, 0usize);
        let mut first: Option<TransitionError> = None;
        let mut page = start;
        while page < end {
            let w = page / PAGES_PER_WORD;
            let first_slot = page % PAGES_PER_WORD;
            let last_slot = (end - w * PAGES_PER_WORD).min(PAGES_PER_WORD);
            let (old, applied) = self.apply_word(w, word::slots(first_slot, last_slot), transition);
            changed += applied.changed.count_ones() as usize;
            refused += applied.refused.count_ones() as usize;
            if first.is_none() && applied.refused != 0 {
                let slot = word::first_slot(applied.refused);
                first = Some(TransitionError {
                    page: w * PAGES_PER_WORD + slot,
                    found: PageState::from_bits(old >> (2 * slot)),
                    transition,
                });
            }
            page = (w + 1) * PAGES_PER_WORD;
        }
        match first {
            None => Ok(changed),
            Some(first) => Err(Error::PartlyRefused {
                first,
                refused,
                changed,
            }),
        }
    }

    /// Discards `start..end`: received → missing (missing pages stay; others refused).
    pub fn discard_range(&self, start: usize, end: usize) -> Result<usize, Error> {
        self.transition_range(start, end, Transition::Discard)
    }

    /// Marks `start..end` zero: missing / received → zero (zero stays; requested refused).
    pub fn mark_zero_range(&self, start: usize, end: usize) -> Result<usize, Error> {
        self.transition_range(start, end, Transition::MarkZero)
    }

    /// Marks `start..end` received (received stays).
    pub fn mark_received_range(&self, start: usize, end: usize) -> Result<usize, Error> {
        self.transition_range(start, end, Transition::Receive)
    }

    /// Releases `start..end`: requested → missing (missing stays; others refused).
    pub fn release_range(&self, start: usize, end: usize) -> Result<usize, Error> {
        self.transition_range(start, end, Transition::Release)
    }

    /// Pages in `state` in the whole map.
    pub fn count(&self, state: PageState) -> usize {
        self.count_range(state, 0, self.len)
            .expect("the whole map is in range")
    }

    /// Pages in `state` within `start..end`.
    pub fn count_range(&self, state: PageState, start: usize, end: usize) -> Result<usize, Error> {
        self.check(start, end)?;
        let mut total = 0;
        let mut page = start;
        while page < end {
            let w = page / PAGES_PER_WORD;
            let last = (end - w * PAGES_PER_WORD).min(PAGES_PER_WORD);
            let slots = word::slots(page % PAGES_PER_WORD, last);
            total +=
                (word::in_state(self.words[w].load(LOAD), state) & slots).count_ones() as usize;
            page = (w + 1) * PAGES_PER_WORD;
        }
        Ok(total)
    }

    /// The first page in `start..end` whose state is (or, `negate`, is not) `state`.
    fn find(&self, state: PageState, negate: bool, start: usize, end: usize) -> Option<usize> {
        let mut page = start;
        while page < end {
            let w = page / PAGES_PER_WORD;
            let last = (end - w * PAGES_PER_WORD).min(PAGES_PER_WORD);
            let slots = word::slots(page % PAGES_PER_WORD, last);
            let mut hits = word::in_state(self.words[w].load(LOAD), state);
            if negate {
                hits = !hits;
            }
            let hits = hits & slots;
            if hits != 0 {
                return Some(w * PAGES_PER_WORD + word::first_slot(hits));
            }
            page = (w + 1) * PAGES_PER_WORD;
        }
        None
    }

    /// The first page in `state` at or after `from`, wrapping around to page 0.
    pub fn next_in_state_wrapping(&self, state: PageState, from: usize) -> Option<usize> {
        let from = from.min(self.len);
        self.find(state, false, from, self.len)
            .or_else(|| self.find(state, false, 0, from))
    }

    /// The first Missing page at or after `from` (no wrap-around).
    pub fn next_missing(&self, from: usize) -> Option<usize> {
        self.find(PageState::Missing, false, from.min(self.len), self.len)
    }

    /// The first Missing page at or after `from`, wrapping around to page 0.
    pub fn next_missing_wrapping(&self, from: usize) -> Option<usize> {
        let from = from.min(self.len);
        self.next_missing(from)
            .or_else(|| self.find(PageState::Missing, false, 0, from))
    }

    /// Runs of Missing pages from `cursor` to the end, then from 0 up to `cursor`: the
    /// order a background stream pushes in. Reads the live map as it goes.
    pub fn missing_runs(&self, cursor: usize) -> MissingRuns<'_> {
        let cursor = cursor.min(self.len);
        MissingRuns {
            map: self,
            pos: cursor,
            end: self.len,
            wrap_to: Some(cursor),
        }
    }

    /// Words needed for a 1-bit-per-page bitmap of this map.
    pub fn bitmap_words(&self) -> usize {
        self.len.div_ceil(64)
    }

    /// Writes the set of pages in any of `states` as a bitmap (bit `i % 64` of word
    /// `i / 64` is page `i`) into `out`, one load per 32 pages.
    fn export_into(&self, states: &[PageState], out: &mut [u64]) -> Result<(), Error> {
        if out.len() != self.bitmap_words() {
            return Err(Error::BitmapSize {
                got: out.len(),
                want: self.bitmap_words(),
            });
        }
        out.fill(0);
        for (w, cell) in self.words.iter().enumerate() {
            let word = cell.load(LOAD);
            let slots = states
                .iter()
                .fold(0, |acc, &s| acc | word::in_state(word, s));
            out[w / 2] |= word::compress(slots) << (32 * (w % 2));
        }
        Ok(())
    }

    /// Writes the Received set as a bitmap (bit `i % 64` of word `i / 64` is page `i`).
    pub fn export_received_into(&self, out: &mut [u64]) -> Result<(), Error> {
        self.export_into(&[PageState::Received], out)
    }

    /// The Received set as a bitmap.
    pub fn export_received(&self) -> Vec<u64> {
        let mut out = vec![0; self.bitmap_words()];
        self.export_received_into(&mut out)
            .expect("sized to the map");
        out
    }

    /// Writes the *present* set — Received ∪ Zero, every page that needs nothing more
    /// from a source — as a bitmap: what a destination reports on resume (RECV_BITMAP).
    pub fn export_present_into(&self, out: &mut [u64]) -> Result<(), Error> {
        self.export_into(&[PageState::Received, PageState::Zero], out)
    }

    /// The present set (Received ∪ Zero) as a bitmap.
    pub fn export_present(&self) -> Vec<u64> {
        let mut out = vec![0; self.bitmap_words()];
        self.export_present_into(&mut out)
            .expect("sized to the map");
        out
    }

    /// Marks every page set in `bitmap` Received (a peer's received bitmap, on resume).
    /// Pages not set are left as they are. Returns the pages changed.
    pub fn import_received(&self, bitmap: &[u64]) -> Result<usize, Error> {
        if bitmap.len() != self.bitmap_words() {
            return Err(Error::BitmapSize {
                got: bitmap.len(),
                want: self.bitmap_words(),
            });
        }
        let tail = self.len % 64;
        if tail != 0 && bitmap[bitmap.len() - 1] >> tail != 0 {
            let last = bitmap.len() - 1;
            let beyond = last * 64 + (bitmap[last] >> tail).trailing_zeros() as usize + tail;
            return Err(Error::OutOfRange {
                start: beyond,
                end: beyond + 1,
                len: self.len,
            });
        }
        let mut changed = 0;
        for w in 0..self.words.len() {
            let slots = word::expand(bitmap[w / 2] >> (32 * (w % 2)));
            if slots != 0 {
                let (_, applied) = self.apply_word(w, slots, Transition::Receive);
                changed += applied.changed.count_ones() as usize;
            }
        }
        Ok(changed)
    }

    /// Every page's state, in order (a snapshot per word).
    pub fn states(&self) -> impl Iterator<Item = PageState> + '_ {
        (0..self.len).map(move |page| {
            let (w, bit) = Self::locate(page);
            PageState::from_bits(self.words[w].load(LOAD) >> bit.trailing_zeros())
        })
    }
}

/// Iterator over runs of Missing pages, see [`PageStateMap::missing_runs`].
#[derive(Debug)]
pub struct MissingRuns<'a> {
    map: &'a PageStateMap,
    pos: usize,
    end: usize,
    wrap_to: Option<usize>,
}

impl Iterator for MissingRuns<'_> {
    type Item = std::ops::Range<usize>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(start) = self.map.find(PageState::Missing, false, self.pos, self.end) {
                let stop = self
                    .map
                    .find(PageState::Missing, true, start, self.end)
                    .unwrap_or(self.end);
                self.pos = stop;
                return Some(start..stop);
            }
            // This leg is done: wrap to 0..cursor once.
            let cursor = self.wrap_to.take()?;
            self.pos = 0;
            self.end = cursor;
        }
    }
}
