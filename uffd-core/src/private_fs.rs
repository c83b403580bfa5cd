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

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, openat, AtFlags, FcntlArg, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{geteuid, unlinkat, UnlinkatFlags};

/// Why a file or directory was refused, or an operation on it failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    /// Owned by another user: whoever owns it can rename, replace or plant in it.
    #[error("{path} is owned by uid {owner}, not by uid {euid} or root: refusing it (another user could plant links in it)")]
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

/// Symbolic links followed in one path at most (as the kernel's `MAXSYMLINKS`).
const MAX_LINKS: u32 = 40;

/// The names of `path`'s components, `..` kept (resolved by the walk, not lexically).
fn names(path: &Path) -> std::collections::VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Mode bits of "writable by group or others".
const GROUP_OTHER_WRITE: u32 = 0o022;
/// Mode bits of "any access by group or others".
const GROUP_OTHER_ANY: u32 = 0o077;

/// A directory on the way to ours: owned by root or us, and nobody else can change its
/// entries (not writable by group/other, or a root-owned sticky directory like `/tmp`,
/// where others cannot rename or remove what is not theirs).
fn check_ancestor(st: &FileStat, path: &Path) -> Result<()> {
    expect_kind(st, SFlag::S_IFDIR, path)?;
    let euid = geteuid().as_raw();
    if st.st_uid != 0 && st.st_uid != euid {
        return Err(FsError::NotOwned {
            path: path.to_owned(),
            owner: st.st_uid,
            euid,
        });
    }
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

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Opens directory `name` in `dir` without following a link.
fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr, shown: &Path) -> Result<(OwnedFd, FileStat)> {
    let fd = openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(|e| match e {
        // O_NOFOLLOW on a symlink: ELOOP; O_DIRECTORY on something else: ENOTDIR.
        Errno::ELOOP | Errno::ENOTDIR => match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => FsError::WrongKind {
                path: shown.to_owned(),
                found: kind_name(st.st_mode),
                expected: "directory",
            },
            Err(e) => io("open", shown)(e),
        },
        e => io("open", shown)(e),
    })?;
    let st = fstat(&fd).map_err(io("stat", shown))?;
    Ok((fd, st))
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

/// A directory of ours, checked and held open (see the module docs).
#[derive(Debug)]
pub struct PrivateDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl PrivateDir {
    /// Opens `path`, creating what is missing (0700), after checking every component:
    /// ancestors owned by root or us and not writable by others (root-owned sticky
    /// directories allowed), the directory itself owned by us and not writable by others.
    ///
    /// The walk goes component by component from `/`, each opened with `O_NOFOLLOW`
    /// relative to the last. A symbolic link on the way (`/var/run` → `/run`) is followed
    /// only if root or we own it — its directory, already checked, lets nobody else
    /// replace it — so a link another user planted in a shared directory is refused, not
    /// followed somewhere of its choosing. An existing directory's mode is left as it is
    /// (only created ones are 0700): what we put in it is 0600 regardless.
    pub fn open_or_create(path: &Path) -> Result<PrivateDir> {
        let absolute = std::path::absolute(path).map_err(|source| FsError::Io {
            op: "resolve",
            path: path.to_owned(),
            source,
        })?;
        let euid = geteuid().as_raw();
        let root =
            openat(nix::fcntl::AT_FDCWD, "/", DIR_FLAGS, Mode::empty()).map_err(io("open", "/"))?;
        let root_st = fstat(&root).map_err(io("stat", "/"))?;
        // The directories walked so far, `/` first: `..` steps back along them.
        let mut walked = vec![(root, root_st, PathBuf::from("/"))];
        let mut queue = names(&absolute);
        let mut links = 0;
        while let Some(name) = queue.pop_front() {
            if name == ".." {
                if walked.len() > 1 {
                    walked.pop();
                }
                continue;
            }
            let (dir, st, shown) = walked.last().expect("/ is never popped");
            check_ancestor(st, shown)?;
            let next = shown.join(&name);
            match fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(link) if is(&link, SFlag::S_IFLNK) => {
                    if link.st_uid != 0 && link.st_uid != euid {
                        return Err(FsError::NotOwned {
                            path: next,
                            owner: link.st_uid,
                            euid,
                        });
                    }
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(io("resolve", &absolute)(Errno::ELOOP));
                    }
                    let target = nix::fcntl::readlinkat(dir, name.as_os_str())
                        .map_err(io("read the link", &next))?;
                    let target = Path::new(&target);
                    if target.is_absolute() {
                        walked.truncate(1);
                    }
                    for n in names(target).into_iter().rev() {
                        queue.push_front(n);
                    }
                    continue;
                }
                Ok(_) => {}
                Err(Errno::ENOENT) => match mkdirat(dir, name.as_os_str(), Mode::S_IRWXU) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(io("create", &next)(e)),
                },
                Err(e) => return Err(io("stat", &next)(e)),
            }
            let (fd, st) = open_dir_at(dir.as_fd(), &name, &next)?;
            walked.push((fd, st, next));
        }
        if walked.len() == 1 {
            return Err(FsError::WrongKind {
                path: absolute,
                found: "root directory",
                expected: "directory of our own",
            });
        }
        let (fd, st, shown) = walked.pop().expect("more than / walked");
        check_own_dir(&st, &shown)?;
        Ok(PrivateDir { fd, path: shown })
    }

    /// The directory's path (as checked; for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open directory.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Subdirectory `name`, created 0700 if missing, checked to be ours, never followed
    /// through a link.
    pub fn subdir(&self, name: &str) -> Result<PrivateDir> {
        let path = self.path.join(name);
        match mkdirat(&self.fd, name, Mode::S_IRWXU) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(io("create", &path)(e)),
        }
        let (fd, st) = open_dir_at(self.fd.as_fd(), OsStr::new(name), &path)?;
        check_own_dir(&st, &path)?;
        Ok(PrivateDir { fd, path })
    }

    /// Subdirectory `name` if it exists (checked as [`PrivateDir::subdir`]); `None` if not.
    pub fn existing_subdir(&self, name: &OsStr) -> Result<Option<PrivateDir>> {
        let path = self.path.join(name);
        match open_dir_at(self.fd.as_fd(), name, &path) {
            Ok((fd, st)) => {
                check_own_dir(&st, &path)?;
                Ok(Some(PrivateDir { fd, path }))
            }
            Err(FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens regular file `name` for reading: no link followed, no FIFO waited on.
    pub fn open_file(&self, name: &str) -> Result<File> {
        let path = self.path.join(name);
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = openat(&self.fd, name, flags, Mode::empty()).map_err(io("open", &path))?;
        let st = fstat(&fd).map_err(io("stat", &path))?;
        expect_kind(&st, SFlag::S_IFREG, &path)?;
        blocking(fd, &path)
    }

    /// Opens regular file `name` for reading and writing, creating it 0600 if missing; an
    /// existing one must be ours. For lock files: nobody else can open, so nobody else can
    /// lock it.
    pub fn open_or_create_file(&self, name: &str) -> Result<File> {
        let path = self.path.join(name);
        let flags = OFlag::O_RDWR
            | OFlag::O_CREAT
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC;
        let fd = openat(&self.fd, name, flags, Mode::S_IRUSR | Mode::S_IWUSR)
            .map_err(io("open", &path))?;
        let st = fstat(&fd).map_err(io("stat", &path))?;
        expect_kind(&st, SFlag::S_IFREG, &path)?;
        let euid = geteuid().as_raw();
        if st.st_uid != euid {
            return Err(FsError::NotOwned {
                path,
                owner: st.st_uid,
                euid,
            });
        }
        if st.st_mode & GROUP_OTHER_ANY != 0 {
            fchmod(&fd, Mode::S_IRUSR | Mode::S_IWUSR).map_err(io("chmod", &path))?;
        }
        blocking(fd, &path)
    }

    /// Creates a new file 0600 under an unguessable name starting with `prefix`
    /// (`O_EXCL`: a name someone planted is never opened); returns it and its name.
    pub fn create_temp(&self, prefix: &str) -> Result<(File, String)> {
        let flags =
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let name = format!("{prefix}{}", unguessable_name()?);
        let fd = openat(
            &self.fd,
            name.as_str(),
            flags,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .map_err(io("create", self.path.join(&name)))?;
        Ok((File::from(fd), name))
    }

    /// Renames `from` in this directory to `to` in `dest` (`renameat(2)`: relative to the
    /// checked directories, whatever their paths now name).
    pub fn rename(&self, from: &str, dest: &PrivateDir, to: &str) -> Result<()> {
        nix::fcntl::renameat(&self.fd, from, &dest.fd, to)
            .map_err(io("rename", self.path.join(from)))
    }

    /// Removes file `name` (never a directory, never what a link points at).
    pub fn remove(&self, name: &OsStr) -> Result<()> {
        unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir)
            .map_err(io("remove", self.path.join(name)))
    }

    /// Removes empty subdirectory `name`.
    pub fn remove_dir(&self, name: &OsStr) -> Result<()> {
        unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir)
            .map_err(io("remove", self.path.join(name)))
    }

    /// The entries (not `.` and `..`) with what `lstat` says of each: a link is reported
    /// as a link, never followed.
    pub fn entries(&self) -> Result<Vec<(OsString, FileStat)>> {
        let mut dir = nix::dir::Dir::openat(&self.fd, ".", DIR_FLAGS, Mode::empty())
            .map_err(io("list", &self.path))?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(io("list", &self.path))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            // Gone since listed: another process evicted it.
            if let Ok(st) = fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                out.push((name.to_owned(), st));
            }
        }
        Ok(out)
    }
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

/// A directory made by `mkdtemp(3)` (0700, an unguessable name), removed with everything
/// in it when dropped.
#[derive(Debug)]
pub struct TempDir {
    dir: PrivateDir,
}

impl TempDir {
    /// A new directory `<prefix>XXXXXX` in `$TMPDIR` (or `/tmp`).
    pub fn new(prefix: &str) -> Result<TempDir> {
        Self::new_in(&std::env::temp_dir(), prefix)
    }

    /// A new directory `<prefix>XXXXXX` in `parent`.
    pub fn new_in(parent: &Path, prefix: &str) -> Result<TempDir> {
        let template = parent.join(format!("{prefix}XXXXXX"));
        let path = nix::unistd::mkdtemp(&template).map_err(io("create", &template))?;
        let dir = PrivateDir::open_or_create(&path);
        if dir.is_err() {
            let _ = std::fs::remove_dir(&path);
        }
        Ok(TempDir { dir: dir? })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The directory, to create files in relative to its fd.
    pub fn dir(&self) -> &PrivateDir {
        &self.dir
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // std's remove_dir_all does not follow links (it works relative to open fds). A
        // failure leaves a 0700 directory of ours behind: harmless, and uffd-core does
        // not log.
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}

const READ_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_NONBLOCK)
    .union(OFlag::O_NOCTTY)
    .union(OFlag::O_CLOEXEC);

/// Opens `path` for reading, refusing anything but a regular file (or a block device, if
/// `block_device_ok`) — without blocking: a FIFO planted at the path is refused, not
/// waited on.
pub fn open_regular(path: &Path, block_device_ok: bool) -> Result<File> {
    let fd =
        openat(nix::fcntl::AT_FDCWD, path, READ_FLAGS, Mode::empty()).map_err(io("open", path))?;
    let st = fstat(&fd).map_err(io("stat", path))?;
    if !(is(&st, SFlag::S_IFREG) || block_device_ok && is(&st, SFlag::S_IFBLK)) {
        expect_kind(&st, SFlag::S_IFREG, path)?;
    }
    blocking(fd, path)
}

/// Creates (or truncates) the output file `path`, 0600, for reading and writing: a link at
/// `path` is refused, not followed; so is anything but a regular file of ours with no
/// other hard link; an existing file of ours that others could read is narrowed to 0600
/// before any byte is written.
pub fn create_private(path: &Path) -> Result<File> {
    let flags =
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = openat(
        nix::fcntl::AT_FDCWD,
        path,
        flags,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )
    .map_err(|e| match e {
        Errno::ELOOP => FsError::WrongKind {
            path: path.to_owned(),
            found: "symbolic link",
            expected: "regular file",
        },
        e => io("create", path)(e),
    })?;
    let st = fstat(&fd).map_err(io("stat", path))?;
    expect_kind(&st, SFlag::S_IFREG, path)?;
    if st.st_nlink > 1 {
        return Err(FsError::HardLinked {
            path: path.to_owned(),
            links: st.st_nlink as u64,
        });
    }
    // Someone else's file (pre-created in a shared directory, say) would let its owner
    // read what we write into it, whatever its mode now.
    let euid = geteuid().as_raw();
    if st.st_uid != euid {
        return Err(FsError::NotOwned {
            path: path.to_owned(),
            owner: st.st_uid,
            euid,
        });
    }
    if st.st_mode & GROUP_OTHER_ANY != 0 {
        fchmod(&fd, Mode::S_IRUSR | Mode::S_IWUSR).map_err(io("chmod", path))?;
    }
    // Truncated only now that it is known to be a regular file.
    nix::unistd::ftruncate(&fd, 0).map_err(io("truncate", path))?;
    blocking(fd, path)
}

/// Creates a new file 0600 with an unguessable name starting with `prefix` in `dir` (any
/// directory, even a shared sticky one: `O_EXCL | O_NOFOLLOW` never opens what someone
/// planted). Returns it and its path.
pub fn create_temp_in(dir: &Path, prefix: &str) -> Result<(File, PathBuf)> {
    let path = dir.join(format!("{prefix}{}", unguessable_name()?));
    let flags =
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(
        nix::fcntl::AT_FDCWD,
        &path,
        flags,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )
    .map_err(io("create", &path))?;
    Ok((File::from(fd), path))
}

/// Reads a secret (a key file): a regular file, at most `max` bytes, and — unless
/// `allow_shared` — not readable by group or others.
pub fn read_secret(path: &Path, max: u64, allow_shared: bool) -> Result<Vec<u8>> {
    let file = open_regular(path, false)?;
    let st = fstat(&file).map_err(io("stat", path))?;
    if !allow_shared && st.st_mode & 0o044 != 0 {
        return Err(FsError::Exposed {
            path: path.to_owned(),
            mode: st.st_mode & 0o7777,
        });
    }
    let mut out = Vec::new();
    // One byte more than allowed tells a too-long file from one at the bound.
    file.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|source| FsError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })?;
    if out.len() as u64 > max {
        return Err(FsError::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_created_private_dir_and_its_files_are_0700_and_0600() {
        let tmp = TempDir::new("private-fs-").unwrap();
        let dir = PrivateDir::open_or_create(&tmp.path().join("a/b")).unwrap();
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        assert_eq!(mode(dir.path()), 0o700);
        let sub = dir.subdir("c").unwrap();
        assert_eq!(mode(sub.path()), 0o700);
        let (_, name) = sub.create_temp("t.").unwrap();
        assert_eq!(name.len(), 2 + 32);
        assert_eq!(mode(&sub.path().join(&name)), 0o600);
        dir.open_or_create_file("lock").unwrap();
        assert_eq!(mode(&dir.path().join("lock")), 0o600);
    }

    #[test]
    fn links_of_ours_and_dot_dots_are_followed_by_the_walk() {
        let tmp = TempDir::new("private-fs-").unwrap();
        std::fs::create_dir(tmp.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", tmp.path().join("link")).unwrap();
        let dir = PrivateDir::open_or_create(&tmp.path().join("link/../link/cache")).unwrap();
        assert_eq!(dir.path(), tmp.path().join("real/cache"));
        assert!(tmp.path().join("real/cache").is_dir());
        assert!(PrivateDir::open_or_create(Path::new("/")).is_err());
    }

    #[test]
    fn a_group_writable_directory_is_refused() {
        let tmp = TempDir::new("private-fs-").unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o775)).unwrap();
        let err = PrivateDir::open_or_create(&open.join("x")).unwrap_err();
        assert!(matches!(err, FsError::Writable { .. }), "{err}");
    }

    #[test]
    fn a_symlinked_subdir_or_file_is_refused_not_followed() {
        let tmp = TempDir::new("private-fs-").unwrap();
        let dir = PrivateDir::open_or_create(&tmp.path().join("d")).unwrap();
        std::fs::create_dir(tmp.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), dir.path().join("sub")).unwrap();
        let err = dir.subdir("sub").unwrap_err();
        assert!(
            matches!(
                err,
                FsError::WrongKind {
                    found: "symbolic link",
                    ..
                }
            ),
            "{err}"
        );
        std::os::unix::fs::symlink(tmp.path().join("target"), dir.path().join("lock")).unwrap();
        assert!(dir.open_or_create_file("lock").is_err());
        assert!(
            !tmp.path().join("target").exists(),
            "nothing created through the link"
        );
    }

    #[test]
    fn a_fifo_is_refused_at_once_not_waited_on() {
        let tmp = TempDir::new("private-fs-").unwrap();
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
        let err = open_regular(&fifo, false).unwrap_err();
        assert!(
            matches!(err, FsError::WrongKind { found: "FIFO", .. }),
            "{err}"
        );
        assert!(matches!(
            create_private(&fifo),
            Err(FsError::WrongKind { .. })
        ));
        assert!(read_secret(&fifo, 64, true).is_err());
    }

    #[test]
    fn a_secret_readable_by_others_or_too_long_is_refused() {
        let tmp = TempDir::new("private-fs-").unwrap();
        let key = tmp.path().join("key");
        std::fs::write(&key, b"0123456789abcdef").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_secret(&key, 64, false),
            Err(FsError::Exposed { .. })
        ));
        assert_eq!(read_secret(&key, 64, true).unwrap(), b"0123456789abcdef");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            read_secret(&key, 8, false),
            Err(FsError::TooLarge { .. })
        ));
        let zero = read_secret(Path::new("/dev/zero"), 64, true).unwrap_err();
        assert!(matches!(zero, FsError::WrongKind { .. }), "{zero}");
    }

    #[test]
    fn create_private_refuses_a_link_and_narrows_an_open_file() {
        let tmp = TempDir::new("private-fs-").unwrap();
        let target = tmp.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = tmp.path().join("out");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_private(&link).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        create_private(&target).unwrap();
        assert_eq!(mode(&target), 0o600);
        assert_eq!(std::fs::metadata(&target).unwrap().len(), 0);
    }
}
