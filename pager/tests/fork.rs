//! Tests that fork. Each runs in a process of its own with a watchdog (`testkit::isolated`):
//! a fork anywhere in a process whose pager has fork events on is a FORK event for that
//! pager, and a deadlock around `fork()` must fail its test, not stall the suite.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{DeliveryMode, Features, Mapping, MemoryKind, MemorySource, Pager, RegionSpec, Uffd};

const PS: usize = 4096;
const WATCHDOG: Duration = Duration::from_secs(240);

fn uffd_with(features: Features) -> Uffd {
    Uffd::builder()
        .non_blocking(true)
        .require(features | Features::EVENT_REMOVE)
        .open()
        .expect("uffd")
}

#[test]
fn a_child_sends_its_uffd_and_the_pager_serves_the_child() {
    if !testkit::isolated(
        "a_child_sends_its_uffd_and_the_pager_serves_the_child",
        WATCHDOG,
    ) {
        return;
    }
    let pages = 32;
    let image = common::image(pages, PS, 3);
    let child_image = image.clone();
    let (pid, uffd, base, len) = common::child_with_uffd(pages, move |memory| {
        // SAFETY: the child's registered region, served by the parent.
        let got = unsafe { common::bytes(memory.addr(), memory.len()) };
        i32::from(got != child_image.as_slice())
    });
    let pager = Pager::builder(uffd, Arc::new(MemorySource::new(image).with_zero_scan(PS)))
        .region(RegionSpec::new(base, len, MemoryKind::Anon, 0))
        .register(false)
        .mode(DeliveryMode::Thread)
        .start()
        .expect("start");
    assert_eq!(common::wait(pid), 0, "child verified its memory");
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.placed(), pages as u64);
    assert_eq!(
        stats.placed_zero,
        (pages / 3) as u64,
        "known-zero pages sent as zero pages"
    );
}

#[test]
fn a_forked_child_is_served_by_a_child_engine() {
    if !testkit::isolated("a_forked_child_is_served_by_a_child_engine", WATCHDOG) {
        return;
    }
    let pages = 64;
    let image = common::image(pages, PS, 0);
    let memory = Mapping::new(MemoryKind::Anon, pages * PS).expect("map");
    let pager = Pager::builder(
        uffd_with(Features::EVENT_FORK),
        Arc::new(MemorySource::new(image.clone())),
    )
    .region(RegionSpec::new(
        memory.addr(),
        memory.len(),
        MemoryKind::Anon,
        0,
    ))
    .mode(DeliveryMode::Thread)
    .start()
    .expect("start");
    // The parent faults the first half in; the child inherits those pages and faults the
    // second half through its own uffd, served by the engine the fork event started.
    // SAFETY: served region.
    let half = unsafe { common::bytes(memory.addr(), pages / 2 * PS) };
    assert_eq!(half, &image[..pages / 2 * PS]);
    let (addr, expect) = (memory.addr(), image.clone());
    // SAFETY: the child only reads memory and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: the child's copy of the region.
        let got = unsafe { common::bytes(addr, pages * PS) };
        let code = i32::from(got != expect.as_slice());
        // SAFETY: ends the child.
        unsafe { libc::_exit(code) };
    }
    assert_eq!(
        common::wait(pid),
        0,
        "the child read the image through its own uffd"
    );
    let stats = pager.stop().expect("stop");
    assert_eq!(stats.events_fork, 1);
    assert_eq!(stats.forks_served, 1);
}

/// What a forked child of the storm reports.
const CHILD_SERVED: i32 = 0;
const CHILD_WRONG: i32 = 1;
const CHILD_SAW_ZEROS: i32 = 3;

/// In a forked child: reads `count` pages picked from its pid, and says whether each was
/// its image data (served), all zeros (its uffd was refused), or anything else (wrong).
/// Async-signal-safe only: memory reads, `getpid(2)`, `_exit(2)`.
fn child_reads_and_exits(addr: usize, pages: usize, image: &[u8], count: usize) -> ! {
    let mut x = nix::unistd::getpid().as_raw() as u64 | 1;
    let mut code = CHILD_SERVED;
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = x as usize % pages;
        // SAFETY: the child's copy of the served region.
        let got = unsafe { common::bytes(addr + page * PS, PS) };
        if got == &image[page * PS..(page + 1) * PS] {
            continue;
        }
        code = if got.iter().all(|&b| b == 0) {
            CHILD_SAW_ZEROS
        } else {
            CHILD_WRONG
        };
        break;
    }
    // SAFETY: ends the child without running the parent's exit handlers.
    unsafe { libc::_exit(code) }
}

#[test]
fn a_thousand_forks_while_faults_are_served_never_hang_and_every_child_is_served_or_refused() {
    let name =
        "a_thousand_forks_while_faults_are_served_never_hang_and_every_child_is_served_or_refused";
    if !testkit::isolated(name, WATCHDOG) {
        return;
    }
    const FORKS: u64 = 1000;
    let pages = 1024;
    let image = Arc::new(common::image(pages, PS, 0));
    let memory = Mapping::new(MemoryKind::Anon, pages * PS).expect("map");
    let pager = Pager::builder(
        uffd_with(Features::EVENT_FORK),
        Arc::new(MemorySource::new(image.as_slice().to_vec())),
    )
    .region(RegionSpec::new(
        memory.addr(),
        memory.len(),
        MemoryKind::Anon,
        0,
    ))
    .mode(DeliveryMode::PerCpu)
    .start()
    .expect("start");
    let addr = memory.addr();
    let stop = AtomicBool::new(false);
    let forks = AtomicU64::new(0);
    let (served, zeros, wrong) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let parent_reads = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        // A busy loop competing for each CPU.
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(SeqCst) {
                    std::hint::spin_loop();
                }
            });
        }
        // The parent's own workload faults pages in all along.
        s.spawn(|| {
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            while !stop.load(SeqCst) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = x as usize % pages;
                // SAFETY: served region.
                let got = unsafe { common::bytes(addr + page * PS, PS) };
                assert_eq!(
                    got,
                    &image[page * PS..(page + 1) * PS],
                    "parent page {page}"
                );
                parent_reads.fetch_add(1, SeqCst);
            }
        });
        // Two threads fork in a loop; each child reads pages and exits.
        let forkers: Vec<_> = (0..2)
            .map(|_| {
                let image = image.clone();
                let (forks, served, zeros, wrong) = (&forks, &served, &zeros, &wrong);
                s.spawn(move || {
                    while forks.fetch_add(1, SeqCst) < FORKS {
                        // SAFETY: the child only reads memory and `_exit`s.
                        let pid = unsafe { libc::fork() };
                        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
                        if pid == 0 {
                            child_reads_and_exits(addr, pages, &image, 4);
                        }
                        match common::wait(pid) {
                            CHILD_SERVED => served.fetch_add(1, SeqCst),
                            CHILD_SAW_ZEROS => zeros.fetch_add(1, SeqCst),
                            _ => wrong.fetch_add(1, SeqCst),
                        };
                    }
                })
            })
            .collect();
        for f in forkers {
            f.join().expect("forking thread");
        }
        stop.store(true, SeqCst);
    });
    let took = started.elapsed();
    let stats = pager.stop().expect("stop");
    let (served, zeros, wrong) = (served.into_inner(), zeros.into_inner(), wrong.into_inner());
    eprintln!(
        "{FORKS} forks in {took:?}: children served {served}, saw zeros {zeros}, wrong {wrong}; \
         parent reads {}; engine: forks served {}, refused {}, failed {}",
        parent_reads.load(SeqCst),
        stats.forks_served,
        stats.forks_refused,
        stats.forks_failed
    );
    assert_eq!(wrong, 0, "no child read a wrong page");
    assert_eq!(served + zeros, FORKS);
    assert_eq!(stats.events_fork, FORKS, "every fork was seen");
    assert_eq!(
        stats.forks_served + stats.forks_refused + stats.forks_failed,
        FORKS,
        "every child was served or refused, none dropped"
    );
    assert!(
        zeros <= stats.forks_refused + stats.forks_failed,
        "only refused children read zeros: {zeros} > {}",
        stats.forks_refused + stats.forks_failed
    );
    assert_eq!(stats.forks_failed, 0, "no child engine failed to start");
}
