//! `UFFDIO_API`: the handshake. The feature and ioctl bit sets it speaks in live in
//! [`crate::features`] and are re-exported here.
//!
//! See `ioctl_userfaultfd(2)` and `Documentation/admin-guide/mm/userfaultfd.rst`.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

use crate::error::{Error, Op, Result};
use crate::sys;

pub use crate::features::{Features, Ioctls};

/// What a successful `UFFDIO_API` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiInfo {
    /// Every feature the kernel supports. (Not the enabled set: on success the kernel
    /// enables exactly the features requested.)
    pub features: Features,
    /// The ioctls the fd accepts.
    pub ioctls: Ioctls,
}

/// Issues `UFFDIO_API` on `fd` with the given API version and feature request.
///
/// Low level: the kernel accepts one successful call per fd, refuses any version but
/// [`sys::UFFD_API`] and any feature bit it does not know. [`crate::UffdBuilder::open`]
/// does the probe-then-request handshake for you.
///
/// See `ioctl_userfaultfd(2)`, `UFFDIO_API`. Since Linux 4.3.
pub fn api_ioctl(fd: BorrowedFd<'_>, version: u64, features: Features) -> Result<ApiInfo> {
    let mut arg = sys::uffdio_api {
        api: version,
        features: features.bits(),
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`, which `arg` is.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as _, &mut arg) };
    if ret < 0 {
        return Err(Error::from_errno(Op::Api, Errno::last(), 0));
    }
    Ok(ApiInfo {
        features: Features::from_bits_retain(arg.features),
        ioctls: Ioctls::from_bits_retain(arg.ioctls),
    })
}
