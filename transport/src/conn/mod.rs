//! Framed connections: a byte stream cut into whole frames, plus the socket under it.
//!
//! A [`Conn`] is a [`FrameReader`] and a [`FrameWriter`] over `Read`/`Write` halves, plus
//! a [`Link`]: a handle on the socket underneath for deadlines and shutdown. The framing
//! never touches the socket, so an encrypted session slots in without the protocol above
//! noticing: [`Conn::plain`] over a socket, or [`Conn::over`] the halves of
//! [`crate::tls::split`]. A timed-out socket read surfaces through either as
//! `WouldBlock`, which the framing reports as silence ([`LinkError::Silent`]).
//!
//! The reader cuts frames by their length ([`crate::wire`] has the frame's layout) and
//! leaves checking them to the decoder: the link's own messages ([`Control`]) decode
//! here, a protocol's in the protocol.

use std::io::{self, IoSlice, Read, Write};
use std::time::Duration;

use crate::link::{Channel, LinkError};
use crate::net::{Link, Socket};
use crate::wire::Control;

mod read;
pub use read::{FrameReader, BODY_ALIGN};

/// What a failed read or write on `channel` means for the link.
pub fn link_error(channel: Channel, deadline: Duration, e: io::Error) -> LinkError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => LinkError::Silent {
            channel,
            after: deadline,
        },
        _ => LinkError::Io { channel, source: e },
    }
}

/// Writes frames. Its buffer is preallocated: small frames (a heartbeat, a request of a
/// few ranges) are encoded and sent without allocating.
pub struct FrameWriter {
    inner: Box<dyn Write + Send>,
    buf: Vec<u8>,
    channel: Channel,
    deadline: Duration,
    sealed: bool,
}

impl std::fmt::Debug for FrameWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameWriter")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl FrameWriter {
    /// Writes frames to `inner`.
    pub fn new(inner: Box<dyn Write + Send>) -> Self {
        Self {
            inner,
            buf: Vec::with_capacity(4096),
            channel: Channel::Main,
            deadline: Duration::ZERO,
            sealed: false,
        }
    }

    /// Whether its connection is sealed (TLS): frames need no checksum
    /// ([`envelope`](crate::wire::envelope)).
    pub fn sealed(&self) -> bool {
        self.sealed
    }

    fn fail(&self, e: io::Error) -> LinkError {
        link_error(self.channel, self.deadline, e)
    }

    /// Sends the frame `encode` writes into the (cleared, preallocated) buffer.
    pub fn send_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(), LinkError> {
        self.buf.clear();
        encode(&mut self.buf);
        self.inner.write_all(&self.buf).map_err(|e| self.fail(e))
    }

    /// Sends one frame in pieces (header, data straight from the caller's memory,
    /// trailer) with as few `writev` calls as the socket takes: with `TCP_NODELAY`,
    /// separate writes would send a small header and trailer as segments of their own.
    pub fn send_vectored(&mut self, mut slices: &mut [IoSlice<'_>]) -> Result<(), LinkError> {
        while !slices.is_empty() {
            match self.inner.write_vectored(slices) {
                Ok(0) => return Err(self.fail(io::ErrorKind::WriteZero.into())),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
        Ok(())
    }

    /// Sends one of the link's messages.
    pub fn send_control(&mut self, msg: &Control) -> Result<(), LinkError> {
        self.send_with(|buf| msg.encode(buf))
    }

    /// Writes bytes as they are: whole frames encoded elsewhere (or, injecting faults,
    /// a frame cut in half).
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.inner.write_all(bytes).map_err(|e| self.fail(e))
    }
}

/// A framed connection: reader, writer and the link under them.
#[derive(Debug)]
pub struct Conn {
    /// The reading half.
    pub r: FrameReader,
    /// The writing half.
    pub w: FrameWriter,
    /// The socket's handle.
    pub link: Link,
    writes_allocate: bool,
}

impl Conn {
    /// A plaintext connection over `socket`.
    pub fn plain(socket: Socket) -> io::Result<Conn> {
        let (r, w) = (socket.try_clone()?, socket.try_clone()?);
        Ok(Conn {
            writes_allocate: false,
            ..Conn::over(Link::new(socket), Box::new(r), Box::new(w))
        })
    }

    /// A connection whose bytes go through `r` and `w` (e.g. the halves of an encrypted
    /// session) over the socket that `link` holds.
    pub fn over(link: Link, r: Box<dyn Read + Send>, w: Box<dyn Write + Send>) -> Conn {
        Conn {
            r: FrameReader::new(r),
            w: FrameWriter::new(w),
            link,
            writes_allocate: true,
        }
    }

    /// A connection over the TLS `session` established on `socket`: sealed (its AEAD
    /// authenticates every byte, so frames need no checksum: see [`crate::wire`]).
    pub fn tls(socket: Socket, session: rustls::Connection) -> io::Result<Conn> {
        let (r, w) = crate::tls::split(&socket, session)?;
        let mut conn = Conn::over(Link::new(socket), Box::new(r), Box::new(w));
        conn.w.sealed = true;
        Ok(conn)
    }

    /// Whether the connection is sealed (TLS): its frames' checksums are neither needed
    /// nor checked ([`open_frame_with`](crate::wire::open_frame_with)).
    pub fn sealed(&self) -> bool {
        self.w.sealed
    }

    /// Whether a write may allocate (an encrypted session seals each record in a fresh
    /// buffer): a fault handler must then hand its writes to a thread of their own.
    pub fn writes_allocate(&self) -> bool {
        self.writes_allocate
    }

    /// Names the connection's channel (for errors) once the handshake said it.
    pub fn set_channel(&mut self, channel: Channel) {
        self.r.channel = channel;
        self.w.channel = channel;
    }

    /// Sets the silence deadline: a read that brings nothing, or a write that makes no
    /// progress, for this long breaks the link.
    pub fn set_deadline(&mut self, deadline: Duration) -> io::Result<()> {
        self.r.deadline = deadline;
        self.w.deadline = deadline;
        self.link.set_deadlines(Some(deadline), Some(deadline))
    }
}
