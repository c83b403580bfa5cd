//! An established TLS session as a connection's two halves.
//!
//! A connection is read by one thread (its reader) while others write it, and a rustls
//! session is one state machine: so the session sits behind a mutex that is never held
//! across a socket call. The reader takes ciphertext from the socket into a buffer of its
//! own *outside* the lock, then decrypts under it; the writer encrypts under it into a
//! buffer of its own, then writes the records *outside* it. Neither half can stall the
//! other on a slow or silent peer (which a lock held across a blocking read or write
//! would: two ends both blocked writing, their readers waiting for the lock, is a
//! deadlock the silence deadline would only break). Deadlines and shutdown stay on the
//! socket, as for plaintext.
//!
//! Records rustls queues while reading (a key update's answer) go out with the next write:
//! every connection carries a heartbeat, so within one heartbeat. Records reach the socket
//! in the order they were sealed, because only the one writer drains them.
//!
//! Sealing allocates (rustls builds each record in a fresh buffer), so a fault handler
//! must not write here: a pair hands their frames to a thread of its own (see
//! [`crate::link::Chan::request_with`]).

use std::io::{self, IoSlice, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::net::Socket;

/// Plaintext sealed per lock hold: large enough for few syscalls, small enough that a
/// reader waiting for the lock waits microseconds.
const SEAL_CHUNK: usize = 256 << 10;
/// Ciphertext read from the socket per read.
const READ_CHUNK: usize = 128 << 10;

struct Session(Mutex<rustls::Connection>);

fn lock(s: &Session) -> MutexGuard<'_, rustls::Connection> {
    s.0.lock().unwrap_or_else(|p| p.into_inner())
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The two halves of `session`, established on `socket`: a reader and a writer, each with
/// its own handle on the socket (the caller keeps `socket` for deadlines and shutdown).
pub fn split(
    socket: &Socket,
    mut session: rustls::Connection,
) -> io::Result<(impl Read + Send + 'static, impl Write + Send + 'static)> {
    session.set_buffer_limit(Some(SEAL_CHUNK));
    let session = Arc::new(Session(Mutex::new(session)));
    let reader = TlsReader {
        session: session.clone(),
        socket: socket.try_clone()?,
        buf: vec![0; READ_CHUNK].into_boxed_slice(),
        start: 0,
        end: 0,
        eof: false,
    };
    let writer = TlsWriter {
        session,
        socket: socket.try_clone()?,
        out: Vec::with_capacity(SEAL_CHUNK + (SEAL_CHUNK >> 6)),
        broken: None,
    };
    Ok((reader, writer))
}

/// The reading half: plaintext out of the session, ciphertext in from the socket.
struct TlsReader {
    session: Arc<Session>,
    socket: Socket,
    /// Ciphertext read and not yet given to the session: `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut tls = lock(&self.session);
                match tls.reader().read(out) {
                    // 0: the peer's close_notify.
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // Closed without close_notify: the framing decides whether that was
                    // between frames (a closed connection) or inside one (a broken one).
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if self.start < self.end {
                    let n = tls.read_tls(&mut &self.buf[self.start..self.end])?;
                    self.start += n;
                    tls.process_new_packets().map_err(invalid)?;
                    continue;
                }
                if self.eof {
                    return Ok(0);
                }
            }
            match self.socket.read(&mut self.buf) {
                Ok(0) => {
                    self.eof = true;
                    let mut tls = lock(&self.session);
                    tls.read_tls(&mut io::empty())?;
                    tls.process_new_packets().map_err(invalid)?;
                }
                Ok(n) => (self.start, self.end) = (0, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The writing half: plaintext into the session, records out to the socket.
struct TlsWriter {
    session: Arc<Session>,
    socket: Socket,
    /// Records sealed under the lock, written after it.
    out: Vec<u8>,
    /// A failed socket write leaves part of a record sent: nothing may follow it.
    broken: Option<io::ErrorKind>,
}

impl Write for TlsWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(data)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if let Some(kind) = self.broken {
            return Err(io::Error::new(
                kind,
                "an earlier write on this connection failed",
            ));
        }
        self.out.clear();
        let taken = {
            let mut tls = lock(&self.session);
            let taken = tls.writer().write_vectored(bufs)?;
            while tls.wants_write() {
                tls.write_tls(&mut self.out)?;
            }
            taken
        };
        if let Err(e) = self.socket.write_all(&self.out) {
            self.broken = Some(e.kind());
            return Err(e);
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
