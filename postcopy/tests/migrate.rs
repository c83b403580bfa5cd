//! Live migration end to end, in one process: a source region with a writing workload,
//! a destination whose workload runs from RUN on, real dirty tracking (WP_ASYNC +
//! PAGEMAP_SCAN), real faults served through the pager, real sockets. Every test ends
//! with the protocol's digest verification *and* a byte-for-byte comparison of every page.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pager::DeliveryMode;
use postcopy::auth::Key;
use postcopy::migrate::{
    DestControl, DestOptions, DestReport, Destination, Fault, Migration, SourceControl,
    SourceOptions, SourceReport, Timing,
};
use postcopy::net::Addr;
use testkit::skip;
use uffd_core::{hugetlb, Mapping, MemoryKind, HUGE_PAGE_SIZE};

fn key() -> Key {
    Key::new(*b"0123456789abcdef-test-key").expect("key")
}

fn fast_timing() -> Timing {
    Timing {
        io_timeout: Duration::from_millis(500),
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        give_up_after: Duration::from_secs(20),
    }
}

/// A destination on loopback TCP with one handler thread.
fn destination(timing: Timing) -> Destination {
    let opts = DestOptions {
        mode: DeliveryMode::Thread,
        timing,
    };
    Destination::bind(&"127.0.0.1:0".parse().unwrap(), key(), opts).expect("bind")
}

/// Source memory: most pages patterned, every 5th left zero (travels as a zero run).
fn source_memory(bytes: usize) -> Mapping {
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
struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl Writer {
    fn start(base: usize, len: usize, pick: fn(u64, usize) -> usize) -> Writer {
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

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("writer");
        self.writes.load(Ordering::Relaxed)
    }
}

fn random_pick(i: u64, pages: usize) -> usize {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) as usize % pages
}

/// The destination's workload: touches every page in a scattered order with a volatile
/// read and a volatile write of the same value (a write fault that changes nothing; this
/// is the only writer), checking nothing: the verification does.
fn toucher(mem: postcopy::migrate::RunningMemory) -> JoinHandle<Vec<Duration>> {
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

/// A destination workload that times reads of 200 scattered pages in the last half of
/// the region (the part the background stream reaches last), one every 2 ms.
fn far_reader(mem: postcopy::migrate::RunningMemory) -> JoinHandle<Vec<Duration>> {
    std::thread::spawn(move || {
        let pages = mem.len / 4096;
        (0..200)
            .map(|i| {
                let p = pages / 2 + (i * 7919) % (pages / 2);
                let t = std::time::Instant::now();
                // SAFETY: inside the destination mapping (see `toucher`).
                unsafe { std::ptr::read_volatile((mem.base + p * 4096) as *const u8) };
                let took = t.elapsed();
                std::thread::sleep(Duration::from_millis(2));
                took
            })
            .collect()
    })
}

struct Case {
    addr: &'static str,
    bytes: usize,
    opts: SourceOptions,
    pick: fn(u64, usize) -> usize,
    /// The destination's workload, started at RUN; returns its timings.
    workload: fn(postcopy::migrate::RunningMemory) -> JoinHandle<Vec<Duration>>,
    /// The case cuts connections on purpose; otherwise a reconnection is a failure.
    cuts: bool,
    /// Pages written once more just before the workload stops (after their last send).
    write_at_stop: usize,
    src: Box<dyn FnOnce(&SourceControl) + Send>,
    dst: Box<dyn FnOnce(&DestControl) + Send>,
}

impl Case {
    fn new(addr: &'static str, bytes: usize) -> Case {
        Case {
            addr,
            bytes,
            opts: SourceOptions {
                max_rounds: 3,
                switch_below_bytes: 0,
                converge_ratio: 10.0,
                timing: fast_timing(),
                ..SourceOptions::default()
            },
            pick: random_pick,
            workload: toucher,
            write_at_stop: 0,
            cuts: false,
            src: Box::new(|_| {}),
            dst: Box::new(|_| {}),
        }
    }

    /// Runs the migration; checks the verdict and every byte.
    fn run(self) -> (SourceReport, DestReport) {
        let (s, d, _) = self.run_timed();
        (s, d)
    }

    /// Runs the migration; checks the verdict and every byte; returns the workload's timings.
    fn run_timed(self) -> (SourceReport, DestReport, Vec<Duration>) {
        let addr: Addr = if self.addr.starts_with("unix:") {
            let path = std::env::temp_dir().join(format!(
                "uffdkit-migrate-{}-{}.sock",
                std::process::id(),
                rand_tag()
            ));
            Addr::Unix(path)
        } else {
            self.addr.parse().expect("addr")
        };
        let dest = Destination::bind(
            &addr,
            key(),
            DestOptions {
                mode: DeliveryMode::Thread,
                timing: fast_timing(),
            },
        )
        .expect("bind");
        let addr = dest.local_addr().expect("addr");
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
            Migration::new(addr, key(), memory.addr(), memory.len(), self.opts).expect("new")
        };
        (self.src)(&migration.control());
        let src = migration.run(move || {
            stopper.lock().unwrap().take().map(Writer::stop);
            for p in 0..last_writes {
                // SAFETY: inside the source mapping; the writer has stopped.
                unsafe { ((base + p * 4096) as *mut u64).write_volatile(0x5a5a_5a5a ^ p as u64) };
            }
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
        if !self.cuts {
            assert_eq!(
                src.reconnects, 0,
                "no connection was cut, yet it reconnected"
            );
        }
        for p in 0..memory.len() / 4096 {
            // SAFETY: both mappings are alive and nothing writes them now.
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts((memory.addr() + p * 4096) as *const u8, 4096),
                    std::slice::from_raw_parts((dst.memory.addr() + p * 4096) as *const u8, 4096),
                )
            };
            assert!(a == b, "page {p} differs from the source's final content");
        }
        (src, dst, timings)
    }
}

fn rand_tag() -> u64 {
    postcopy::auth::session_id() & 0xffff_ffff
}

#[test]
fn precopy_then_postcopy_over_tcp_with_a_writing_workload() {
    let (src, dst) = Case::new("127.0.0.1:0", 32 << 20).run();
    assert!(src.rounds.len() >= 2, "{:?}", src.rounds);
    assert!(src.precopy_bytes > 0 && src.postcopy_bytes > 0, "{src:?}");
    assert!(dst.postcopy_pages > 0);
    eprintln!(
        "tcp 4K: rounds {:?}, discarded {}, requested {}, downtime {:?}",
        src.rounds.iter().map(|r| r.pages).collect::<Vec<_>>(),
        src.discarded,
        dst.requested,
        src.downtime
    );
}

#[test]
fn precopy_then_postcopy_over_unix_with_a_writing_workload() {
    let (src, _) = Case::new("unix:", 32 << 20).run();
    assert!(src.rounds.len() >= 2);
}

#[test]
fn two_mib_pages_migrate_over_tcp_and_unix() {
    const TEST: &str = "two_mib_pages_migrate_over_tcp_and_unix";
    // 48: this test's 16 and the cut-connection 2 MiB test's 32, which may run at the same time.
    match hugetlb::ensure_free(48) {
        Ok(n) if n >= 48 => {}
        Ok(n) => return skip(TEST, &format!("only {n} free 2 MiB huge pages")),
        Err(e) => return skip(TEST, &format!("cannot reserve 2 MiB huge pages: {e}")),
    }
    for addr in ["127.0.0.1:0", "unix:"] {
        let mut case = Case::new(addr, 16 * HUGE_PAGE_SIZE);
        case.opts.page_size = HUGE_PAGE_SIZE;
        let (src, dst) = case.run();
        assert_eq!(src.pages, 16);
        assert_eq!(dst.page_size, HUGE_PAGE_SIZE);
    }
}

#[test]
fn pages_dirtied_after_being_sent_are_discarded_and_fetched_again() {
    // The writer hammers the first 64 pages only: they are sent in round 1, dirtied,
    // re-sent... and written once more as the workload stops, after their last send: all
    // 64 must be discarded and fetched again (a stale precopy copy would fail the byte
    // comparison), and nothing else.
    let mut case = Case::new("127.0.0.1:0", 8 << 20);
    case.pick = |i, _| (i % 64) as usize;
    case.write_at_stop = 64;
    case.opts.max_rounds = 4;
    let (src, dst) = case.run();
    assert_eq!(src.discarded, 64, "{src:?}");
    assert_eq!(dst.discarded, src.discarded);
    assert!(
        src.rounds.len() >= 2 && src.rounds[1].pages > 0,
        "dirty pages were re-sent in later rounds: {:?}",
        src.rounds
    );
}

#[test]
fn pure_postcopy_serves_faults_by_request() {
    let mut case = Case::new("127.0.0.1:0", 16 << 20);
    case.opts.max_rounds = 0;
    let (src, dst) = case.run();
    assert_eq!(src.precopy_bytes, 0);
    assert!(src.rounds.is_empty());
    assert!(dst.pager.faults() > 0, "the workload faulted");
    assert!(dst.requested > 0, "faults became requests");
    assert!(src.urgent_pages > 0);
    assert!(dst.latency.count() > 0, "requested-page latency recorded");
}

fn injected(fault: Fault, after: u64, addr: &'static str) {
    injected_with(fault, after, addr, 4096, 32 << 20);
}

fn injected_with(fault: Fault, after: u64, addr: &'static str, page_size: usize, bytes: usize) {
    let mut case = Case::new(addr, bytes);
    case.opts.page_size = page_size;
    case.opts.max_rounds = 0; // everything moves in postcopy: the cut lands there
    case.cuts = true;
    case.src = Box::new(move |c| c.inject(fault, after));
    let (src, dst) = case.run();
    assert!(src.reconnects >= 1, "{fault:?}: no reconnection");
    assert_eq!(dst.reconnects, src.reconnects);
}

#[test]
fn a_closed_connection_pauses_and_resumes_at_several_points() {
    for after in [0, 1000, 5000] {
        injected(Fault::Close, after, "127.0.0.1:0");
    }
    injected(Fault::Close, 3000, "unix:");
}

#[test]
fn a_half_written_frame_pauses_and_resumes() {
    for after in [10, 4000] {
        injected(Fault::HalfFrame, after, "127.0.0.1:0");
    }
    injected(Fault::HalfFrame, 2000, "unix:");
}

#[test]
fn two_mib_pages_survive_a_cut_connection() {
    const TEST: &str = "two_mib_pages_survive_a_cut_connection";
    // 48: this test's 32 and the other 2 MiB test's 16, which may run at the same time.
    match hugetlb::ensure_free(48) {
        Ok(n) if n >= 48 => {}
        Ok(n) => return skip(TEST, &format!("only {n} free 2 MiB huge pages")),
        Err(e) => return skip(TEST, &format!("cannot reserve 2 MiB huge pages: {e}")),
    }
    injected_with(
        Fault::Close,
        8,
        "127.0.0.1:0",
        HUGE_PAGE_SIZE,
        32 * HUGE_PAGE_SIZE,
    );
    injected_with(
        Fault::HalfFrame,
        16,
        "unix:",
        HUGE_PAGE_SIZE,
        32 * HUGE_PAGE_SIZE,
    );
}

#[test]
fn a_destination_that_stops_reading_is_cut_by_the_io_timeout_and_resumed() {
    // 64 MiB cannot hide in the loopback socket buffers (a few MiB): the source's send
    // blocks for the 500 ms I/O timeout while the destination sleeps 2 s.
    let mut case = Case::new("127.0.0.1:0", 64 << 20);
    case.opts.max_rounds = 0;
    case.cuts = true;
    // No destination workload: its faults would fetch pages on the urgent channel, and
    // the stream could end before filling the socket buffers.
    case.workload = |_| std::thread::spawn(Vec::new);
    case.dst = Box::new(|c| c.stall_reading(100, Duration::from_secs(2)));
    let (src, dst) = case.run();
    assert!(src.reconnects >= 1);
    assert!(dst.reconnects >= 1);
}

#[test]
fn resume_waits_for_the_operator_when_automatic_resume_is_off() {
    let mut case = Case::new("127.0.0.1:0", 16 << 20);
    case.opts.max_rounds = 0;
    case.opts.auto_resume = false;
    case.cuts = true;
    case.src = Box::new(|c| {
        c.inject(Fault::Close, 500);
        // The operator's command, from another thread, once the source is paused.
        let c: *const SourceControl = c;
        let c = c as usize;
        std::thread::spawn(move || {
            // SAFETY: the control outlives the migration, which cannot end before this
            // resume (it is paused waiting for it).
            let c = unsafe { &*(c as *const SourceControl) };
            while c.progress.phase() != postcopy::migrate::source::Phase::Paused {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(
                c.progress.phase(),
                postcopy::migrate::source::Phase::Paused,
                "it did not resume by itself"
            );
            c.resume();
        });
    });
    let (src, _) = case.run();
    assert_eq!(src.reconnects, 1);
}

#[test]
fn a_wrong_key_is_refused_and_a_stranger_does_not_disturb_the_migration() {
    let dest = destination(fast_timing());
    let addr = dest.local_addr().unwrap();
    let dest_t = std::thread::spawn(move || dest.run(|_| {}));
    let memory = source_memory(1 << 20);
    let source = |key: Key| {
        // SAFETY: our mapping, nobody writes it.
        unsafe {
            Migration::new(
                addr.clone(),
                key,
                memory.addr(),
                memory.len(),
                SourceOptions {
                    timing: fast_timing(),
                    ..SourceOptions::default()
                },
            )
        }
        .unwrap()
    };
    let wrong = Key::new(*b"not-the-key-not-the-key!!").unwrap();
    let err = source(wrong)
        .run(|| {})
        .expect_err("a wrong key must be refused");
    assert!(matches!(err, postcopy::Error::Auth(_)), "{err}");
    // The destination still takes the real source and completes.
    let report = source(key()).run(|| {}).expect("the real source");
    assert_eq!(report.verified, report.pages);
    dest_t.join().unwrap().expect("destination");
}

#[test]
fn a_destination_nobody_connects_to_gives_up_with_an_error() {
    let dest = destination(Timing {
        give_up_after: Duration::from_millis(300),
        ..fast_timing()
    });
    let err = dest.run(|_| {}).expect_err("no source came");
    assert!(err.to_string().contains("no source"), "{err}");
}

#[test]
fn requested_pages_overtake_a_saturating_background_stream() {
    // 128 MiB in pure postcopy: the stream saturates the link for the whole run while the
    // workload reads pages in the half the stream reaches last. Their requests travel on
    // the urgent connection, so they arrive far sooner than the stream would bring them.
    let mut case = Case::new("127.0.0.1:0", 128 << 20);
    case.opts.max_rounds = 0;
    case.workload = far_reader;
    let (src, dst, reads) = case.run_timed();
    // Reads of pages already present take well under 2 µs; the rest faulted.
    let mut faulted: Vec<Duration> = reads
        .into_iter()
        .filter(|d| *d > Duration::from_micros(2))
        .collect();
    faulted.sort();
    assert!(faulted.len() >= 10, "only {} reads faulted", faulted.len());
    let p50 = faulted[faulted.len() / 2];
    eprintln!(
        "postcopy took {:?}; {} far reads faulted: p50 {p50:?}, max {:?}; {} requested",
        dst.postcopy,
        faulted.len(),
        faulted.last().unwrap(),
        dst.requested
    );
    assert!(src.urgent_pages > 0, "some reads became requests");
    // Loosely: the stream alone would bring a page of the far half after at least half
    // the postcopy time; requested pages take a small fraction of that.
    assert!(
        p50 * 8 < dst.postcopy,
        "p50 {p50:?} is not far below the stream's {:?}",
        dst.postcopy
    );
}

#[test]
fn the_operator_switches_to_postcopy_after_the_current_round() {
    let mut case = Case::new("127.0.0.1:0", 16 << 20);
    case.opts.max_rounds = 50;
    case.src = Box::new(|c| c.switch_to_postcopy());
    let (src, _) = case.run();
    assert_eq!(src.switch_reason, "operator command");
    assert_eq!(src.rounds.len(), 1, "the switch came after the first round");
}
