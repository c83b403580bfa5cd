//! postcopy's messages on the transport's framed connections.
//!
//! The transport cuts a connection's bytes into frames and knows nothing of what is in
//! them ([`transport::conn`]); here [`RecvMessage`] decodes them into [`Message`]s (a
//! pair's readers decode page data in place: `link.rs`) and [`SendMessage`] encodes them —
//! page data straight from the caller's memory, fault handlers' requests without
//! allocating.

use std::io::IoSlice;

use pager::is_zero;
use transport::conn::{FrameReader, FrameWriter};
use transport::wire::envelope;

use crate::error::LinkError;
use crate::wire::{decode_frame, encode, encode_request, kind, Limits, Message, PageRange};

pub use transport::conn::Conn;

/// The shortest run of zero pages inside page data that [`SendMessage::send_page_data`]
/// sends as a ZERO_RUN; shorter ones travel as data.
pub const MIN_ZERO_RUN: usize = 16;

/// Decoding frames into messages.
pub trait RecvMessage {
    /// The next message, checked against the default [`Limits`] (before ADVISE);
    /// [`LinkError::Closed`] at a clean end of stream between frames.
    fn recv(&mut self) -> Result<Message, LinkError>;
}

impl RecvMessage for FrameReader {
    fn recv(&mut self) -> Result<Message, LinkError> {
        let channel = self.channel();
        match decode_frame(self.recv_raw()?, &Limits::default()) {
            Ok(Some((frame, _))) => Ok(frame.into_owned()),
            Ok(None) => unreachable!("the transport hands whole frames"),
            Err(e) => Err(LinkError::malformed(channel, e)),
        }
    }
}

/// Encoding messages into frames.
pub trait SendMessage {
    /// Sends one message.
    fn send(&mut self, msg: &Message) -> Result<(), LinkError>;

    /// Sends REQ_PAGES for `ranges` without allocating (while the encoded frame fits the
    /// writer's preallocated buffer: 4 KiB, some 250 ranges). For fault handlers.
    fn request(&mut self, ranges: &[PageRange]) -> Result<(), LinkError>;

    /// Sends whole pages `data` (from page `first`, pages of `page_size` bytes): runs of
    /// zero pages as ZERO_RUN, the rest as PAGES. Returns the data bytes sent.
    ///
    /// A zero run shorter than [`MIN_ZERO_RUN`] pages inside the data goes as data: a
    /// ZERO_RUN there would cut one frame into three, and the receiver would place (and
    /// wake its faulting threads for) three runs instead of one.
    fn send_page_data(
        &mut self,
        first: u64,
        data: &[u8],
        page_size: usize,
    ) -> Result<u64, LinkError>;
}

impl SendMessage for FrameWriter {
    fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.send_with(|buf| encode(msg, buf))
    }

    fn request(&mut self, ranges: &[PageRange]) -> Result<(), LinkError> {
        self.send_with(|buf| encode_request(ranges, buf))
    }

    fn send_page_data(
        &mut self,
        first: u64,
        data: &[u8],
        page_size: usize,
    ) -> Result<u64, LinkError> {
        let n = data.len() / page_size;
        let zero = |i: usize| is_zero(&data[i * page_size..(i + 1) * page_size]);
        let mut bytes = 0;
        // Pages `from..k` are data still to send (short zero runs included); each page is
        // looked at once.
        let (mut from, mut k) = (0, 0);
        while k < n {
            if !zero(k) {
                k += 1;
                continue;
            }
            let mut end = k + 1;
            while end < n && zero(end) {
                end += 1;
            }
            if end - k >= MIN_ZERO_RUN || (k == 0 && end == n) {
                if from < k {
                    send_pages(
                        self,
                        first + from as u64,
                        &data[from * page_size..k * page_size],
                    )?;
                    bytes += ((k - from) * page_size) as u64;
                }
                self.send(&Message::ZeroRun(PageRange {
                    first: first + k as u64,
                    count: (end - k) as u64,
                }))?;
                from = end;
            }
            k = end;
        }
        if from < n {
            send_pages(self, first + from as u64, &data[from * page_size..])?;
            bytes += ((n - from) * page_size) as u64;
        }
        Ok(bytes)
    }
}

/// Sends a PAGES frame for `data` (whole pages from page `first`) straight from the
/// caller's memory: the bytes of `send(&Message::Pages { .. })` without copying the data.
fn send_pages(w: &mut FrameWriter, first: u64, data: &[u8]) -> Result<(), LinkError> {
    let first = first.to_le_bytes();
    let (head, crc) = envelope(kind::PAGES, &[&first, data], w.sealed());
    let mut slices = [
        IoSlice::new(&head),
        IoSlice::new(&first),
        IoSlice::new(data),
        IoSlice::new(&crc),
    ];
    w.send_vectored(&mut slices)
}
