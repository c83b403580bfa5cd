//! Addresses, connected sockets and listeners, TCP or Unix.
//!
//! A [`Link`] is a handle on a connected socket for deadlines and shutdown: whatever runs
//! over the socket (plaintext framing, a TLS session), a deadline or a shutdown on the
//! socket reaches it (a timed-out read surfaces as `WouldBlock`). A Unix [`Listener`] binds
//! a path claimed for it ([`crate::socket_file`]), never one stolen from a live listener.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{shutdown, Shutdown};

use crate::socket_file::{self, Claimed};
use crate::Error;

/// Where to listen or connect: `unix:/path` or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for Addr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Addr::Unix(path.into()));
        }
        s.parse().map(Addr::Tcp).map_err(|_| Error::Invalid {
            what: "not an address (host:port or unix:/path)",
            value: s.into(),
        })
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected socket.
#[derive(Debug)]
pub enum Socket {
    /// TCP (with `TCP_NODELAY`: frames are written whole).
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

/// `$e` on whichever stream or listener `$s` holds, bound to `$v`.
macro_rules! either {
    ($s:expr, $t:ident, $v:ident => $e:expr) => {
        match $s {
            $t::Tcp($v) => $e,
            $t::Unix($v) => $e,
        }
    };
}

impl Socket {
    /// Connects to `addr`, giving up after `timeout` (`TimedOut`).
    pub fn connect(addr: &Addr, timeout: Duration) -> io::Result<Socket> {
        Ok(match addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, timeout)?;
                s.set_nodelay(true)?;
                Socket::Tcp(s)
            }
            Addr::Unix(p) => Socket::Unix(unix_connect(p, timeout)?),
        })
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    /// Sets or clears `O_NONBLOCK` (on the open file: every handle on it).
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        either!(self, Socket, s => s.set_nonblocking(on))
    }

    /// Sets how long one read or write may make no progress (`None`: forever); a read
    /// or write that times out fails with `WouldBlock`.
    pub fn set_deadlines(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        either!(self, Socket, s => {
            s.set_read_timeout(read)?;
            s.set_write_timeout(write)
        })
    }
}

/// `connect(2)` to a Unix socket, bounded: a listener that does not accept (stopped,
/// wedged) fills its backlog, and a blocking connect would then wait forever. Non-blocking,
/// a full backlog answers `EAGAIN` at once; we try again until `timeout` has passed.
fn unix_connect(path: &std::path::Path, timeout: Duration) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let addr = UnixAddr::new(path)?;
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
    let until = std::time::Instant::now() + timeout;
    loop {
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(nix::errno::Errno::EAGAIN) if std::time::Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the listener's backlog stayed full: it does not accept",
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        either!(self, Socket, s => s.as_fd())
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        either!(self, Socket, s => s.read(buf))
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        either!(self, Socket, s => s.write(buf))
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        either!(self, Socket, s => s.write_vectored(bufs))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A handle on the socket under a connection: its deadlines, and shutdown (which wakes
/// a thread blocked reading or writing it, and tells the peer at once).
#[derive(Debug)]
pub struct Link(Socket);

impl Link {
    /// The handle on `socket` (also the socket under an encrypted session).
    pub fn new(socket: Socket) -> Link {
        Link(socket)
    }

    /// A second handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Link> {
        self.0.try_clone().map(Link)
    }

    /// Shuts both directions down; harmless on a connection already shut or reset.
    pub fn shutdown(&self) {
        // The fd is ours (owned by `self.0`), so it is open for the call.
        let _ = shutdown(self.0.as_fd().as_raw_fd(), Shutdown::Both);
    }

    /// Sets how long one read or write may make no progress (`None`: forever). A read
    /// or write that times out fails with `WouldBlock` (which a framing above reports as
    /// silence).
    pub fn set_deadlines(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.0.set_deadlines(read, write)
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix, on a path claimed for it (see [`crate::socket_file`]): a path where another
    /// listener answers is refused, never taken over; the file is removed on drop.
    Unix(Claimed),
}

impl Listener {
    /// Binds `addr`. A Unix path is claimed: a stale socket file is replaced, a path where
    /// a listener answers fails with `AddrInUse` (as a TCP port would), anything else that
    /// is not a socket with `AlreadyExists`.
    pub fn bind(addr: &Addr) -> io::Result<Listener> {
        Ok(match addr {
            Addr::Tcp(a) => Listener::Tcp(TcpListener::bind(a)?),
            Addr::Unix(p) => Listener::Unix(socket_file::claim(p)?),
        })
    }

    /// The socket file a Unix listener claimed (its path and identity), for removing it
    /// only while it is still ours; `None` for TCP.
    pub fn socket_file(&self) -> Option<&socket_file::SocketFile> {
        match self {
            Listener::Tcp(_) => None,
            Listener::Unix(c) => Some(&c.file),
        }
    }

    /// The bound address (for TCP port 0).
    pub fn local_addr(&self) -> io::Result<Addr> {
        Ok(match self {
            Listener::Tcp(l) => Addr::Tcp(l.local_addr()?),
            // Not getsockname(2): it names the temporary path the socket was bound at
            // before it was renamed into place.
            Listener::Unix(c) => Addr::Unix(c.file.path().to_path_buf()),
        })
    }

    /// Sets or clears `O_NONBLOCK`: a non-blocking listener's `accept` fails with
    /// `WouldBlock` when nobody is waiting.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix(c) => c.listener.set_nonblocking(on),
        }
    }

    /// Accepts one connection, or returns `None` after `timeout` (or on a signal).
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Option<Socket>> {
        let mut fds = [PollFd::new(self.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(None),
            Ok(_) => self.accept().map(Some),
            Err(e) => Err(e.into()),
        }
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<Socket> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Socket::Tcp(s)
            }
            Listener::Unix(c) => Socket::Unix(c.listener.accept()?.0),
        })
    }

    /// Shuts the listening socket down: a thread blocked accepting on it returns (Linux).
    /// The socket stays open until the listener is dropped.
    pub fn shutdown(&self) {
        // The fd is ours (owned by `self`), so it is open for the call: no fd that may have
        // been closed and reused meanwhile.
        let _ = shutdown(self.as_fd().as_raw_fd(), Shutdown::Both);
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(c) => c.listener.as_fd(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::UnixAddr;
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};

    /// A listener that never accepts (stopped, wedged): once its backlog is full, a connect
    /// gives up at its bound instead of blocking forever.
    #[test]
    fn a_unix_connect_to_a_listener_that_never_accepts_gives_up_at_its_bound() {
        let path = std::env::temp_dir().join(format!("uffdkit-net-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        bind(listener.as_raw_fd(), &UnixAddr::new(&path).expect("addr")).expect("bind");
        listen(&listener, Backlog::new(1).expect("backlog")).expect("listen");
        // Connections queued and never accepted, until the backlog is full.
        let mut queued = Vec::new();
        loop {
            match unix_connect(&path, Duration::ZERO) {
                Ok(s) => queued.push(s),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => break,
                Err(e) => panic!("connect: {e}"),
            }
            assert!(queued.len() < 64, "the backlog of 1 never filled");
        }
        let bound = Duration::from_millis(200);
        let t = std::time::Instant::now();
        let e = Socket::connect(&Addr::Unix(path.clone()), bound).expect_err("a full backlog");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() >= bound, "{:?}", t.elapsed());
        let _ = std::fs::remove_file(&path);
    }
}
