//! Decoding: a frame's bytes into a message, refusing anything malformed with a typed
//! [`WireError`].

use super::*;

struct Reader<'a> {
    buf: &'a [u8],
    kind: u8,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated { kind: self.kind });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn array32(&mut self) -> Result<[u8; 32], WireError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    /// A count prefix, refused above `max` and above what the remaining bytes can hold
    /// at `item` bytes each (so a lying count cannot make us allocate).
    fn count(&mut self, max: usize, item: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::OutOfRange {
                what: "item count",
                value: n as u64,
                limit: max as u64,
            });
        }
        if n.saturating_mul(item) > self.buf.len() {
            return Err(WireError::Truncated { kind: self.kind });
        }
        Ok(n)
    }
    fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing {
                kind: self.kind,
                extra: self.buf.len(),
            })
        }
    }
}

/// The body of PAGES: the first page and whole pages of data within the geometry.
fn pages_body<'a>(r: &mut Reader<'a>, limits: &Limits) -> Result<(u64, &'a [u8]), WireError> {
    let ps = page_size(limits)?;
    let first = r.u64()?;
    let data = r.take(r.buf.len())?;
    if data.is_empty() || data.len() % ps != 0 {
        return Err(WireError::Invalid("page data is not whole pages"));
    }
    check_pages(limits, "page run end", first, (data.len() / ps) as u64)?;
    Ok((first, data))
}

/// Checks that pages `first..first + count` exist in the advised geometry.
fn check_pages(
    limits: &Limits,
    what: &'static str,
    first: u64,
    count: u64,
) -> Result<(), WireError> {
    if count == 0 {
        return Err(WireError::Invalid("empty page range"));
    }
    let limit = limits.page_count.unwrap_or(MAX_PAGES);
    match first.checked_add(count) {
        Some(end) if end <= limit => Ok(()),
        _ => Err(WireError::OutOfRange {
            what,
            value: first.saturating_add(count),
            limit,
        }),
    }
}

fn page_size(limits: &Limits) -> Result<usize, WireError> {
    limits
        .page_size
        .map(|p| p as usize)
        .ok_or(WireError::Invalid("page data before ADVISE"))
}

fn ranges(
    r: &mut Reader<'_>,
    limits: &Limits,
    what: &'static str,
) -> Result<Vec<PageRange>, WireError> {
    let n = r.count(MAX_RANGES, 16)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let range = PageRange {
            first: r.u64()?,
            count: r.u64()?,
        };
        check_pages(limits, what, range.first, range.count)?;
        out.push(range);
    }
    Ok(out)
}

fn decode_body(kind: u8, body: &[u8], limits: &Limits) -> Result<Message, WireError> {
    let mut r = Reader { buf: body, kind };
    let msg = match kind {
        kind::HELLO => hello(&mut r)?,
        kind::CHALLENGE => Message::Challenge {
            nonce: r.array32()?,
        },
        kind::AUTH => Message::Auth {
            proof: r.array32()?,
            nonce: r.array32()?,
        },
        kind::AUTH_OK => Message::AuthOk {
            proof: r.array32()?,
        },
        kind::START_TLS => Message::StartTls,
        kind::ADMITTED => Message::Admitted,
        kind::ADVISE => Message::Advise(advise(&mut r, limits)?),
        kind::DISCARD => Message::Discard {
            ranges: ranges(&mut r, limits, "discard range end")?,
        },
        kind::REQ_PAGES => Message::ReqPages {
            ranges: ranges(&mut r, limits, "requested range end")?,
        },
        kind::LISTEN => Message::Listen,
        kind::RUN => run(&mut r)?,
        kind::END => Message::End,
        kind::PAGES => {
            let (first, data) = pages_body(&mut r, limits)?;
            Message::Pages {
                first,
                data: data.to_vec(),
            }
        }
        kind::ZERO_RUN => {
            let range = PageRange {
                first: r.u64()?,
                count: r.u64()?,
            };
            check_pages(limits, "zero run end", range.first, range.count)?;
            Message::ZeroRun(range)
        }
        kind::ACK => Message::Ack { seq: r.u64()? },
        kind::SYNC => Message::Sync { seq: r.u64()? },
        kind::SYNCED => Message::Synced { seq: r.u64()? },
        kind::PING => Message::Ping { seq: r.u64()? },
        kind::PONG => Message::Pong { seq: r.u64()? },
        kind::RECV_BITMAP => recv_bitmap(&mut r, limits)?,
        kind::DIGESTS => {
            let first = r.u64()?;
            let n = r.count(MAX_RANGES * 4, 8)?;
            check_pages(limits, "digest run end", first, n as u64)?;
            let digests = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            Message::Digests { first, digests }
        }
        kind::SHUT => shut(&mut r)?,
        other => return Err(WireError::UnknownKind(other)),
    };
    r.finish()?;
    Ok(msg)
}

fn hello(r: &mut Reader<'_>) -> Result<Message, WireError> {
    if r.take(8)? != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(WireError::BadVersion(version));
    }
    let features = Features::from_bits_retain(r.u64()?);
    let role = match r.u8()? {
        1 => Role::Destination,
        2 => Role::Source,
        _ => return Err(WireError::Invalid("unknown role")),
    };
    let channel = match r.u8()? {
        1 => Channel::Main,
        2 => Channel::Urgent,
        _ => return Err(WireError::Invalid("unknown channel")),
    };
    Ok(Message::Hello {
        version,
        features,
        role,
        channel,
        session: r.u64()?,
        generation: r.u32()?,
    })
}

fn advise(r: &mut Reader<'_>, limits: &Limits) -> Result<Advise, WireError> {
    let page_size = r.u32()?;
    if page_size != 4096 && page_size != 2 << 20 {
        return Err(WireError::OutOfRange {
            what: "page size",
            value: u64::from(page_size),
            limit: 2 << 20,
        });
    }
    let page_count = r.u64()?;
    if page_count == 0 || page_count > MAX_PAGES {
        return Err(WireError::OutOfRange {
            what: "page count",
            value: page_count,
            limit: MAX_PAGES,
        });
    }
    let features = Features::from_bits_retain(r.u64()?);
    let n = r.count(MAX_REGIONS, 16)?;
    let mut regions: Vec<WireRegion> = Vec::with_capacity(n);
    let geometry = Limits {
        page_count: Some(page_count),
        ..*limits
    };
    for _ in 0..n {
        let region = WireRegion {
            first_page: r.u64()?,
            pages: r.u64()?,
        };
        check_pages(&geometry, "region end", region.first_page, region.pages)?;
        if let Some(prev) = regions.last() {
            if region.first_page < prev.first_page + prev.pages {
                return Err(WireError::Invalid("regions overlap or are not sorted"));
            }
        }
        regions.push(region);
    }
    Ok(Advise {
        page_size,
        page_count,
        features,
        regions,
    })
}

/// RUN: the device state, length-prefixed, at most [`MAX_DEVICE_STATE`] bytes.
fn run(r: &mut Reader<'_>) -> Result<Message, WireError> {
    let len = r.u32()? as usize;
    if len > MAX_DEVICE_STATE {
        return Err(WireError::OutOfRange {
            what: "device state length",
            value: len as u64,
            limit: MAX_DEVICE_STATE as u64,
        });
    }
    let device_state = r.take(len)?.to_vec();
    Ok(Message::Run { device_state })
}

fn recv_bitmap(r: &mut Reader<'_>, limits: &Limits) -> Result<Message, WireError> {
    let n = r.count(MAX_PAGES.div_ceil(64) as usize, 8)?;
    let words = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
    if let Some(count) = limits.page_count {
        if n as u64 != count.div_ceil(64) {
            return Err(WireError::Invalid(
                "bitmap length does not match the page count",
            ));
        }
        let tail = count % 64;
        if tail != 0 && words[n - 1] >> tail != 0 {
            return Err(WireError::Invalid(
                "bitmap marks pages beyond the page count",
            ));
        }
    }
    Ok(Message::RecvBitmap { words })
}

fn shut(r: &mut Reader<'_>) -> Result<Message, WireError> {
    let reason = match r.u8()? {
        1 => ShutReason::Done,
        2 => ShutReason::Error,
        3 => ShutReason::Auth,
        4 => ShutReason::Cancelled,
        5 => ShutReason::SecurityMismatch,
        6 => ShutReason::Busy,
        _ => return Err(WireError::Invalid("unknown shut reason")),
    };
    let len = r.u16()? as usize;
    if len > MAX_DETAIL {
        return Err(WireError::OutOfRange {
            what: "shut detail length",
            value: len as u64,
            limit: MAX_DETAIL as u64,
        });
    }
    let detail = std::str::from_utf8(r.take(len)?)
        .map_err(|_| WireError::Invalid("shut detail is not UTF-8"))?
        .to_string();
    Ok(Message::Shut { reason, detail })
}

/// A decoded frame whose page data borrows from the input: the bulk of a migration is
/// placed straight from the receive buffer. Every other message is owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// PAGES: whole pages from page `first`.
    Pages {
        /// First page index.
        first: u64,
        /// `count * page_size` bytes.
        data: &'a [u8],
    },
    /// Any other message.
    Other(Message),
}

impl Frame<'_> {
    /// The owned message.
    pub fn into_owned(self) -> Message {
        match self {
            Frame::Pages { first, data } => Message::Pages {
                first,
                data: data.to_vec(),
            },
            Frame::Other(m) => m,
        }
    }
}

/// The length of the first frame of `buf` once its header is in: `Ok(None)` if even the
/// header is incomplete. Refuses an oversize length before anything is buffered for it.
pub fn frame_len(buf: &[u8], limits: &Limits) -> Result<Option<usize>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let body_len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if body_len > limits.max_body {
        return Err(WireError::Oversize {
            len: body_len,
            max: limits.max_body,
        });
    }
    Ok(Some(HEADER_LEN + body_len + TRAILER_LEN))
}

/// Decodes the first frame of `buf` like [`decode`], borrowing page data.
pub fn decode_frame<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<(Frame<'a>, usize)>, WireError> {
    let Some(total) = frame_len(buf, limits)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let kind = buf[4];
    let crc = u32::from_le_bytes(buf[total - 4..total].try_into().expect("4 bytes"));
    if crc32fast::hash(&buf[4..total - 4]) != crc {
        return Err(WireError::BadChecksum { kind });
    }
    if buf[5] != 0 || buf[6] != 0 || buf[7] != 0 {
        return Err(WireError::Reserved { kind });
    }
    let body = &buf[HEADER_LEN..total - TRAILER_LEN];
    let frame = if kind == kind::PAGES {
        let mut r = Reader { buf: body, kind };
        let (first, data) = pages_body(&mut r, limits)?;
        r.finish()?;
        Frame::Pages { first, data }
    } else {
        Frame::Other(decode_body(kind, body, limits)?)
    };
    Ok(Some((frame, total)))
}

/// Decodes the first frame of `buf`: `Ok(None)` if it is incomplete (read more), or the
/// message and the bytes it used.
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Option<(Message, usize)>, WireError> {
    Ok(decode_frame(buf, limits)?.map(|(f, used)| (f.into_owned(), used)))
}
