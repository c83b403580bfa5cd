//! Restoring memory from a page server over loopback TCP and Unix sockets, with real
//! faults served through the pager.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{DeliveryMode, MemorySource, Pager, RegionSpec};
use postcopy::auth::Key;
use postcopy::client::RemoteSource;
use postcopy::link::Timing;
use postcopy::net::Addr;
use postcopy::server::PageServer;
use postcopy::Refusal;
use uffd_core::{Features, Mapping, MemoryKind, Uffd};

const PS: usize = 4096;

fn image(pages: usize) -> Vec<u8> {
    let mut out = vec![0u8; pages * PS];
    for (i, page) in out.chunks_exact_mut(PS).enumerate() {
        if i % 5 == 4 {
            continue; // zero pages travel as ZERO_RUN
        }
        let seed = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for (w, c) in page.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&(seed ^ w as u64).to_ne_bytes());
        }
    }
    out
}

fn key() -> Key {
    Key::new(*b"0123456789abcdef-test-key").expect("key")
}

fn server(addr: &str, image: &[u8]) -> PageServer {
    let addr: Addr = addr.parse().expect("addr");
    let source = Arc::new(MemorySource::new(image.to_vec()));
    PageServer::bind(&addr, source, key(), Timing::default()).expect("bind")
}

/// A pager serving `memory` from `source` with one handler thread.
fn pager_for(source: Arc<RemoteSource>, memory: &Mapping) -> Pager {
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require(Features::EVENT_REMOVE)
        .open()
        .expect("uffd");
    Pager::builder(uffd, source)
        .region(RegionSpec::new(
            memory.addr(),
            memory.len(),
            MemoryKind::Anon,
            0,
        ))
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start")
}

/// Restores `image` from `addr` into fresh memory, touching pages in a scattered order;
/// returns the pager's stats after the background stream completed.
fn restore(addr: &Addr, image: &[u8]) -> pager::StatsSnapshot {
    let pages = image.len() / PS;
    let source = Arc::new(RemoteSource::connect(addr, &key()).expect("connect"));
    assert_eq!(source.page_size(), PS);
    let memory = Mapping::new(MemoryKind::Anon, pages * PS).expect("map");
    let pager = pager_for(source, &memory);
    for i in 0..pages {
        let page = (i * 37) % pages;
        // SAFETY: the served region.
        let got = unsafe { std::slice::from_raw_parts(memory.page_addr(page) as *const u8, PS) };
        assert_eq!(got, &image[page * PS..(page + 1) * PS], "page {page}");
    }
    assert!(
        pager.wait_complete(Duration::from_secs(30)),
        "the stream brought every page"
    );
    pager.stop().expect("stop")
}

#[test]
fn restore_from_a_page_server_over_tcp_and_unix() {
    let img = image(2048);
    let tcp = server("127.0.0.1:0", &img);
    let stats = restore(&tcp.local_addr().unwrap(), &img);
    assert_eq!(stats.placed(), 2048, "{stats:?}");
    assert!(stats.placed_zero > 0, "zero pages arrived as zero runs");
    let path = std::env::temp_dir().join(format!("uffdkit-serve-{}.sock", std::process::id()));
    let unix = server(&format!("unix:{}", path.display()), &img);
    let stats = restore(&unix.local_addr().unwrap(), &img);
    assert_eq!(stats.placed(), 2048);
    std::fs::remove_file(&path).ok();
}

#[test]
fn a_wrong_key_is_refused_both_ways() {
    let img = image(16);
    let srv = server("127.0.0.1:0", &img);
    let wrong = Key::new(*b"not-the-right-key-at-all").expect("key");
    let addr = srv.local_addr().unwrap();
    let err = RemoteSource::connect(&addr, &wrong).expect_err("wrong key");
    assert!(
        matches!(
            err,
            postcopy::Error::Refused {
                reason: Refusal::PeerShut { .. } | Refusal::WrongKey
            }
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
    let img = Arc::new(image(1024));
    let srv = server("127.0.0.1:0", &img);
    // One client connects and goes away mid-stream.
    let addr = srv.local_addr().unwrap();
    drop(RemoteSource::connect(&addr, &key()).expect("connect"));
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

#[test]
fn urgent_pages_overtake_the_background_stream() {
    // 64 MiB: the stream alone takes a while to reach the last page.
    let pages = 16384;
    let img = image(pages);
    let srv = server("127.0.0.1:0", &img);
    let addr = srv.local_addr().unwrap();
    let source = Arc::new(RemoteSource::connect(&addr, &key()).expect("connect"));
    let memory = Mapping::new(MemoryKind::Anon, pages * PS).expect("map");
    let started = Instant::now();
    let pager = pager_for(source, &memory);
    let t = Instant::now();
    // SAFETY: the served region; the last page, far from where the stream starts.
    let b = unsafe { std::ptr::read_volatile(memory.page_addr(pages - 3) as *const u8) };
    let urgent = t.elapsed();
    assert_eq!(b, img[(pages - 3) * PS]);
    assert!(
        pager.wait_complete(Duration::from_secs(60)),
        "stream completed"
    );
    let stream = started.elapsed();
    eprintln!("urgent page {urgent:?}, whole stream {stream:?}");
    assert!(
        urgent * 4 < stream,
        "urgent {urgent:?} vs stream {stream:?}"
    );
    pager.stop().expect("stop");
}
