//! Decoding: a frame's bytes into a message, refusing anything malformed with a typed
//! [`WireError`].

use transport::wire::{open_frame_with, within, Control, Opened, Reader};

use super::*;

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
        kind::RECV_BITMAP => recv_bitmap(&mut r, limits)?,
        kind::DIGESTS => {
            let first = r.u64()?;
            let n = r.count(MAX_RANGES * 4, 8)?;
            check_pages(limits, "digest run end", first, n as u64)?;
            let digests = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            Message::Digests { first, digests }
        }
        kind::SHUT => match Control::decode(kind, body)? {
            Control::Shut { reason, detail } => return Ok(Message::Shut { reason, detail }),
            _ => unreachable!("a SHUT decodes as one"),
        },
        other => return Err(WireError::UnknownKind(other)),
    };
    r.finish()?;
    Ok(msg)
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
        image: r.u64()?,
    })
}

/// RUN: the device state, length-prefixed, at most [`MAX_DEVICE_STATE`] bytes.
fn run(r: &mut Reader<'_>) -> Result<Message, WireError> {
    let len = within("device state length", r.u32()? as usize, MAX_DEVICE_STATE)?;
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

/// Decodes the first frame of `buf` like [`decode`], borrowing page data.
pub fn decode_frame<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<(Frame<'a>, usize)>, WireError> {
    let Some(Opened {
        kind,
        body,
        len: total,
    }) = open_frame_with(buf, limits.max_body, limits.sealed)?
    else {
        return Ok(None);
    };
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
