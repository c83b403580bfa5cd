//! Framed connections over a transport link.
//!
//! A [`Conn`] is a byte stream split into a [`FrameReader`] and a [`FrameWriter`], plus a
//! [`Link`]: a handle on the socket underneath for deadlines and shutdown. The framing
//! reads and writes through `Read`/`Write` halves and never touches the socket, so an
//! encrypted session slots in without the endpoints above noticing: where a connection
//! is made (the dialer and the acceptor in `link`, between the socket and the key
//! handshake), `Conn::over(Link::new(socket), tls_reader, tls_writer)` instead of
//! [`Conn::plain`] — the halves of [`transport::tls::split`]. Deadlines and shutdown stay
//! on the socket, where they work whatever runs over it (a timed-out socket read surfaces
//! through the session as `WouldBlock`, which the framing reports as silence).

use std::io::{self, Read, Write};
use std::time::Duration;

use transport::{Link, Socket};

use crate::error::LinkError;
use crate::wire::{
    decode_frame, encode, encode_request, frame_len, kind, Channel, Frame, Limits, Message,
    PageRange, WireError,
};

mod frame;
pub(crate) use frame::link_error;
pub use frame::{FrameReader, FrameWriter};

/// A framed connection: reader, writer and the link under them.
#[derive(Debug)]
pub struct Conn {
    /// The reading half.
    pub r: FrameReader,
    /// The writing half.
    pub w: FrameWriter,
    /// The socket's handle.
    pub link: Link,
    /// Whether a write may allocate (an encrypted session seals each record in a fresh
    /// buffer): a fault handler's requests then go through a thread of their own.
    pub(crate) writes_allocate: bool,
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

/// A framed connection over the TLS `session` established on `socket`.
pub(crate) fn tls_conn(
    socket: Socket,
    session: transport::tls::rustls::Connection,
) -> io::Result<Conn> {
    let (r, w) = transport::tls::split(&socket, session)?;
    Ok(Conn::over(Link::new(socket), Box::new(r), Box::new(w)))
}
