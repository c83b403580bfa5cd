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
/// Plaintext sealed before its record is drained into the writer's buffer: TLS's largest
/// record. rustls allocates each record it seals; drained at once, the record is freed
/// and the next one reuses its memory. Sealing a whole [`SEAL_CHUNK`] before draining
/// freed 256 KiB at a time, which glibc handed back to the kernel on every write
/// (`MADV_DONTNEED` from `free`, ~3 600 calls per GiB streamed): every page of it was
/// faulted in again, and each return flushed the other CPU's TLB.
const RECORD: usize = 16 << 10;

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
    /// A failed write leaves part of a record sent, or the session's record sequence
    /// ahead of what the peer got: nothing may follow it.
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
        // A failure once records were sealed leaves the session's record sequence ahead
        // of what the peer will read: nothing may follow it either.
        let written = self
            .seal(bufs)
            .and_then(|taken| self.socket.write_all(&self.out).map(|()| taken));
        if let Err(e) = &written {
            self.broken = Some(e.kind());
        }
        written
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsWriter {
    /// Seals what the session takes of `bufs` (at most [`SEAL_CHUNK`] bytes, a record at a
    /// time) into `out`, draining each record at once so that the next reuses its memory:
    /// how many bytes it took.
    fn seal(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut tls = lock(&self.session);
        let (mut taken, mut at) = (0, (0, 0));
        while taken < SEAL_CHUNK {
            let mut slices = [IoSlice::new(&[]); 8];
            let (n, offered) = piece(bufs, at, &mut slices);
            if offered == 0 {
                break;
            }
            let sealed = tls.writer().write_vectored(&slices[..n])?;
            while tls.wants_write() {
                tls.write_tls(&mut self.out)?;
            }
            taken += sealed;
            if sealed < offered {
                break; // the session's buffer is full
            }
            at = advance(bufs, at, sealed);
        }
        Ok(taken)
    }
}

/// The next at most [`RECORD`] bytes of `bufs` from `at` (a slice, an offset in it), in
/// at most `piece.len()` slices: how many slices, and how many bytes.
fn piece<'b>(
    bufs: &'b [IoSlice<'_>],
    at: (usize, usize),
    piece: &mut [IoSlice<'b>],
) -> (usize, usize) {
    let ((mut i, mut off), mut n, mut len) = (at, 0, 0);
    while i < bufs.len() && n < piece.len() && len < RECORD {
        let buf: &'b [u8] = &bufs[i];
        let part = &buf[off..buf.len().min(off + RECORD - len)];
        if !part.is_empty() {
            piece[n] = IoSlice::new(part);
            (n, len) = (n + 1, len + part.len());
        }
        (i, off) = if off + part.len() == buf.len() {
            (i + 1, 0)
        } else {
            (i, off + part.len())
        };
    }
    (n, len)
}

/// `at` moved past `n` more bytes of `bufs`.
fn advance(bufs: &[IoSlice<'_>], (mut i, mut off): (usize, usize), mut n: usize) -> (usize, usize) {
    while n > 0 && i < bufs.len() {
        let step = n.min(bufs[i].len() - off);
        (n, off) = (n - step, off + step);
        if off == bufs[i].len() {
            (i, off) = (i + 1, 0);
        }
    }
    (i, off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writes_slices_go_out_in_pieces_of_at_most_a_record_in_order() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // A frame's shape (a header, a page number, 1 MiB-ish of pages, a checksum), with
        // an empty slice and pieces ending on and across record boundaries.
        for cuts in [
            vec![16, 8, 180_000, 4],
            vec![0, RECORD, 1, RECORD - 1, 0, 3],
            vec![5; 40],
            vec![RECORD * 3],
        ] {
            let mut bufs = Vec::new();
            let mut at = 0;
            for len in &cuts {
                bufs.push(IoSlice::new(&data[at..at + len]));
                at += len;
            }
            let (mut out, mut pos) = (Vec::new(), (0, 0));
            loop {
                let mut slices = [IoSlice::new(&[]); 8];
                let (n, len) = piece(&bufs, pos, &mut slices);
                if len == 0 {
                    break;
                }
                assert!(len <= RECORD && n <= 8, "{cuts:?}: a piece of {len} bytes");
                assert_eq!(slices[..n].iter().map(|s| s.len()).sum::<usize>(), len);
                slices[..n].iter().for_each(|s| out.extend_from_slice(s));
                pos = advance(&bufs, pos, len);
            }
            assert_eq!(out, data[..at], "{cuts:?}");
        }
    }
}
