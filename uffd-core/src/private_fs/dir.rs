//! [`PrivateDir`] and [`TempDir`]: directories walked, checked and held open.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{geteuid, unlinkat, UnlinkatFlags};

use super::{
    blocking, check_ancestor, check_own_dir, expect_kind, io, is, kind_name, unguessable_name,
    FsError, Result, GROUP_OTHER_ANY,
};

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
}
