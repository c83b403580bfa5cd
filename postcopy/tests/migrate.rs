//! Live migration in one process: precopy and postcopy over TCP and Unix sockets, 4 KiB
//! and 2 MiB pages, discards, requested pages, operator commands, refusals, bounds, and
//! recovery from in-process faults (a cut pair, a frame cut in half, a reader that stops).
//! Faults from outside (resets, silent freezes through a proxy): `recovery.rs`.

use crate::common;

use std::time::{Duration, Instant};

use common::{idle, key, source_memory, test_timing, Case};
use pager::DeliveryMode;
use postcopy::fault::Fault;
use postcopy::migrate::{
    DestOptions, Destination, Migration, RunningMemory, SourceControl, SourceOptions, SwitchReason,
    Timing,
};
use postcopy::{Error, LinkError};
use testkit::hugepages;
use transport::Key;
use uffd_core::HUGE_PAGE_SIZE;

/// A destination on loopback TCP with one handler thread.
fn destination(timing: Timing) -> Destination {
    let opts = DestOptions {
        mode: DeliveryMode::Thread,
        timing,
        ..DestOptions::default()
    };
    Destination::bind(&"127.0.0.1:0".parse().unwrap(), key(), opts).expect("bind")
}

/// A destination workload that times reads of 200 scattered pages in the last half of
/// the region (the part the background stream reaches last), one every 2 ms.
fn far_reader(mem: RunningMemory) -> std::thread::JoinHandle<Vec<Duration>> {
    std::thread::spawn(move || {
        let pages = mem.len / 4096;
        (0..200)
            .map(|i| {
                let p = pages / 2 + (i * 7919) % (pages / 2);
                let t = Instant::now();
                // SAFETY: inside the destination mapping (alive until the report goes,
                // after this thread is joined).
                unsafe { std::ptr::read_volatile((mem.base + p * 4096) as *const u8) };
                let took = t.elapsed();
                std::thread::sleep(Duration::from_millis(2));
                took
            })
            .collect()
    })
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
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn two_mib_pages_migrate_over_tcp_and_unix() {
    // 48: this test's 16 and the cut-connection 2 MiB test's 32, which may run at the same time.
    if !hugepages::available("two_mib_pages_migrate_over_tcp_and_unix", 48) {
        return;
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
    assert!(dst.pager.latency.count() > 0, "fault latency recorded");
}

/// Whether the kernel can move pages (`UFFDIO_MOVE`, Linux 6.8+); skips loudly if not.
fn can_move(test: &str) -> bool {
    let uffd = uffd_core::Uffd::builder()
        .optional(uffd_core::Features::MOVE)
        .open()
        .expect("open a userfaultfd");
    let can = uffd.features().contains(uffd_core::Features::MOVE);
    if !can {
        testkit::skip(test, "the kernel has no UFFDIO_MOVE");
    }
    can
}

/// The kernel's count of huge page faults that fell back to small pages (`/proc/vmstat`).
fn thp_fallbacks() -> u64 {
    let vmstat = std::fs::read_to_string("/proc/vmstat").expect("/proc/vmstat");
    vmstat
        .lines()
        .find_map(|l| l.strip_prefix("thp_fault_fallback "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A pure postcopy migration of 32 MiB with no faults at the destination (a block that a
/// requested page reached first is copied: moving the rest would split the huge page in
/// the reader's buffer), huge pages on or off. Every byte is checked by the case.
fn streamed(huge_pages: bool) -> postcopy::migrate::DestReport {
    let mut case = Case::new("127.0.0.1:0", 32 << 20);
    case.opts.max_rounds = 0;
    case.workload = idle;
    case.huge_pages = huge_pages;
    case.run().1
}

#[test]
fn the_stream_moves_whole_blocks_in_and_they_stay_huge_pages() {
    let test = "migrate::the_stream_moves_whole_blocks_in_and_they_stay_huge_pages";
    if !can_move(test) {
        return;
    }
    let fallbacks = thp_fallbacks();
    let dst = streamed(true);
    let moved = dst.pager.placed_moved;
    let huge = hugepages::transparent_in(&dst.memory);
    eprintln!("moved {moved} of {} pages; {huge} in huge pages", dst.pages);
    // The stream's frames are whole aligned blocks (the source's memory has no zero
    // pages), each read aligned, once its first frames grew to a block: every block but
    // the first moves (that one went in six smaller frames, the ramp up from 64 KiB that
    // lets a slow link land some of the stream early).
    let block = (2 << 20) / dst.page_size as u64;
    assert_eq!(moved, dst.pages - block, "{:?}", dst.pager);
    if huge == 0 || thp_fallbacks() != fallbacks {
        // THP off (`transparent_hugepage/enabled`: never), or a huge page could not be had
        // (this process's or another's): the reader's buffer had small pages somewhere,
        // and those blocks moved in 4 KiB pages.
        return testkit::skip(test, "not every receive buffer got transparent huge pages");
    }
    // (The first, copied block may have been collapsed into one by khugepaged since.)
    assert!(
        huge == moved || huge == moved + block,
        "every moved block landed as a huge page: {huge} of {moved}"
    );
}

#[test]
fn without_huge_pages_every_page_is_copied_into_small_pages() {
    let dst = streamed(false);
    assert_eq!(dst.pager.placed_moved, 0, "{:?}", dst.pager);
    assert_eq!(dst.postcopy_pages, dst.pages, "every page placed");
    assert_eq!(
        hugepages::transparent_in(&dst.memory),
        0,
        "advised MADV_NOHUGEPAGE throughout"
    );
}

fn injected(fault: Fault, after: u64, addr: &'static str) {
    injected_with(fault, after, addr, 4096, 32 << 20);
}

fn injected_with(fault: Fault, after: u64, addr: &'static str, page_size: usize, bytes: usize) {
    let mut case = Case::new(addr, bytes);
    case.opts.page_size = page_size;
    case.opts.max_rounds = 0; // everything moves in postcopy: the cut lands there
    case.reconnects = Some(1);
    case.src = Box::new(move |c| c.inject(fault, after));
    case.run();
}

#[test]
fn a_cut_pair_pauses_and_resumes_at_several_points() {
    for after in [0, 1000, 5000] {
        injected(Fault::Cut, after, "127.0.0.1:0");
    }
    injected(Fault::Cut, 3000, "unix:");
}

#[test]
fn a_half_written_frame_pauses_and_resumes() {
    for after in [10, 4000] {
        injected(Fault::HalfFrame, after, "127.0.0.1:0");
    }
    injected(Fault::HalfFrame, 2000, "unix:");
}

#[test]
#[ignore = "needs free 2 MiB hugepages: scripts/test reserves them and runs the ignored tests"]
fn two_mib_pages_survive_a_cut_connection() {
    // 48: this test's 32 and the other 2 MiB test's 16, which may run at the same time.
    if !hugepages::available("two_mib_pages_survive_a_cut_connection", 48) {
        return;
    }
    injected_with(
        Fault::Cut,
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
fn a_destination_that_stops_reading_is_cut_by_the_silence_deadline_and_resumed() {
    // 64 MiB cannot hide in the loopback socket buffers (a few MiB): the source's send
    // of a frame takes longer than the silence deadline while the destination's reader
    // sleeps (the kernel may still trickle a few bytes: a deadline per call would not
    // see it).
    let mut case = Case::new("127.0.0.1:0", 64 << 20);
    case.opts.max_rounds = 0;
    case.reconnects = None;
    // No destination workload: its faults would fetch pages on the urgent channel, and
    // the stream could end before filling the socket buffers.
    case.workload = idle;
    let stall = test_timing().silence * 2;
    case.dst = Box::new(move |c| c.inject(Fault::Stall(stall), 100));
    let (src, dst) = case.run();
    // Both ends resumed at least once. Not necessarily equally often: the source dials
    // while the destination still sleeps, and a pair that breaks during its greeting
    // counts at the side that had finished greeting only (src 2 / dst 1 seen at load 20).
    assert!(src.reconnects >= 1, "the stall paused the source");
    assert!(dst.reconnects >= 1, "the destination resumed too");
}

#[test]
fn resume_waits_for_the_operator_when_automatic_resume_is_off() {
    let mut case = Case::new("127.0.0.1:0", 16 << 20);
    case.opts.max_rounds = 0;
    case.opts.auto_resume = false;
    case.reconnects = Some(1);
    case.src = Box::new(|c| {
        c.inject(Fault::Cut, 500);
        // The operator's command, from another thread, once the source is paused.
        let c: std::sync::Arc<SourceControl> = c.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(60);
            while c.progress.link.paused().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                c.progress.link.paused().is_some(),
                "it did not resume by itself"
            );
            c.resume();
        });
    });
    case.run();
}

#[test]
fn a_wrong_key_is_refused_and_a_stranger_does_not_disturb_the_migration() {
    let dest = destination(test_timing());
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
                    timing: test_timing(),
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
    assert!(
        matches!(
            err.refusal(),
            Some(transport::Refusal::PeerShut { .. } | transport::Refusal::WrongKey)
        ),
        "{err}"
    );
    // The destination still takes the real source and completes.
    let report = source(key()).run(|| {}).expect("the real source");
    assert_eq!(report.verified, report.pages);
    dest_t.join().unwrap().expect("destination");
}

#[test]
fn a_destination_nobody_connects_to_gives_up_with_an_error() {
    let dest = destination(Timing {
        give_up_after: Duration::from_millis(300),
        ..test_timing()
    });
    let t = Instant::now();
    let err = dest.run(|_| {}).expect_err("no source came");
    assert!(
        matches!(err, Error::Transport(transport::Error::GaveUp { .. })),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "bounded: {:?}",
        t.elapsed()
    );
}

#[test]
fn a_source_with_no_destination_gives_up_after_its_bound() {
    // A port nobody listens on: every connection attempt is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let memory = source_memory(1 << 20);
    let opts = SourceOptions {
        timing: Timing {
            give_up_after: Duration::from_millis(800),
            ..test_timing()
        },
        ..SourceOptions::default()
    };
    // SAFETY: our mapping, nobody writes it.
    let m = unsafe {
        Migration::new(
            transport::Addr::Tcp(port),
            key(),
            memory.addr(),
            memory.len(),
            opts,
        )
    }
    .unwrap();
    let t = Instant::now();
    let err = m.run(|| {}).expect_err("nobody listens");
    assert!(
        matches!(
            err,
            Error::Transport(transport::Error::GaveUp {
                last: LinkError::Connect { .. },
                ..
            })
        ),
        "{err:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "bounded: {:?}",
        t.elapsed()
    );
}

#[test]
fn requested_pages_overtake_a_saturating_background_stream() {
    // 128 MiB in pure postcopy: the stream saturates the link for the whole run while the
    // workload reads pages in the half the stream reaches last. Their requests travel on
    // the urgent connection, so they arrive far sooner than the stream would bring them.
    let mut case = Case::new("127.0.0.1:0", 128 << 20);
    case.opts.max_rounds = 0;
    case.workload = far_reader;
    let o = case.run_all();
    let (src, dst, reads) = (o.src, o.dst, o.timings);
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
    assert_eq!(src.switch_reason, SwitchReason::Operator);
    assert_eq!(src.rounds.len(), 1, "the switch came after the first round");
}

/// The verdict reads the source's final content: an embedder whose stop left something
/// writing — here a write to pages 0–2 just after the stream sent them — gets a mismatch
/// naming exactly those pages, never "verified". (The write is made on the sending thread
/// between two frames, where no part of the library reads the memory.)
#[test]
fn a_write_after_the_stop_to_pages_already_sent_fails_the_verdict() {
    use postcopy::fault::Event;
    use postcopy::wire::Channel;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let memory = source_memory(4 << 20);
    let dest = destination(test_timing());
    let addr = dest.local_addr().unwrap();
    let receiving = std::thread::spawn(move || dest.run(|_| {}));
    let opts = SourceOptions {
        max_rounds: 0,
        timing: test_timing(),
        ..SourceOptions::default()
    };
    // SAFETY: our mapping, alive until `run` returns; only the observer below writes it.
    let m = unsafe { Migration::new(addr, key(), memory.addr(), memory.len(), opts).unwrap() };
    let (base, stopped, wrote) = (
        memory.addr(),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (s, w) = (stopped.clone(), wrote.clone());
    m.control().observe(Arc::new(move |event| match event {
        Event::Stopped => s.store(true, Ordering::SeqCst),
        // The first frame of the stream (pages 0–511, from the cursor at 0: nothing
        // faults at the destination) is in the socket: rewrite three of its pages.
        Event::PageFrame(Channel::Main)
            if s.load(Ordering::SeqCst) && !w.swap(true, Ordering::SeqCst) =>
        {
            for p in 0..3 {
                // SAFETY: inside the mapping; no slice over it is alive between frames.
                unsafe { std::ptr::write_volatile((base + p * 4096) as *mut u64, !0) };
            }
        }
        _ => {}
    }));
    let err = m
        .run(|| {})
        .expect_err("pages changed after they were sent");
    assert!(wrote.load(Ordering::SeqCst), "the observer wrote");
    assert!(
        matches!(err, Error::Mismatch { pages: 3, first: 0 }),
        "{err:?}"
    );
    // The destination hears the verdict and ends with it.
    let dst = receiving.join().unwrap();
    assert!(
        dst.is_err(),
        "the destination was not told: {:?}",
        dst.map(|r| r.verdict)
    );
}

/// A page the destination's workload drops (`MADV_DONTNEED`: a balloon, free-page
/// reporting) before any copy of it lands holds the workload's own zeros: DIGESTS marks it,
/// and the verdict leaves it out and counts it, every other page verified. (The stream is
/// held after its first frame until the drop is done, so no dropped page landed before.)
#[test]
fn pages_the_destination_drops_before_they_land_are_left_out_of_the_verdict_and_counted() {
    const PS: usize = 4096;
    let bytes = 4 << 20;
    let pages = (bytes / PS) as u64;
    let dest = destination(test_timing());
    let addr = dest.local_addr().unwrap();
    let (on_run, hold) = common::drop_second_half_at_run();
    let receiving = std::thread::spawn(move || dest.run(on_run));
    let memory = source_memory(bytes);
    let opts = SourceOptions {
        max_rounds: 0,
        timing: test_timing(),
        ..SourceOptions::default()
    };
    // SAFETY: our mapping, alive until `run` returns; nothing writes it.
    let m = unsafe { Migration::new(addr, key(), memory.addr(), bytes, opts).unwrap() };
    let h = hold.clone();
    m.control()
        .observe(std::sync::Arc::new(move |event| h.hear(event)));
    let src = m.run(|| {}).expect("verified, the dropped pages left out");
    assert!(hold.held(), "the stream was held");
    assert_eq!(src.dropped_at_destination, pages / 2, "{src:?}");
    assert_eq!(src.verified, pages / 2, "{src:?}");
    let dst = receiving
        .join()
        .unwrap()
        .expect("the destination heard the verdict");
    assert!(dst.verdict.contains("dropped"), "{}", dst.verdict);
    for p in 0..pages as usize {
        // SAFETY: both mappings alive; nothing writes them any more.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts((memory.addr() + p * PS) as *const u8, PS),
                std::slice::from_raw_parts((dst.memory.addr() + p * PS) as *const u8, PS),
            )
        };
        if p < pages as usize / 2 {
            assert!(a == b, "page {p}: the source's");
        } else {
            assert!(b.iter().all(|&x| x == 0), "page {p}: the workload's zeros");
        }
    }
}
