//! The framing: whole frames read from and written to a connection's byte stream, with
//! the silence deadline turned into a typed link error.

use super::*;

/// What a failed read or write means for the link.
pub(crate) fn link_error(channel: Channel, deadline: Duration, e: io::Error) -> LinkError {
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
    pub(super) channel: Channel,
    pub(super) deadline: Duration,
    /// What the decoder checks against.
    pub limits: Limits,
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
            limits: Limits::default(),
        }
    }

    /// The next message; [`LinkError::Closed`] at a clean end of stream between frames.
    pub fn recv(&mut self) -> Result<Message, LinkError> {
        self.recv_frame().map(Frame::into_owned)
    }

    /// The next frame, its page data borrowed from the receive buffer (valid until the
    /// next call).
    ///
    /// Bytes are read into one reused buffer (`buf[start..end]` unparsed); a partial frame
    /// is moved to the front only when the space behind it runs short, and the buffer grows
    /// only for a frame larger than it.
    pub fn recv_frame(&mut self) -> Result<Frame<'_>, LinkError> {
        const READ: usize = 256 << 10;
        let channel = self.channel;
        let malformed = |source: WireError| LinkError::malformed(channel, source);
        loop {
            let have = &self.buf[self.start..self.end];
            if frame_len(have, &self.limits)
                .map_err(malformed)?
                .is_some_and(|n| n <= have.len())
            {
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
        }
        let (frame, used) = decode_frame(&self.buf[self.start..self.end], &self.limits)
            .map_err(malformed)?
            .expect("a whole frame is in the buffer");
        self.start += used;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(frame)
    }
}

/// Writes frames. Its buffer is preallocated: control frames (PING, REQ_PAGES of a few
/// ranges) are encoded and sent without allocating.
pub struct FrameWriter {
    inner: Box<dyn Write + Send>,
    buf: Vec<u8>,
    pub(super) channel: Channel,
    pub(super) deadline: Duration,
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

    fn write_buf(&mut self) -> Result<(), LinkError> {
        self.inner
            .write_all(&self.buf)
            .map_err(|e| link_error(self.channel, self.deadline, e))
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.buf.clear();
        encode(msg, &mut self.buf);
        self.write_buf()
    }

    /// Sends REQ_PAGES for `ranges` without allocating (while the encoded frame fits the
    /// preallocated buffer: 4 KiB, some 250 ranges). For fault handlers.
    pub fn request(&mut self, ranges: &[PageRange]) -> Result<(), LinkError> {
        self.buf.clear();
        encode_request(ranges, &mut self.buf);
        self.write_buf()
    }

    /// Sends a PAGES frame for `data` (whole pages starting at page `first`) straight from
    /// the caller's memory: the same bytes as `send(&Message::Pages { .. })` without
    /// copying the data into a message first.
    pub fn send_pages(&mut self, first: u64, data: &[u8]) -> Result<(), LinkError> {
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
            match self.inner.write_vectored(left) {
                Ok(0) => return Err(self.fail(io::ErrorKind::WriteZero.into())),
                Ok(n) => io::IoSlice::advance_slices(&mut left, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(e)),
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
    ) -> Result<u64, LinkError> {
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
            let at = first + i as u64;
            if z {
                self.send(&Message::ZeroRun(PageRange {
                    first: at,
                    count: (j - i) as u64,
                }))?;
            } else {
                self.send_pages(at, &data[i * page_size..j * page_size])?;
                bytes += ((j - i) * page_size) as u64;
            }
            i = j;
        }
        Ok(bytes)
    }

    /// Writes raw bytes (fault injection: a frame cut in half).
    #[cfg(feature = "fault-injection")]
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.inner.write_all(bytes).map_err(|e| self.fail(e))
    }
}

/// Whether `page` is all zero (64-byte blocks OR-reduced: vectorises, unlike an early-exit
/// byte loop).
fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
