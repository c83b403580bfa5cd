//! Typed errors: the kernel's answers that a pager acts on get their own variant.

use std::fmt;

use nix::errno::Errno;

use crate::features::Features;

/// The userfaultfd operation an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// Opening the fd (`/dev/userfaultfd` or `userfaultfd(2)`).
    Open,
    /// `UFFDIO_API`.
    Api,
    /// `UFFDIO_REGISTER`.
    Register,
    /// `UFFDIO_UNREGISTER`.
    Unregister,
    /// `UFFDIO_WAKE`.
    Wake,
    /// `UFFDIO_COPY`.
    Copy,
    /// `UFFDIO_ZEROPAGE`.
    Zeropage,
    /// `UFFDIO_WRITEPROTECT`.
    Writeprotect,
    /// `UFFDIO_CONTINUE`.
    Continue,
    /// `UFFDIO_POISON`.
    Poison,
    /// `UFFDIO_MOVE`.
    Move,
    /// `PAGEMAP_SCAN` on `/proc/self/pagemap`.
    PagemapScan,
    /// `read(2)` of events.
    Read,
    /// `poll(2)` on the fd.
    Poll,
    /// Adopting an fd that came from elsewhere.
    Adopt,
    /// `fcntl(2)` on the fd (its status flags).
    Fcntl,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Op::Open => "open userfaultfd",
            Op::Api => "UFFDIO_API",
            Op::Register => "UFFDIO_REGISTER",
            Op::Unregister => "UFFDIO_UNREGISTER",
            Op::Wake => "UFFDIO_WAKE",
            Op::Copy => "UFFDIO_COPY",
            Op::Zeropage => "UFFDIO_ZEROPAGE",
            Op::Writeprotect => "UFFDIO_WRITEPROTECT",
            Op::Continue => "UFFDIO_CONTINUE",
            Op::Poison => "UFFDIO_POISON",
            Op::Move => "UFFDIO_MOVE",
            Op::PagemapScan => "PAGEMAP_SCAN",
            Op::Read => "read userfaultfd events",
            Op::Poll => "poll userfaultfd",
            Op::Adopt => "adopt userfaultfd",
            Op::Fcntl => "fcntl userfaultfd",
        };
        f.write_str(name)
    }
}

/// An error from the userfaultfd interface.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// EEXIST: the destination is already mapped. A pager wakes the waiter and moves on.
    #[error("{op}: a page is already mapped at the destination (EEXIST)")]
    Exists {
        /// The operation.
        op: Op,
    },
    /// EAGAIN: the address space is changing (an unread REMOVE/UNMAP/REMAP event), or the
    /// operation stopped part way. `done` bytes were placed; retry the rest after reading
    /// the pending events.
    #[error("{op}: address space changing, {done} bytes done (EAGAIN)")]
    Again {
        /// The operation.
        op: Op,
        /// Bytes completed before the kernel stopped.
        done: usize,
    },
    /// ESRCH / ENOSPC: the process owning the registered memory has exited.
    #[error("{op}: the faulting process is gone ({errno})")]
    ProcessGone {
        /// The operation.
        op: Op,
        /// ESRCH or ENOSPC.
        errno: Errno,
    },
    /// ENOENT: the range is no longer mapped or registered (it was unmapped or moved).
    #[error("{op}: the range is no longer registered (ENOENT)")]
    RangeGone {
        /// The operation.
        op: Op,
    },
    /// The fd was not negotiated with a feature this operation needs, or the kernel lacks it.
    #[error("{op}: unsupported without feature(s) {missing:?}")]
    Unsupported {
        /// The operation.
        op: Op,
        /// The features that would make it supported.
        missing: Features,
    },
    /// The handshake asked for features this kernel does not offer.
    #[error("this kernel lacks userfaultfd feature(s): {}", missing.names().join(", "))]
    MissingFeatures {
        /// The features asked for and not offered.
        missing: Features,
    },
    /// An argument the kernel would refuse, caught before the call.
    #[error("{op}: invalid argument: {reason}")]
    InvalidArgument {
        /// The operation.
        op: Op,
        /// What is wrong.
        reason: &'static str,
    },
    /// Any other errno.
    #[error("{op}: {errno}")]
    Os {
        /// The operation.
        op: Op,
        /// The raw errno.
        errno: Errno,
    },
}

impl Error {
    /// Classifies an errno returned by `op`. `written_back` is the result field the kernel
    /// fills for the placement ioctls (bytes done, or a negative errno), 0 for the others.
    pub(crate) fn from_errno(op: Op, errno: Errno, written_back: i64) -> Self {
        match errno {
            Errno::EEXIST => Error::Exists { op },
            // The kernel writes either the bytes done or -EAGAIN into the result field
            // (older kernels leave it untouched, i.e. 0): never read a negative as a count.
            Errno::EAGAIN => Error::Again {
                op,
                done: usize::try_from(written_back.max(0)).unwrap_or(0),
            },
            Errno::ESRCH | Errno::ENOSPC => Error::ProcessGone { op, errno },
            Errno::ENOENT => Error::RangeGone { op },
            errno => Error::Os { op, errno },
        }
    }

    /// The raw errno behind this error, where there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Exists { .. } => Some(Errno::EEXIST),
            Error::Again { .. } => Some(Errno::EAGAIN),
            Error::ProcessGone { errno, .. } | Error::Os { errno, .. } => Some(*errno),
            Error::RangeGone { .. } => Some(Errno::ENOENT),
            Error::Unsupported { .. } | Error::InvalidArgument { .. } => Some(Errno::EINVAL),
            Error::MissingFeatures { .. } => Some(Errno::EINVAL),
        }
    }

    /// The operation that failed (`None` for a handshake feature mismatch).
    pub fn op(&self) -> Option<Op> {
        match self {
            Error::Exists { op }
            | Error::Again { op, .. }
            | Error::ProcessGone { op, .. }
            | Error::RangeGone { op }
            | Error::Unsupported { op, .. }
            | Error::InvalidArgument { op, .. }
            | Error::Os { op, .. } => Some(*op),
            Error::MissingFeatures { .. } => None,
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind_errno = e.errno().unwrap_or(Errno::EIO);
        std::io::Error::new(
            std::io::Error::from_raw_os_error(kind_errno as i32).kind(),
            e,
        )
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
