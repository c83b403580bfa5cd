//! Reading whole frames: one reused buffer, cut by the frames' lengths; for a receiver
//! that moves pages out of large bodies, a buffer of huge pages where each such body is
//! read aligned ([`FrameReader::align_bodies`]).

use std::io::{self, Read};
use std::time::Duration;

use uffd_core::Mapping;

use super::link_error;
use crate::link::{Channel, LinkError};
use crate::wire::{frame_len, Control, DEFAULT_MAX_BODY, HEADER_LEN, TRAILER_LEN};

/// The boundary [`FrameReader::align_bodies`] aligns large bodies to: a transparent huge page.
pub const BODY_ALIGN: usize = 2 << 20;

/// Bytes asked of each read.
const READ: usize = 256 << 10;

/// How far apart the two places are where aligned bodies are read, by turns
/// ([`FrameReader::recv_spare`]).
const SLOT: usize = 2 * BODY_ALIGN;

/// Reads whole frames.
pub struct FrameReader {
    inner: Box<dyn Read + Send>,
    buf: RecvBuf,
    start: usize,
    end: usize,
    pub(super) channel: Channel,
    pub(super) deadline: Duration,
    /// Largest body accepted.
    pub max_body: usize,
    /// Bodies aligned: which byte, from which body size on ([`FrameReader::align_bodies`]).
    align: Option<(usize, usize)>,
    /// Which of the two slots the next aligned body is read into.
    slot: usize,
}

/// A reader's buffer: a vector, or an aligned mapping of huge pages.
enum RecvBuf {
    Heap(Vec<u8>),
    Aligned(Mapping),
}

impl RecvBuf {
    fn bytes(&mut self) -> &mut [u8] {
        match self {
            RecvBuf::Heap(v) => v,
            // SAFETY: our own mapping, of its length, registered with nothing and
            // borrowed exclusively through `self`.
            RecvBuf::Aligned(m) => unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), m.len()) },
        }
    }

    /// Grows to at least `len` bytes. An aligned buffer is made for the largest frame; if
    /// `max_body` grew since, it becomes a vector (bodies are no longer aligned).
    fn grow(&mut self, len: usize) {
        if let RecvBuf::Aligned(_) = self {
            *self = RecvBuf::Heap(self.bytes().to_vec());
        }
        if let RecvBuf::Heap(v) = self {
            v.resize(len, 0);
        }
    }
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
            buf: RecvBuf::Heap(vec![0; 1 << 20]),
            start: 0,
            end: 0,
            channel: Channel::Main,
            deadline: Duration::ZERO,
            max_body: DEFAULT_MAX_BODY,
            align: None,
            slot: 0,
        }
    }

    /// The channel the connection carries (for errors).
    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// The next whole frame's bytes, header to trailer, borrowed from the receive buffer
    /// (valid until the next call; the caller may consume them, e.g. move whole pages out
    /// of a body [`align_bodies`](Self::align_bodies) placed); [`LinkError::Closed`] at a
    /// clean end of stream between frames.
    ///
    /// Bytes are read into one reused buffer (`buf[start..end]` unparsed); a partial frame
    /// is moved to the front only when the space behind it runs short (or to where its body
    /// must be aligned), and the buffer grows only for a frame larger than it.
    pub fn recv_raw(&mut self) -> Result<&mut [u8], LinkError> {
        Ok(self.recv_spare()?.0)
    }

    /// [`recv_raw`](Self::recv_raw), and with it, after a body read aligned
    /// ([`align_bodies`](Self::align_bodies)), the spare: the whole 2 MiB blocks where the
    /// next body of the same size will be read (aligned bodies alternate between two
    /// places), empty now. A receiver that moves the frame's pages out can populate the
    /// spare meanwhile, on another thread (`MADV_POPULATE_WRITE`): the next `recv` then
    /// writes into pages already there, and the reading thread does not wait for the
    /// kernel to zero them. Otherwise the spare is empty.
    pub fn recv_spare(&mut self) -> Result<(&mut [u8], &mut [u8]), LinkError> {
        let channel = self.channel;
        let mut aligned = false;
        let len = loop {
            let have = &self.buf.bytes()[self.start..self.end];
            // How much one read may bring: the rest of a frame being aligned, no more (the
            // next one's start then arrives where it is aligned too); with aligned bodies
            // otherwise at most READ (a large frame's header arrives before the frame is
            // whole, so it can still be moved: at most READ bytes of it); else all there
            // is room for.
            let mut want = if self.align.is_some() {
                READ
            } else {
                usize::MAX
            };
            match frame_len(have, self.max_body) {
                Err(e) => return Err(LinkError::malformed(channel, e)),
                Ok(Some(n)) if n <= have.len() => break n,
                Ok(Some(n)) => {
                    let had = have.len();
                    aligned = self.align(n);
                    if aligned {
                        want = n - had;
                    }
                }
                Ok(None) => {}
            }
            if self.buf.bytes().len() - self.end < READ {
                self.buf.bytes().copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.buf.bytes().len() - self.end < READ {
                    self.buf.grow(self.end + READ);
                }
            }
            let room = &mut self.buf.bytes()[self.end..];
            let fits = want.min(room.len());
            let room = &mut room[..fits];
            let n = match self.inner.read(room) {
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
        let mut spare = 0..0;
        if aligned {
            // The next aligned body goes to the other slot; the spare is its whole blocks.
            self.slot ^= 1;
            let (body_at, _) = self.align.expect("aligned");
            let from = self.align_from() + HEADER_LEN + body_at;
            let blocks = (len - HEADER_LEN - body_at - TRAILER_LEN) / BODY_ALIGN * BODY_ALIGN;
            spare = from..from + blocks;
        }
        if self.start == self.end {
            // Nothing unparsed behind it: the next read fills the buffer from the front,
            // or from where a frame's body would be aligned (the frame's bytes stay where
            // they are until then).
            self.start = self.align_from();
            self.end = self.start;
        }
        if spare.end > self.buf.bytes().len() || (spare.start < at + len && at < spare.end) {
            spare = 0..0;
        }
        let bytes = self.buf.bytes();
        let (frame, spare) = if spare.start >= at + len {
            let (head, tail) = bytes.split_at_mut(spare.start);
            (&mut head[at..at + len], &mut tail[..spare.len()])
        } else {
            let (head, tail) = bytes.split_at_mut(at);
            (&mut tail[..len], &mut head[spare])
        };
        Ok((frame, spare))
    }

    /// From now on, reads each frame whose body is at least `min` bytes so that the body's
    /// byte `at` lies on a [`BODY_ALIGN`] boundary, in a buffer advised for transparent huge
    /// pages: a receiver can then move the whole pages of such a body into place
    /// (`UFFDIO_MOVE`; 2 MiB of huge page at a time) instead of copying them. The buffer
    /// is `max_body` and 2 MiB of address space, touched as frames need it; a moved-out
    /// page takes a fresh one when the next frame is read there.
    pub fn align_bodies(&mut self, at: usize, min: usize) -> io::Result<()> {
        let len = SLOT + BODY_ALIGN + HEADER_LEN + self.max_body + TRAILER_LEN + READ;
        let mapping = Mapping::anon_aligned(len, BODY_ALIGN)?;
        mapping.madvise(0, mapping.len(), libc::MADV_HUGEPAGE)?;
        let mut buf = RecvBuf::Aligned(mapping);
        let unparsed = self.end - self.start;
        buf.bytes()[..unparsed].copy_from_slice(&self.buf.bytes()[self.start..self.end]);
        (self.buf, self.start, self.end) = (buf, 0, unparsed);
        self.align = Some((at, min));
        if unparsed == 0 {
            (self.start, self.end) = (self.align_from(), self.align_from());
        }
        Ok(())
    }

    /// Where a frame must start for its body to be aligned, in the slot the next aligned
    /// body is read into (0 if bodies are not aligned).
    fn align_from(&self) -> usize {
        match self.align {
            // The buffer starts on a boundary.
            Some((at, _)) => {
                (BODY_ALIGN - (HEADER_LEN + at) % BODY_ALIGN) % BODY_ALIGN + self.slot * SLOT
            }
            None => 0,
        }
    }

    /// If the partial frame at `start` (`n` bytes in all) has a body large enough to be
    /// aligned: moves what there is of it to where the body's aligned byte falls on a
    /// boundary (nothing to move when it was read there), and says so.
    fn align(&mut self, n: usize) -> bool {
        let Some((_, min)) = self.align else {
            return false;
        };
        let pos = self.align_from();
        if n - HEADER_LEN - TRAILER_LEN < min || pos + n + READ > self.buf.bytes().len() {
            return false;
        }
        if self.start != pos {
            self.buf.bytes().copy_within(self.start..self.end, pos);
            (self.start, self.end) = (pos, pos + self.end - self.start);
        }
        true
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Conn;
    use crate::net::Socket;
    use std::io::Write;
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

    /// Large frames with small ones before, between and after them.
    fn mixed_frames() -> Vec<Vec<u8>> {
        let big = |seed: u8| {
            let body: Vec<u8> = (0..(2 << 20) + 8)
                .map(|i: usize| (i as u8).wrapping_mul(seed) | 1)
                .collect();
            frame(&body)
        };
        vec![
            big(3),
            frame(b"x"),
            big(5),
            big(7),
            frame(b"yy"),
            frame(&[1; 100]),
            big(9),
            frame(&[2; 300_000]),
            big(11),
        ]
    }

    /// Reads `frames` from `r` with bodies aligned; checks each, and consumes each large
    /// body's pages as a receiver moving them out would (the next frames read there take
    /// fresh pages).
    fn read_aligned(r: &mut FrameReader, frames: &[Vec<u8>]) {
        r.align_bodies(8, 1 << 20).unwrap();
        // Where the last large body said the next one would go.
        let mut next: Option<usize> = None;
        for (i, want) in frames.iter().enumerate() {
            let (got, spare) = r.recv_spare().unwrap();
            assert!(got == &want[..], "frame {i} arrived whole");
            if got.len() <= 1 << 20 {
                assert!(spare.is_empty(), "no spare after small frame {i}");
                continue;
            }
            let end = got.len() - TRAILER_LEN;
            let data = &mut got[HEADER_LEN + 8..end];
            let at = data.as_ptr() as usize;
            assert_eq!(at % BODY_ALIGN, 0, "frame {i}'s body aligned");
            if let Some(next) = next {
                assert_eq!(at, next, "frame {i}'s body is where the spare was");
            }
            assert_eq!(
                spare.len(),
                data.len() / BODY_ALIGN * BODY_ALIGN,
                "frame {i}'s spare"
            );
            let s = spare.as_ptr() as usize;
            assert!(
                s + spare.len() <= at || at + data.len() <= s,
                "the spare is elsewhere"
            );
            next = Some(s);
            // Consumed, as a receiver moving its pages out leaves it, and the spare
            // populated, as it would be meanwhile.
            // SAFETY: whole pages of the reader's own buffer, ours until the next read.
            let (dropped, populated) = unsafe {
                (
                    libc::madvise(data.as_mut_ptr().cast(), data.len(), libc::MADV_DONTNEED),
                    libc::madvise(
                        spare.as_mut_ptr().cast(),
                        spare.len(),
                        libc::MADV_POPULATE_WRITE,
                    ),
                )
            };
            assert_eq!((dropped, populated), (0, 0));
        }
    }

    #[test]
    fn large_bodies_are_read_aligned_even_when_a_read_brings_many_frames() {
        // Each read brings all it is asked for: a small frame and a whole large one
        // behind it would come in one read if reads were not bounded.
        let bytes = mixed_frames().concat();
        let mut r = FrameReader::new(Box::new(io::Cursor::new(bytes)));
        read_aligned(&mut r, &mixed_frames());
    }

    #[test]
    fn large_bodies_are_read_aligned_however_the_socket_cuts_them() {
        let (near, far) = UnixStream::pair().unwrap();
        let mut conn = Conn::plain(Socket::Unix(near)).unwrap();
        let writer = std::thread::spawn(move || {
            let mut far = far;
            let bytes = mixed_frames().concat();
            let mut at = 0;
            for (i, n) in [7, 100_000, 3 << 20, 13, 1 << 20]
                .iter()
                .cycle()
                .enumerate()
            {
                let end = (at + n + i).min(bytes.len());
                far.write_all(&bytes[at..end]).unwrap();
                at = end;
                if at == bytes.len() {
                    break;
                }
            }
        });
        read_aligned(&mut conn.r, &mixed_frames());
        writer.join().unwrap();
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
