//! Opening a userfaultfd: `/dev/userfaultfd` first, the `userfaultfd(2)` syscall second.
//!
//! `/dev/userfaultfd` (since Linux 6.1) hands out fds that may handle kernel-mode faults
//! to whoever can open the device, independent of `vm.unprivileged_userfaultfd`. The
//! syscall path needs `CAP_SYS_PTRACE` for kernel-mode faults when that sysctl is 0, so an
//! unprivileged caller falls back to `UFFD_USER_MODE_ONLY` if it allows that.

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use crate::api::ApiInfo;
use crate::error::{Error, Op, Result};
use crate::features::{Features, Ioctls, INTERNAL_FEATURE_BITS};
use crate::sys;

/// How the fd was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenPath {
    /// `open("/dev/userfaultfd")` + `USERFAULTFD_IOC_NEW`.
    Device,
    /// The `userfaultfd(2)` system call.
    Syscall,
    /// Adopted from an fd that came from elsewhere (a socket, a fork event).
    Adopted,
}

/// Which open paths the builder may try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathPolicy {
    /// Device first; the syscall when the device is absent (ENOENT) or denied (EACCES).
    Auto,
    /// Only `/dev/userfaultfd`.
    DeviceOnly,
    /// Only the system call.
    SyscallOnly,
}

/// Whether the fd handles faults taken in kernel mode (e.g. a `read(2)` into the region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserMode {
    /// Ask for kernel-mode faults; fall back to user-mode-only when privilege requires it.
    Auto,
    /// Kernel-mode faults or fail.
    KernelFaults,
    /// `UFFD_USER_MODE_ONLY` (since Linux 5.11).
    UserOnly,
}

/// Builds a [`Uffd`]: open flags, open path, and the features to negotiate.
///
/// ```
/// use uffd_core::{Features, Uffd};
/// let uffd = Uffd::builder()
///     .non_blocking(true)
///     .require(Features::EVENT_REMOVE)
///     .optional(Features::THREAD_ID)
///     .open()?;
/// assert!(uffd.features().contains(Features::EVENT_REMOVE));
/// # Ok::<(), uffd_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct UffdBuilder {
    close_on_exec: bool,
    non_blocking: bool,
    user_mode: UserMode,
    path: PathPolicy,
    required: Features,
    optional: Features,
}

impl Default for UffdBuilder {
    fn default() -> Self {
        Self {
            close_on_exec: true,
            non_blocking: false,
            user_mode: UserMode::Auto,
            path: PathPolicy::Auto,
            required: Features::empty(),
            optional: Features::empty(),
        }
    }
}

impl UffdBuilder {
    /// `O_CLOEXEC` (default on).
    pub fn close_on_exec(mut self, on: bool) -> Self {
        self.close_on_exec = on;
        self
    }

    /// `O_NONBLOCK`: `read(2)` returns at once when no event is pending (default off).
    pub fn non_blocking(mut self, on: bool) -> Self {
        self.non_blocking = on;
        self
    }

    /// Kernel-mode fault handling policy (default [`UserMode::Auto`]).
    pub fn user_mode(mut self, mode: UserMode) -> Self {
        self.user_mode = mode;
        self
    }

    /// Which open paths to try (default [`PathPolicy::Auto`]).
    pub fn path(mut self, policy: PathPolicy) -> Self {
        self.path = policy;
        self
    }

    /// Features the handshake must get; [`UffdBuilder::open`] fails naming any missing.
    pub fn require(mut self, features: Features) -> Self {
        self.required |= features;
        self
    }

    /// Features to enable when the kernel has them.
    pub fn optional(mut self, features: Features) -> Self {
        self.optional |= features;
        self
    }

    fn open_flags(&self, user_only: bool) -> i32 {
        let mut flags = 0;
        if self.close_on_exec {
            flags |= libc::O_CLOEXEC;
        }
        if self.non_blocking {
            flags |= libc::O_NONBLOCK;
        }
        if user_only {
            flags |= sys::UFFD_USER_MODE_ONLY;
        }
        flags
    }

    /// Opens the fd without `UFFDIO_API`. The fd is unusable until [`Uffd::api`] succeeds;
    /// this exists for handshake tests and callers that negotiate by hand.
    pub fn open_unnegotiated(&self) -> Result<Uffd> {
        let (fd, path, user_mode_only) = self.open_fd()?;
        Ok(Uffd {
            fd,
            path,
            user_mode_only,
            features: Features::empty(),
            ioctls: Ioctls::empty(),
        })
    }

    /// Opens the fd and negotiates: probes the kernel's features on a throwaway fd (the
    /// handshake can run once per fd), then requests the required features plus the
    /// optional ones the kernel has.
    pub fn open(&self) -> Result<Uffd> {
        let wanted = self.required | self.optional;
        let request = if wanted.is_empty() {
            wanted
        } else {
            let supported = supported_features(self)?;
            let missing = self.required - supported;
            if !missing.is_empty() {
                return Err(Error::MissingFeatures { missing });
            }
            wanted & supported
        };
        let mut uffd = self.open_unnegotiated()?;
        uffd.api(sys::UFFD_API, request)?;
        Ok(uffd)
    }

    fn open_fd(&self) -> Result<(OwnedFd, OpenPath, bool)> {
        let user_only_first = self.user_mode == UserMode::UserOnly;
        let try_device = self.path != PathPolicy::SyscallOnly;
        let try_syscall = self.path != PathPolicy::DeviceOnly;
        let mut last = Errno::ENOENT;
        if try_device {
            match open_device(self.open_flags(user_only_first)) {
                Ok(fd) => return Ok((fd, OpenPath::Device, user_only_first)),
                Err(e @ (Errno::ENOENT | Errno::EACCES | Errno::EPERM)) if try_syscall => last = e,
                Err(errno) => {
                    return Err(Error::Os {
                        op: Op::Open,
                        errno,
                    })
                }
            }
        }
        if try_syscall {
            match open_syscall(self.open_flags(user_only_first)) {
                Ok(fd) => return Ok((fd, OpenPath::Syscall, user_only_first)),
                Err(Errno::EPERM) if self.user_mode == UserMode::Auto => {
                    let fd = open_syscall(self.open_flags(true)).map_err(|errno| Error::Os {
                        op: Op::Open,
                        errno,
                    })?;
                    return Ok((fd, OpenPath::Syscall, true));
                }
                Err(errno) => last = errno,
            }
        }
        Err(Error::Os {
            op: Op::Open,
            errno: last,
        })
    }
}

const DEVICE: &CStr = c"/dev/userfaultfd";

fn open_device(flags: i32) -> std::result::Result<OwnedFd, Errno> {
    // SAFETY: DEVICE is a NUL-terminated path; open has no other preconditions.
    let dev = unsafe { libc::open(DEVICE.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `dev` was just returned by open and is owned by nobody else.
    let dev = unsafe { OwnedFd::from_raw_fd(dev) };
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags as the integer argument.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), sys::USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the ioctl returned a fresh fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_syscall(flags: i32) -> std::result::Result<OwnedFd, Errno> {
    // SAFETY: userfaultfd(2) takes one integer flags argument.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the syscall returned a fresh fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Every feature the kernel supports, learned on a throwaway fd opened like `builder`'s.
pub(crate) fn supported_features(builder: &UffdBuilder) -> Result<Features> {
    let probe = builder.open_unnegotiated()?;
    Ok(probe.api_ioctl(sys::UFFD_API, Features::empty())?.features)
}

/// An open userfaultfd.
///
/// Owns its fd. `Send + Sync`: every operation is one system call, and the kernel
/// serialises what must be serialised, so many handler threads may share one `Uffd`.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    path: OpenPath,
    user_mode_only: bool,
    features: Features,
    ioctls: Ioctls,
}

impl Uffd {
    /// A builder with defaults: close-on-exec, blocking, [`UserMode::Auto`], no features.
    pub fn builder() -> UffdBuilder {
        UffdBuilder::default()
    }

    /// Opens and negotiates a blocking fd with `features` required.
    pub fn open(features: Features) -> Result<Uffd> {
        Uffd::builder().require(features).open()
    }

    /// Raw `UFFDIO_API` on this fd; on success records `features` as the negotiated set
    /// (the kernel enables exactly what was requested, or fails). A second call on the
    /// same fd fails (EINVAL) as the kernel requires.
    ///
    /// See `ioctl_userfaultfd(2)`. Since Linux 4.3.
    pub fn api(&mut self, version: u64, features: Features) -> Result<ApiInfo> {
        let info = self.api_ioctl(version, features)?;
        self.features = features;
        self.ioctls = info.ioctls;
        Ok(info)
    }

    /// Issues `UFFDIO_API` on this fd with the given API version and feature request.
    ///
    /// Low level: the kernel accepts one successful call per fd, refuses any version but
    /// [`sys::UFFD_API`] and any feature bit it does not know. [`UffdBuilder::open`]
    /// does the probe-then-request handshake; [`Uffd::api`] is the public way in. A method
    /// of `Uffd` only: on any other fd the number may mean another driver's ioctl.
    ///
    /// See `ioctl_userfaultfd(2)`, `UFFDIO_API`. Since Linux 4.3.
    pub(crate) fn api_ioctl(&self, version: u64, features: Features) -> Result<ApiInfo> {
        let mut arg = sys::uffdio_api {
            api: version,
            features: features.bits(),
            ioctls: 0,
        };
        // SAFETY: `self` is a userfaultfd (a `Uffd` holds nothing else), whose UFFDIO_API
        // reads and writes exactly one `uffdio_api`, which `arg` is.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_API as _, &mut arg) };
        if ret < 0 {
            return Err(Error::from_errno(Op::Api, Errno::last(), 0));
        }
        Ok(ApiInfo {
            features: Features::from_bits_retain(arg.features),
            ioctls: Ioctls::from_bits_retain(arg.ioctls),
        })
    }

    /// Adopts a userfaultfd that came from elsewhere (another process, over a socket), reading
    /// its negotiated features from `/proc/self/fdinfo`. Fails with EINVAL if `fd` is not
    /// a userfaultfd, or has not been through `UFFDIO_API`.
    pub fn from_fd(fd: OwnedFd) -> Result<Uffd> {
        let features = negotiated_features(fd.as_fd())?;
        Ok(Uffd {
            fd,
            path: OpenPath::Adopted,
            user_mode_only: false,
            features,
            ioctls: Ioctls::empty(),
        })
    }

    /// Adopts a fork event's fd, which inherits the parent context's features.
    pub(crate) fn from_fork(fd: OwnedFd, parent: &Uffd) -> Uffd {
        Uffd {
            fd,
            path: OpenPath::Adopted,
            user_mode_only: parent.user_mode_only,
            features: parent.features,
            ioctls: parent.ioctls,
        }
    }

    /// How this fd was obtained.
    pub fn open_path(&self) -> OpenPath {
        self.path
    }

    /// Whether the fd was opened `UFFD_USER_MODE_ONLY` (for adopted fds: unknown, `false`).
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The ioctls `UFFDIO_API` reported for this fd (empty for adopted fds).
    pub fn api_ioctls(&self) -> Ioctls {
        self.ioctls
    }

    /// Fails with [`Error::Unsupported`] unless every feature in `needed` was negotiated.
    pub(crate) fn need(&self, op: Op, needed: Features) -> Result<()> {
        let missing = needed - self.features;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::Unsupported { op, missing })
        }
    }

    /// Sets or clears `O_NONBLOCK` on the fd's open file description — for an adopted fd,
    /// which arrives as its creator opened it (`poll(2)` and several readers need it
    /// non-blocking). The description is shared with every other holder of the fd.
    ///
    /// See `fcntl(2)`, `F_SETFL`.
    pub fn set_non_blocking(&self, on: bool) -> Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let os = |errno| Error::Os {
            op: Op::Fcntl,
            errno,
        };
        let flags = OFlag::from_bits_retain(fcntl(self.fd.as_fd(), FcntlArg::F_GETFL).map_err(os)?);
        let flags = if on {
            flags | OFlag::O_NONBLOCK
        } else {
            flags - OFlag::O_NONBLOCK
        };
        fcntl(self.fd.as_fd(), FcntlArg::F_SETFL(flags)).map_err(os)?;
        Ok(())
    }

    /// Gives up ownership of the fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Reads the `API:` line of `/proc/self/fdinfo/FD` (`API:\t<api>:<features>:<ioctls>`).
fn negotiated_features(fd: BorrowedFd<'_>) -> Result<Features> {
    let not_uffd = || Error::InvalidArgument {
        op: Op::Adopt,
        reason: "not a userfaultfd that has been through UFFDIO_API",
    };
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|_| not_uffd_errno())?;
    if link.as_os_str() != "anon_inode:[userfaultfd]" {
        return Err(not_uffd());
    }
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .map_err(|_| not_uffd_errno())?;
    let features = info
        .lines()
        .find_map(|l| l.strip_prefix("API:"))
        .and_then(|rest| rest.trim().split(':').nth(1))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or_else(not_uffd)?;
    // The kernel's UFFD_FEATURE_INITIALIZED: set by UFFDIO_API, and only by it.
    if features & INTERNAL_FEATURE_BITS == 0 {
        return Err(not_uffd());
    }
    let features = features & !INTERNAL_FEATURE_BITS;
    Ok(Features::from_bits_retain(features))
}

fn not_uffd_errno() -> Error {
    Error::Os {
        op: Op::Adopt,
        errno: Errno::EBADF,
    }
}
