//! The page server: serves one image to many restore clients at once (fan-out restore of
//! one snapshot). Each client session runs over a connection pair: the urgent connection
//! answers the client's requests, the main connection streams every page the client does
//! not have yet (its RECV_BITMAP says), zero pages as ZERO_RUN, from just after its last
//! request. A client that breaks or goes silent ends its own pair only; when it comes
//! back with a newer generation of its session, that pair supersedes whatever is left of
//! the old one, and the stream resumes from what the client still misses.
//!
//! Strangers cannot exhaust it: connections wait for their handshake on one thread, each
//! with a deadline, at most [`Admission::max_handshakes`] at once (one more closes a
//! silent one, or one of the busiest address's drawn at random), and at most [`Admission::max_sessions`] sessions are served. So its
//! threads are bounded by `2 + 5 × max_sessions` whatever anyone opens: the accepting
//! thread, and per session one serving it, one reading each connection, a heartbeat and
//! the stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pager::{Fetched, Source};

use transport::{Addr, Listener};

use crate::endpoint::sender::{Pages, Sender};
use crate::endpoint::SendStats;
use crate::error::{unexpected, LinkError};
use crate::link::{self, Acceptor, Admission, Admit, Arrival, Timing};
use crate::net::SendMessage;
use crate::wire::{Advise, Features, Message, Role, WireRegion, PROTOCOL};
use crate::Error;
use crate::Security;

/// The page sizes a page server serves: 4 KiB, and 2 MiB for hugepage-backed guests.
pub const PAGE_SIZES: [usize; 2] = [4096, 2 << 20];

/// How a page server runs.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Liveness of client connections.
    pub timing: Timing,
    /// What strangers may hold, and how many clients are served at once.
    pub admission: Admission,
    /// The page size served (one of [`PAGE_SIZES`]): the clients' guest memory's, as
    /// their pagers place whole pages.
    pub page_size: usize,
    /// The image's identity in ADVISE, which a client resuming after a break must find
    /// unchanged ([`Refusal::ImageChanged`](crate::Refusal::ImageChanged) otherwise).
    /// `None`: a random one per server, so a client never resumes against another server
    /// process; name one (a digest of the image, or of its file's identity) to let clients
    /// resume across a restart serving the same image.
    pub image: Option<u64>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            timing: Timing::default(),
            admission: Admission::default(),
            page_size: 4096,
            image: None,
        }
    }
}

/// Counters of a running server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connection pairs that authenticated and were served.
    pub pairs: u64,
    /// Client sessions held now.
    pub sessions: u64,
    /// Connections in their handshake now.
    pub handshaking: u64,
    /// Connections refused by their handshake (a wrong key or certificate, a security
    /// mismatch, garbage, closed midway).
    pub refused: u64,
    /// Of `refused`: certificates refused.
    pub refused_certificate: u64,
    /// Of `refused`: openers speaking the other security.
    pub refused_mismatch: u64,
    /// Connections closed at the handshake deadline.
    pub timed_out: u64,
    /// Connections closed to make room (the handshake cap, out of descriptors).
    pub evicted: u64,
    /// Sessions refused at the session cap.
    pub busy: u64,
    /// Pairs superseded by a newer generation of their session (reconnections).
    pub superseded: u64,
    /// Pages sent as data.
    pub pages_sent: u64,
    /// Pages sent as zero runs.
    pub zero_pages_sent: u64,
    /// Requests answered.
    pub requests: u64,
    /// Requested pages answered that were no longer needed
    /// ([`SendStats::resent`](crate::endpoint::SendStats::resent)): nearly always the
    /// stream had sent them on the same pair, its copy still behind the main connection's
    /// backlog; the client keeps the first.
    pub resent: u64,
}

/// An image behind a local [`Source`], as a sender's pages.
struct Image {
    source: Arc<dyn Source>,
    page_size: usize,
    pages: u64,
}

impl Pages for Image {
    fn geometry(&self) -> (usize, u64) {
        (self.page_size, self.pages)
    }
    fn read<'a>(
        &'a self,
        first: u64,
        count: u64,
        scratch: &'a mut [u8],
    ) -> Result<Option<&'a [u8]>, Error> {
        let bytes = &mut scratch[..count as usize * self.page_size];
        match self.source.fetch(first * self.page_size as u64, bytes)? {
            Fetched::Data(d) => Ok(Some(d)),
            Fetched::Zero => Ok(None),
            Fetched::Pending => Err(Error::Invalid {
                what: "a page server needs a local source; this one answered Pending at page",
                value: first.to_string(),
            }),
        }
    }
}

/// A page server, serving on threads of its own from the moment it is bound; stops on
/// drop (sessions in progress end as their connections do).
pub struct PageServer {
    acceptor: Acceptor,
    stats: Arc<SendStats>,
}

impl PageServer {
    /// Binds `addr` and serves `source` (4 KiB pages; see [`ServerOptions::page_size`]) to clients that pass `security`
    /// (a [`TlsConfig`](transport::TlsConfig), or a pre-shared [`Key`](transport::Key)
    /// on trusted links), with the default [`Admission`].
    pub fn bind(
        addr: &Addr,
        source: Arc<dyn Source>,
        security: impl Into<Security>,
        timing: Timing,
    ) -> Result<PageServer, Error> {
        let opts = ServerOptions {
            timing,
            ..ServerOptions::default()
        };
        Self::bind_with(addr, source, security, opts)
    }

    /// [`PageServer::bind`] with every option.
    pub fn bind_with(
        addr: &Addr,
        source: Arc<dyn Source>,
        security: impl Into<Security>,
        opts: ServerOptions,
    ) -> Result<PageServer, Error> {
        let timing = opts.timing;
        let page_size = opts.page_size;
        if !PAGE_SIZES.contains(&page_size) {
            return Err(Error::Invalid {
                what: "page server page size (4096 or 2097152)",
                value: page_size.to_string(),
            });
        }
        let listener = Listener::bind(addr).map_err(Error::io("bind the page server"))?;
        let image: Arc<dyn Pages> = Arc::new(Image {
            pages: source.len().div_ceil(page_size as u64),
            page_size,
            source,
        });
        let id = match opts.image {
            Some(id) => id,
            None => transport::key::session_id()?,
        };
        let stats = Arc::new(SendStats::default());
        let s = stats.clone();
        let deliver = Box::new(move |arrival: Arrival| {
            let (image, stats) = (image.clone(), s.clone());
            let served = std::thread::Builder::new()
                .name("pc-serve".into())
                .spawn(move || match serve((image, id), stats, arrival, &timing) {
                    Ok(()) => log::info!("a client finished its restore"),
                    Err(e) if e.is_link() => {
                        log::info!("a client's connection broke: {}", crate::error::chain(&e))
                    }
                    Err(e) => log::warn!("a client session failed: {}", crate::error::chain(&e)),
                });
            if let Err(e) = served {
                log::warn!("cannot start a session thread: {e}");
            }
        });
        let acceptor = Acceptor::start(
            listener,
            (PROTOCOL, security.into()),
            (timing, opts.admission),
            (Role::Destination, Admit::AnySession),
            Some(deliver),
        )?;
        Ok(PageServer { acceptor, stats })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<Addr, Error> {
        Ok(self.acceptor.local_addr()?)
    }

    /// The socket file of a Unix listener (its path and identity: remove it only while
    /// it is still this one); `None` on TCP.
    pub fn socket_file(&self) -> Option<transport::socket_file::SocketFile> {
        self.acceptor.socket_file()
    }

    /// The counters now.
    pub fn stats(&self) -> ServerStats {
        let (a, s) = (self.acceptor.stats(), &self.stats);
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let sent = get(&s.stream_pages) + get(&s.urgent_pages);
        let zero = get(&s.zero_pages);
        ServerStats {
            pairs: get(&a.admitted) / 2,
            sessions: self.acceptor.sessions() as u64,
            handshaking: get(&a.handshaking),
            refused: get(&a.refused),
            refused_certificate: get(&a.refused_certificate),
            refused_mismatch: get(&a.refused_mismatch),
            timed_out: get(&a.timed_out),
            evicted: get(&a.evicted),
            busy: get(&a.busy),
            superseded: get(&a.superseded),
            pages_sent: sent.saturating_sub(zero),
            zero_pages_sent: zero,
            requests: get(&s.requests),
            resent: get(&s.resent),
        }
    }

    /// Serves until the process ends.
    pub fn serve_forever(&self) -> ! {
        loop {
            std::thread::park_timeout(Duration::from_secs(3600));
        }
    }
}

/// Serves one connection pair of a client session until the client is done or the
/// pair breaks.
fn serve(
    (image, id): (Arc<dyn Pages>, u64),
    stats: Arc<SendStats>,
    arrival: Arrival,
    timing: &Timing,
) -> Result<(), Error> {
    // Held to the end: however serving ends, the connections close and the slot is free.
    let Arrival {
        conns: (mut main, urgent),
        cutter,
        guard: _cut_at_end,
        ..
    } = arrival;
    let (page_size, pages) = image.geometry();
    let advise = Advise {
        page_size: page_size as u32,
        page_count: pages,
        features: Features::ZERO_RUNS | Features::URGENT_CHANNEL | Features::RECOVERY,
        regions: vec![WireRegion {
            first_page: 0,
            pages,
        }],
        image: id,
    };
    main.w.send(&Message::Advise(advise.clone()))?;
    let sender = Arc::new(Sender::new(image, stats));
    sender.answer_requests();
    let pair = link::start((main, urgent), cutter, &advise, sender.clone(), timing)?;
    // The client says what it has; the stream brings the rest.
    match pair.next("RECV_BITMAP", timing.give_up_after)? {
        (_, Message::RecvBitmap { words }) => {
            sender.need.store_complement_of(&words)?;
            sender.planned();
        }
        (channel, other) => return Err(unexpected(other, "RECV_BITMAP", channel)),
    }
    let silence = timing.silence;
    std::thread::scope(|s| {
        let (main, cutter, failing) = (&pair.main, &pair.cutter, pair.failing());
        let stream = std::thread::Builder::new()
            .name("pc-stream".into())
            .spawn_scoped(s, move || {
                sender.stream((main, cutter), &failing, true, silence)
            })
            .map_err(Error::io("start the stream"))?;
        let end = match pair.wait() {
            Ok((_, Message::Shut { .. })) => Ok(()),
            Ok((channel, other)) => Err(unexpected(other, "SHUT", channel)),
            Err(e) => Err(e),
        };
        if let Some(e) = end.as_ref().err().filter(|e| !e.is_link()) {
            // Said, so the client fails its pager with the cause rather than reconnect.
            pair.shut(&crate::error::chain(e), timing.silence);
        }
        pair.cut(LinkError::Cut);
        let streamed = stream.join().unwrap_or(Ok(()));
        end.and(streamed.or_else(|e| if e.is_link() { Ok(()) } else { Err(e) }))
    })
}
