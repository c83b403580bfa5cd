//! The restore client of a page server: a [`pager::Source`] whose faults become requests
//! on the urgent connection and whose arrivals — answers and the background stream alike —
//! are placed through the pager's placement handle.
//!
//! It recovers like a migration does: a connection that breaks or goes silent pauses it
//! (faults wait, their pages stay Requested), it reconnects with backoff, reports what it
//! has, asks again for what is outstanding, and the stream resumes with what is still
//! missing. After [`Timing::give_up_after`] without progress (no page landed, however
//! many pairs connected meanwhile; reconnections that bring nothing back off) it fails the
//! pager ([`Placer::fail`]), so the embedder stops — `uffdkit fc-handler` then kills the
//! VMM rather than leave it hanging on faults nobody will serve. A server that says why it
//! ends the session (a SHUT: it cannot read a page) fails the pager at once, with that
//! cause.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pager::{ChildSource, Fetched, Placer, Source, SourceError};

use transport::Addr;

use crate::endpoint::receiver::{read_advise, Land, Receiver};
use crate::endpoint::RecvStats;
use crate::error::{chain, unexpected, LinkError, Refusal};
use crate::link::{self, Dialer, Messages, Pair, Timing};
use crate::wire::{Advise, Message, Role, ShutReason, PROTOCOL};
use crate::Error;
use crate::Security;

/// Pages from a `uffdkit serve` page server.
pub struct RemoteSource {
    client: Arc<Client>,
}

struct Client {
    advise: Advise,
    ps: usize,
    receiver: Arc<Receiver>,
    stats: Arc<RecvStats>,
    dialer: Mutex<Dialer>,
    /// The pair connected before the pager attached.
    first: Mutex<Option<Pair>>,
    /// The pair in use, to cut when the source is dropped.
    cutter: Mutex<Option<Arc<link::Cutter>>>,
    stop: AtomicBool,
    reconnects: AtomicU64,
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource")
            .field("page_size", &self.client.ps)
            .field("pages", &self.client.advise.page_count)
            .finish_non_exhaustive()
    }
}

impl RemoteSource {
    /// Connects to the server at `addr`, secured as `security` says (a
    /// [`TlsConfig`](transport::TlsConfig), or a pre-shared [`Key`](transport::Key) on
    /// trusted links), with default [`Timing`].
    pub fn connect(addr: &Addr, security: impl Into<Security>) -> Result<RemoteSource, Error> {
        Self::connect_with(addr, security, Timing::default())
    }

    /// Connects with `timing` (retrying for up to its `give_up_after`; a refusal — a
    /// wrong key or certificate, a security mismatch — ends it at once).
    pub fn connect_with(
        addr: &Addr,
        security: impl Into<Security>,
        timing: Timing,
    ) -> Result<RemoteSource, Error> {
        let mut dialer = Dialer::new(
            addr.clone(),
            (PROTOCOL, security.into()),
            Role::Destination,
            timing,
        )?;
        let (conns, advise) = dialer
            .connect(
                Instant::now(),
                |d| sleep(d, &AtomicBool::new(false)),
                |mut main, urgent| Ok((read_advise(&mut main)?, main, urgent)),
            )
            .map(|(advise, main, urgent)| ((main, urgent), advise))?;
        let ps = advise.page_size as usize;
        // The decoder admits only the page sizes a pager places (4 KiB, 2 MiB).
        if advise.regions.len() != 1 {
            return Err(Error::refused(Refusal::Geometry(
                "a restore client takes one region",
            )));
        }
        let stats = Arc::new(RecvStats::default());
        let receiver = Arc::new(Receiver::new(
            ps,
            advise.page_count,
            Land::Idle,
            stats.clone(),
        ));
        let pair = link::pair(conns, &advise, receiver.clone(), &timing)?;
        log::info!(
            "connected to the page server at {addr}: {} pages of {ps} bytes",
            advise.page_count
        );
        Ok(RemoteSource {
            client: Arc::new(Client {
                advise,
                ps,
                receiver,
                stats,
                dialer: Mutex::new(dialer),
                cutter: Mutex::new(Some(pair.cutter.clone())),
                first: Mutex::new(Some(pair)),
                stop: AtomicBool::new(false),
                reconnects: AtomicU64::new(0),
            }),
        })
    }

    /// The server's page size (pager regions must use it).
    pub fn page_size(&self) -> usize {
        self.client.ps
    }

    /// Reconnections so far.
    pub fn reconnects(&self) -> u64 {
        self.client.reconnects.load(Ordering::Relaxed)
    }
}

/// Sleeps `d` in short steps; aborts once `stop` is set.
fn sleep(d: Duration, stop: &AtomicBool) -> Result<bool, Error> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::PagerStopped);
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(true)
}

impl Source for RemoteSource {
    fn len(&self) -> u64 {
        self.client.advise.page_count * self.client.ps as u64
    }

    /// Asks for the pages without allocating and answers Pending; while paused the
    /// request is remembered and made on reconnection.
    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        self.client.receiver.fetch(offset, scratch)
    }

    /// One connection to the page server serves one address space: a forked child is
    /// refused (its missing pages poisoned), never left waiting on arrivals that would go
    /// to the parent's placer.
    fn child(&self) -> ChildSource {
        ChildSource::Refuse("a page-server connection serves one address space")
    }

    fn attach(&self, placer: Placer) {
        let Some(pair) = self
            .client
            .first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        self.client.receiver.set_land(Land::Place(placer.clone()));
        let client = self.client.clone();
        let supervisor = placer.clone();
        let started = std::thread::Builder::new()
            .name("pc-client".into())
            .spawn(move || client.supervise(pair, &supervisor));
        // Without its thread no page would ever arrive: the pager fails (its pages
        // poisoned), rather than its faults waiting forever.
        if let Err(source) = started {
            placer.fail(SourceError {
                what: "start the page server client's thread",
                offset: 0,
                source,
            });
        }
    }
}

impl Client {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Pages landed so far.
    fn landed(&self) -> u64 {
        self.stats.placed.load(Ordering::Relaxed)
    }

    /// Runs sessions until every page is here, reconnecting after every break; fails
    /// the pager when it gives up.
    fn supervise(&self, mut pair: Pair, placer: &Placer) {
        // When a page last landed (at most: when the pair that landed it broke), and the
        // count then. The give-up runs from there, not from the last connection.
        let mut progress = (Instant::now(), self.landed());
        loop {
            let error = match self.session(&pair) {
                Ok(()) => return log::info!("every page arrived from the page server"),
                Err(e) => e,
            };
            if self.stopping() || matches!(error, Error::PagerStopped) {
                return;
            }
            if !error.is_link() {
                return self.fail(placer, error);
            }
            log::warn!(
                "page server connection broken: {}; reconnecting",
                chain(&error)
            );
            self.receiver.pause();
            drop(pair);
            let progressed = self.landed() > progress.1;
            if progressed {
                progress = (Instant::now(), self.landed());
            }
            let after = self
                .dialer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .timing
                .give_up_after;
            if progress.0.elapsed() >= after {
                let Error::Link(last) = error else {
                    unreachable!("only a broken link reconnects")
                };
                return self.fail(placer, Error::gave_up(after, last));
            }
            pair = match self.reconnect(progress.0, progressed) {
                Ok(p) => p,
                Err(Error::PagerStopped) => return,
                Err(e) => return self.fail(placer, e),
            };
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            log::info!("reconnected to the page server");
        }
    }

    fn fail(&self, placer: &Placer, error: Error) {
        log::error!("page server: {}", chain(&error));
        placer.fail(SourceError {
            what: "pages from the page server",
            offset: 0,
            source: std::io::Error::other(error),
        });
    }

    /// One pair: say what is here, ask again for what is outstanding, wait for END and
    /// every page, then tell the server we are done.
    fn session(&self, pair: &Pair) -> Result<(), Error> {
        self.receiver.greet(pair, None)?;
        // Dropping the source cuts the pair, which ends this wait.
        match pair.wait()? {
            (_, Message::End) => {}
            (channel, other) => return Err(unexpected(other, "END", channel)),
        }
        let timing = self.dialer.lock().unwrap_or_else(|p| p.into_inner()).timing;
        self.receiver.wait_complete(pair, timing.silence)?;
        pair.main.send(&Message::Shut {
            reason: ShutReason::Done,
            detail: "every page arrived".into(),
        })?;
        Ok(())
    }

    /// A new pair of the session, with the same geometry, giving up
    /// [`Timing::give_up_after`] after `since`; at once if the last one `progressed`,
    /// else after a backoff.
    fn reconnect(&self, since: Instant, progressed: bool) -> Result<Pair, Error> {
        let mut dialer = self.dialer.lock().unwrap_or_else(|p| p.into_inner());
        if progressed {
            dialer.progressed();
        }
        let timing = dialer.timing;
        let pair = dialer.connect(
            since,
            |d| sleep(d, &self.stop),
            |mut main, urgent| {
                let advise = read_advise(&mut main)?;
                if advise != self.advise {
                    let same_geometry = Advise {
                        image: self.advise.image,
                        ..advise
                    } == self.advise;
                    return Err(Error::refused(match same_geometry {
                        true => Refusal::ImageChanged,
                        false => Refusal::GeometryChanged,
                    }));
                }
                link::pair((main, urgent), &self.advise, self.receiver.clone(), &timing)
            },
        )?;
        *self.cutter.lock().unwrap_or_else(|p| p.into_inner()) = Some(pair.cutter.clone());
        Ok(pair)
    }
}

impl Drop for RemoteSource {
    fn drop(&mut self) {
        self.client.stop.store(true, Ordering::Relaxed);
        if let Some(c) = &*self.client.cutter.lock().unwrap_or_else(|p| p.into_inner()) {
            c.cut(LinkError::Cut);
        }
        drop(
            self.client
                .first
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
    }
}
