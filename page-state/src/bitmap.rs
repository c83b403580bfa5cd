//! A fixed-size bitmap of atomic bits: the 1-bit page sets the layers above share beside
//! the state map — sent and dirty at a migration source, removed-in-flight in the pager,
//! a peer's received set on the wire.
//!
//! Every operation is lock-free and allocation-free (except [`Bitmap::to_words`], which
//! returns a `Vec`), so it may be used from a signal handler.

use std::ops::Range;

use crate::error::Error;
use crate::sync::{AtomicU64, Ordering};

/// Loads pair with the Release half of the RMW that set or cleared the bit, so a thread
/// that sees a bit also sees what its writer did before (the same rule as the state map).
const LOAD: Ordering = Ordering::Acquire;
/// RMWs are AcqRel: Release publishes the writer's earlier writes with the bit; Acquire
/// because a test-and-set/clear decides what the caller does next from the previous bit.
const RMW: Ordering = Ordering::AcqRel;
/// Whole-word stores (fill, import) publish with Release, as the RMWs do.
const STORE: Ordering = Ordering::Release;

/// `len` atomic bits, 64 per word; bit `i % 64` of word `i / 64` is bit `i`, which is the
/// layout of [`PageStateMap`](crate::PageStateMap)'s exports and of bitmaps on the wire.
///
/// ```
/// use page_state::Bitmap;
///
/// let sent = Bitmap::new(100);
/// assert!(!sent.set(3));                     // newly set
/// assert!(sent.set(3));                      // was already set
/// sent.set_range(10..20)?;
/// assert_eq!(sent.count(), 11);
/// assert_eq!(sent.next_set_wrapping(21), Some(3));
/// assert_eq!(sent.runs().collect::<Vec<_>>(), vec![3..4, 10..20]);
/// let need = Bitmap::new(100);
/// need.store_complement_of(&sent.to_words())?; // everything not sent
/// assert_eq!(need.count(), 89);
/// # Ok::<(), page_state::Error>(())
/// ```
#[derive(Debug)]
pub struct Bitmap {
    words: Box<[AtomicU64]>,
    len: usize,
}

impl Bitmap {
    /// `len` clear bits.
    pub fn new(len: usize) -> Self {
        Self {
            words: (0..Self::words_for(len))
                .map(|_| AtomicU64::new(0))
                .collect(),
            len,
        }
    }

    /// A bitmap of `len` bits holding `words` (as [`Bitmap::store_words`] checks them).
    pub fn from_words(len: usize, words: &[u64]) -> Result<Self, Error> {
        let bitmap = Self::new(len);
        bitmap.store_words(words)?;
        Ok(bitmap)
    }

    /// Words needed for `len` bits.
    pub fn words_for(len: usize) -> usize {
        len.div_ceil(64)
    }

    /// Bits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn locate(&self, i: usize) -> Result<(&AtomicU64, u64), Error> {
        if i >= self.len {
            return Err(Error::OutOfRange {
                start: i,
                end: i.saturating_add(1),
                len: self.len,
            });
        }
        Ok((&self.words[i / 64], 1 << (i % 64)))
    }

    /// The bits of word `w` that lie within the bitmap.
    #[inline]
    fn valid(&self, w: usize) -> u64 {
        let tail = self.len - w * 64;
        if tail >= 64 {
            !0
        } else {
            (1 << tail) - 1
        }
    }

    /// Bit `i`; `false` beyond the end.
    #[inline]
    pub fn test(&self, i: usize) -> bool {
        self.locate(i)
            .is_ok_and(|(word, bit)| word.load(LOAD) & bit != 0)
    }

    /// Sets bit `i`; returns whether it was already set (exactly one of several racing
    /// setters sees `false`). Bits beyond the end are not set and read as set.
    #[inline]
    pub fn set(&self, i: usize) -> bool {
        match self.locate(i) {
            Ok((word, bit)) => word.fetch_or(bit, RMW) & bit != 0,
            Err(_) => true,
        }
    }

    /// Clears bit `i`; returns whether it was set (exactly one of several racing clearers
    /// sees `true`: a claim). Bits beyond the end read as clear.
    #[inline]
    pub fn clear(&self, i: usize) -> bool {
        match self.locate(i) {
            Ok((word, bit)) => word.fetch_and(!bit, RMW) & bit != 0,
            Err(_) => false,
        }
    }

    /// Applies `f(word, mask)` to every word `range` touches, `mask` being the range's
    /// bits in that word: one RMW per word.
    fn per_word(&self, range: Range<usize>, f: impl Fn(&AtomicU64, u64)) -> Result<(), Error> {
        if range.start > range.end || range.end > self.len {
            return Err(Error::OutOfRange {
                start: range.start,
                end: range.end,
                len: self.len,
            });
        }
        let mut i = range.start;
        while i < range.end {
            let w = i / 64;
            let hi = (range.end - w * 64).min(64);
            let lo = i % 64;
            let mask = if hi == 64 { !0 } else { (1 << hi) - 1 } & !((1u64 << lo) - 1);
            f(&self.words[w], mask);
            i = (w + 1) * 64;
        }
        Ok(())
    }

    /// Sets every bit of `range`.
    pub fn set_range(&self, range: Range<usize>) -> Result<(), Error> {
        self.per_word(range, |word, mask| {
            word.fetch_or(mask, RMW);
        })
    }

    /// Clears every bit of `range`.
    pub fn clear_range(&self, range: Range<usize>) -> Result<(), Error> {
        self.per_word(range, |word, mask| {
            word.fetch_and(!mask, RMW);
        })
    }

    /// Sets every bit.
    pub fn fill(&self) {
        for (w, word) in self.words.iter().enumerate() {
            word.store(self.valid(w), STORE);
        }
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for word in self.words.iter() {
            word.store(0, STORE);
        }
    }

    /// Set bits.
    pub fn count(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(LOAD).count_ones() as usize)
            .sum()
    }

    /// Whether no bit is set.
    pub fn none(&self) -> bool {
        self.words.iter().all(|w| w.load(LOAD) == 0)
    }

    /// The first set bit in `from..end`.
    fn find(&self, from: usize, end: usize, set: bool) -> Option<usize> {
        let mut i = from;
        while i < end {
            let w = i / 64;
            let mut bits = self.words[w].load(LOAD);
            if !set {
                bits = !bits & self.valid(w);
            }
            let bits = bits >> (i % 64);
            if bits != 0 {
                let found = i + bits.trailing_zeros() as usize;
                return (found < end).then_some(found);
            }
            i = (w + 1) * 64;
        }
        None
    }

    /// The first set bit at or after `from` (no wrap-around).
    pub fn next_set(&self, from: usize) -> Option<usize> {
        self.find(from.min(self.len), self.len, true)
    }

    /// The first set bit at or after `from`, wrapping around to bit 0 once: the order a
    /// background stream pushes in from its cursor.
    pub fn next_set_wrapping(&self, from: usize) -> Option<usize> {
        let from = from.min(self.len);
        self.find(from, self.len, true)
            .or_else(|| self.find(0, from, true))
    }

    /// Runs of set bits in order, read live as the iterator goes.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            bitmap: self,
            pos: 0,
        }
    }

    /// The words, bit `i` = bit `i % 64` of word `i / 64` (one load each).
    pub fn to_words(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.load(LOAD)).collect()
    }

    /// Writes the words into `out`, which must have [`Bitmap::words_for`]`(len)` entries.
    pub fn export_into(&self, out: &mut [u64]) -> Result<(), Error> {
        self.check_words(out.len())?;
        for (o, w) in out.iter_mut().zip(self.words.iter()) {
            *o = w.load(LOAD);
        }
        Ok(())
    }

    fn check_words(&self, got: usize) -> Result<(), Error> {
        if got != self.words.len() {
            return Err(Error::BitmapSize {
                got,
                want: self.words.len(),
            });
        }
        Ok(())
    }

    /// Checks that `words` fits: the right count, and no bit set beyond `len` (named as
    /// out of range: a peer's bitmap naming pages that do not exist is refused).
    fn check_import(&self, words: &[u64]) -> Result<(), Error> {
        self.check_words(words.len())?;
        if let Some(last) = words.len().checked_sub(1) {
            let beyond = words[last] & !self.valid(last);
            if beyond != 0 {
                let bit = last * 64 + beyond.trailing_zeros() as usize;
                return Err(Error::OutOfRange {
                    start: bit,
                    end: bit + 1,
                    len: self.len,
                });
            }
        }
        Ok(())
    }

    /// Replaces the bits with `words` (checked: right size, nothing beyond `len`).
    pub fn store_words(&self, words: &[u64]) -> Result<(), Error> {
        self.check_import(words)?;
        for (w, &src) in self.words.iter().zip(words) {
            w.store(src, STORE);
        }
        Ok(())
    }

    /// Replaces the bits with the complement of `words` within `len` (bit `i` set iff it
    /// is clear in `words`): e.g. "still needed" from a peer's received set.
    pub fn store_complement_of(&self, words: &[u64]) -> Result<(), Error> {
        self.check_import(words)?;
        for (k, (w, &src)) in self.words.iter().zip(words).enumerate() {
            w.store(!src & self.valid(k), STORE);
        }
        Ok(())
    }
}

/// Iterator over runs of set bits, see [`Bitmap::runs`].
#[derive(Debug)]
pub struct Runs<'a> {
    bitmap: &'a Bitmap,
    pos: usize,
}

impl Iterator for Runs<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        let len = self.bitmap.len;
        let start = self.bitmap.find(self.pos, len, true)?;
        let end = self.bitmap.find(start, len, false).unwrap_or(len);
        self.pos = end;
        Some(start..end)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn set_clear_report_the_previous_bit() {
        let b = Bitmap::new(130);
        assert!(!b.set(129));
        assert!(b.set(129));
        assert!(b.test(129));
        assert!(b.clear(129));
        assert!(!b.clear(129));
        assert!(!b.test(129));
        assert!(b.set(130), "beyond the end reads as set and is not stored");
        assert!(!b.test(130));
    }

    #[test]
    fn ranges_find_and_runs_cross_word_boundaries() {
        let b = Bitmap::new(200);
        b.set_range(60..70).expect("in range");
        b.set_range(128..130).expect("in range");
        b.set(199);
        assert_eq!(b.count(), 13);
        assert_eq!(b.next_set(0), Some(60));
        assert_eq!(b.next_set(70), Some(128));
        assert_eq!(b.next_set_wrapping(131), Some(199));
        assert_eq!(b.next_set(200), None);
        assert_eq!(
            b.runs().collect::<Vec<_>>(),
            vec![60..70, 128..130, 199..200]
        );
        b.clear_range(62..129).expect("in range");
        assert_eq!(
            b.runs().collect::<Vec<_>>(),
            vec![60..62, 129..130, 199..200]
        );
        assert!(b.set_range(190..201).is_err());
        b.clear(60);
        b.clear(61);
        b.clear(129);
        assert_eq!(b.next_set_wrapping(0), Some(199));
        b.clear(199);
        assert_eq!(b.next_set_wrapping(5), None);
        assert!(b.none());
    }

    #[test]
    fn words_round_trip_and_imports_refuse_bits_beyond_the_end() {
        let b = Bitmap::new(70);
        b.set(0);
        b.set(69);
        let words = b.to_words();
        assert_eq!(words, vec![1, 1 << 5]);
        let c = Bitmap::from_words(70, &words).expect("fits");
        assert_eq!(c.runs().collect::<Vec<_>>(), vec![0..1, 69..70]);
        assert_eq!(
            Bitmap::from_words(70, &[0, 1 << 6]).expect_err("bit 70 does not exist"),
            Error::OutOfRange {
                start: 70,
                end: 71,
                len: 70
            }
        );
        assert!(Bitmap::from_words(70, &[0]).is_err(), "too few words");
        c.store_complement_of(&words).expect("fits");
        assert_eq!(c.count(), 68);
        assert!(!c.test(0) && c.test(1) && c.test(68) && !c.test(69));
        c.fill();
        assert_eq!(c.count(), 70);
        c.clear_all();
        assert!(c.none());
        let mut out = vec![0; 2];
        b.export_into(&mut out).expect("sized");
        assert_eq!(out, words);
    }
}
