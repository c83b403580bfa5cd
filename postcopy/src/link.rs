//! postcopy on the transport's connection pairs: frames decoded against the advised
//! geometry before an endpoint sees them, and messages sent on a pair's channels.
//!
//! The pairs themselves — readers, heartbeats, silence deadlines, supersession, dialing
//! and the admission gate — are [`transport::link`]'s; an endpoint here only says what it
//! does with a decoded frame ([`Inbound`]).

use std::sync::Arc;

use transport::link::LinkError;

use crate::net::{Conn, SendMessage};
use crate::wire::{decode_frame, encode_request, Advise, Frame, Limits, Message, PageRange};
use crate::wire::{HEADER_LEN, TRAILER_LEN};
use crate::Error;

/// A connection pair carrying postcopy's messages.
pub(crate) type Pair = transport::link::Pair<Message, Error>;

/// Fails a [`Pair`]'s session from a thread of its own.
pub(crate) type Failing = transport::link::Failing<Message, Error>;

pub(crate) use transport::link::{
    Acceptor, Admission, Admit, Arrival, Chan, Cutter, Dialer, Timing,
};

/// What an endpoint does with frames, on the reading thread of the connection they came
/// on: use data frames (place pages, answer requests) and return `None`, or return the
/// message for the phase logic's queue. An error other than [`Error::Link`] ends the
/// session.
pub(crate) trait Inbound: Send + Sync {
    /// Handles one frame read on `chan`'s connection (heartbeats never get here).
    fn frame(&self, chan: &Chan, frame: Frame<'_>) -> Result<Option<Message>, Error>;

    /// Handles one PAGES frame: whole pages from `first`, checked against the advised
    /// geometry, in the reader's buffer, which the endpoint may consume (move pages out
    /// of: see [`Receiver`](crate::endpoint::receiver::Receiver)).
    /// `spare`: where the reader will read the next body of this size (see
    /// `transport::conn::FrameReader::recv_spare`), empty now, or an empty slice.
    fn pages(
        &self,
        chan: &Chan,
        first: u64,
        data: &mut [u8],
        spare: &mut [u8],
    ) -> Result<Option<Message>, Error> {
        let _ = spare;
        self.frame(chan, Frame::Pages { first, data })
    }

    /// Whether fault handlers ask for pages through [`Messages::request`] on this pair.
    fn asks_for_pages(&self) -> bool {
        false
    }
}

/// An endpoint's [`Inbound`] behind the decoder.
struct Decoding {
    limits: Limits,
    inner: Arc<dyn Inbound>,
}

impl transport::link::Inbound for Decoding {
    type Message = Message;
    type Error = Error;

    fn frame(&self, chan: &Chan, bytes: &mut [u8]) -> Result<Option<Message>, Error> {
        self.frame_with_spare(chan, bytes, &mut [])
    }

    fn frame_with_spare(
        &self,
        chan: &Chan,
        bytes: &mut [u8],
        spare: &mut [u8],
    ) -> Result<Option<Message>, Error> {
        let (first, data) = match decode_frame(bytes, &self.limits) {
            Ok(Some((Frame::Pages { first, data }, _))) => {
                let at = data.as_ptr() as usize - bytes.as_ptr() as usize;
                (first, at..at + data.len())
            }
            Ok(Some((frame, _))) => return self.inner.frame(chan, frame),
            Ok(None) => unreachable!("the transport hands whole frames"),
            Err(e) => return Err(LinkError::malformed(chan.channel, e).into()),
        };
        self.inner.pages(chan, first, &mut bytes[data], spare)
    }

    fn forwards_requests(&self) -> bool {
        self.inner.asks_for_pages()
    }
}

/// Starts a pair on two connections that `cutter` cuts, its frames decoded against
/// `advise` and handed to `inbound`.
pub(crate) fn start(
    conns: (Conn, Conn),
    cutter: Arc<Cutter>,
    advise: &Advise,
    inbound: Arc<dyn Inbound>,
    timing: &Timing,
) -> Result<Pair, Error> {
    let limits = Limits {
        sealed: conns.0.sealed() && conns.1.sealed(),
        ..Limits::default().advised(advise)
    };
    let decoding = Arc::new(Decoding {
        limits,
        inner: inbound,
    });
    Ok(Pair::start(conns, cutter, decoding, timing)?)
}

/// Makes a pair from two connections: their cutter, then the running [`Pair`].
pub(crate) fn pair(
    conns: (Conn, Conn),
    advise: &Advise,
    inbound: Arc<dyn Inbound>,
    timing: &Timing,
) -> Result<Pair, Error> {
    let cutter = Cutter::new(&conns.0, &conns.1).map_err(Error::io("clone a connection"))?;
    start(conns, cutter, advise, inbound, timing)
}

/// postcopy's messages on a pair's channel.
pub(crate) trait Messages {
    /// Sends one message.
    fn send(&self, msg: &Message) -> Result<(), LinkError>;

    /// Sends REQ_PAGES for `ranges` (at most a frame's worth) without allocating; on
    /// failure shuts the connection down (its reader reports the break). For fault
    /// handlers.
    fn request(&self, ranges: &[PageRange]);
}

impl Messages for Chan {
    fn send(&self, msg: &Message) -> Result<(), LinkError> {
        self.writer().send(msg)
    }

    fn request(&self, ranges: &[PageRange]) {
        let len = HEADER_LEN + 4 + 16 * ranges.len() + TRAILER_LEN;
        self.request_with(len, |buf| encode_request(ranges, buf));
    }
}
