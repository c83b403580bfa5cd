//! `UFFDIO_REGISTER` / `UFFDIO_UNREGISTER`: which memory this fd serves, and how.

use bitflags::bitflags;

use crate::error::{Error, Op, Result};
use crate::features::Ioctls;
use crate::open::Uffd;
use crate::sys;

bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct RegisterMode: u64 {
        /// Faults on pages with no backing page (since Linux 4.3).
        const MISSING = sys::UFFDIO_REGISTER_MODE_MISSING;
        /// Writes to write-protected pages (since Linux 5.7).
        const WP = sys::UFFDIO_REGISTER_MODE_WP;
        /// Faults on pages present in the page cache but not mapped: shmem and hugetlbfs
        /// only (since Linux 5.13).
        const MINOR = sys::UFFDIO_REGISTER_MODE_MINOR;
    }
}

impl RegisterMode {
    /// Mode names without the prefix, joined with `|`.
    pub fn label(&self) -> String {
        let names: Vec<&str> = self.iter_names().map(|(n, _)| n).collect();
        if names.is_empty() {
            "NONE".to_string()
        } else {
            names.join("|")
        }
    }
}

/// Rejects ranges the kernel would: zero length, or start/len not page aligned.
pub(crate) fn check_range(op: Op, start: usize, len: usize) -> Result<()> {
    let page = page_size();
    if len == 0 {
        return Err(Error::InvalidArgument {
            op,
            reason: "zero-length range",
        });
    }
    if start % page != 0 || len % page != 0 {
        return Err(Error::InvalidArgument {
            op,
            reason: "range start and length must be page aligned",
        });
    }
    Ok(())
}

/// The base page size of this system.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

impl Uffd {
    /// Registers `[start, start + len)` with `mode` and returns the ioctls the kernel allows
    /// on the range. The range must be mapped and page aligned (huge-page aligned for
    /// hugetlb); it may lie in another process if this fd came from there.
    ///
    /// See `ioctl_userfaultfd(2)`, `UFFDIO_REGISTER`. Since Linux 4.3 (WP 5.7, MINOR 5.13).
    pub fn register(&self, start: usize, len: usize, mode: RegisterMode) -> Result<Ioctls> {
        check_range(Op::Register, start, len)?;
        let mut arg = sys::uffdio_register {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        self.range_ioctl(Op::Register, sys::UFFDIO_REGISTER, &mut arg, |_| 0, len)?;
        Ok(Ioctls::from_bits_retain(arg.ioctls))
    }

    /// Unregisters `[start, start + len)`; threads waiting on faults there are woken and
    /// retry the fault without userfaultfd.
    ///
    /// See `ioctl_userfaultfd(2)`, `UFFDIO_UNREGISTER`. Since Linux 4.3.
    pub fn unregister(&self, start: usize, len: usize) -> Result<()> {
        check_range(Op::Unregister, start, len)?;
        let mut arg = sys::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        self.range_ioctl(Op::Unregister, sys::UFFDIO_UNREGISTER, &mut arg, |_| 0, len)
            .map(drop)
    }
}
