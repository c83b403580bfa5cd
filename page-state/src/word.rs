//! Word-parallel arithmetic on 32 two-bit page states packed in a `u64`.
//!
//! Masks here have one bit per page, at the low bit of its pair ("slot bits", a subset
//! of `LO`). Everything is branch-free bit arithmetic, so a range operation costs one
//! compare-and-swap per word however many of its 32 pages change.

use crate::state::{PageState, Transition};

/// Pages per word.
pub(crate) const PAGES_PER_WORD: usize = 32;
/// The low bit of every 2-bit slot.
pub(crate) const LO: u64 = 0x5555_5555_5555_5555;

/// Slot bits of the pages `first..last` of one word (`first < last <= 32`).
#[inline]
pub(crate) fn slots(first: usize, last: usize) -> u64 {
    debug_assert!(first < last && last <= PAGES_PER_WORD);
    let high = if last == PAGES_PER_WORD {
        u64::MAX
    } else {
        (1u64 << (2 * last)) - 1
    };
    let low = (1u64 << (2 * first)) - 1;
    (high & !low) & LO
}

/// Slot bits of the pages of `word` that are in `state`.
#[inline]
pub(crate) fn in_state(word: u64, state: PageState) -> u64 {
    let lo = word & LO;
    let hi = (word >> 1) & LO;
    match state {
        PageState::Missing => !lo & !hi & LO,
        PageState::Requested => lo & !hi,
        PageState::Received => hi & !lo,
        PageState::Zero => hi & lo,
    }
}

/// The result of applying a transition to some slots of a word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Applied {
    /// The new word.
    pub word: u64,
    /// Slots that changed state.
    pub changed: u64,
    /// Slots already in the target state (left as they are).
    pub already: u64,
    /// Slots whose state does not allow the transition (left as they are).
    pub refused: u64,
}

/// Slot bits of the pages of `word` from which `transition` is allowed, in closed form
/// (`lo`/`hi` are each slot's low and high bit: missing 00, requested 01, received 10,
/// zero 11). Must agree with [`Transition::allowed_from`]; a unit test checks all cases.
#[inline]
fn legal(word: u64, transition: Transition) -> u64 {
    let lo = word & LO;
    let hi = (word >> 1) & LO;
    match transition {
        Transition::Request => !lo & !hi & LO,
        Transition::Receive => (!hi | lo) & LO,
        Transition::Discard => hi & !lo,
        Transition::MarkZero => !lo & LO,
        Transition::Release => lo & !hi,
    }
}

/// Applies `transition` to the `slots` of `word`, per the transition table.
#[inline]
pub(crate) fn apply(word: u64, slots: u64, transition: Transition) -> Applied {
    let legal = legal(word, transition) & slots;
    let target = transition.target();
    let already = in_state(word, target) & slots;
    let refused = slots & !legal & !already;
    let target_bits = match target {
        PageState::Missing => 0,
        PageState::Requested => legal,
        PageState::Received => legal << 1,
        PageState::Zero => legal | (legal << 1),
    };
    Applied {
        word: (word & !(legal | (legal << 1))) | target_bits,
        changed: legal,
        already,
        refused,
    }
}

/// Packs the slot bits of a word (even bit positions) into the low 32 bits.
#[inline]
pub(crate) fn compress(x: u64) -> u64 {
    let mut x = x & LO;
    x = (x | (x >> 1)) & 0x3333_3333_3333_3333;
    x = (x | (x >> 2)) & 0x0F0F_0F0F_0F0F_0F0F;
    x = (x | (x >> 4)) & 0x00FF_00FF_00FF_00FF;
    x = (x | (x >> 8)) & 0x0000_FFFF_0000_FFFF;
    (x | (x >> 16)) & 0x0000_0000_FFFF_FFFF
}

/// Spreads the low 32 bits to slot bits: the inverse of [`compress`].
#[inline]
pub(crate) fn expand(x: u64) -> u64 {
    let mut x = x & 0xFFFF_FFFF;
    x = (x | (x << 16)) & 0x0000_FFFF_0000_FFFF;
    x = (x | (x << 8)) & 0x00FF_00FF_00FF_00FF;
    x = (x | (x << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
    x = (x | (x << 2)) & 0x3333_3333_3333_3333;
    (x | (x << 1)) & LO
}

/// The page index within its word of the lowest set slot bit.
#[inline]
pub(crate) fn first_slot(slots: u64) -> usize {
    slots.trailing_zeros() as usize / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_and_expand_are_inverse() {
        for x in [0u64, 1, 0xFFFF_FFFF, 0xDEAD_BEEF, 0x8000_0001, 0x1234_5678] {
            assert_eq!(compress(expand(x)), x);
        }
        assert_eq!(compress(LO), 0xFFFF_FFFF);
        assert_eq!(expand(0b101), 0b1_0001);
    }

    #[test]
    fn slots_cover_exactly_the_asked_pages() {
        assert_eq!(slots(0, 32), LO);
        assert_eq!(slots(0, 1), 1);
        assert_eq!(slots(31, 32), 1 << 62);
        assert_eq!(slots(1, 3), (1 << 2) | (1 << 4));
    }

    #[test]
    fn closed_form_legality_matches_the_table() {
        for t in Transition::ALL {
            for s in PageState::ALL {
                let word = s as u64;
                assert_eq!(
                    legal(word, t) & 1 == 1,
                    t.allowed_from(s),
                    "{t:?} from {s:?}"
                );
            }
        }
    }

    #[test]
    fn apply_follows_the_table_slot_by_slot() {
        // Pages 0..4 in states missing, requested, received, zero.
        let word = 0b11_10_01_00;
        let all = slots(0, 4);
        let zero = apply(word, all, Transition::MarkZero);
        assert_eq!(zero.word, 0b11_11_01_11);
        assert_eq!(zero.changed, 1 | (1 << 4));
        assert_eq!(zero.already, 1 << 6);
        assert_eq!(zero.refused, 1 << 2);
        let recv = apply(word, all, Transition::Receive);
        assert_eq!(recv.word, 0b10_10_10_10);
        assert_eq!(recv.refused, 0);
        let discard = apply(word, all, Transition::Discard);
        assert_eq!(discard.word, 0b11_00_01_00);
        assert_eq!(discard.refused, (1 << 2) | (1 << 6));
        let release = apply(word, all, Transition::Release);
        assert_eq!(release.word, 0b11_10_00_00);
        assert_eq!(release.changed, 1 << 2);
        assert_eq!(release.already, 1);
        assert_eq!(release.refused, (1 << 4) | (1 << 6));
    }
}
