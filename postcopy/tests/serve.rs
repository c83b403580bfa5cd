//! Restoring memory from a page server over loopback TCP and Unix sockets, with real
//! faults served through the pager — also through a proxy that resets and freezes its
//! connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::MemorySource;
use postcopy::client::RemoteSource;
use postcopy::server::{PageServer, ServerOptions};
use postcopy::Security;
use postcopy::Timing;
use testkit::proxy::{CutMode, Direction, Proxy, ProxyOptions, Target};
use transport::Addr;
use transport::Key;

use crate::common;
use common::PS;
use uffd_core::{Mapping, MemoryKind};

fn key() -> Key {
    Key::new(*b"0123456789abcdef-test-key").expect("key")
}

fn server(addr: &str, image: &[u8]) -> PageServer {
    server_with(addr, image, key())
}

fn server_with(addr: &str, image: &[u8], listener: impl Into<Security>) -> PageServer {
    let addr: Addr = addr.parse().expect("addr");
    let source = Arc::new(MemorySource::new(image.to_vec()));
    PageServer::bind(&addr, source, listener, Timing::default()).expect("bind")
}

/// Restores `image` from `addr` into fresh memory, touching pages in a scattered order;
/// returns the pager's stats after the background stream completed.
fn restore(addr: &Addr, image: &[u8]) -> pager::StatsSnapshot {
    let source = Arc::new(RemoteSource::connect(addr, key()).expect("connect"));
    common::restore_from(source, image, 1)
}

/// A page server behind a proxy that counts the pages it streams to its client.
fn proxied_server(image: &[u8], listener: Security) -> (PageServer, Arc<Proxy>) {
    let srv = server_with("127.0.0.1:0", image, listener);
    let Addr::Tcp(to) = srv.local_addr().unwrap() else {
        unreachable!("a TCP server")
    };
    (srv, Arc::new(counting_proxy(to)))
}

/// A proxy to `to` that counts the pages streamed to its client.
fn counting_proxy(to: std::net::SocketAddr) -> Proxy {
    let opts = ProxyOptions {
        classify: common::channel_of,
        counted: "main",
        direction: Direction::ToOpener,
        settle: 4096,
    };
    Proxy::start(to, opts).expect("proxy")
}

#[test]
fn a_restore_survives_resets_and_freezes_of_either_channel() {
    survives_cuts(common::psk_ends());
}

#[test]
fn a_tls_restore_survives_resets_and_freezes_with_fresh_handshakes() {
    // Sessions never resume: every reconnection is a full TLS handshake through the proxy.
    survives_cuts(common::tls_ends());
}

/// A 64 MiB restore through a proxy that resets and freezes either channel four times.
fn survives_cuts((listener, opener): (Security, Security)) {
    common::log_to_stderr();
    let img = common::image(16384); // 64 MiB
    let (srv, proxy) = proxied_server(&img, listener);
    let mut cuts = proxy.plan_random(5, 4, 32 << 20, CutMode::Reset, Target::All);
    // Freezes on main (alone or with urgent): a frozen urgent connection alone could
    // go unnoticed by a restore the stream completes first.
    let kinds = [
        (CutMode::Reset, Target::Tag("urgent")),
        (CutMode::Freeze, Target::Tag("main")),
        (CutMode::Reset, Target::Tag("main")),
        (CutMode::Freeze, Target::All),
    ];
    for (cut, (mode, target)) in cuts.iter_mut().zip(kinds) {
        (cut.mode, cut.target) = (mode, target);
    }
    proxy.plan(cuts);
    let addr = Addr::Tcp(proxy.addr());
    let source = Arc::new(
        RemoteSource::connect_with(&addr, opener, common::test_timing()).expect("connect"),
    );
    // Few faults: the stream must bring most pages, so every cut stops the restore
    // until it is noticed and resumed.
    let stats = common::restore_from(source.clone(), &img, 64);
    assert_eq!(stats.placed(), 16384, "{stats:?}");
    assert_eq!(proxy.pending(), 0, "every cut landed");
    assert_eq!(proxy.cuts(), 4);
    assert_eq!(
        source.reconnects(),
        proxy.cuts(),
        "one reconnection per cut"
    );
    // A pair per connection: the first and one per cut, each freshly handshaken.
    assert_eq!(srv.stats().pairs, 1 + proxy.cuts(), "{:?}", srv.stats());
}

#[test]
fn a_client_cut_off_from_its_server_fails_its_pager_within_the_bound() {
    // Its own process: the faulting thread ends parked in a SIGBUS handler.
    let test = "a_client_cut_off_from_its_server_fails_its_pager_within_the_bound";
    if !testkit::isolated(test, Duration::from_secs(60)) {
        return;
    }
    let img = common::image(4096);
    let (_srv, proxy) = proxied_server(&img, key().into());
    let timing = Timing {
        silence: Duration::from_secs(1),
        heartbeat: Duration::from_millis(150),
        give_up_after: Duration::from_secs(2),
        ..common::test_timing()
    };
    let addr = Addr::Tcp(proxy.addr());
    let source = Arc::new(RemoteSource::connect_with(&addr, key(), timing).expect("connect"));
    proxy.partition(true);
    let memory = Mapping::new(MemoryKind::Anon, img.len()).expect("map");
    let pager = common::pager_for(source, &memory);
    // A faulting thread, as a vCPU would be: it waits for the page, and once the client
    // gives up the page is poisoned — SIGBUS, never a zero page.
    testkit::sigbus::touch_expecting_sigbus(memory.addr() + 4096 * 4000, Duration::from_secs(20))
        .expect("the waiting thread gets SIGBUS when the client gives up");
    assert!(pager.has_stopped(), "the pager stopped");
    let err = pager.stop().expect_err("the source failed the pager");
    assert!(matches!(err, pager::Error::Source(_)), "{err}");
}

#[test]
fn restore_from_a_page_server_over_tcp_and_unix() {
    let img = common::image(2048);
    let tcp = server("127.0.0.1:0", &img);
    let stats = restore(&tcp.local_addr().unwrap(), &img);
    assert_eq!(stats.placed(), 2048, "{stats:?}");
    assert!(stats.placed_zero > 0, "zero pages arrived as zero runs");
    let path = std::env::temp_dir().join(format!("uffdkit-serve-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let unix = server(&format!("unix:{}", path.display()), &img);
    let stats = restore(&unix.local_addr().unwrap(), &img);
    assert_eq!(stats.placed(), 2048);
    let second = PageServer::bind(
        &unix.local_addr().unwrap(),
        Arc::new(MemorySource::new(img.clone())),
        key(),
        Timing::default(),
    );
    assert!(
        matches!(
            &second,
            Err(postcopy::Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AddrInUse
        ),
        "a live server's path is refused, not taken over: {:?}",
        second.err()
    );
    assert!(path.exists(), "the first server keeps its socket");
    drop(unix);
    assert!(!path.exists(), "a stopped server removes its socket file");
}

#[test]
fn a_wrong_key_is_refused_both_ways() {
    let img = common::image(16);
    let srv = server("127.0.0.1:0", &img);
    let wrong = Key::new(*b"not-the-right-key-at-all").expect("key");
    let addr = srv.local_addr().unwrap();
    let err = RemoteSource::connect(&addr, &wrong).expect_err("wrong key");
    assert!(
        matches!(
            err.refusal(),
            Some(transport::Refusal::PeerShut { .. } | transport::Refusal::WrongKey)
        ),
        "{err}"
    );
    // Let the server's connection thread count it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.stats().refused == 0 {
        assert!(Instant::now() < deadline, "refusal counted");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(srv.stats().pairs, 0);
}

#[test]
fn many_clients_restore_from_one_server_at_once_and_a_dying_one_harms_nobody() {
    let img = Arc::new(common::image(1024));
    let srv = server("127.0.0.1:0", &img);
    // One client connects and goes away mid-stream.
    let addr = srv.local_addr().unwrap();
    drop(RemoteSource::connect(&addr, key()).expect("connect"));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (addr, img) = (addr.clone(), img.clone());
            std::thread::spawn(move || restore(&addr, &img).placed())
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().expect("client"), 1024);
    }
}

/// A restore of 64 MiB from a page server whose stream a proxy holds after its first MiB
/// (main frozen towards the client, urgent flowing), with the hold on. Nothing breaks the
/// pair meanwhile (a silence deadline far past the test); `release` lets the stream go on
/// on the next pair.
struct Held {
    // Dropped in this order (on a failed assertion): the pager before its memory.
    pager: pager::Pager,
    proxy: Arc<Proxy>,
    srv: PageServer,
    memory: Arc<Mapping>,
    img: Vec<u8>,
}

const HELD_PAGES: usize = 16384;

fn stream_held() -> Held {
    let img = common::image(HELD_PAGES);
    let timing = Timing {
        silence: Duration::from_secs(120),
        ..Timing::default()
    };
    let source = Arc::new(MemorySource::new(img.clone()));
    let at = "127.0.0.1:0".parse().unwrap();
    let srv = PageServer::bind(&at, source, key(), timing).expect("bind");
    let proxy = common::stream_held_after(&srv.local_addr().unwrap(), 1 << 20);
    let via = Addr::Tcp(proxy.addr());
    let source = Arc::new(RemoteSource::connect_with(&via, key(), timing).expect("connect"));
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, HELD_PAGES * PS).expect("map"));
    let pager = common::pager_for(source, &memory);
    let t = Instant::now();
    while proxy.pending() > 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "the stream started");
        std::thread::sleep(Duration::from_millis(1));
    }
    Held {
        pager,
        proxy,
        srv,
        memory,
        img,
    }
}

impl Held {
    /// Cuts main: the rest of the stream comes on the next pair; then every page.
    fn release(self) {
        assert_eq!(self.proxy.cut_now(CutMode::Reset, Target::Tag("main")), 1);
        assert!(
            self.pager.wait_complete(Duration::from_secs(60)),
            "stream completed"
        );
        self.pager.stop().expect("stop");
    }
}

#[test]
fn urgent_pages_overtake_the_background_stream() {
    // The last page can come only by its request, ahead of the stream, however fast the
    // stream runs or slowly the fault is served (a race of the two timed, the stream won
    // it in release beside two busy loops).
    let held = stream_held();
    let (pages, t) = (HELD_PAGES, Instant::now());
    // SAFETY: the served region; the last page, far from where the stream stands.
    let b = unsafe { std::ptr::read_volatile(held.memory.page_addr(pages - 3) as *const u8) };
    let urgent = t.elapsed();
    assert_eq!(b, held.img[(pages - 3) * PS]);
    let streamed = held.pager.stats().placed_arrival;
    eprintln!("urgent page {urgent:?}, with {streamed} pages of {pages} arrived");
    assert!(streamed < pages as u64 / 2, "the stream was held");
    held.release();
}

#[test]
fn a_requested_page_the_stream_sent_already_is_answered_again_on_the_urgent_connection() {
    // The stream's first frame (pages 0..512) was taken whole before it was sent, and the
    // proxy holds it after its first MiB: page 400 is on its way on main and will not
    // arrive while the hold lasts. A fault there must not wait for that copy (it would
    // wait for the release); its request is answered on urgent.
    let held = stream_held();
    let (tx, rx) = std::sync::mpsc::channel();
    let m = held.memory.clone();
    std::thread::spawn(move || {
        // SAFETY: the served region, alive (`m`) for as long as the thread.
        let b = unsafe { std::ptr::read_volatile(m.page_addr(400) as *const u8) };
        tx.send(b)
    });
    let got = rx.recv_timeout(Duration::from_secs(30));
    let (stats, want) = (held.srv.stats(), held.img[400 * PS]);
    // Whatever came, the stream goes on (and frees a thread still waiting).
    held.release();
    assert_eq!(
        got.expect("the page came while the stream's copy was held"),
        want
    );
    assert!(stats.resent >= 1, "{stats:?}");
}

/// A hugepage-backed guest restored from a page server serving 2 MiB pages: faults on
/// hugetlb memory, answered and streamed a 2 MiB page at a time, every byte verified
/// (one page zero, sent as a zero run).
#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn two_mib_pages_from_a_page_server_restore_hugetlb_memory_byte_for_byte() {
    const HUGE: usize = 2 << 20;
    const PAGES: usize = 6;
    let test = "two_mib_pages_from_a_page_server_restore_hugetlb_memory_byte_for_byte";
    if !testkit::hugepages::available(test, PAGES) {
        return;
    }
    let mut img = common::image(PAGES * HUGE / PS);
    img[3 * HUGE..4 * HUGE].fill(0);
    let opts = ServerOptions {
        page_size: HUGE,
        ..ServerOptions::default()
    };
    let source = Arc::new(MemorySource::new(img.clone()));
    let srv =
        PageServer::bind_with(&"127.0.0.1:0".parse().unwrap(), source, key(), opts).expect("bind");
    let remote =
        Arc::new(RemoteSource::connect(&srv.local_addr().unwrap(), key()).expect("connect"));
    assert_eq!(
        remote.page_size(),
        HUGE,
        "the server's page size is advised"
    );
    let memory =
        Arc::new(Mapping::new(MemoryKind::HugetlbPrivate, PAGES * HUGE).expect("map hugetlb"));
    let uffd = uffd_core::Uffd::builder()
        .non_blocking(true)
        .require(uffd_core::Features::EVENT_REMOVE | uffd_core::Features::MISSING_HUGETLBFS)
        .open()
        .expect("uffd");
    let pager = pager::Pager::builder(uffd, remote)
        .mapping(memory.clone(), 0)
        .mode(pager::DeliveryMode::Thread)
        .start()
        .expect("start");
    // SAFETY: the served region, alive until the end of this test.
    let got = |range: std::ops::Range<usize>| unsafe {
        std::slice::from_raw_parts((memory.addr() + range.start) as *const u8, range.len())
    };
    for p in [4, 0, 3, 5] {
        let r = p * HUGE..(p + 1) * HUGE;
        assert!(got(r.clone()) == &img[r], "2 MiB page {p}, on fault");
    }
    assert!(pager.wait_complete(Duration::from_secs(60)), "every page");
    assert!(got(0..PAGES * HUGE) == &img[..], "all of it, byte for byte");
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.placed(), PAGES as u64, "{stats:?}");
    assert_eq!(
        stats.placed_zero, 1,
        "the zero page came as a zero run: {stats:?}"
    );
}

#[test]
fn a_page_server_refuses_a_page_size_no_pager_places() {
    let opts = ServerOptions {
        page_size: 8192,
        ..ServerOptions::default()
    };
    let source = Arc::new(MemorySource::new(vec![1u8; 1 << 20]));
    let err = PageServer::bind_with(&"127.0.0.1:0".parse().unwrap(), source, key(), opts)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("page size"), "{err}");
}

/// An image whose page `bad` cannot be read.
struct Unreadable {
    image: pager::MemorySource,
    bad: u64,
}

impl pager::Source for Unreadable {
    fn len(&self) -> u64 {
        self.image.len()
    }

    fn fetch<'a>(
        &'a self,
        offset: u64,
        scratch: &'a mut [u8],
    ) -> Result<pager::Fetched<'a>, pager::SourceError> {
        let bad = self.bad * 4096;
        if (offset..offset + scratch.len() as u64).contains(&bad) {
            let source = std::io::Error::other("EIO at the bad page");
            return Err(pager::SourceError {
                what: "read the image",
                offset,
                source,
            });
        }
        self.image.fetch(offset, scratch)
    }
}

/// Found by review: a server that could not read a page cut the pair without a word; the
/// client took it for a broken link and reconnected at once, forever (each connection
/// succeeded, so its give-up never ran out), and its pager was never failed. Now the
/// server says why (SHUT) and the client fails its pager with that cause, at once.
#[test]
fn a_server_that_cannot_read_a_page_says_why_and_the_client_fails_its_pager_with_it() {
    let pages = 64;
    let image = pager::MemorySource::new(common::image(pages));
    let src = Arc::new(Unreadable { image, bad: 40 });
    let addr = "127.0.0.1:0".parse().expect("addr");
    let srv = PageServer::bind(&addr, src, common::key(), common::test_timing()).expect("bind");
    let at = srv.local_addr().expect("addr");
    let source = RemoteSource::connect_with(&at, common::key(), common::test_timing());
    let source = Arc::new(source.expect("connect"));
    let memory = Mapping::new(MemoryKind::Anon, pages * 4096).expect("memory");
    let pager = common::pager_for(source.clone(), &memory);
    // Bounded far below the client's give-up (30 s): only the SHUT can end it this soon.
    let until = Instant::now() + Duration::from_secs(10);
    while !pager.has_stopped() {
        assert!(
            Instant::now() < until,
            "never failed: {} reconnections",
            source.reconnects()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(source.reconnects(), 0, "a refusal is not a broken link");
    let err = pager.stop().expect_err("the pager failed");
    assert!(
        format!("{err:?}").contains("EIO at the bad page"),
        "{err:?}"
    );
}

/// A page server restarted at the same address while a client is cut off from it: the
/// client resumes only against the same image. Another image of the same size (a newer
/// snapshot) is refused (`ImageChanged`) and the pager fails with it — the client used to
/// resume and mix the two images' pages in one guest; the same image, named by the
/// embedder (`ServerOptions::image`), is resumed from byte for byte.
#[test]
fn a_client_resumes_only_against_the_same_image_after_its_server_restarted() {
    let pages = 256;
    let (old, new) = (
        common::image(pages),
        common::image(pages + 1)[PS..].to_vec(),
    );
    assert_ne!(old, new);
    for (named, restarted_with) in [(false, &new), (true, &old)] {
        let image = named.then_some(0x5eed);
        let serve = |bytes: &[u8], at: &str| {
            let opts = ServerOptions {
                timing: common::test_timing(),
                image,
                ..ServerOptions::default()
            };
            let source = Arc::new(MemorySource::new(bytes.to_vec()));
            PageServer::bind_with(&at.parse().expect("addr"), source, key(), opts)
        };
        let first = serve(&old, "127.0.0.1:0").expect("bind");
        let Addr::Tcp(at) = first.local_addr().unwrap() else {
            unreachable!("a TCP server")
        };
        let proxy = counting_proxy(at);
        let addr = Addr::Tcp(proxy.addr());
        let source = RemoteSource::connect_with(&addr, key(), common::test_timing());
        let source = Arc::new(source.expect("connect"));
        // Cut off before a page moved; the old server goes; the new one binds its port.
        proxy.partition(true);
        proxy.cut_now(CutMode::Reset, Target::All);
        drop(first);
        let until = Instant::now() + Duration::from_secs(20);
        let _second = loop {
            match serve(restarted_with, &at.to_string()) {
                Ok(s) => break s,
                Err(e) => assert!(Instant::now() < until, "rebind {at}: {e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        proxy.partition(false);
        if named {
            common::restore_from(source.clone(), &old, 1);
            continue;
        }
        let memory = Mapping::new(MemoryKind::Anon, pages * PS).expect("memory");
        let pager = common::pager_for(source.clone(), &memory);
        while !pager.has_stopped() {
            assert!(
                Instant::now() < until,
                "the client never refused the new image"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let err = pager.stop().expect_err("the pager failed");
        assert!(format!("{err:?}").contains("ImageChanged"), "{err:?}");
    }
}
