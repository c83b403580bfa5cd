//! A Unix socket path claimed by a listener: taken only if nobody answers there, and
//! removed when its holder is done — but only while it is still the holder's.
//!
//! A socket file outlives its listener, so a path that exists may be live (another
//! handler is listening: taking it over would orphan that one) or stale (its process is
//! gone). `connect(2)` tells them apart: a live listener accepts, a stale file refuses.
//!
//! The file appears only once it listens: `bind(2)` creates the file before `listen(2)`
//! makes it accept, and a client that connects in between (a VMM started the moment the
//! file appears) gets ECONNREFUSED. So the listener is bound and listening under a
//! temporary name in the same directory and then renamed into place (`renameat2` with
//! `RENAME_NOREPLACE`, so a file someone else put there meanwhile is never replaced).
//! The listener's `getsockname(2)` still names the temporary path: its address is
//! [`SocketFile::path`].

use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

/// Why a path could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// A listener answers at the path: taking it over would orphan that one.
    #[error(
        "{} is in use: a listener answers there (another handler?); refusing to take it \
         over — stop that one or choose another path",
        path.display()
    )]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// Something other than a socket is at the path; it is never removed.
    #[error("{} exists and is not a socket", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A system call on the path failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

impl From<ClaimError> for io::Error {
    fn from(e: ClaimError) -> io::Error {
        let kind = match &e {
            ClaimError::InUse { .. } => ErrorKind::AddrInUse,
            ClaimError::NotASocket { .. } => ErrorKind::AlreadyExists,
            ClaimError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, e)
    }
}

/// A bound socket's path and identity (device and inode of the file `bind(2)` made).
#[derive(Debug, Clone)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the path if it still names the socket we bound (not one another process
    /// bound there since); true if it did.
    pub fn remove(&self) -> bool {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                std::fs::remove_file(&self.path).is_ok()
            }
            _ => false,
        }
    }
}

/// A listener on a claimed path; the path is removed on drop.
#[derive(Debug)]
pub struct Claimed {
    /// The listener.
    pub listener: UnixListener,
    /// Its path.
    pub file: SocketFile,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        self.file.remove();
    }
}

/// Binds a listener at `path`: refuses a path where a listener answers or that is not a
/// socket, removes a stale socket file first. The socket is 0600 — connecting needs
/// write permission on it, so only we (and root) can — whatever the process's umask.
pub fn claim(path: &Path) -> Result<Claimed, ClaimError> {
    claim_for(path, None)
}

/// [`claim`], the socket handed to user `peer_uid` if one is named (owned by it, 0600:
/// only it, we and root can connect — a jailed VMM running as its own user). Handing a
/// file to another user needs `CAP_CHOWN` (root).
pub fn claim_for(path: &Path, peer_uid: Option<u32>) -> Result<Claimed, ClaimError> {
    let io = |what| {
        let path = path.to_path_buf();
        move |source| ClaimError::Io { what, path, source }
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect")(e)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ClaimError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Ok(stale) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(ClaimError::InUse {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                // Another claimer may have replaced the stale file with its live socket
                // since we looked: only the file we probed is removed (the window is now
                // a stat, where it was the whole probe). Gone already is fine: our
                // rename never replaces a file.
                match std::fs::symlink_metadata(path) {
                    Ok(now) if (now.dev(), now.ino()) != (stale.dev(), stale.ino()) => {
                        return Err(ClaimError::InUse {
                            path: path.to_path_buf(),
                        })
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io("inspect")(e)),
                    Ok(_) => match std::fs::remove_file(path) {
                        Err(e) if e.kind() != ErrorKind::NotFound => {
                            return Err(io("remove the stale socket")(e))
                        }
                        _ => {}
                    },
                }
                log::info!(
                    "removed a stale socket file {} (nobody listening)",
                    path.display()
                );
            }
            Err(e) => return Err(io("probe the socket")(e)),
        },
    }
    let temp = temporary_name(path).map_err(io("name a temporary socket beside"))?;
    let listener = UnixListener::bind(&temp).map_err(io("bind"))?; // bind + listen
                                                                   // Access is settled before the file appears under `path`.
    if let Err(e) = restrict(&temp, peer_uid) {
        let _ = std::fs::remove_file(&temp); // ours, never visible under `path`
        return Err(io("set who may connect to the socket")(e));
    }
    let meta = std::fs::symlink_metadata(&temp).map_err(io("inspect the bound socket"))?;
    if let Err(e) = renameat2(
        AT_FDCWD,
        &temp,
        AT_FDCWD,
        path,
        RenameFlags::RENAME_NOREPLACE,
    ) {
        let _ = std::fs::remove_file(&temp); // ours, never visible under `path`
        return Err(match e {
            nix::errno::Errno::EEXIST => ClaimError::InUse {
                path: path.to_path_buf(),
            },
            e => io("rename the listening socket into place")(e.into()),
        });
    }
    Ok(Claimed {
        listener,
        file: SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    })
}

/// Makes the socket just bound at `temp` 0600, and owned by `peer_uid` if one is named:
/// through an `O_PATH | O_NOFOLLOW` descriptor checked to be a socket of ours, so a link
/// swapped in for it is never followed (`chmod` through the descriptor's `/proc` path:
/// `fchmod` refuses an `O_PATH` descriptor).
fn restrict(temp: &Path, peer_uid: Option<u32>) -> io::Result<()> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::{fchmodat, fstat, FchmodatFlags, Mode, SFlag};
    use std::os::fd::AsRawFd;
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = open(temp, flags, Mode::empty())?;
    let st = fstat(&fd)?;
    let socket = st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFSOCK.bits();
    if !socket || st.st_uid != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other("the bound socket was replaced"));
    }
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let owner_only = Mode::S_IRUSR | Mode::S_IWUSR;
    fchmodat(AT_FDCWD, &by_fd, owner_only, FchmodatFlags::FollowSymlink)?;
    if let Some(uid) = peer_uid {
        let uid = Some(nix::unistd::Uid::from_raw(uid));
        nix::unistd::fchownat(&fd, "", uid, None, nix::fcntl::AtFlags::AT_EMPTY_PATH)?;
    }
    Ok(())
}

/// An unguessable name beside `path` (same directory, so the rename is atomic; short, as
/// a socket path must fit in 108 bytes).
fn temporary_name(path: &Path) -> io::Result<PathBuf> {
    let mut random = [0u8; 6];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut random)?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    Ok(path.with_file_name(format!(".uffdkit-{hex}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("uffdkit-sockfile-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_live_socket_is_refused_and_left_alone() {
        let path = temp("live");
        let _ = std::fs::remove_file(&path);
        let first = claim(&path).expect("free path");
        let err = claim(&path).expect_err("live listener");
        assert!(matches!(err, ClaimError::InUse { .. }), "{err}");
        assert!(path.exists(), "the first listener's socket stays");
        UnixStream::connect(&path).expect("the first listener still answers");
        drop(first);
        assert!(!path.exists(), "removed on drop");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_plain_file_refused() {
        let path = temp("stale");
        let _ = std::fs::remove_file(&path);
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists(), "a closed listener leaves its file");
        let claimed = claim(&path).expect("stale socket replaced");
        UnixStream::connect(&path).expect("now ours");
        drop(claimed);

        std::fs::write(&path, b"not a socket").expect("write");
        let err = claim(&path).expect_err("plain file");
        assert!(matches!(err, ClaimError::NotASocket { .. }), "{err}");
        assert!(path.exists(), "a file that is not ours is never removed");
        std::fs::remove_file(&path).ok();
    }

    /// A client spinning on the path connects the moment the file appears, as a VMM
    /// started beside its handler does: with bind and listen apart, some of these
    /// connections met a socket not yet listening (ECONNREFUSED).
    #[test]
    fn a_client_connecting_the_moment_the_file_appears_is_never_refused() {
        let path = temp("appears");
        for start in 0..1000 {
            let _ = std::fs::remove_file(&path);
            let claimer = {
                let path = path.clone();
                std::thread::spawn(move || claim(&path).expect("free path"))
            };
            while std::fs::symlink_metadata(&path).is_err() {
                std::hint::spin_loop();
            }
            if let Err(e) = UnixStream::connect(&path) {
                panic!("start {start}: connecting as the file appeared: {e}");
            }
            drop(claimer.join().expect("claimer"));
        }
    }

    #[test]
    fn no_temporary_file_is_left_beside_the_socket() {
        let dir = std::env::temp_dir().join(format!("uffdkit-sockdir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let claimed = claim(&dir.join("s.sock")).expect("free path");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["s.sock"], "only the socket itself");
        drop(claimed);
        std::fs::remove_dir(&dir).expect("empty after drop");
    }

    /// Connecting needs write permission on the socket: 0600 whatever the umask (under
    /// the common 022 it was 0755, under 002 a group could connect).
    #[test]
    fn a_claimed_socket_is_its_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp("mode");
        let _ = std::fs::remove_file(&path);
        let claimed = claim(&path).expect("free path");
        let meta = std::fs::symlink_metadata(&path).expect("lstat");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
        drop(claimed);
    }

    #[test]
    fn a_path_rebound_by_another_is_not_removed() {
        let path = temp("rebound");
        let _ = std::fs::remove_file(&path);
        let ours = claim(&path).expect("free path");
        std::fs::remove_file(&path).expect("someone removes it");
        let theirs = UnixListener::bind(&path).expect("and binds their own");
        assert!(!ours.file.remove(), "not ours any more");
        assert!(path.exists());
        drop(ours);
        assert!(path.exists(), "drop leaves their socket too");
        drop(theirs);
        std::fs::remove_file(&path).ok();
    }
}
