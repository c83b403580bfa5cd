//! Files at paths the user named: memory files, images, outputs, secrets.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fchmod, fstat, Mode, SFlag};
use nix::unistd::geteuid;

use super::{
    blocking, expect_kind, io, is, owned_by_root_or_us, unguessable_name, FsError, Result,
    GROUP_OTHER_ANY, GROUP_OTHER_WRITE,
};

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

/// Creates the temporary file an output `dest` is written to before it is renamed to
/// `dest` once complete (so that no partial output ever carries its name): new, 0600,
/// `O_EXCL`, with an unguessable name in `dest`'s directory (see [`create_temp_in`]).
/// What already sits at `dest` must be what [`create_private`] would have written into:
/// a regular file of ours with no other link — another user's file is refused, not
/// replaced. Returns the file and its path.
pub fn create_temp_for(dest: &Path) -> Result<(File, PathBuf)> {
    let st: nix::Result<nix::sys::stat::FileStat> = nix::sys::stat::lstat(dest);
    match st {
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(io("stat", dest)(e)),
        Ok(st) => {
            expect_kind(&st, SFlag::S_IFREG, dest)?;
            let euid = geteuid().as_raw();
            if st.st_uid != euid {
                return Err(FsError::NotOwned {
                    path: dest.to_owned(),
                    owner: st.st_uid,
                    euid,
                });
            }
            if st.st_nlink > 1 {
                return Err(FsError::HardLinked {
                    path: dest.to_owned(),
                    links: st.st_nlink,
                });
            }
        }
    }
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    create_temp_in(dir, &format!(".{name}.partial."))
}

/// Reads a secret (a key file) or what decides whom we trust (a certificate, a CA): a
/// regular file of root's or ours (as OpenSSH's `StrictModes` wants a key: whoever owns
/// the file could change it, and would then know the key or be trusted), writable by
/// no one else, at most `max` bytes, and — unless `allow_shared` — not readable by group
/// or others.
pub fn read_secret(path: &Path, max: u64, allow_shared: bool) -> Result<Vec<u8>> {
    let file = open_regular(path, false)?;
    let st = fstat(&file).map_err(io("stat", path))?;
    owned_by_root_or_us(&st, path)?;
    if st.st_mode & GROUP_OTHER_WRITE != 0 {
        return Err(FsError::Writable {
            path: path.to_owned(),
            mode: st.st_mode & 0o7777,
        });
    }
    if !allow_shared && st.st_mode & 0o044 != 0 {
        return Err(FsError::Exposed {
            path: path.to_owned(),
            mode: st.st_mode & 0o7777,
        });
    }
    let mut out = Vec::new();
    // One byte more than allowed tells a too-long file from one at the bound.
    file.take(max.saturating_add(1))
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
    use crate::private_fs::TempDir;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
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
    fn a_secret_another_user_owns_or_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = TempDir::new("private-fs-").unwrap();
        let key = tmp.path().join("key");
        std::fs::write(&key, b"0123456789abcdef").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o646)).unwrap();
        for shared in [false, true] {
            assert!(matches!(
                read_secret(&key, 64, shared),
                Err(FsError::Writable { .. })
            ));
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_secret(&key, 64, false).is_ok());
        if !geteuid().is_root() {
            let test = "a_secret_another_user_owns_or_others_can_write_is_refused";
            return testkit::skip(test, "its other-owner half needs root (chown)");
        }
        nix::unistd::chown(&key, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        for shared in [false, true] {
            assert!(matches!(
                read_secret(&key, 64, shared),
                Err(FsError::NotOwned { owner: 65534, .. })
            ));
        }
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
