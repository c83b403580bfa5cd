//! A remote source's `fetch` runs on the pager's fault path, which must reach its next
//! `read()` without allocating: a thread that forks holds the allocator's locks until the
//! kernel's FORK event is read (see pager's worker docs). Here a global allocator counts
//! the allocations each thread makes while a flag is up, and `fetch` — a request sent on
//! a live urgent connection (plaintext, and TLS), and one remembered while paused — must
//! make none.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{Fetched, Mapping, MemoryKind, MemorySource, Source};
use postcopy::client::RemoteSource;
use postcopy::server::PageServer;
use postcopy::Security;
use postcopy::Timing;
use testkit::proxy::{CutMode, Target};
use transport::{Addr, Key};

use crate::common;

struct Counting;

thread_local! {
    static WATCHED: Cell<bool> = const { Cell::new(false) };
}
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCHED.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if WATCHED.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocator calls `f` makes on this thread.
fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    WATCHED.with(|w| w.set(true));
    f();
    WATCHED.with(|w| w.set(false));
    ALLOCATIONS.load(Ordering::SeqCst) - before
}

#[test]
fn fetch_on_the_fault_path_allocates_nothing_connected_or_paused() {
    let key = Key::new(*b"0123456789abcdef-test-key").expect("key");
    fetch_allocates_nothing(key.clone().into(), key.into());
}

#[test]
fn fetch_on_the_fault_path_allocates_nothing_over_tls() {
    // Sealing a record allocates: requests go through the pair's forwarding thread.
    let (listener, opener) = common::tls_ends();
    fetch_allocates_nothing(listener, opener);
}

fn fetch_allocates_nothing(listener: Security, opener: Security) {
    const PAGES: u64 = 16384;
    let image: Vec<u8> = (0..PAGES as usize * 4096)
        .map(|i| (i / 4096) as u8)
        .collect();
    // The stream stops at its second MiB (main frozen towards the client; urgent flows)
    // until the requests were answered: free, it brings every page first (64 MiB in
    // ~20 ms in release), the session ends, and no request goes out. Nothing breaks the
    // pair meanwhile (a silence deadline far past the test).
    let timing = Timing {
        silence: Duration::from_secs(120),
        ..Timing::default()
    };
    let server = PageServer::bind(
        &"127.0.0.1:0".parse().unwrap(),
        Arc::new(MemorySource::new(image)),
        listener,
        timing,
    )
    .expect("bind");
    let proxy = common::stream_held_after(&server.local_addr().unwrap(), 1 << 20);
    let at = Addr::Tcp(proxy.addr());
    let source = Arc::new(RemoteSource::connect_with(&at, opener, timing).expect("connect"));
    let memory = Mapping::new(MemoryKind::Anon, PAGES as usize * 4096).expect("map");
    // Attaching starts the client: its first pair greets, and requests go to it.
    let pager = common::pager_for(source.clone(), &memory);
    // Once the stream is held, the client has greeted: requests go out on the urgent
    // connection.
    let t = Instant::now();
    while proxy.pending() > 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "the stream started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut scratch = vec![0u8; 4096];
    let connected = allocations_in(|| {
        for page in (0..PAGES).rev().step_by(7) {
            assert!(matches!(
                source.fetch(page * 4096, &mut scratch),
                Ok(Fetched::Pending)
            ));
        }
    });
    assert_eq!(connected, 0, "fetch allocated on the fault path");
    let t = Instant::now();
    while server.stats().requests == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the requests went out and were answered"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The rest of the stream comes on the next pair.
    assert_eq!(proxy.cut_now(CutMode::Reset, Target::Tag("main")), 1);
    assert!(
        pager.wait_complete(Duration::from_secs(30)),
        "the stream completed"
    );
    // The session is over and the server gone: requests meet a closed connection.
    drop(server);
    let t = Instant::now();
    let paused = allocations_in(|| {
        while t.elapsed() < Duration::from_millis(200) {
            let _ = source.fetch(4096, &mut scratch);
        }
    });
    assert_eq!(paused, 0, "fetch allocated while the link was going away");
    pager.stop().expect("stop");
}
