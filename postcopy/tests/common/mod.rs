//! Live migration end to end, in one process: a source region with a writing workload,
//! a destination whose workload runs from RUN on, real dirty tracking (WP_ASYNC +
//! PAGEMAP_SCAN), real faults served through the pager, real sockets — optionally through
//! testkit's fault-injecting proxy. Every case ends with the protocol's digest verdict
//! *and* a byte-for-byte comparison of every page.
#![allow(dead_code)] // each test file uses its own part

pub mod inject;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pager::DeliveryMode;
use postcopy::migrate::{
    DestControl, DestOptions, DestReport, Destination, Migration, RunningMemory, SourceControl,
    SourceOptions, SourceReport, Timing,
};
use postcopy::wire::Channel;
use postcopy::Security;
use testkit::proxy::{Direction, Proxy, ProxyOptions};
use transport::tls::{Authority, TlsConfig};
use transport::Addr;
use transport::Key;
use uffd_core::{Mapping, MemoryKind};

/// Logs to stderr, with times, when `UFFDKIT_TEST_LOG` names a level (`info`, `debug`).
pub fn log_to_stderr() {
    struct Stderr(std::time::Instant);
    impl log::Log for Stderr {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            let t = self.0.elapsed().as_secs_f64();
            eprintln!("[{t:8.3}] {} {}: {}", r.level(), r.target(), r.args());
        }
        fn flush(&self) {}
    }
    let Ok(level) = std::env::var("UFFDKIT_TEST_LOG") else {
        return;
    };
    let logger = Box::leak(Box::new(Stderr(std::time::Instant::now())));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level.parse().unwrap_or(log::LevelFilter::Info));
    }
}

pub fn key() -> Key {
    Key::new(*b"0123456789abcdef-test-key").expect("key")
}

/// A throwaway CA shared by a test process's TLS ends.
pub fn authority() -> &'static Authority {
    static CA: std::sync::OnceLock<Authority> = std::sync::OnceLock::new();
    CA.get_or_init(|| Authority::new("uffdkit test CA").expect("a CA"))
}

/// A TLS configuration of `authority()` for `names` (both ends of a loopback link carry
/// `localhost` and `127.0.0.1`).
pub fn tls_for(names: &[&str]) -> TlsConfig {
    let ca = authority();
    ca.config(&ca.issue(names).expect("a certificate"))
        .expect("a TLS configuration")
}

/// The listener's and the opener's TLS ends of a loopback link.
pub fn tls_ends() -> (Security, Security) {
    let names = ["localhost", "127.0.0.1"];
    (tls_for(&names).into(), tls_for(&names).into())
}

/// The listener's and the opener's pre-shared-key ends.
pub fn psk_ends() -> (Security, Security) {
    (key().into(), key().into())
}

/// Liveness for tests: generous against a loaded 2-vCPU machine (a heartbeat starved for
/// a second is no break), short enough that a freeze is noticed in a few seconds.
pub fn test_timing() -> Timing {
    Timing {
        heartbeat: Duration::from_millis(250),
        silence: Duration::from_millis(2500),
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(300),
        give_up_after: Duration::from_secs(30),
    }
}

/// Waits (bounded, 20 s) until a page server's counters satisfy `done`; fails saying
/// `what` was awaited.
pub fn counted(
    srv: &postcopy::server::PageServer,
    what: &str,
    done: impl Fn(&postcopy::server::ServerStats) -> bool,
) -> postcopy::server::ServerStats {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = srv.stats();
        if done(&s) {
            return s;
        }
        assert!(std::time::Instant::now() < until, "{what}: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Tags a postcopy connection `main` or `urgent` from its HELLO.
pub fn channel_of(first: &[u8]) -> Option<&'static str> {
    postcopy::wire::peek_channel(first).map(|c| c.map_or("other", Channel::name))
}

/// A proxy in front of `to` counting the bytes the opener sends on `main` (the source's
/// pages; a page server's client would count the other way).
/// A proxy to the page server at `to` that holds its stream once `after` bytes of `main`
/// went through (main half-open towards the client; urgent keeps flowing).
pub fn stream_held_after(to: &Addr, after: u64) -> Arc<Proxy> {
    let proxy = proxy_to(to, Direction::ToOpener);
    proxy.plan(vec![testkit::proxy::Cut {
        mode: testkit::proxy::CutMode::HalfOpen(Direction::ToOpener),
        target: testkit::proxy::Target::Tag("main"),
        after,
    }]);
    proxy
}

pub fn proxy_to(to: &Addr, direction: Direction) -> Arc<Proxy> {
    let Addr::Tcp(to) = to else {
        panic!("the proxy speaks TCP")
    };
    let opts = ProxyOptions {
        classify: channel_of,
        counted: "main",
        direction,
        settle: 4096,
    };
    Arc::new(Proxy::start(*to, opts).expect("start the proxy"))
}

/// A migration of the whole of `memory` to `proxy`'s address, with the test key.
pub fn migration_through(proxy: &Proxy, memory: &Mapping, opts: SourceOptions) -> Migration {
    // SAFETY: the caller's mapping, which outlives the migration; nothing writes it
    // unless the test says so.
    unsafe {
        Migration::new(
            Addr::Tcp(proxy.addr()),
            key(),
            memory.addr(),
            memory.len(),
            opts,
        )
    }
    .expect("a migration")
}

/// Source memory: most pages patterned, every 5th left zero (travels as a zero run).
pub fn source_memory(bytes: usize) -> Mapping {
    let m = Mapping::new(MemoryKind::Anon, bytes).expect("map source");
    for p in 0..bytes / 4096 {
        if p % 5 == 4 {
            continue;
        }
        let seed = (p as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for w in 0..512 {
            // SAFETY: inside the mapping.
            unsafe {
                ((m.addr() + p * 4096) as *mut u64)
                    .add(w)
                    .write(seed ^ w as u64)
            };
        }
    }
    m
}

/// Writes to pages of `[base, base + len)` until stopped: `pick(i)` chooses the 4 KiB page.
pub struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl Writer {
    pub fn start(base: usize, len: usize, pick: fn(u64, usize) -> usize) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (s, w) = (stop.clone(), writes.clone());
        let thread = std::thread::spawn(move || {
            let pages = len / 4096;
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let p = pick(i, pages);
                // SAFETY: inside the source mapping, which outlives the migration.
                unsafe {
                    let word = ((base + p * 4096) as *mut u64).add((i % 512) as usize);
                    word.write_volatile(word.read_volatile().wrapping_add(i | 1));
                }
                i += 1;
                w.store(i, Ordering::Relaxed);
                if i % 64 == 0 {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        });
        Writer {
            stop,
            writes,
            thread,
        }
    }

    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("writer");
        self.writes.load(Ordering::Relaxed)
    }
}

pub fn random_pick(i: u64, pages: usize) -> usize {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) as usize % pages
}

/// Writes land in the first eighth of the region: every round re-sends it, and at the
/// switch it is dirty again, so postcopy has that much to move.
pub fn hot_pick(i: u64, pages: usize) -> usize {
    random_pick(i, (pages / 8).max(1))
}

/// The destination's workload: touches every page in a scattered order with a volatile
/// read and a volatile write of the same value (a write fault that changes nothing; this
/// is the only writer), checking nothing: the verification does.
pub fn toucher(mem: RunningMemory) -> JoinHandle<Vec<Duration>> {
    std::thread::spawn(move || {
        let pages = mem.len / 4096;
        for i in 0..pages {
            let p = (i * 7919) % pages;
            // SAFETY: inside the destination mapping, alive until the report is dropped
            // (joined before that).
            unsafe {
                let w = (mem.base + p * 4096) as *mut u64;
                w.write_volatile(w.read_volatile());
            }
        }
        Vec::new()
    })
}

/// No destination workload: pages move by the stream only.
pub fn idle(_: RunningMemory) -> JoinHandle<Vec<Duration>> {
    std::thread::spawn(Vec::new)
}

/// A hook run with one end's handle before the migration starts.
pub type Hook<T> = Box<dyn FnOnce(&Arc<T>) + Send>;

/// A pager serving `memory` (anonymous) from `source` with one handler thread.
pub fn pager_for(source: Arc<dyn pager::Source>, memory: &Mapping) -> pager::Pager {
    let uffd = uffd_core::Uffd::builder()
        .non_blocking(true)
        .require(uffd_core::Features::EVENT_REMOVE)
        .open()
        .expect("uffd");
    let builder = pager::Pager::builder(uffd, source);
    let region = pager::RegionSpec::new(memory.addr(), memory.len(), MemoryKind::Anon, 0);
    // SAFETY: the caller's mapping, which the tests keep until the pager is stopped and
    // read only through raw pointers.
    unsafe { builder.region(region) }
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start")
}

/// One in-process migration and what to do to it.
pub struct Case {
    pub addr: &'static str,
    pub bytes: usize,
    pub opts: SourceOptions,
    pub dest_timing: Timing,
    pub pick: fn(u64, usize) -> usize,
    /// The destination's workload, started at RUN; returns its timings.
    pub workload: fn(RunningMemory) -> JoinHandle<Vec<Duration>>,
    /// Reconnections this case expects (`None`: whatever happens; `Some(0)` by default).
    pub reconnects: Option<u64>,
    /// Pages written once more just before the workload stops (after their last send).
    pub write_at_stop: usize,
    /// A proxy between source and destination (TCP only), handed to `on_proxy` first.
    pub proxy: Option<Hook<Proxy>>,
    /// Called as the source's workload stops (the switch).
    pub at_stop: Box<dyn FnMut() + Send>,
    /// How the destination and the source secure their link.
    pub ends: (Security, Security),
    pub src: Hook<SourceControl>,
    pub dst: Hook<DestControl>,
    /// The destination's `DestOptions::huge_pages`.
    pub huge_pages: bool,
}

/// What a case did.
pub struct Outcome {
    pub src: SourceReport,
    pub dst: DestReport,
    pub timings: Vec<Duration>,
    /// Cuts the proxy made.
    pub cuts: u64,
}

impl Case {
    pub fn new(addr: &'static str, bytes: usize) -> Case {
        Case {
            addr,
            bytes,
            opts: SourceOptions {
                max_rounds: 3,
                switch_below_bytes: 0,
                converge_ratio: 10.0,
                timing: test_timing(),
                ..SourceOptions::default()
            },
            dest_timing: test_timing(),
            pick: random_pick,
            workload: toucher,
            write_at_stop: 0,
            reconnects: Some(0),
            proxy: None,
            at_stop: Box::new(|| {}),
            ends: psk_ends(),
            src: Box::new(|_| {}),
            dst: Box::new(|_| {}),
            huge_pages: false,
        }
    }

    fn listen_addr(&self) -> Addr {
        if self.addr.starts_with("unix:") {
            let tag = transport::key::session_id().expect("random") & 0xffff_ffff;
            let name = format!("uffdkit-migrate-{}-{tag}.sock", std::process::id());
            Addr::Unix(std::env::temp_dir().join(name))
        } else {
            self.addr.parse().expect("addr")
        }
    }

    /// Runs the migration; checks the verdict and every byte.
    pub fn run(self) -> (SourceReport, DestReport) {
        let o = self.run_all();
        (o.src, o.dst)
    }

    /// Runs the migration; checks the verdict and every byte.
    pub fn run_all(mut self) -> Outcome {
        log_to_stderr();
        let opts = DestOptions {
            mode: DeliveryMode::Thread,
            timing: self.dest_timing,
            huge_pages: self.huge_pages,
            ..DestOptions::default()
        };
        let (listener, opener) = self.ends.clone();
        let dest = Destination::bind(&self.listen_addr(), listener, opts).expect("bind");
        let mut addr = dest.local_addr().expect("addr");
        let proxy = self.proxy.take().map(|plan| {
            let p = proxy_to(&addr, Direction::ToListener);
            plan(&p);
            addr = Addr::Tcp(p.addr());
            p
        });
        (self.dst)(&dest.control());
        let dest_workload: Arc<Mutex<Option<JoinHandle<Vec<Duration>>>>> = Arc::default();
        let dw = dest_workload.clone();
        let workload = self.workload;
        let dest_t = std::thread::spawn(move || {
            dest.run(move |mem| *dw.lock().unwrap() = Some(workload(mem)))
        });
        let memory = source_memory(self.bytes);
        let writer = Arc::new(Mutex::new(Some(Writer::start(
            memory.addr(),
            memory.len(),
            self.pick,
        ))));
        let stopper = writer.clone();
        let (base, last_writes) = (memory.addr(), self.write_at_stop);
        // SAFETY: `memory` is ours, mapped until the end of this function; only `writer`
        // writes it, and the callback stops it.
        let migration = unsafe {
            Migration::new(addr, opener, memory.addr(), memory.len(), self.opts).expect("new")
        };
        (self.src)(&migration.control());
        let mut at_stop = self.at_stop;
        let src = migration.run(move || {
            stopper.lock().unwrap().take().map(Writer::stop);
            for p in 0..last_writes {
                // SAFETY: inside the source mapping; the writer has stopped.
                unsafe { ((base + p * 4096) as *mut u64).write_volatile(0x5a5a_5a5a ^ p as u64) };
            }
            at_stop();
        });
        // A failed migration leaves the workload running: stop it before the memory goes.
        writer.lock().unwrap().take().map(Writer::stop);
        let dst = dest_t.join().expect("dest thread");
        let (src, dst) = match (src, dst) {
            (Ok(s), Ok(d)) => (s, d),
            (s, d) => panic!("source: {:?}\ndestination: {:?}", s.err(), d.err()),
        };
        let timings = match dest_workload.lock().unwrap().take() {
            Some(t) => t.join().expect("dest workload"),
            None => Vec::new(),
        };
        assert_eq!(src.verified, src.pages, "every page verified by digest");
        if let Some(n) = self.reconnects {
            assert_eq!(src.reconnects, n, "source reconnections");
            assert_eq!(dst.reconnects, n, "destination reconnections");
        }
        same_bytes(&memory, &dst.memory);
        let cuts = proxy.map_or(0, |p| p.cuts());
        Outcome {
            src,
            dst,
            timings,
            cuts,
        }
    }
}

/// Every page of the destination equals the source's final content.
pub fn same_bytes(src: &Mapping, dst: &Mapping) {
    assert_eq!(src.len(), dst.len());
    for p in 0..src.len() / 4096 {
        // SAFETY: both mappings are alive and nothing writes them now.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts((src.addr() + p * 4096) as *const u8, 4096),
                std::slice::from_raw_parts((dst.addr() + p * 4096) as *const u8, 4096),
            )
        };
        assert!(a == b, "page {p} differs from the source's final content");
    }
}

/// Bytes per page of a page server.
pub const PS: usize = 4096;

/// An image of `pages` pages: most patterned, every 5th zero (travels inside the page
/// data: a zero run that short is not worth a frame of its own), and, from 256 pages on,
/// the 64 pages from the middle zero (some of them travel as a ZERO_RUN however frames
/// and requests cut the run: a frame inside it holds zeros only, and the two at its ends
/// cannot both hold fewer than `postcopy::net::MIN_ZERO_RUN` of it and cover it all).
pub fn image(pages: usize) -> Vec<u8> {
    let long_run = if pages >= 256 {
        pages / 2..pages / 2 + 64
    } else {
        0..0
    };
    let mut out = vec![0u8; pages * PS];
    for (i, page) in out.chunks_exact_mut(PS).enumerate() {
        if i % 5 == 4 || long_run.contains(&i) {
            continue;
        }
        let seed = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for (w, c) in page.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&(seed ^ w as u64).to_ne_bytes());
        }
    }
    out
}

/// Restores `image` from a connected source: touches every `touch_every`th page of a
/// scattered order (faults), waits for the stream to bring the rest, then compares every
/// page byte for byte.
pub fn restore_from(
    source: Arc<postcopy::client::RemoteSource>,
    image: &[u8],
    touch_every: usize,
) -> pager::StatsSnapshot {
    let pages = image.len() / PS;
    assert_eq!(source.page_size(), PS);
    let memory = Mapping::new(MemoryKind::Anon, pages * PS).expect("map");
    let pager = pager_for(source, &memory);
    let page = |p: usize| {
        // SAFETY: the served region, alive for this function.
        unsafe { std::slice::from_raw_parts(memory.page_addr(p) as *const u8, PS) }
    };
    for i in (0..pages).step_by(touch_every) {
        let p = (i * 37) % pages;
        assert_eq!(page(p), &image[p * PS..(p + 1) * PS], "page {p}");
    }
    assert!(
        pager.wait_complete(Duration::from_secs(60)),
        "the stream brought every page"
    );
    for p in 0..pages {
        assert_eq!(page(p), &image[p * PS..(p + 1) * PS], "page {p}");
    }
    pager.stop().expect("stop")
}

/// A destination workload that drops (`MADV_DONTNEED`: a balloon, free-page reporting)
/// the second half of its memory at RUN, and what the source's observer hears to hold its
/// stream after the first frame past the stop until the drop is done: so no page of that
/// half has landed before it.
pub struct DropAtRun {
    stopped: AtomicBool,
    held: AtomicBool,
    dropped: Mutex<std::sync::mpsc::Receiver<()>>,
}

/// The destination's RUN callback and the source's side of [`DropAtRun`].
pub fn drop_second_half_at_run() -> (impl FnOnce(RunningMemory) + Send + 'static, Arc<DropAtRun>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let on_run = move |mem: RunningMemory| {
        let half = mem.len / 2;
        // SAFETY: the destination's registered memory, alive until `run` returns; a drop
        // of whole pages, which read zeros afterwards.
        let r = unsafe { libc::madvise((mem.base + half) as *mut _, half, libc::MADV_DONTNEED) };
        assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
        tx.send(()).expect("the stream waits for the drop");
    };
    let hold = DropAtRun {
        stopped: AtomicBool::new(false),
        held: AtomicBool::new(false),
        dropped: Mutex::new(rx),
    };
    (on_run, Arc::new(hold))
}

impl DropAtRun {
    /// Hears a source event: holds the stream's first frame after the stop until the
    /// destination's drop is done.
    pub fn hear(&self, event: postcopy::fault::Event) {
        use postcopy::fault::Event;
        match event {
            Event::Stopped => self.stopped.store(true, Ordering::SeqCst),
            Event::PageFrame(Channel::Main)
                if self.stopped.load(Ordering::SeqCst)
                    && !self.held.swap(true, Ordering::SeqCst) =>
            {
                let rx = self.dropped.lock().unwrap();
                rx.recv_timeout(Duration::from_secs(20))
                    .expect("the destination dropped");
            }
            _ => {}
        }
    }

    /// Whether the stream was held.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }
}
