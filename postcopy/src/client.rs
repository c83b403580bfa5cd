//! The restore client's side of a page server: a [`pager::Source`] that asks for faulted
//! pages on the urgent connection and places whatever arrives — urgent answers and the
//! background stream alike — through the pager's placement handle.

use std::sync::{Arc, Mutex};

use pager::{Fetched, Placer, Source, SourceError};

use crate::auth::{self, Key};
use crate::net::{split, Addr, FrameReader, FrameWriter, Stream};
use crate::wire::{Channel, Frame, Message, PageRange, Role};
use crate::Error;

/// Pages from a `uffdkit serve` page server.
pub struct RemoteSource {
    len: u64,
    page_size: usize,
    urgent: Mutex<FrameWriter>,
    main: Mutex<FrameWriter>,
    readers: Mutex<Option<(FrameReader, FrameReader)>>,
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

fn connect(
    addr: &Addr,
    key: &Key,
    channel: Channel,
    session: u64,
) -> Result<(FrameReader, FrameWriter, u64, usize), Error> {
    let (mut r, mut w) = split(Stream::connect(addr)?)?;
    auth::open(&mut r, &mut w, key, Role::Destination, channel, session)?;
    let advise = match r.recv()? {
        Message::Advise(a) => a,
        other => return Err(Error::Protocol(format!("expected ADVISE, got {other:?}"))),
    };
    r.limits = r.limits.advised(&advise);
    Ok((r, w, advise.page_count, advise.page_size as usize))
}

impl RemoteSource {
    /// Connects both channels to the server at `addr` and authenticates with `key`.
    pub fn connect(addr: &Addr, key: &Key) -> Result<RemoteSource, Error> {
        let session = auth::session_id();
        let (ur, uw, pages, page_size) = connect(addr, key, Channel::Urgent, session)?;
        let (mr, mw, _, _) = connect(addr, key, Channel::Main, session)?;
        Ok(RemoteSource {
            len: pages * page_size as u64,
            page_size,
            urgent: Mutex::new(uw),
            main: Mutex::new(mw),
            readers: Mutex::new(Some((ur, mr))),
        })
    }

    /// The server's page size (pager regions must use it).
    pub fn page_size(&self) -> usize {
        self.page_size
    }
}

impl Source for RemoteSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        let range = PageRange {
            first: offset / self.page_size as u64,
            count: (scratch.len() / self.page_size).max(1) as u64,
        };
        self.urgent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(&Message::ReqPages {
                ranges: vec![range],
            })
            .map_err(|e| SourceError {
                what: "request pages from the page server",
                offset,
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(Fetched::Pending)
    }

    fn attach(&self, placer: Placer) {
        let Some((urgent, main)) = self
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let ps = self.page_size;
        for reader in [urgent, main] {
            let placer = placer.clone();
            std::thread::spawn(move || receive(reader, placer, ps));
        }
        let _ = self
            .main
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(&Message::Run);
    }
}

/// Places every page arriving on one connection until it closes or the pager is gone.
fn receive(mut reader: FrameReader, placer: Placer, ps: usize) {
    while let Ok(frame) = reader.recv_frame() {
        let msg = match frame {
            Frame::Pages { first, data } => {
                if matches!(placer.place_run(first * ps as u64, data), Ok(Some(_))) {
                    continue;
                }
                return;
            }
            Frame::Other(msg) => msg,
        };
        let stopped = match msg {
            Message::ZeroRun(r) => (r.first..r.first + r.count).any(|p| {
                matches!(
                    placer.place(p * ps as u64, None),
                    Ok(pager::Placed::Stopped) | Err(_)
                )
            }),
            Message::End | Message::Pong { .. } => false,
            Message::Shut { .. } => true,
            _ => true,
        };
        if stopped {
            return;
        }
    }
}

impl Drop for RemoteSource {
    fn drop(&mut self) {
        for w in [&self.urgent, &self.main] {
            w.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
        }
    }
}

/// Shares a remote source between a pager and its owner.
pub type SharedRemote = Arc<RemoteSource>;
