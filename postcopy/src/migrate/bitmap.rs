//! A fixed-size atomic bitmap: the source's "still needed" map, shared by its stream and
//! urgent threads, and the destination's received bitmap on the wire.

use std::sync::atomic::{AtomicU64, Ordering};

/// `len` bits, all atomic.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    len: u64,
}

impl AtomicBitmap {
    /// `len` clear bits.
    pub fn new(len: u64) -> Self {
        Self {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// Bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    // Orderings: every bit is claimed with an RMW (test_and_clear), so two threads never
    // both win a bit; the bits guard no other memory (page data travels over sockets,
    // ordered by the socket), hence Relaxed throughout.

    /// Sets bit `i`.
    pub fn set(&self, i: u64) {
        self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Relaxed);
    }

    /// Clears bit `i`.
    pub fn clear(&self, i: u64) {
        self.words[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::Relaxed);
    }

    /// Bit `i`.
    pub fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }

    /// Clears bit `i`; true if this call cleared it (it was set).
    pub fn test_and_clear(&self, i: u64) -> bool {
        let bit = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!bit, Ordering::Relaxed) & bit != 0
    }

    /// Sets every bit.
    pub fn fill(&self) {
        for (k, w) in self.words.iter().enumerate() {
            w.store(self.mask(k), Ordering::Relaxed);
        }
    }

    fn mask(&self, word: usize) -> u64 {
        let tail = self.len - word as u64 * 64;
        if tail >= 64 {
            !0
        } else {
            (1 << tail) - 1
        }
    }

    /// Set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// The first set bit at or after `from`, wrapping around once.
    pub fn next_set_wrapping(&self, from: u64) -> Option<u64> {
        let from = if from >= self.len { 0 } else { from };
        self.next_set_in(from, self.len)
            .or_else(|| self.next_set_in(0, from))
    }

    fn next_set_in(&self, from: u64, end: u64) -> Option<u64> {
        let mut i = from;
        while i < end {
            let w = self.words[(i / 64) as usize].load(Ordering::Relaxed) >> (i % 64);
            if w != 0 {
                let found = i + u64::from(w.trailing_zeros());
                return (found < end).then_some(found);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// The words, bit i = page i.
    pub fn to_words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }

    /// Sets this bitmap to the complement of `words` (bit i of the result = page i is
    /// *not* in `words`), within `len`. `words` must have `ceil(len / 64)` entries.
    pub fn set_complement_of(&self, words: &[u64]) {
        for (k, (w, src)) in self.words.iter().zip(words).enumerate() {
            w.store(!src & self.mask(k), Ordering::Relaxed);
        }
    }

    /// Runs of set bits as (first, count).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(first) = self.next_set_in(i, self.len) {
            let mut end = first + 1;
            while end < self.len && self.get(end) {
                end += 1;
            }
            out.push((first, end - first));
            i = end;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_find_count_runs_and_complement() {
        let b = AtomicBitmap::new(130);
        for i in [0, 1, 2, 63, 64, 100, 129] {
            b.set(i);
        }
        assert_eq!(b.count(), 7);
        assert_eq!(b.next_set_wrapping(3), Some(63));
        assert_eq!(b.next_set_wrapping(101), Some(129));
        assert!(b.test_and_clear(129));
        assert!(!b.test_and_clear(129));
        assert_eq!(b.next_set_wrapping(101), Some(0));
        assert_eq!(b.runs(), vec![(0, 3), (63, 2), (100, 1)]);
        let c = AtomicBitmap::new(130);
        c.set_complement_of(&b.to_words());
        assert_eq!(c.count(), 130 - 6);
        assert!(!c.get(64) && c.get(65) && c.get(129));
        c.fill();
        assert_eq!(c.count(), 130);
    }
}
