//! Addresses, streams and framed connections (TCP or Unix).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use std::time::Duration;

use crate::wire::{decode_frame, encode, frame_len, kind, Frame, Limits, Message, PageRange};
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
        s.parse()
            .map(Addr::Tcp)
            .map_err(|_| Error::Protocol(format!("not an address (host:port or unix:/path): {s}")))
    }
}

/// A connected stream.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

impl Stream {
    /// Connects to `addr`.
    pub fn connect(addr: &Addr) -> io::Result<Stream> {
        Ok(match addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Addr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        })
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Sets (or clears, with `None`) the read and write timeouts; a timed-out call fails
    /// with `WouldBlock`, which the framed connections report as a broken connection.
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }

    /// Shuts both directions down (wakes a blocked reader).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix.
    Unix(UnixListener),
}

impl Listener {
    /// Binds `addr` (a stale Unix socket file is replaced).
    pub fn bind(addr: &Addr) -> io::Result<Listener> {
        Ok(match addr {
            Addr::Tcp(a) => Listener::Tcp(TcpListener::bind(a)?),
            Addr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Listener::Unix(UnixListener::bind(p)?)
            }
        })
    }

    /// The bound address (for TCP port 0).
    pub fn local_addr(&self) -> io::Result<Addr> {
        Ok(match self {
            Listener::Tcp(l) => Addr::Tcp(l.local_addr()?),
            Listener::Unix(l) => Addr::Unix(
                l.local_addr()?
                    .as_pathname()
                    .map(PathBuf::from)
                    .unwrap_or_default(),
            ),
        })
    }

    /// The listening socket's fd.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }

    /// Accepts one connection, or returns `None` after `timeout`.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Option<Stream>> {
        let mut pfd = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        match n {
            0 => Ok(None),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
            _ => self.accept().map(Some),
        }
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
        })
    }
}

/// Reads whole frames from a stream.
#[derive(Debug)]
pub struct FrameReader {
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// What the decoder checks against.
    pub limits: Limits,
}

impl FrameReader {
    /// Reads frames from `stream`.
    pub fn new(stream: Stream) -> Self {
        Self {
            stream,
            buf: vec![0; 1 << 20],
            start: 0,
            end: 0,
            limits: Limits::default(),
        }
    }

    /// The next message; `Error::Closed` at a clean end of stream between frames.
    pub fn recv(&mut self) -> Result<Message, Error> {
        self.recv_frame().map(Frame::into_owned)
    }

    /// The next frame, its page data borrowed from the receive buffer (valid until the
    /// next call).
    ///
    /// Bytes are read into one reused buffer (`buf[start..end]` unparsed); a partial frame
    /// is moved to the front only when the space behind it runs short, and the buffer grows
    /// only for a frame larger than it.
    pub fn recv_frame(&mut self) -> Result<Frame<'_>, Error> {
        const READ: usize = 256 << 10;
        loop {
            let have = &self.buf[self.start..self.end];
            if frame_len(have, &self.limits)?.is_some_and(|n| n <= have.len()) {
                break;
            }
            if self.buf.len() - self.end < READ {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.buf.len() - self.end < READ {
                    self.buf.resize(self.end + READ, 0);
                }
            }
            let n = self.stream.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Err(if self.end == self.start {
                    Error::Closed
                } else {
                    Error::Protocol("connection closed mid-frame".into())
                });
            }
            self.end += n;
        }
        let (frame, used) = decode_frame(&self.buf[self.start..self.end], &self.limits)?
            .ok_or_else(|| Error::Protocol("a whole frame did not decode".into()))?;
        self.start += used;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(frame)
    }
}

/// Writes frames to a stream.
#[derive(Debug)]
pub struct FrameWriter {
    stream: Stream,
    buf: Vec<u8>,
}

impl FrameWriter {
    /// Writes frames to `stream`.
    pub fn new(stream: Stream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &Message) -> Result<(), Error> {
        self.buf.clear();
        encode(msg, &mut self.buf);
        self.stream.write_all(&self.buf)?;
        Ok(())
    }

    /// Sends a PAGES frame for `data` (whole pages starting at page `first`) straight from
    /// the caller's memory: the same bytes as `send(&Message::Pages { .. })` without
    /// copying the data into a message first.
    pub fn send_pages(&mut self, first: u64, data: &[u8]) -> Result<(), Error> {
        let body_len = 8 + data.len();
        self.buf.clear();
        self.buf.extend_from_slice(&(body_len as u32).to_le_bytes());
        self.buf.extend_from_slice(&[kind::PAGES, 0, 0, 0]);
        self.buf.extend_from_slice(&first.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.buf[4..]);
        crc.update(data);
        let crc = crc.finalize().to_le_bytes();
        // One writev for header, data and trailer: with TCP_NODELAY, separate writes
        // would send the 16-byte header and the 4-byte trailer as segments of their own.
        let mut slices = [
            io::IoSlice::new(&self.buf),
            io::IoSlice::new(data),
            io::IoSlice::new(&crc),
        ];
        let mut left = &mut slices[..];
        while !left.is_empty() {
            match self.stream.write_vectored(left) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => io::IoSlice::advance_slices(&mut left, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Sends whole pages `data` (from page `first`, pages of `page_size` bytes): runs of
    /// zero pages as ZERO_RUN, the rest as PAGES. Returns the data bytes sent.
    pub fn send_page_data(
        &mut self,
        first: u64,
        data: &[u8],
        page_size: usize,
    ) -> Result<u64, Error> {
        let n = data.len() / page_size;
        let zero = |i: usize| is_zero(&data[i * page_size..(i + 1) * page_size]);
        let mut bytes = 0;
        let mut i = 0;
        while i < n {
            let z = zero(i);
            let mut j = i + 1;
            while j < n && zero(j) == z {
                j += 1;
            }
            if z {
                self.send(&Message::ZeroRun(PageRange {
                    first: first + i as u64,
                    count: (j - i) as u64,
                }))?;
            } else {
                self.send_pages(first + i as u64, &data[i * page_size..j * page_size])?;
                bytes += ((j - i) * page_size) as u64;
            }
            i = j;
        }
        Ok(bytes)
    }

    /// Writes raw bytes (fault injection: a half-written frame; relays).
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Shuts the connection down.
    pub fn shutdown(&self) {
        self.stream.shutdown();
    }
}

/// Whether `page` is all zero (64-byte blocks OR-reduced: vectorises, unlike an early-exit
/// byte loop).
fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Splits a stream into a frame reader and writer.
pub fn split(stream: Stream) -> io::Result<(FrameReader, FrameWriter)> {
    let w = stream.try_clone()?;
    Ok((FrameReader::new(stream), FrameWriter::new(w)))
}
