//! Refusals: an illegal transition (never applied) or a page beyond the map.

use crate::state::{PageState, Transition};

/// A transition the table does not allow, refused and left unapplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("page {page}: cannot {transition} a {found} page")]
pub struct TransitionError {
    /// The page index.
    pub page: usize,
    /// The state the page was in.
    pub found: PageState,
    /// What was tried.
    pub transition: Transition,
}

/// Errors of the page state map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An illegal transition on one page.
    #[error(transparent)]
    Illegal(#[from] TransitionError),
    /// A range operation refused some pages (left untouched) and applied the rest.
    #[error("{refused} page(s) refused ({changed} changed); first: {first}")]
    PartlyRefused {
        /// The lowest refused page.
        first: TransitionError,
        /// How many pages were refused.
        refused: usize,
        /// How many pages changed state.
        changed: usize,
    },
    /// A page index or range beyond the map.
    #[error("pages {start}..{end} out of range for a map of {len} pages")]
    OutOfRange {
        /// Start of the offending range.
        start: usize,
        /// End of the offending range (exclusive).
        end: usize,
        /// The map's length.
        len: usize,
    },
    /// An imported bitmap of the wrong size.
    #[error("bitmap of {got} words for a map needing {want}")]
    BitmapSize {
        /// Words given.
        got: usize,
        /// Words needed.
        want: usize,
    },
}
