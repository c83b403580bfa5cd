//! Files no other local user can steer: the one place the workspace creates and opens
//! files that hold guest memory or keys, or that live where another user could plant
//! something (the chunk cache, temporary directories, outputs, key files).
//!
//! The threat is a local user without privileges (a tenant, a jailed VMM of another VM)
//! attacking a root `uffdkit` on the same host: planting symlinks so that root truncates
//! or writes a file of the attacker's choosing, FIFOs so that an open blocks forever,
//! pre-created directories it owns, and reading guest memory left world-readable. So:
//!
//! - [`PrivateDir`] is a directory checked the way OpenSSH's `StrictModes` checks a home
//!   directory: every path component owned by root or the effective user and not
//!   writable by group or others (a root-owned sticky directory such as `/tmp` is allowed
//!   as an ancestor: nobody else can rename or remove what we own in it), the directory
//!   itself owned by the effective user and created 0700. It is walked component by
//!   component with `openat(O_NOFOLLOW)` (a link followed only if root or we own it) and
//!   kept open: every later operation is relative to its fd, so a path swapped after the
//!   check is never followed.
//! - Files in it are opened with `O_NOFOLLOW | O_NONBLOCK` and checked by `fstat` to be
//!   regular files (a FIFO cannot block an open, a device is refused); temporaries are
//!   `O_EXCL` with unguessable names; everything is created 0600.
//! - [`TempDir`] is `mkdtemp(3)` — never a fixed or pid-derived name.
//! - [`open_regular`], [`create_private`] and [`read_secret`] do the same for a path the
//!   user named: a memory file, an output, a key file.
//!
//! Why here, in uffd-core: every crate that creates such files (chunked's cache, the
//! snapshot sink, postcopy's key files, the CLI) already depends on this one, and the
//! calls are thin wrappers of kernel calls, as the rest of the crate is.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::geteuid;

mod dir;
mod file;

pub use dir::{PrivateDir, TempDir};
pub use file::{create_private, create_temp_for, create_temp_in, open_regular, read_secret};

/// Why a file or directory was refused, or an operation on it failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    /// Owned by another user: whoever owns it can rename, replace or plant in it.
    #[error("{path} is owned by uid {owner}, not by uid {euid} or root: refusing it (another user controls it)")]
    NotOwned {
        /// The refused path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        euid: u32,
    },
    /// Writable by group or others (and not a root-owned sticky directory).
    #[error("{path} is writable by group or others (mode {mode:04o}): refusing it")]
    Writable {
        /// The refused path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not the kind of file expected (a FIFO, a device, a symlink, a directory...).
    #[error("{path} is a {found}, not a {expected}: refusing it")]
    WrongKind {
        /// The refused path.
        path: PathBuf,
        /// What it is.
        found: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// A secret readable by group or others.
    #[error("{path} is readable by group or others (mode {mode:04o}): refusing a key others can read (chmod 600 it, or allow it explicitly)")]
    Exposed {
        /// The refused path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Longer than anything of its kind can be.
    #[error("{path} is longer than {max} bytes: refusing it")]
    TooLarge {
        /// The refused path.
        path: PathBuf,
        /// The bound.
        max: u64,
    },
    /// An output with other hard links: writing it would write them too.
    #[error("{path} has {links} hard links: refusing to write through them")]
    HardLinked {
        /// The refused path.
        path: PathBuf,
        /// Its link count.
        links: u64,
    },
    /// A system call failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
}

/// Results of this module.
pub type Result<T, E = FsError> = std::result::Result<T, E>;

fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(Errno) -> FsError {
    let path = path.into();
    move |e| FsError::Io {
        op,
        path,
        source: std::io::Error::from(e),
    }
}

fn kind_name(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => "regular file",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFLNK => "symbolic link",
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFCHR => "character device",
        _ => "file of unknown kind",
    }
}

fn is(st: &FileStat, kind: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == kind.bits()
}

fn expect_kind(st: &FileStat, kind: SFlag, path: &Path) -> Result<()> {
    if is(st, kind) {
        return Ok(());
    }
    Err(FsError::WrongKind {
        path: path.to_owned(),
        found: kind_name(st.st_mode),
        expected: kind_name(kind.bits()),
    })
}

/// Mode bits of "writable by group or others".
const GROUP_OTHER_WRITE: u32 = 0o022;
/// Mode bits of "any access by group or others".
const GROUP_OTHER_ANY: u32 = 0o077;

/// Refuses what neither root nor the effective user owns: its owner could change it.
fn owned_by_root_or_us(st: &FileStat, path: &Path) -> Result<()> {
    let euid = geteuid().as_raw();
    if st.st_uid != 0 && st.st_uid != euid {
        return Err(FsError::NotOwned {
            path: path.to_owned(),
            owner: st.st_uid,
            euid,
        });
    }
    Ok(())
}

/// A directory on the way to ours: owned by root or us, and nobody else can change its
/// entries (not writable by group/other, or a root-owned sticky directory like `/tmp`,
/// where others cannot rename or remove what is not theirs).
fn check_ancestor(st: &FileStat, path: &Path) -> Result<()> {
    expect_kind(st, SFlag::S_IFDIR, path)?;
    owned_by_root_or_us(st, path)?;
    let sticky = st.st_mode & Mode::S_ISVTX.bits() != 0;
    if st.st_mode & GROUP_OTHER_WRITE != 0 && !(sticky && st.st_uid == 0) {
        return Err(FsError::Writable {
            path: path.to_owned(),
            mode: st.st_mode & 0o7777,
        });
    }
    Ok(())
}

/// Our own directory: owned by the effective user, writable by nobody else.
fn check_own_dir(st: &FileStat, path: &Path) -> Result<()> {
    expect_kind(st, SFlag::S_IFDIR, path)?;
    let euid = geteuid().as_raw();
    if st.st_uid != euid {
        return Err(FsError::NotOwned {
            path: path.to_owned(),
            owner: st.st_uid,
            euid,
        });
    }
    if st.st_mode & GROUP_OTHER_WRITE != 0 {
        return Err(FsError::Writable {
            path: path.to_owned(),
            mode: st.st_mode & 0o7777,
        });
    }
    Ok(())
}

/// Clears `O_NONBLOCK` once the open (which a FIFO could have blocked) is done.
fn blocking(fd: OwnedFd, path: &Path) -> Result<File> {
    let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(io("fcntl", path))?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(&fd, FcntlArg::F_SETFL(flags)).map_err(io("fcntl", path))?;
    Ok(File::from(fd))
}

/// 128 random bits as hex, from the kernel's CSPRNG: a name nobody can guess.
pub fn unguessable_name() -> Result<String> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| FsError::Io {
            op: "read",
            path: "/dev/urandom".into(),
            source,
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `st` describes a regular file (for callers sorting [`PrivateDir::entries`]).
pub fn is_regular(st: &FileStat) -> bool {
    is(st, SFlag::S_IFREG)
}

/// Whether `st` describes a directory.
pub fn is_dir(st: &FileStat) -> bool {
    is(st, SFlag::S_IFDIR)
}

/// Bytes a file really takes on disk: its allocated blocks, not its length (a sparse file
/// claiming terabytes takes what it takes).
pub fn allocated_bytes(st: &FileStat) -> u64 {
    (st.st_blocks as u64).saturating_mul(512)
}
