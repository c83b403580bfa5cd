//! The four page states and the transition table.

use std::fmt;

/// The state of one page: 2 bits in the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    /// Not yet received or requested.
    Missing = 0,
    /// Asked of the source, not yet placed: later faults must not ask again.
    Requested = 1,
    /// Placed in memory: a fault here only needs a wake.
    Received = 2,
    /// Known to be zero (a hole, or dropped by `MADV_DONTNEED`): place a zero page, never fetch.
    Zero = 3,
}

impl PageState {
    /// All states, in encoding order.
    pub const ALL: [PageState; 4] = [
        PageState::Missing,
        PageState::Requested,
        PageState::Received,
        PageState::Zero,
    ];

    /// Decodes the low 2 bits.
    #[inline]
    pub fn from_bits(bits: u64) -> PageState {
        match bits & 3 {
            0 => PageState::Missing,
            1 => PageState::Requested,
            2 => PageState::Received,
            _ => PageState::Zero,
        }
    }
}

impl fmt::Display for PageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageState::Missing => "missing",
            PageState::Requested => "requested",
            PageState::Received => "received",
            PageState::Zero => "zero",
        })
    }
}

/// A state change a caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// A fault: missing → requested.
    Request,
    /// A page arrived or was placed: missing / requested / zero → received.
    Receive,
    /// Discard during setup (the source will resend): received → missing.
    Discard,
    /// A hole, or a REMOVE: missing / received → zero.
    MarkZero,
    /// A claim given back (the placement could not be made now): requested → missing,
    /// in one step, so no other thread ever sees the page in a state it was not in.
    Release,
}

impl Transition {
    /// The state the page ends in.
    #[inline]
    pub fn target(self) -> PageState {
        match self {
            Transition::Request => PageState::Requested,
            Transition::Receive => PageState::Received,
            Transition::Discard => PageState::Missing,
            Transition::MarkZero => PageState::Zero,
            Transition::Release => PageState::Missing,
        }
    }

    /// Every transition, in declaration order.
    pub const ALL: [Transition; 5] = [
        Transition::Request,
        Transition::Receive,
        Transition::Discard,
        Transition::MarkZero,
        Transition::Release,
    ];

    /// Whether the table allows this transition from `from`. A page already in the
    /// target state is not a transition and is not allowed here.
    #[inline]
    pub fn allowed_from(self, from: PageState) -> bool {
        use PageState::*;
        matches!(
            (self, from),
            (Transition::Request, Missing)
                | (Transition::Receive, Missing | Requested | Zero)
                | (Transition::Discard, Received)
                | (Transition::MarkZero, Missing | Received)
                | (Transition::Release, Requested)
        )
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transition::Request => "request",
            Transition::Receive => "receive",
            Transition::Discard => "discard",
            Transition::MarkZero => "mark zero",
            Transition::Release => "release",
        })
    }
}
