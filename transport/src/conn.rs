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
use crate::wire::{frame_len, Control, DEFAULT_MAX_BODY};

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

/// Reads whole frames.
pub struct FrameReader {
    inner: Box<dyn Read + Send>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    channel: Channel,
    deadline: Duration,
    /// Largest body accepted.
    pub max_body: usize,
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl FrameReader {
    /// Reads frames from `inner`.
    pub fn new(inner: Box<dyn Read + Send>) -> Self {
        Self {
            inner,
            buf: vec![0; 1 << 20],
            start: 0,
            end: 0,
            channel: Channel::Main,
            deadline: Duration::ZERO,
            max_body: DEFAULT_MAX_BODY,
        }
    }

    /// The channel the connection carries (for errors).
    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// The next whole frame's bytes, header to trailer, borrowed from the receive buffer
    /// (valid until the next call); [`LinkError::Closed`] at a clean end of stream between
    /// frames.
    ///
    /// Bytes are read into one reused buffer (`buf[start..end]` unparsed); a partial frame
    /// is moved to the front only when the space behind it runs short, and the buffer grows
    /// only for a frame larger than it.
    pub fn recv_raw(&mut self) -> Result<&[u8], LinkError> {
        const READ: usize = 256 << 10;
        let channel = self.channel;
        let len = loop {
            let have = &self.buf[self.start..self.end];
            match frame_len(have, self.max_body) {
                Err(e) => return Err(LinkError::malformed(channel, e)),
                Ok(Some(n)) if n <= have.len() => break n,
                Ok(_) => {}
            }
            if self.buf.len() - self.end < READ {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.buf.len() - self.end < READ {
                    self.buf.resize(self.end + READ, 0);
                }
            }
            let n = match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) if self.end == self.start => return Err(LinkError::Closed { channel }),
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "closed mid-frame");
                    return Err(LinkError::Io { channel, source: e });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(link_error(channel, self.deadline, e)),
            };
            self.end += n;
        };
        let at = self.start;
        self.start += len;
        if self.start == self.end {
            // Nothing unparsed behind it: the next read fills the buffer from the front
            // (the frame's bytes stay where they are until then).
            self.start = 0;
            self.end = 0;
        }
        Ok(&self.buf[at..at + len])
    }

    /// The next frame, which must be one of the link's messages (a handshake's).
    pub fn recv_control(&mut self) -> Result<Control, LinkError> {
        let channel = self.channel;
        match Control::decode_frame(self.recv_raw()?, usize::MAX) {
            Ok(Some((msg, _))) => Ok(msg),
            Ok(None) => unreachable!("a whole frame"),
            Err(e) => Err(LinkError::malformed(channel, e)),
        }
    }
}

/// Writes frames. Its buffer is preallocated: small frames (a heartbeat, a request of a
/// few ranges) are encoded and sent without allocating.
pub struct FrameWriter {
    inner: Box<dyn Write + Send>,
    buf: Vec<u8>,
    channel: Channel,
    deadline: Duration,
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
        }
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

    /// A connection over the TLS `session` established on `socket`.
    pub fn tls(socket: Socket, session: rustls::Connection) -> io::Result<Conn> {
        let (r, w) = crate::tls::split(&socket, session)?;
        Ok(Conn::over(Link::new(socket), Box::new(r), Box::new(w)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A frame of `body` with a zero header word and trailer (the transport reads neither).
    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(body);
        f.extend_from_slice(&[0; 4]);
        f
    }

    #[test]
    fn frame_len_waits_for_the_header_and_refuses_an_oversize_body() {
        let f = frame(&[7; 10]);
        assert_eq!(frame_len(&f[..7], 64), Ok(None));
        assert_eq!(frame_len(&f[..8], 64), Ok(Some(f.len())));
        let oversize = crate::wire::WireError::Oversize { len: 10, max: 9 };
        assert_eq!(frame_len(&f, 9), Err(oversize));
    }

    #[test]
    fn a_reader_hands_out_whole_frames_however_the_socket_cuts_them_then_closed() {
        let (near, far) = UnixStream::pair().unwrap();
        let mut conn = Conn::plain(Socket::Unix(near)).unwrap();
        conn.set_channel(Channel::Urgent);
        let (a, b) = (frame(b"first"), frame(&[9; 3000]));
        let writer = std::thread::spawn(move || {
            let mut far = far;
            let bytes = [a.clone(), b.clone()].concat();
            for piece in bytes.chunks(7) {
                far.write_all(piece).unwrap();
            }
            (a, b)
        });
        let first = conn.r.recv_raw().unwrap().to_vec();
        let second = conn.r.recv_raw().unwrap().to_vec();
        let (a, b) = writer.join().unwrap();
        assert_eq!((first, second), (a, b));
        let closed = conn.r.recv_raw().unwrap_err();
        assert!(
            matches!(
                closed,
                LinkError::Closed {
                    channel: Channel::Urgent
                }
            ),
            "{closed:?}"
        );
    }

    #[test]
    fn an_oversize_announcement_is_malformed_not_a_huge_allocation() {
        let (near, mut far) = UnixStream::pair().unwrap();
        let mut conn = Conn::plain(Socket::Unix(near)).unwrap();
        conn.r.max_body = 1024;
        far.write_all(&frame(&[0; 2048])[..64]).unwrap();
        let e = conn.r.recv_raw().unwrap_err();
        assert!(matches!(e, LinkError::Malformed { .. }), "{e:?}");
    }
}
