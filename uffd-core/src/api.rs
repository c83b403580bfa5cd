//! `UFFDIO_API`: the handshake. The feature and ioctl bit sets it speaks in live in
//! [`crate::features`] and are re-exported here.
//!
//! See `ioctl_userfaultfd(2)` and `Documentation/admin-guide/mm/userfaultfd.rst`.
//!
//! `UFFDIO_API` is issued only on a [`Uffd`](crate::Uffd) ([`Uffd::api`](crate::Uffd::api)),
//! never on just any fd: another driver may give the same number another meaning, and
//! write more than a `uffdio_api` where the argument points. Safe code cannot name one:
//!
//! ```compile_fail,E0603
//! use std::os::fd::AsFd;
//! let null = std::fs::File::open("/dev/null")?;
//! let version = uffd_core::sys::UFFD_API;
//! uffd_core::api::api_ioctl(null.as_fd(), version, uffd_core::Features::empty())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::os::fd::AsRawFd;

use nix::errno::Errno;

use crate::error::{Error, Op, Result};
use crate::sys;
use crate::Uffd;

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

/// Issues `UFFDIO_API` on `uffd` with the given API version and feature request.
///
/// Low level: the kernel accepts one successful call per fd, refuses any version but
/// [`sys::UFFD_API`] and any feature bit it does not know. [`crate::UffdBuilder::open`]
/// does the probe-then-request handshake; [`crate::Uffd::api`] is the public way in.
///
/// See `ioctl_userfaultfd(2)`, `UFFDIO_API`. Since Linux 4.3.
pub(crate) fn api_ioctl(uffd: &Uffd, version: u64, features: Features) -> Result<ApiInfo> {
    let mut arg = sys::uffdio_api {
        api: version,
        features: features.bits(),
        ioctls: 0,
    };
    // SAFETY: `uffd` is a userfaultfd (a `Uffd` holds nothing else), whose UFFDIO_API
    // reads and writes exactly one `uffdio_api`, which `arg` is.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), sys::UFFDIO_API as _, &mut arg) };
    if ret < 0 {
        return Err(Error::from_errno(Op::Api, Errno::last(), 0));
    }
    Ok(ApiInfo {
        features: Features::from_bits_retain(arg.features),
        ioctls: Ioctls::from_bits_retain(arg.ioctls),
    })
}
