//! `UFFDIO_API`: the handshake. The feature and ioctl bit sets it speaks in live in
//! [`crate::features`] and are re-exported here.
//!
//! See `ioctl_userfaultfd(2)` and `Documentation/admin-guide/mm/userfaultfd.rst`.
//!
//! `UFFDIO_API` is issued only on a [`Uffd`](crate::Uffd) ([`Uffd::api`](crate::Uffd::api)),
//! never on just any fd: another driver may give the same number another meaning, and
//! write more than a `uffdio_api` where the argument points. The ioctl itself is a private
//! method of `Uffd`; the public function that took any fd is gone:
//!
//! ```compile_fail,E0425
//! use std::os::fd::AsFd;
//! let null = std::fs::File::open("/dev/null")?;
//! let version = uffd_core::sys::UFFD_API;
//! uffd_core::api::api_ioctl(null.as_fd(), version, uffd_core::Features::empty())?; // gone
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

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
