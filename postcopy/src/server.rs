//! The page server: serves one image to many restore clients at once (fan-out restore of
//! one snapshot). Per client session: an urgent connection answering REQ_PAGES, and a
//! main connection pushing every page in order (zero pages as ZERO_RUN), whose cursor
//! jumps to just after each urgently requested page. A client that dies or misbehaves
//! ends its own connections only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pager::{Fetched, Source};

use crate::auth::{self, Key};
use crate::net::{split, Addr, FrameReader, FrameWriter, Listener, Stream};
use crate::wire::{Advise, Channel, Features, Message, PageRange, ShutReason, WireRegion};
use crate::Error;

/// Pages per PAGES frame.
const BATCH: u64 = 64;

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections that passed authentication.
    pub sessions: AtomicU64,
    /// Connections refused (authentication or protocol).
    pub refused: AtomicU64,
    /// Pages sent as data.
    pub pages_sent: AtomicU64,
    /// Pages sent as zero runs.
    pub zero_pages_sent: AtomicU64,
}

struct Shared {
    source: Arc<dyn Source>,
    key: Key,
    page_size: usize,
    /// Each session's stream cursor, moved by its urgent requests.
    cursors: Mutex<HashMap<u64, Arc<AtomicU64>>>,
    stats: ServerStats,
    stop: AtomicBool,
}

/// A page server accepting connections on a listener.
pub struct PageServer {
    listener: Listener,
    shared: Arc<Shared>,
}

/// A server running on its own thread; stops on drop.
pub struct ServerHandle {
    addr: Addr,
    listener_fd: std::os::fd::RawFd,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PageServer {
    /// Binds `addr` and serves `source` (4 KiB pages) to clients that know `key`.
    pub fn bind(addr: &Addr, source: Arc<dyn Source>, key: Key) -> Result<PageServer, Error> {
        Ok(PageServer {
            listener: Listener::bind(addr)?,
            shared: Arc::new(Shared {
                source,
                key,
                page_size: 4096,
                cursors: Mutex::new(HashMap::new()),
                stats: ServerStats::default(),
                stop: AtomicBool::new(false),
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<Addr, Error> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves forever (until the listener fails).
    pub fn run(self) -> Result<(), Error> {
        loop {
            if self.shared.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let stream = self.listener.accept()?;
            if self.shared.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let shared = self.shared.clone();
            // A failing connection ends only itself; it was counted where it failed.
            std::thread::spawn(move || serve_connection(&shared, stream));
        }
    }

    /// Runs the server on a thread.
    pub fn spawn(self) -> Result<ServerHandle, Error> {
        let addr = self.local_addr()?;
        let listener_fd = self.listener.as_raw_fd();
        let shared = self.shared.clone();
        let thread = std::thread::spawn(move || {
            let _ = self.run();
        });
        Ok(ServerHandle {
            addr,
            listener_fd,
            shared,
            thread: Some(thread),
        })
    }
}

impl ServerHandle {
    /// Where clients connect.
    pub fn addr(&self) -> &Addr {
        &self.addr
    }

    /// The server's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.shared.stats
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // shutdown(2) on a listening socket makes a blocked accept return (Linux); the
        // fd stays open until the server thread, which owns it, ends.
        // SAFETY: the listener is alive until the thread we join below exits.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_connection(shared: &Shared, stream: Stream) -> Result<(), Error> {
    let (mut r, mut w) = split(stream)?;
    let (_, channel, session) = match auth::listen(&mut r, &mut w, &shared.key) {
        Ok(x) => x,
        Err(e) => {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    shared.stats.sessions.fetch_add(1, Ordering::Relaxed);
    let ps = shared.page_size as u64;
    let page_count = shared.source.len().div_ceil(ps);
    let advise = Advise {
        page_size: shared.page_size as u32,
        page_count,
        features: Features::ZERO_RUNS | Features::URGENT_CHANNEL,
        regions: vec![WireRegion {
            first_page: 0,
            pages: page_count,
        }],
    };
    w.send(&Message::Advise(advise.clone()))?;
    r.limits = r.limits.advised(&advise);
    let cursor = shared
        .cursors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(session)
        .or_insert_with(|| Arc::new(AtomicU64::new(0)))
        .clone();
    let result = match channel {
        Channel::Urgent => serve_requests(shared, &mut r, &mut w, &cursor, page_count),
        Channel::Main => serve_stream(shared, &mut r, &mut w, &cursor, page_count),
    };
    if channel == Channel::Main {
        shared
            .cursors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&session);
    }
    if let Err(e) = &result {
        let _ = w.send(&Message::Shut {
            reason: ShutReason::Error,
            detail: e.to_string(),
        });
    }
    result
}

/// Sends pages `range` as PAGES / ZERO_RUN frames.
fn send_range(
    shared: &Shared,
    w: &mut FrameWriter,
    range: PageRange,
    scratch: &mut [u8],
) -> Result<(), Error> {
    let ps = shared.page_size as u64;
    let mut first = range.first;
    let end = range.first + range.count;
    while first < end {
        let n = (end - first).min(BATCH);
        let bytes = &mut scratch[..(n * ps) as usize];
        let data = match shared.source.fetch(first * ps, bytes)? {
            Fetched::Data(d) => d,
            Fetched::Zero => &[][..],
            Fetched::Pending => {
                return Err(Error::Protocol("a page server needs a local source".into()))
            }
        };
        let (data_pages, zero_pages) = if data.is_empty() {
            w.send(&Message::ZeroRun(PageRange { first, count: n }))?;
            (0, n)
        } else {
            let data_pages = w.send_page_data(first, data, shared.page_size)? / ps;
            (data_pages, n - data_pages)
        };
        shared
            .stats
            .pages_sent
            .fetch_add(data_pages, Ordering::Relaxed);
        shared
            .stats
            .zero_pages_sent
            .fetch_add(zero_pages, Ordering::Relaxed);
        first += n;
    }
    Ok(())
}

fn serve_requests(
    shared: &Shared,
    r: &mut FrameReader,
    w: &mut FrameWriter,
    cursor: &AtomicU64,
    page_count: u64,
) -> Result<(), Error> {
    let mut scratch = vec![0u8; (BATCH as usize) * shared.page_size];
    loop {
        match r.recv() {
            Ok(Message::ReqPages { ranges }) => {
                for range in ranges {
                    send_range(shared, w, range, &mut scratch)?;
                    // Spatial locality: the stream continues just after this page.
                    // Relaxed: a position hint only.
                    cursor.store((range.first + range.count) % page_count, Ordering::Relaxed);
                }
            }
            Ok(Message::Ping { seq }) => w.send(&Message::Pong { seq })?,
            Ok(Message::Shut { .. }) | Err(Error::Closed) => return Ok(()),
            Ok(other) => {
                return Err(Error::Protocol(format!(
                    "unexpected {other:?} on the urgent channel"
                )))
            }
            Err(e) => return Err(e),
        }
    }
}

fn serve_stream(
    shared: &Shared,
    r: &mut FrameReader,
    w: &mut FrameWriter,
    cursor: &AtomicU64,
    page_count: u64,
) -> Result<(), Error> {
    // The client says RUN to start the stream.
    match r.recv()? {
        Message::Run => {}
        other => return Err(Error::Protocol(format!("expected RUN, got {other:?}"))),
    }
    let mut scratch = vec![0u8; (BATCH as usize) * shared.page_size];
    let mut sent = vec![false; page_count as usize];
    let mut remaining = page_count;
    while remaining > 0 {
        // Relaxed: see serve_requests.
        let at = cursor.load(Ordering::Relaxed) % page_count;
        let Some(first) = (at..page_count).chain(0..at).find(|&p| !sent[p as usize]) else {
            break;
        };
        let mut count = 1;
        while count < BATCH && first + count < page_count && !sent[(first + count) as usize] {
            count += 1;
        }
        send_range(shared, w, PageRange { first, count }, &mut scratch)?;
        for p in first..first + count {
            sent[p as usize] = true;
        }
        remaining -= count;
        cursor.store((first + count) % page_count, Ordering::Relaxed);
    }
    w.send(&Message::End)?;
    // Keep the connection until the client closes it.
    loop {
        match r.recv() {
            Ok(Message::Ping { seq }) => w.send(&Message::Pong { seq })?,
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
    }
}
